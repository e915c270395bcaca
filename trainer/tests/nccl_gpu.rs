//! NCCL on a real GPU, at world size 1 (NCCL refuses two ranks on one device;
//! multi-rank correctness of the `Collective` trait is tested on the TCP ring).
//!
//! The GPU tests are `#[ignore]`d, so a machine without a GPU reports them as
//! ignored rather than passed; scripts/gpu-check.sh runs them on a GPU machine
//! with `--include-ignored` (and `KILN_GPU_TESTS=1`). The availability checks
//! run everywhere: on a machine without a GPU, NCCL or even libtorch's CUDA
//! libraries they must answer, not panic.

use std::sync::{Mutex, MutexGuard, PoisonError, mpsc};
use std::time::{Duration, Instant};

use kiln_trainer::collective::nccl::{self, NcclCollective};
use kiln_trainer::collective::{AbortHandle, Collective, CollectiveError};
use kiln_trainer::device;
use tch::{Device, Kind, Tensor};

/// The GPU tests take turns: the bandwidth figure should not share the device.
fn one_gpu_test_at_a_time() -> MutexGuard<'static, ()> {
    static GPU: Mutex<()> = Mutex::new(());
    GPU.lock().unwrap_or_else(PoisonError::into_inner)
}

#[test]
fn availability_checks_answer_without_panicking() {
    let available = nccl::nccl_available();
    let count = device::cuda_device_count();
    println!(
        "torch lib: {:?}; CUDA backend loaded: {}; CUDA devices: {count}; pip NCCL: {:?}; NCCL available: {available} {:?}",
        device::torch_lib_dir(),
        device::ensure_cuda_backend(),
        device::nccl_library_path(),
        nccl::nccl_version().ok(),
    );
    // Asking twice gives the same answers (both are cached once loaded).
    assert_eq!(nccl::nccl_available(), available);
    assert_eq!(device::cuda_device_count(), count);

    if available {
        // ncclGetUniqueId needs no GPU: rank 0 makes it before any device work.
        let first = NcclCollective::unique_id().expect("ncclGetUniqueId with NCCL loaded");
        let second = NcclCollective::unique_id().expect("ncclGetUniqueId a second time");
        assert!(
            first.iter().any(|b| *b != 0),
            "a unique id is not all zeros"
        );
        assert_ne!(first, second, "two unique ids differ");
    } else {
        assert!(matches!(
            NcclCollective::unique_id(),
            Err(CollectiveError::Nccl(_))
        ));
    }

    if count == 0 {
        assert!(
            device::current_cuda_stream(0).is_err(),
            "no stream without a device"
        );
        match NcclCollective::new(0, 1, [0; 128], 0) {
            Err(CollectiveError::Unsupported(_) | CollectiveError::Nccl(_)) => {}
            Err(other) => panic!("unexpected error without a GPU: {other}"),
            Ok(_) => panic!("an NCCL communicator without a GPU"),
        }
    }
    // Rank and world size are checked before anything is loaded or created.
    assert!(matches!(
        NcclCollective::new(1, 1, [0; 128], 0),
        Err(CollectiveError::Unsupported(_))
    ));
    assert!(matches!(
        NcclCollective::new(0, 0, [0; 128], 0),
        Err(CollectiveError::Unsupported(_))
    ));
}

