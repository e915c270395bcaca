//! Events: what happened, where, when, with a kind-specific payload.
//!
//! An [`Event`] serializes as one JSON object:
//!
//! ```json
//! {"id":"0190a6f1-...","kind":"checkpoint.committed","timestamp":"2025-01-02T03:04:05.678Z",
//!  "source":"digits","payload":{"job":"digits","step":400,...}}
//! ```
//!
//! Each kind has a payload struct (implementing [`EventPayload`]) that fixes its
//! fields; [`Event::of`] builds an event from one. [`Event::new`] takes any JSON
//! payload, for kinds this crate does not know yet.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The event kinds kiln emits, as they appear in `kind` and in a hook's `events`.
pub mod kind {
    /// A job's workers started training (first round, or a resume).
    pub const JOB_STARTED: &str = "job.started";
    /// A job completed all its steps.
    pub const JOB_FINISHED: &str = "job.finished";
    /// A job stopped with an error (restart budget spent, bad data, ...).
    pub const JOB_FAILED: &str = "job.failed";
    /// A new rendezvous round was planned (membership changed).
    pub const ROUND_CHANGED: &str = "round.changed";
    /// A node left the job (lease expired or key deleted).
    pub const NODE_LOST: &str = "node.lost";
    /// A checkpoint's manifest was written: the checkpoint exists.
    pub const CHECKPOINT_COMMITTED: &str = "checkpoint.committed";
    /// A model version was added to the registry.
    pub const MODEL_REGISTERED: &str = "model.registered";
    /// A registry alias (`production`, `staging`, ...) now points at another version.
    pub const ALIAS_MOVED: &str = "alias.moved";
    /// A server finished swapping the version it serves under a name.
    pub const VERSION_SWAPPED: &str = "version.swapped";
    /// Served inputs or predictions drifted from the reference profile.
    pub const DRIFT_DETECTED: &str = "drift.detected";

    /// Every kind above, training first, then serving.
    pub const ALL: &[&str] = &[
        JOB_STARTED,
        JOB_FINISHED,
        JOB_FAILED,
        ROUND_CHANGED,
        NODE_LOST,
        CHECKPOINT_COMMITTED,
        MODEL_REGISTERED,
        ALIAS_MOVED,
        VERSION_SWAPPED,
        DRIFT_DETECTED,
    ];
}

/// One occurrence of something a hook may want to hear about.
///
/// Receivers should ignore fields they do not know: new payload fields may
/// appear in later versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per event (a UUIDv7: time-ordered, random low bits). Retries of a
    /// delivery carry the same id, so receivers can drop duplicates.
    pub id: String,
    /// What happened: one of [`kind`]'s constants.
    pub kind: String,
    /// When it happened, RFC 3339 in UTC with milliseconds.
    pub timestamp: String,
    /// Who says so: the job name (training) or the server name (serving).
    pub source: String,
    /// Kind-specific fields (see the payload structs of this module).
    pub payload: serde_json::Value,
}

impl Event {
    /// An event of any kind, stamped now with a fresh id.
    pub fn new(
        kind: impl Into<String>,
        source: impl Into<String>,
        payload: serde_json::Value,
    ) -> Event {
        Event {
            id: new_event_id(),
            kind: kind.into(),
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            source: source.into(),
            payload,
        }
    }

    /// An event of `P`'s kind whose payload is `payload`.
    pub fn of<P: EventPayload>(source: impl Into<String>, payload: &P) -> Event {
        // Payload structs hold strings, numbers, options, vectors and string-keyed
        // maps only, which always serialize.
        let value = serde_json::to_value(payload).expect("an event payload serializes to json");
        Event::new(P::KIND, source, value)
    }

    /// The payload as `P`, if the event is of `P`'s kind and the fields fit.
    pub fn payload_as<P: EventPayload + for<'de> Deserialize<'de>>(&self) -> Option<P> {
        if self.kind != P::KIND {
            return None;
        }
        serde_json::from_value(self.payload.clone()).ok()
    }

    /// The event as the JSON object webhooks and commands receive.
    pub fn to_json(&self) -> String {
        // A struct of strings and a `serde_json::Value` always serializes.
        serde_json::to_string(self).expect("an event serializes to json")
    }
}

/// A payload struct: fixes the fields of one event kind.
pub trait EventPayload: Serialize {
    /// The kind of the events that carry this payload.
    const KIND: &'static str;
}

