//! From `[[hooks]]` entries to ready sinks: secrets read, URLs parsed, event
//! filters checked, programs found. Everything that can be wrong with a hook is
//! found here, when the process starts, rather than at its first event.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use kiln_proto::spec::{HookSink, HookSpec};

use crate::error::{Result, invalid};
use crate::event::kind;

/// A webhook's HMAC key. Its `Debug` does not show the key.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Where one hook delivers.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Log,
    Webhook {
        url: reqwest::Url,
        secret: Option<Secret>,
    },
    Command {
        program: String,
        args: Vec<String>,
    },
}

impl Target {
    /// The sink's name as written in the spec.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Target::Log => "log",
            Target::Webhook { .. } => "webhook",
            Target::Command { .. } => "command",
        }
    }
}

/// Which event kinds a hook takes: exact kinds, `prefix.*`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventFilter {
    /// Empty: every kind.
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    All,
    Exact(String),
    /// `job.*` is stored as `job.`.
    Prefix(String),
}

impl EventFilter {
    /// Checks every entry of `events` (`field` names the list in errors).
    fn parse(events: &[String], field: &str) -> Result<EventFilter> {
        let mut patterns = Vec::with_capacity(events.len());
        for (i, entry) in events.iter().enumerate() {
            let pattern = if entry == "*" {
                Pattern::All
            } else if let Some(prefix) = entry.strip_suffix('*') {
                if !prefix.ends_with('.') || !kind::ALL.iter().any(|k| k.starts_with(prefix)) {
                    return Err(unknown_kind(field, i, entry));
                }
                Pattern::Prefix(prefix.to_string())
            } else {
                if !kind::ALL.contains(&entry.as_str()) {
                    return Err(unknown_kind(field, i, entry));
                }
                Pattern::Exact(entry.clone())
            };
            patterns.push(pattern);
        }
        Ok(EventFilter { patterns })
    }

    pub(crate) fn accepts(&self, event_kind: &str) -> bool {
        self.patterns.is_empty()
            || self.patterns.iter().any(|pattern| match pattern {
                Pattern::All => true,
                Pattern::Exact(kind) => kind == event_kind,
                Pattern::Prefix(prefix) => event_kind.starts_with(prefix.as_str()),
            })
    }
}

fn unknown_kind(field: &str, i: usize, entry: &str) -> crate::Error {
    invalid(
        format!("{field}[{i}]"),
        format!(
            "unknown event kind {entry:?}; allowed: {}, a group such as \"job.*\", or \"*\"",
            kind::ALL.join(", ")
        ),
    )
}

/// One hook, checked and ready to deliver.
#[derive(Debug, Clone)]
pub(crate) struct SinkConfig {
    /// Position in the configured list, for logs and errors.
    pub(crate) index: usize,
    pub(crate) target: Target,
    pub(crate) filter: EventFilter,
    pub(crate) max_retries: u32,
    /// Limit on one delivery attempt.
    pub(crate) timeout: Duration,
}

/// The longest per-delivery timeout accepted: a day. Longer values are almost
/// certainly a unit mistake, and would overflow time arithmetic when huge.
const MAX_TIMEOUT_SECS: f64 = 86_400.0;

