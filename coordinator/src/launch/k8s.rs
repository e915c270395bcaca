//! The Kubernetes backend: a ConfigMap with the spec, a headless Service and an
//! indexed Job with one agent pod per node.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Launch, LaunchError, input, internal};

/// Where the ConfigMap's spec is mounted in the agent pods.
const K8S_SPEC_DIR: &str = "/etc/kiln";
const K8S_SPEC_FILE: &str = "job.toml";
/// The agent's `--data-dir` in a pod: an `emptyDir`, so logs (and local
/// checkpoints) outlive a container restart and the image may be read-only.
const K8S_DATA_DIR: &str = "/var/lib/kiln";
/// The agent's Prometheus endpoint in a pod (its own network namespace, so a
/// fixed port cannot collide).
const K8S_METRICS_PORT: u16 = 9400;

/// A DNS-1123 label from a job id: lower case, `-` for anything else, at most
/// 47 characters so that `NAME-spec` and the pods' hostnames `NAME-INDEX` fit
/// in 63.
fn k8s_name(job_id: &str) -> Result<String, LaunchError> {
    let mut name = String::new();
    for c in job_id.chars() {
        let c = if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            '-'
        };
        if !(c == '-' && (name.is_empty() || name.ends_with('-'))) {
            name.push(c);
        }
    }
    name.truncate(47);
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        return Err(input(format!(
            "--job-id: {job_id:?} has no letter or digit to name Kubernetes objects with"
        )));
    }
    Ok(name)
}