/// A UUIDv7 string: 48 bits of Unix milliseconds, version and variant bits,
/// 74 random bits. Time-ordered, so ids sort roughly by emission.
fn new_event_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        & 0xFFFF_FFFF_FFFF;
    let random = fastrand::u128(..);
    let mut value = (u128::from(millis) << 80) | (random & ((1u128 << 80) - 1));
    // Version 7 in bits 76..80, variant 0b10 in bits 62..64.
    value = (value & !(0xF << 76)) | (0x7 << 76);
    value = (value & !(0x3 << 62)) | (0x2 << 62);
    let hex = format!("{value:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

macro_rules! payload_kind {
    ($type:ty, $kind:expr) => {
        impl EventPayload for $type {
            const KIND: &'static str = $kind;
        }
    };
}

/// `job.started`: the first round of a job (or of a resumed job) is running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStarted {
    /// Job name.
    pub job: String,
    /// Rendezvous round the workers started in.
    pub round: u64,
    /// Ranks in that round.
    pub world_size: u32,
    /// Step training starts from (0, or the step of the resumed checkpoint).
    pub step: u64,
    /// The checkpoint resumed from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<String>,
}
payload_kind!(JobStarted, kind::JOB_STARTED);

/// `job.finished`: every step is done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFinished {
    /// Job name.
    pub job: String,
    /// Last completed step.
    pub step: u64,
    /// Wall-clock seconds from start to finish.
    pub elapsed_secs: f64,
    /// The final checkpoint, if one was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// Final metrics (`loss`, `eval_accuracy`, ...).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}
payload_kind!(JobFinished, kind::JOB_FINISHED);

impl JobFinished {
    /// The event for a job whose rank 0 finished with `rank0`, `elapsed_secs`
    /// after it started: its steps, final checkpoint and held-out metrics.
    pub fn from_rank0(job: &str, rank0: &kiln_proto::worker::Finished, elapsed_secs: f64) -> Self {
        JobFinished {
            job: job.to_string(),
            step: rank0.steps,
            elapsed_secs,
            checkpoint: (!rank0.checkpoint_url.is_empty()).then(|| rank0.checkpoint_url.clone()),
            metrics: rank0.eval.clone().into_iter().collect(),
        }
    }
}

/// `job.failed`: the job stopped without finishing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFailed {
    /// Job name.
    pub job: String,
    /// The error, as the CLI would print it.
    pub error: String,
    /// Last completed step, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Round the job was in, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
}
payload_kind!(JobFailed, kind::JOB_FAILED);

impl JobFailed {
    /// The event for a job that failed with `error` (as the CLI prints it,
    /// `{:#}`) in `round`.
    pub fn in_round(job: &str, error: String, round: u64) -> Self {
        JobFailed {
            job: job.to_string(),
            error,
            step: None,
            round: Some(round),
        }
    }
}

/// `round.changed`: a new rendezvous round was planned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundChanged {
    /// Job name.
    pub job: String,
    /// The new round (the fencing token).
    pub round: u64,
    /// The previous round, if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_round: Option<u64>,
    /// Ranks in the new round.
    pub world_size: u32,
    /// Member nodes, sorted.
    pub nodes: Vec<String>,
    /// Why the round changed (`node joined`, `node lost`, `worker failed`, ...).
    pub reason: String,
}
payload_kind!(RoundChanged, kind::ROUND_CHANGED);

/// `node.lost`: a node left the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeLost {
    /// Job name.
    pub job: String,
    /// The node that left.
    pub node: String,
    /// The round it was a member of.
    pub round: u64,
    /// How the loss was seen (`lease expired`, `key deleted`, ...).
    pub reason: String,
}
payload_kind!(NodeLost, kind::NODE_LOST);

/// `checkpoint.committed`: a checkpoint's manifest is written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointCommitted {
    /// Job name.
    pub job: String,
    /// Training step the checkpoint holds.
    pub step: u64,
    /// Where the checkpoint lives (its manifest's location).
    pub location: String,
    /// World size that wrote it.
    pub world_size: u32,
    /// Bytes before compression.
    pub raw_bytes: u64,
    /// Bytes uploaded by this save (unchanged chunks are not uploaded again).
    pub uploaded_bytes: u64,
    /// Seconds from the start of the save to the commit.
    pub elapsed_secs: f64,
}
payload_kind!(CheckpointCommitted, kind::CHECKPOINT_COMMITTED);

