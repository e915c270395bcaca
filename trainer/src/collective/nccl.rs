//! NCCL collectives for CUDA tensors.
//!
//! Every operation works on the tensors' device memory directly, queued on
//! libtorch's *current* CUDA stream of that device, so it is ordered with the
//! kernels that produced the gradients and with those that read the result; the
//! host does not wait for the GPU (as in `torch.distributed`). Only
//! [`Collective::barrier`] waits until the GPU has finished, since that is its
//! meaning.
//!
//! # Finding NCCL
//!
//! The types come from cudarc's bindings (`cudarc::nccl::sys`), but the entry
//! points are resolved here, with `libloading`, because cudarc's own loader
//! cannot find the NCCL we want in-process:
//!
//! - cudarc 0.19 (`get_lib_name_candidates`) tries `libnccl.so`,
//!   `libnccl.so.13`, `.12`, `.11`, `.10`, `.9`, `.1` and some Windows-style
//!   names, honours no environment variable, and never tries `libnccl.so.2`,
//!   the only name pip's NCCL (`site-packages/nvidia/nccl/lib/libnccl.so.2`) has.
//! - Loading that file first with `RTLD_GLOBAL` does not help: a later dlopen of
//!   a bare name reuses a loaded library only when the name equals its soname
//!   (`libnccl.so.2`), and a `libnccl.so` symlink would need a folder on the
//!   search path, which is fixed when the process starts (`LD_LIBRARY_PATH` is
//!   read once by the dynamic loader).
//! - cudarc's loader panics when nothing is found.
//!
//! So [`nccl_available`] (never panics) opens, in order, the first of:
//! 1. `$KILN_NCCL_LIBRARY` when set (and nothing else then);
//! 2. `libnccl.so.2` after loading libtorch's CUDA backend: `libtorch_cuda.so`
//!    depends on `libnccl.so.2` and finds it through its own rpath, so the soname
//!    resolves to *the copy libtorch already uses* (one NCCL per process);
//!    without that backend the soname is searched on `LD_LIBRARY_PATH` and the
//!    system paths;
//! 3. pip's copy next to the loaded libtorch ([`device::nccl_library_path`]);
//! 4. cudarc's names (a system `libnccl.so`).
//!
//! # Blocking and abort
//!
//! The communicator is created with `ncclCommInitRankConfig` and `blocking = 0`
//! (non-blocking): no NCCL call waits for peers, they return `ncclInProgress`
//! and we poll `ncclCommGetAsyncError` until the communicator is idle, checking
//! the [`AbortHandle`] between polls. So a rank stuck in initialisation (a peer
//! that never arrives) or in a barrier can be broken from another thread: the
//! abort action calls `ncclCommAbort`, which also stops NCCL kernels that wait
//! for a dead peer, so a libtorch synchronisation blocked on them returns. A
//! mutex serialises NCCL calls on the communicator, so `ncclCommAbort` never
//! frees it under a call in progress; it is never held across a wait.
//!
//! After an NCCL error the communicator is aborted (NCCL's rule: nothing can be
//! assumed of it) and every later operation fails with the first error.
//! Dropping the collective finalizes and destroys the communicator, or aborts it
//! when finalizing fails or takes longer than [`FINALIZE_TIMEOUT`].
//!
//! NCCL refuses two ranks on one device, so one GPU tests world size 1 only;
//! multi-rank correctness of the trait is covered by the TCP ring's tests.

use std::ffi::{CStr, OsStr, OsString, c_char, c_int, c_void};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cudarc::nccl::sys::{
    cudaStream_t, ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId,
};
use tch::{Device, Kind, Tensor};

use super::{AbortHandle, Collective, CollectiveError, Result};
use crate::device;

/// Environment variable naming the NCCL library to load, overriding the search.
pub const NCCL_LIBRARY_ENV: &str = "KILN_NCCL_LIBRARY";

