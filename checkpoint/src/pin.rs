//! Pins: what keeps a registered checkpoint from retention and gc, and the
//! markers that order a registration against a collection in progress.
//!
//! ```text
//! pins/{step:020}-{registration_id}.json   one per registered version
//! gc/{id}.json                             one per collection in progress
//! ```
//!
//! A pin lives under the checkpoint root it protects, so whoever collects
//! that root sees it, whichever registry wrote it. Its key carries the step,
//! so even a pin that cannot be parsed still protects its step. A pin keeps
//! every manifest of its step: a model version names a step, and serving
//! finds the checkpoint by that step.
//!
//! # Registration against a concurrent collection
//!
//! [`pin_checkpoint`] writes the pin, then waits while a collection marker
//! is present, then checks that a manifest of the step still exists; only
//! then does the registry write the version record. A collection
//! (`Collection::begin`) writes its marker before it lists anything and
//! reads the pins after listing the manifests. Either the collection read
//! the pins after the pin was written (it keeps the step), or it started
//! before the pin was written, so its marker was there when the registration
//! looked and the registration waited for it to end, and then found the
//! manifest or refused. A marker a crashed collection left behind is ignored
//! once it is older than [`STALE_COLLECTION`], or at once where its writer
//! is known to be gone: written on this host, since this boot, in this pid
//! namespace, by a pid no process has now (a training job SIGKILLed during
//! its retention pass would otherwise hold registrations for an hour).

use std::time::Duration;

use bytes::Bytes;
use object_store::PutMode;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manifest::now_rfc3339;
use crate::store::CheckpointRoot;

/// The folder of the pins under a checkpoint root.
pub const PINS_PREFIX: &str = "pins";
/// The folder of the markers of collections in progress.
pub const COLLECTIONS_PREFIX: &str = "gc";
/// The format of pin records this build writes and the newest it reads.
pub const PIN_FORMAT_VERSION: u32 = 1;
/// A collection marker older than this belongs to a collection that died:
/// registrations stop waiting for it.
pub const STALE_COLLECTION: Duration = Duration::from_secs(3600);
/// How long a registration waits for collections in progress to end.
pub const COLLECTION_WAIT: Duration = Duration::from_secs(300);

/// A registered version's claim on a checkpoint step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    /// [`PIN_FORMAT_VERSION`] when written; a newer one is refused.
    pub format_version: u32,
    /// The pinned step: every manifest of this step is kept.
    pub step: u64,
    /// The registry that holds the version (its URL as the registry opened it).
    pub registry: String,
    /// The model the version belongs to.
    pub model: String,
    /// The version number; while a registration races for a number, the one
    /// it is trying.
    pub version: u64,
    /// The version record's `registration_id`: what ties the pin to exactly
    /// one registration, so deleting the version releases exactly this pin.
    pub registration_id: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// The actor that registered the version.
    pub created_by: String,
}

/// One pin found under a root: its key, the step its key names, and the
/// record (`None` with a reason when it could not be read).
#[derive(Serialize, Clone, Debug)]
pub struct FoundPin {
    /// The pin's key (`pins/{step:020}-{registration_id}.json`).
    pub key: String,
    /// The step the key names: what the pin keeps, readable or not.
    pub step: u64,
    /// The record, when it could be read.
    pub pin: Option<Pin>,
    /// Why the record could not be read; the step is kept all the same.
    pub unreadable: Option<String>,
}

impl Pin {
    /// A pin of `step` for a version of `model` in `registry`.
    pub fn new(
        step: u64,
        registry: &str,
        model: &str,
        version: u64,
        registration_id: &str,
        actor: &str,
    ) -> Pin {
        Pin {
            format_version: PIN_FORMAT_VERSION,
            step,
            registry: registry.to_string(),
            model: model.to_string(),
            version,
            registration_id: registration_id.to_string(),
            created_at: now_rfc3339(),
            created_by: actor.to_string(),
        }
    }

    /// Where this pin is stored under its checkpoint root.
    pub fn key(&self) -> Result<String> {
        pin_key(self.step, &self.registration_id)
    }

    fn from_json(key: &str, bytes: &[u8]) -> Result<Pin> {
        crate::manifest::decode_versioned("pin", key, bytes, PIN_FORMAT_VERSION)
    }
}

/// `pins/{step:020}-{registration_id}.json`; the id is 1-128 characters of
/// `[A-Za-z0-9_-]`.
pub fn pin_key(step: u64, registration_id: &str) -> Result<String> {
    let ok = (1..=128).contains(&registration_id.len())
        && registration_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(Error::invalid(format!(
            "registration id {registration_id:?}: 1-128 characters of [A-Za-z0-9_-]"
        )));
    }
    Ok(format!("{PINS_PREFIX}/{step:020}-{registration_id}.json"))
}

