//! What the save pipeline measures for the codec policy
//! ([`crate::compression`]): the idle CPU between saves, the CPU time of each
//! chunk's work, the destination's write throughput, and the probes that
//! give the first save something to decide on.

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{Encoding, address, encode_chunk_into, encode_raw_into};
use crate::compression::{Observation, Throughput};
use crate::error::Result;
use crate::store::CheckpointRoot;
use crate::sys;

/// The machine's idle CPU between saves: what training leaves to a save.
/// Marked when a save (or `prepare`) ends with no other save running, read
/// when the next one starts.
#[derive(Default)]
pub(crate) struct IdleClock {
    mark: Mutex<Option<(Instant, f64)>>,
    active: std::sync::atomic::AtomicUsize,
}

impl IdleClock {
    pub(crate) fn mark(&self) {
        if let Some(idle) = sys::idle_cpu_seconds() {
            *self.mark.lock().expect("idle mark") = Some((Instant::now(), idle));
        }
    }

    /// A save starts: the cores left idle since the mark, when there is one
    /// at least 50 ms old (else the policy keeps its estimate).
    pub(crate) fn save_starts(&self) -> Option<f64> {
        self.active.fetch_add(1, Ordering::SeqCst);
        let (at, idle) = self.mark.lock().expect("idle mark").take()?;
        let dt = at.elapsed().as_secs_f64();
        if dt < 0.05 {
            return None;
        }
        Some(((sys::idle_cpu_seconds()? - idle) / dt).max(0.0))
    }

    pub(crate) fn save_ends(&self) {
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.mark();
        }
    }
}

/// Seconds on the calling thread's CPU clock (wall clock where there is none).
pub(crate) fn cpu_clock() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    sys::thread_cpu_seconds()
        .unwrap_or_else(|| START.get_or_init(Instant::now).elapsed().as_secs_f64())
}

/// Time during which at least one chunk write was in flight, and the bytes
/// written: the destination's throughput as a save saw it.
#[derive(Default)]
pub(crate) struct WriteMeter {
    in_flight: usize,
    since: Option<Instant>,
    busy: Duration,
    bytes: u64,
}

impl WriteMeter {
    /// What the meter saw: bytes written, and seconds with a write in flight.
    pub(crate) fn throughput(&self) -> Throughput {
        Throughput {
            bytes: self.bytes,
            seconds: self.busy.as_secs_f64(),
        }
    }

    pub(crate) fn begin(meter: &Mutex<WriteMeter>) {
        let mut m = meter.lock().expect("write meter");
        if m.in_flight == 0 {
            m.since = Some(Instant::now());
        }
        m.in_flight += 1;
    }

    pub(crate) fn end(meter: &Mutex<WriteMeter>, bytes: u64) {
        let mut m = meter.lock().expect("write meter");
        m.in_flight -= 1;
        m.bytes += bytes;
        if m.in_flight == 0
            && let Some(since) = m.since.take()
        {
            m.busy += since.elapsed();
        }
    }
}

/// Hashing, compression and raw framing speed of this machine on one
/// synthetic chunk of `len` bytes (float32 values spread like trained
/// weights), on the calling thread.
pub(crate) fn probe_cpu(len: usize, level: i32) -> Observation {
    let mut rng = crate::testdata::Rng::from_state(0x9e37_79b9_7f4a_7c15);
    let raw: Vec<u8> = (0..len / 4)
        .flat_map(|_| rng.normal(0.02).to_le_bytes())
        .collect();
    let mut o = Observation::default();
    let mut frame = Vec::new();
    let t0 = cpu_clock();
    let _ = address(&raw);
    let t1 = cpu_clock();
    if encode_chunk_into(&raw, Encoding { group: 4 }, level, &mut frame).is_err() {
        return o;
    }
    let t2 = cpu_clock();
    o.compressed_stored_bytes = frame.len() as u64;
    encode_raw_into(&raw, &mut frame);
    let t3 = cpu_clock();
    let n = raw.len() as u64;
    o.hashed.add(n, t1 - t0);
    o.compressed.add(n, t2 - t1);
    o.framed_raw.add(n, t3 - t2);
    o
}

/// Writes `n` objects of `bytes` bytes at once to `root` (under
/// `chunks/probe/`, which gc collects should a crash leave them), deletes
/// them, and returns the bytes written and the time the writes took.
pub(crate) async fn probe_write(
    root: &CheckpointRoot,
    bytes: usize,
    n: usize,
) -> Result<Throughput> {
    // Random bytes: a store or file system that compresses must not make
    // the destination look faster than it is for the chunks a save writes.
    let mut rng = crate::testdata::Rng::new(1);
    let body: Bytes = std::iter::repeat_with(|| rng.next_u64().to_le_bytes())
        .flatten()
        .take(bytes)
        .collect::<Vec<u8>>()
        .into();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let keys: Vec<String> = (0..n)
        .map(|i| format!("chunks/probe/{}-{nanos}-{i}", std::process::id()))
        .collect();
    let started = Instant::now();
    let written = futures::future::try_join_all(
        keys.iter()
            .map(|k| root.put_object(k, body.clone(), usize::MAX, bytes)),
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    for k in &keys {
        let _ = root.delete(k).await;
    }
    written?;
    Ok(Throughput {
        bytes: (bytes * n) as u64,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_meter_counts_time_with_any_write_in_flight_once() {
        let meter = Mutex::new(WriteMeter::default());
        let started = Instant::now();
        WriteMeter::begin(&meter);
        WriteMeter::begin(&meter);
        std::thread::sleep(Duration::from_millis(30));
        WriteMeter::end(&meter, 100);
        WriteMeter::end(&meter, 100);
        let span = started.elapsed();
        let busy = meter.lock().unwrap().busy;
        assert!(
            busy >= Duration::from_millis(30) && busy <= span,
            "two overlapping writes over {span:?} counted as {busy:?}"
        );
        // Time with nothing in flight does not count.
        std::thread::sleep(Duration::from_millis(30));
        WriteMeter::begin(&meter);
        WriteMeter::end(&meter, 1);
        let m = meter.lock().unwrap();
        assert_eq!(m.bytes, 201);
        assert!(m.busy < busy + Duration::from_millis(20), "{:?}", m.busy);
    }
}
