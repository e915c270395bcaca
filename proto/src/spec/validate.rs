//! The semantic checks of an accepted spec ([`JobSpec::validate`]): bounds,
//! combinations, files that must exist, and the batch arithmetic at a world
//! size; helpers that check one value and name its field.

use std::path::{Path, PathBuf};

use super::error::{SpecError, invalid};
use super::operations::HookSink;
use super::training::{DataKind, JobSpec, ModelKind, ModelReturns, PositionKind};

/// Longest accepted `job.name`; it names folders and store keys.
const MAX_JOB_NAME_CHARS: usize = 64;
/// Longest accepted duration, in seconds (30 days): far above any real
/// timeout, far below what `Duration::from_secs_f64` cannot represent.
const MAX_SECS: f64 = 30.0 * 24.0 * 3600.0;
/// Bounds on sizes, so a typo fails at validation with the field's name
/// rather than as an allocation failure or overflow deep inside a worker.
const MAX_NPROC: usize = 1024;
const MAX_WIDTH: usize = 1 << 20;
const MAX_LAYERS: usize = 4096;
const MAX_VOCAB: usize = 1 << 24;
const MAX_SEQ_LEN: usize = 1 << 20;
const MAX_GLOBAL_BATCH: usize = 1 << 24;
const MAX_MB: f64 = 65536.0;
const MAX_SYNTHETIC_VALUES: usize = 1 << 30;