impl CheckpointCommitted {
    /// The event for the save a worker reported, `saved`, by a round of
    /// `world_size` ranks.
    pub fn from_saved(
        job: &str,
        world_size: u32,
        saved: &kiln_proto::worker::CheckpointSaved,
    ) -> Self {
        CheckpointCommitted {
            job: job.to_string(),
            step: saved.step,
            location: saved.url.clone(),
            world_size,
            raw_bytes: saved.bytes_uploaded + saved.bytes_reused,
            uploaded_bytes: saved.bytes_uploaded,
            elapsed_secs: saved.durable_seconds,
        }
    }
}

/// `model.registered`: a registry version was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRegistered {
    /// Registered model name.
    pub model: String,
    /// The new version number.
    pub version: u64,
    /// The checkpoint the version holds.
    pub checkpoint: String,
    /// The job that produced it, if a job registered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Metrics recorded with the version.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}
payload_kind!(ModelRegistered, kind::MODEL_REGISTERED);

/// `alias.moved`: an alias points at another version (promotion or rollback).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasMoved {
    /// Registered model name.
    pub model: String,
    /// The alias (`production`, `staging`, ...).
    pub alias: String,
    /// Version it pointed at before, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<u64>,
    /// Version it points at now.
    pub to_version: u64,
}
payload_kind!(AliasMoved, kind::ALIAS_MOVED);

/// `version.swapped`: a server now answers with another version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionSwapped {
    /// Name the model is served under.
    pub model: String,
    /// The alias the server follows, if it follows one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Version served before, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<u64>,
    /// Version served now.
    pub to_version: u64,
    /// Seconds spent loading and warming the new version.
    pub load_secs: f64,
}
payload_kind!(VersionSwapped, kind::VERSION_SWAPPED);

/// `drift.detected`: a drift statistic crossed its threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftDetected {
    /// Name the model is served under.
    pub model: String,
    /// Version being served.
    pub version: u64,
    /// What drifted: an input feature (`input[3]`) or `prediction`.
    pub feature: String,
    /// The statistic (`psi`, `ks`, ...).
    pub statistic: String,
    /// Its value over the window.
    pub score: f64,
    /// The threshold it crossed.
    pub threshold: f64,
    /// Requests (rows) in the window.
    pub window_rows: u64,
}
payload_kind!(DriftDetected, kind::DRIFT_DETECTED);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_serializes_as_one_object_with_the_documented_fields() {
        let event = Event::of(
            "digits",
            &NodeLost {
                job: "digits".into(),
                node: "n2".into(),
                round: 3,
                reason: "lease expired".into(),
            },
        );
        let value: serde_json::Value = serde_json::from_str(&event.to_json()).unwrap();
        let object = value.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["id", "kind", "payload", "source", "timestamp"]);
        assert_eq!(object["kind"], "node.lost");
        assert_eq!(object["source"], "digits");
        assert_eq!(object["payload"]["node"], "n2");
        assert_eq!(object["payload"]["round"], 3);
        let parsed = chrono::DateTime::parse_from_rfc3339(object["timestamp"].as_str().unwrap())
            .expect("timestamp is rfc 3339");
        assert_eq!(parsed.offset().local_minus_utc(), 0);
        assert!(object["timestamp"].as_str().unwrap().ends_with('Z'));
        let back: Event = serde_json::from_value(value).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.payload_as::<NodeLost>().unwrap().node, "n2");
        assert!(back.payload_as::<JobFailed>().is_none());
    }

    #[test]
    fn ids_are_uuid_v7_and_unique() {
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| new_event_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(50) {
            assert_eq!(id.len(), 36);
            let groups: Vec<&str> = id.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(groups[2].starts_with('7'), "version nibble in {id}");
            assert!(
                matches!(&groups[3][..1], "8" | "9" | "a" | "b"),
                "variant bits in {id}"
            );
        }
    }

    #[test]
    fn every_kind_constant_has_a_payload_type() {
        let kinds = [
            JobStarted::KIND,
            JobFinished::KIND,
            JobFailed::KIND,
            RoundChanged::KIND,
            NodeLost::KIND,
            CheckpointCommitted::KIND,
            ModelRegistered::KIND,
            AliasMoved::KIND,
            VersionSwapped::KIND,
            DriftDetected::KIND,
        ];
        assert_eq!(kinds, kind::ALL);
    }
}
