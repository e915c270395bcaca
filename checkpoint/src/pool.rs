//! The save pipeline's CPU threads: [`CpuPool`].
//!
//! Hashing and compression run on the checkpointer's own threads, so they
//! never compete with the I/O runtime, and (with `low_priority`) only on
//! cores the caller leaves idle.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::sys;

pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// The checkpointer's own CPU threads (hashing, grouping, compression), so
/// compression never competes with the I/O runtime or the caller's threads
/// beyond `threads`.
///
/// With `low_priority`, its `threads` workers run at idle priority, and as
/// many helpers at normal priority take jobs only while the pool is boosted:
/// when the caller waits for the save. A thread cannot leave idle priority
/// again without privileges (`RLIMIT_NICE`), hence two sets of threads
/// rather than one whose priority changes.
pub(crate) struct CpuPool {
    shared: Arc<PoolShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct PoolShared {
    queue: Mutex<PoolQueue>,
    ready: std::sync::Condvar,
    /// Whether a helper ever ran a job (its scratch buffers then exist).
    helpers_ran: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct PoolQueue {
    jobs: std::collections::VecDeque<Job>,
    boosted: bool,
    closed: bool,
}

impl CpuPool {
    pub(crate) fn new(n: usize, rank: usize, low_priority: bool) -> Result<Self> {
        let shared = Arc::new(PoolShared {
            queue: Mutex::new(PoolQueue::default()),
            ready: std::sync::Condvar::new(),
            helpers_ran: Default::default(),
        });
        let helpers = if low_priority { n } else { 0 };
        let mut threads = Vec::with_capacity(n + helpers);
        for i in 0..n + helpers {
            let helper = i >= n;
            let shared = shared.clone();
            let name = if helper {
                format!("kiln-ckpt-help-{rank}-{}", i - n)
            } else {
                format!("kiln-ckpt-cpu-{rank}-{i}")
            };
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    if low_priority && !helper && !sys::lower_current_thread_priority() {
                        tracing::debug!("checkpoint threads keep normal priority");
                    }
                    shared.work(helper)
                })
                .map_err(|source| Error::Io {
                    op: "spawn",
                    path: "compression thread".into(),
                    source,
                })?;
            threads.push(t);
        }
        Ok(CpuPool { shared, threads })
    }

    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let mut q = self.shared.queue.lock().expect("cpu pool queue");
        // After shutdown the job is dropped; the dropped oneshot tells the
        // waiting task.
        if !q.closed {
            q.jobs.push_back(job);
        }
        drop(q);
        self.shared.ready.notify_all();
        rx
    }

    /// While boosted, the helpers (normal priority) take jobs too.
    pub(crate) fn boost(&self, on: bool) {
        let mut q = self.shared.queue.lock().expect("cpu pool queue");
        if q.boosted != on {
            q.boosted = on;
            drop(q);
            self.shared.ready.notify_all();
        }
    }

    pub(crate) fn helpers_ran(&self) -> bool {
        self.shared.helpers_ran.load(Ordering::Relaxed)
    }
}

impl PoolShared {
    fn work(&self, helper: bool) {
        let mut q = self.queue.lock().expect("cpu pool queue");
        loop {
            let may_take = !helper || q.boosted;
            if may_take && let Some(job) = q.jobs.pop_front() {
                drop(q);
                if helper {
                    self.helpers_ran.store(true, Ordering::Relaxed);
                }
                job();
                q = self.queue.lock().expect("cpu pool queue");
                continue;
            }
            if q.closed && (q.jobs.is_empty() || helper) {
                return;
            }
            q = self.ready.wait(q).expect("cpu pool queue");
        }
    }
}

impl Drop for CpuPool {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("cpu pool queue").closed = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_low_priority_pool_hands_work_to_its_helpers_only_while_boosted() {
        let pool = CpuPool::new(1, 0, true).unwrap();
        // The one idle-priority worker holds a job until told.
        let (release, held) = mpsc::channel::<()>();
        let first = pool.run(move || {
            let _ = held.recv();
            sys::current_thread_is_idle_priority()
        });
        let mut second = pool.run(sys::current_thread_is_idle_priority);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            second.try_recv().is_err(),
            "a helper took a job while the caller was not waiting"
        );
        pool.boost(true);
        assert!(
            !second.blocking_recv().unwrap(),
            "boosted, a normal-priority helper runs the queued job"
        );
        release.send(()).unwrap();
        assert!(
            first.blocking_recv().unwrap(),
            "the pool's own worker runs at idle priority"
        );
        // Without low priority there are no helpers and no idle threads.
        let normal = CpuPool::new(1, 0, false).unwrap();
        assert!(
            !normal
                .run(sys::current_thread_is_idle_priority)
                .blocking_recv()
                .unwrap()
        );
        assert_eq!(normal.threads.len(), 1);
    }
}
