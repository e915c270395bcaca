//! The job spec: what a user submits (TOML), strictly validated.
//!
//! Unknown keys, wrong types and impossible values are errors that name the
//! field path (`train.global_batch`) and say what is allowed. Relative paths are
//! resolved against the spec file's folder when the spec is loaded, so the
//! accepted spec (handed to workers as JSON) holds absolute paths.
//! Every field is documented in docs/job-spec.md.
//!
//! # Layout
//!
//! - [`JobSpec`]'s entry points (here): [`JobSpec::load`],
//!   [`JobSpec::from_toml_str`], [`JobSpec::from_json`], [`JobSpec::to_json`].
//! - `training`: the sections of what is trained (`[job]` to `[comm]`);
//!   `operations`: of how it runs (`[checkpoint]` to `[[hooks]]`).
//! - `parse`: TOML with overrides to a spec; `validate`: the checks of an
//!   accepted spec; `error`: [`SpecError`] and its wording.

mod error;
mod operations;
mod parse;
mod training;
mod validate;

use std::path::Path;

pub use error::SpecError;
pub use operations::*;
pub use training::*;
pub use validate::{parse_time_limit, validate_location, validate_store_url};

use error::{json_error, json_syntax_error};
use parse::parse_toml;
use validate::resolve;

impl JobSpec {
    /// Reads a TOML file, applies `--set key.path=value` overrides, deserializes
    /// strictly, resolves relative paths (`data.train`, `data.eval`, `model.path`)
    /// against the file's folder (making them absolute), and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<JobSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|error| SpecError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let base_dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        Self::from_toml_str(&text, base_dir, overrides)
    }

    /// [`JobSpec::load`] for a spec already in memory; relative paths are
    /// resolved against `base_dir` (itself made absolute against the current
    /// directory).
    pub fn from_toml_str(
        text: &str,
        base_dir: &Path,
        overrides: &[String],
    ) -> Result<JobSpec, SpecError> {
        let mut spec = parse_toml(text, overrides)?;
        spec.resolve_paths(base_dir)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Semantic checks (also used after a world size change).
    ///
    /// Batch divisibility is checked at `workers.nproc` ranks (one node); a
    /// caller that knows the real world size checks it with
    /// [`JobSpec::micro_batch_at`]. Files named by the spec must exist here.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_job()?;
        self.validate_workers()?;
        self.validate_model()?;
        self.validate_data()?;
        self.validate_train()?;
        self.validate_optimizer()?;
        self.validate_schedule()?;
        self.validate_comm()?;
        self.validate_checkpoint()?;
        self.validate_elastic()?;
        self.validate_logs()?;
        self.validate_launch()?;
        self.validate_register()?;
        self.validate_hooks()
    }

    /// Samples per rank per step at `world_size`; error if `train.global_batch`
    /// does not divide.
    pub fn per_rank_batch(&self, world_size: usize) -> Result<usize, SpecError> {
        self.per_rank_batch_over(world_size, &format!("world size {world_size}"))
    }

    /// Micro-batch size at `world_size` (`train.micro_batch` or the whole
    /// per-rank batch).
    pub fn micro_batch_at(&self, world_size: usize) -> Result<usize, SpecError> {
        let per_rank = self.per_rank_batch(world_size)?;
        self.micro_batch_of(per_rank, world_size)
    }

    /// The spec as handed to workers and stored under `jobs/{job}/spec`.
    pub fn to_json(&self) -> String {
        // Cannot fail: every map key is a string, and paths are checked to be
        // UTF-8 when they are resolved.
        serde_json::to_string(self).expect("a job spec serializes to json")
    }

    /// Reads [`JobSpec::to_json`]'s output; unknown fields are errors that name
    /// their path. It does not validate: the spec was validated when it was
    /// accepted (call [`JobSpec::validate`] to check it again here).
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let spec: JobSpec =
            serde_path_to_error::deserialize(&mut deserializer).map_err(json_error)?;
        deserializer
            .end()
            .map_err(|error| json_syntax_error(&error))?;
        Ok(spec)
    }

    fn resolve_paths(&mut self, base_dir: &Path) -> Result<(), SpecError> {
        for (index, path) in self.data.train.iter_mut().enumerate() {
            *path = resolve(base_dir, path, &format!("data.train[{index}]"))?;
        }
        for (index, path) in self.data.eval.iter_mut().enumerate() {
            *path = resolve(base_dir, path, &format!("data.eval[{index}]"))?;
        }
        if let Some(path) = &mut self.model.init {
            *path = resolve(base_dir, path, "model.init")?;
        }
        if let Some(path) = &mut self.model.path {
            *path = resolve(base_dir, path, "model.path")?;
        }
        Ok(())
    }

    /// The context length of a language model: `model.seq_len`, else `data.seq_len`.
    pub fn context_len(&self) -> Option<usize> {
        self.model.seq_len.or(self.data.seq_len)
    }
}