impl JobSpec {
    pub(super) fn validate_job(&self) -> Result<(), SpecError> {
        let name = &self.job.name;
        if name.is_empty() {
            return Err(invalid("job.name", "must not be empty"));
        }
        let chars = name.chars().count();
        if chars > MAX_JOB_NAME_CHARS {
            return Err(invalid(
                "job.name",
                format!("{chars} characters, at most {MAX_JOB_NAME_CHARS} allowed"),
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(invalid(
                "job.name",
                format!(
                    "{name:?} holds {bad:?}; allowed are letters a-z A-Z, digits, '.', '_' and '-'"
                ),
            ));
        }
        // The name becomes a folder name.
        if name == "." || name == ".." {
            return Err(invalid(
                "job.name",
                format!("{name:?} is not a usable folder name"),
            ));
        }
        Ok(())
    }

    pub(super) fn validate_workers(&self) -> Result<(), SpecError> {
        at_least_one("workers.nproc", self.workers.nproc)?;
        at_most("workers.nproc", self.workers.nproc, MAX_NPROC)
    }

    pub(super) fn validate_model(&self) -> Result<(), SpecError> {
        let model = &self.model;
        if model.hidden.is_empty() {
            return Err(invalid(
                "model.hidden",
                "must hold at least one layer width",
            ));
        }
        widths_at_least_one("model.hidden", &model.hidden)?;
        widths_at_least_one("model.channels", &model.channels)?;
        widths_at_most("model.hidden", &model.hidden, MAX_WIDTH)?;
        widths_at_most("model.channels", &model.channels, MAX_WIDTH)?;
        at_most("model.hidden (layers)", model.hidden.len(), MAX_LAYERS)?;
        at_most("model.channels (blocks)", model.channels.len(), MAX_LAYERS)?;
        at_most("model.n_layer", model.n_layer, MAX_LAYERS)?;
        at_most("model.n_head", model.n_head, MAX_WIDTH)?;
        at_most("model.d_model", model.d_model, MAX_WIDTH)?;
        if let Some(vocab) = model.vocab {
            at_most("model.vocab", vocab, MAX_VOCAB)?;
        }
        if let Some(context) = model.seq_len {
            at_least_one("model.seq_len", context)?;
            at_most("model.seq_len", context, MAX_SEQ_LEN)?;
        }
        if let Some(shape) = &model.input_shape {
            if shape.len() != 3 {
                return Err(invalid(
                    "model.input_shape",
                    format!("expected 3 dimensions [channels, height, width], got {shape:?}"),
                ));
            }
            widths_at_least_one("model.input_shape", shape)?;
        }
        match (model.kind, &model.path) {
            (ModelKind::Torchscript, None) => {
                return Err(invalid(
                    "model.path",
                    "required when model.kind = \"torchscript\"",
                ));
            }
            (ModelKind::Torchscript, Some(path)) => check_file("model.path", path)?,
            (ModelKind::Mlp | ModelKind::Cnn | ModelKind::Gpt, Some(_)) => {
                return Err(invalid(
                    "model.path",
                    "only applies to model.kind = \"torchscript\"; remove it or change model.kind",
                ));
            }
            (ModelKind::Mlp | ModelKind::Cnn | ModelKind::Gpt, None) => {}
        }
        if model.returns == ModelReturns::Loss && model.kind != ModelKind::Torchscript {
            return Err(invalid(
                "model.returns",
                "only a torchscript module can return its own loss; built-in models return logits",
            ));
        }
        if let Some(init) = &model.init {
            check_file("model.init", init)?;
        }
        if model.kind == ModelKind::Cnn {
            self.validate_cnn_shape()?;
        }
        if model.kind == ModelKind::Gpt {
            self.validate_gpt()?;
        }
        let language_model = model.kind == ModelKind::Gpt
            || (model.kind == ModelKind::Torchscript && model.returns == ModelReturns::Logits);
        if self.data.kind == DataKind::Tokens
            && !language_model
            && model.kind != ModelKind::Torchscript
        {
            return Err(invalid(
                "model.kind",
                format!(
                    "{:?} classifies feature vectors and cannot train on data.kind = \"tokens\"; \
                     use \"gpt\" or a \"torchscript\" module",
                    model.kind
                )
                .to_lowercase(),
            ));
        }
        if let Some(vocab) = model.vocab {
            at_least_one("model.vocab", vocab)?;
        }
        if self.data.kind == DataKind::Tokens
            && model.kind == ModelKind::Torchscript
            && model.returns == ModelReturns::Logits
            && model.vocab.is_none()
        {
            return Err(invalid(
                "model.vocab",
                "required for a torchscript language model that returns logits (its last dimension)",
            ));
        }
        Ok(())
    }

    /// A gpt trains on token data, knows its vocabulary, and fits the
    /// sequences it is given.
    fn validate_gpt(&self) -> Result<(), SpecError> {
        let m = &self.model;
        if self.data.kind != DataKind::Tokens {
            return Err(invalid(
                "model.kind",
                "\"gpt\" is a language model: it needs data.kind = \"tokens\"",
            ));
        }
        if m.vocab.is_none() {
            return Err(invalid(
                "model.vocab",
                "required for a gpt (the tokenizer's vocabulary size; `kiln data prepare` writes it to meta.json)",
            ));
        }
        for (field, value) in [
            ("model.n_layer", m.n_layer),
            ("model.n_head", m.n_head),
            ("model.d_model", m.d_model),
        ] {
            at_least_one(field, value)?;
        }
        if !m.d_model.is_multiple_of(m.n_head) {
            return Err(invalid(
                "model.n_head",
                format!("{} does not divide model.d_model = {}", m.n_head, m.d_model),
            ));
        }
        if m.positions == PositionKind::Rotary && !(m.d_model / m.n_head).is_multiple_of(2) {
            return Err(invalid(
                "model.positions",
                format!(
                    "rotary positions need an even head width; d_model / n_head = {}",
                    m.d_model / m.n_head
                ),
            ));
        }
        if !(m.dropout.is_finite() && (0.0..1.0).contains(&m.dropout)) {
            return Err(invalid(
                "model.dropout",
                format!("{} must be at least 0 and below 1", m.dropout),
            ));
        }
        if let (Some(context), Some(seq_len)) = (m.seq_len, self.data.seq_len)
            && context < seq_len
        {
            return Err(invalid(
                "model.seq_len",
                format!("{context} is shorter than data.seq_len = {seq_len}"),
            ));
        }
        Ok(())
    }

    /// A cnn needs convolution blocks and, where the number of features is known
    /// from the spec (synthetic data), an input shape that holds exactly them.
    fn validate_cnn_shape(&self) -> Result<(), SpecError> {
        if self.model.channels.is_empty() {
            return Err(invalid(
                "model.channels",
                "must hold at least one convolution block when model.kind = \"cnn\"",
            ));
        }
        if self.data.kind != DataKind::Synthetic {
            return Ok(());
        }
        let features = self.data.features;
        match &self.model.input_shape {
            Some(shape) => {
                let values: usize = shape.iter().product();
                if values != features {
                    return Err(invalid(
                        "model.input_shape",
                        format!("{shape:?} holds {values} values but data.features = {features}"),
                    ));
                }
            }
            None => {
                let side = features.isqrt();
                if side * side != features {
                    return Err(invalid(
                        "model.input_shape",
                        format!(
                            "required when data.features = {features} is not a perfect square \
                             (the default is [1, s, s] with s * s = data.features)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    pub(super) fn validate_data(&self) -> Result<(), SpecError> {
        let data = &self.data;
        match data.kind {
            DataKind::Safetensors => {
                if data.train.is_empty() {
                    return Err(invalid(
                        "data.train",
                        "must list at least one file when data.kind = \"safetensors\"",
                    ));
                }
                for (index, path) in data.train.iter().enumerate() {
                    check_file(&format!("data.train[{index}]"), path)?;
                }
                for (index, path) in data.eval.iter().enumerate() {
                    check_file(&format!("data.eval[{index}]"), path)?;
                }
            }
            DataKind::Tokens => {
                match data.seq_len {
                    None => {
                        return Err(invalid(
                            "data.seq_len",
                            "required when data.kind = \"tokens\" (tokens per training sample)",
                        ));
                    }
                    Some(n) => {
                        at_least_one("data.seq_len", n)?;
                        at_most("data.seq_len", n, MAX_SEQ_LEN)?;
                    }
                }
                if data.train.is_empty() {
                    return Err(invalid(
                        "data.train",
                        "must list at least one token file when data.kind = \"tokens\"",
                    ));
                }
                for (index, path) in data.train.iter().enumerate() {
                    check_file(&format!("data.train[{index}]"), path)?;
                }
                for (index, path) in data.eval.iter().enumerate() {
                    check_file(&format!("data.eval[{index}]"), path)?;
                }
                if data.classes.is_some() {
                    return Err(invalid(
                        "data.classes",
                        "does not apply to token data; the vocabulary is model.vocab",
                    ));
                }
            }
            DataKind::Synthetic => {
                for (field, list) in [("data.train", &data.train), ("data.eval", &data.eval)] {
                    if !list.is_empty() {
                        return Err(invalid(
                            field,
                            "only applies to data.kind = \"safetensors\"; \
                             synthetic data is sized by data.samples and data.eval_samples",
                        ));
                    }
                }
                at_least_one("data.samples", data.samples)?;
                at_least_one("data.features", data.features)?;
                let values =
                    (data.samples as u128 + data.eval_samples as u128) * data.features as u128;
                if values > MAX_SYNTHETIC_VALUES as u128 {
                    return Err(invalid(
                        "data.samples",
                        format!(
                            "(data.samples + data.eval_samples) x data.features = {values} values; \
                             synthetic data is held in memory, at most {MAX_SYNTHETIC_VALUES} (4 GiB)"
                        ),
                    ));
                }
            }
        }
        if data.kind != DataKind::Tokens && data.seq_len.is_some() {
            return Err(invalid(
                "data.seq_len",
                "only applies to data.kind = \"tokens\"",
            ));
        }
        if let Some(classes) = data.classes
            && classes < 2
        {
            return Err(invalid(
                "data.classes",
                format!("{classes} must be at least 2"),
            ));
        }
        Ok(())
    }

    pub(super) fn validate_train(&self) -> Result<(), SpecError> {
        let train = &self.train;
        if train.steps < 1 {
            return Err(invalid("train.steps", "must be at least 1"));
        }
        at_least_one("train.global_batch", train.global_batch)?;
        at_most("train.global_batch", train.global_batch, MAX_GLOBAL_BATCH)?;
        if let Some(micro_batch) = train.micro_batch {
            at_least_one("train.micro_batch", micro_batch)?;
        }
        if train.log_interval < 1 {
            return Err(invalid("train.log_interval", "must be at least 1"));
        }
        if let Some(threads) = train.threads_per_worker {
            at_least_one("train.threads_per_worker", threads)?;
        }
        if let Some(norm) = train.clip_grad_norm {
            positive("train.clip_grad_norm", norm)?;
        }
        let nproc = self.workers.nproc;
        let per_rank = self.per_rank_batch_over(nproc, &format!("workers.nproc = {nproc}"))?;
        self.micro_batch_of(per_rank, nproc)?;
        Ok(())
    }

    pub(super) fn validate_optimizer(&self) -> Result<(), SpecError> {
        let optimizer = &self.optimizer;
        positive("optimizer.lr", optimizer.lr)?;
        unit_interval("optimizer.momentum", optimizer.momentum)?;
        unit_interval("optimizer.beta1", optimizer.beta1)?;
        unit_interval("optimizer.beta2", optimizer.beta2)?;
        positive("optimizer.eps", optimizer.eps)?;
        if !(optimizer.weight_decay.is_finite() && optimizer.weight_decay >= 0.0) {
            return Err(invalid(
                "optimizer.weight_decay",
                format!("{} must be a finite number >= 0", optimizer.weight_decay),
            ));
        }
        Ok(())
    }

    pub(super) fn validate_schedule(&self) -> Result<(), SpecError> {
        let min_lr = self.schedule.min_lr;
        let lr = self.optimizer.lr;
        if !(min_lr >= 0.0 && min_lr <= lr) {
            return Err(invalid(
                "schedule.min_lr",
                format!("{min_lr} must be between 0 and optimizer.lr = {lr}"),
            ));
        }
        Ok(())
    }

    pub(super) fn validate_comm(&self) -> Result<(), SpecError> {
        positive("comm.bucket_mb", self.comm.bucket_mb)?;
        at_most_f64("comm.bucket_mb", self.comm.bucket_mb, MAX_MB)?;
        positive("comm.timeout_secs", self.comm.timeout_secs)?;
        duration("comm.timeout_secs", self.comm.timeout_secs)
    }

    pub(super) fn validate_checkpoint(&self) -> Result<(), SpecError> {
        let c = &self.checkpoint;
        if let Some(url) = &c.url {
            validate_location("checkpoint.url", url)?;
        }
        at_least_one("checkpoint.keep_last", c.keep_last)?;
        at_least_one(
            "checkpoint.max_consecutive_failures",
            c.max_consecutive_failures,
        )?;
        if !(1..=22).contains(&c.compression_level) {
            return Err(invalid(
                "checkpoint.compression_level",
                format!(
                    "{} is not a zstd level; allowed: 1 to 22",
                    c.compression_level
                ),
            ));
        }
        if !["auto", "zstd", "none"].contains(&c.compression.as_str()) {
            return Err(invalid(
                "checkpoint.compression",
                format!(
                    "{:?} is not a codec policy; allowed: \"auto\", \"zstd\", \"none\"",
                    c.compression
                ),
            ));
        }
        positive("checkpoint.chunk_mb", c.chunk_mb)?;
        at_most_f64("checkpoint.chunk_mb", c.chunk_mb, MAX_MB)?;
        if !c.required && self.register.is_some() {
            return Err(invalid(
                "checkpoint.required",
                "false cannot go with [register]: a model is registered from its final \
                 checkpoint, which the job could then end without",
            ));
        }
        Ok(())
    }

    pub(super) fn validate_logs(&self) -> Result<(), SpecError> {
        let l = &self.logs;
        if l.file_mib == 0 || l.file_mib > 1 << 20 {
            return Err(invalid(
                "logs.file_mib",
                format!("{} must be 1 to 1048576", l.file_mib),
            ));
        }
        if l.files > 1000 {
            return Err(invalid(
                "logs.files",
                format!("{} must be at most 1000", l.files),
            ));
        }
        if l.store_kib == 0 || l.store_kib > 64 << 10 {
            return Err(invalid(
                "logs.store_kib",
                format!("{} must be 1 to 65536", l.store_kib),
            ));
        }
        Ok(())
    }

    pub(super) fn validate_elastic(&self) -> Result<(), SpecError> {
        let e = &self.elastic;
        at_least_one("elastic.min_nodes", e.min_nodes)?;
        if let Some(max) = e.max_nodes
            && max < e.min_nodes
        {
            return Err(invalid(
                "elastic.max_nodes",
                format!("{max} is below elastic.min_nodes = {}", e.min_nodes),
            ));
        }
        if e.lease_ttl_secs < 2 {
            return Err(invalid(
                "elastic.lease_ttl_secs",
                format!(
                    "{} is too short; etcd grants at least 2 seconds",
                    e.lease_ttl_secs
                ),
            ));
        }
        if e.lease_ttl_secs > MAX_SECS as u64 {
            return Err(invalid(
                "elastic.lease_ttl_secs",
                format!("{} is longer than {MAX_SECS} s (30 days)", e.lease_ttl_secs),
            ));
        }
        non_negative("elastic.settle_secs", e.settle_secs)?;
        duration("elastic.settle_secs", e.settle_secs)?;
        positive("elastic.wait_timeout_secs", e.wait_timeout_secs)?;
        duration("elastic.wait_timeout_secs", e.wait_timeout_secs)?;
        non_negative("elastic.cooldown_secs", e.cooldown_secs)?;
        duration("elastic.cooldown_secs", e.cooldown_secs)
    }

    pub(super) fn validate_launch(&self) -> Result<(), SpecError> {
        let l = &self.launch;
        if let Some(nodes) = l.nodes {
            at_least_one("launch.nodes", nodes)?;
        }
        if let Some(store) = &l.store {
            validate_store_url("launch.store", store)?;
        }
        if let Some(limit) = &l.time_limit {
            parse_time_limit(limit).ok_or_else(|| {
                invalid(
                    "launch.time_limit",
                    format!("{limit:?} is not a duration; use HH:MM:SS"),
                )
            })?;
        }
        if l.kiln_bin.is_empty() {
            return Err(invalid("launch.kiln_bin", "must not be empty"));
        }
        Ok(())
    }

    pub(super) fn validate_register(&self) -> Result<(), SpecError> {
        let Some(r) = &self.register else {
            return Ok(());
        };
        if let Some(url) = &r.registry {
            validate_location("register.registry", url)?;
        }
        if r.threshold.is_some() && r.metric.is_none() {
            return Err(invalid(
                "register.threshold",
                "needs register.metric (the eval metric it is compared with)",
            ));
        }
        if r.metric.is_some() && r.alias.is_none() {
            return Err(invalid(
                "register.metric",
                "gates an alias move; set register.alias too",
            ));
        }
        at_least_one("register.reference_rows", r.reference_rows)
    }

    pub(super) fn validate_hooks(&self) -> Result<(), SpecError> {
        for (i, h) in self.hooks.iter().enumerate() {
            let field = |name: &str| format!("hooks[{i}].{name}");
            match h.sink {
                HookSink::Log => {}
                HookSink::Webhook => {
                    let url = h
                        .url
                        .as_deref()
                        .ok_or_else(|| invalid(field("url"), "required for a webhook sink"))?;
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(invalid(
                            field("url"),
                            format!("{url:?} is not an http:// or https:// URL"),
                        ));
                    }
                }
                HookSink::Command => {
                    if h.command.is_empty() {
                        return Err(invalid(
                            field("command"),
                            "required for a command sink: the program and its arguments",
                        ));
                    }
                }
            }
            if h.secret_env.is_some() && h.secret_file.is_some() {
                return Err(invalid(
                    field("secret_env"),
                    "give secret_env or secret_file, not both",
                ));
            }
            positive(&field("timeout_secs"), h.timeout_secs)?;
            duration(&field("timeout_secs"), h.timeout_secs)?;
        }
        Ok(())
    }

    /// `ranks` names the divisor in the message (`workers.nproc = 3`, `world size 6`).
    pub(super) fn per_rank_batch_over(
        &self,
        world_size: usize,
        ranks: &str,
    ) -> Result<usize, SpecError> {
        let global_batch = self.train.global_batch;
        if world_size == 0 {
            return Err(invalid(
                "train.global_batch",
                "cannot be split over a world size of 0",
            ));
        }
        if global_batch == 0 {
            return Err(invalid("train.global_batch", "must be at least 1"));
        }
        if !global_batch.is_multiple_of(world_size) {
            return Err(invalid(
                "train.global_batch",
                format!(
                    "{global_batch} is not divisible by {ranks} (each rank takes an equal slice)"
                ),
            ));
        }
        Ok(global_batch / world_size)
    }

    pub(super) fn micro_batch_of(
        &self,
        per_rank: usize,
        world_size: usize,
    ) -> Result<usize, SpecError> {
        let Some(micro_batch) = self.train.micro_batch else {
            return Ok(per_rank);
        };
        at_least_one("train.micro_batch", micro_batch)?;
        if !per_rank.is_multiple_of(micro_batch) {
            let global_batch = self.train.global_batch;
            let ranks = if world_size == 1 { "rank" } else { "ranks" };
            return Err(invalid(
                "train.micro_batch",
                format!(
                    "{micro_batch} must divide the per-rank batch {per_rank} \
                     (train.global_batch {global_batch} over {world_size} {ranks})"
                ),
            ));
        }
        Ok(micro_batch)
    }
}

fn at_least_one(field: &str, value: usize) -> Result<(), SpecError> {
    if value < 1 {
        Err(invalid(field, "must be at least 1"))
    } else {
        Ok(())
    }
}

fn widths_at_least_one(field: &str, values: &[usize]) -> Result<(), SpecError> {
    match values.iter().position(|&value| value < 1) {
        Some(index) => Err(invalid(format!("{field}[{index}]"), "must be at least 1")),
        None => Ok(()),
    }
}

fn at_most(field: &str, value: usize, max: usize) -> Result<(), SpecError> {
    if value > max {
        Err(invalid(
            field,
            format!("{value} is above the limit of {max}"),
        ))
    } else {
        Ok(())
    }
}

fn widths_at_most(field: &str, values: &[usize], max: usize) -> Result<(), SpecError> {
    match values.iter().position(|&value| value > max) {
        Some(index) => at_most(&format!("{field}[{index}]"), values[index], max),
        None => Ok(()),
    }
}

fn at_most_f64(field: &str, value: f64, max: f64) -> Result<(), SpecError> {
    if value > max {
        Err(invalid(
            field,
            format!("{value} is above the limit of {max}"),
        ))
    } else {
        Ok(())
    }
}

/// A number of seconds a `Duration` can hold: at most [`MAX_SECS`].
fn duration(field: &str, secs: f64) -> Result<(), SpecError> {
    if secs > MAX_SECS {
        Err(invalid(
            field,
            format!("{secs} s is longer than {MAX_SECS} s (30 days)"),
        ))
    } else {
        Ok(())
    }
}

fn non_negative(field: &str, value: f64) -> Result<(), SpecError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} must be a number >= 0")))
    }
}

/// Checks a store URL (`etcd://`, `etcds://` or `mem://`, see
/// [`crate::store_url`]): syntax only, the files it names are read by whoever
/// opens the store.
pub fn validate_store_url(field: &str, url: &str) -> Result<(), SpecError> {
    crate::store_url::StoreUrl::parse(url)
        .map(drop)
        .map_err(|error| invalid(field, error.to_string()))
}

/// Checks a checkpoint or registry location (`file:///abs`, `s3://`, ...).
pub fn validate_location(field: &str, url: &str) -> Result<(), SpecError> {
    let scheme_ok = ["file://", "s3://", "gs://", "az://", "memory://", "/"]
        .iter()
        .any(|p| url.starts_with(p));
    if scheme_ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{url:?} is not a storage location; use file:///abs/path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or memory://"
            ),
        ))
    }
}

