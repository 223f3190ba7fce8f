//! The client and the `replikv` CLI against a real three-server cluster
//! (`LocalCluster` spawns `replikv-server` processes; build it first with
//! `cargo build -p replikv-server`). The cluster kills its processes when
//! dropped, also when a test panics.

use std::process::Output;
use std::time::Duration;

use bytes::Bytes;
use replikv_client::{Client, ClientConfig, Route};
use replikv_testkit::{ClusterOptions, LocalCluster};

/// Bound for a cluster to elect a primary and for any single test step.
const STEP: Duration = Duration::from_secs(30);

async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .expect("step did not finish in time")
}

async fn start_cluster() -> LocalCluster {
    start_cluster_with(&[]).await
}

async fn start_cluster_with(extra_args: &[&str]) -> LocalCluster {
    let cluster = LocalCluster::start(ClusterOptions {
        servers: 3,
        extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    })
    .expect("start the servers (is replikv-server built?)");
    cluster.wait_ready(STEP).await.expect("every server serves");
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_round_trip() {
    let cluster = start_cluster().await;
    let client = Client::connect(ClientConfig::new(cluster.addrs()))
        .await
        .unwrap();

    assert_eq!(bounded(client.put("fruit", "apple")).await.unwrap(), None);
    assert_eq!(
        bounded(client.put("fruit", "pear")).await.unwrap(),
        Some(Bytes::from("apple"))
    );
    assert_eq!(
        bounded(client.get("fruit")).await.unwrap(),
        Some(Bytes::from("pear"))
    );
    assert_eq!(
        bounded(client.delete("fruit")).await.unwrap(),
        Some(Bytes::from("pear"))
    );
    assert_eq!(bounded(client.get("fruit")).await.unwrap(), None);
    assert_eq!(bounded(client.delete("fruit")).await.unwrap(), None);

    // Every server sees every write, whichever one a client reads from.
    bounded(client.put("shared", "yes")).await.unwrap();
    for addr in cluster.addrs() {
        let one = Client::connect(ClientConfig::new([addr.clone()]))
            .await
            .unwrap();
        assert_eq!(
            bounded(one.get("shared")).await.unwrap(),
            Some(Bytes::from("yes")),
            "read from {addr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_keep_working_with_one_server_killed() {
    let mut cluster = start_cluster().await;
    let client = Client::connect(ClientConfig::new(cluster.addrs()).with_route(Route::Primary))
        .await
        .unwrap();
    for i in 0..10 {
        bounded(client.put(format!("k{i}"), format!("v{i}")))
            .await
            .unwrap();
    }

    let (primary, _) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    let victim = (primary + 1) % cluster.len();
    cluster.kill(victim).unwrap();

    for round in 0..3 {
        for i in 0..10 {
            assert_eq!(
                bounded(client.get(format!("k{i}"))).await.unwrap(),
                Some(Bytes::from(format!("v{i}"))),
                "round {round}, key k{i}, server {victim} down"
            );
        }
    }
    assert_eq!(
        bounded(client.put("k0", "after")).await.unwrap(),
        Some(Bytes::from("v0")),
        "writes go on without the dead backup"
    );
    assert_eq!(
        bounded(client.get("k0")).await.unwrap(),
        Some(Bytes::from("after"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_primary_dies_succeeds_once_a_new_primary_takes_over() {
    let mut cluster = start_cluster().await;
    let client = Client::connect(ClientConfig::new(cluster.addrs()).with_route(Route::Primary))
        .await
        .unwrap();
    bounded(client.put("owner", "first")).await.unwrap();

    let (old_primary, _) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    cluster.kill(old_primary).unwrap();

    // The request's own retries ride out the view change (DESIGN.md §5):
    // no waiting on the caller's side.
    assert_eq!(
        bounded(client.put("owner", "second")).await.unwrap(),
        Some(Bytes::from("first")),
        "applied once, on top of the acknowledged first write"
    );
    assert_eq!(
        bounded(client.get("owner")).await.unwrap(),
        Some(Bytes::from("second"))
    );
    let (new_primary, _) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    assert_ne!(new_primary, old_primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_sharing_connections_keep_exactly_once_ids_of_their_own() {
    let cluster = start_cluster().await;
    let first = Client::connect(ClientConfig::new(cluster.addrs()).with_client_id(7))
        .await
        .unwrap();
    let sessions: Vec<Client> = (0..8).map(|_| first.new_session().unwrap()).collect();
    let mut ids: Vec<u128> = sessions.iter().map(Client::client_id).collect();
    ids.push(first.client_id());
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 9, "every session has an id of its own");

    // Each session's first write carries seq 1. Were the sessions one, the servers would
    // answer all but the first of these as duplicates and apply none of them.
    bounded(first.put("session-first", "first")).await.unwrap();
    let writes = sessions
        .iter()
        .enumerate()
        .map(|(i, s)| s.put(format!("session-{i}"), format!("value-{i}")));
    for result in bounded(futures::future::join_all(writes)).await {
        assert_eq!(result.unwrap(), None);
    }
    let reader = Client::connect(ClientConfig::new(cluster.addrs()))
        .await
        .unwrap();
    assert_eq!(
        bounded(reader.get("session-first")).await.unwrap(),
        Some(Bytes::from("first"))
    );
    for i in 0..sessions.len() {
        assert_eq!(
            bounded(reader.get(format!("session-{i}"))).await.unwrap(),
            Some(Bytes::from(format!("value-{i}")))
        );
    }
}

/// A session the servers collected while it was idle (past `--session-ttl`) is replaced by a
/// new one: the next write succeeds, once, under a new session id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_session_expired_runs_under_a_new_session() {
    let cluster = start_cluster_with(&["--session-ttl", "1s"]).await;
    let client = Client::connect(ClientConfig::new(cluster.addrs()))
        .await
        .unwrap();
    assert_eq!(bounded(client.put("k", "1")).await.unwrap(), None);
    let first = client.client_id();
    // The collector runs every TTL/4; give it a few rounds past the TTL.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        bounded(client.put("k", "2")).await.unwrap(),
        Some(Bytes::from("1")),
        "applied once, on top of the first write"
    );
    assert_ne!(client.client_id(), first, "a new session");
    assert_eq!(
        bounded(client.delete("k")).await.unwrap(),
        Some(Bytes::from("2"))
    );
    assert_eq!(bounded(client.get("k")).await.unwrap(), None);
}

async fn replikv(servers: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_replikv"));
    cmd.env("REPLIKV_SERVERS", servers)
        .env_remove("RUST_LOG")
        .args(args)
        .kill_on_drop(true);
    bounded(cmd.output()).await.expect("replikv runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_put_get_and_status() {
    let mut cluster = start_cluster().await;
    let servers = cluster.addrs().join(",");

    let out = replikv(&servers, &["put", "planet", "mars"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "(none)\n");
    let out = replikv(&servers, &["get", "planet"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "mars\n");

    let (primary, _) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    let victim = (primary + 1) % cluster.len();
    cluster.kill(victim).unwrap();

    // Right after the kill the survivors may be mid view change, with no
    // primary; poll (bounded) until the table shows the new view settled.
    bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    let addrs = cluster.addrs();
    let mut text = String::new();
    for _ in 0..40 {
        let out = replikv(&servers, &["status"]).await;
        assert_eq!(out.status.code(), Some(0));
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows.len(), 3, "{text}");
        for (rank, row) in rows.iter().enumerate() {
            assert_eq!(row[1], addrs[rank], "{text}");
            if rank == victim {
                assert_eq!(row[2], "down", "{text}");
            } else {
                assert_eq!(row[0], rank.to_string(), "{text}");
                assert_ne!(row[2], "down", "{text}");
            }
        }
        if rows.iter().any(|r| r[2] == "up" && r[3] == "primary") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("no serving primary in the status table: {text}");
}
