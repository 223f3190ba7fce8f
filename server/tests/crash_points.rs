//! Crashes at every step of a view change and of a state transfer (docs/design.md §5, §7, §10),
//! under writes, and the fail-stop rules: whatever step a server dies at, the cluster comes
//! back once the dead are restarted, every server converges, and no acknowledged write is
//! lost or applied twice.

mod common;

use std::time::{Duration, Instant};

use common::*;
use replikv_proto::peer::peer_client::PeerClient;
use replikv_proto::peer::{DiscoverRequest, FaultRequest, WriteRequest};

use tonic::metadata::MetadataValue;

/// Arms a crash of `who` at `point`, then triggers a view change: the primary is killed
/// (or, for a transfer, a wiped backup is restarted so that it pulls one). After the crash
/// every dead server is restarted; the cluster must converge with every acknowledged write.
async fn crash_at(point: &str) {
    let (mut cluster, primary, _) = start_with_faults(&[]).await;
    let next = (primary + 1) % 3;
    let other = (primary + 2) % 3;
    let writer = Writer::start(client(&cluster).await, point);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = match point {
        // The proposer of the take-over is the next rank after the dead primary.
        "prepared" | "decided" | "reconciled" => next,
        // The other backup answers the take-over as an acceptor and is installed by it.
        "promised" | "accepted" | "installed" => other,
        // The primary serves the transfer a restarted, wiped backup pulls.
        "transferring" => primary,
        _ => unreachable!("unknown point {point}"),
    };
    admin(
        &cluster,
        victim,
        FaultRequest {
            crash_at: point.into(),
            ..Default::default()
        },
    )
    .await;
    if point == "transferring" {
        cluster.kill(other).expect("kill");
        cluster.wipe(other).expect("wipe");
        cluster.restart(other).expect("restart");
    } else {
        cluster.kill(primary).expect("kill");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.is_running(victim) {
        assert!(
            Instant::now() < deadline,
            "server {victim} never reached {point}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for rank in 0..3 {
        if !cluster.is_running(rank) {
            cluster.restart(rank).expect("restart");
        }
    }
    cluster
        .wait_converged(BOOT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("after a crash at {point}: {e}"));
    let log = writer.stop().await;
    log.assert_no_anomalies();
    assert!(!log.acked.is_empty(), "writes went on: {}", log.summary());
    assert_every_server_reads(&cluster, 0..3, &log.all_acked()).await;
}

#[test]
fn a_proposer_crash_after_its_prepare_loses_nothing() {
    run(crash_at("prepared"));
}

#[test]
fn an_acceptor_crash_after_its_promise_loses_nothing() {
    run(crash_at("promised"));
}

#[test]
fn an_acceptor_crash_after_its_accept_loses_nothing() {
    run(crash_at("accepted"));
}

#[test]
fn a_proposer_crash_after_the_decision_loses_nothing() {
    run(crash_at("decided"));
}

#[test]
fn a_new_primary_crash_during_reconcile_loses_nothing() {
    run(crash_at("reconciled"));
}

#[test]
fn a_member_crash_during_its_install_loses_nothing() {
    run(crash_at("installed"));
}

#[test]
fn a_source_crash_during_a_transfer_to_a_wiped_server_loses_nothing() {
    run(crash_at("transferring"));
}

/// A panic in any task stops the server (fail-stop) instead of leaving it serving without
/// that task; the others carry on.
#[test]
fn a_panicking_task_stops_the_server() {
    run(async {
        let (mut cluster, primary, _) = start_with_faults(&[]).await;
        let victim = (primary + 1) % 3;
        admin(
            &cluster,
            victim,
            FaultRequest {
                panic_task: true,
                ..Default::default()
            },
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while cluster.is_running(victim) {
            assert!(Instant::now() < deadline, "server {victim} kept running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = std::fs::read_to_string(cluster.log_path(victim)).expect("log");
        assert!(log.contains("fail-stop"), "the log says why it stopped");
        let client = client(&cluster).await;
        client.put(bytes("k"), bytes("v")).await.expect("put");
        assert_eq!(client.get(bytes("k")).await.expect("get"), Some(bytes("v")));
    });
}

/// A forwarded write obeys the same limits as a client's Put: an oversized value gets
/// INVALID_ARGUMENT and nothing is stored.
#[test]
fn a_forward_checks_the_value_like_a_put() {
    run(async {
        let (cluster, primary) = start_healthy(3, &["--max-value-bytes", "100"]).await;
        // As server 1, with its certificate: the limits hold for a real peer too.
        let mut peer = PeerClient::new(
            cluster
                .peer_channel(primary, "node-1")
                .await
                .expect("peer port"),
        );
        let id = peer
            .discover(DiscoverRequest { from: 1 })
            .await
            .expect("discover")
            .into_inner()
            .cluster_id;
        let mut req = tonic::Request::new(WriteRequest {
            key: bytes("big"),
            value: Some(vec![7u8; 101].into()),
            id: None,
        });
        req.metadata_mut()
            .insert("replikv-cluster", id.parse().expect("ascii"));
        req.metadata_mut()
            .insert("replikv-from", MetadataValue::from(1u32));
        let err = peer.forward(req).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        let client = client(&cluster).await;
        assert_eq!(client.get(bytes("big")).await.expect("get"), None);
    });
}
