//! The model registry: a catalog of trained models in object storage, next to
//! the checkpoints it points at.
//!
//! A registry is a URL of the same forms as a checkpoint root (`file:///abs`,
//! `/abs`, `s3://bucket/prefix`, `gs://`, `az://`, `memory://`) and uses the
//! same [`CheckpointRoot`] primitives: create-only puts and compare-and-swap.
//! It never stores weights: a version names a checkpoint (root URL, step and
//! weights digest), and the server loads the weights from there.
//!
//! # Layout
//!
//! ```text
//! models/{name}/versions/{version:020}.json   immutable, created with a create-only put
//! models/{name}/aliases/{alias}.json          moved by compare-and-swap
//! models/{name}/history/{seq:020}.json        audit log: one create-only object per entry
//! models/{name}/deleted/{version:020}.json    tombstone of a deleted version (see `delete.rs`)
//! models/{name}/blobs/{sha256}.profile.json   reference data profile (content-addressed)
//! models/{name}/blobs/{sha256}.torchscript.pt TorchScript module bytes (content-addressed)
//! models/{name}/blobs/{sha256}.tokenizer.json a language model's tokenizer (content-addressed)
//! ```
//!
//! Every record is JSON with a `format_version`; a newer version than this
//! build reads is refused, not misread. Version records of classifiers are
//! written at format 1, as before; those of language models at format 2
//! (their `model.task`, signature and tokenizer mean something a format-1
//! reader would misread as a classifier), so an older build refuses them.
//!
//! # Version numbers
//!
//! [`Registry::register`] first writes the blobs (content-addressed, so a
//! crash leaves at most an unreferenced blob, never a version pointing at a
//! missing one), then lists the model's versions and tries to create
//! `versions/{max+1}` with a create-only put. The put that loses a race finds
//! the object already there and tries the next number, so two concurrent
//! registrations never share a number and numbers have no gaps. Each record
//! carries a `registration_id` unique to the attempt: a put retried after a
//! lost response finds its own bytes in place and counts as the win, and no
//! other registration can ever match them.
//!
//! # Pins
//!
//! Before the version record is created, registration writes a pin under
//! the checkpoint's root (`pins/{step:020}-{registration_id}.json`,
//! [`crate::pin`]) and checks that the checkpoint is still there; retention
//! and gc keep every checkpoint of a pinned step. [`Registry::delete_version`]
//! releases the pin. Numbers of deleted versions are never reused.
//!
//! # Aliases
//!
//! An alias (`production`, `staging`, ...) holds weighted targets that sum to
//! 100, the targets it had before (`previous`, for [`Registry::rollback`]),
//! and a `generation` that grows by one with every move. [`Registry::set_alias`]
//! is a compare-and-swap against the generation the caller read;
//! [`Registry::promote`] reads, computes and swaps in a retry loop;
//! [`Registry::rollback`] swaps once and reports a [`Error::Conflict`] when the
//! alias moved in between (rolling back someone else's move is not what the
//! caller asked for).
//!
//! # Audit log
//!
//! Registrations, deletions and alias moves append an entry with the next sequence
//! number, again with a create-only put (a lost race tries the next number),
//! never by rewriting one log object. Entries are appended after the action
//! succeeded: a writer that dies in between leaves the action without its
//! entry (the alias's `previous` and the version records remain), never an
//! entry without its action. Concurrent actions are logged in the order their
//! appends won.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::PutMode;
use sha2::{Digest, Sha256};

mod delete;
mod records;
mod types;
mod validate;

pub use delete::DeletedVersion;
pub use types::{
    Alias, AliasTarget, AuditEntry, CheckpointRef, Lineage, ModelDefinition, ModelParts, ModelTask,
    ModelVersion, NewVersion, Pick, Selector, Signature, TensorSignature, TrainedBy, spec_hash,
};

