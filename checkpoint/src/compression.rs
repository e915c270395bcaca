//! The codec policy: whether a save compresses its chunks or stores them as
//! they are.
//!
//! Compression pays when the destination's writes bound a save (an object
//! store at 100 MB/s: stored bytes drop to the entropy bound and the save
//! ends sooner). It costs when the CPU does: on a 2-core machine that trains
//! while it saves, next to a disk that writes 1.5 GB/s, zstd at ~1 GB/s per
//! core makes the save slower than writing the raw bytes, and takes those
//! cores from the training step. `checkpoint.compression = "auto"` decides
//! per save from measurements:
//!
//! - the cores training leaves idle (from the machine's idle time between
//!   saves: the save threads run at idle priority, so that is what they get);
//! - the CPU cost per byte of hashing, of zstd and of framing raw bytes
//!   (thread CPU time, measured on every save; while storing raw, one chunk in
//!   [`SAMPLE_EVERY`] is still compressed so the ratio and speed stay current);
//! - the compression ratio of this state;
//! - the destination's write throughput (a probe when the pipeline is
//!   prepared, then every save's writes).
//!
//! A save takes about `max(cpu, write)`: `bytes × cost per byte / cores` of
//! CPU, `stored bytes / throughput` of writing. The policy stores raw unless
//! compressing is predicted to be at least [`MARGIN`] faster: raw leaves the
//! cores to training.
//!
//! Pure: [`CodecPolicy::observe`] takes measurements, [`CodecPolicy::decide`]
//! returns the choice and the record that goes into the part and manifest.
//! The save pipeline (`save.rs`) measures and applies it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What the user asked for (`checkpoint.compression`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Per save, whichever the measurements predict is faster.
    #[default]
    Auto,
    /// Always compress (byte-grouped zstd; a chunk zstd does not shrink is
    /// still stored raw).
    Zstd,
    /// Never compress.
    None,
}

impl Compression {
    /// The spec's spelling: `auto`, `zstd` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Auto => "auto",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Compression::Auto),
            "zstd" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            other => Err(Error::invalid(format!(
                "compression {other:?}: expected \"auto\", \"zstd\" or \"none\""
            ))),
        }
    }
}

/// What one save did with its chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Byte-grouped zstd (a chunk zstd does not shrink is still stored raw).
    Zstd,
    /// Stored raw, but for one chunk in [`SAMPLE_EVERY`], compressed to keep
    /// zstd measured.
    None,
}

impl Codec {
    /// `zstd` or `none`, as records and `kiln ckpt show` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::None => "none",
        }
    }
}

/// While storing raw, one chunk in this many is compressed anyway (and
/// stored compressed), so that the ratio and zstd's speed on this state
/// stay measured.
pub const SAMPLE_EVERY: usize = 16;
/// Compression must be predicted this much faster than raw to be chosen.
pub const MARGIN: f64 = 0.10;
/// Each save's write throughput is a lower bound of the destination's (its
/// writes may have waited for the CPU); the estimate keeps the best one seen,
/// decayed by this factor per save so that a slower destination shows.
const WRITE_DECAY: f64 = 0.7;
/// Fewer bytes than this say too little about a speed.
const MIN_SAMPLE_BYTES: u64 = 1 << 20;
/// The save threads get at least this share of a core (idle priority still
/// runs when training waits on anything).
const MIN_CORES: f64 = 0.05;

/// Until measured: per-core speeds of this machine class (docs/
/// checkpoint-format.md) and the ratio of trained fp32 state.
const PRIOR_HASH: f64 = 5.0e9;
const PRIOR_ZSTD: f64 = 1.2e9;
const PRIOR_RAW_FRAME: f64 = 8.0e9;
const PRIOR_RATIO: f64 = 0.83;

/// Bytes processed and the seconds they took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Throughput {
    /// Bytes processed.
    pub bytes: u64,
    /// Seconds they took (CPU or wall-clock: the field holding it says).
    pub seconds: f64,
}

impl Throughput {
    /// Counts `bytes` more, processed in `seconds`.
    pub fn add(&mut self, bytes: u64, seconds: f64) {
        self.bytes += bytes;
        self.seconds += seconds;
    }

    /// Bytes per second, when there is enough to say.
    fn rate(self) -> Option<f64> {
        (self.bytes >= MIN_SAMPLE_BYTES && self.seconds > 0.0)
            .then(|| self.bytes as f64 / self.seconds)
    }
}

