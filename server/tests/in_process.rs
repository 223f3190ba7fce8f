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

/// Waits until every replica is a member of an `N`-server view, as primary or backup.
async fn wait_formed(nodes: &[Arc<Node>]) {
    wait_for("every replica to be a member", || {
        nodes.iter().all(|n| {
            let s = n.status();
            s.view.members.len() == N && (s.role == "primary" || s.role == "backup")
        })
    })
    .await;
}

/// Reads `key` at `node` until it answers with a value, for at most [`WAIT`]; `None` if it
/// never did.
async fn read_eventually(node: &Arc<Node>, key: &[u8]) -> Option<Bytes> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = node.read(key).await.ok().flatten() {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
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

    wait_formed(&nodes).await;
    let first = nodes[1].status().view;
    assert_eq!(first.primary, 0);

    // A write through a backup is forwarded to the primary and commits on every member.
    let (r, _) = nodes[1].write(put("k", "v1")).await.unwrap();
    assert_eq!(r.old, None);
    for node in &nodes {
        let value = read_eventually(node, b"k").await;
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
    let value = read_eventually(primary, b"k").await;
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
    wait_formed(&nodes).await;
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
    let value = read_eventually(&nodes[2], b"a").await;
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
    wait_formed(&nodes).await;
    nodes[0].write(put("k", "kept")).await.unwrap();

    // Rank 2 stops, and comes back with an empty data directory (docs/design.md §10).
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
    let value = read_eventually(&wiped, b"k").await;
    assert_eq!(value.as_deref(), Some(&b"kept"[..]));
    assert_eq!(
        nodes[0].status().role,
        "primary",
        "no second cluster formed"
    );
}

/// docs/design.md §5 step 4, §10 "Failed installs": a member that promised and accepted a
/// view but whose install failed holds nothing of that view. The new primary must not count
/// it as holding its state: a write commits only once every member has it, and that member
/// never answers a read with a value older than an acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_install_failed_never_serves_a_stale_read() {
    let dir = tempfile::tempdir().unwrap();
    let router = MemoryRouter::new();
    let nodes = start(dir.path(), &router).await;
    wait_formed(&nodes).await;
    let first = nodes[0].status().view;
    nodes[0].write(put("k", "v1")).await.unwrap();

    // Rank 2 votes in the next view change but never hears that it was decided. (It may
    // take over itself later, after syncing from the most advanced member.)
    router.lose_installs_to(2);
    router.isolate(0, N);
    wait_for("a new primary among ranks 1 and 2", || {
        nodes[1..].iter().any(|n| {
            let s = n.status();
            s.role == "primary" && s.view.epoch > first.epoch
        })
    })
    .await;

    // Rank 2 is asked for the key all along while a write is acknowledged: before the
    // acknowledgement it may answer v1 or refuse; after it, only v2 or a refusal.
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let node = nodes[2].clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            let mut stale = Vec::new();
            while tokio::time::Instant::now() < deadline {
                let after = acked.load(std::sync::atomic::Ordering::SeqCst);
                if let Ok(value) = node.read(b"k").await {
                    if after && value.as_deref() != Some(&b"v2"[..]) {
                        stale.push(value);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stale
        })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let old = loop {
        // Through rank 1, which forwards to whichever primary it knows.
        match nodes[1].write(put("k", "v2")).await {
            Ok((r, _)) => break r.old,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no commit: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    acked.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(old.as_deref(), Some(&b"v1"[..]));
    let stale = reader.await.unwrap();
    assert!(stale.is_empty(), "rank 2 answered stale values: {stale:?}");

    // If rank 2 is a member of the view that committed the write, it holds the write.
    let view = nodes[1].status().view;
    if view.members.contains(&2) {
        let value = read_eventually(&nodes[2], b"k").await;
        assert_eq!(value.as_deref(), Some(&b"v2"[..]));
    }

    // Once installs get through again, rank 2 rejoins and reads the acknowledged write.
    router.heal();
    router.isolate(0, N);
    wait_for("rank 2 to serve again", || nodes[2].status().serving).await;
    let value = read_eventually(&nodes[2], b"k").await;
    assert_eq!(value.as_deref(), Some(&b"v2"[..]));
}

/// A backup's handling of an append does not stop halfway when the primary's stream goes
/// away (its process died, its connection broke): the server drops the stream's future at
/// whatever await it is at, and a handler stopped between applying its records to the
/// store and counting them in its position left records in the store that its position
/// does not hold. That backup, made primary, then answered a retried write from a
/// result recorded at an lsn it had not reached and waited for that lsn to commit, and a
/// new write reused the lsn (found by the kv739 driver test killing the primary).
///
/// Here one append is polled until it is inside its flush, then dropped: the records must
/// still be counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_dropped_mid_flush_is_applied_to_the_end() {
    use replikv_server::engine::append::AppendHeader;
    use replikv_server::message::Append;
    use replikv_server::types::{Item, Record};

    let dir = tempfile::tempdir().unwrap();
    let router = MemoryRouter::new();
    let nodes = start(dir.path(), &router).await;
    wait_formed(&nodes).await;
    // A write of the current view, so that every member's last record has its epoch.
    nodes[0].write(put("k", "v1")).await.unwrap();
    let primary = nodes[0].status();
    let backup = &nodes[1];
    wait_for("the backup to hold the write", || {
        backup.status().applied == primary.applied
    })
    .await;
    // The primary sends nothing more (no writes), and its heartbeats carry no records.
    router.isolate(0, N);

    let applied = backup.status().applied;
    let view = backup.status().view;
    let append = Append {
        header: AppendHeader {
            epoch: view.epoch,
            primary: view.primary,
            // No newer than what the stream sent: this message moves no lease mark.
            msg_seq: 0,
            committed: 0,
            lease_ms: 0,
            prev_lsn: applied,
            prev_epoch: view.epoch,
            gc_horizon: 0,
        },
        records: vec![Record {
            lsn: applied + 1,
            epoch: view.epoch,
            items: vec![Item {
                key: Bytes::from_static(b"dropped-mid-flush"),
                value: Some(Bytes::from_static(b"x")),
            }],
        }],
    };
    {
        let handling = backup.on_append(append);
        tokio::pin!(handling);
        // One poll takes the data lock, applies the record and starts the flush, which
        // waits for the disk.
        assert!(
            futures::poll!(handling.as_mut()).is_pending(),
            "the append finished in one poll: nothing was dropped mid-way"
        );
    }
    wait_for("the dropped append's record to be counted", || {
        backup.status().applied == applied + 1
    })
    .await;
}