pub(crate) use records::unique_id;
use records::{
    BlobRef, StoredAlias, StoredAudit, StoredVersion, alias_key, aliases_prefix, decode,
    deleted_key, deleted_prefix, encode, history_key, history_prefix, numbered, show_targets,
    targets_json, version_key, versions_prefix,
};
use validate::{validate_actor, validate_new, validate_segment, validate_targets};

use crate::error::{Error, Result};
use crate::manifest::now_rfc3339;
use crate::pin::{self, Pin};
use crate::store::{CheckpointRoot, Versioned};

/// The newest version of the registry's records this build reads.
pub const REGISTRY_FORMAT_VERSION: u32 = 2;
/// The format of aliases, audit entries and classifier versions: unchanged
/// since format 1, so that builds that read only format 1 still read them.
const BASE_FORMAT_VERSION: u32 = 1;
/// The format of a language model's version record (`model.task`,
/// a token signature, a tokenizer blob).
const LANGUAGE_MODEL_FORMAT_VERSION: u32 = 2;

/// Reads in flight when a command reads many records.
const READ_CONCURRENCY: usize = 16;
/// Lost create-only races before a registration or an audit append gives up:
/// each loss means someone else took the number, so a streak this long means
/// something is wrong with the store.
const MAX_LOST_CLAIMS: u32 = 10_000;
/// Lost compare-and-swaps before [`Registry::promote`] gives up.
const MAX_PROMOTE_ATTEMPTS: u32 = 64;
/// Blobs larger than this are uploaded in parts.
const BLOB_MULTIPART_THRESHOLD: usize = 32 << 20;
const BLOB_PART_BYTES: usize = 16 << 20;

/// The datatypes of the Open Inference Protocol v2 a signature may name.
const OIP_DATATYPES: &[&str] = &[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
    "BF16", "FP32", "FP64", "BYTES",
];

// ----- the registry -----

/// A model registry over one object-store location. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Registry {
    root: CheckpointRoot,
}

impl Registry {
    /// Opens the registry at `url` (cloud configuration from the environment,
    /// as for checkpoint roots). Nothing is written until something is registered.
    pub async fn open(url: &str) -> Result<Registry> {
        Ok(Self::from_root(CheckpointRoot::open(url)?))
    }

    /// A registry over an already opened root (explicit store options, fault
    /// injection).
    pub fn from_root(root: CheckpointRoot) -> Registry {
        Registry { root }
    }

    /// The registry's URL.
    pub fn url(&self) -> &str {
        self.root.url()
    }

    /// Registers a new version of model `name`: writes its blobs, claims the
    /// next version number with a create-only put (losing a race moves on to
    /// the next number), and appends an audit entry.
    pub async fn register(&self, name: &str, new: NewVersion, actor: &str) -> Result<ModelVersion> {
        validate_segment("model name", name)?;
        validate_actor(actor)?;
        validate_new(&new)?;
        let reference_profile = match &new.reference_profile {
            Some(b) => Some(self.put_blob(name, "profile.json", b).await?),
            None => None,
        };
        let torchscript = match &new.torchscript {
            Some(b) => Some(self.put_blob(name, "torchscript.pt", b).await?),
            None => None,
        };
        let tokenizer = match &new.tokenizer {
            Some(b) => Some(self.put_blob(name, "tokenizer.json", b).await?),
            None => None,
        };
        let format_version = if new.model.is_language_model() {
            LANGUAGE_MODEL_FORMAT_VERSION
        } else {
            BASE_FORMAT_VERSION
        };
        let registration_id = unique_id();
        let number = self.next_number(name).await?;
        // The pin goes first, so that no gc of the checkpoint's root can
        // delete what a visible version names (crate::pin).
        let checkpoint_root = CheckpointRoot::open(&new.checkpoint.root)?;
        let mut pin = Pin::new(
            new.checkpoint.step,
            self.url(),
            name,
            number,
            &registration_id,
            actor,
        );
        pin::pin_checkpoint(&checkpoint_root, &pin)
            .await
            .map_err(|e| match e {
                Error::NotFound { what } => Error::NotFound {
                    what: format!("{what} (to register as a version of model {name})"),
                },
                e => e,
            })?;
        let mut record = StoredVersion {
            format_version,
            version: ModelVersion {
                name: name.to_string(),
                version: number,
                created_at: now_rfc3339(),
                created_by: actor.to_string(),
                has_reference_profile: reference_profile.is_some(),
                has_torchscript: torchscript.is_some(),
                has_tokenizer: tokenizer.is_some(),
                checkpoint: new.checkpoint,
                model: new.model,
                signature: new.signature,
                metrics: new.metrics,
                lineage: new.lineage,
            },
            reference_profile,
            torchscript,
            tokenizer,
            registration_id,
        };
        if let Err(e) = self
            .claim_number(&mut record, &checkpoint_root, &mut pin)
            .await
        {
            if let Err(release) =
                pin::release_pin(&checkpoint_root, pin.step, &pin.registration_id).await
            {
                tracing::warn!(error = %release, model = name, "release the pin of a failed registration");
            }
            return Err(e);
        }
        let version = record.version;
        tracing::info!(
            model = name,
            version = version.version,
            actor,
            "model version registered"
        );
        let to = serde_json::json!({
            "version": version.version,
            "checkpoint": version.checkpoint,
            "metrics": version.metrics,
        });
        self.audit(name, actor, "register", None, None, to).await;
        Ok(version)
    }