/// Measurements from one save (or a probe). Every field is optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Cores left idle between saves.
    pub spare_cores: Option<f64>,
    /// Raw bytes hashed, CPU seconds.
    pub hashed: Throughput,
    /// Raw bytes through zstd (grouping, planes, frame), CPU seconds.
    pub compressed: Throughput,
    /// What the compressed bytes became.
    pub compressed_stored_bytes: u64,
    /// Raw bytes framed as they are, CPU seconds.
    pub framed_raw: Throughput,
    /// Bytes written to the destination, and the seconds during which at
    /// least one write was in flight.
    pub written: Throughput,
}

/// What the policy believes now. Speeds in bytes per second (per core for
/// CPU work).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Estimates {
    /// Cores training left idle between the last saves (cores, not a rate).
    pub spare_cores: Option<f64>,
    /// Hashing and checksumming raw bytes.
    pub hash_per_core: Option<f64>,
    /// Byte grouping, zstd and framing.
    pub zstd_per_core: Option<f64>,
    /// Framing a chunk as it is.
    pub raw_frame_per_core: Option<f64>,
    /// Stored / raw bytes of compressed chunks.
    pub ratio: Option<f64>,
    /// The destination's write throughput: the best a save saw, decayed per
    /// save.
    pub write: Option<f64>,
}

/// The choice for one save and what it rested on: recorded in the rank's
/// part and in the manifest (`kiln ckpt show` prints it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompressionRecord {
    /// The rank that chose.
    pub rank: u32,
    /// What was asked (`auto`, `zstd`, `none`).
    pub policy: Compression,
    /// What this save did.
    pub codec: Codec,
    /// Why, in words for people.
    pub reason: String,
    /// [`Estimates::spare_cores`] at the choice; the fields below are the
    /// other estimates it rested on (absent: not measured yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spare_cores: Option<f64>,
    /// Hashing speed per core, GB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_gb_s: Option<f64>,
    /// zstd's speed per core, GB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd_gb_s: Option<f64>,
    /// The destination's write speed, GB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_gb_s: Option<f64>,
    /// [`Estimates::ratio`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Predicted seconds of the save stored raw (auto only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_none_s: Option<f64>,
    /// Predicted seconds of the save compressed (auto only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_zstd_s: Option<f64>,
    /// Whether chunks were hashed (and checksummed) during the copy that
    /// blocks training, rather than in the background: chosen when the
    /// background would get too little CPU (see [`Decision`]).
    #[serde(default)]
    pub hashed_while_copying: bool,
    /// Chunks of this rank's stripe that went through zstd, of all uploaded.
    #[serde(default)]
    pub chunks_compressed: u64,
    /// Chunks of this rank's stripe uploaded (the others were already stored).
    #[serde(default)]
    pub chunks_uploaded: u64,
}

impl CompressionRecord {
    /// One line for people: `auto -> none (3 of 48 uploaded chunks through
    /// zstd): <reason>`.
    pub fn summary(&self) -> String {
        format!(
            "{} -> {} ({} of {} uploaded chunks through zstd{}): {}",
            self.policy,
            self.codec.as_str(),
            self.chunks_compressed,
            self.chunks_uploaded,
            if self.hashed_while_copying {
                "; hashed while copying: the cores were busy"
            } else {
                ""
            },
            self.reason
        )
    }
}

/// One save's codec, and which chunks to compress anyway.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The save's codec.
    pub codec: Codec,
    /// With [`Codec::None`]: compress chunk `i` when `i % sample_every ==
    /// sample_every / 2` (0: none).
    pub sample_every: usize,
    /// Hash and checksum the chunks while copying them (the blocking part
    /// of the save, on every save thread at full speed) instead of in the
    /// background. Chosen when hashing on the cores training leaves idle
    /// would take longer than writing: then the background would compete
    /// with training for its cores, and training threads kept in step by
    /// barriers lose about twice what a competitor takes from one of them,
    /// where hashing during the copy costs them only its own length.
    pub digest_while_copying: bool,
    /// The choice as the part records it (its chunk counts are filled in
    /// as the save goes).
    pub record: CompressionRecord,
}

impl Decision {
    /// Whether the `i`-th chunk of the stripe goes through zstd.
    pub fn compresses(&self, i: usize) -> bool {
        match self.codec {
            Codec::Zstd => true,
            Codec::None => self.sample_every > 0 && i % self.sample_every == self.sample_every / 2,
        }
    }
}

