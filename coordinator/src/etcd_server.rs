//! Real etcd processes for tests and benchmarks: [`EtcdServer`] (one member)
//! and [`EtcdCluster`] (several, with SIGKILL and restart of a member).
//!
//! Every member listens on loopback on ports picked free at start, keeps its
//! data in a temporary folder removed on drop, and writes its log next to it
//! (the last lines are quoted when a start fails). Processes are killed when
//! the value is dropped, and also when this process dies, however it dies
//! (`PR_SET_PDEATHSIG`), so a killed test run leaves no etcd behind.
//!
//! The `etcd` binary is taken from `KILN_ETCD_BIN`, else from `PATH`
//! (`scripts/bootstrap.sh` installs it).
//!
//! [`EtcdServerOptions`] serve clients over TLS (optionally requiring client
//! certificates) and set etcd's auth token TTL; authentication itself is
//! enabled by the test, through etcd's API, once the member runs. Health and
//! leadership are always read from a separate plain-HTTP metrics port, so they
//! work whatever the client port requires.
//!
//! Starting is synchronous (under a second per member): system tests that drive
//! processes call it from plain `#[test]`s; async tests call it before their
//! first await or from `spawn_blocking`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a member may take to report healthy after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Attempts at starting with fresh ports when a member dies at start (another
/// process took a port between our probe and etcd's bind).
const START_ATTEMPTS: usize = 3;

/// How the started members serve clients.
#[derive(Debug, Clone, Default)]
pub struct EtcdServerOptions {
    /// Serve the client port over TLS only.
    pub tls: Option<ServerTls>,
    /// etcd's `--auth-token-ttl`: how long an unused simple token stays valid
    /// (etcd's default is 300 s); whole seconds, at least one.
    pub auth_token_ttl: Option<Duration>,
}

/// The files of a TLS client port.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The server's certificate (PEM), valid for `127.0.0.1`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signed `cert`: the `ca=` of [`EtcdServer::url`].
    pub ca: PathBuf,
    /// Require a client certificate signed by `ca` (etcd's `--client-cert-auth`).
    pub client_cert_auth: bool,
}

/// One etcd member on loopback with its own data folder.
///
/// ```no_run
/// # fn main() -> kiln_coordinator::Result<()> {
/// let etcd = kiln_coordinator::etcd_server::EtcdServer::start()?;
/// println!("store url: {}", etcd.url()); // etcd://127.0.0.1:PORT
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct EtcdServer {
    cluster: EtcdCluster,
}

impl EtcdServer {
    /// Starts a single-member etcd and waits until it serves requests.
    /// Errors name the cause: no `etcd` binary, or the member did not become
    /// healthy (with the end of its log).
    pub fn start() -> Result<EtcdServer> {
        Self::start_with(EtcdServerOptions::default())
    }

    /// Starts a single-member etcd with TLS and other options.
    pub fn start_with(options: EtcdServerOptions) -> Result<EtcdServer> {
        Ok(EtcdServer {
            cluster: EtcdCluster::start_with(1, options)?,
        })
    }

    /// The store URL for [`crate::store::connect`]: `etcd://127.0.0.1:PORT`,
    /// or `etcds://127.0.0.1:PORT?ca=PATH` with TLS (add `&cert=...` for
    /// `client_cert_auth`, `&user=...` once auth is on).
    pub fn url(&self) -> String {
        self.cluster.url()
    }

    /// The client endpoint, `127.0.0.1:PORT`, as one element.
    pub fn endpoints(&self) -> Vec<String> {
        self.cluster.endpoints()
    }
}