/// The step a pin's key names, if `key` is a pin's key.
pub fn pin_key_step(key: &str) -> Option<u64> {
    let name = key
        .strip_prefix(PINS_PREFIX)?
        .strip_prefix('/')?
        .strip_suffix(".json")?;
    let (step, id) = name.split_once('-')?;
    (step.len() == 20 && step.bytes().all(|b| b.is_ascii_digit()) && !id.is_empty())
        .then(|| step.parse().ok())
        .flatten()
}

/// Writes (or rewrites) `pin` under `root`.
pub async fn write_pin(root: &CheckpointRoot, pin: &Pin) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(pin).expect("pins serialize");
    root.put(&pin.key()?, Bytes::from(bytes), PutMode::Overwrite)
        .await
}

/// Deletes the pin of `registration_id` at `step`; a missing pin is not an
/// error (a retried release, or a version registered before pins existed).
pub async fn release_pin(root: &CheckpointRoot, step: u64, registration_id: &str) -> Result<()> {
    root.delete(&pin_key(step, registration_id)?).await
}

/// Every pin under `root`, sorted by key.
pub async fn list_pins(root: &CheckpointRoot) -> Result<Vec<FoundPin>> {
    let mut found = Vec::new();
    for o in root.list(PINS_PREFIX).await? {
        let Some(step) = pin_key_step(&o.key) else {
            tracing::warn!(key = %o.key, "not a pin's key; ignored");
            continue;
        };
        let (pin, unreadable) = match root.get_opt(&o.key).await? {
            // Released since the listing.
            None => continue,
            Some(bytes) => match Pin::from_json(&o.key, &bytes) {
                Ok(p) if p.step == step => (Some(p), None),
                Ok(p) => (
                    None,
                    Some(format!(
                        "its key names step {step}, it holds step {}",
                        p.step
                    )),
                ),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        found.push(FoundPin {
            key: o.key,
            step,
            pin,
            unreadable,
        });
    }
    found.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(found)
}

/// Pins `pin.step` for a registration (see the module docs): writes the pin,
/// waits for collections in progress, then checks that a manifest of the
/// step exists. On failure the pin is released again and the error says
/// why; on success the caller may make the version visible.
pub async fn pin_checkpoint(root: &CheckpointRoot, pin: &Pin) -> Result<()> {
    write_pin(root, pin).await?;
    let checked = async {
        wait_for_collections(root, COLLECTION_WAIT).await?;
        if !step_exists(root, pin.step).await? {
            return Err(Error::NotFound {
                what: format!("a checkpoint of step {} under {}", pin.step, root.url()),
            });
        }
        Ok(())
    }
    .await;
    if let Err(e) = checked {
        if let Err(release) = release_pin(root, pin.step, &pin.registration_id).await {
            tracing::warn!(error = %release, step = pin.step, "release the pin of a failed registration");
        }
        return Err(e);
    }
    Ok(())
}

/// Whether a manifest of `step` exists under `root` (lists `manifests`).
pub async fn step_exists(root: &CheckpointRoot, step: u64) -> Result<bool> {
    let prefix = format!("manifests/{step:020}-");
    Ok(root
        .list("manifests")
        .await?
        .iter()
        .any(|o| o.key.starts_with(&prefix)))
}

/// What a collection in progress writes under `gc/`.
#[derive(Serialize, Deserialize, Debug)]
struct CollectionMarker {
    started_at: String,
    host: String,
    pid: u32,
    /// The writer's boot (`/proc/sys/kernel/random/boot_id`) and pid
    /// namespace: with `host`, they say whether `pid` can be looked up here.
    /// Empty in markers of older builds.
    #[serde(default)]
    boot_id: String,
    #[serde(default)]
    pid_namespace: String,
}

impl CollectionMarker {
    fn new() -> CollectionMarker {
        CollectionMarker {
            started_at: now_rfc3339(),
            host: hostname(),
            pid: std::process::id(),
            boot_id: boot_id(),
            pid_namespace: pid_namespace(),
        }
    }

    /// Whether the process that wrote it is known to be gone: it ran on this
    /// host (`here`: a marker of this process), since this boot, in this pid
    /// namespace, and no process has its pid now (a gc killed mid-way, e.g.
    /// with its training job). Anything less certain counts as alive, and
    /// only age makes it stale.
    fn writer_is_gone(&self, here: &CollectionMarker) -> bool {
        !self.boot_id.is_empty()
            && !self.pid_namespace.is_empty()
            && self.host == here.host
            && self.boot_id == here.boot_id
            && self.pid_namespace == here.pid_namespace
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// A collection in progress, announced by its marker; [`Collection::end`]
/// removes it.
pub(crate) struct Collection {
    root: CheckpointRoot,
    key: String,
}

impl Collection {
    /// Writes the marker; call before listing anything.
    pub(crate) async fn begin(root: &CheckpointRoot) -> Result<Collection> {
        let key = format!("{COLLECTIONS_PREFIX}/{}.json", crate::registry::unique_id());
        let bytes = serde_json::to_vec(&CollectionMarker::new()).expect("markers serialize");
        root.put(&key, Bytes::from(bytes), PutMode::Create).await?;
        Ok(Collection {
            root: root.clone(),
            key,
        })
    }

    /// Removes the marker (logged, not returned, when that fails: the
    /// collection itself is done, and a stale marker only delays
    /// registrations until it is old).
    pub(crate) async fn end(self) {
        if let Err(e) = self.root.delete(&self.key).await {
            tracing::warn!(marker = %self.key, error = %e, "remove the gc marker");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// This process's pid namespace, as `/proc/self/ns/pid` names it
/// (`pid:[4026531836]`).
fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Waits until no live collection marker is under `root`: each either
/// disappears, is older than [`STALE_COLLECTION`], or was written by a
/// process of this machine that no longer exists. Past `patience`, a
/// [`Error::Conflict`] naming the collections.
pub async fn wait_for_collections(root: &CheckpointRoot, patience: Duration) -> Result<()> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    let here = CollectionMarker::new();
    loop {
        let stale_before = chrono::Utc::now()
            - chrono::Duration::from_std(STALE_COLLECTION).expect("an hour fits");
        let mut live = Vec::new();
        for o in root.list(COLLECTIONS_PREFIX).await? {
            if o.last_modified < stale_before {
                tracing::warn!(marker = %o.key, "ignoring the marker of a gc that started over an hour ago (it died?)");
                continue;
            }
            let marker = match root.get_opt(&o.key).await? {
                Some(b) => serde_json::from_slice::<CollectionMarker>(&b).ok(),
                None => continue, // ended meanwhile
            };
            if marker.as_ref().is_some_and(|m| m.writer_is_gone(&here)) {
                tracing::warn!(marker = %o.key, "ignoring the marker of a gc whose process is gone");
                continue;
            }
            live.push((o, marker));
        }
        if live.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= patience {
            let running: Vec<String> = live
                .iter()
                .map(|(o, marker)| match marker {
                    Some(m) => format!(
                        "{} (started {} on {} by pid {})",
                        o.key, m.started_at, m.host, m.pid
                    ),
                    None => o.key.clone(),
                })
                .collect();
            return Err(Error::Conflict {
                what: format!(
                    "gc has been running under {} for over {}s: {}; retry when it has finished (a marker older than an hour is ignored)",
                    root.url(),
                    patience.as_secs(),
                    running.join(", ")
                ),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_is_dead_only_when_its_process_is_known_gone() {
        let mine = CollectionMarker::new();
        assert!(!mine.boot_id.is_empty() && !mine.pid_namespace.is_empty());
        assert!(!mine.writer_is_gone(&mine), "this process is alive");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = CollectionMarker {
            pid,
            ..CollectionMarker::new()
        };
        assert!(gone.writer_is_gone(&mine), "pid {pid} exited");
        // Anything that makes the pid meaningless here counts as alive.
        for other in [
            CollectionMarker {
                host: "elsewhere".into(),
                pid,
                ..CollectionMarker::new()
            },
            CollectionMarker {
                boot_id: "an-earlier-boot".into(),
                pid,
                ..CollectionMarker::new()
            },
            CollectionMarker {
                pid_namespace: "pid:[1]".into(),
                pid,
                ..CollectionMarker::new()
            },
            CollectionMarker {
                boot_id: String::new(),
                pid_namespace: String::new(),
                pid,
                ..CollectionMarker::new()
            },
        ] {
            assert!(!other.writer_is_gone(&mine), "{other:?}");
        }
        // A marker of an older build (no boot or namespace) still parses.
        let old: CollectionMarker =
            serde_json::from_str(r#"{"started_at":"x","host":"h","pid":1}"#).unwrap();
        assert!(!old.writer_is_gone(&mine));
    }

    #[test]
    fn pin_keys_carry_the_step_and_refuse_bad_ids() {
        let key = pin_key(100, "ab12").unwrap();
        assert_eq!(key, "pins/00000000000000000100-ab12.json");
        assert_eq!(pin_key_step(&key), Some(100));
        assert_eq!(pin_key_step("pins/100-ab.json"), None);
        assert_eq!(pin_key_step("manifests/00000000000000000100-a.json"), None);
        for bad in ["", "a/b", "../x", "a.b"] {
            assert!(pin_key(1, bad).is_err(), "{bad:?}");
        }
    }
}
