//! Shared storage is checked, never assumed: before a round saves anything,
//! its ranks prove that each reads the others' writes under the checkpoint
//! location.
//!
//! A checkpoint commits only when rank 0 reads every other rank's part; if
//! the ranks write to places that are not one (the default location is a
//! folder under each node's own `--data-dir`), no checkpoint can ever commit.
//! The probe finds that out in milliseconds instead of at the first commit:
//!
//! 1. every rank writes [`ProbeRecord`] (a fresh nonce, its host and the
//!    location as it sees it) at [`probe_key`];
//! 2. the ranks exchange their records over their own channel (the trainer's
//!    collective; this crate knows none);
//! 3. every rank reads every other rank's probe ([`read_probes`]) and checks
//!    the nonce, so a probe left by another run does not count;
//! 4. the ranks exchange what they saw; [`verdict`] turns the whole picture
//!    into `Ok` or [`Error::NotShared`] naming each rank's location, who could
//!    not see whom, and the fix. Every rank reaches the same verdict.
//! 5. each rank deletes its own probe ([`remove_probe`]).

use std::collections::BTreeMap;

use bytes::Bytes;
use object_store::PutMode;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::validate_attempt;
use crate::store::{CheckpointRoot, block_on};

/// Where probes live under a checkpoint root.
pub const PROBE_PREFIX: &str = "probes";

/// Reads in flight at once when a rank reads the others' probes.
const READ_CONCURRENCY: usize = 32;

/// What one rank wrote, and told the others it wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// The rank that wrote it.
    pub rank: u32,
    /// Ranks in the round probing.
    pub world_size: u32,
    /// Fresh for every probe: a probe of another run or round never matches.
    pub nonce: String,
    /// The host the rank runs on (for the error message).
    pub host: String,
    /// The checkpoint location as this rank sees it.
    pub location: String,
    /// Why the probe could not be written (empty: it was).
    #[serde(default)]
    pub write_error: String,
}

impl ProbeRecord {
    /// A record with a fresh nonce for `rank` writing under `root`.
    pub fn new(root: &CheckpointRoot, rank: usize, world_size: usize) -> Self {
        ProbeRecord {
            rank: rank as u32,
            world_size: world_size as u32,
            nonce: fresh_nonce(rank),
            host: host_name(),
            location: root.url().to_string(),
            write_error: String::new(),
        }
    }
}

/// What a rank found at another rank's probe key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sighting {
    /// The probe is there with the nonce its writer announced.
    Seen,
    /// Nothing at the key.
    Missing,
    /// A probe is there but not this one (another run's, or another round's).
    Stale,
    /// The read failed.
    Unreadable(String),
    /// The writer could not write its probe, so there was nothing to read.
    NotWritten,
}

/// The key of `rank`'s probe for the check `id` (a round of a run).
pub fn probe_key(id: &str, rank: usize) -> String {
    format!("{PROBE_PREFIX}/{id}.rank-{rank}.json")
}

/// Writes this rank's probe. A failure is recorded in the returned record
/// (and reported by [`verdict`]) rather than returned: the other ranks wait
/// for this rank's record whatever happened.
pub fn write_probe(root: &CheckpointRoot, id: &str, mut record: ProbeRecord) -> ProbeRecord {
    let result = validate_attempt(id).and_then(|()| {
        let key = probe_key(id, record.rank as usize);
        let body = Bytes::from(serde_json::to_vec(&record).expect("a probe serializes"));
        block_on(root.put(&key, body, PutMode::Overwrite))
    });
    if let Err(e) = result {
        record.write_error = e.to_string();
    }
    record
}

/// Reads every other rank's probe and says what was found, indexed by rank
/// (this rank's own entry is [`Sighting::Seen`]).
pub fn read_probes(
    root: &CheckpointRoot,
    id: &str,
    me: usize,
    records: &[ProbeRecord],
) -> Vec<Sighting> {
    use futures::StreamExt;
    let reads = records
        .iter()
        .enumerate()
        .map(|(rank, expected)| async move {
            if rank == me {
                return Sighting::Seen;
            }
            if !expected.write_error.is_empty() {
                return Sighting::NotWritten;
            }
            let key = probe_key(id, rank);
            match root.get_opt(&key).await {
                Ok(None) => Sighting::Missing,
                Ok(Some(bytes)) => match serde_json::from_slice::<ProbeRecord>(&bytes) {
                    Ok(found) if found.nonce == expected.nonce => Sighting::Seen,
                    _ => Sighting::Stale,
                },
                Err(e) => Sighting::Unreadable(e.to_string()),
            }
        });
    block_on(
        futures::stream::iter(reads)
            .buffered(READ_CONCURRENCY)
            .collect::<Vec<_>>(),
    )
}

