//! The commit protocol as a pure state machine: no I/O, no clock.
//!
//! The committer (rank 0) holds its own part; the machine asks for the other
//! ranks' parts by their known keys (never listing), waits with backoff until
//! they are all there or the timeout passes, checks that every rank saved the
//! same layout and exactly its stripe, then asks to write the manifest
//! (create-only) and to move `latest` by compare-and-swap, never backwards.
//! It never waits for a part that will not come: a rank that says its save
//! failed ([`Event::PeerFailed`]) fails the commit at once with that rank's
//! cause, and once every rank says its saves are over
//! ([`Event::PeersSettled`]) a part still missing is waited for only briefly.
//! The driver in `save.rs` performs the [`Action`]s and feeds back
//! [`Event`]s; tests drive it with a fake clock.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::manifest::{
    CheckpointMeta, ChunkRef, FORMAT_VERSION, LatestRecord, Manifest, PartRecord, TensorEntry,
    Totals, manifest_key,
};
use crate::plan::ChunkPlan;

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Lost swaps before giving up: each loss means another writer moved
/// `latest`, so a long streak means something is wrong.
const MAX_SWAP_LOSSES: u32 = 64;

/// What the committer knows before it starts.
#[derive(Debug, Clone)]
pub struct CommitInput {
    /// The step saved.
    pub step: u64,
    /// The saving run's id, shared by every rank's part.
    pub attempt: String,
    /// Ranks of the save: the parts to gather.
    pub world_size: usize,
    /// The canonical chunk plan every part must match.
    pub plan: Arc<ChunkPlan>,
    /// The trainer's metadata, copied into the manifest.
    pub meta: CheckpointMeta,
    /// Manifest key the new manifest names as its parent.
    pub parent: Option<String>,
    /// How long to wait for the other ranks' parts.
    pub timeout: Duration,
    /// RFC 3339 time of the commit (the machine reads no clock).
    pub created_at: String,
}

/// What the driver tells a [`Commit`]: the results of its actions, and news
/// from the other ranks.
#[derive(Debug)]
pub enum Event {
    /// The answer to reading one rank's part.
    PartRead {
        /// The rank whose part was read.
        rank: usize,
        /// The part; `None`: not there yet.
        part: Option<PartRecord>,
    },
    /// A [`Action::WaitUntil`] deadline passed.
    Tick,
    /// `rank` says its save of this checkpoint failed: its part never comes.
    PeerFailed {
        /// The rank that failed.
        rank: usize,
        /// Its error, for the commit's.
        cause: String,
    },
    /// Every other rank says its saves are over (written or failed): a part
    /// still missing is waited for only until `until`.
    PeersSettled {
        /// The new deadline (it only ever moves earlier).
        until: Instant,
    },
    /// The create-only manifest put succeeded (or found identical bytes).
    ManifestWritten,
    /// A different manifest already exists at the key.
    ManifestConflict,
    /// The answer to [`Action::ReadLatest`] (`None`: no `latest` yet).
    LatestRead(Option<LatestRecord>),
    /// The result of [`Action::SwapLatest`]: `false` when another writer won.
    LatestSwapped(bool),
}

/// What a [`Commit`] asks its driver to do.
#[derive(Debug)]
pub enum Action {
    /// Read these ranks' parts (concurrently), answering with one
    /// [`Event::PartRead`] each.
    ReadParts(Vec<usize>),
    /// Answer [`Event::Tick`] at this time (the backoff before reading the
    /// missing parts again).
    WaitUntil(Instant),
    /// Put this manifest at its key, create-only; answer
    /// [`Event::ManifestWritten`] or [`Event::ManifestConflict`].
    WriteManifest(Box<Manifest>),
    /// Read `latest`; answer [`Event::LatestRead`].
    ReadLatest,
    /// Swap `latest` from the record last read to this one.
    SwapLatest(LatestRecord),
    /// The checkpoint is committed; the commit asks for nothing more.
    Done(Box<CommitOutcome>),
    /// The commit failed; it asks for nothing more.
    Fail(Error),
}