    /// One version; [`Error::NotFound`] naming it if it does not exist.
    pub async fn version(&self, name: &str, version: u64) -> Result<ModelVersion> {
        Ok(self.stored_version(name, version).await?.version)
    }

    /// The highest-numbered version, if any.
    pub async fn latest(&self, name: &str) -> Result<Option<ModelVersion>> {
        validate_segment("model name", name)?;
        match self.last_number(&versions_prefix(name)).await? {
            0 => Ok(None),
            v => self.version(name, v).await.map(Some),
        }
    }

    /// The names of the registered models, sorted.
    pub async fn models(&self) -> Result<Vec<String>> {
        let mut names = self.root.list_children("models").await?;
        names.retain(|n| validate_segment("model name", n).is_ok());
        Ok(names)
    }

    /// Every version of a model, oldest first (empty when it has none).
    pub async fn versions(&self, name: &str) -> Result<Vec<ModelVersion>> {
        validate_segment("model name", name)?;
        let numbers = self.numbers(&versions_prefix(name)).await?;
        futures::stream::iter(numbers)
            .map(|v| self.version(name, v))
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await
    }

    /// One alias, if it exists.
    pub async fn alias(&self, name: &str, alias: &str) -> Result<Option<Alias>> {
        Ok(self.read_alias(name, alias).await?.map(|(a, _)| a))
    }

