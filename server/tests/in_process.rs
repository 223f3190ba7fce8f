//! Three replicas in one process, connected by the in-process peer network
//! (`network::memory`): the real replica code, with no sockets and no child processes.
//! Stopping a replica (`Node::stop`) ends its background tasks, as a shutdown does.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use replikv_server::fault::Faults;
use replikv_server::identity::Identity;
use replikv_server::network::memory::MemoryRouter;
use replikv_server::replica::{Node, WriteReq};
use replikv_server::storage::Store;
use replikv_server::Opt;

const N: usize = 3;
/// Upper bound on each wait below: forming the cluster, a view change.
const WAIT: Duration = Duration::from_secs(20);

/// Starts `N` replicas; rank 0 forms the cluster and the others join it.
async fn start(dir: &std::path::Path, router: &Arc<MemoryRouter>) -> Vec<Arc<Node>> {
    let nodes: Vec<Arc<Node>> = (0..N)
        .map(|rank| open(&dir.join(rank.to_string()), rank, router))
        .collect();
    for node in &nodes {
        node.start();
    }
    nodes
}

/// Opens replica `rank` on `data` and makes it reachable through `router`.
fn open(data: &std::path::Path, rank: usize, router: &Arc<MemoryRouter>) -> Arc<Node> {
    // Never dialled: the in-process network routes by rank.
    let peers: Vec<String> = (0..N).map(|r| format!("127.0.0.1:{}", 1 + r)).collect();
    let opt = Opt::parse_from([
        "replikv-server",
        "--rank",
        &rank.to_string(),
        "--peers",
        &peers.join(","),
        "--data-dir",
        data.to_str().unwrap(),
        "--bootstrap",
    ]);
    let cfg = opt.resolve().unwrap();
    let store = Store::open(&cfg.data_dir, cfg.sync).unwrap();
    let identity = Arc::new(Identity::default());
    let net = router.network(rank as u32, identity.clone());
    let node = Node::open(cfg, store, net, Arc::new(Faults::default()), identity).unwrap();
    router.register(rank as u32, &node);
    node
}

/// Waits until `done` holds, for at most [`WAIT`].
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn put(key: &str, value: &str) -> WriteReq {
    WriteReq {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Some(Bytes::copy_from_slice(value.as_bytes())),
        id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_commits_and_a_cut_off_primary_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let router = MemoryRouter::new();
    let nodes = start(dir.path(), &router).await;

    wait_for("every replica to be a member", || {
        nodes.iter().all(|n| {
            let s = n.status();
            s.view.members.len() == N && (s.role == "primary" || s.role == "backup")
        })
    })
    .await;
    let first = nodes[1].status().view;
    assert_eq!(first.primary, 0);

    // A write through a backup is forwarded to the primary and commits on every member.
    let (r, _) = nodes[1].write(put("k", "v1")).await.unwrap();
    assert_eq!(r.old, None);
    for node in &nodes {
        let mut value = None;
        let deadline = tokio::time::Instant::now() + WAIT;
        while value.is_none() && tokio::time::Instant::now() < deadline {
            value = node.read(b"k").await.ok().flatten();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            value.as_deref(),
            Some(&b"v1"[..]),
            "rank {}",
            node.status().rank
        );
    }

    // Cut the primary off: the others form a new view without it.
    router.isolate(0, N);
    wait_for("a new primary among the others", || {
        nodes[1..].iter().any(|n| {
            let s = n.status();
            s.role == "primary" && s.view.epoch > first.epoch && s.view.primary != 0
        })
    })
    .await;
    let primary = nodes[1..]
        .iter()
        .find(|n| n.status().role == "primary")
        .unwrap();
    let view = primary.status().view;
    assert!(
        !view.members.contains(&0),
        "the cut-off primary left the view"
    );

    // The new primary keeps the committed write and commits new ones.
    let (r, _) = primary.write(put("k", "v2")).await.unwrap();
    assert_eq!(r.old.as_deref(), Some(&b"v1"[..]));
    let mut value = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while value.is_none() && tokio::time::Instant::now() < deadline {
        value = primary.read(b"k").await.ok().flatten();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(value.as_deref(), Some(&b"v2"[..]));

    // The old primary, cut off, lost its lease: it no longer answers reads.
    wait_for("the old primary to stop serving reads", || {
        !nodes[0].status().serving
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_backup_is_dropped_and_rejoins_after_healing() {
    let dir = tempfile::tempdir().unwrap();
    let router = MemoryRouter::new();
    let nodes = start(dir.path(), &router).await;
    wait_for("every replica to be a member", || {
        nodes.iter().all(|n| {
            let s = n.status();
            s.view.members.len() == N && (s.role == "primary" || s.role == "backup")
        })
    })
    .await;
    let primary = &nodes[0];
    primary.write(put("a", "1")).await.unwrap();

    // The primary drops the silent backup and goes on committing without it.
    router.isolate(2, N);
    let (r, _) = primary.write(put("a", "2")).await.unwrap();
    assert_eq!(r.old.as_deref(), Some(&b"1"[..]));
    let view = primary.status().view;
    assert_eq!(view.primary, 0, "the primary kept its role");
    assert!(
        !view.members.contains(&2),
        "the silent backup left the view"
    );

    // Healed, it catches up through a state transfer and joins again.
    router.heal();
    wait_for("the backup to rejoin", || {
        let s = nodes[2].status();
        s.role == "backup" && s.view.members.contains(&2)
    })
    .await;
    let mut value = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while value.is_none() && tokio::time::Instant::now() < deadline {
        value = nodes[2].read(b"a").await.ok().flatten();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        value.as_deref(),
        Some(&b"2"[..]),
        "the rejoined backup holds the write it missed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_disk_rejoins_the_cluster_it_belonged_to() {
    let dir = tempfile::tempdir().unwrap();
    let router = MemoryRouter::new();
    let nodes = start(dir.path(), &router).await;
    wait_for("every replica to be a member", || {
        nodes.iter().all(|n| {
            let s = n.status();
            s.view.members.len() == N && (s.role == "primary" || s.role == "backup")
        })
    })
    .await;
    nodes[0].write(put("k", "kept")).await.unwrap();

    // Rank 2 stops, and comes back with an empty data directory (DESIGN.md §10).
    nodes[2].stop().await;
    router.isolate(2, N);
    wait_for("the primary to drop rank 2", || {
        !nodes[0].status().view.members.contains(&2)
    })
    .await;
    let wiped = open(&dir.path().join("2-wiped"), 2, &router);
    router.heal();
    wiped.start();
    wait_for("the wiped replica to rejoin as a backup", || {
        let s = wiped.status();
        s.role == "backup" && s.view.members.contains(&2)
    })
    .await;
    let mut value = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while value.is_none() && tokio::time::Instant::now() < deadline {
        value = wiped.read(b"k").await.ok().flatten();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(value.as_deref(), Some(&b"kept"[..]));
    assert_eq!(
        nodes[0].status().role,
        "primary",
        "no second cluster formed"
    );
}