/// An n-member etcd cluster on loopback.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    /// Holds every member's data folder and log; removed on drop.
    dir: tempfile::TempDir,
    options: EtcdServerOptions,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP port of `/health` and `/metrics`.
    metrics_port: u16,
    /// Running process; `None` once killed.
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `members` etcd members (at least one) that form one cluster, and
    /// waits until every member is healthy (the cluster has a leader).
    pub fn start(members: usize) -> Result<EtcdCluster> {
        Self::start_with(members, EtcdServerOptions::default())
    }

    /// Starts `members` members that serve clients as `options` say.
    pub fn start_with(members: usize, options: EtcdServerOptions) -> Result<EtcdCluster> {
        if members == 0 {
            return Err(Error::invalid(
                "etcd cluster size",
                "must be at least 1 member",
            ));
        }
        let binary = etcd_binary()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&binary, members, &options) {
                Ok(cluster) => return Ok(cluster),
                // A member that exited at once most likely lost a port race:
                // try again on fresh ports.
                Err(StartError::Exited(error)) => last_error = Some(error),
                Err(StartError::Fatal(error)) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::unavailable("start etcd: no attempt was made")))
    }

    fn start_once(
        binary: &Path,
        size: usize,
        options: &EtcdServerOptions,
    ) -> Result<EtcdCluster, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-etcd-")
            .tempdir()
            .map_err(|error| StartError::Fatal(io_error("create an etcd data folder", error)))?;
        let ports = free_ports(size * 3)
            .map_err(|error| StartError::Fatal(io_error("pick free ports for etcd", error)))?;
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[3 * i],
                peer_port: ports[3 * i + 1],
                metrics_port: ports[3 * i + 2],
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            members,
            dir,
            options: options.clone(),
        };
        for i in 0..size {
            let child = cluster.spawn_member(binary, i).map_err(StartError::Fatal)?;
            cluster.members[i].child = Some(child);
        }
        for i in 0..size {
            cluster.wait_ready(i)?;
        }
        Ok(cluster)
    }

    /// The store URL for [`crate::store::connect`]: `etcd://127.0.0.1:P1,127.0.0.1:P2,...`,
    /// or `etcds://...?ca=PATH` with TLS.
    pub fn url(&self) -> String {
        match &self.options.tls {
            None => format!("etcd://{}", self.endpoints().join(",")),
            Some(tls) => format!(
                "etcds://{}?ca={}",
                self.endpoints().join(","),
                tls.ca.display()
            ),
        }
    }

    /// The members' client endpoints (`127.0.0.1:PORT`), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The number of members (running or killed).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never: [`start`](Self::start) refuses 0).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The index of the member that is leader now, asked of the running
    /// members (their `etcd_server_is_leader` metric). Waits up to a few
    /// seconds for an election in progress.
    pub fn leader_index(&self) -> Result<usize> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for (i, member) in self.members.iter().enumerate() {
                if member.child.is_none() {
                    continue;
                }
                if let Ok(metrics) = http_get(member.metrics_port, "/metrics")
                    && metrics
                        .lines()
                        .any(|line| line.trim() == "etcd_server_is_leader 1")
                {
                    return Ok(i);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::unavailable(format!(
                    "etcd cluster has no leader after {READY_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs member `i` (its data folder stays, for [`restart`](Self::restart)).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let member = self.member_mut(i)?;
        let name = member.name.clone();
        let Some(mut child) = member.child.take() else {
            return Err(Error::invalid(
                "etcd member",
                format!("member {i} ({name}) is not running"),
            ));
        };
        // `Child::kill` is SIGKILL on Unix.
        child
            .kill()
            .map_err(|error| io_error(&format!("kill etcd member {name}"), error))?;
        child
            .wait()
            .map_err(|error| io_error(&format!("reap etcd member {name}"), error))?;
        Ok(())
    }

    /// Starts killed member `i` again on its data folder and ports, and waits
    /// until it is healthy (which needs the cluster to have quorum).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let member = self.member_mut(i)?;
        if member.child.is_some() {
            return Err(Error::invalid(
                "etcd member",
                format!("member {i} ({}) is running; kill it first", member.name),
            ));
        }
        let binary = etcd_binary()?;
        let child = self.spawn_member(&binary, i)?;
        self.members[i].child = Some(child);
        self.wait_ready(i).map_err(StartError::into_error)
    }

    fn member_mut(&mut self, i: usize) -> Result<&mut Member> {
        let size = self.members.len();
        self.members.get_mut(i).ok_or_else(|| {
            Error::invalid(
                "etcd member",
                format!("index {i} is out of range; the cluster has {size} members"),
            )
        })
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    fn spawn_member(&self, binary: &Path, i: usize) -> Result<Child> {
        let member = &self.members[i];
        let peer_url = |m: &Member| format!("http://127.0.0.1:{}", m.peer_port);
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let client_url = format!("{scheme}://127.0.0.1:{}", member.client_port);
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, peer_url(m)))
            .collect::<Vec<_>>()
            .join(",");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .map_err(|error| io_error("create the etcd log", error))?;
        let log_err = log
            .try_clone()
            .map_err(|error| io_error("open the etcd log", error))?;
        let mut command = Command::new(binary);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.dir.path().join(&member.name))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(peer_url(member))
            .arg("--initial-advertise-peer-urls")
            .arg(peer_url(member))
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-token")
            .arg(format!("kiln-test-{}", self.members[0].client_port))
            .arg("--initial-cluster-state")
            .arg("new")
            // Defaults (100 ms / 1 s): a loaded 2-core test machine must not
            // see spurious elections; a failover still takes about 2 s.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            // Small snapshots keep a restarted member's catch-up short.
            .args(["--snapshot-count", "10000"])
            .args(["--log-level", "warn"])
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", member.metrics_port))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(tls) = &self.options.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key);
            if tls.client_cert_auth {
                command
                    .arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(&tls.ca);
            }
        }
        if let Some(ttl) = self.options.auth_token_ttl {
            command
                .arg("--auth-token-ttl")
                .arg(ttl.as_secs().max(1).to_string());
        }
        // Settings meant for another etcd must not leak into this one.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        spawn_tied_to_process(command).map_err(|error| {
            io_error(
                &format!("start {} for etcd member {}", binary.display(), member.name),
                error,
            )
        })
    }

    /// Waits until member `i` answers `/health` with `true`.
    fn wait_ready(&mut self, i: usize) -> Result<(), StartError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let port = self.members[i].metrics_port;
        loop {
            let exited = match self.members[i].child.as_mut() {
                Some(child) => child.try_wait().ok().flatten().map(|s| s.to_string()),
                None => Some("it is not running".to_string()),
            };
            if let Some(status) = exited {
                self.members[i].child = None;
                return Err(StartError::Exited(Error::unavailable(format!(
                    "etcd member {} exited at start ({status}); end of its log:\n{}",
                    self.members[i].name,
                    self.log_tail(i)
                ))));
            }
            if let Ok(body) = http_get(port, "/health")
                && body.contains(r#""health":"true""#)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartError::Fatal(Error::unavailable(format!(
                    "etcd member {} was not healthy within {READY_TIMEOUT:?}; end of its log:\n{}",
                    self.members[i].name,
                    self.log_tail(i)
                ))));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