/// What a successful commit produced.
#[derive(Debug, Clone)]
pub struct CommitOutcome {
    /// The manifest written.
    pub manifest: Manifest,
    /// Whether `latest` names this manifest: false when it already named a
    /// newer step, or another manifest of this step.
    pub latest_moved: bool,
    /// Every rank's part, in rank order.
    pub parts: Vec<PartRecord>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Gathering,
    WritingManifest,
    MovingLatest,
    Finished,
}

/// One commit in progress.
#[derive(Debug)]
pub struct Commit {
    input: CommitInput,
    stripes: Vec<Range<usize>>,
    deadline: Instant,
    parts: Vec<Option<PartRecord>>,
    outstanding: usize,
    backoff: Duration,
    phase: Phase,
    swap_losses: u32,
    manifest: Option<Manifest>,
    /// Whether the first round of part reads went out.
    asked: bool,
    /// Every other rank said its saves are over ([`Event::PeersSettled`]).
    settled: bool,
}

impl Commit {
    /// Starts a commit with the committer's own part (rank 0).
    pub fn new(input: CommitInput, own_part: PartRecord, now: Instant) -> (Self, Vec<Action>) {
        let stripes = (0..input.world_size)
            .map(|r| input.plan.stripe(r, input.world_size))
            .collect();
        let mut commit = Commit {
            deadline: now + input.timeout,
            parts: vec![None; input.world_size],
            stripes,
            input,
            outstanding: 0,
            backoff: FIRST_BACKOFF,
            phase: Phase::Gathering,
            swap_losses: 0,
            manifest: None,
            asked: false,
            settled: false,
        };
        let actions = match commit.accept(0, own_part) {
            Err(e) => commit.fail(e),
            Ok(()) => commit.next_gather_step(now),
        };
        (commit, actions)
    }