/// Deletes this rank's probe (once every rank has read it).
pub fn remove_probe(root: &CheckpointRoot, id: &str, rank: usize) -> Result<()> {
    block_on(root.delete(&probe_key(id, rank)))
}

/// The round's verdict from every rank's record and what every rank saw
/// (`sightings[r]`: what rank `r` found, indexed by rank). The same inputs
/// give the same verdict on every rank.
pub fn verdict(records: &[ProbeRecord], sightings: &[Vec<Sighting>]) -> Result<()> {
    let world = records.len();
    let mut lines = Vec::new();
    // Ranks that saw the same thing from the same place share a line.
    let mut groups: BTreeMap<(String, String, String), Vec<usize>> = BTreeMap::new();
    for (rank, record) in records.iter().enumerate() {
        let seen = sightings.get(rank).map(Vec::as_slice).unwrap_or_default();
        let mut trouble = Vec::new();
        if !record.write_error.is_empty() {
            trouble.push(format!("could not write its probe: {}", record.write_error));
        }
        let of = |wanted: fn(&Sighting) -> bool| -> Vec<usize> {
            (0..world)
                .filter(|&r| r != rank && seen.get(r).is_some_and(wanted))
                .collect()
        };
        let missing = of(|s| matches!(s, Sighting::Missing));
        if !missing.is_empty() {
            trouble.push(format!("cannot see the probes of {}", ranks_text(&missing)));
        }
        let stale = of(|s| matches!(s, Sighting::Stale));
        if !stale.is_empty() {
            trouble.push(format!(
                "finds older probes (not this round's) in place of those of {}",
                ranks_text(&stale)
            ));
        }
        let unreadable: Vec<(usize, &str)> = seen
            .iter()
            .enumerate()
            .filter_map(|(r, s)| match s {
                Sighting::Unreadable(e) if r != rank => Some((r, e.as_str())),
                _ => None,
            })
            .collect();
        if let Some((_, first)) = unreadable.first() {
            let ranks: Vec<usize> = unreadable.iter().map(|(r, _)| *r).collect();
            trouble.push(format!(
                "could not read the probes of {}: {first}",
                ranks_text(&ranks)
            ));
        }
        if !trouble.is_empty() {
            groups
                .entry((
                    record.host.clone(),
                    record.location.clone(),
                    trouble.join("; "),
                ))
                .or_default()
                .push(rank);
        }
    }
    if groups.is_empty() {
        return Ok(());
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by_key(|(_, ranks)| ranks[0]);
    for ((host, location, trouble), ranks) in groups {
        lines.push(format!(
            "  {} (host {host}, checkpoint location {location}) {trouble}",
            ranks_text(&ranks)
        ));
    }
    Err(Error::NotShared {
        what: format!(
            "the {world} ranks of this round cannot all read each other's writes under the \
             checkpoint location, so no checkpoint could ever commit:\n{}\n\
             fix: give every node one checkpoint location, checkpoint.url = \"s3://BUCKET/PREFIX\" \
             (or gs://, az://) or a file:// path on a filesystem every node mounts (the default, \
             checkpoints/JOB under each node's --data-dir, is shared only when that folder is)",
            lines.join("\n")
        ),
    })
}

/// "rank 3", "ranks 0, 2", "ranks 0-7, 9".
fn ranks_text(ranks: &[usize]) -> String {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for &r in ranks {
        match spans.last_mut() {
            Some((_, end)) if *end + 1 == r => *end = r,
            _ => spans.push((r, r)),
        }
    }
    let text: Vec<String> = spans
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    let noun = if ranks.len() == 1 { "rank" } else { "ranks" };
    format!("{noun} {}", text.join(", "))
}

/// Unique per probe: time, process, rank and a process-wide counter, hashed.
fn fresh_nonce(rank: usize) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut hasher = blake3::Hasher::new();
    hasher.update(&nanos.to_le_bytes());
    hasher.update(&std::process::id().to_le_bytes());
    hasher.update(&(rank as u64).to_le_bytes());
    hasher.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hasher.update(host_name().as_bytes());
    hasher.finalize().to_hex()[..32].to_string()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the whole check for ranks that each see the root at the given
    /// URL; the exchange is a plain vector here.
    fn check(urls: &[&str], id: &str) -> Result<()> {
        let roots: Vec<CheckpointRoot> = urls
            .iter()
            .map(|u| CheckpointRoot::open(u).unwrap())
            .collect();
        let world = roots.len();
        let records: Vec<ProbeRecord> = roots
            .iter()
            .enumerate()
            .map(|(r, root)| write_probe(root, id, ProbeRecord::new(root, r, world)))
            .collect();
        let sightings: Vec<Vec<Sighting>> = roots
            .iter()
            .enumerate()
            .map(|(r, root)| read_probes(root, id, r, &records))
            .collect();
        let result = verdict(&records, &sightings);
        for (r, root) in roots.iter().enumerate() {
            remove_probe(root, id, r).unwrap();
        }
        result
    }

    #[test]
    fn ranks_sharing_a_location_pass_and_leave_no_probe() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        check(&[&url, &url, &url], "run-r1").unwrap();
        let root = CheckpointRoot::open(&url).unwrap();
        let left = block_on(root.list(PROBE_PREFIX)).unwrap();
        assert!(left.is_empty(), "probes left behind: {left:?}");
    }

    #[test]
    fn ranks_on_separate_folders_fail_naming_each_location_and_the_fix() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ua, ub) = (
            format!("file://{}", a.path().display()),
            format!("file://{}", b.path().display()),
        );
        // Two nodes of two ranks each.
        let err = check(&[&ua, &ua, &ub, &ub], "run-r2").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::NotShared { .. }), "{err:?}");
        assert!(
            text.contains(&format!(
                "ranks 0-1 (host {}, checkpoint location {ua}) cannot see the probes of ranks 2-3",
                host_name()
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "checkpoint location {ub}) cannot see the probes of ranks 0-1"
            )),
            "{text}"
        );
        assert!(text.contains("checkpoint.url = \"s3://"), "{text}");
    }

    #[test]
    fn a_probe_left_by_another_run_does_not_count() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ua, ub) = (
            format!("file://{}", a.path().display()),
            format!("file://{}", b.path().display()),
        );
        // An earlier run left a rank-1 probe of the same id in rank 0's folder.
        let root_a = CheckpointRoot::open(&ua).unwrap();
        write_probe(&root_a, "job-r1", ProbeRecord::new(&root_a, 1, 2));
        let err = check(&[&ua, &ub], "job-r1").unwrap_err().to_string();
        assert!(
            err.contains("rank 0 (host")
                && err.contains("older probes")
                && err.contains("of rank 1"),
            "{err}"
        );
    }

    #[test]
    fn a_probe_that_cannot_be_written_is_named_with_its_cause() {
        let records = vec![
            ProbeRecord {
                rank: 0,
                world_size: 2,
                nonce: "a".into(),
                host: "h0".into(),
                location: "s3://b/p".into(),
                write_error: String::new(),
            },
            ProbeRecord {
                rank: 1,
                world_size: 2,
                nonce: "b".into(),
                host: "h1".into(),
                location: "s3://b/p".into(),
                write_error: "store unavailable: put: access denied".into(),
            },
        ];
        let sightings = vec![
            vec![Sighting::Seen, Sighting::NotWritten],
            vec![Sighting::Seen, Sighting::Seen],
        ];
        let err = verdict(&records, &sightings).unwrap_err().to_string();
        assert!(
            err.contains("rank 1 (host h1, checkpoint location s3://b/p) could not write its probe: store unavailable: put: access denied"),
            "{err}"
        );
        assert!(!err.contains("rank 0 (host"), "{err}");
    }

    #[test]
    fn rank_lists_read_as_spans() {
        assert_eq!(ranks_text(&[3]), "rank 3");
        assert_eq!(ranks_text(&[0, 1, 2, 5, 7, 8]), "ranks 0-2, 5, 7-8");
    }
}