/// Seconds in an `HH:MM:SS` (or `MM:SS`, or `SS`) duration.
pub fn parse_time_limit(text: &str) -> Option<u64> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    let mut seconds = 0u64;
    for (i, part) in parts.iter().enumerate() {
        let value: u64 = part.parse().ok()?;
        if i > 0 && value >= 60 {
            return None;
        }
        seconds = seconds.checked_mul(60)?.checked_add(value)?;
    }
    Some(seconds)
}

fn positive(field: &str, value: f64) -> Result<(), SpecError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} must be a finite number > 0"),
        ))
    }
}

fn unit_interval(field: &str, value: f64) -> Result<(), SpecError> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value} must be in [0, 1): at least 0 and below 1"),
        ))
    }
}

fn check_file(field: &str, path: &Path) -> Result<(), SpecError> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_file() => Ok(()),
        Ok(_) => Err(invalid(field, format!("{} is not a file", path.display()))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(invalid(
            field,
            format!("file {} does not exist", path.display()),
        )),
        Err(error) => Err(invalid(
            field,
            format!("cannot read {}: {error}", path.display()),
        )),
    }
}

/// `path` made absolute against `base_dir` (itself made absolute against the
/// current directory). UTF-8 is required so that the spec travels as JSON.
pub(super) fn resolve(base_dir: &Path, path: &Path, field: &str) -> Result<PathBuf, SpecError> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::path::absolute(base_dir.join(path)).map_err(|error| {
            invalid(
                field,
                format!("cannot make {} absolute: {error}", path.display()),
            )
        })?
    };
    if absolute.to_str().is_none() {
        return Err(invalid(
            field,
            format!("{} is not valid utf-8", absolute.display()),
        ));
    }
    Ok(absolute)
}
