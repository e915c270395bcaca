//! What the save pipeline asks of the operating system beyond I/O: the CPU
//! time a thread used, the machine's idle CPU time, and a thread's
//! scheduling priority. Linux answers; elsewhere the answers are `None` and
//! priorities are left alone.

/// CPU seconds the calling thread has used.
pub fn thread_cpu_seconds() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        (r == 0).then_some(t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Seconds all CPUs together have spent idle (or waiting for I/O) since
/// boot, from `/proc/stat`. Two readings `dt` seconds apart give the cores
/// left idle over that time: `(b - a) / dt`.
pub fn idle_cpu_seconds() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        parse_idle_ticks(&stat).map(|t| t as f64 / ticks.max(1) as f64)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Idle plus iowait ticks of the aggregate `cpu` line of `/proc/stat`
/// (`cpu user nice system idle iowait irq softirq steal ...`).
fn parse_idle_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some(fields.get(3)? + fields.get(4).copied().unwrap_or(0))
}

/// Moves the calling thread to the lowest CPU priority there is: Linux's
/// `SCHED_IDLE`, which runs only on cores no ordinary thread wants (or nice
/// 19 where that is refused). Irreversible without privileges, so only
/// threads that stay background threads call it. Says whether it worked.
pub fn lower_current_thread_priority() -> bool {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is valid for the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
            return true;
        }
        // SAFETY: gettid has no preconditions; PRIO_PROCESS with a thread id
        // sets that thread's nice value on Linux.
        unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Lowers the calling thread to nice 19 (the lowest ordinary priority):
/// it still gets a small share of a busy core, so a lock it holds (the
/// kernel's memory-map lock while it frees memory, say) is released within
/// a time slice, where a `SCHED_IDLE` thread may wait for a whole tick.
/// Says whether it worked.
pub fn nice_current_thread() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions; PRIO_PROCESS with a thread id
        // sets that thread's nice value on Linux.
        unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Whether the calling thread runs under `SCHED_IDLE` (tests).
pub fn current_thread_is_idle_priority() -> bool {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) == libc::SCHED_IDLE }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_ticks_are_idle_plus_iowait_of_the_aggregate_line() {
        let stat = "cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 50 2 25 500 10 0 1 1 0 0\nintr 1\n";
        assert_eq!(parse_idle_ticks(stat), Some(1020));
        assert_eq!(parse_idle_ticks("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_idle_ticks("cpu  1 2 x 4\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_machine_reports_idle_time_and_thread_cpu_time() {
        let a = idle_cpu_seconds().expect("/proc/stat");
        let t0 = thread_cpu_seconds().expect("thread clock");
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        let t1 = thread_cpu_seconds().unwrap();
        assert!(t1 > t0, "{t0} -> {t1}");
        assert!(idle_cpu_seconds().unwrap() >= a);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_lowered_thread_runs_at_idle_priority() {
        let lowered = std::thread::spawn(|| {
            assert!(!current_thread_is_idle_priority());
            lower_current_thread_priority();
            current_thread_is_idle_priority()
        })
        .join()
        .unwrap();
        assert!(lowered);
        assert!(!current_thread_is_idle_priority(), "only that thread moved");
    }
}
