//! The client and the `replikv` CLI against a real three-server cluster
//! (`LocalCluster` spawns `replikv-server` processes; build it first with
//! `cargo build -p replikv-server`). The cluster kills its processes when
//! dropped, also when a test panics.

use std::process::Output;
use std::time::Duration;

use bytes::Bytes;
use replikv_client::{Client, Route};
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
    let client = Client::connect(cluster.client_config()).await.unwrap();

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
        let one = Client::connect(cluster.client_config_for(vec![addr.clone()]))
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
    let client = Client::connect(cluster.client_config().with_route(Route::Primary))
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
    let client = Client::connect(cluster.client_config().with_route(Route::Primary))
        .await
        .unwrap();
    bounded(client.put("owner", "first")).await.unwrap();

    let (old_primary, _) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    cluster.kill(old_primary).unwrap();

    // The request's own retries ride out the view change (docs/design.md §5):
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
    let first = Client::connect(cluster.client_config().with_client_id(7))
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
    let reader = Client::connect(cluster.client_config()).await.unwrap();
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
    let client = Client::connect(cluster.client_config()).await.unwrap();
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

async fn replikv(cluster: &LocalCluster, servers: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_replikv"));
    cmd.env("REPLIKV_SERVERS", servers)
        .envs(cluster.client_env(cluster.admin_credentials().as_ref()))
        .env_remove("RUST_LOG")
        .args(args)
        .kill_on_drop(true);
    bounded(cmd.output()).await.expect("replikv runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_scan_cas_and_delete_range() {
    let cluster = start_cluster().await;
    let servers = cluster.addrs().join(",");
    let text = |out: &Output| String::from_utf8_lossy(&out.stdout).into_owned();
    for (k, v) in [("u/2", "b"), ("u/1", "a"), ("u/3", "c"), ("v", "x")] {
        let out = replikv(&cluster, &servers, &["put", k, v]).await;
        assert_eq!(out.status.code(), Some(0));
    }
    let out = replikv(&cluster, &servers, &["scan", "--prefix", "u/"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out), "u/1\ta\nu/2\tb\nu/3\tc\n");
    let out = replikv(&cluster, &servers, &["scan", "u/2", "v", "--limit", "2"]).await;
    assert_eq!(text(&out), "u/2\tb\nu/3\tc\n");
    let out = replikv(&cluster, &servers, &["scan", "v", "u"]).await;
    assert_eq!(out.status.code(), Some(2), "an inverted range is bad usage");

    let out = replikv(&cluster, &servers, &["cas", "u/1", "a", "A"]).await;
    assert_eq!(
        (out.status.code(), text(&out)),
        (Some(0), "swapped\na\n".into())
    );
    let out = replikv(&cluster, &servers, &["cas", "u/1", "a", "B"]).await;
    assert_eq!(
        (out.status.code(), text(&out)),
        (Some(4), "mismatch\nA\n".into())
    );
    let out = replikv(&cluster, &servers, &["cas", "--absent", "new", "n"]).await;
    assert_eq!(
        (out.status.code(), text(&out)),
        (Some(0), "swapped\n(none)\n".into())
    );
    let out = replikv(&cluster, &servers, &["cas", "--delete", "new", "n"]).await;
    assert_eq!(
        (out.status.code(), text(&out)),
        (Some(0), "swapped\nn\n".into())
    );
    let out = replikv(&cluster, &servers, &["cas", "--absent", "u/1", "x", "y"]).await;
    assert_eq!(out.status.code(), Some(2), "--absent takes KEY NEW");

    let out = replikv(
        &cluster,
        &servers,
        &["delete-range", "--prefix", "u/", "--limit", "2"],
    )
    .await;
    assert_eq!(
        (out.status.code(), text(&out)),
        (Some(0), "removed 2\nmore remain\n".into())
    );
    let out = replikv(
        &cluster,
        &servers,
        &["delete-range", "--prefix", "u/", "--all"],
    )
    .await;
    assert_eq!(
        (out.status.code(), text(&out)),
        (Some(0), "removed 1\n".into())
    );
    let out = replikv(&cluster, &servers, &["scan"]).await;
    assert_eq!(text(&out), "v\tx\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_put_get_and_status() {
    let mut cluster = start_cluster().await;
    let servers = cluster.addrs().join(",");

    let out = replikv(&cluster, &servers, &["put", "planet", "mars"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "(none)\n");
    let out = replikv(&cluster, &servers, &["get", "planet"]).await;
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
        let out = replikv(&cluster, &servers, &["status"]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_one_server_learns_the_others_and_survives_its_death() {
    let mut cluster = start_cluster().await;
    let (primary, _) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    let given = cluster.addrs()[primary].clone();
    let client = Client::connect(cluster.client_config_for(vec![given.clone()]))
        .await
        .unwrap();
    let mut learned = client.servers().to_vec();
    learned.sort();
    let mut all = cluster.addrs();
    all.sort();
    assert_eq!(learned, all, "the client learned every member from {given}");
    bounded(client.put("one-address", "before")).await.unwrap();

    // The only server the client was given, the primary, dies.
    cluster.kill(primary).unwrap();
    assert_eq!(
        bounded(client.get("one-address")).await.unwrap(),
        Some(Bytes::from("before"))
    );
    assert_eq!(
        bounded(client.put("one-address", "after")).await.unwrap(),
        Some(Bytes::from("before"))
    );

    // The CLI given that dead server alone has nothing to learn from; given a live one
    // alone, it shows the whole cluster.
    let survivor = cluster.addrs()[(primary + 1) % cluster.len()].clone();
    let out = replikv(&cluster, &survivor, &["get", "one-address"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after\n");
    let out = replikv(&cluster, &survivor, &["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().skip(1).count(), 3, "{text}");
    let out = replikv(&cluster, &given, &["get", "one-address"]).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "the dead server alone cannot serve"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_answers_a_scripted_session_exactly() {
    use tokio::io::AsyncWriteExt;

    let cluster = start_cluster().await;
    bounded(cluster.wait_ready(STEP)).await.unwrap();
    let script = "PUT fruit apple\n\
                  \n\
                  put   fruit    pear\n\
                  SWAP fruit plum\n\
                  SWAP nut almond\n\
                  GET fruit\n\
                  GET missing\n\
                  PUT onlykey\n\
                  FROB x\n\
                  DELETE fruit\n\
                  DELETE fruit\n\
                  GET fruit\n\
                  PUT k3 v3\n\
                  PUT k1 v1\n\
                  PUT k2 v2\n\
                  SCAN k1 k2\n\
                  DELETE k1\n\
                  scan a z\n\
                  SCAN q r\n\
                  SCAN z a\n\
                  SCAN k1\n\
                  STOP\n\
                  GET nut\n";
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_replikv"))
        .env("REPLIKV_SERVERS", cluster.addrs().join(","))
        .envs(cluster.client_env(cluster.admin_credentials().as_ref()))
        .env_remove("RUST_LOG")
        .arg("shell")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start replikv shell");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).await.unwrap();
    drop(stdin);
    let out = bounded(child.wait_with_output()).await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "PUT fruit not_found\n\
         PUT fruit found\n\
         SWAP fruit pear\n\
         SWAP nut null\n\
         GET fruit plum\n\
         GET missing null\n\
         ERROR PUT onlykey: PUT takes 2 arguments (PUT key value), got 1\n\
         ERROR FROB x: unknown command FROB (PUT, SWAP, GET, DELETE, SCAN or STOP)\n\
         DELETE fruit found\n\
         DELETE fruit not_found\n\
         GET fruit null\n\
         PUT k3 not_found\n\
         PUT k1 not_found\n\
         PUT k2 not_found\n\
         SCAN k1 k2 BEGIN\n  \
         k1 v1\n  \
         k2 v2\n\
         SCAN END\n\
         DELETE k1 found\n\
         SCAN a z BEGIN\n  \
         k2 v2\n  \
         k3 v3\n  \
         nut almond\n\
         SCAN END\n\
         SCAN q r BEGIN\n\
         SCAN END\n\
         ERROR SCAN z a: invalid argument: inverted range: the start is above the end\n\
         ERROR SCAN k1: SCAN takes 2 arguments (SCAN from to), got 1\n\
         STOP\n",
        "nothing after STOP runs"
    );
}