/// See the module docs.
#[derive(Clone, Debug)]
pub struct CodecPolicy {
    mode: Compression,
    rank: u32,
    est: Estimates,
}

impl CodecPolicy {
    /// The policy of `rank` in `mode`, with nothing measured yet (it decides
    /// on priors until it has measurements).
    pub fn new(mode: Compression, rank: usize) -> Self {
        CodecPolicy {
            mode,
            rank: rank as u32,
            est: Estimates::default(),
        }
    }

    /// Starts from what an earlier policy of the same destination measured
    /// (see `Checkpointer::new`).
    pub fn with_estimates(mut self, est: Estimates) -> Self {
        self.est = est;
        self
    }

    /// What was asked.
    pub fn mode(&self) -> Compression {
        self.mode
    }

    /// What it believes now; a later policy of the same destination starts
    /// from it ([`CodecPolicy::with_estimates`]).
    pub fn estimates(&self) -> &Estimates {
        &self.est
    }

    /// Folds in what a save (or probe) measured.
    pub fn observe(&mut self, o: &Observation) {
        let e = &mut self.est;
        if let Some(spare) = o.spare_cores.filter(|s| s.is_finite() && *s >= 0.0) {
            e.spare_cores = Some(spare);
        }
        let smooth = |old: Option<f64>, new: Option<f64>| match (old, new) {
            (Some(old), Some(new)) => Some(0.5 * old + 0.5 * new),
            (old, new) => new.or(old),
        };
        e.hash_per_core = smooth(e.hash_per_core, o.hashed.rate());
        e.zstd_per_core = smooth(e.zstd_per_core, o.compressed.rate());
        e.raw_frame_per_core = smooth(e.raw_frame_per_core, o.framed_raw.rate());
        if o.compressed.bytes >= MIN_SAMPLE_BYTES {
            e.ratio = Some(o.compressed_stored_bytes as f64 / o.compressed.bytes as f64);
        }
        if let Some(w) = o.written.rate() {
            e.write = Some(e.write.map_or(w, |old| w.max(old * WRITE_DECAY)));
        }
    }