/// Checks `spec` (the hook at `index`; `prefix` is the list's field path, such
/// as `hooks`) and reads its secret.
pub(crate) fn resolve(spec: &HookSpec, index: usize, prefix: &str) -> Result<SinkConfig> {
    let field = |name: &str| format!("{prefix}[{index}].{name}");
    let sink = match spec.sink {
        HookSink::Log => "log",
        HookSink::Webhook => "webhook",
        HookSink::Command => "command",
    };
    let not_for = |name: &str, what: &str| {
        invalid(
            field(name),
            format!("only {what}; this hook's sink is \"{sink}\""),
        )
    };

    if spec.sink != HookSink::Webhook {
        if spec.url.is_some() {
            return Err(not_for("url", "a webhook sink has a url"));
        }
        if spec.secret_env.is_some() {
            return Err(not_for("secret_env", "a webhook sink signs events"));
        }
        if spec.secret_file.is_some() {
            return Err(not_for("secret_file", "a webhook sink signs events"));
        }
    }
    if spec.sink != HookSink::Command && !spec.command.is_empty() {
        return Err(not_for("command", "a command sink runs a command"));
    }

    let target = match spec.sink {
        HookSink::Log => Target::Log,
        HookSink::Webhook => {
            let text = spec
                .url
                .as_deref()
                .ok_or_else(|| invalid(field("url"), "required for a webhook sink"))?;
            let url = reqwest::Url::parse(text).map_err(|error| {
                invalid(field("url"), format!("{text:?} is not a URL: {error}"))
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid(
                    field("url"),
                    format!("{text:?} is not an http:// or https:// URL with a host"),
                ));
            }
            let secret = match (&spec.secret_env, &spec.secret_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        field("secret_env"),
                        "give secret_env or secret_file, not both",
                    ));
                }
                (Some(variable), None) => Some(secret_from_env(variable, &field("secret_env"))?),
                (None, Some(path)) => Some(secret_from_file(path, &field("secret_file"))?),
                (None, None) => None,
            };
            Target::Webhook { url, secret }
        }
        HookSink::Command => {
            let Some((program, args)) = spec.command.split_first() else {
                return Err(invalid(
                    field("command"),
                    "required for a command sink: the program and its arguments",
                ));
            };
            if program.is_empty() {
                return Err(invalid(
                    format!("{prefix}[{index}].command[0]"),
                    "the program is empty",
                ));
            }
            if !program_exists(program, std::env::var_os("PATH")) {
                return Err(invalid(
                    format!("{prefix}[{index}].command[0]"),
                    if program.contains('/') {
                        format!("program {program:?} is not a file")
                    } else {
                        format!("program {program:?} is not on PATH")
                    },
                ));
            }
            Target::Command {
                program: program.clone(),
                args: args.to_vec(),
            }
        }
    };

    let filter = EventFilter::parse(&spec.events, &field("events"))?;
    let timeout_secs = spec.timeout_secs;
    if !(timeout_secs.is_finite() && timeout_secs > 0.0 && timeout_secs <= MAX_TIMEOUT_SECS) {
        return Err(invalid(
            field("timeout_secs"),
            format!(
                "{timeout_secs} is not allowed: give seconds above 0, at most {MAX_TIMEOUT_SECS}"
            ),
        ));
    }
    Ok(SinkConfig {
        index,
        target,
        filter,
        max_retries: spec.max_retries,
        timeout: Duration::from_secs_f64(timeout_secs),
    })
}

fn secret_from_env(variable: &str, field: &str) -> Result<Secret> {
    if variable.is_empty() || variable.contains('=') || variable.contains('\0') {
        return Err(invalid(
            field,
            format!("{variable:?} is not an environment variable name"),
        ));
    }
    let value = std::env::var_os(variable).ok_or_else(|| {
        invalid(
            field,
            format!(
                "environment variable {variable} is not set (it should hold the webhook's HMAC key)"
            ),
        )
    })?;
    let bytes = os_bytes(value);
    if bytes.is_empty() {
        return Err(invalid(
            field,
            format!("environment variable {variable} is empty"),
        ));
    }
    Ok(Secret(bytes))
}

/// Reads the key from `path`; trailing whitespace (the newline `echo` adds) is
/// not part of it.
fn secret_from_file(path: &Path, field: &str) -> Result<Secret> {
    let mut bytes = std::fs::read(path)
        .map_err(|error| invalid(field, format!("read {}: {error}", path.display())))?;
    while bytes.last().is_some_and(u8::is_ascii_whitespace) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(invalid(
            field,
            format!(
                "{} is empty (it should hold the webhook's HMAC key)",
                path.display()
            ),
        ));
    }
    Ok(Secret(bytes))
}

#[cfg(unix)]
fn os_bytes(value: OsString) -> Vec<u8> {
    use std::os::unix::ffi::OsStringExt;
    value.into_vec()
}

#[cfg(not(unix))]
fn os_bytes(value: OsString) -> Vec<u8> {
    value.to_string_lossy().into_owned().into_bytes()
}