    /// Every alias of a model, sorted by alias.
    pub async fn aliases(&self, name: &str) -> Result<Vec<Alias>> {
        validate_segment("model name", name)?;
        let prefix = aliases_prefix(name);
        let mut names: Vec<String> = self
            .root
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let alias = o.key.strip_prefix(&prefix)?.strip_prefix('/')?;
                let alias = alias.strip_suffix(".json")?;
                validate_segment("alias", alias).ok()?;
                Some(alias.to_string())
            })
            .collect();
        names.sort();
        let found: Vec<Option<Alias>> = futures::stream::iter(names)
            .map(|a| async move { self.alias(name, &a).await })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// Points `alias` at `targets` if it is still what the caller read:
    /// `expected` `None` means it must not exist yet, otherwise its
    /// `generation` must be unchanged. A lost race is an [`Error::Conflict`]
    /// saying the alias moved. Every target version must exist; weights are
    /// 1-100 and sum to 100. The old targets become `previous`.
    pub async fn set_alias(
        &self,
        name: &str,
        alias: &str,
        targets: Vec<AliasTarget>,
        expected: Option<&Alias>,
        actor: &str,
    ) -> Result<Alias> {
        validate_segment("model name", name)?;
        validate_segment("alias", alias)?;
        validate_actor(actor)?;
        validate_targets(&targets)?;
        for t in &targets {
            self.stored_version(name, t.version).await?;
        }
        let current = self.read_alias(name, alias).await?;
        let moved = |found: String| Error::Conflict {
            what: format!("alias {alias} of model {name} moved: {found}; read it again and retry"),
        };
        match (expected, &current) {
            (None, None) => {}
            (None, Some((cur, _))) => {
                return Err(moved(format!(
                    "expected it not to exist, but {} set it to [{}] at {} (generation {})",
                    cur.updated_by,
                    show_targets(&cur.targets),
                    cur.updated_at,
                    cur.generation
                )));
            }
            (Some(exp), None) => {
                return Err(moved(format!(
                    "expected generation {}, but it no longer exists",
                    exp.generation
                )));
            }
            (Some(exp), Some((cur, _))) if exp.generation != cur.generation => {
                return Err(moved(format!(
                    "expected generation {}, found generation {} ([{}], set by {} at {})",
                    exp.generation,
                    cur.generation,
                    show_targets(&cur.targets),
                    cur.updated_by,
                    cur.updated_at
                )));
            }
            (Some(_), Some(_)) => {}
        }
        let new = Alias {
            model: name.to_string(),
            alias: alias.to_string(),
            targets,
            previous: current.as_ref().map(|(c, _)| c.targets.clone()),
            generation: current.as_ref().map_or(1, |(c, _)| c.generation + 1),
            updated_at: now_rfc3339(),
            updated_by: actor.to_string(),
        };
        let record = StoredAlias {
            format_version: BASE_FORMAT_VERSION,
            alias: new,
            write_id: unique_id(),
        };
        let swapped = self
            .root
            .compare_and_swap(
                &alias_key(name, alias),
                current.as_ref().map(|(_, v)| v),
                encode(&record),
            )
            .await?;
        if !swapped {
            return Err(moved(format!(
                "another writer moved it after generation {} was read",
                current.as_ref().map_or(0, |(c, _)| c.generation)
            )));
        }
        let new = record.alias;
        tracing::info!(
            model = name,
            alias,
            targets = %show_targets(&new.targets),
            generation = new.generation,
            actor,
            "alias moved"
        );
        let from = current.as_ref().map(|(c, _)| targets_json(&c.targets));
        self.audit(
            name,
            actor,
            "alias",
            Some(alias),
            from,
            targets_json(&new.targets),
        )
        .await;
        Ok(new)
    }

    /// Moves `alias` to `version`. `weight` `None` or 100: all traffic to it;
    /// `w` below 100: a canary, `[(current primary, 100 - w), (version, w)]`.
    /// Retries when another writer moves the alias in between; an alias that
    /// already has exactly these targets is returned unchanged.
    pub async fn promote(
        &self,
        name: &str,
        alias: &str,
        version: u64,
        weight: Option<u32>,
        actor: &str,
    ) -> Result<Alias> {
        validate_segment("model name", name)?;
        validate_segment("alias", alias)?;
        let weight = weight.unwrap_or(100);
        if !(1..=100).contains(&weight) {
            return Err(Error::invalid(format!(
                "weight {weight}: a promotion takes 1-100 percent of the traffic"
            )));
        }
        self.stored_version(name, version).await?;
        let mut conflicts = 0;
        loop {
            let current = self.alias(name, alias).await?;
            let targets = if weight == 100 {
                vec![AliasTarget {
                    version,
                    weight: 100,
                }]
            } else {
                let Some(primary) = current.as_ref().and_then(Alias::primary) else {
                    return Err(Error::invalid(format!(
                        "alias {alias} of model {name} does not exist yet, so there is nothing to canary against: promote a version with full weight first"
                    )));
                };
                if primary.version == version {
                    return Err(Error::invalid(format!(
                        "version {version} is already the primary of alias {alias} of model {name}; a canary needs another version"
                    )));
                }
                vec![
                    AliasTarget {
                        version: primary.version,
                        weight: 100 - weight,
                    },
                    AliasTarget { version, weight },
                ]
            };
            if let Some(cur) = &current
                && cur.targets == targets
            {
                return Ok(cur.clone());
            }
            match self
                .set_alias(name, alias, targets, current.as_ref(), actor)
                .await
            {
                Err(Error::Conflict { what }) => {
                    conflicts += 1;
                    if conflicts >= MAX_PROMOTE_ATTEMPTS {
                        return Err(Error::Conflict {
                            what: format!("gave up after {conflicts} tries: {what}"),
                        });
                    }
                    tracing::debug!(model = name, alias, "alias moved during promote; retrying");
                }
                other => return other,
            }
        }
    }

    /// Moves `alias` back to its previous targets (which in turn become its
    /// previous targets, so a second rollback undoes the first). One
    /// compare-and-swap: if the alias moves in between, an [`Error::Conflict`].
    pub async fn rollback(&self, name: &str, alias: &str, actor: &str) -> Result<Alias> {
        let Some(current) = self.alias(name, alias).await? else {
            return Err(Error::NotFound {
                what: format!("alias {alias} of model {name} in registry {}", self.url()),
            });
        };
        let Some(previous) = current.previous.clone() else {
            return Err(Error::NotFound {
                what: format!(
                    "previous targets of alias {alias} of model {name}: it has been set only once, so there is nothing to roll back to"
                ),
            });
        };
        self.set_alias(name, alias, previous, Some(&current), actor)
            .await
    }

    /// The audit log of one model, oldest first.
    pub async fn history(&self, name: &str) -> Result<Vec<AuditEntry>> {
        validate_segment("model name", name)?;
        let numbers = self.numbers(&history_prefix(name)).await?;
        futures::stream::iter(numbers)
            .map(|seq| async move {
                let key = history_key(name, seq);
                let stored: StoredAudit = decode(&key, &self.root.get(&key).await?)?;
                if stored.entry.seq != seq {
                    return Err(Error::CorruptObject {
                        key,
                        reason: format!("holds entry {}", stored.entry.seq),
                    });
                }
                Ok(stored.entry)
            })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await
    }

    /// The weighted versions a selector names: one at weight 100 for a version
    /// or the latest, an alias's targets for an alias.
    pub async fn resolve(&self, selector: &Selector) -> Result<Vec<(ModelVersion, u32)>> {
        let name = &selector.name;
        match &selector.pick {
            Pick::Latest => match self.latest(name).await? {
                Some(v) => Ok(vec![(v, 100)]),
                None => Err(Error::NotFound {
                    what: format!("model {name} (no versions) in registry {}", self.url()),
                }),
            },
            Pick::Version(v) => Ok(vec![(self.version(name, *v).await?, 100)]),
            Pick::Alias(alias) => {
                let Some(a) = self.alias(name, alias).await? else {
                    return Err(Error::NotFound {
                        what: format!("alias {alias} of model {name} in registry {}", self.url()),
                    });
                };
                let mut out = Vec::with_capacity(a.targets.len());
                for t in &a.targets {
                    out.push((self.version(name, t.version).await?, t.weight));
                }
                Ok(out)
            }
        }
    }

    /// The reference data profile of a version (opaque JSON bytes), checked
    /// against its sha256.
    pub async fn reference_profile(&self, name: &str, version: u64) -> Result<Option<Vec<u8>>> {
        let stored = self.stored_version(name, version).await?;
        match &stored.reference_profile {
            Some(blob) => self.get_blob(blob).await.map(Some),
            None => Ok(None),
        }
    }

    /// The TorchScript module bytes of a version, checked against their sha256.
    pub async fn torchscript(&self, name: &str, version: u64) -> Result<Option<Vec<u8>>> {
        let stored = self.stored_version(name, version).await?;
        match &stored.torchscript {
            Some(blob) => self.get_blob(blob).await.map(Some),
            None => Ok(None),
        }
    }

    /// The tokenizer (`tokenizer.json` bytes) of a language model's version,
    /// checked against its sha256.
    pub async fn tokenizer(&self, name: &str, version: u64) -> Result<Option<Vec<u8>>> {
        let stored = self.stored_version(name, version).await?;
        match &stored.tokenizer {
            Some(blob) => self.get_blob(blob).await.map(Some),
            None => Ok(None),
        }
    }

    // ----- helpers -----

    async fn stored_version(&self, name: &str, version: u64) -> Result<StoredVersion> {
        validate_segment("model name", name)?;
        let key = version_key(name, version);
        let bytes = match self.root.get(&key).await {
            Ok(bytes) => bytes,
            Err(Error::NotFound { .. }) => {
                let deleted = match self.deleted_version(name, version).await {
                    Ok(Some(d)) => format!(" (deleted at {} by {})", d.deleted_at, d.deleted_by),
                    _ => String::new(),
                };
                return Err(Error::NotFound {
                    what: format!(
                        "model {name} version {version} in registry {}{deleted}",
                        self.url()
                    ),
                });
            }
            Err(e) => return Err(e),
        };
        let stored: StoredVersion = decode(&key, &bytes)?;
        if stored.version.version != version || stored.version.name != name {
            return Err(Error::CorruptObject {
                key,
                reason: format!("holds {}:{}", stored.version.name, stored.version.version),
            });
        }
        Ok(stored)
    }

    async fn read_alias(&self, name: &str, alias: &str) -> Result<Option<(Alias, Versioned)>> {
        validate_segment("model name", name)?;
        validate_segment("alias", alias)?;
        let key = alias_key(name, alias);
        match self.root.read_versioned(&key).await? {
            None => Ok(None),
            Some(v) => {
                let stored: StoredAlias = decode(&key, &v.value)?;
                Ok(Some((stored.alias, v)))
            }
        }
    }

    /// The numbers of `{prefix}/{n:020}.json` objects, ascending.
    async fn numbers(&self, prefix: &str) -> Result<Vec<u64>> {
        let mut numbers: Vec<u64> = self
            .root
            .list(prefix)
            .await?
            .iter()
            .filter_map(|o| numbered(prefix, &o.key))
            .collect();
        numbers.sort_unstable();
        Ok(numbers)
    }

    /// Creates `record` at its number or the first free one after it (a
    /// create-only put; losing a race moves on), keeping the pin's number in
    /// step with the number tried. A number that was deleted is never reused.
    async fn claim_number(
        &self,
        record: &mut StoredVersion,
        checkpoint_root: &CheckpointRoot,
        pin: &mut Pin,
    ) -> Result<()> {
        let name = record.version.name.clone();
        let mut lost = 0;
        loop {
            let number = record.version.version;
            let key = version_key(&name, number);
            if self.create(&key, encode(record)).await? {
                if !self.is_deleted(&name, number).await? {
                    return Ok(());
                }
                // Deleted between our listing and our put: take ours back.
                self.root.delete(&key).await?;
            }
            lost += 1;
            if lost > MAX_LOST_CLAIMS {
                return Err(Error::Conflict {
                    what: format!("model {name}: lost {lost} races for a version number in a row"),
                });
            }
            record.version.version += 1;
            pin.version = record.version.version;
            pin::write_pin(checkpoint_root, pin).await?;
        }
    }

    /// One more than the highest version number ever used, deleted ones included.
    async fn next_number(&self, name: &str) -> Result<u64> {
        let live = self.last_number(&versions_prefix(name)).await?;
        let deleted = self.last_number(&deleted_prefix(name)).await?;
        Ok(live.max(deleted) + 1)
    }

    async fn last_number(&self, prefix: &str) -> Result<u64> {
        Ok(self.numbers(prefix).await?.last().copied().unwrap_or(0))
    }

    /// A create-only put; `Ok(false)` when another writer's object is there.
    /// Finding exactly `bytes` in place (a retried request whose first try
    /// succeeded) counts as success: every record carries a unique id.
    async fn create(&self, key: &str, bytes: Bytes) -> Result<bool> {
        match self.root.put(key, bytes.clone(), PutMode::Create).await {
            Ok(()) => Ok(true),
            Err(Error::AlreadyExists { .. }) => {
                Ok(self.root.get_opt(key).await?.is_some_and(|b| b == bytes))
            }
            Err(e) => Err(e),
        }
    }

    /// Stores a content-addressed blob (once: the same bytes, the same key).
    async fn put_blob(&self, name: &str, kind: &str, bytes: &[u8]) -> Result<BlobRef> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let key = format!("models/{name}/blobs/{sha256}.{kind}");
        self.root
            .put_object(
                &key,
                Bytes::copy_from_slice(bytes),
                BLOB_MULTIPART_THRESHOLD,
                BLOB_PART_BYTES,
            )
            .await?;
        Ok(BlobRef {
            key,
            sha256,
            bytes: bytes.len() as u64,
        })
    }

    async fn get_blob(&self, blob: &BlobRef) -> Result<Vec<u8>> {
        if !blob.key_is_its_own() {
            return Err(Error::CorruptObject {
                key: blob.key.clone(),
                reason: format!(
                    "a version's blob must be models/NAME/blobs/{{sha256}}.{{profile.json|torchscript.pt|tokenizer.json}} with the sha256 it records ({}); refusing to read another object",
                    blob.sha256
                ),
            });
        }
        let bytes = self.root.get(&blob.key).await.map_err(|e| match e {
            Error::NotFound { .. } => Error::NotFound {
                what: format!("blob {} in registry {}", blob.key, self.url()),
            },
            e => e,
        })?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if sha256 != blob.sha256 || bytes.len() as u64 != blob.bytes {
            return Err(Error::CorruptObject {
                key: blob.key.clone(),
                reason: format!(
                    "{} bytes with sha256 {sha256}; the version recorded {} bytes with sha256 {}",
                    bytes.len(),
                    blob.bytes,
                    blob.sha256
                ),
            });
        }
        Ok(bytes.to_vec())
    }

    /// Appends an audit entry. The action it records already happened, so a
    /// failure here is logged rather than returned: an error would tell the
    /// caller the action failed and invite a duplicate.
    async fn audit(
        &self,
        name: &str,
        actor: &str,
        action: &str,
        alias: Option<&str>,
        from: Option<serde_json::Value>,
        to: serde_json::Value,
    ) {
        let entry = AuditEntry {
            seq: 0,
            at: now_rfc3339(),
            actor: actor.to_string(),
            action: action.to_string(),
            model: name.to_string(),
            alias: alias.map(str::to_string),
            from,
            to,
        };
        if let Err(e) = self.append(name, entry).await {
            tracing::error!(model = name, action, error = %e, "audit entry not written");
        }
    }

    async fn append(&self, name: &str, entry: AuditEntry) -> Result<u64> {
        let prefix = history_prefix(name);
        let mut record = StoredAudit {
            format_version: BASE_FORMAT_VERSION,
            entry: AuditEntry {
                seq: self.last_number(&prefix).await? + 1,
                ..entry
            },
            entry_id: unique_id(),
        };
        let mut lost = 0;
        loop {
            let key = history_key(name, record.entry.seq);
            if self.create(&key, encode(&record)).await? {
                return Ok(record.entry.seq);
            }
            lost += 1;
            if lost > MAX_LOST_CLAIMS {
                return Err(Error::Conflict {
                    what: format!("model {name}: lost {lost} races for an audit sequence number"),
                });
            }
            record.entry.seq += 1;
        }
    }
}

