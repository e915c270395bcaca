//! Crash points for system tests, compiled only with the `failpoints` feature.
//!
//! `KILN_CKPT_FAILPOINT` names where the process aborts (SIGABRT, no cleanup,
//! no destructors, like a kill):
//!
//! - `chunk-upload:N`: right after this process's N-th chunk upload completed;
//! - `after-chunks`: after this rank's chunks and part are durable, before
//!   the commit (on the committer: before the manifest is written);
//! - `after-manifest`: after the manifest is written, before `latest` moves;
//! - `during-latest`: inside the `latest` update (local filesystem: the new
//!   record is written and synced to a temporary file, under the lock, and not
//!   yet renamed; other stores: just before the conditional put).
//!
//! One point fails instead of aborting, for tests of a save that fails while
//! the process lives on:
//!
//! - `part-error:R`: writing rank R's part fails with an error, as on a full
//!   disk (its chunks are written; every save of that rank fails).
//!
//! Without the feature every function here is an empty inline function.

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn configured() -> Option<&'static str> {
        static POINT: OnceLock<Option<String>> = OnceLock::new();
        POINT
            .get_or_init(|| std::env::var("KILN_CKPT_FAILPOINT").ok())
            .as_deref()
    }

    fn crash(point: &str) -> ! {
        eprintln!("kiln-checkpoint: failpoint {point} reached, aborting");
        std::process::abort();
    }

    pub fn hit(point: &str) {
        if configured() == Some(point) {
            crash(point);
        }
    }

    pub fn part_write_fails(rank: usize) -> bool {
        configured()
            .and_then(|p| p.strip_prefix("part-error:"))
            .is_some_and(|r| r.parse::<usize>().ok() == Some(rank))
    }

    pub fn chunk_uploaded() {
        static UPLOADED: AtomicU64 = AtomicU64::new(0);
        let n = UPLOADED.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(limit) = configured().and_then(|p| p.strip_prefix("chunk-upload:"))
            && limit.parse::<u64>().ok() == Some(n)
        {
            crash(&format!("chunk-upload:{n}"));
        }
    }
}

#[cfg(not(feature = "failpoints"))]
mod imp {
    #[inline(always)]
    pub fn hit(_point: &str) {}
    #[inline(always)]
    pub fn chunk_uploaded() {}
    #[inline(always)]
    pub fn part_write_fails(_rank: usize) -> bool {
        false
    }
}

pub(crate) use imp::{chunk_uploaded, hit, part_write_fails};
