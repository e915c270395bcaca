//! [`SpecError`] and the words of its messages: every refusal names the field
//! path and says what is allowed; TOML and JSON errors are translated from
//! serde's wording.

use std::path::PathBuf;

/// Why a job spec was refused.
///
/// `Display` is the whole message for a user (the CLI prints it after
/// `error: `): it names the field path and says what is allowed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The spec file could not be read.
    // The I/O error is part of the message rather than a `source`, so that a
    // printed error chain does not repeat it.
    #[error("read job spec {}: {error}", path.display())]
    Read {
        /// The spec file as given.
        path: PathBuf,
        /// What the read failed with.
        error: std::io::Error,
    },
    /// The text is not TOML (or, from [`JobSpec::from_json`](super::JobSpec::from_json), not JSON) at all.
    #[error("invalid {format}: {message}{}", position(*line, *column))]
    Syntax {
        /// `"toml"` or `"json"`.
        format: &'static str,
        /// The parser's complaint, in kiln's wording.
        message: String,
        /// 1-based line of the error, when the parser knows it.
        line: Option<usize>,
        /// 1-based column of the error, when the parser knows it.
        column: Option<usize>,
    },
    /// A field is unknown, missing, of the wrong type or names an unknown variant.
    /// `line` is the line of the spec file, when it is known.
    #[error("{}{message}{}", field_prefix(field), position(*line, None))]
    Parse {
        /// Dotted path of the field (`optimizer.lr`); empty when the error is
        /// about the document as a whole.
        field: String,
        /// What is wrong and, for a variant, which ones are allowed.
        message: String,
        /// 1-based line of the field in the spec file.
        line: Option<usize>,
    },
    /// The spec is well formed but a value is impossible.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// Why the value is impossible and what is allowed.
        message: String,
    },
    /// A `--set` argument is malformed.
    #[error("--set {arg}: {message}")]
    Override {
        /// The argument as given (`key=value`).
        arg: String,
        /// What is wrong with it.
        message: String,
    },
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

pub(super) fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(" (line {line}, column {column})"),
        (Some(line), None) => format!(" (line {line})"),
        _ => String::new(),
    }
}

pub(super) fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

pub(super) fn toml_syntax_error(text: &str, error: &toml::de::Error) -> SpecError {
    let (line, column) = match error.span() {
        Some(span) => {
            let (line, column) = line_and_column(text, span.start);
            (Some(line), Some(column))
        }
        None => (None, None),
    };
    SpecError::Syntax {
        format: "toml",
        message: plain_message(error.message()),
        line,
        column,
    }
}

/// `text` is the document the error's positions refer to, when there is one.
pub(super) fn toml_field_error(
    text: Option<&str>,
    error: &serde_path_to_error::Error<toml::de::Error>,
) -> SpecError {
    let line = text
        .zip(error.inner().span())
        .map(|(text, span)| line_and_column(text, span.start).0);
    parse_error(error.path(), &toml_words(error.inner().message()), line)
}

/// serde's data model in TOML's words.
fn toml_words(message: &str) -> String {
    message
        .replace("invalid type: map", "invalid type: table")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("expected a sequence", "expected an array")
        .replace("expected path string", "expected a path string")
}

pub(super) fn json_error(error: serde_path_to_error::Error<serde_json::Error>) -> SpecError {
    let inner = error.inner();
    if !inner.is_data() {
        return json_syntax_error(inner);
    }
    let message = json_message(inner);
    parse_error(
        error.path(),
        &message,
        Some(inner.line()).filter(|&line| line > 0),
    )
}

pub(super) fn json_syntax_error(error: &serde_json::Error) -> SpecError {
    SpecError::Syntax {
        format: "json",
        message: plain_message(&json_message(error)),
        line: Some(error.line()).filter(|&line| line > 0),
        column: Some(error.column()).filter(|&column| column > 0),
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn json_message(error: &serde_json::Error) -> String {
    let full = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    full.strip_suffix(&suffix).unwrap_or(&full).to_owned()
}

fn parse_error(path: &serde_path_to_error::Path, message: &str, line: Option<usize>) -> SpecError {
    let mut field = path.to_string();
    if field == "." {
        field.clear();
    }
    // serde reports a missing field at its parent; name the field itself.
    if let Some(name) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        let (field, message) = if field.is_empty() {
            (name.to_owned(), "required section is missing")
        } else {
            (format!("{field}.{name}"), "required field is missing")
        };
        // The span of a missing field is its whole parent table: no useful line.
        return SpecError::Parse {
            field,
            message: message.to_owned(),
            line: None,
        };
    }
    SpecError::Parse {
        field,
        message: plain_message(message),
        line,
    }
}

/// serde's messages, made to read as the rest of kiln's: no backticks, no
/// repeat of an unknown field's name (the field path already ends with it), and
/// the choices always as "expected one of a, b".
fn plain_message(message: &str) -> String {
    if let Some((_, rest)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    {
        return format!("unknown field{}", plain_choices(rest));
    }
    if let Some((variant, rest)) = message
        .strip_prefix("unknown variant `")
        .and_then(|rest| rest.split_once('`'))
    {
        return format!("unknown variant \"{variant}\"{}", plain_choices(rest));
    }
    message.replace('`', "")
}

/// serde writes two choices as "expected `a` or `b`".
fn plain_choices(choices: &str) -> String {
    if let Some((first, second)) = choices
        .strip_prefix(", expected `")
        .and_then(|rest| rest.strip_suffix('`'))
        .and_then(|rest| rest.split_once("` or `"))
    {
        return format!(", expected one of {first}, {second}");
    }
    choices.replace('`', "")
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&byte| byte == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(0, |index| index + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}