/// The registry's read path on bytes from storage, for `fuzz/` (not part of
/// the API): each record type's decoding and the checks a read runs on it.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Decodes `bytes` as every stored record type and runs the read path's
    /// checks on what decodes; also parses them, as text, as listed keys.
    pub fn decode_records(bytes: &[u8]) {
        let key = version_key("m", 1);
        if let Ok(stored) = decode::<StoredVersion>(&key, bytes) {
            let blobs = [
                &stored.reference_profile,
                &stored.torchscript,
                &stored.tokenizer,
            ];
            for blob in blobs.into_iter().flatten() {
                let _ = blob.key_is_its_own();
            }
        }
        if let Ok(stored) = decode::<StoredAlias>(&alias_key("m", "a"), bytes) {
            let _ = stored.alias.primary();
            let _ = show_targets(&stored.alias.targets);
            let _ = targets_json(&stored.alias.targets);
        }
        let _ = decode::<StoredAudit>(&history_key("m", 1), bytes);
        let _ = decode::<delete::StoredDeletion>(&deleted_key("m", 1), bytes);
        if let Ok(text) = std::str::from_utf8(bytes) {
            let _ = numbered(&versions_prefix("m"), text);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn blob_keys_must_be_their_own() {
        let sha = "ab".repeat(32);
        let blob = |key: &str| BlobRef {
            key: key.to_string(),
            sha256: sha.clone(),
            bytes: 1,
        };
        assert!(blob(&format!("models/m/blobs/{sha}.tokenizer.json")).key_is_its_own());
        for bad in [
            format!("models/m/blobs/{}.tokenizer.json", "cd".repeat(32)),
            format!("models/m/blobs/{sha}.secret"),
            format!("models/../blobs/{sha}.profile.json"),
            format!("checkpoints/x/blobs/{sha}.profile.json"),
            format!("models/m/blobs/{}.profile.json", sha.to_uppercase()),
            "models/m/blobs/x".to_string(),
            format!("models/m/other/blobs/{sha}.profile.json"),
        ] {
            assert!(!blob(&bad).key_is_its_own(), "{bad}");
        }
    }

    use super::types::primary;
    use super::*;

    #[test]
    fn selectors_parse_and_print_back() {
        for (text, pick) in [
            ("digits", Pick::Latest),
            ("digits:3", Pick::Version(3)),
            ("digits@production", Pick::Alias("production".into())),
            ("a.b_c-1@x.y", Pick::Alias("x.y".into())),
        ] {
            let s: Selector = text.parse().unwrap();
            assert_eq!(s.pick, pick, "{text}");
            assert_eq!(s.to_string(), text);
        }
    }

    #[test]
    fn numbered_keys_parse_only_when_exact() {
        let p = "models/m/versions";
        assert_eq!(numbered(p, &version_key("m", 42)), Some(42));
        assert_eq!(numbered(p, "models/m/versions/42.json"), None);
        assert_eq!(
            numbered(p, "models/m/versions/00000000000000000042.json.lock"),
            None
        );
        assert_eq!(
            numbered(p, "models/mx/versions/00000000000000000042.json"),
            None
        );
    }

    #[test]
    fn unique_ids_differ() {
        let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| unique_id()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn target_weights_must_sum_to_100() {
        let t = |version, weight| AliasTarget { version, weight };
        assert!(validate_targets(&[t(1, 90), t(2, 10)]).is_ok());
        for (bad, says) in [
            (vec![], "at least one"),
            (vec![t(1, 90)], "sum to 90"),
            (vec![t(1, 0), t(2, 100)], "weights are 1-100"),
            (vec![t(1, 50), t(1, 50)], "twice"),
            (vec![t(0, 100)], "start at 1"),
        ] {
            let e = validate_targets(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn primary_is_the_heaviest_then_the_first() {
        let t = |version, weight| AliasTarget { version, weight };
        assert_eq!(primary(&[t(1, 10), t(2, 90)]), Some(t(2, 90)));
        assert_eq!(primary(&[t(3, 50), t(2, 50)]), Some(t(3, 50)));
        assert_eq!(primary(&[]), None);
    }

    #[test]
    fn spec_hash_is_sha256_hex() {
        assert_eq!(
            spec_hash(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