fn check_dns_label(field: &str, value: &str) -> Result<(), LaunchError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(input(format!(
            "{field}: {value:?} is not a Kubernetes name; use 1 to 63 lower-case letters, \
             digits and '-', starting and ending with a letter or digit"
        )))
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ObjectMeta {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigMap {
    api_version: &'static str,
    kind: &'static str,
    metadata: ObjectMeta,
    data: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Service {
    api_version: &'static str,
    kind: &'static str,
    metadata: ObjectMeta,
    spec: ServiceSpec,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: &'static str,
    selector: BTreeMap<String, String>,
    /// DNS names exist from pod start, before any readiness.
    publish_not_ready_addresses: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Job {
    api_version: &'static str,
    kind: &'static str,
    metadata: ObjectMeta,
    spec: JobSpecK8s,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JobSpecK8s {
    completion_mode: &'static str,
    completions: usize,
    parallelism: usize,
    backoff_limit: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    active_deadline_seconds: Option<u64>,
    template: PodTemplate,
}

#[derive(Serialize)]
struct PodTemplate {
    metadata: PodMeta,
    spec: PodSpec,
}

#[derive(Serialize)]
struct PodMeta {
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    restart_policy: &'static str,
    subdomain: String,
    containers: Vec<Container>,
    volumes: Vec<Volume>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    name: &'static str,
    image: String,
    command: Vec<String>,
    args: Vec<String>,
    ports: Vec<ContainerPort>,
    env: Vec<EnvVar>,
    resources: Resources,
    volume_mounts: Vec<VolumeMount>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    name: &'static str,
    container_port: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvVar {
    name: &'static str,
    value_from: EnvVarSource,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EnvVarSource {
    field_ref: FieldRef,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FieldRef {
    field_path: &'static str,
}

#[derive(Serialize)]
struct Resources {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    requests: BTreeMap<&'static str, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    limits: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    name: &'static str,
    mount_path: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    read_only: Option<bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Volume {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    config_map: Option<ConfigMapVolume>,
    #[serde(skip_serializing_if = "Option::is_none")]
    empty_dir: Option<EmptyDir>,
}

#[derive(Serialize)]
struct ConfigMapVolume {
    name: String,
    items: Vec<KeyToPath>,
}

#[derive(Serialize)]
struct KeyToPath {
    key: &'static str,
    path: &'static str,
}

#[derive(Serialize)]
struct EmptyDir {
    #[serde(skip_serializing_if = "Option::is_none")]
    medium: Option<&'static str>,
}

/// Kubernetes refuses a ConfigMap over 1 MiB; a little is kept for metadata.
const MAX_CONFIG_MAP_BYTES: usize = 1000 * 1024;

/// The environment variable the pods' `--node` is built from.
const NODE_INDEX_ENV: &str = "KILN_NODE_INDEX";

/// The manifests for `l`, as one multi-document YAML file.
pub fn render(l: &Launch) -> Result<String, LaunchError> {
    let launch = &l.spec.launch;
    let image = match launch.image.as_deref() {
        Some(image) if !image.is_empty() && !image.chars().any(char::is_whitespace) => image,
        Some(image) => {
            return Err(input(format!(
                "launch.image: {image:?} is not a container image reference"
            )));
        }
        None => {
            return Err(input(
                "no container image: set launch.image in the spec or pass --image \
                 (an image with kiln on its PATH, or at launch.kiln_bin)",
            ));
        }
    };
    let namespace = &launch.namespace;
    check_dns_label("launch.namespace", namespace)?;
    if l.spec_toml.len() > MAX_CONFIG_MAP_BYTES {
        return Err(input(format!(
            "the effective job spec is {} bytes; a ConfigMap holds at most \
             {MAX_CONFIG_MAP_BYTES} (list fewer data files, e.g. larger shards)",
            l.spec_toml.len()
        )));
    }
    let name = k8s_name(&l.job_id)?;
    let labels: BTreeMap<String, String> = [
        ("app.kubernetes.io/name", "kiln"),
        ("app.kubernetes.io/instance", name.as_str()),
        ("app.kubernetes.io/component", "agent"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let meta = |name: String| ObjectMeta {
        name,
        namespace: namespace.clone(),
        labels: labels.clone(),
    };
    let selector: BTreeMap<String, String> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != "app.kubernetes.io/component")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    let config_map_name = format!("{name}-spec");
    let config_map = ConfigMap {
        api_version: "v1",
        kind: "ConfigMap",
        metadata: meta(config_map_name.clone()),
        data: [(K8S_SPEC_FILE.to_string(), l.spec_toml.clone())].into(),
    };
    let service = Service {
        api_version: "v1",
        kind: "Service",
        metadata: meta(name.clone()),
        spec: ServiceSpec {
            cluster_ip: "None",
            selector,
            publish_not_ready_addresses: true,
        },
    };

    let mut requests = BTreeMap::new();
    let mut limits = BTreeMap::new();
    if let Some(cpus) = launch.cpus_per_node {
        requests.insert("cpu", cpus.to_string());
    }
    if let Some(gb) = launch.memory_gb {
        requests.insert("memory", format!("{gb}Gi"));
        limits.insert("memory", format!("{gb}Gi"));
    }
    let gpus = launch.gpus_per_node;
    if gpus > 0 {
        // An extended resource: requests must equal limits.
        requests.insert("nvidia.com/gpu", gpus.to_string());
        limits.insert("nvidia.com/gpu", gpus.to_string());
    }
    let mut volume_mounts = vec![
        VolumeMount {
            name: "spec",
            mount_path: K8S_SPEC_DIR,
            read_only: Some(true),
        },
        VolumeMount {
            name: "data",
            mount_path: K8S_DATA_DIR,
            read_only: None,
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "spec",
            config_map: Some(ConfigMapVolume {
                name: config_map_name,
                items: vec![KeyToPath {
                    key: K8S_SPEC_FILE,
                    path: K8S_SPEC_FILE,
                }],
            }),
            empty_dir: None,
        },
        Volume {
            name: "data",
            config_map: None,
            empty_dir: Some(EmptyDir { medium: None }),
        },
    ];
    if gpus > 0 {
        // NCCL's shared-memory transport outgrows a container's 64 MiB /dev/shm.
        volume_mounts.push(VolumeMount {
            name: "dshm",
            mount_path: "/dev/shm",
            read_only: None,
        });
        volumes.push(Volume {
            name: "dshm",
            config_map: None,
            empty_dir: Some(EmptyDir {
                medium: Some("Memory"),
            }),
        });
    }
    let args = vec![
        "agent".to_string(),
        "--store".to_string(),
        l.store.clone(),
        "--job".to_string(),
        l.job_id.clone(),
        "--spec".to_string(),
        format!("{K8S_SPEC_DIR}/{K8S_SPEC_FILE}"),
        "--nproc".to_string(),
        l.nproc.to_string(),
        "--node".to_string(),
        // Kubernetes expands $(VAR) in args from the container's environment.
        format!("node-$({NODE_INDEX_ENV})"),
        "--data-dir".to_string(),
        K8S_DATA_DIR.to_string(),
        "--metrics-addr".to_string(),
        format!("0.0.0.0:{K8S_METRICS_PORT}"),
    ];
    let job = Job {
        api_version: "batch/v1",
        kind: "Job",
        metadata: meta(name.clone()),
        spec: JobSpecK8s {
            completion_mode: "Indexed",
            completions: l.nodes,
            parallelism: l.nodes,
            // Pod restarts the job survives; the same budget as the runtime's.
            backoff_limit: l.spec.elastic.max_failures,
            active_deadline_seconds: l.time_limit_secs,
            template: PodTemplate {
                metadata: PodMeta {
                    labels: labels.clone(),
                },
                spec: PodSpec {
                    // A failed agent restarts in place, keeps its index (its
                    // node identity) and rejoins the job.
                    restart_policy: "OnFailure",
                    subdomain: name.clone(),
                    containers: vec![Container {
                        name: "agent",
                        image: image.to_string(),
                        command: vec![launch.kiln_bin.clone()],
                        args,
                        ports: vec![ContainerPort {
                            name: "metrics",
                            container_port: K8S_METRICS_PORT,
                        }],
                        env: vec![EnvVar {
                            name: NODE_INDEX_ENV,
                            value_from: EnvVarSource {
                                field_ref: FieldRef {
                                    field_path: "metadata.annotations['batch.kubernetes.io/job-completion-index']",
                                },
                            },
                        }],
                        resources: Resources { requests, limits },
                        volume_mounts,
                    }],
                    volumes,
                },
            },
        },
    };

    let header = format!(
        "# Generated by `kiln launch k8s` from {:?}.\n\
         # Apply with `kubectl apply -f FILE`; see docs/launch.md. Pod i of the Job runs\n\
         # `kiln agent --node node-i`; the agents meet in etcd ({}) as job {:?}.\n",
        l.source, l.store, l.job_id
    );
    let docs = [
        serde_yaml_ng::to_string(&config_map),
        serde_yaml_ng::to_string(&service),
        serde_yaml_ng::to_string(&job),
    ];
    let mut out = header;
    for doc in docs {
        out.push_str("---\n");
        out.push_str(
            &doc.map_err(|e| internal(format!("write Kubernetes manifest as YAML: {e}")))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k8s_names_are_dns_labels() {
        assert_eq!(k8s_name("Digits_CNN.v2").ok(), Some("digits-cnn-v2".into()));
        assert_eq!(k8s_name("-a--b-").ok(), Some("a-b".into()));
        assert!(k8s_name("___").is_err());
        let long = k8s_name(&"x".repeat(64)).ok().unwrap_or_default();
        assert_eq!(long.len(), 47);
    }
}