    /// The codec for a save of `raw_bytes` on `threads` save threads.
    pub fn decide(&self, raw_bytes: u64, threads: usize) -> Decision {
        let e = &self.est;
        let gb = |v: Option<f64>| v.map(|v| round3(v / 1e9));
        let mut record = CompressionRecord {
            rank: self.rank,
            policy: self.mode,
            codec: Codec::Zstd,
            reason: String::new(),
            spare_cores: e.spare_cores.map(round3),
            hash_gb_s: gb(e.hash_per_core),
            zstd_gb_s: gb(e.zstd_per_core),
            write_gb_s: gb(e.write),
            ratio: e.ratio.map(round3),
            predicted_none_s: None,
            predicted_zstd_s: None,
            hashed_while_copying: false,
            chunks_compressed: 0,
            chunks_uploaded: 0,
        };
        let cores = e
            .spare_cores
            .unwrap_or(threads as f64)
            .clamp(MIN_CORES, threads.max(1) as f64);
        let s = raw_bytes as f64;
        let hash = e.hash_per_core.unwrap_or(PRIOR_HASH);
        // The machine is busy (less than half the save threads' cores left
        // idle) and hashing on what is left would take longer than writing:
        // hash while copying (see `Decision::digest_while_copying`).
        let digest_while_copying = cores < threads as f64 / 2.0
            && e.write.is_some_and(|write| s / (hash * cores) > s / write);
        record.hashed_while_copying = digest_while_copying;
        let fixed = |codec: Codec, mut record: CompressionRecord| {
            record.codec = codec;
            record.reason = format!("checkpoint.compression = \"{}\"", codec.as_str());
            Decision {
                codec,
                sample_every: 0,
                digest_while_copying,
                record,
            }
        };
        match self.mode {
            Compression::Zstd => return fixed(Codec::Zstd, record),
            Compression::None => return fixed(Codec::None, record),
            Compression::Auto => {}
        }
        let Some(write) = e.write else {
            record.reason =
                "nothing measured of the destination yet: compress (the safe choice for a slow store)"
                    .into();
            return Decision {
                codec: Codec::Zstd,
                sample_every: 0,
                digest_while_copying,
                record,
            };
        };
        let zstd = e.zstd_per_core.unwrap_or(PRIOR_ZSTD);
        let frame = e.raw_frame_per_core.unwrap_or(PRIOR_RAW_FRAME);
        let ratio = e.ratio.unwrap_or(PRIOR_RATIO);
        // What is left for the background once the copy hashed.
        let hashing = if digest_while_copying {
            0.0
        } else {
            1.0 / hash
        };
        let cpu_none = s * (hashing + 1.0 / frame) / cores;
        let cpu_zstd = s * (hashing + 1.0 / zstd) / cores;
        let none = cpu_none.max(s / write);
        let compressed = cpu_zstd.max(ratio * s / write);
        record.predicted_none_s = Some(round3(none));
        record.predicted_zstd_s = Some(round3(compressed));
        let bound = |cpu: f64, io: f64| if cpu >= io { "CPU" } else { "writes" };
        let (codec, verdict) = if compressed < none * (1.0 - MARGIN) {
            (Codec::Zstd, "compressing is faster")
        } else {
            (
                Codec::None,
                "raw is as fast or faster and leaves the CPU to training",
            )
        };
        record.codec = codec;
        record.reason = format!(
            "{verdict}: predicted {none:.2} s raw ({}-bound) against {compressed:.2} s compressed ({}-bound) on {cores:.2} spare cores writing {:.2} GB/s",
            bound(cpu_none, s / write),
            bound(cpu_zstd, ratio * s / write),
            write / 1e9,
        );
        Decision {
            codec,
            // Samples compressed on starved cores would hold the save up.
            sample_every: if codec == Codec::None && !digest_while_copying {
                SAMPLE_EVERY
            } else {
                0
            },
            digest_while_copying,
            record,
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: f64 = 1e9;

    fn measured(spare_cores: f64, write_gb_s: f64) -> CodecPolicy {
        let mut p = CodecPolicy::new(Compression::Auto, 0);
        p.observe(&Observation {
            spare_cores: Some(spare_cores),
            hashed: Throughput {
                bytes: 1 << 30,
                seconds: (1u64 << 30) as f64 / (5.0 * GB),
            },
            compressed: Throughput {
                bytes: 1 << 28,
                seconds: (1u64 << 28) as f64 / (1.0 * GB),
            },
            compressed_stored_bytes: ((1u64 << 28) as f64 * 0.83) as u64,
            framed_raw: Throughput {
                bytes: 1 << 30,
                seconds: (1u64 << 30) as f64 / (8.0 * GB),
            },
            written: Throughput {
                bytes: 1 << 30,
                seconds: (1u64 << 30) as f64 / (write_gb_s * GB),
            },
        });
        p
    }

    #[test]
    fn busy_cores_next_to_a_fast_disk_store_raw() {
        // The machine: 2 cores mostly training, a 1.5 GB/s disk.
        let d = measured(0.6, 1.5).decide(1_200_000_000, 2);
        assert_eq!(d.codec, Codec::None, "{}", d.record.reason);
        assert!(
            !d.digest_while_copying,
            "0.6 cores hash 3 GB/s, faster than the disk"
        );
        assert_eq!(d.sample_every, SAMPLE_EVERY);
        let (none, zstd) = (
            d.record.predicted_none_s.unwrap(),
            d.record.predicted_zstd_s.unwrap(),
        );
        assert!(none < zstd, "{none} vs {zstd}");
        // A few chunks are still compressed, to keep measuring.
        let sampled = (0..160).filter(|&i| d.compresses(i)).count();
        assert_eq!(sampled, 10);
    }

    #[test]
    fn starved_cores_hash_while_copying_and_sample_nothing() {
        // Training leaves 0.1 core: hashing would take 2.4 s, writing 0.8.
        let d = measured(0.1, 1.5).decide(1_200_000_000, 2);
        assert!(d.digest_while_copying && d.record.hashed_while_copying);
        assert_eq!(
            (d.codec, d.sample_every),
            (Codec::None, 0),
            "{}",
            d.record.reason
        );
        assert!(!(0..1000).any(|i| d.compresses(i)));
        // The prediction counts no background hashing then: framing alone
        // (8 GB/s per core) on 0.1 core.
        let raw = d.record.predicted_none_s.unwrap();
        assert!((raw - 1.5).abs() < 0.01, "{raw}");
        // With idle cores the background hashes, however fast the store.
        assert!(
            !measured(2.0, 1.5)
                .decide(1_200_000_000, 2)
                .digest_while_copying
        );
        assert!(
            !measured(1.0, 100.0)
                .decide(1_200_000_000, 2)
                .digest_while_copying
        );
        // Busy cores next to a slow store: the background hides behind writes.
        assert!(
            !measured(0.3, 0.1)
                .decide(1_200_000_000, 2)
                .digest_while_copying
        );
        // Nothing known of the destination: nothing to weigh against.
        assert!(
            !CodecPolicy::new(Compression::Auto, 0)
                .decide(1 << 30, 2)
                .digest_while_copying
        );
    }

    #[test]
    fn a_slow_store_gets_compressed_bytes_even_on_busy_cores() {
        // 100 MB/s to an object store: writes bound the save either way.
        let d = measured(0.3, 0.1).decide(1_200_000_000, 2);
        assert_eq!(d.codec, Codec::Zstd, "{}", d.record.reason);
        assert!((0..100).all(|i| d.compresses(i)));
    }

    #[test]
    fn idle_cores_compress_when_that_beats_the_disk_by_the_margin() {
        // Two idle cores encode at 2 GB/s; 0.83 of the bytes to a 1 GB/s disk
        // is faster than all of them.
        let d = measured(2.0, 1.0).decide(1_200_000_000, 2);
        assert_eq!(d.codec, Codec::Zstd, "{}", d.record.reason);
        // A near tie goes to raw: it leaves the CPU to training.
        let d = measured(2.0, 1.6).decide(1_200_000_000, 2);
        assert_eq!(d.codec, Codec::None, "{}", d.record.reason);
    }

    #[test]
    fn fixed_modes_ignore_measurements_and_say_so() {
        let mut p = measured(0.3, 1.5);
        p.mode = Compression::Zstd;
        let d = p.decide(1 << 30, 2);
        assert_eq!((d.codec, d.sample_every), (Codec::Zstd, 0));
        assert!(d.record.reason.contains("\"zstd\""), "{}", d.record.reason);
        let mut p = measured(2.0, 0.01);
        p.mode = Compression::None;
        let d = p.decide(1 << 30, 2);
        assert_eq!(d.codec, Codec::None);
        assert!(!(0..100).any(|i| d.compresses(i)), "none samples nothing");
    }

    #[test]
    fn without_a_write_measurement_auto_compresses() {
        let d = CodecPolicy::new(Compression::Auto, 3).decide(1 << 30, 2);
        assert_eq!(d.codec, Codec::Zstd);
        assert_eq!(d.record.rank, 3);
        assert!(d.record.reason.contains("nothing measured"));
    }

    #[test]
    fn write_estimates_keep_the_best_recent_lower_bound() {
        let mut p = measured(1.0, 1.5);
        let write = |p: &CodecPolicy| p.estimates().write.unwrap() / GB;
        assert!((write(&p) - 1.5).abs() < 1e-9);
        // A save whose writes waited on the CPU says less about the disk.
        let slow = Observation {
            written: Throughput {
                bytes: 1 << 30,
                seconds: (1u64 << 30) as f64 / (0.5 * GB),
            },
            ..Observation::default()
        };
        p.observe(&slow);
        assert!((write(&p) - 1.05).abs() < 1e-9, "{}", write(&p));
        for _ in 0..10 {
            p.observe(&slow);
        }
        assert!((write(&p) - 0.5).abs() < 1e-9, "a slower destination shows");
        // Too few bytes say nothing.
        p.observe(&Observation {
            written: Throughput {
                bytes: 1000,
                seconds: 1.0,
            },
            ..Observation::default()
        });
        assert!((write(&p) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn the_ratio_is_what_compressed_chunks_became() {
        let mut p = CodecPolicy::new(Compression::Auto, 0);
        p.observe(&Observation {
            compressed: Throughput {
                bytes: 100 << 20,
                seconds: 0.1,
            },
            compressed_stored_bytes: 66 << 20,
            ..Observation::default()
        });
        assert!((p.estimates().ratio.unwrap() - 0.66).abs() < 1e-9);
        assert!((p.estimates().zstd_per_core.unwrap() - (100u64 << 20) as f64 / 0.1).abs() < 1.0);
    }

    #[test]
    fn names_round_trip() {
        for c in [Compression::Auto, Compression::Zstd, Compression::None] {
            assert_eq!(c.as_str().parse::<Compression>().unwrap(), c);
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{c}\""));
        }
        assert!("lz4".parse::<Compression>().is_err());
    }
}
