//! Pinning a CPU worker to cores of its own (`[workers] cpu_affinity`).
//!
//! Ranks of a data-parallel job wait for each other at every all-reduce, so
//! a step lasts as long as the slowest rank's. Left to the scheduler, two
//! ranks now and then share a core or move between cores (a wake-up lands
//! on the busy one), and the other rank waits: on 2 cores, pinning the two
//! ranks of `bench/mlp.toml` cut the all-reduce wait from 3-4 ms to 1-2 ms a
//! step (bench/README.md §2). Slurm's `--cpu-bind` and MPI's process pinning
//! do the same.

use std::io;

/// The cores local rank `local_rank` of `workers` workers, `threads` each,
/// runs on when pinned: the `local_rank`-th run of `threads` of `allowed`
/// (the cores the worker may use, ascending). Only when the workers fill
/// `allowed` exactly, else `None`: with more threads than cores pinning
/// would stack ranks on the same cores, and with fewer the job leaves room
/// for something else (another job started the same way would be pinned
/// to the same first cores); the scheduler does better in both cases.
pub fn cores_for(
    local_rank: usize,
    workers: usize,
    threads: usize,
    allowed: &[usize],
) -> Option<Vec<usize>> {
    let needed = workers.checked_mul(threads)?;
    if threads == 0 || local_rank >= workers || needed != allowed.len() {
        return None;
    }
    Some(allowed[local_rank * threads..(local_rank + 1) * threads].to_vec())
}

/// The cores this process may run on, ascending.
pub fn allowed_cores() -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // writes at most size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pid 0 is this thread.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Restricts every thread of this process, and the threads they start
/// later, to `cores`.
pub fn pin_process(cores: &[usize]) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cores {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("core {cpu} is past CPU_SETSIZE"),
            ));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // Threads started earlier (log forwarding, the agent channel) keep their
    // own masks: set each thread's, then new threads inherit their creator's.
    for entry in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = entry?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: `set` is a valid cpu_set_t of the size passed.
        let rc = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // A thread that ended since the directory was read.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_gets_its_own_run_of_cores_when_the_workers_fill_them() {
        let allowed = [0, 1, 2, 3, 6, 7];
        assert_eq!(cores_for(0, 6, 1, &allowed), Some(vec![0]));
        assert_eq!(cores_for(5, 6, 1, &allowed), Some(vec![7]));
        assert_eq!(cores_for(1, 3, 2, &allowed), Some(vec![2, 3]));
        assert_eq!(cores_for(2, 3, 2, &allowed), Some(vec![6, 7]));
        assert_eq!(cores_for(0, 1, 6, &allowed), Some(allowed.to_vec()));
        // More threads than cores, or fewer: not pinned.
        assert_eq!(cores_for(0, 4, 2, &allowed), None);
        assert_eq!(cores_for(0, 2, 1, &allowed), None);
        assert_eq!(cores_for(0, 1, 0, &allowed), None);
        assert_eq!(cores_for(2, 2, 1, &allowed), None);
        assert_eq!(cores_for(0, usize::MAX, 2, &allowed), None);
    }

    #[test]
    fn a_pinned_process_runs_every_thread_on_its_cores_only() {
        // In a child process: pinning this test binary would bind every
        // other test to one core.
        if std::env::var_os("KILN_AFFINITY_CHILD").is_some() {
            let allowed = allowed_cores().unwrap();
            let last = *allowed.last().unwrap();
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let earlier = std::thread::spawn(move || rx.recv());
            pin_process(&[last]).unwrap();
            let later = std::thread::spawn(|| allowed_cores().unwrap())
                .join()
                .unwrap();
            assert_eq!(later, vec![last], "a thread started after pinning");
            // Every thread, the one started before pinning included.
            let want = format!("Cpus_allowed_list:\t{last}\n");
            let mut threads = 0;
            for task in std::fs::read_dir("/proc/self/task").unwrap() {
                let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
                assert!(status.contains(&want), "{want:?} not in\n{status}");
                threads += 1;
            }
            assert!(threads >= 3, "{threads} threads");
            tx.send(()).unwrap();
            earlier.join().unwrap().unwrap();
            println!("pinned {threads} threads to core {last}");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "affinity::tests::a_pinned_process_runs_every_thread_on_its_cores_only",
                "--nocapture",
            ])
            .env("KILN_AFFINITY_CHILD", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("pinned "),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
