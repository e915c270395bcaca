//! The checks a registration, an alias move and an actor pass before anything
//! is written: names that are safe as key segments, a definition and a
//! signature that fit each other, target weights that sum to 100.

use kiln_proto::spec::ModelKind;

use crate::error::{Error, Result};

use super::OIP_DATATYPES;
use super::types::{AliasTarget, NewVersion};

/// Model names and aliases are single key segments: 1-128 characters of
/// `[A-Za-z0-9._-]`, not starting with `.`.
pub(super) fn validate_segment(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !s.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "{what} {s:?} must be 1-128 characters of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

pub(super) fn validate_actor(actor: &str) -> Result<()> {
    if actor.trim().is_empty() || actor.len() > 256 || actor.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "actor {actor:?} must be 1-256 printable characters (who made the change)"
        )));
    }
    Ok(())
}

pub(super) fn validate_new(new: &NewVersion) -> Result<()> {
    let c = &new.checkpoint;
    if c.root.trim().is_empty() {
        return Err(Error::invalid(
            "checkpoint.root: empty; give the checkpoint root URL",
        ));
    }
    if c.digest.len() != 64 || !c.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid(format!(
            "checkpoint.digest {:?} must be a sha256 in hex (64 characters)",
            c.digest
        )));
    }
    let m = &new.model;
    if m.features == 0 || m.classes == 0 {
        return Err(Error::invalid(format!(
            "model: features ({}) and classes ({}) must be at least 1",
            m.features, m.classes
        )));
    }
    for (side, tensors) in [
        ("inputs", &new.signature.inputs),
        ("outputs", &new.signature.outputs),
    ] {
        if tensors.is_empty() {
            return Err(Error::invalid(format!(
                "signature.{side}: at least one tensor"
            )));
        }
        for t in tensors {
            if t.name.trim().is_empty() {
                return Err(Error::invalid(format!(
                    "signature.{side}: a tensor has no name"
                )));
            }
            if !OIP_DATATYPES.contains(&t.datatype.as_str()) {
                return Err(Error::invalid(format!(
                    "signature.{side}.{}: datatype {:?} is not one of {}",
                    t.name,
                    t.datatype,
                    OIP_DATATYPES.join(", ")
                )));
            }
            if t.shape.iter().any(|&d| d < -1) {
                return Err(Error::invalid(format!(
                    "signature.{side}.{}: shape {:?} has a dimension below -1 (-1 means any)",
                    t.name, t.shape
                )));
            }
        }
    }
    for (k, v) in &new.metrics {
        if k.trim().is_empty() {
            return Err(Error::invalid("metrics: a metric has an empty name"));
        }
        if !v.is_finite() {
            return Err(Error::invalid(format!(
                "metrics.{k} is {v}; metrics must be finite"
            )));
        }
    }
    if let Some(profile) = &new.reference_profile
        && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(profile)
    {
        return Err(Error::invalid(format!(
            "reference profile is not JSON: {e}"
        )));
    }
    if let Some(tokenizer) = &new.tokenizer {
        if !m.is_language_model() {
            return Err(Error::invalid(
                "a tokenizer was given but model.task is classifier; only language models carry one",
            ));
        }
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(tokenizer) {
            return Err(Error::invalid(format!(
                "the tokenizer is not JSON (a tokenizer.json): {e}"
            )));
        }
    }
    if m.is_language_model() && m.spec.kind != ModelKind::Gpt {
        return Err(Error::invalid(format!(
            "model.task is language_model but model.kind is {}; kiln's language models are gpt",
            kind_name(m.spec.kind)
        )));
    }
    let is_script = m.spec.kind == ModelKind::Torchscript;
    match (&new.torchscript, is_script) {
        (None, true) => Err(Error::invalid(
            "model.kind is torchscript but no TorchScript module bytes were given",
        )),
        (Some(_), false) => Err(Error::invalid(format!(
            "TorchScript module bytes were given but model.kind is {}",
            kind_name(m.spec.kind)
        ))),
        (Some(b), true) if b.is_empty() => Err(Error::invalid("the TorchScript module is empty")),
        _ => Ok(()),
    }
}

fn kind_name(kind: ModelKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub(super) fn validate_targets(targets: &[AliasTarget]) -> Result<()> {
    if targets.is_empty() {
        return Err(Error::invalid("alias targets: at least one version"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in targets {
        if t.version == 0 {
            return Err(Error::invalid("alias targets: versions start at 1"));
        }
        if !(1..=100).contains(&t.weight) {
            return Err(Error::invalid(format!(
                "alias targets: version {} has weight {}; weights are 1-100",
                t.version, t.weight
            )));
        }
        if !seen.insert(t.version) {
            return Err(Error::invalid(format!(
                "alias targets: version {} appears twice",
                t.version
            )));
        }
    }
    let sum: u32 = targets.iter().map(|t| t.weight).sum();
    if sum != 100 {
        return Err(Error::invalid(format!(
            "alias targets: weights sum to {sum}, they must sum to 100"
        )));
    }
    Ok(())
}
