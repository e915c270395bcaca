//! CUDA discovery, without C++ glue of our own.
//!
//! tch links `libtorch_cpu.so`; the linker's `--as-needed` drops
//! `libtorch_cuda.so` because no symbol of it is referenced, so libtorch's CUDA
//! backend never registers and every CUDA call reports "no CUDA backend".
//! [`ensure_cuda_backend`] loads it by hand, from the folder of the libtorch that
//! is actually mapped into this process (which is not necessarily the one the
//! binary was built against: a GPU machine runs our binaries with its own torch on
//! `LD_LIBRARY_PATH`).
//!
//! Everything here degrades to "no CUDA" instead of failing: a CPU-only libtorch,
//! a libtorch without its CUDA dependencies, or a machine without a driver all
//! give [`cuda_device_count`] `== 0`.
//!
//! The few CUDA entry points the NCCL collective needs (the current stream, a
//! device guard, a stream query) come from libtorch's stable C shim
//! (`aoti_torch_*` in `libtorch_cuda.so`) and from the CUDA runtime libtorch
//! already loaded, so that the process keeps a single CUDA runtime.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_proto::spec::DeviceKind;
use tch::Device;

/// The folder holding the `libtorch_cpu.so` mapped into this process, found in
/// `/proc/self/maps` (so it is the copy the dynamic loader chose, whatever the
/// rpath or `LD_LIBRARY_PATH` said).
pub fn torch_lib_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        mapped_library_dir(&maps, "libtorch_cpu.so")
    })
    .clone()
}

/// The folder of the first mapping in `maps` (the text of `/proc/<pid>/maps`)
/// whose file is named `file_name`.
fn mapped_library_dir(maps: &str, file_name: &str) -> Option<PathBuf> {
    maps.lines()
        // The path is the last field and the only one starting with '/'; it may
        // contain spaces, so take everything from the first '/'.
        .filter_map(|line| line.find('/').map(|at| Path::new(&line[at..])))
        .find(|path| path.file_name().is_some_and(|name| name == file_name))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
}

/// Loads libtorch's CUDA backend (`libtorch_cuda.so`, next to the mapped
/// `libtorch_cpu.so`) once per process; true when it is loaded.
///
/// It is opened with `RTLD_NOW | RTLD_GLOBAL` and never closed: its static
/// initialisers register the CUDA backend with c10, and its symbols (NCCL, the
/// `aoti_torch_*` shim) must stay resolvable for the life of the process. False
/// when libtorch is CPU-only or the library fails to load (for example because
/// cuDNN or NCCL is missing); the reason is logged at debug level.
pub fn ensure_cuda_backend() -> bool {
    cuda_backend().is_ok()
}

/// The outcome of loading `libtorch_cuda.so`, with the reason when it failed.
fn cuda_backend() -> &'static Result<PathBuf, String> {
    static BACKEND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let loaded = load_cuda_backend();
        match &loaded {
            Ok(path) => tracing::debug!(path = %path.display(), "loaded libtorch's CUDA backend"),
            Err(reason) => tracing::debug!(%reason, "libtorch's CUDA backend is not loaded"),
        }
        loaded
    })
}

fn load_cuda_backend() -> Result<PathBuf, String> {
    let dir = torch_lib_dir().ok_or("libtorch_cpu.so is not mapped into this process")?;
    let path = dir.join("libtorch_cuda.so");
    if !path.exists() {
        return Err(format!(
            "{} does not exist (CPU-only libtorch)",
            path.display()
        ));
    }
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} contains a NUL byte", path.display()))?;
    // SAFETY: `c_path` is a valid C string. Loading runs libtorch_cuda's static
    // initialisers, which only register the CUDA backend; the handle is kept open
    // for the life of the process on purpose (never `dlclose`d).
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(format!("dlopen {}: {}", path.display(), last_dl_error()));
    }
    Ok(path)
}

/// The calling thread's last `dlerror()` message.
fn last_dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated, thread-local message that
    // stays valid until the next dl* call on this thread; it is copied at once.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        return "unknown error".to_owned();
    }
    // SAFETY: non-null and NUL-terminated (see above).
    unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned()
}

/// How many CUDA devices libtorch sees; 0 when the CUDA backend cannot be loaded
/// or there is no driver or device. Never panics.
pub fn cuda_device_count() -> usize {
    if !ensure_cuda_backend() {
        return 0;
    }
    // c10 answers 0 (with a warning) when there is no driver; the catch is for
    // anything else it might throw, which tch turns into a panic.
    match std::panic::catch_unwind(tch::Cuda::device_count) {
        Ok(count) => usize::try_from(count).unwrap_or(0),
        Err(_) => {
            tracing::debug!("libtorch failed to count CUDA devices");
            0
        }
    }
}

