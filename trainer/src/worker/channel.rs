//! The worker's side of its agent channel: the inherited socket, reports,
//! and the rounds the agent hands out (a newer one aborts the round in flight).

use std::io::Write;
use std::os::unix::net::UnixStream;

use kiln_proto::frame;
use kiln_proto::worker::{
    AgentMessage, Assignment, WorkerMessage, agent_message, worker_message::Kind as Report,
};

use crate::collective::AbortHandle;
use crate::error::{Context, Error, Result};

/// Takes ownership of the inherited agent channel `fd`, after checking it is
/// an open Unix stream socket.
pub(super) fn agent_channel(fd: i32) -> Result<UnixStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: fstat only writes the struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `fd` is only read.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(Error::invalid(format!(
            "agent channel: file descriptor {fd} is not open ({}); workers are started by an agent",
            std::io::Error::last_os_error()
        )));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(Error::invalid(format!(
            "agent channel: file descriptor {fd} is not a socket; workers are started by an agent"
        )));
    }
    // SAFETY: an open socket descriptor inherited from the agent for this
    // purpose only; nothing else in this process owns it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // It must not leak into processes this worker might start.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(stream)
}

/// Reports to the agent.
pub(super) struct Reporter {
    pub(super) stream: UnixStream,
}

impl Reporter {
    pub(super) fn send(&mut self, kind: Report) -> Result<()> {
        frame::write(&mut self.stream, &WorkerMessage { kind: Some(kind) })
            .context("send report to agent")
    }
}

/// The rounds a worker is handed: the agent-watch thread offers newer
/// assignments (aborting the round in flight), the training loop takes them.
#[derive(Clone, Default)]
pub(super) struct Rounds {
    inner: std::sync::Arc<(std::sync::Mutex<RoundsState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct RoundsState {
    pending: Option<Assignment>,
    current: AbortHandle,
}

impl Rounds {
    /// A newer assignment: it replaces any pending one and aborts the round in flight.
    pub(super) fn offer(&self, a: Assignment) {
        let (lock, ready) = &*self.inner;
        let mut state = lock.lock().expect("rounds lock");
        if state.pending.as_ref().is_some_and(|p| p.round >= a.round) {
            return;
        }
        state.pending = Some(a);
        state.current.abort();
        ready.notify_all();
    }

    /// Aborts the round in flight (the agent said stop).
    pub(super) fn abort(&self) {
        self.inner.0.lock().expect("rounds lock").current.abort();
    }

    /// The newest pending assignment, if any.
    pub(super) fn take_pending(&self) -> Option<Assignment> {
        self.inner.0.lock().expect("rounds lock").pending.take()
    }

    /// Blocks until an assignment is pending, and takes it.
    pub(super) fn wait_next(&self) -> Assignment {
        let (lock, ready) = &*self.inner;
        let mut state = lock.lock().expect("rounds lock");
        loop {
            if let Some(a) = state.pending.take() {
                return a;
            }
            state = ready.wait(state).expect("rounds lock");
        }
    }

    /// A fresh abort handle for a round that starts now (an offer made after
    /// this call aborts it).
    pub(super) fn begin(&self) -> AbortHandle {
        let mut state = self.inner.0.lock().expect("rounds lock");
        state.current = AbortHandle::default();
        if state.pending.is_some() {
            state.current.abort();
        }
        state.current.clone()
    }
}

/// Relays the agent's later messages: a newer assignment goes to the training
/// loop (aborting the round in flight); stop, or the agent going away, aborts
/// the collectives and exits, so a worker never outlives its agent blocked on a peer.
pub(super) fn watch_agent(mut incoming: UnixStream, rounds: Rounds) {
    std::thread::Builder::new()
        .name("agent-watch".into())
        .spawn(move || {
            let reason = loop {
                match frame::read::<AgentMessage, _>(&mut incoming) {
                    Ok(Some(AgentMessage {
                        kind: Some(agent_message::Kind::Assignment(a)),
                    })) => {
                        tracing::info!(round = a.round, "newer round assigned");
                        rounds.offer(a);
                    }
                    Ok(Some(AgentMessage {
                        kind: Some(agent_message::Kind::Stop(s)),
                    })) => break s.reason,
                    Ok(_) => break "agent closed the channel".to_string(),
                    Err(e) => break format!("agent channel failed: {e}"),
                }
            };
            tracing::warn!(%reason, "stopping");
            rounds.abort();
            let _ = std::io::stderr().flush();
            std::process::exit(143);
        })
        .expect("spawn agent watcher thread");
}
