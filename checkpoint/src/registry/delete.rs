//! Deleting a model version: the record goes, its number is never reused,
//! and the pin that kept its checkpoint from retention is released.
//!
//! ```text
//! models/{name}/deleted/{version:020}.json   the tombstone: who deleted which version when
//! ```
//!
//! Order: refuse while an alias points at the version; write the tombstone
//! (create-only: it reserves the number, and tells readers the version was
//! deleted rather than never there); delete the version record; append the
//! audit entry; release the pin under the checkpoint root. A delete cut
//! short anywhere is finished by running it again: with the tombstone in
//! place and the record gone, it only releases the pin.

use serde::{Deserialize, Serialize};

use super::{
    BASE_FORMAT_VERSION, CheckpointRef, Registry, decode, deleted_key, encode, unique_id,
    validate_actor, validate_segment, version_key,
};
use crate::error::{Error, Result};
use crate::manifest::now_rfc3339;
use crate::pin;
use crate::store::CheckpointRoot;

/// A deleted version, as its tombstone records it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeletedVersion {
    /// The model's name.
    pub name: String,
    /// The number it had; never given to another version.
    pub version: u64,
    /// RFC 3339, UTC.
    pub deleted_at: String,
    /// The actor that deleted it.
    pub deleted_by: String,
    /// The checkpoint the version named; its pin is released.
    pub checkpoint: CheckpointRef,
}

#[derive(Serialize, Deserialize)]
pub(super) struct StoredDeletion {
    format_version: u32,
    #[serde(flatten)]
    deleted: DeletedVersion,
    /// The deleted record's registration id: which pin to release.
    registration_id: String,
    /// Unique to one delete, so a retried put recognises its own tombstone.
    deletion_id: String,
}

impl Registry {
    /// Deletes version `version` of model `name` and releases the pin that
    /// kept its checkpoint from retention (a later gc may then delete the
    /// checkpoint). Refused with [`Error::Conflict`] while an alias points
    /// at the version. Deleting a deleted version again only releases its
    /// pin (finishing a delete that was cut short) and returns the first
    /// deletion. Its number is never given to another version.
    pub async fn delete_version(
        &self,
        name: &str,
        version: u64,
        actor: &str,
    ) -> Result<DeletedVersion> {
        validate_segment("model name", name)?;
        validate_actor(actor)?;
        let stored = match self.stored_version(name, version).await {
            Ok(stored) => Some(stored),
            Err(Error::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let tombstone = match stored {
            Some(stored) => {
                for alias in self.aliases(name).await? {
                    if let Some(t) = alias.targets.iter().find(|t| t.version == version) {
                        return Err(Error::Conflict {
                            what: format!(
                                "alias {} of model {name} points at version {version} ({}% of its traffic): move the alias to another version first",
                                alias.alias, t.weight
                            ),
                        });
                    }
                }
                let record = StoredDeletion {
                    format_version: BASE_FORMAT_VERSION,
                    deleted: DeletedVersion {
                        name: name.to_string(),
                        version,
                        deleted_at: now_rfc3339(),
                        deleted_by: actor.to_string(),
                        checkpoint: stored.version.checkpoint.clone(),
                    },
                    registration_id: stored.registration_id.clone(),
                    deletion_id: unique_id(),
                };
                let key = deleted_key(name, version);
                let record = if self.create(&key, encode(&record)).await? {
                    record
                } else {
                    // A concurrent delete of the same version won.
                    self.tombstone(name, version)
                        .await?
                        .ok_or_else(|| Error::Conflict {
                            what: format!("the tombstone of {name}:{version} vanished"),
                        })?
                };
                self.root.delete(&version_key(name, version)).await?;
                tracing::info!(model = name, version, actor, "model version deleted");
                let to = serde_json::json!({
                    "version": version,
                    "checkpoint": record.deleted.checkpoint,
                });
                self.audit(name, actor, "delete", None, None, to).await;
                record
            }
            None => match self.tombstone(name, version).await? {
                Some(t) => t,
                None => {
                    return Err(Error::NotFound {
                        what: format!("model {name} version {version} in registry {}", self.url()),
                    });
                }
            },
        };
        let checkpoint = &tombstone.deleted.checkpoint;
        let released = async {
            let root = CheckpointRoot::open(&checkpoint.root)?;
            pin::release_pin(&root, checkpoint.step, &tombstone.registration_id).await
        }
        .await;
        if let Err(e) = released {
            return Err(Error::Conflict {
                what: format!(
                    "{name}:{version} is deleted, but the pin of its checkpoint (step {} under {}) could not be released: {e}; delete it again to retry",
                    checkpoint.step, checkpoint.root
                ),
            });
        }
        Ok(tombstone.deleted)
    }

    /// The tombstone of a deleted version, if it was deleted.
    pub async fn deleted_version(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Option<DeletedVersion>> {
        validate_segment("model name", name)?;
        Ok(self.tombstone(name, version).await?.map(|t| t.deleted))
    }

    pub(super) async fn is_deleted(&self, name: &str, version: u64) -> Result<bool> {
        Ok(self
            .root
            .get_opt(&deleted_key(name, version))
            .await?
            .is_some())
    }

    async fn tombstone(&self, name: &str, version: u64) -> Result<Option<StoredDeletion>> {
        let key = deleted_key(name, version);
        match self.root.get_opt(&key).await? {
            None => Ok(None),
            Some(bytes) => {
                let t: StoredDeletion = decode(&key, &bytes)?;
                if t.deleted.name != name || t.deleted.version != version {
                    return Err(Error::CorruptObject {
                        key,
                        reason: format!("holds {}:{}", t.deleted.name, t.deleted.version),
                    });
                }
                Ok(Some(t))
            }
        }
    }
}
