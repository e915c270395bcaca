//! The first save of a run blocks training no longer than later ones when the
//! pipeline was prepared (`Checkpointer::prepare`, which the trainer calls
//! through `CheckpointManager::reserve` once its state is built).
//!
//! Counting the process's minor page faults during `save` is a measure that
//! does not depend on the machine's speed: an unprepared first save faults in
//! a fresh stripe buffer page by page while it copies (the cost the issue
//! measured through `kiln run`: 368 ms against 89 ms), a prepared one finds
//! its pages resident. The count is the calling thread's (the copy runs there
//! with one save thread), so the background pipeline's allocations do not
//! land in it.
#![cfg(target_os = "linux")]

use kiln_checkpoint::{
    CheckpointMeta, CheckpointRoot, Checkpointer, DType, OwnedTensor, SaveConfig,
};

const PAGE: u64 = 4096;

/// Minor page faults of the calling thread so far.
fn minor_faults() -> u64 {
    // SAFETY: getrusage fills the struct we pass.
    // SAFETY: rusage is plain integers and timevals, for which all zeroes is
    // a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        // SAFETY: `usage` is a valid, writable rusage for the call to fill.
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) },
        0
    );
    usage.ru_minflt as u64
}

/// 64 MiB of f32 in four tensors, distinct per `seed`.
fn state(seed: u32) -> Vec<OwnedTensor> {
    (0..4u32)
        .map(|t| {
            let values = 4 << 20;
            let data: Vec<u8> = (0..values)
                .flat_map(|i: u32| {
                    (((i ^ seed).wrapping_mul(2654435761) >> 8) as f32 * 1e-7 + t as f32)
                        .to_le_bytes()
                })
                .collect();
            OwnedTensor {
                name: format!("model/layer{t}.weight"),
                dtype: DType::F32,
                shape: vec![values as usize],
                data,
            }
        })
        .collect()
}

/// Faults taken while `save` blocked, and the time it blocked.
fn faults_of_save(
    c: &mut Checkpointer,
    step: u64,
    state: &[OwnedTensor],
) -> (u64, std::time::Duration) {
    let views: Vec<_> = state.iter().map(|t| t.view()).collect();
    let before = minor_faults();
    let started = std::time::Instant::now();
    c.save(step, "run", &views, &CheckpointMeta::default())
        .expect("save starts");
    let blocked = started.elapsed();
    let faults = minor_faults() - before;
    for outcome in c.flush() {
        outcome.expect("save lands");
    }
    (faults, blocked)
}

#[test]
fn a_prepared_first_save_does_not_fault_in_its_stripe_buffer() {
    // Count faults in 4 KiB pages whatever the machine's transparent huge
    // page setting (with `always`, a fresh buffer faults in 2 MiB at a time).
    // SAFETY: PR_SET_THP_DISABLE takes a flag and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let state = state(1);
    let stripe_pages = state.iter().map(|t| t.data.len() as u64).sum::<u64>() / PAGE;
    // One thread: the stripe is copied on the calling thread, whose faults
    // are counted (the background pipeline's threads are not).
    let cfg = SaveConfig {
        threads: 1,
        ..SaveConfig::default()
    };

    // Control: without prepare, the first save faults the buffer in as it
    // copies, so the measure does see the cost it is meant to see.
    let root = CheckpointRoot::open("memory://first-save/unprepared").unwrap();
    let mut unprepared = Checkpointer::new(root, cfg.clone(), 0, 1).unwrap();
    let (faults, _) = faults_of_save(&mut unprepared, 1, &state);
    assert!(
        faults >= stripe_pages / 2,
        "an unprepared first save took only {faults} minor faults for {stripe_pages} pages"
    );
    drop(unprepared);

    let root = CheckpointRoot::open("memory://first-save/prepared").unwrap();
    let mut c = Checkpointer::new(root.clone(), cfg, 0, 1).unwrap();
    let views: Vec<_> = state.iter().map(|t| t.view()).collect();
    c.prepare(&views).unwrap();
    // Preparing also probes the destination's write speed in the background
    // (for the codec policy); its buffers are not the save's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while c.codec_estimates().write.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no write probe result"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        c.memory_stats().stripe_buffer_bytes,
        stripe_pages * PAGE,
        "prepare sizes the buffer for the stripe"
    );
    let (first, first_blocked) = faults_of_save(&mut c, 1, &state);
    let later_state = crate::state(2);
    let (later, later_blocked) = faults_of_save(&mut c, 2, &later_state);
    eprintln!(
        "prepared: first save {first} faults, {first_blocked:?}; second {later} faults, {later_blocked:?} ({stripe_pages} pages)"
    );
    assert!(
        first < stripe_pages / 8,
        "a prepared first save took {first} minor faults for {stripe_pages} pages"
    );
    assert!(
        later < stripe_pages / 8,
        "a later save took {later} minor faults for {stripe_pages} pages"
    );

    // What was saved is what was passed, both times.
    for (step, expected) in [(1, &state), (2, &later_state)] {
        let m = kiln_checkpoint::resolve(&root, &step.to_string()).unwrap();
        let loaded = kiln_checkpoint::load(&root, &m, |_| true).unwrap();
        assert_eq!(loaded.len(), expected.len());
        for (got, want) in loaded.iter().zip(expected.iter()) {
            assert_eq!(got.name, want.name);
            assert!(got.data == want.data, "step {step}: {} differs", got.name);
        }
    }
}
