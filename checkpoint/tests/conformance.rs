//! One storage conformance suite, run over every backend this machine can
//! host: local filesystem, memory, and S3 (a real moto server).

mod common;

use std::sync::Arc;

use bytes::Bytes;
use kiln_checkpoint::{CheckpointRoot, Error};
use object_store::PutMode;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

async fn put_get_list_delete(root: &CheckpointRoot, backend: &str) {
    root.put("a/1", Bytes::from_static(b"one"), PutMode::Overwrite)
        .await
        .unwrap();
    root.put("a/2", Bytes::from_static(b"two!"), PutMode::Overwrite)
        .await
        .unwrap();
    root.put("b/1", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(root.get("a/1").await.unwrap(), Bytes::from_static(b"one"));
    // Overwrite replaces.
    root.put("a/1", Bytes::from_static(b"uno"), PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(root.get("a/1").await.unwrap(), Bytes::from_static(b"uno"));
    assert!(
        matches!(root.get("nope").await, Err(Error::NotFound { .. })),
        "{backend}"
    );
    assert_eq!(root.get_opt("nope").await.unwrap(), None);

    let mut listed = root.list("a").await.unwrap();
    listed.sort_by(|x, y| x.key.cmp(&y.key));
    let keys: Vec<(&str, u64)> = listed.iter().map(|o| (o.key.as_str(), o.size)).collect();
    assert_eq!(keys, [("a/1", 3), ("a/2", 4)], "{backend}");
    let age = chrono::Utc::now() - listed[0].last_modified;
    assert!(
        age.num_seconds().abs() < 60,
        "{backend}: last_modified {age}"
    );

    assert_eq!(
        root.get_range("a/2", 1..3).await.unwrap(),
        Bytes::from_static(b"wo")
    );

    root.delete("a/1").await.unwrap();
    assert!(matches!(root.get("a/1").await, Err(Error::NotFound { .. })));
    root.delete("a/1").await.unwrap(); // deleting what is gone is fine
    assert_eq!(root.list("a").await.unwrap().len(), 1);
}

async fn create_only_race(root: &CheckpointRoot, backend: &str) {
    let root = Arc::new(root.clone());
    let writers: Vec<_> = (0..16)
        .map(|i| {
            let root = root.clone();
            tokio::spawn(async move {
                let r = root
                    .put(
                        "manifests/race.json",
                        Bytes::from(format!("writer {i}")),
                        PutMode::Create,
                    )
                    .await;
                (i, r)
            })
        })
        .collect();
    let mut winners = vec![];
    for w in writers {
        match w.await.unwrap() {
            (i, Ok(())) => winners.push(i),
            (_, Err(Error::AlreadyExists { .. })) => {}
            (_, Err(e)) => panic!("{backend}: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "{backend}: winners {winners:?}");
    let value = root.get("manifests/race.json").await.unwrap();
    assert_eq!(value, Bytes::from(format!("writer {}", winners[0])));
}

/// N writers increment a counter by compare-and-swap: no update may be lost.
async fn compare_and_swap_race(root: &CheckpointRoot, backend: &str) {
    const WRITERS: usize = 12;
    const INCREMENTS: usize = 5;
    let root = Arc::new(root.clone());
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let root = root.clone();
            tokio::spawn(async move {
                let mut losses = 0;
                for _ in 0..INCREMENTS {
                    loop {
                        let cur = root.read_versioned("counter").await.unwrap();
                        // "count writer": values are unique per write, as
                        // compare_and_swap requires.
                        let n: u64 = cur
                            .as_ref()
                            .map(|v| {
                                let s = std::str::from_utf8(&v.value).unwrap();
                                s.split(' ').next().unwrap().parse().unwrap()
                            })
                            .unwrap_or(0);
                        let next = Bytes::from(format!("{} {writer}", n + 1));
                        // Let the other writers in between read and swap, even
                        // on a store that never awaits.
                        tokio::task::yield_now().await;
                        if root
                            .compare_and_swap("counter", cur.as_ref(), next)
                            .await
                            .unwrap()
                        {
                            break;
                        }
                        losses += 1;
                    }
                }
                losses
            })
        })
        .collect();
    let mut losses = 0;
    for w in writers {
        losses += w.await.unwrap();
    }
    let v = root.read_versioned("counter").await.unwrap().unwrap();
    let count = std::str::from_utf8(&v.value)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(
        count,
        (WRITERS * INCREMENTS).to_string(),
        "{backend}: lost updates"
    );
    eprintln!("{backend}: cas race done with {losses} lost swaps (retried)");
    // A stale expectation loses.
    let stale = v.clone();
    assert!(
        root.compare_and_swap("counter", Some(&stale), Bytes::from("x"))
            .await
            .unwrap()
    );
    assert!(
        !root
            .compare_and_swap("counter", Some(&stale), Bytes::from("y"))
            .await
            .unwrap()
    );
    // Expecting absence fails when present.
    assert!(
        !root
            .compare_and_swap("counter", None, Bytes::from("z"))
            .await
            .unwrap()
    );
    assert_eq!(root.get("counter").await.unwrap(), Bytes::from("x"));
}

async fn multipart(root: &CheckpointRoot, backend: &str) {
    let data: Vec<u8> = (0..(11 << 20) + 17).map(|i| (i % 251) as u8).collect();
    root.put_object("big/object", Bytes::from(data.clone()), 1 << 20, 1 << 20)
        .await
        .unwrap_or_else(|e| panic!("{backend}: {e}"));
    assert!(root.get("big/object").await.unwrap() == data, "{backend}");
}

async fn suite(root: CheckpointRoot, backend: &str) {
    put_get_list_delete(&root, backend).await;
    create_only_race(&root, backend).await;
    compare_and_swap_race(&root, backend).await;
    multipart(&root, backend).await;
}

#[test]
fn conformance_local_filesystem() {
    let t = common::local_root();
    runtime().block_on(suite(t.root.clone(), t.backend));
}

#[test]
fn conformance_memory() {
    let t = common::memory_root();
    runtime().block_on(suite(t.root.clone(), t.backend));
}

#[test]
fn conformance_s3() {
    let Some(t) = common::s3_root() else { return };
    runtime().block_on(suite(t.root.clone(), t.backend));
}

#[test]
fn local_compare_and_swap_excludes_other_processes_too() {
    // Two roots (separate handles, as two processes would have) on one
    // directory: the flock, not an in-process mutex, serializes them.
    let t = common::local_root();
    let other = CheckpointRoot::open(t.root.url()).unwrap();
    runtime().block_on(async {
        let a = t.root.read_versioned("latest").await.unwrap();
        assert!(a.is_none());
        assert!(
            t.root
                .compare_and_swap("latest", None, Bytes::from("a"))
                .await
                .unwrap()
        );
        assert!(
            !other
                .compare_and_swap("latest", None, Bytes::from("b"))
                .await
                .unwrap()
        );
        let cur = other.read_versioned("latest").await.unwrap();
        assert!(
            other
                .compare_and_swap("latest", cur.as_ref(), Bytes::from("b"))
                .await
                .unwrap()
        );
        assert_eq!(t.root.get("latest").await.unwrap(), Bytes::from("b"));
    });
}

#[test]
fn urls_open_the_right_backends() {
    let dir = tempfile::tempdir().unwrap();
    let plain = CheckpointRoot::open(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(plain.url(), format!("file://{}", dir.path().display()));
    assert!(plain.local_dir().is_some());
    let m = CheckpointRoot::open("memory://shared-name/x").unwrap();
    let m2 = CheckpointRoot::open("memory://shared-name/x").unwrap();
    runtime().block_on(async {
        m.put("k", Bytes::from("v"), PutMode::Overwrite)
            .await
            .unwrap();
        assert_eq!(m2.get("k").await.unwrap(), Bytes::from("v"));
    });
    assert!(matches!(
        CheckpointRoot::open("ftp://x/y"),
        Err(Error::Invalid { .. })
    ));
    // Cloud roots open from URL + configuration without touching the network.
    CheckpointRoot::open_with("s3://bucket/prefix", [("aws_region", "us-east-1")]).unwrap();
    assert!(matches!(
        CheckpointRoot::open_with("s3://bucket/p", [("no_such_option", "1")]),
        Err(Error::Invalid { .. })
    ));
}
