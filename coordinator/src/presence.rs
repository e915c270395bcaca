//! Fast detection of dead nodes. Each agent listens on a presence port (its
//! address is in the node record) and holds a TCP connection to every other
//! node's. When a node's agent process dies, its kernel closes those
//! connections at once; the first agent to see the close revokes the dead
//! node's lease, its record goes with it, and the rendezvous re-forms the
//! round without waiting for the lease to run out.
//!
//! Only a close of an established connection counts as death. A node that is
//! silent (paused with SIGSTOP, its link cut, its machine off) keeps its
//! connections open or times out without a close: its lease decides, as
//! before. A refused connection counts for nothing either (a firewall can
//! refuse for a live node); the watcher tries again. Nothing is authenticated
//! because nothing is believed from the peer except the kernel's close: a
//! stranger connecting to a presence port learns that the agent is alive.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::keyspace::Keyspace;
use crate::rendezvous::NodeRecord;
use crate::store::{LeaseId, Store, WatchEvent};
use crate::{Error, Result};

/// Connections a presence listener holds at most; past that it stops
/// accepting (connectors time out, which counts for nothing) rather than
/// closing any, since a close reads as death.
const MAX_HELD: usize = 4096;

/// How often the listener writes a byte on each connection, so that
/// middleboxes that forget idle flows keep this one.
const HEARTBEAT: Duration = Duration::from_secs(10);

/// How long a watcher waits for a connection before trying again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a watcher waits between connection attempts.
const RETRY: Duration = Duration::from_secs(1);

/// Binds a presence listener on `host` (port chosen by the kernel) that
/// accepts until `cancel` and holds every connection until its watcher goes
/// away or this process exits; returns its `host:port`.
pub async fn listen(host: &str, cancel: CancellationToken) -> Result<String> {
    let listener = TcpListener::bind((host, 0))
        .await
        .map_err(|e| Error::unavailable(format!("bind a presence listener on {host}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::unavailable(format!("presence listener address: {e}")))?;
    let slots = Arc::new(Semaphore::new(MAX_HELD));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = cancel.cancelled() => return,
            };
            let Ok((stream, _)) = accepted else {
                continue;
            };
            tokio::spawn(async move {
                hold(stream).await;
                drop(slot);
            });
        }
    });
    Ok(addr.to_string())
}

/// Keeps one watcher's connection open until the watcher goes away (or this
/// process exits: that close is the news).
async fn hold(mut stream: TcpStream) {
    let mut buf = [0u8; 64];
    let mut beat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = beat.tick() => {
                if stream.write_all(&[0]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Watches the presence of every other node of `job` until `cancel`,
/// revoking the lease of each whose agent closes its connection. Rides out
/// store errors (retries every second).
pub async fn watch(
    store: Arc<dyn Store>,
    ks: Keyspace,
    job: String,
    this_node: String,
    cancel: CancellationToken,
) {
    let prefix = ks.nodes_prefix(&job);
    // node -> (its lease, the task watching it)
    let mut watched: BTreeMap<String, (LeaseId, CancellationToken)> = BTreeMap::new();
    let update = |watched: &mut BTreeMap<String, (LeaseId, CancellationToken)>,
                  node: String,
                  lease: Option<LeaseId>,
                  presence: Option<String>| {
        let current = watched.get(&node).map(|(l, _)| *l);
        match (lease, presence) {
            (Some(lease), Some(addr)) if node != this_node => {
                if current == Some(lease) {
                    return;
                }
                if let Some((_, old)) = watched.remove(&node) {
                    old.cancel();
                }
                let stop = cancel.child_token();
                tokio::spawn(watch_one(
                    store.clone(),
                    node.clone(),
                    addr,
                    lease,
                    stop.clone(),
                ));
                watched.insert(node, (lease, stop));
            }
            _ => {
                if let Some((_, old)) = watched.remove(&node) {
                    old.cancel();
                }
            }
        }
    };
    while !cancel.is_cancelled() {
        let listed = tokio::select! {
            listed = store.get_prefix(&prefix) => listed,
            _ = cancel.cancelled() => return,
        };
        let Ok((kvs, revision)) = listed else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        let mut seen = Vec::new();
        for kv in kvs {
            if let Ok(record) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                seen.push(record.node.clone());
                update(&mut watched, record.node, kv.lease, record.presence);
            }
        }
        let gone: Vec<String> = watched
            .keys()
            .filter(|n| !seen.contains(n))
            .cloned()
            .collect();
        for node in gone {
            update(&mut watched, node, None, None);
        }
        let Ok(mut events) = store.watch_prefix(&prefix, Some(revision)).await else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        loop {
            let event = tokio::select! {
                event = events.try_next() => event,
                _ = cancel.cancelled() => return,
            };
            match event {
                Ok(Some(WatchEvent::Put(kv))) => {
                    if let Ok(record) = serde_json::from_slice::<NodeRecord>(&kv.value) {
                        update(&mut watched, record.node, kv.lease, record.presence);
                    }
                }
                Ok(Some(WatchEvent::Delete { key, .. })) => {
                    if let Some(node) = key.strip_prefix(&prefix) {
                        update(&mut watched, node.to_string(), None, None);
                    }
                }
                // The watch ended or failed: list again.
                Ok(None) | Err(_) => break,
            }
        }
    }
}

/// Holds a connection to one node's presence listener; revokes `lease` when
/// the node closes it.
async fn watch_one(
    store: Arc<dyn Store>,
    node: String,
    addr: String,
    lease: LeaseId,
    stop: CancellationToken,
) {
    loop {
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr));
        let stream = tokio::select! {
            connected = connect => connected,
            _ = stop.cancelled() => return,
        };
        let mut stream = match stream {
            Ok(Ok(s)) => s,
            // Refused or silent: nothing to conclude; the lease decides.
            _ => {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let mut buf = [0u8; 64];
        let closed = loop {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) => break true,
                    Ok(_) => {}
                    Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
                },
                _ = stop.cancelled() => return,
            }
        };
        if closed {
            tracing::warn!(
                node,
                "the node's agent closed its presence connection: its process is gone; revoking its lease"
            );
            if let Err(e) = store.revoke_lease(lease).await {
                tracing::debug!(node, "revoke the lease of a dead node: {e}");
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mem::MemStore;

    /// A node whose presence listener this test holds: silent, its record
    /// stays; its connection closed, its lease is revoked and the record goes.
    #[tokio::test]
    async fn a_closed_presence_connection_revokes_the_lease_and_a_silent_one_does_not() {
        let store: Arc<dyn Store> = MemStore::new();
        let ks = Keyspace::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let record = NodeRecord {
            node: "b".into(),
            host: "127.0.0.1".into(),
            endpoints: vec!["127.0.0.1:1".into()],
            devices: 1,
            version: "test".into(),
            presence: Some(listener.local_addr().unwrap().to_string()),
        };
        let key = ks.node("j", "b");
        let lease = store.grant_lease(Duration::from_secs(600)).await.unwrap();
        store
            .put(&key, serde_json::to_vec(&record).unwrap(), Some(lease))
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(watch(
            store.clone(),
            ks.clone(),
            "j".into(),
            "a".into(),
            cancel.clone(),
        ));
        let (held, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            store.get(&key).await.unwrap().is_some(),
            "a silent node keeps its record"
        );
        drop(held);
        drop(listener);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.get(&key).await.unwrap().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the closed node's record is still there"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
    }
}