/// Whether `program` names a file (when it has a `/`) or is found on `path`, as
/// `execvp` would look it up.
fn program_exists(program: &str, path: Option<OsString>) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    path.is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(sink: HookSink) -> HookSpec {
        HookSpec {
            sink,
            url: None,
            secret_env: None,
            secret_file: None,
            command: Vec::new(),
            events: Vec::new(),
            max_retries: 5,
            timeout_secs: 10.0,
        }
    }

    fn error(spec: &HookSpec) -> String {
        resolve(spec, 2, "hooks").unwrap_err().to_string()
    }

    #[test]
    fn filters_take_kinds_groups_and_star() {
        let events = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let all = EventFilter::parse(&[], "e").unwrap();
        assert!(kind::ALL.iter().all(|k| all.accepts(k)));
        let star = EventFilter::parse(&events(&["*"]), "e").unwrap();
        assert!(star.accepts("drift.detected"));
        let some = EventFilter::parse(&events(&["job.*", "drift.detected"]), "e").unwrap();
        let accepted: Vec<&str> = kind::ALL
            .iter()
            .copied()
            .filter(|k| some.accepts(k))
            .collect();
        assert_eq!(
            accepted,
            [
                "job.started",
                "job.finished",
                "job.failed",
                "drift.detected"
            ]
        );
        for bad in ["job.finshed", "jobs.*", "job*", "", "model.registered.*"] {
            let message = EventFilter::parse(&events(&["job.started", bad]), "hooks[0].events")
                .unwrap_err()
                .to_string();
            assert!(
                message.starts_with("hooks[0].events[1]: unknown event kind"),
                "{bad:?}: {message}"
            );
            assert!(message.contains("checkpoint.committed"), "{message}");
        }
    }

    #[test]
    fn webhook_needs_a_usable_url() {
        let mut hook = spec(HookSink::Webhook);
        assert_eq!(error(&hook), "hooks[2].url: required for a webhook sink");
        hook.url = Some("ftp://example.com/x".into());
        assert!(error(&hook).starts_with("hooks[2].url: \"ftp://example.com/x\" is not an http"));
        hook.url = Some("http//nope".into());
        assert!(error(&hook).starts_with("hooks[2].url: \"http//nope\" is not a URL"));
        hook.url = Some("https://example.com/hook".into());
        let config = resolve(&hook, 2, "hooks").unwrap();
        assert!(matches!(
            config.target,
            Target::Webhook { secret: None, .. }
        ));
    }

    #[test]
    fn secrets_come_from_files_without_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "k3y\n").unwrap();
        let mut hook = spec(HookSink::Webhook);
        hook.url = Some("http://127.0.0.1:9/".into());
        hook.secret_file = Some(path.clone());
        let config = resolve(&hook, 0, "hooks").unwrap();
        let Target::Webhook {
            secret: Some(secret),
            ..
        } = &config.target
        else {
            panic!("no secret: {config:?}");
        };
        assert_eq!(secret.0, b"k3y");
        assert_eq!(format!("{secret:?}"), "Secret(3 bytes)");

        std::fs::write(&path, " \n").unwrap();
        assert_eq!(
            error(&hook),
            format!(
                "hooks[2].secret_file: {} is empty (it should hold the webhook's HMAC key)",
                path.display()
            )
        );
        hook.secret_file = Some(dir.path().join("missing"));
        let message = error(&hook);
        assert!(
            message.starts_with(&format!(
                "hooks[2].secret_file: read {}: ",
                dir.path().join("missing").display()
            )),
            "{message}"
        );
        hook.secret_env = Some("X".into());
        assert_eq!(
            error(&hook),
            "hooks[2].secret_env: give secret_env or secret_file, not both"
        );
    }

    #[test]
    fn fields_of_other_sinks_are_refused() {
        let mut hook = spec(HookSink::Log);
        hook.url = Some("http://x/".into());
        assert_eq!(
            error(&hook),
            "hooks[2].url: only a webhook sink has a url; this hook's sink is \"log\""
        );
        let mut hook = spec(HookSink::Command);
        hook.command = vec!["true".into()];
        hook.secret_env = Some("KEY".into());
        assert_eq!(
            error(&hook),
            "hooks[2].secret_env: only a webhook sink signs events; this hook's sink is \"command\""
        );
        let mut hook = spec(HookSink::Webhook);
        hook.url = Some("http://x/".into());
        hook.command = vec!["true".into()];
        assert_eq!(
            error(&hook),
            "hooks[2].command: only a command sink runs a command; this hook's sink is \"webhook\""
        );
    }

    #[test]
    fn commands_must_exist() {
        let mut hook = spec(HookSink::Command);
        assert_eq!(
            error(&hook),
            "hooks[2].command: required for a command sink: the program and its arguments"
        );
        hook.command = vec!["kiln-no-such-program-here".into()];
        assert_eq!(
            error(&hook),
            "hooks[2].command[0]: program \"kiln-no-such-program-here\" is not on PATH"
        );
        hook.command = vec!["/nonexistent/kiln-hook".into()];
        assert_eq!(
            error(&hook),
            "hooks[2].command[0]: program \"/nonexistent/kiln-hook\" is not a file"
        );
        hook.command = vec!["sh".into(), "-c".into(), "cat".into()];
        let config = resolve(&hook, 2, "hooks").unwrap();
        let Target::Command { program, args } = &config.target else {
            panic!("{config:?}");
        };
        assert_eq!(program, "sh");
        assert_eq!(args, &["-c", "cat"]);
        assert!(!program_exists("sh", None));
    }

    #[test]
    fn timeouts_must_be_positive_and_finite() {
        let mut hook = spec(HookSink::Log);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300] {
            hook.timeout_secs = bad;
            let message = error(&hook);
            assert!(
                message.starts_with("hooks[2].timeout_secs: ") && message.contains("above 0"),
                "{bad}: {message}"
            );
        }
        hook.timeout_secs = 0.25;
        assert_eq!(
            resolve(&hook, 2, "hooks").unwrap().timeout,
            Duration::from_millis(250)
        );
    }
}
