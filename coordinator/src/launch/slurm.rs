//! The Slurm backend: an `sbatch` script that runs one `kiln agent` per node
//! through `srun`.

use std::fmt::Write as _;

use super::{Launch, LaunchError, input};

/// `value` quoted for a POSIX shell: as is when it holds only safe characters,
/// else in single quotes (a `'` inside becomes `'\''`).
fn shell_quote(value: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !value.is_empty() && value.chars().all(safe) {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// A value on an `#SBATCH` line: sbatch reads these lines itself (no shell), so
/// whitespace, quotes and `#` would change their meaning.
fn sbatch_value(field: &str, value: &str) -> Result<String, LaunchError> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && !"'\"\\`$#;".contains(c));
    if ok {
        Ok(value.to_string())
    } else {
        Err(input(format!(
            "{field}: {value:?} cannot go on an #SBATCH line; use letters, digits and \
             punctuation other than quotes, '\\', '`', '$', '#' and ';', without spaces"
        )))
    }
}

/// Slurm's `--time`: `[D-]HH:MM:SS`.
fn slurm_time(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let hms = format!(
        "{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    );
    if days > 0 {
        format!("{days}-{hms}")
    } else {
        hms
    }
}

/// The per-task program `srun` runs on every node, under `bash -c`. It is
/// constant text (every value comes through the environment or `"$@"`), so no
/// user value needs quoting twice: it writes the spec into a private folder
/// that `mktemp -d` makes under the node's `$TMPDIR` (mode 0700, a name no
/// other user can predict or pre-create), then runs the agent command given
/// as arguments with that spec and the node's identity appended, evaluated on
/// that node. The folder is left for the job's temporary space to be cleaned
/// with it (the agent replaces this shell).
const SLURM_TASK: &str = r#"umask 077 && KILN_SPEC_DIR=$(mktemp -d "${TMPDIR:-/tmp}/kiln-$SLURM_JOB_ID.XXXXXXXXXX") && cat <<<"$KILN_SPEC_TOML" > "$KILN_SPEC_DIR/job.toml" && exec "$@" --spec "$KILN_SPEC_DIR/job.toml" --node "${SLURMD_NODENAME:-node-$SLURM_NODEID}""#;

/// Largest spec the script passes through the environment: Linux refuses a
/// single environment string over 128 KiB (`MAX_ARG_STRLEN`).
const MAX_ENV_SPEC_BYTES: usize = 120 * 1024;

/// The sbatch script for `l`.
pub fn render(l: &Launch) -> Result<String, LaunchError> {
    let launch = &l.spec.launch;
    if l.spec_toml.len() > MAX_ENV_SPEC_BYTES {
        return Err(input(format!(
            "the effective job spec is {} bytes; the sbatch script passes it to the nodes \
             in an environment variable, which holds at most {MAX_ENV_SPEC_BYTES} bytes \
             (list fewer data files, e.g. larger shards)",
            l.spec_toml.len()
        )));
    }
    let job = &l.job_id;
    let mut sbatch = vec![
        format!("--job-name={}", sbatch_value("--job-id", job)?),
        format!("--nodes={}", l.nodes),
        "--ntasks-per-node=1".to_string(),
    ];
    if launch.gpus_per_node > 0 {
        sbatch.push(format!("--gpus-per-node={}", launch.gpus_per_node));
    }
    if let Some(cpus) = launch.cpus_per_node {
        sbatch.push(format!("--cpus-per-task={cpus}"));
    }
    if let Some(gb) = launch.memory_gb {
        sbatch.push(format!("--mem={gb}G"));
    }
    if let Some(partition) = &launch.partition {
        sbatch.push(format!(
            "--partition={}",
            sbatch_value("launch.partition", partition)?
        ));
    }
    if let Some(account) = &launch.account {
        sbatch.push(format!(
            "--account={}",
            sbatch_value("launch.account", account)?
        ));
    }
    if let Some(secs) = l.time_limit_secs {
        sbatch.push(format!("--time={}", slurm_time(secs)));
    }
    sbatch.push("--requeue".to_string());
    sbatch.push("--open-mode=append".to_string());
    sbatch.push(format!("--output=kiln-{job}-%j.out"));
    // Elastic: when the job can train on fewer nodes than it allocates, a lost
    // node should not end the allocation; the survivors carry on. Otherwise
    // Slurm requeues the whole job (--requeue) and it resumes from its latest
    // checkpoint.
    let elastic = l.spec.elastic.min_nodes < l.nodes;
    if elastic {
        sbatch.push("--no-kill".to_string());
    }

    let mut srun = vec![
        "srun".to_string(),
        "--export=ALL".to_string(),
        "--nodes=\"$SLURM_JOB_NUM_NODES\"".to_string(),
        "--ntasks-per-node=1".to_string(),
    ];
    if let Some(cpus) = launch.cpus_per_node {
        // srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05).
        srun.push(format!("--cpus-per-task={cpus}"));
    }
    if launch.gpus_per_node > 0 {
        srun.push(format!("--gpus-per-node={}", launch.gpus_per_node));
    }
    // One agent exiting (a failed node) must not take the others down, and
    // the others must be allowed to finish: the rendezvous handles the loss.
    srun.push("--kill-on-bad-exit=0".to_string());
    srun.push("--wait=0".to_string());
    if elastic {
        // Without it the step ends when one of its nodes fails.
        srun.push("--no-kill".to_string());
    }
    let agent = [
        shell_quote(&launch.kiln_bin),
        "agent".to_string(),
        "--store".to_string(),
        shell_quote(&l.store),
        "--job".to_string(),
        shell_quote(job),
        "--nproc".to_string(),
        l.nproc.to_string(),
    ];

    let mut s = String::new();
    let w = &mut s;
    // Writing to a String cannot fail.
    let _ = writeln!(w, "#!/bin/bash");
    let _ = writeln!(w, "# Generated by `kiln launch slurm` from {:?}.", l.source);
    let _ = writeln!(
        w,
        "# Submit with `sbatch FILE`; see docs/launch.md. Every node runs one kiln agent;"
    );
    let _ = writeln!(w, "# the agents meet in etcd ({}) as job {job:?}.", l.store);
    for option in &sbatch {
        let _ = writeln!(w, "#SBATCH {option}");
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "set -euo pipefail");
    let _ = writeln!(
        w,
        ": \"${{SLURM_JOB_ID:?this script runs under Slurm: submit it with sbatch}}\""
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "# Requeue-friendly: the kiln job id is fixed in this script, so a requeued run\n\
         # (node failure, preemption, `scontrol requeue`) rejoins the same job in etcd and\n\
         # resumes from its latest checkpoint; the log is appended to (--open-mode=append)."
    );
    if elastic {
        let _ = writeln!(
            w,
            "# Elastic: elastic.min_nodes = {} of {} nodes, so a lost node does not end the\n\
             # allocation (--no-kill); the remaining agents continue in a new round.",
            l.spec.elastic.min_nodes, l.nodes
        );
    }
    let _ = writeln!(
        w,
        "echo \"kiln: job {job}, slurm job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, \
         nodes $SLURM_JOB_NUM_NODES\" >&2"
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "# The effective job spec; each task writes it to a private node-local folder."
    );
    let _ = writeln!(w, "export KILN_SPEC_TOML={}", shell_quote(&l.spec_toml));
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "# One task per node; its --node is evaluated on that node (the single quotes\n\
         # keep this shell from expanding it)."
    );
    let _ = writeln!(w, "{} \\", srun.join(" "));
    let _ = writeln!(w, "  bash -c {} kiln-task \\", shell_quote(SLURM_TASK));
    let _ = writeln!(w, "  {}", agent.join(" "));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_safe_words_and_quotes_the_rest() {
        assert_eq!(
            shell_quote("etcd://10.0.0.1:2379,h:2"),
            "etcd://10.0.0.1:2379,h:2"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's $HOME"), r"'it'\''s $HOME'");
    }

    #[test]
    fn slurm_time_uses_days_past_24_hours() {
        assert_eq!(slurm_time(90), "00:01:30");
        assert_eq!(slurm_time(12 * 3600), "12:00:00");
        assert_eq!(slurm_time(50 * 3600 + 61), "2-02:01:01");
    }
}