/// The device a worker with this local rank trains on.
///
/// `Auto` is `cuda:(local_rank % devices)` when there is a CUDA device and the
/// CPU otherwise; `Cuda` is the same but an error without a device.
pub fn resolve(kind: DeviceKind, local_rank: usize) -> Result<Device, String> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Auto => match cuda_device_count() {
            0 => Ok(Device::Cpu),
            count => Ok(Device::Cuda(local_rank % count)),
        },
        DeviceKind::Cuda => match cuda_device_count() {
            0 => Err(format!(
                "workers.device = \"cuda\" but no CUDA device is visible ({})",
                no_device_reason()
            )),
            count => Ok(Device::Cuda(local_rank % count)),
        },
    }
}

/// Why [`cuda_device_count`] is 0, in words for an error message.
fn no_device_reason() -> String {
    match cuda_backend() {
        Err(reason) => format!("libtorch's CUDA backend could not be loaded: {reason}"),
        Ok(path) => format!(
            "libtorch's CUDA backend {} is loaded but reports no device: check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES",
            path.display()
        ),
    }
}

/// The NCCL that pip installs next to torch (`site-packages/nvidia/nccl/lib/libnccl.so.2`,
/// the copy `libtorch_cuda.so` itself loads through its rpath), if it exists.
pub fn nccl_library_path() -> Option<PathBuf> {
    // torch_lib_dir is `<site-packages>/torch/lib`, already canonical (it comes
    // from /proc/self/maps), so two `parent()`s are `../..`.
    let site_packages = torch_lib_dir()?.parent()?.parent()?.to_path_buf();
    let path = site_packages.join("nvidia/nccl/lib/libnccl.so.2");
    path.exists().then_some(path)
}

/// `AOTITorchError` (int32; 0 is success) of libtorch's C shim.
type AotiError = i32;

/// The entry points of libtorch's stable C shim (`aoti_torch_*`, exported by
/// `libtorch_cuda.so`) that we use, resolved once.
struct TorchCudaShim {
    /// Keeps the library referenced; it is also pinned by [`ensure_cuda_backend`].
    _library: libloading::Library,
    get_current_cuda_stream: unsafe extern "C" fn(i32, *mut *mut c_void) -> AotiError,
    create_cuda_guard: unsafe extern "C" fn(i32, *mut *mut c_void) -> AotiError,
    delete_cuda_guard: unsafe extern "C" fn(*mut c_void) -> AotiError,
}

fn torch_cuda_shim() -> Result<&'static TorchCudaShim, String> {
    static SHIM: OnceLock<Result<TorchCudaShim, String>> = OnceLock::new();
    SHIM.get_or_init(load_torch_cuda_shim)
        .as_ref()
        .map_err(Clone::clone)
}

fn load_torch_cuda_shim() -> Result<TorchCudaShim, String> {
    let path = cuda_backend()
        .as_ref()
        .map_err(|reason| format!("libtorch's CUDA backend is not loaded: {reason}"))?;
    // SAFETY: the library is already loaded (see `load_cuda_backend`); this only
    // takes another reference to it and runs no initialiser.
    let library = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    // SAFETY: the signatures match torch/csrc/inductor/aoti_torch/c/shim.h of
    // torch 2.11 (int32 device index, out-pointers, int32 error code); the
    // pointers are copied out and `_library` keeps them valid.
    unsafe {
        let get_current_cuda_stream = *library
            .get(b"aoti_torch_get_current_cuda_stream\0")
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let create_cuda_guard = *library
            .get(b"aoti_torch_create_cuda_guard\0")
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let delete_cuda_guard = *library
            .get(b"aoti_torch_delete_cuda_guard\0")
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TorchCudaShim {
            _library: library,
            get_current_cuda_stream,
            create_cuda_guard,
            delete_cuda_guard,
        })
    }
}

/// `device` as the shim's int32 index, when it names a visible device (asking
/// libtorch about another one makes it print an exception).
fn device_index(device: i64) -> Result<i32, String> {
    let count = cuda_device_count();
    match i32::try_from(device) {
        Ok(index) if index >= 0 && (index as usize) < count => Ok(index),
        _ => Err(format!(
            "cuda:{device} is not visible ({count} CUDA devices)"
        )),
    }
}

/// libtorch's current CUDA stream on `device` for the calling thread (a
/// `cudaStream_t`): work queued on it is ordered with libtorch's own kernels.
pub fn current_cuda_stream(device: i64) -> Result<*mut c_void, String> {
    let index = device_index(device)?;
    let shim = torch_cuda_shim()?;
    let mut stream = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; the shim catches C++ exceptions and reports
    // them as a non-zero code.
    let code = unsafe { (shim.get_current_cuda_stream)(index, &mut stream) };
    if code != 0 {
        return Err(format!(
            "libtorch could not give the current CUDA stream of cuda:{device} (is the device visible?)"
        ));
    }
    Ok(stream)
}

/// Makes `device` the calling thread's current CUDA device until dropped, then
/// restores the previous one (libtorch's `CUDAGuard`). NCCL binds a
/// communicator to the device current when it is created.
pub struct CudaDeviceGuard {
    shim: &'static TorchCudaShim,
    /// An owned `CUDAGuardHandle`.
    guard: *mut c_void,
}

