//! All-reduce bandwidth of kiln's ring at world size 2 on one host (shared
//! memory, or loopback TCP with `--transport tcp`): the
//! kiln half of the side-by-side with PyTorch gloo (bench/gloo_allreduce.py
//! follows the same protocol; bench/allreduce.py runs both and prints the table).
//!
//! One invocation runs both ranks: rank 0 (this process) binds its listener,
//! re-executes this binary with `--rank 1`, learns rank 1's address from its
//! first stdout line and hands it the full peer list on stdin. Then, per size:
//!
//! - one checked all-reduce (rank r holds r + 1 everywhere; the sum must be
//!   world_size * (world_size + 1) / 2), after which the buffer is zeroed;
//! - `warmup` untimed all-reduces;
//! - `iters` timed all-reduces, each preceded by a 1-element all-reduce so that
//!   both ranks start together; rank 0 times the big one.
//!
//! algbw = size in bytes / median time, in GB/s (1e9 bytes/s), the figure
//! nccl-tests calls "algbw". Rank 0 prints one JSON line per size on stdout.
//! This is a benchmark, not a test: it reports, it never judges timings.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use kiln_trainer::collective::AbortHandle;
use kiln_trainer::collective::ring::{RingCollective, RingSecret, Transport};

const WORLD_SIZE: usize = 2;
/// Rendezvous round handed to the ring; any value works as long as both ranks agree.
const ROUND: u64 = 1;

#[derive(Parser, Debug)]
#[command(about = "All-reduce bandwidth of kiln's ring (world size 2, one host)")]
struct Args {
    /// Comma-separated tensor sizes in MiB (float32).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    sizes_mib: Vec<usize>,
    /// Untimed iterations per size.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed iterations per size.
    #[arg(long, default_value_t = 30)]
    iters: usize,
    /// Deadline of every read from the peer, and of connecting, in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout_secs: f64,
    /// The ring's transport between the two ranks: `auto` (shared memory, as
    /// `kiln run` uses between ranks on one host) or `tcp` (loopback TCP).
    #[arg(long, default_value = "auto", value_parser = ["auto", "tcp"])]
    transport: String,
    /// Internal: set on the re-executed second process.
    #[arg(long, default_value_t = 0, hide = true)]
    rank: usize,
}

