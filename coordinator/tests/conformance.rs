//! The memory store against the shared `Store` conformance suite.

use kiln_coordinator::conformance;
use kiln_coordinator::store::mem::MemStore;

/// Real time on a multi-threaded runtime, as a remote backend would run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mem_store_passes_the_conformance_suite() {
    conformance::run_all(MemStore::new()).await;
}

/// Paused tokio time: lease expiry follows tokio's clock, so tests of code
/// built on `MemStore` can skip their waits.
#[tokio::test(start_paused = true)]
async fn mem_store_passes_the_conformance_suite_in_paused_time() {
    conformance::run_all(MemStore::new()).await;
}
