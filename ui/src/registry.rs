//! The Registry page's figures: every model of a registry with its versions
//! (metrics, lineage), aliases (with canary weights) and audit log.

use kiln_checkpoint::registry::{Alias, AuditEntry, ModelVersion, Registry};
use serde::Serialize;

/// Audit entries shown per model: the newest this many.
const MAX_AUDIT: usize = 100;

/// One model of a registry.
#[derive(Debug, Clone, Serialize)]
pub struct ModelView {
    /// The model's name.
    pub name: String,
    /// Newest first.
    pub versions: Vec<ModelVersion>,
    /// Its aliases (`production`, ...) with their targets and weights.
    pub aliases: Vec<Alias>,
    /// Newest first, the newest 100 only.
    pub audit: Vec<AuditEntry>,
}

/// A registry as the Registry page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryView {
    /// The registry's URL.
    pub url: String,
    /// Every model registered, in the registry's order (by name).
    pub models: Vec<ModelView>,
}

/// Reads every model of the registry at `url`. A registry nothing was
/// registered in yet has no models (not an error).
pub async fn registry_view(url: &str) -> Result<RegistryView, kiln_checkpoint::Error> {
    let registry = Registry::open(url).await?;
    let names = match registry.models().await {
        Ok(names) => names,
        Err(kiln_checkpoint::Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut models = Vec::new();
    for name in names {
        let mut versions = registry.versions(&name).await?;
        versions.reverse();
        let aliases = registry.aliases(&name).await?;
        let mut audit = registry.history(&name).await?;
        audit.reverse();
        audit.truncate(MAX_AUDIT);
        models.push(ModelView {
            name,
            versions,
            aliases,
            audit,
        });
    }
    Ok(RegistryView {
        url: url.to_string(),
        models,
    })
}