impl CudaDeviceGuard {
    /// Makes `device` (a CUDA index) current; an error when no such device
    /// is visible, libtorch has no CUDA backend, or it refuses the device.
    pub fn new(device: i64) -> Result<Self, String> {
        let index = device_index(device)?;
        let shim = torch_cuda_shim()?;
        let mut guard = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; errors come back as a non-zero code.
        let code = unsafe { (shim.create_cuda_guard)(index, &mut guard) };
        if code != 0 || guard.is_null() {
            return Err(format!(
                "libtorch could not make cuda:{device} the current device"
            ));
        }
        Ok(Self { shim, guard })
    }
}

impl Drop for CudaDeviceGuard {
    fn drop(&mut self) {
        // SAFETY: `guard` came from create_cuda_guard and is deleted only here.
        let code = unsafe { (self.shim.delete_cuda_guard)(self.guard) };
        if code != 0 {
            tracing::warn!("libtorch failed to restore the current CUDA device");
        }
    }
}

/// `cudaError_t` codes of the CUDA runtime used below.
const CUDA_SUCCESS: c_int = 0;
const CUDA_ERROR_NOT_READY: c_int = 600;

/// `cudaStreamQuery` and `cudaGetErrorString` of the CUDA runtime libtorch loaded.
struct CudaRuntime {
    stream_query: unsafe extern "C" fn(*mut c_void) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
}

fn cuda_runtime() -> Result<&'static CudaRuntime, String> {
    static RUNTIME: OnceLock<Result<CudaRuntime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            // libcudart is a dependency of libtorch_cpu, so it is in the global
            // scope: look it up there rather than guess its soname (.so.12, .so.13).
            let global = libloading::os::unix::Library::this();
            // SAFETY: the signatures are the CUDA runtime's
            // (cudaError_t cudaStreamQuery(cudaStream_t), const char* cudaGetErrorString(cudaError_t));
            // the global scope is never unloaded, so the pointers stay valid.
            unsafe {
                let stream_query = *global
                    .get(b"cudaStreamQuery\0")
                    .map_err(|e| format!("CUDA runtime: {e}"))?;
                let error_string = *global
                    .get(b"cudaGetErrorString\0")
                    .map_err(|e| format!("CUDA runtime: {e}"))?;
                Ok(CudaRuntime {
                    stream_query,
                    error_string,
                })
            }
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether all work queued on `stream` has completed; does not block.
///
/// # Safety
/// `stream` must be a live `cudaStream_t` of this process (such as one from
/// [`current_cuda_stream`]), or null for the legacy default stream.
pub unsafe fn cuda_stream_done(stream: *mut c_void) -> Result<bool, String> {
    let runtime = cuda_runtime()?;
    // SAFETY: the caller's contract.
    match unsafe { (runtime.stream_query)(stream) } {
        CUDA_SUCCESS => Ok(true),
        CUDA_ERROR_NOT_READY => Ok(false),
        code => {
            // SAFETY: cudaGetErrorString returns a static NUL-terminated string.
            let message = unsafe { CStr::from_ptr((runtime.error_string)(code)) };
            Err(format!(
                "cudaStreamQuery: {} (CUDA error {code})",
                message.to_string_lossy()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_folder_of_a_mapped_library() {
        let maps = "\
7f00-7f01 r--p 00000000 00:20 123    /usr/lib/x86_64-linux-gnu/libc.so.6
7f02-7f03 r-xp 00000000 00:20 456    /opt/my env/torch/lib/libtorch_cpu.so
7f04-7f05 rw-p 00000000 00:00 0 
7f06-7f07 r--p 00000000 00:20 789    /opt/other/libtorch_cpu.so.bak
";
        assert_eq!(
            mapped_library_dir(maps, "libtorch_cpu.so"),
            Some(PathBuf::from("/opt/my env/torch/lib"))
        );
        assert_eq!(mapped_library_dir(maps, "libtorch_cuda.so"), None);
    }

    #[test]
    fn this_process_maps_libtorch() {
        let dir = torch_lib_dir().expect("libtorch_cpu.so is mapped into a binary that links tch");
        assert!(dir.join("libtorch_cpu.so").exists(), "{}", dir.display());
    }

    #[test]
    fn cpu_is_always_cpu_and_auto_follows_the_device_count() {
        assert_eq!(resolve(DeviceKind::Cpu, 3), Ok(Device::Cpu));
        let count = cuda_device_count();
        let auto = resolve(DeviceKind::Auto, 3).expect("auto always resolves");
        let cuda = resolve(DeviceKind::Cuda, 3);
        if count == 0 {
            assert_eq!(auto, Device::Cpu);
            let err = cuda.expect_err("no CUDA device here");
            assert!(
                err.starts_with("workers.device = \"cuda\" but no CUDA device is visible"),
                "{err}"
            );
        } else {
            assert_eq!(auto, Device::Cuda(3 % count));
            assert_eq!(cuda, Ok(Device::Cuda(3 % count)));
        }
    }

    #[test]
    fn invalid_device_indices_are_errors() {
        assert!(current_cuda_stream(-1).is_err());
        assert!(CudaDeviceGuard::new(i64::from(i32::MAX) + 1).is_err());
    }
}