fn main() {
    if let Err(err) = run(Args::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    ensure!(args.iters > 0, "--iters must be positive");
    ensure!(
        args.sizes_mib.iter().all(|&s| s > 0),
        "--sizes-mib must be positive"
    );
    ensure!(args.timeout_secs > 0.0, "--timeout-secs must be positive");
    let timeout = Duration::from_secs_f64(args.timeout_secs);
    let listener = TcpListener::bind("127.0.0.1:0").context("bind loopback listener")?;
    let own_addr = listener
        .local_addr()
        .context("read listener address")?
        .to_string();
    match args.rank {
        0 => run_rank0(&args, listener, own_addr, timeout),
        1 => run_rank1(&args, listener, own_addr, timeout),
        rank => bail!("--rank {rank}: only ranks 0 and 1 exist"),
    }
}

/// Rank 0: starts rank 1, exchanges addresses, measures, reports.
fn run_rank0(
    args: &Args,
    listener: TcpListener,
    own_addr: String,
    timeout: Duration,
) -> Result<()> {
    let exe = std::env::current_exe().context("find own executable")?;
    let sizes = args
        .sizes_mib
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let child = Command::new(exe)
        .args(["--rank", "1", "--sizes-mib", &sizes])
        .args([
            "--warmup",
            &args.warmup.to_string(),
            "--iters",
            &args.iters.to_string(),
        ])
        .args(["--timeout-secs", &args.timeout_secs.to_string()])
        .args(["--transport", &args.transport])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start rank 1")?;
    let mut child = KillOnDrop(Some(child));
    let child_ref = child.0.as_mut().expect("child present until waited");

    let mut line = String::new();
    let stdout = child_ref.stdout.take().context("take rank 1's stdout")?;
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("read rank 1's address")?;
    let peer_addr = line
        .trim()
        .strip_prefix("listening ")
        .with_context(|| format!("rank 1 sent {line:?} instead of its address"))?
        .to_string();
    let peers = vec![own_addr, peer_addr];
    let mut stdin = child_ref.stdin.take().context("take rank 1's stdin")?;
    // The round's secret travels with the peer list, as it does in a plan.
    let secret = RingSecret::random().context("draw the ring secret")?;
    let secret_hex: String = secret
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    writeln!(stdin, "{} {secret_hex}", peers.join(" ")).context("send peer list to rank 1")?;
    drop(stdin);

    let mut ring = connect(args, 0, &peers, &listener, &secret, timeout)
        .context("connect the ring (rank 0)")?;
    for &mib in &args.sizes_mib {
        let times = measure(&mut ring, 0, mib, args)?;
        let median = median(&times);
        let size_bytes = mib << 20;
        let row = serde_json::json!({
            "bench": "allreduce",
            "impl": "kiln",
            "world_size": WORLD_SIZE,
            "size_bytes": size_bytes,
            "warmup": args.warmup,
            "iters": args.iters,
            "median_s": median,
            "min_s": times.iter().copied().fold(f64::INFINITY, f64::min),
            "max_s": times.iter().copied().fold(0.0, f64::max),
            "algbw_gbps": size_bytes as f64 / median / 1e9,
        });
        println!("{row}");
    }
    drop(ring);

    let status = child
        .0
        .take()
        .expect("child present until waited")
        .wait()
        .context("wait for rank 1")?;
    ensure!(status.success(), "rank 1 failed ({status})");
    Ok(())
}

/// Rank 1: announces its address, learns the peer list, follows rank 0.
fn run_rank1(
    args: &Args,
    listener: TcpListener,
    own_addr: String,
    timeout: Duration,
) -> Result<()> {
    println!("listening {own_addr}");
    std::io::stdout().flush().context("announce address")?;
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("read peer list")?;
    let mut words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    ensure!(
        words.len() == WORLD_SIZE + 1,
        "peer list {line:?} does not name {WORLD_SIZE} ranks and the ring secret"
    );
    let secret_hex = words.pop().unwrap_or_default();
    let secret_bytes = (0..secret_hex.len() / 2)
        .map(|i| u8::from_str_radix(&secret_hex[2 * i..2 * i + 2], 16))
        .collect::<std::result::Result<Vec<u8>, _>>()
        .with_context(|| format!("ring secret {secret_hex:?} is not hex"))?;
    let secret = RingSecret::from_bytes(&secret_bytes).map_err(anyhow::Error::msg)?;
    let peers = words;
    ensure!(
        peers[1] == own_addr,
        "peer list {line:?} does not hold this rank's address {own_addr}"
    );
    let mut ring = connect(args, 1, &peers, &listener, &secret, timeout)
        .context("connect the ring (rank 1)")?;
    for &mib in &args.sizes_mib {
        measure(&mut ring, 1, mib, args)?;
    }
    Ok(())
}

/// Runs the protocol for one size; returns the timed iterations' durations in seconds.
fn connect(
    args: &Args,
    rank: usize,
    peers: &[String],
    listener: &TcpListener,
    secret: &RingSecret,
    timeout: Duration,
) -> kiln_trainer::collective::Result<RingCollective> {
    let transport = match args.transport.as_str() {
        "tcp" => Transport::Tcp,
        _ => Transport::Auto,
    };
    RingCollective::connect_abortable(
        ROUND,
        rank,
        peers,
        listener,
        secret,
        timeout,
        transport,
        AbortHandle::default(),
    )
}

fn measure(ring: &mut RingCollective, rank: usize, mib: usize, args: &Args) -> Result<Vec<f64>> {
    let numel = (mib << 20) / std::mem::size_of::<f32>();
    let mut buf = vec![(rank + 1) as f32; numel];
    ring.all_reduce_sum_f32(&mut buf)
        .with_context(|| format!("all-reduce {mib} MiB (check)"))?;
    let expected = (WORLD_SIZE * (WORLD_SIZE + 1) / 2) as f32;
    if let Some(i) = buf.iter().position(|&v| v != expected) {
        bail!(
            "all-reduce of {mib} MiB: element {i} is {}, expected {expected}",
            buf[i]
        );
    }
    // Zeros keep every later sum finite however many iterations run.
    buf.fill(0.0);
    for _ in 0..args.warmup {
        ring.all_reduce_sum_f32(&mut buf)
            .with_context(|| format!("all-reduce {mib} MiB (warm-up)"))?;
    }
    let mut sync = [0.0f32];
    let mut times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        ring.all_reduce_sum_f32(&mut sync)
            .context("synchronise ranks")?;
        let start = Instant::now();
        ring.all_reduce_sum_f32(&mut buf)
            .with_context(|| format!("all-reduce {mib} MiB"))?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// Kills rank 1 if rank 0 gives up before waiting for it, so no process lingers.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