/// How long dropping a communicator waits for `ncclCommFinalize` (outstanding
/// operations to drain) before aborting it instead.
pub const FINALIZE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest sleep between two polls of an operation in progress: short enough to
/// add little latency to a barrier, long enough not to burn a core while a rank
/// waits for a slow peer.
const MAX_POLL_PAUSE: Duration = Duration::from_millis(1);

// ncclResult_t values we branch on. NCCL returns them as a C int; they are kept
// as integers because turning an unknown value (a newer NCCL) into cudarc's Rust
// enum would be undefined behaviour.
const NCCL_SUCCESS: c_int = 0;
const NCCL_INVALID_ARGUMENT: c_int = 4;
const NCCL_INVALID_USAGE: c_int = 5;
const NCCL_IN_PROGRESS: c_int = 7;

/// `NCCL_VERSION(2, 28, 0)`: the config layout we pass (cudarc's `nccl-02028`).
const NCCL_CONFIG_VERSION: u32 = 22800;
const NCCL_CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default".
const NCCL_CONFIG_UNDEF_INT: c_int = c_int::MIN;

/// The NCCL entry points we use, from one library (see the module doc).
struct NcclApi {
    /// Keeps the function pointers below valid.
    _library: libloading::Library,
    /// The file the library was loaded from, for messages.
    path: String,
    /// `NCCL_VERSION_CODE` of the loaded library (e.g. 22809 for 2.28.9).
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    comm_init_rank_config: unsafe extern "C" fn(
        *mut ncclComm_t,
        c_int,
        ncclUniqueId,
        c_int,
        *mut ncclConfig_t,
    ) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int,
    comm_finalize: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> c_int,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_last_error: unsafe extern "C" fn(ncclComm_t) -> *const c_char,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclRedOp_t,
        ncclComm_t,
        cudaStream_t,
    ) -> c_int,
    broadcast: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        c_int,
        ncclComm_t,
        cudaStream_t,
    ) -> c_int,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        ncclDataType_t,
        ncclComm_t,
        cudaStream_t,
    ) -> c_int,
}

impl NcclApi {
    /// Binds the entry points of an opened NCCL library.
    ///
    /// # Safety
    /// `library` must be an NCCL 2.x library: the signatures below are those of
    /// its `nccl.h` and cannot be checked.
    unsafe fn bind(library: libloading::Library, opened_as: &OsStr) -> Result<Self, String> {
        let missing = |e: libloading::Error| {
            format!(
                "{}: {e} (NCCL older than 2.14?)",
                opened_as.to_string_lossy()
            )
        };
        // Each entry point is copied out of its `Symbol` in its own statement, so
        // that no borrow of `library` outlives it; `_library` keeps them valid.
        macro_rules! entry {
            ($name:literal) => {
                // SAFETY: see the function's contract.
                *unsafe { library.get(concat!($name, "\0").as_bytes()) }.map_err(missing)?
            };
        }
        let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = entry!("ncclGetVersion");
        let get_unique_id = entry!("ncclGetUniqueId");
        let comm_init_rank_config = entry!("ncclCommInitRankConfig");
        let comm_get_async_error = entry!("ncclCommGetAsyncError");
        let comm_finalize = entry!("ncclCommFinalize");
        let comm_destroy = entry!("ncclCommDestroy");
        let comm_abort = entry!("ncclCommAbort");
        let get_error_string = entry!("ncclGetErrorString");
        let get_last_error = entry!("ncclGetLastError");
        let all_reduce = entry!("ncclAllReduce");
        let broadcast = entry!("ncclBroadcast");
        let all_gather = entry!("ncclAllGather");
        let mut api = Self {
            _library: library,
            path: String::new(),
            version: 0,
            get_unique_id,
            comm_init_rank_config,
            comm_get_async_error,
            comm_finalize,
            comm_destroy,
            comm_abort,
            get_error_string,
            get_last_error,
            all_reduce,
            broadcast,
            all_gather,
        };
        // SAFETY: a valid out-pointer.
        let code = unsafe { get_version(&mut api.version) };
        if code != NCCL_SUCCESS {
            return Err(format!("ncclGetVersion: {}", api.error_string(code)));
        }
        api.path = loaded_from(api.get_unique_id as *const c_void)
            .unwrap_or_else(|| opened_as.to_string_lossy().into_owned());
        Ok(api)
    }