/// A world-size-1 communicator on cuda:0.
fn communicator() -> NcclCollective {
    assert!(
        device::cuda_device_count() > 0,
        "a GPU test ran, but libtorch sees no CUDA device"
    );
    let (path, version) = nccl::nccl_version().expect("a GPU test ran, but no NCCL library loads");
    println!("NCCL {version} from {path}");
    let id = NcclCollective::unique_id().expect("ncclGetUniqueId");
    NcclCollective::new(0, 1, id, 0).expect("create a world-size-1 NCCL communicator on cuda:0")
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn gpu_world_size_one() {
    let _turn = one_gpu_test_at_a_time();
    let cuda = Device::Cuda(0);
    let mut comm = communicator();
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));

    // all-reduce: the sum over one rank is the tensor itself, in every float type.
    let mut t = Tensor::randn([1 << 20], (Kind::Float, cuda));
    let expected = t.copy();
    comm.all_reduce_sum(&mut t).expect("all-reduce float32");
    assert!(
        t.equal(&expected),
        "all-reduce over one rank changed the tensor"
    );
    for kind in [Kind::Double, Kind::Half, Kind::BFloat16] {
        let mut t = Tensor::randn([4097], (kind, cuda));
        let expected = t.copy();
        comm.all_reduce_sum(&mut t)
            .unwrap_or_else(|e| panic!("all-reduce {kind:?}: {e}"));
        assert!(t.equal(&expected), "all-reduce {kind:?} changed the tensor");
    }
    // Out-of-place input to in-place output: a slice view (contiguous, offset).
    let whole = Tensor::arange(1000, (Kind::Float, cuda));
    let mut tail = whole.narrow(0, 500, 500);
    comm.all_reduce_sum(&mut tail)
        .expect("all-reduce of a contiguous view");
    assert!(whole.equal(&Tensor::arange(1000, (Kind::Float, cuda))));

    // What NCCL cannot do is refused, not attempted.
    let mut ints = Tensor::arange(10, (Kind::Int64, cuda));
    assert!(matches!(
        comm.all_reduce_sum(&mut ints),
        Err(CollectiveError::Unsupported(_))
    ));
    let mut on_cpu = Tensor::ones([10], (Kind::Float, Device::Cpu));
    assert!(matches!(
        comm.all_reduce_sum(&mut on_cpu),
        Err(CollectiveError::Unsupported(_))
    ));
    let mut strided = Tensor::ones([10, 10], (Kind::Float, cuda)).transpose(0, 1);
    assert!(matches!(
        comm.all_reduce_sum(&mut strided),
        Err(CollectiveError::Unsupported(_))
    ));

    // broadcast of any dtype (bytes) from the only rank.
    let mut bytes = Tensor::arange(255, (Kind::Uint8, cuda));
    comm.broadcast(&mut bytes, 0).expect("broadcast uint8");
    assert!(bytes.equal(&Tensor::arange(255, (Kind::Uint8, cuda))));
    let mut longs = Tensor::arange(12345, (Kind::Int64, cuda));
    comm.broadcast(&mut longs, 0).expect("broadcast int64");
    assert!(longs.equal(&Tensor::arange(12345, (Kind::Int64, cuda))));
    assert!(matches!(
        comm.broadcast(&mut longs, 1),
        Err(CollectiveError::Unsupported(_))
    ));

    // all-gather: world size 1 x the input.
    let input = Tensor::randn([3000], (Kind::Float, cuda));
    let mut output = Tensor::zeros([3000], (Kind::Float, cuda));
    comm.all_gather(&input, &mut output).expect("all-gather");
    assert!(output.equal(&input));
    let mut wrong_size = Tensor::zeros([2999], (Kind::Float, cuda));
    assert!(matches!(
        comm.all_gather(&input, &mut wrong_size),
        Err(CollectiveError::Unsupported(_))
    ));

    comm.barrier().expect("barrier");

    // Bandwidth of a 64 MiB float32 all-reduce (at world size 1 NCCL has no peer:
    // this measures its local path, a sanity figure, not a network one).
    let bytes_per_op = 64 << 20;
    let mut big = Tensor::ones([bytes_per_op / 4], (Kind::Float, cuda));
    for _ in 0..3 {
        comm.all_reduce_sum(&mut big).expect("warm-up all-reduce");
    }
    tch::Cuda::synchronize(0);
    let iterations = 20;
    let start = Instant::now();
    for _ in 0..iterations {
        comm.all_reduce_sum(&mut big).expect("timed all-reduce");
    }
    comm.barrier().expect("barrier after the timed all-reduces");
    tch::Cuda::synchronize(0);
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "all-reduce 64 MiB float32, world size 1: {:.3} ms per op, {:.1} GB/s",
        seconds * 1e3 / iterations as f64,
        (bytes_per_op * iterations) as f64 / seconds / 1e9
    );
    assert!(big.equal(&Tensor::ones([bytes_per_op / 4], (Kind::Float, cuda))));

    // Abort: every later operation fails, and dropping does not hang.
    let abort = comm.abort_handle();
    abort.abort();
    assert!(abort.is_aborted());
    let mut t = Tensor::ones([16], (Kind::Float, cuda));
    assert!(matches!(
        comm.all_reduce_sum(&mut t),
        Err(CollectiveError::Aborted)
    ));
    assert!(matches!(comm.barrier(), Err(CollectiveError::Aborted)));
    drop(comm);

    // A new communicator works after an aborted one.
    let mut again = communicator();
    let mut t = Tensor::ones([16], (Kind::Float, cuda));
    again
        .all_reduce_sum(&mut t)
        .expect("all-reduce on a fresh communicator");
    again.barrier().expect("barrier on a fresh communicator");
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it with --include-ignored"]
fn gpu_abort_breaks_a_wait_for_missing_ranks() {
    let _turn = one_gpu_test_at_a_time();
    assert!(
        device::cuda_device_count() > 0,
        "a GPU test ran, but libtorch sees no CUDA device"
    );
    // Rank 0 of 2 with no rank 1: initialisation waits for it until aborted.
    let id = NcclCollective::unique_id().expect("ncclGetUniqueId");
    let abort = AbortHandle::default();
    let (done, outcome) = mpsc::channel();
    let handle = abort.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        let result = NcclCollective::with_abort_handle(0, 2, id, 0, handle).map(|_| ());
        let _ = done.send((result, started.elapsed()));
    });
    std::thread::sleep(Duration::from_millis(500));
    // From yet another thread, as the agent relay does; and so that a hanging
    // ncclCommAbort fails this test instead of blocking it.
    std::thread::spawn(move || abort.abort());
    let (result, waited) = outcome
        .recv_timeout(Duration::from_secs(60))
        .expect("an aborted initialisation returns within 60 s");
    println!("initialisation aborted after {waited:?}: {result:?}");
    assert!(
        matches!(result, Err(CollectiveError::Aborted)),
        "{result:?}"
    );
}
