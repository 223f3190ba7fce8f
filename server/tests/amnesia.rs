//! Lost disks and cluster identity (docs/design.md §10): a server whose data directory is lost
//! never forms a second cluster, never votes or serves before it has rejoined through a state
//! transfer, and never makes the others forget acknowledged writes, whatever the restart
//! order; peers of another cluster are refused.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::seq::SliceRandom;
use rand::Rng;
use replikv_proto::peer::peer_client::PeerClient;
use replikv_proto::peer::{DiscoverRequest, PrepareRequest};
use replikv_testkit::LocalCluster;
use tonic::metadata::MetadataValue;

/// Writes `count` keys, stops every server (SIGKILL or SIGTERM), wipes `wiped`'s data dir,
/// starts the servers again group by group with `gap` between groups, and checks that every
/// acknowledged key is back on every server.
async fn replaced_disk_restart(round: usize, wiped: usize, groups: &[&[usize]], gap: Duration) {
    let (mut cluster, _) = start_healthy(3, &[]).await;
    let client = client(&cluster).await;
    let mut expected = Expected::new();
    put_fresh(&client, &format!("r{round}"), 50, &mut expected).await;
    drop(client);
    if round.is_multiple_of(2) {
        cluster.kill_all();
    } else {
        for rank in 0..3 {
            cluster.terminate(rank).expect("stop");
        }
    }
    cluster.wipe(wiped).expect("wipe");
    for (i, group) in groups.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        for &rank in *group {
            cluster.restart(rank).expect("restart");
        }
    }
    cluster
        .wait_converged(BOOT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("round {round} (wiped {wiped}, order {groups:?}): {e}"));
    assert_every_server_reads(&cluster, 0..3, &expected).await;
    let wiped_status = status(&cluster, wiped).await;
    assert!(
        wiped_status.role == "primary" || wiped_status.role == "backup",
        "the wiped server rejoined: {wiped_status:?}"
    );
}

/// The case that lost every write before: rank 0 wiped, restarted first, the others two
/// seconds later (a StatefulSet's order).
#[test]
fn wiped_rank_0_restarted_first_keeps_every_acknowledged_write() {
    run(async {
        for round in 0..5 {
            replaced_disk_restart(round, 0, &[&[0], &[1, 2]], Duration::from_secs(2)).await;
        }
    });
}

#[test]
fn wiped_rank_0_restarted_last_keeps_every_acknowledged_write() {
    run(async {
        for round in 0..5 {
            replaced_disk_restart(round, 0, &[&[1, 2], &[0]], Duration::from_secs(1)).await;
        }
    });
}

/// Other ranks wiped and other orders, one server at a time.
#[test]
fn a_wiped_server_in_any_restart_order_keeps_every_acknowledged_write() {
    run(async {
        let mut rng = rand::rng();
        for round in 0..5 {
            let wiped = rng.random_range(0..3);
            let mut order = [0usize, 1, 2];
            order.shuffle(&mut rng);
            let groups: Vec<&[usize]> = order.iter().map(std::slice::from_ref).collect();
            replaced_disk_restart(round, wiped, &groups, Duration::from_millis(700)).await;
        }
    });
}

#[test]
fn a_wiped_server_restarted_with_everyone_at_once_keeps_every_acknowledged_write() {
    run(async {
        for round in 0..5 {
            let wiped = round % 3;
            replaced_disk_restart(round, wiped, &[&[0, 1, 2]], Duration::ZERO).await;
        }
    });
}

/// A server without state, with --bootstrap, whose peers do not answer, forms nothing: it
/// neither serves nor claims to be primary, however long it waits.
#[test]
fn an_empty_server_alone_forms_no_cluster() {
    run(async {
        let mut cluster = start(3, &[]);
        cluster.kill(1).expect("kill");
        cluster.kill(2).expect("kill");
        // Ranks 1 and 2 never answered: rank 0 may have asked before they died, but the
        // cluster can only have formed if both answered, and then they hold its id. Wipe
        // everything to be sure the test starts from nothing.
        cluster.kill(0).expect("kill");
        for rank in 0..3 {
            cluster.wipe(rank).expect("wipe");
        }
        cluster.restart(0).expect("restart");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let s = status(&cluster, 0).await;
        assert!(
            !s.serving && s.role != "primary",
            "an empty server must not form a cluster alone: {s:?}"
        );
        // Once the peers answer (empty too), the cluster forms and serves.
        cluster.restart(1).expect("restart");
        cluster.restart(2).expect("restart");
        cluster.wait_converged(BOOT_TIMEOUT).await.expect("formed");
        let client = client(&cluster).await;
        client.put(bytes("k"), bytes("v")).await.expect("put");
        assert_eq!(client.get(bytes("k")).await.expect("get"), Some(bytes("v")));
    });
}

