//! Regression tests for protocol bugs found by the nemesis (`replikv-chaos`); each
//! test is named for the bug it pins down.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use replikv_proto::peer::{FaultDirection, FaultKind, FaultRequest, FaultRule};
use replikv_testkit::LocalCluster;
use tokio::time::Instant;

use common::*;

async fn set_faults(cluster: &LocalCluster, rank: usize, rules: Vec<FaultRule>, heal: bool) {
    admin(
        cluster,
        rank,
        FaultRequest {
            rules,
            heal,
            ..Default::default()
        },
    )
    .await;
}

/// Finding F1 (stale read after a view change): the install that drops a member used to
/// commit every write the primary had applied, although the dropped member could still hold
/// a read lease and did not have those writes; it then answered reads with the values they
/// replaced. A write may only be acknowledged once every lease that could miss it has run out.
/// (With the bug, writes sequenced while the drop was being decided were acknowledged about
/// 0.7 s into the fault while the member's 2 s lease still ran.)
#[test]
fn install_after_dropping_a_member_waits_out_its_lease() {
    run(async {
        // A long lease makes the window in which the dropped member may still read wide
        // enough to observe reliably.
        let (cluster, primary, _) = start_with_faults(&["--lease-ms", "2000"]).await;
        let dropped = (primary + 1) % 3;
        let writer = primary_routed_client(&cluster).await;
        let reader = pinned(&cluster, dropped).await;
        writer.put("k", "0").await.expect("first write");
        // Wait until the member has the write committed, so it answers reads of it at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while reader.get("k").await.ok().flatten().as_deref() != Some(&b"0"[..]) {
            assert!(
                Instant::now() < deadline,
                "the member never served the first write"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The primary's messages to the member are lost: it drops the member, which still
        // holds the lease its last heartbeat gave it and answers reads from what it has.
        set_faults(
            &cluster,
            primary,
            vec![FaultRule {
                peer: dropped as u32,
                kind: FaultKind::Drop as i32,
                direction: FaultDirection::Outgoing as i32,
                delay_ms: 0,
            }],
            false,
        )
        .await;
        let start = Instant::now();
        let acks: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
        let window = Duration::from_secs(3);
        let writes = {
            let acks = acks.clone();
            async move {
                let mut i = 1u64;
                while start.elapsed() < window {
                    if writer.put("k", i.to_string()).await.is_ok() {
                        acks.lock().unwrap().push((i, Instant::now()));
                    }
                    i += 1;
                }
            }
        };
        let reads = async {
            let mut seen = Vec::new();
            while start.elapsed() < window {
                let invoked = Instant::now();
                if let Ok(Some(v)) = reader.get("k").await {
                    let v: u64 = std::str::from_utf8(&v).unwrap().parse().unwrap();
                    seen.push((v, invoked));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        };
        let ((), reads) = tokio::join!(writes, reads);
        set_faults(&cluster, primary, Vec::new(), true).await;

        let acks = acks.lock().unwrap().clone();
        assert!(
            acks.len() >= 3,
            "the primary kept acknowledging writes: {acks:?}"
        );
        assert!(
            !reads.is_empty(),
            "the dropped member served reads under its lease"
        );
        for (value, invoked) in &reads {
            // Every write acknowledged before this read began must be visible to it.
            let newest_acked = acks
                .iter()
                .filter(|(_, at)| at < invoked)
                .map(|(v, _)| *v)
                .max();
            if let Some(newest) = newest_acked {
                assert!(
                    *value >= newest,
                    "stale read at the dropped member: got {value} after {newest} was acknowledged"
                );
            }
        }
    });
}

/// Rules that cut every server-to-server link of `isolated`, in both directions, on every
/// server (clients still reach it).
async fn isolate(cluster: &LocalCluster, isolated: usize) {
    for rank in 0..cluster.len() {
        let peers: Vec<usize> = if rank == isolated {
            (0..cluster.len()).filter(|&r| r != isolated).collect()
        } else {
            vec![isolated]
        };
        let rules = peers
            .into_iter()
            .map(|p| FaultRule {
                peer: p as u32,
                kind: FaultKind::Drop as i32,
                direction: FaultDirection::Both as i32,
                delay_ms: 0,
            })
            .collect();
        set_faults(cluster, rank, rules, false).await;
    }
}

/// Finding F2 (no failover while the primary is isolated): every take-over round waited the
/// full prepare timeout for the silent primary, so the next proposer pre-empted it, round
/// after round, and writes stopped for seconds. A round now proceeds once a quorum answers.
#[test]
fn isolated_primary_is_replaced_promptly() {
    run(async {
        let (cluster, old, old_status) = start_with_faults(&[]).await;
        let started = Instant::now();
        isolate(&cluster, old).await;
        let deadline = started + Duration::from_secs(10);
        let (new, new_epoch) = loop {
            assert!(
                Instant::now() < deadline,
                "no new primary within 10 s of isolating {old}"
            );
            let mut found = None;
            for rank in (0..3).filter(|&r| r != old) {
                if let Some(s) = cluster.status(rank).await {
                    if s.role == "primary" && s.serving {
                        found = Some((rank, epoch(&s)));
                    }
                }
            }
            if let Some(f) = found {
                break f;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let took = started.elapsed();
        assert!(
            new_epoch > epoch(&old_status),
            "the new primary has a higher epoch"
        );
        assert!(
            took < Duration::from_millis(2500),
            "rank {new} took over after {took:?}"
        );
        // The majority side accepts writes; the isolated primary cannot commit any.
        let majority = pinned(&cluster, new).await;
        majority
            .put("after-isolation", "x")
            .await
            .expect("write on the majority side");
        for rank in 0..3 {
            set_faults(&cluster, rank, Vec::new(), true).await;
        }
        cluster
            .wait_converged(Duration::from_secs(15))
            .await
            .expect("the old primary rejoins after the heal");
        let old_side = pinned(&cluster, old).await;
        assert_eq!(
            old_side
                .get("after-isolation")
                .await
                .expect("read at the old primary")
                .as_deref(),
            Some(&b"x"[..])
        );
    });
}