enum StartError {
    /// A member process ended during start-up.
    Exited(Error),
    /// Anything else: retrying will not help.
    Fatal(Error),
}

impl StartError {
    fn into_error(self) -> Error {
        match self {
            StartError::Exited(error) | StartError::Fatal(error) => error,
        }
    }
}

fn io_error(what: &str, error: io::Error) -> Error {
    Error::unavailable(format!("{what}: {error}"))
}

/// The etcd binary: `KILN_ETCD_BIN`, else `etcd` found on `PATH`.
fn etcd_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KILN_ETCD_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(Error::unavailable(format!(
            "KILN_ETCD_BIN={} is not a file; unset it or point it at an etcd binary",
            path.display()
        )));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|candidate| candidate.is_file())
    });
    found.ok_or_else(|| {
        Error::unavailable("no etcd binary on PATH: run ./scripts/bootstrap.sh (it installs etcd)")
    })
}

/// `count` distinct ports that were free a moment ago. They are probed all at
/// once (every listener held until the last is bound) so that none repeats.
fn free_ports(count: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// A tiny HTTP/1.0 GET against a member's client port (etcd serves `/health`
/// and `/metrics` there), returning the body.
fn http_get(port: u16, path: &str) -> io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!(
            "HTTP {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_string())
}

/// Spawns `command` so that the child is SIGKILLed when this process dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not
/// the process; callers run on test threads, tokio workers and blocking-pool
/// threads that come and go. So every child is forked by one thread that lives
/// as long as the process.
fn spawn_tied_to_process(mut command: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // the async-signal-safe `prctl`.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    static SPAWNER: OnceLock<Result<Mutex<mpsc::Sender<Request>>, String>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, requests) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("kiln-etcd-spawner".into())
            .spawn(move || {
                for (mut command, reply) in requests {
                    let _ = reply.send(command.spawn());
                }
            })
            .map(|_| Mutex::new(sender))
            .map_err(|error| format!("start the etcd spawner thread: {error}"))
    });
    let spawner = spawner
        .as_ref()
        .map_err(|error| io::Error::other(error.clone()))?;
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((command, reply))
        .map_err(|_| io::Error::other("the etcd spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the etcd spawner thread is gone"))?
}
