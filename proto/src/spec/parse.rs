//! From TOML text (with `--set` overrides) to a [`JobSpec`]: sections
//! checked, overrides applied to the table, strict deserialization whose
//! errors name the field and the line.

use super::error::{SpecError, line_and_column, toml_field_error, toml_syntax_error};
use super::training::JobSpec;

/// Deserializes the spec from TOML text after applying `--set` overrides.
pub(super) fn parse_toml(text: &str, overrides: &[String]) -> Result<JobSpec, SpecError> {
    let file_table: toml::Table = text
        .parse()
        .map_err(|error| toml_syntax_error(text, &error))?;
    check_sections(&file_table, Some(text))?;
    if overrides.is_empty() {
        return deserialize_text(text, &file_table);
    }
    let mut table = file_table.clone();
    for arg in overrides {
        apply_override(&mut table, arg)?;
    }
    check_sections(&table, None)?;
    let error = match serde_path_to_error::deserialize(table.clone()) {
        Ok(spec) => return Ok(spec),
        Err(error) => explain_enum_type(toml_field_error(None, &error), &table),
    };
    // The table carries no positions. When the file alone fails the same way,
    // the fault is in the file, and the file knows the line.
    match (error, deserialize_text(text, &file_table)) {
        (
            SpecError::Parse {
                field,
                message,
                line: None,
            },
            Err(SpecError::Parse {
                field: file_field,
                message: file_message,
                line,
            }),
        ) if field == file_field && message == file_message => Err(SpecError::Parse {
            field,
            message,
            line,
        }),
        (error, _) => Err(error),
    }
}

/// `table` is `text` parsed, to explain some errors better.
fn deserialize_text(text: &str, table: &toml::Table) -> Result<JobSpec, SpecError> {
    let deserializer =
        toml::Deserializer::parse(text).map_err(|error| toml_syntax_error(text, &error))?;
    serde_path_to_error::deserialize(deserializer)
        .map_err(|error| explain_enum_type(toml_field_error(Some(text), &error), table))
}

/// The spec's sections, in the order a spec file usually lists them.
const SECTIONS: [&str; 9] = [
    "job",
    "model",
    "data",
    "train",
    "optimizer",
    "schedule",
    "workers",
    "comm",
    "checkpoint",
];

/// serde fills a struct from an array too (`train = [500, 32]` would set
/// `steps` and `global_batch` by position), so sections are checked to be
/// tables before deserializing.
fn check_sections(table: &toml::Table, text: Option<&str>) -> Result<(), SpecError> {
    for name in SECTIONS {
        let Some(value) = table.get(name) else {
            continue;
        };
        if value.is_table() {
            continue;
        }
        return Err(SpecError::Parse {
            field: name.to_owned(),
            message: format!(
                "invalid type: {}, expected a table (a [{name}] section)",
                value.type_str()
            ),
            line: text.and_then(|text| top_level_line(text, name)),
        });
    }
    Ok(())
}

/// Line of the top-level key `name` in `text`.
fn top_level_line(text: &str, name: &str) -> Option<usize> {
    let spans: std::collections::BTreeMap<String, toml::Spanned<toml::Value>> =
        toml::from_str(text).ok()?;
    Some(line_and_column(text, spans.get(name)?.span().start).0)
}

/// The fields whose values name a variant, with the variants allowed.
const ENUM_FIELDS: [(&str, &str, &str); 5] = [
    ("model", "kind", "mlp, cnn, torchscript"),
    ("data", "kind", "safetensors, synthetic"),
    ("optimizer", "kind", "sgd, adamw"),
    ("schedule", "kind", "constant, cosine"),
    ("workers", "device", "auto, cpu, cuda"),
];

/// A variant given as something other than a string gets a message from toml's
/// internals ("wanted string or table"); say what is allowed instead.
fn explain_enum_type(error: SpecError, table: &toml::Table) -> SpecError {
    let SpecError::Parse {
        field,
        message,
        line,
    } = error
    else {
        return error;
    };
    for (section, key, choices) in ENUM_FIELDS {
        if field != format!("{section}.{key}") {
            continue;
        }
        let value = table.get(section).and_then(|section| section.get(key));
        if let Some(value) = value.filter(|value| !value.is_str()) {
            let message = format!(
                "invalid type: {} {value}, expected one of {choices}",
                value.type_str()
            );
            return SpecError::Parse {
                field,
                message,
                line,
            };
        }
    }
    SpecError::Parse {
        field,
        message,
        line,
    }
}

/// Sets `key.path=value` in `table`, creating tables on the way.
fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), SpecError> {
    let fail = |message: String| SpecError::Override {
        arg: arg.to_owned(),
        message,
    };
    let Some((key, raw_value)) = arg.split_once('=') else {
        return Err(fail(
            "expected key.path=value, e.g. train.steps=500".to_owned(),
        ));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(fail(
            "the key before '=' is empty; expected key.path=value".to_owned(),
        ));
    }
    let segments: Vec<&str> = key.split('.').map(str::trim).collect();
    if segments.iter().any(|segment| segment.is_empty()) {
        return Err(fail(format!(
            "{key:?} has an empty part; expected names joined by '.'"
        )));
    }
    let value = override_value(raw_value);
    let (last, parents) = segments
        .split_last()
        .expect("split yields at least one segment");
    let mut current = table;
    for (depth, segment) in parents.iter().enumerate() {
        let entry = current
            .entry((*segment).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(inner) => inner,
            other => {
                return Err(fail(format!(
                    "{} is a {}, not a table",
                    segments[..=depth].join("."),
                    other.type_str()
                )));
            }
        };
    }
    current.insert((*last).to_owned(), value);
    Ok(())
}

/// A TOML value when `raw` is one (`3`, `0.5`, `true`, `"x"`, `[1, 2]`), else
/// the text itself, so that `optimizer.kind=sgd` needs no quotes.
fn override_value(raw: &str) -> toml::Value {
    let raw = raw.trim();
    raw.parse::<toml::Value>()
        .unwrap_or_else(|_| toml::Value::String(raw.to_owned()))
}