    fn error_string(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static string for any code.
        let text = unsafe { (self.get_error_string)(code) };
        if text.is_null() {
            return format!("NCCL error {code}");
        }
        // SAFETY: non-null and NUL-terminated.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }

    /// `ncclGetErrorString(code)`, with NCCL's more detailed last error message
    /// when it has one.
    fn describe(&self, comm: ncclComm_t, code: c_int) -> String {
        let summary = self.error_string(code);
        // SAFETY: `comm` is null or a live communicator (the caller holds the
        // lock); NCCL returns a NUL-terminated string it owns.
        let detail = unsafe { (self.get_last_error)(comm) };
        let detail = if detail.is_null() {
            String::new()
        } else {
            // SAFETY: non-null and NUL-terminated; copied at once.
            unsafe { CStr::from_ptr(detail) }
                .to_string_lossy()
                .trim()
                .to_owned()
        };
        if detail.is_empty() {
            summary
        } else {
            format!("{summary}: {detail}")
        }
    }

    /// `ncclCommGetAsyncError`: success, in progress, or the error (of the call
    /// itself or of the communicator). `comm` must be live and the caller must
    /// hold its lock.
    fn async_state(&self, comm: ncclComm_t) -> c_int {
        let mut state = NCCL_SUCCESS;
        // SAFETY: a live communicator, not used concurrently (the caller's
        // contract), and a valid out-pointer.
        let code = unsafe { (self.comm_get_async_error)(comm, &mut state) };
        if code == NCCL_SUCCESS { state } else { code }
    }

    fn version_string(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", v / 10000, v % 10000 / 100, v % 100)
    }
}

/// The file a loaded symbol comes from (`dladdr`).
fn loaded_from(symbol: *const c_void) -> Option<String> {
    // SAFETY: Dl_info is plain data (pointers), valid when zeroed.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer; any address may be asked about.
    if unsafe { libc::dladdr(symbol, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the loader.
    let path = unsafe { CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    // libtorch_cuda loads it through `$ORIGIN/../../nvidia/...`: show the real path.
    Some(std::fs::canonicalize(&path).map_or(path, |real| real.display().to_string()))
}

/// The process-wide NCCL, loaded on first use.
fn api() -> Result<&'static NcclApi> {
    static API: OnceLock<Result<NcclApi, String>> = OnceLock::new();
    API.get_or_init(|| {
        let loaded = load_api();
        match &loaded {
            Ok(api) => {
                tracing::debug!(path = %api.path, version = %api.version_string(), "loaded NCCL")
            }
            Err(reason) => tracing::debug!(%reason, "no NCCL"),
        }
        loaded
    })
    .as_ref()
    .map_err(|reason| CollectiveError::Nccl(reason.clone()))
}

fn load_api() -> Result<NcclApi, String> {
    let candidates: Vec<OsString> = match std::env::var_os(NCCL_LIBRARY_ENV) {
        Some(path) => vec![path],
        None => {
            // Brings in libtorch_cuda's own libnccl.so.2 when there is one.
            device::ensure_cuda_backend();
            let mut names = vec![OsString::from("libnccl.so.2")];
            names.extend(device::nccl_library_path().map(OsString::from));
            names.extend(
                cudarc::get_lib_name_candidates("nccl")
                    .into_iter()
                    .map(OsString::from),
            );
            names
        }
    };
    let mut failures = Vec::new();
    for candidate in &candidates {
        // SAFETY: loading a shared library runs its initialisers; these names
        // are NCCL's, whose initialisers have no preconditions.
        let bound = match unsafe { libloading::Library::new(candidate) } {
            // SAFETY: a library found under an NCCL name is NCCL.
            Ok(library) => unsafe { NcclApi::bind(library, candidate) },
            Err(e) => Err(e.to_string()),
        };
        match bound {
            Ok(api) => return Ok(api),
            // An NCCL too old for us (or not NCCL): try the next one.
            Err(reason) => failures.push(reason),
        }
    }
    // The first failures are the informative ones (explicit path, soname, pip);
    // the rest are cudarc's guesses.
    let shown = failures.len().min(3);
    let mut message = format!(
        "no NCCL library could be loaded: {}",
        failures[..shown].join("; ")
    );
    if failures.len() > shown {
        message += &format!(
            "; and {} other names (cudarc's) failed",
            failures.len() - shown
        );
    }
    Err(message)
}

/// Whether an NCCL library can be loaded in this process (see the module doc
/// for where it is looked for). Never panics.
pub fn nccl_available() -> bool {
    api().is_ok()
}

/// The loaded NCCL: its file and version (`"2.28.9"`), for logs.
pub fn nccl_version() -> Result<(String, String)> {
    let api = api()?;
    Ok((api.path.clone(), api.version_string()))
}

/// A communicator handle shared between its collective and the abort action.
struct Communicator {
    api: &'static NcclApi,
    state: Mutex<CommunicatorState>,
}

struct CommunicatorState {
    /// Null once the communicator has been aborted or destroyed.
    comm: ncclComm_t,
    /// The error that made us abort it, repeated by every later operation.
    failure: Option<String>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls are
// not concurrent; the mutex around the state serialises them.
unsafe impl Send for CommunicatorState {}

impl Communicator {
    fn lock(&self) -> MutexGuard<'_, CommunicatorState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live communicator, or why there is none.
    fn live(state: &CommunicatorState) -> Result<ncclComm_t> {
        match (&state.failure, state.comm.is_null()) {
            (Some(failure), _) => Err(CollectiveError::Nccl(format!(
                "communicator failed earlier: {failure}"
            ))),
            (None, true) => Err(CollectiveError::Aborted),
            (None, false) => Ok(state.comm),
        }
    }

    /// Aborts the communicator (the action behind the [`AbortHandle`]).
    fn abort(&self) {
        let mut state = self.lock();
        Self::abort_locked(self.api, &mut state);
    }

    fn abort_locked(api: &NcclApi, state: &mut CommunicatorState) {
        if state.comm.is_null() {
            return;
        }
        // SAFETY: a live communicator, not used concurrently (we hold the lock);
        // it is never used again.
        let code = unsafe { (api.comm_abort)(state.comm) };
        state.comm = std::ptr::null_mut();
        if code != NCCL_SUCCESS {
            tracing::warn!(error = %api.error_string(code), "ncclCommAbort failed");
        }
    }

    /// Turns a failed NCCL call into an error; aborts the communicator unless the
    /// error left it usable (a rejected argument).
    fn fail(
        &self,
        state: &mut CommunicatorState,
        op: &'static str,
        code: c_int,
    ) -> CollectiveError {
        let message = format!("{op}: {}", self.api.describe(state.comm, code));
        if code != NCCL_INVALID_ARGUMENT && code != NCCL_INVALID_USAGE {
            Self::abort_locked(self.api, state);
            state.failure = Some(message.clone());
        }
        CollectiveError::Nccl(message)
    }

    /// One poll: Ok(true) when the communicator has nothing in progress.
    fn idle(&self, op: &'static str, abort: &AbortHandle) -> Result<bool> {
        if abort.is_aborted() {
            return Err(CollectiveError::Aborted);
        }
        let mut state = self.lock();
        let comm = Self::live(&state)?;
        match self.api.async_state(comm) {
            NCCL_SUCCESS => Ok(true),
            NCCL_IN_PROGRESS => Ok(false),
            error => Err(self.fail(&mut state, op, error)),
        }
    }

    /// Polls until the communicator is idle and `done()` holds, failing on an
    /// NCCL error or an abort.
    fn wait(
        &self,
        op: &'static str,
        abort: &AbortHandle,
        mut done: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let mut pause = Duration::from_micros(2);
        loop {
            let idle = self.idle(op, abort)?;
            if idle && done()? {
                // An abort stops NCCL's kernels early, which also "completes" the
                // stream: check again so that it is not taken for success.
                return if abort.is_aborted() {
                    Err(CollectiveError::Aborted)
                } else {
                    Ok(())
                };
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL_PAUSE);
        }
    }

    /// Finalizes then destroys the communicator, or aborts it when finalizing
    /// fails or does not finish within `timeout`.
    fn shut_down(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        {
            let mut state = self.lock();
            if state.comm.is_null() {
                return;
            }
            // SAFETY: a live communicator (lock held).
            let code = unsafe { (self.api.comm_finalize)(state.comm) };
            if code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS {
                tracing::warn!(error = %self.api.describe(state.comm, code), "ncclCommFinalize failed; aborting the communicator");
                Self::abort_locked(self.api, &mut state);
                return;
            }
        }
        let mut pause = Duration::from_micros(2);
        loop {
            let mut state = self.lock();
            if state.comm.is_null() {
                return;
            }
            match self.api.async_state(state.comm) {
                NCCL_SUCCESS => {
                    // SAFETY: finalized, not used again.
                    let code = unsafe { (self.api.comm_destroy)(state.comm) };
                    state.comm = std::ptr::null_mut();
                    if code != NCCL_SUCCESS {
                        tracing::warn!(error = %self.api.error_string(code), "ncclCommDestroy failed");
                    }
                    return;
                }
                NCCL_IN_PROGRESS if Instant::now() < deadline => {}
                NCCL_IN_PROGRESS => {
                    tracing::warn!(
                        timeout_secs = timeout.as_secs_f64(),
                        "ncclCommFinalize did not finish; aborting the communicator"
                    );
                    Self::abort_locked(self.api, &mut state);
                    return;
                }
                error => {
                    tracing::warn!(error = %self.api.describe(state.comm, error), "ncclCommFinalize failed; aborting the communicator");
                    Self::abort_locked(self.api, &mut state);
                    return;
                }
            }
            drop(state);
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL_PAUSE);
        }
    }
}

/// NCCL collectives over one communicator, for CUDA tensors on one device.
pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    /// CUDA device index the communicator is bound to.
    device: i64,
    communicator: Arc<Communicator>,
    abort: AbortHandle,
    /// One float on the device, all-reduced by [`Collective::barrier`].
    barrier_buffer: Tensor,
}

impl NcclCollective {
    /// A fresh `ncclUniqueId` (its 128 bytes), made by rank 0 and shipped to every
    /// other rank before [`NcclCollective::new`]. Needs NCCL but no GPU.
    pub fn unique_id() -> Result<[u8; 128]> {
        let api = api()?;
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: a valid out-pointer.
        let code = unsafe { (api.get_unique_id)(&mut id) };
        if code != NCCL_SUCCESS {
            return Err(CollectiveError::Nccl(format!(
                "ncclGetUniqueId: {}",
                api.describe(std::ptr::null_mut(), code)
            )));
        }
        Ok(id.internal.map(|byte| byte as u8))
    }

    /// Joins the communicator `id` as `rank` of `world_size`, on CUDA device
    /// `device`. Returns once every rank has joined.
    pub fn new(rank: usize, world_size: usize, id: [u8; 128], device: i64) -> Result<Self> {
        Self::with_abort_handle(rank, world_size, id, device, AbortHandle::default())
    }

    /// [`NcclCollective::new`] with a given abort handle, so that the wait for the
    /// other ranks to join can itself be aborted; the handle then also aborts
    /// every later operation (it is what [`Collective::abort_handle`] returns).
    pub fn with_abort_handle(
        rank: usize,
        world_size: usize,
        id: [u8; 128],
        device: i64,
        abort: AbortHandle,
    ) -> Result<Self> {
        let world = c_int::try_from(world_size).ok().filter(|w| *w > 0);
        let (Some(world), true) = (world, rank < world_size) else {
            return Err(CollectiveError::Unsupported(format!(
                "NCCL rank {rank} of world size {world_size}"
            )));
        };
        let api = api()?;
        let count = device::cuda_device_count();
        let index = usize::try_from(device)
            .ok()
            .filter(|d| *d < count)
            .ok_or_else(|| {
                CollectiveError::Unsupported(format!(
                    "NCCL on cuda:{device}, but {count} CUDA devices are visible"
                ))
            })?;
        if abort.is_aborted() {
            return Err(CollectiveError::Aborted);
        }

        let mut config = nonblocking_config();
        let mut comm: ncclComm_t = std::ptr::null_mut();
        let code = {
            // NCCL binds the communicator to the current device.
            let _current = device::CudaDeviceGuard::new(device).map_err(CollectiveError::Nccl)?;
            // SAFETY: valid out-pointers; `config` is fully initialised as
            // NCCL_CONFIG_INITIALIZER would; rank < world (checked above).
            unsafe {
                (api.comm_init_rank_config)(
                    &mut comm,
                    world,
                    ncclUniqueId {
                        internal: id.map(|b| b as c_char),
                    },
                    rank as c_int,
                    &mut config,
                )
            }
        };
        let communicator = Arc::new(Communicator {
            api,
            state: Mutex::new(CommunicatorState {
                comm,
                failure: None,
            }),
        });
        if code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS {
            let mut state = communicator.lock();
            return Err(communicator.fail(&mut state, "ncclCommInitRankConfig", code));
        }
        if comm.is_null() {
            return Err(CollectiveError::Nccl(
                "ncclCommInitRankConfig returned no communicator".into(),
            ));
        }
        let on_abort = Arc::clone(&communicator);
        abort.on_abort(move || on_abort.abort());
        // An abort between the check above and `on_abort` would not have run
        // the action; `wait` sees the flag and this aborts the communicator.
        if let Err(e) = communicator.wait("ncclCommInitRankConfig", &abort, || Ok(true)) {
            communicator.abort();
            return Err(e);
        }
        let barrier_buffer = match Tensor::f_zeros([1], (Kind::Float, Device::Cuda(index))) {
            Ok(buffer) => buffer,
            Err(e) => {
                communicator.abort();
                return Err(CollectiveError::Nccl(format!(
                    "allocate the barrier buffer on cuda:{device}: {e}"
                )));
            }
        };
        tracing::debug!(rank, world_size, device, nccl = %api.version_string(), "NCCL communicator ready");
        Ok(Self {
            rank,
            world_size,
            device,
            communicator,
            abort,
            barrier_buffer,
        })
    }

    /// Checks that `t` can be handed to NCCL: defined, on this communicator's
    /// device, contiguous.
    fn check_tensor(&self, op: &'static str, t: &Tensor) -> Result<()> {
        if !t.defined() {
            return Err(CollectiveError::Unsupported(format!(
                "{op}: undefined tensor"
            )));
        }
        match t.device() {
            Device::Cuda(index) if index as i64 == self.device => {}
            Device::Cuda(index) => {
                return Err(CollectiveError::Unsupported(format!(
                    "{op}: tensor on cuda:{index}, communicator on cuda:{}",
                    self.device
                )));
            }
            other => {
                return Err(CollectiveError::Unsupported(format!(
                    "{op}: NCCL needs a CUDA tensor, got one on {other:?}"
                )));
            }
        }
        if !t.is_contiguous() {
            return Err(CollectiveError::Unsupported(format!(
                "{op}: tensor is not contiguous"
            )));
        }
        Ok(())
    }

    /// Queues one NCCL operation on libtorch's current stream of the device and
    /// waits until NCCL has accepted it; returns the stream.
    fn launch(
        &self,
        op: &'static str,
        call: impl FnOnce(&NcclApi, ncclComm_t, cudaStream_t) -> c_int,
    ) -> Result<cudaStream_t> {
        if self.abort.is_aborted() {
            return Err(CollectiveError::Aborted);
        }
        let _current = device::CudaDeviceGuard::new(self.device).map_err(CollectiveError::Nccl)?;
        let stream = device::current_cuda_stream(self.device).map_err(CollectiveError::Nccl)?
            as cudaStream_t;
        {
            let mut state = self.communicator.lock();
            let comm = Communicator::live(&state)?;
            let code = call(self.communicator.api, comm, stream);
            if code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS {
                return Err(self.communicator.fail(&mut state, op, code));
            }
        }
        self.communicator.wait(op, &self.abort, || Ok(true))?;
        Ok(stream)
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`.
fn nonblocking_config() -> ncclConfig_t {
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: NCCL_CONFIG_MAGIC,
        version: NCCL_CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: NCCL_CONFIG_UNDEF_INT,
        minCTAs: NCCL_CONFIG_UNDEF_INT,
        maxCTAs: NCCL_CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: NCCL_CONFIG_UNDEF_INT,
        trafficClass: NCCL_CONFIG_UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: NCCL_CONFIG_UNDEF_INT,
        CTAPolicy: NCCL_CONFIG_UNDEF_INT,
        shrinkShare: NCCL_CONFIG_UNDEF_INT,
        nvlsCTAs: NCCL_CONFIG_UNDEF_INT,
        nChannelsPerNetPeer: NCCL_CONFIG_UNDEF_INT,
        nvlinkCentricSched: NCCL_CONFIG_UNDEF_INT,
    }
}

/// The NCCL type that sums `kind`, if NCCL can.
fn reduction_type(kind: Kind) -> Option<ncclDataType_t> {
    match kind {
        Kind::Float => Some(ncclDataType_t::ncclFloat32),
        Kind::Double => Some(ncclDataType_t::ncclFloat64),
        Kind::Half => Some(ncclDataType_t::ncclFloat16),
        Kind::BFloat16 => Some(ncclDataType_t::ncclBfloat16),
        _ => None,
    }
}

fn kind_of(op: &'static str, t: &Tensor) -> Result<Kind> {
    t.f_kind()
        .map_err(|e| CollectiveError::Unsupported(format!("{op}: {e}")))
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        const OP: &str = "all_reduce";
        self.check_tensor(OP, t)?;
        let kind = kind_of(OP, t)?;
        let dtype = reduction_type(kind).ok_or_else(|| {
            CollectiveError::Unsupported(format!(
                "{OP}: NCCL sums float32, float64, float16 and bfloat16, not {kind:?}"
            ))
        })?;
        let count = t.numel();
        if count == 0 {
            return Ok(());
        }
        let data = t.data_ptr();
        self.launch(OP, |api, comm, stream| {
            // SAFETY: `data` is `count` contiguous elements of `dtype` on this
            // communicator's device, alive until the stream has used them
            // (libtorch's caching allocator is stream-ordered).
            unsafe {
                (api.all_reduce)(data, data, count, dtype, ncclRedOp_t::ncclSum, comm, stream)
            }
        })?;
        Ok(())
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        self.check_tensor(OP, t)?;
        let root = c_int::try_from(root)
            .ok()
            .filter(|r| (*r as usize) < self.world_size)
            .ok_or_else(|| {
                CollectiveError::Unsupported(format!(
                    "{OP}: root {root} outside world size {}",
                    self.world_size
                ))
            })?;
        let bytes = t.numel() * kind_of(OP, t)?.elt_size_in_bytes();
        if bytes == 0 {
            return Ok(());
        }
        let data = t.data_ptr();
        self.launch(OP, |api, comm, stream| {
            // SAFETY: `data` is `bytes` contiguous bytes on this device (as above).
            unsafe {
                (api.broadcast)(
                    data,
                    data,
                    bytes,
                    ncclDataType_t::ncclUint8,
                    root,
                    comm,
                    stream,
                )
            }
        })?;
        Ok(())
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        const OP: &str = "all_gather";
        self.check_tensor(OP, input)?;
        self.check_tensor(OP, output)?;
        let (kind, output_kind) = (kind_of(OP, input)?, kind_of(OP, output)?);
        if kind != output_kind {
            return Err(CollectiveError::Unsupported(format!(
                "{OP}: input is {kind:?}, output is {output_kind:?}"
            )));
        }
        if output.numel() != input.numel() * self.world_size {
            return Err(CollectiveError::Unsupported(format!(
                "{OP}: output has {} elements, expected world size {} x {}",
                output.numel(),
                self.world_size,
                input.numel()
            )));
        }
        let bytes = input.numel() * kind.elt_size_in_bytes();
        if bytes == 0 {
            return Ok(());
        }
        let (send, receive) = (input.data_ptr(), output.data_ptr());
        // NCCL allows the input to be this rank's slot of the output, and no
        // other overlap.
        let (send_at, receive_at) = (send as usize, receive as usize);
        let overlaps =
            send_at < receive_at + bytes * self.world_size && receive_at < send_at + bytes;
        if overlaps && send_at != receive_at + bytes * self.rank {
            return Err(CollectiveError::Unsupported(format!(
                "{OP}: input overlaps the output outside rank {}'s slot",
                self.rank
            )));
        }
        self.launch(OP, |api, comm, stream| {
            // SAFETY: `send` is `bytes` bytes and `receive` `world_size * bytes`
            // bytes, contiguous, on this device, overlapping only as NCCL allows.
            unsafe {
                (api.all_gather)(
                    send,
                    receive,
                    bytes,
                    ncclDataType_t::ncclUint8,
                    comm,
                    stream,
                )
            }
        })?;
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        const OP: &str = "barrier";
        let data = self.barrier_buffer.data_ptr();
        let stream = self.launch(OP, |api, comm, stream| {
            // SAFETY: one float32 on this device, owned by `self`.
            unsafe {
                (api.all_reduce)(
                    data,
                    data,
                    1,
                    ncclDataType_t::ncclFloat32,
                    ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            }
        })?;
        // The all-reduce completes only once every rank has joined it; wait for
        // it on the GPU, polling so that an abort or an NCCL error ends the wait.
        self.communicator.wait(OP, &self.abort, || {
            // SAFETY: libtorch's current stream of our device: libtorch keeps
            // its streams alive for the life of the process.
            unsafe { device::cuda_stream_done(stream.cast()) }
                .map_err(|e| CollectiveError::Nccl(format!("{OP}: {e}")))
        })
    }

    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // A no-op after an abort (the communicator is already gone).
        self.communicator.shut_down(FINALIZE_TIMEOUT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_only_floating_point_types() {
        assert_eq!(
            reduction_type(Kind::Float),
            Some(ncclDataType_t::ncclFloat32)
        );
        assert_eq!(
            reduction_type(Kind::Double),
            Some(ncclDataType_t::ncclFloat64)
        );
        assert_eq!(
            reduction_type(Kind::Half),
            Some(ncclDataType_t::ncclFloat16)
        );
        assert_eq!(
            reduction_type(Kind::BFloat16),
            Some(ncclDataType_t::ncclBfloat16)
        );
        assert_eq!(reduction_type(Kind::Int64), None);
    }

    #[test]
    fn config_is_nccl_config_initializer_but_nonblocking() {
        let config = nonblocking_config();
        assert_eq!(config.size, std::mem::size_of::<ncclConfig_t>());
        assert_eq!(
            (config.magic, config.version, config.blocking),
            (0xcafebeef, 22800, 0)
        );
        assert_eq!(config.minCTAs, c_int::MIN);
    }
}