/// Writes sent while the cluster is still forming (servers without state yet, which have
/// nowhere to forward a write) go to another server and succeed, each once.
#[test]
fn writes_while_the_cluster_forms_succeed() {
    run(async {
        let cluster = start(3, &[]);
        let client = client(&cluster).await;
        let mut expected = Expected::new();
        put_fresh(&client, "early", 30, &mut expected).await;
        cluster.wait_ready(BOOT_TIMEOUT).await.expect("formed");
        assert_every_server_reads(&cluster, 0..3, &expected).await;
    });
}

/// A server wiped at a random moment while writes run, then restarted: no acknowledged
/// write is lost, and it serves them all once it has rejoined.
#[test]
fn a_disk_wiped_while_writes_run_loses_no_acknowledged_write() {
    run(async {
        let mut rng = rand::rng();
        for round in 0..2 {
            let (mut cluster, _) = start_healthy(3, &[]).await;
            let writer = Writer::start(client(&cluster).await, &format!("w{round}"));
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
            let victim = rng.random_range(0..3);
            cluster.kill(victim).expect("kill");
            cluster.wipe(victim).expect("wipe");
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
            cluster.restart(victim).expect("restart");
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let log = writer.stop().await;
            log.assert_no_anomalies();
            assert!(log.acked.len() > 10, "writes went on: {}", log.summary());
            cluster
                .wait_converged(BOOT_TIMEOUT)
                .await
                .expect("the wiped server rejoins");
            assert_every_server_reads(&cluster, 0..3, &log.all_acked()).await;
        }
    });
}

/// A peer connection to `rank` as server 1 (with rank 1's certificate on a secure
/// cluster), which is what the requests below claim to come from.
async fn peer(cluster: &LocalCluster, rank: usize) -> PeerClient<tonic::transport::Channel> {
    PeerClient::new(
        cluster
            .peer_channel(rank, "node-1")
            .await
            .expect("peer port reachable"),
    )
}

fn with_cluster<T>(msg: T, id: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("replikv-from", MetadataValue::from(1u32));
    if let Some(id) = id {
        r.metadata_mut()
            .insert("replikv-cluster", id.parse().expect("ascii"));
    }
    r
}

/// Peer requests that do not name the server's cluster are refused and change nothing; a
/// ballot near u64::MAX is refused even with the right id, and failover still works.
#[test]
fn foreign_peers_and_hostile_ballots_are_refused() {
    run(async {
        let (mut cluster, primary) = start_healthy(3, &[]).await;
        let backup = (primary + 1) % 3;
        let mut p = peer(&cluster, backup).await;
        let found = p
            .discover(with_cluster(DiscoverRequest { from: 1 }, None))
            .await
            .expect("discover is open to servers without state")
            .into_inner();
        let id = found.cluster_id.clone();
        assert_eq!(id.len(), 32, "the cluster id: {found:?}");
        let before = status(&cluster, backup).await;
        let prepare = |ballot| PrepareRequest {
            ballot,
            proposer: 1,
            view: found.view.clone(),
        };
        for header in [
            None,
            Some("0123456789abcdef0123456789abcdef"),
            Some("nonsense"),
        ] {
            let err = p
                .prepare(with_cluster(prepare(epoch(&before) + 1), header))
                .await
                .expect_err("a foreign prepare is refused");
            assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        }
        let hostile = p
            .prepare(with_cluster(prepare(u64::MAX - 1), Some(&id)))
            .await
            .expect("answered")
            .into_inner();
        assert!(!hostile.promised, "{hostile:?}");
        let after = status(&cluster, backup).await;
        assert_eq!(after.promised, before.promised, "nothing was promised");
        assert_eq!(after.view, before.view);

        // Failover still works: the next primary's ballot is an ordinary one.
        let client = client(&cluster).await;
        client.put(bytes("before"), bytes("1")).await.expect("put");
        cluster.kill(primary).expect("kill");
        let started = Instant::now();
        let (_, s) = cluster
            .wait_for_primary(BOOT_TIMEOUT)
            .await
            .expect("a new primary");
        assert!(epoch(&s) < 1 << 20, "an ordinary epoch: {s:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            client.get(bytes("before")).await.expect("get"),
            Some(bytes("1"))
        );
    });
}