    /// Feeds one event, at `now`, and returns what to do next: nothing once
    /// the commit is over; an event out of place fails the commit.
    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Action> {
        if self.phase == Phase::Finished {
            return vec![];
        }
        match (event, &self.phase) {
            (Event::PeerFailed { rank, cause }, Phase::Gathering)
                if self.parts.get(rank).is_some_and(Option::is_none) =>
            {
                let i = &self.input;
                self.fail(Error::Conflict {
                    what: format!(
                        "step {} attempt {}: rank {rank} could not save its part: {cause}",
                        i.step, i.attempt
                    ),
                })
            }
            // Its part is here already, or the commit is past gathering.
            (Event::PeerFailed { .. }, _) => vec![],
            (Event::PeersSettled { until }, _) => {
                self.settled = true;
                self.deadline = self.deadline.min(until);
                vec![]
            }
            (Event::PartRead { rank, part }, Phase::Gathering) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                if let Some(part) = part
                    && let Err(e) = self.accept(rank, part)
                {
                    return self.fail(e);
                }
                if self.outstanding > 0 {
                    return vec![];
                }
                self.next_gather_step(now)
            }
            (Event::Tick, Phase::Gathering) => {
                let missing = self.missing();
                self.outstanding = missing.len();
                vec![Action::ReadParts(missing)]
            }
            (Event::ManifestWritten, Phase::WritingManifest) => {
                self.phase = Phase::MovingLatest;
                vec![Action::ReadLatest]
            }
            (Event::ManifestConflict, Phase::WritingManifest) => {
                let key = manifest_key(self.input.step, &self.input.attempt);
                self.fail(Error::Conflict {
                    what: format!("a different manifest already exists at {key}"),
                })
            }
            (Event::LatestRead(current), Phase::MovingLatest) => {
                let manifest = self
                    .manifest
                    .as_ref()
                    .expect("manifest built before latest");
                match current {
                    Some(cur) if cur.step >= self.input.step => {
                        self.finish(cur.manifest == manifest.key)
                    }
                    _ => vec![Action::SwapLatest(LatestRecord {
                        format_version: FORMAT_VERSION,
                        step: self.input.step,
                        manifest: manifest.key.clone(),
                        attempt: self.input.attempt.clone(),
                        parent: manifest.parent.clone(),
                        updated_at: self.input.created_at.clone(),
                    })],
                }
            }
            (Event::LatestSwapped(true), Phase::MovingLatest) => self.finish(true),
            (Event::LatestSwapped(false), Phase::MovingLatest) => {
                self.swap_losses += 1;
                if self.swap_losses > MAX_SWAP_LOSSES {
                    return self.fail(Error::Conflict {
                        what: format!("lost {} swaps of latest in a row", self.swap_losses),
                    });
                }
                vec![Action::ReadLatest]
            }
            (event, phase) => self.fail(Error::invalid(format!(
                "commit protocol: unexpected {event:?} while {phase:?}"
            ))),
        }
    }

    fn missing(&self) -> Vec<usize> {
        (0..self.input.world_size)
            .filter(|&r| self.parts[r].is_none())
            .collect()
    }

    fn next_gather_step(&mut self, now: Instant) -> Vec<Action> {
        let missing = self.missing();
        if missing.is_empty() {
            return match self.build_manifest() {
                Ok(m) => {
                    self.phase = Phase::WritingManifest;
                    self.manifest = Some(m.clone());
                    vec![Action::WriteManifest(Box::new(m))]
                }
                Err(e) => self.fail(e),
            };
        }
        if !self.asked {
            // First round: ask for every other part right away.
            self.asked = true;
            self.outstanding = missing.len();
            return vec![Action::ReadParts(missing)];
        }
        if now >= self.deadline && self.settled {
            return self.fail(Error::Timeout {
                what: format!(
                    "step {} attempt {}: ranks {missing:?} say their parts are written, but the \
                     committer cannot read them: do all ranks write to one shared checkpoint location?",
                    self.input.step, self.input.attempt
                ),
            });
        }
        if now >= self.deadline {
            return self.fail(Error::Timeout {
                what: format!(
                    "step {} attempt {}: parts of ranks {missing:?} not written within {:?}",
                    self.input.step, self.input.attempt, self.input.timeout
                ),
            });
        }
        let wait = self.backoff.min(self.deadline - now);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        vec![Action::WaitUntil(now + wait)]
    }

    fn accept(&mut self, rank: usize, part: PartRecord) -> Result<(), Error> {
        let i = &self.input;
        let bad = |reason: String| Error::Conflict {
            what: format!(
                "part of rank {rank} for step {} attempt {}: {reason}",
                i.step, i.attempt
            ),
        };
        if part.step != i.step || part.attempt != i.attempt {
            return Err(bad(format!(
                "names step {} attempt {}",
                part.step, part.attempt
            )));
        }
        if part.rank as usize != rank || part.world_size as usize != i.world_size {
            return Err(bad(format!(
                "says rank {} of {}",
                part.rank, part.world_size
            )));
        }
        let layout = i.plan.layout_digest();
        if part.layout != layout {
            return Err(bad(format!(
                "saved layout {} but the committer saved {layout}: ranks passed different states",
                part.layout
            )));
        }
        let stripe = &self.stripes[rank];
        if part.first_chunk as usize != stripe.start || part.chunks.len() != stripe.len() {
            return Err(bad(format!(
                "holds chunks {}..{} but its stripe is {stripe:?}",
                part.first_chunk,
                part.first_chunk as usize + part.chunks.len()
            )));
        }
        for (c, planned) in part.chunks.iter().zip(&i.plan.chunks[stripe.clone()]) {
            if c.raw_len != planned.len as u64 {
                return Err(bad(format!("chunk {} has the wrong length", c.key)));
            }
            if crate::codec::parse_chunk_key(&c.key).is_none() {
                return Err(bad(format!("{} is not a chunk key", c.key)));
            }
        }
        self.parts[rank] = Some(part);
        Ok(())
    }

    fn build_manifest(&self) -> Result<Manifest, Error> {
        let i = &self.input;
        let refs: Vec<&ChunkRef> = self
            .parts
            .iter()
            .flat_map(|p| p.as_ref().expect("all parts present").chunks.iter())
            .collect();
        let plan = &i.plan;
        let tensors: Vec<TensorEntry> = plan
            .tensors
            .iter()
            .map(|t| TensorEntry {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                raw_len: t.len as u64,
                chunks: refs[t.first_chunk..t.first_chunk + t.chunk_count]
                    .iter()
                    .map(|c| (*c).clone())
                    .collect(),
            })
            .collect();
        let parts = self.parts.iter().flatten();
        let totals = Totals {
            tensors: tensors.len() as u64,
            chunks: refs.len() as u64,
            raw_bytes: plan.total_bytes,
            stored_bytes: refs.iter().map(|c| c.stored_len).sum(),
            uploaded_bytes: parts.map(|p| p.bytes_uploaded).sum(),
        };
        let metrics = i
            .meta
            .metrics
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        Ok(Manifest {
            format_version: FORMAT_VERSION,
            job: i.meta.job.clone(),
            step: i.step,
            attempt: i.attempt.clone(),
            created_at: i.created_at.clone(),
            parent: i.parent.clone(),
            world_size: i.world_size as u32,
            chunk_bytes: plan.chunk_bytes as u64,
            tensors,
            training_state: i.meta.training_state.clone(),
            job_spec: i.meta.job_spec.clone(),
            code_version: i.meta.code_version.clone(),
            dataset_fingerprint: i.meta.dataset_fingerprint.clone(),
            metrics,
            totals,
            compression: self
                .parts
                .iter()
                .flatten()
                .filter_map(|p| p.compression.clone())
                .collect(),
            key: manifest_key(i.step, &i.attempt),
        })
    }

    fn finish(&mut self, latest_moved: bool) -> Vec<Action> {
        self.phase = Phase::Finished;
        vec![Action::Done(Box::new(CommitOutcome {
            manifest: self.manifest.take().expect("manifest built"),
            latest_moved,
            parts: self.parts.iter_mut().filter_map(Option::take).collect(),
        }))]
    }

    fn fail(&mut self, e: Error) -> Vec<Action> {
        self.phase = Phase::Finished;
        vec![Action::Fail(e)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DType, TensorView};

    fn plan(world: usize) -> (Arc<ChunkPlan>, Vec<PartRecord>) {
        let shape = [64usize];
        let data = vec![7u8; 256];
        let views: Vec<TensorView<'_>> = ["a", "b", "c"]
            .iter()
            .map(|n| TensorView {
                name: n,
                dtype: DType::F32,
                shape: &shape,
                data: &data,
            })
            .collect();
        let plan = Arc::new(ChunkPlan::new(&views, 64).unwrap());
        let parts = (0..world)
            .map(|r| {
                let s = plan.stripe(r, world);
                PartRecord {
                    format_version: FORMAT_VERSION,
                    step: 5,
                    attempt: "run".into(),
                    rank: r as u32,
                    world_size: world as u32,
                    layout: plan.layout_digest(),
                    first_chunk: s.start as u64,
                    chunks: plan.chunks[s]
                        .iter()
                        .map(|c| ChunkRef {
                            key: format!("chunks/00/{:064x}.bg4.zst", c.global_offset),
                            raw_len: c.len as u64,
                            stored_len: 10,
                        })
                        .collect(),
                    bytes_uploaded: 10,
                    bytes_reused: 0,
                    chunks_uploaded: 1,
                    chunks_reused: 0,
                    compression: None,
                }
            })
            .collect();
        (plan, parts)
    }

    fn input(plan: Arc<ChunkPlan>, world: usize) -> CommitInput {
        CommitInput {
            step: 5,
            attempt: "run".into(),
            world_size: world,
            plan,
            meta: CheckpointMeta::default(),
            parent: Some("manifests/old.json".into()),
            timeout: Duration::from_secs(10),
            created_at: "now".into(),
        }
    }

    #[test]
    fn gathers_late_parts_then_writes_manifest_then_swaps_latest() {
        let t0 = Instant::now();
        let (plan, mut parts) = plan(3);
        let (mut c, a) = Commit::new(input(plan, 3), parts.remove(0), t0);
        assert!(matches!(&a[..], [Action::ReadParts(r)] if r == &[1, 2]));
        // Rank 1 is there, rank 2 not yet: wait, then ask again for rank 2 only.
        assert!(
            c.on_event(
                Event::PartRead {
                    rank: 1,
                    part: Some(parts.remove(0))
                },
                t0
            )
            .is_empty()
        );
        let a = c.on_event(
            Event::PartRead {
                rank: 2,
                part: None,
            },
            t0,
        );
        assert!(matches!(&a[..], [Action::WaitUntil(_)]));
        let a = c.on_event(Event::Tick, t0 + Duration::from_millis(20));
        assert!(matches!(&a[..], [Action::ReadParts(r)] if r == &[2]));
        let a = c.on_event(
            Event::PartRead {
                rank: 2,
                part: Some(parts.remove(0)),
            },
            t0,
        );
        let [Action::WriteManifest(m)] = &a[..] else {
            panic!("{a:?}")
        };
        assert_eq!(m.tensors.len(), 3);
        assert_eq!(m.totals.chunks, 12);
        assert_eq!(m.totals.uploaded_bytes, 30);
        assert_eq!(m.parent.as_deref(), Some("manifests/old.json"));
        // Chunk refs land in plan order: tensor b's first chunk is global chunk 4.
        assert_eq!(
            m.tensors[1].chunks[0].key,
            format!("chunks/00/{:064x}.bg4.zst", 256)
        );
        let a = c.on_event(Event::ManifestWritten, t0);
        assert!(matches!(&a[..], [Action::ReadLatest]));
        let older = LatestRecord {
            format_version: 1,
            step: 4,
            manifest: "m4".into(),
            attempt: "run".into(),
            parent: None,
            updated_at: String::new(),
        };
        let a = c.on_event(Event::LatestRead(Some(older.clone())), t0);
        assert!(matches!(&a[..], [Action::SwapLatest(r)] if r.step == 5));
        // Lost the race: read again and retry.
        let a = c.on_event(Event::LatestSwapped(false), t0);
        assert!(matches!(&a[..], [Action::ReadLatest]));
        let a = c.on_event(Event::LatestRead(Some(older)), t0);
        assert!(matches!(&a[..], [Action::SwapLatest(_)]));
        let a = c.on_event(Event::LatestSwapped(true), t0);
        assert!(matches!(&a[..], [Action::Done(o)] if o.latest_moved && o.parts.len() == 3));
    }

    #[test]
    fn latest_never_moves_backwards() {
        let t0 = Instant::now();
        let (plan, mut parts) = plan(1);
        let (mut c, a) = Commit::new(input(plan, 1), parts.remove(0), t0);
        assert!(matches!(&a[..], [Action::WriteManifest(_)]));
        c.on_event(Event::ManifestWritten, t0);
        let newer = LatestRecord {
            format_version: 1,
            step: 9,
            manifest: "m9".into(),
            attempt: "other".into(),
            parent: None,
            updated_at: String::new(),
        };
        let a = c.on_event(Event::LatestRead(Some(newer)), t0);
        assert!(
            matches!(&a[..], [Action::Done(o)] if !o.latest_moved),
            "{a:?}"
        );
    }

    #[test]
    fn missing_parts_time_out_naming_the_ranks() {
        let t0 = Instant::now();
        let (plan, mut parts) = plan(3);
        let (mut c, _) = Commit::new(input(plan, 3), parts.remove(0), t0);
        c.on_event(
            Event::PartRead {
                rank: 1,
                part: None,
            },
            t0,
        );
        let mut now = t0;
        let mut a = c.on_event(
            Event::PartRead {
                rank: 2,
                part: None,
            },
            t0,
        );
        let mut waits = 0;
        loop {
            match &a[..] {
                [Action::WaitUntil(t)] => {
                    waits += 1;
                    now = *t;
                    let Action::ReadParts(r) = &c.on_event(Event::Tick, now)[0] else {
                        panic!()
                    };
                    let mut last = vec![];
                    for &rank in r {
                        last = c.on_event(Event::PartRead { rank, part: None }, now);
                    }
                    a = last;
                }
                [Action::Fail(Error::Timeout { what })] => {
                    assert!(what.contains("[1, 2]"), "{what}");
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(now >= t0 + Duration::from_secs(10));
        // Backoff grows: far fewer polls than 10 s / 10 ms.
        assert!(waits < 40, "{waits} waits");
    }

    #[test]
    fn a_rank_whose_save_failed_fails_the_commit_at_once_with_its_cause() {
        let t0 = Instant::now();
        let (plan, mut parts) = plan(3);
        let (mut c, _) = Commit::new(input(plan, 3), parts.remove(0), t0);
        c.on_event(
            Event::PartRead {
                rank: 1,
                part: Some(parts.remove(0)),
            },
            t0,
        );
        // Rank 1's part is here: news of its failure changes nothing.
        let a = c.on_event(
            Event::PeerFailed {
                rank: 1,
                cause: "late".into(),
            },
            t0,
        );
        assert!(a.is_empty(), "{a:?}");
        let a = c.on_event(
            Event::PeerFailed {
                rank: 2,
                cause: "disk full".into(),
            },
            t0,
        );
        assert!(
            matches!(&a[..], [Action::Fail(Error::Conflict { what })]
                if what.contains("rank 2 could not save its part: disk full")),
            "{a:?}"
        );
    }

    #[test]
    fn once_peers_settled_a_missing_part_is_waited_for_only_until_then() {
        let t0 = Instant::now();
        let (plan, mut parts) = plan(2);
        let (mut c, _) = Commit::new(input(plan, 2), parts.remove(0), t0);
        let until = t0 + Duration::from_millis(100);
        assert!(c.on_event(Event::PeersSettled { until }, t0).is_empty());
        let mut a = c.on_event(
            Event::PartRead {
                rank: 1,
                part: None,
            },
            t0,
        );
        let mut now = t0;
        let what = loop {
            match &a[..] {
                [Action::WaitUntil(t)] => {
                    assert!(*t <= until, "waits past the settled deadline");
                    now = *t;
                    c.on_event(Event::Tick, now);
                    a = c.on_event(
                        Event::PartRead {
                            rank: 1,
                            part: None,
                        },
                        now,
                    );
                }
                [Action::Fail(Error::Timeout { what })] => break what.clone(),
                other => panic!("{other:?}"),
            }
        };
        // Well before the 10 s commit timeout.
        assert!(now < t0 + Duration::from_secs(1));
        assert!(what.contains("[1] say their parts are written"), "{what}");
    }

    #[test]
    fn parts_of_a_different_layout_or_stripe_are_refused() {
        let t0 = Instant::now();
        let (plan3, mut parts) = plan(2);
        let mut bad = parts[1].clone();
        bad.layout = "something else".into();
        let (mut c, _) = Commit::new(input(plan3.clone(), 2), parts.remove(0), t0);
        let a = c.on_event(
            Event::PartRead {
                rank: 1,
                part: Some(bad),
            },
            t0,
        );
        assert!(
            matches!(&a[..], [Action::Fail(Error::Conflict { what })] if what.contains("different states")),
            "{a:?}"
        );

        let (_, mut parts) = plan(2);
        let mut short = parts[1].clone();
        short.chunks.pop();
        let (mut c, _) = Commit::new(input(plan3, 2), parts.remove(0), t0);
        let a = c.on_event(
            Event::PartRead {
                rank: 1,
                part: Some(short),
            },
            t0,
        );
        assert!(
            matches!(&a[..], [Action::Fail(Error::Conflict { .. })]),
            "{a:?}"
        );
    }
}
