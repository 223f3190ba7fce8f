//! The compose cluster (deploy/compose.yaml, started by scripts/compose.sh from the image of
//! this test build) under the faults a container platform deals out, while a writer on the
//! host records every acknowledged write: a container killed and started again, the
//! primary's container cut off the network and connected again, all three restarted one
//! at a time, and a dead server replaced by a new one under another name. After each, every acknowledged write is read back from every server, and
//! the longest stretch without an acknowledged write is printed and written to
//! results/deploy/unavailability.csv.
//!
//! Needs Docker; fails with a clear message without it, unless REPLIKV_SKIP_DOCKER=1.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use replikv_deploytest::compose::{ComposeCluster, NODES, REQUEST_TIMEOUT};
use replikv_deploytest::docker;
use replikv_deploytest::results::{self, Row};
use replikv_testkit::fixtures::{assert_reads, run_for, WriteLog, Writer};

/// One compose cluster at a time: three clusters of three servers on a small machine would
/// measure the machine, not the faults.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

/// Bound on one test, cluster start and tear-down included.
const TEST_LIMIT: Duration = Duration::from_secs(300);
/// How long the servers may take to serve again after a fault is healed (a restarted
/// server catches up by state transfer first).
const RECOVER: Duration = Duration::from_secs(90);
/// Writes run this long before a fault and after recovery, so that the writer is seen to
/// go on.
const STEADY: Duration = Duration::from_secs(3);

/// Blocking docker work from inside the test's runtime, leaving the writer its threads.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn others(rank: usize) -> Vec<usize> {
    (0..NODES).filter(|&r| r != rank).collect()
}

/// Every acknowledged write of `log` is read back from every server, no write applied
/// twice, and writes were acknowledged after `recovered`.
async fn check_writes(cluster: &ComposeCluster, log: &WriteLog, recovered: Instant) {
    check_writes_on(cluster, &[0, 1, 2], log, recovered).await;
}

/// As [`check_writes`], reading back from the servers of `ranks`.
async fn check_writes_on(
    cluster: &ComposeCluster,
    ranks: &[usize],
    log: &WriteLog,
    recovered: Instant,
) {
    log.assert_no_anomalies();
    assert!(
        log.acked.iter().any(|a| a.at > recovered),
        "no write acknowledged after the cluster recovered: {}",
        log.summary()
    );
    let expected = log.all_acked();
    for &rank in ranks {
        let client = cluster.pinned(rank).await;
        assert_reads(&client, &expected, &format!("replikv-{rank}")).await;
    }
    println!(
        "{} acknowledged writes read back from servers {ranks:?}",
        expected.len()
    );
}

/// Lets the writer run on after the cluster `recovered`: until it has written for
/// [`STEADY`], and at least until a write is acknowledged after `recovered` (bounded by one
/// request's deadline, which a request begun during the fault may still be retrying to).
async fn go_on(writer: &Writer, recovered: Instant) {
    tokio::time::sleep(STEADY).await;
    writer
        .wait_for_ack_after(recovered, REQUEST_TIMEOUT + STEADY)
        .await;
}

fn row(event: &str, rank: usize, log: &WriteLog, from: Instant, to: Instant) -> Row {
    Row {
        event: event.to_owned(),
        container: format!("replikv-{rank}"),
        unavailability: log.max_gap(from, to),
        acked: log.acked.len(),
        unknown: log.unknown.len(),
        failed: log.failed.len(),
        ip_before: String::new(),
        ip_after: String::new(),
    }
}

/// Starts the cluster and checks what every test relies on: each container's server took
/// the rank its hostname names (--rank-from-hostname), and all serve in one view.
async fn start() -> (ComposeCluster, usize) {
    let cluster = blocking(|| ComposeCluster::up(docker::test_image()));
    let primary = cluster.wait_serving(&[0, 1, 2], RECOVER).await;
    for (rank, status) in cluster.statuses().await.iter().enumerate() {
        let status = status.as_ref().expect("every server answers");
        assert_eq!(
            status.rank as usize, rank,
            "replikv-{rank} runs as rank {rank}"
        );
    }
    (cluster, primary)
}

#[test]
fn a_killed_container_started_again_is_found_at_its_new_address_and_catches_up() {
    if !docker::available() {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
    run_for(TEST_LIMIT, async {
        let (cluster, primary) = start().await;
        let writer = Writer::start(cluster.client().await, "kill");
        tokio::time::sleep(STEADY).await;
        let ip_before = blocking(|| cluster.ip(primary));
        let fault = Instant::now();
        blocking(|| cluster.kill(primary));
        let held = blocking(|| cluster.hold_free_address());
        cluster.wait_serving(&others(primary), RECOVER).await;
        tokio::time::sleep(STEADY).await;
        blocking(|| cluster.start(primary));
        cluster.wait_serving(&[0, 1, 2], RECOVER).await;
        let recovered = Instant::now();
        let ip_after = blocking(|| cluster.ip(primary));
        go_on(&writer, recovered).await;
        let log = writer.stop().await;
        check_writes(&cluster, &log, recovered).await;
        // The others found it by name although its address changed: peers are resolved
        // again on every reconnect.
        assert_eq!(held, ip_before, "the killed server's address was taken");
        assert_ne!(
            ip_before, ip_after,
            "the restarted server has a new address"
        );
        results::record(&[Row {
            ip_before,
            ip_after,
            ..row("kill-start", primary, &log, fault, recovered)
        }]);
    });
}

#[test]
fn the_primary_cut_off_the_network_rejoins_when_connected_again() {
    if !docker::available() {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
    run_for(TEST_LIMIT, async {
        let (cluster, primary) = start().await;
        let writer = Writer::start(cluster.client().await, "partition");
        tokio::time::sleep(STEADY).await;
        let ip_before = blocking(|| cluster.ip(primary));
        let fault = Instant::now();
        blocking(|| cluster.disconnect(primary));
        let held = blocking(|| cluster.hold_free_address());
        let new_primary = cluster.wait_serving(&others(primary), RECOVER).await;
        assert_ne!(new_primary, primary, "a server cut off cannot stay primary");
        tokio::time::sleep(STEADY).await;
        blocking(|| cluster.connect(primary));
        cluster.wait_serving(&[0, 1, 2], RECOVER).await;
        let recovered = Instant::now();
        let ip_after = blocking(|| cluster.ip(primary));
        go_on(&writer, recovered).await;
        let log = writer.stop().await;
        check_writes(&cluster, &log, recovered).await;
        assert_eq!(held, ip_before, "the cut-off server's address was taken");
        assert_ne!(
            ip_before, ip_after,
            "the reconnected server has a new address"
        );
        results::record(&[Row {
            ip_before,
            ip_after,
            ..row("network-disconnect", primary, &log, fault, recovered)
        }]);
    });
}

#[test]
fn all_three_restarted_one_at_a_time_lose_no_acknowledged_write() {
    if !docker::available() {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
    run_for(TEST_LIMIT, async {
        let (cluster, _) = start().await;
        let writer = Writer::start(cluster.client().await, "rolling");
        tokio::time::sleep(STEADY).await;
        let mut events = Vec::new();
        for rank in 0..NODES {
            let ip_before = blocking(|| cluster.ip(rank));
            let fault = Instant::now();
            blocking(|| cluster.restart(rank));
            cluster.wait_serving(&[0, 1, 2], RECOVER).await;
            let recovered = Instant::now();
            let ip_after = blocking(|| cluster.ip(rank));
            events.push((rank, fault, recovered, ip_before, ip_after));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let recovered = events.last().expect("three restarts").2;
        go_on(&writer, recovered).await;
        let log = writer.stop().await;
        check_writes(&cluster, &log, recovered).await;
        let rows: Vec<Row> = events
            .into_iter()
            .map(|(rank, fault, recovered, ip_before, ip_after)| Row {
                ip_before,
                ip_after,
                ..row(
                    &format!("rolling-restart-{rank}"),
                    rank,
                    &log,
                    fault,
                    recovered,
                )
            })
            .collect();
        results::record(&rows);
    });
}

#[test]
fn a_dead_node_replaced_by_a_new_container_under_another_name_loses_nothing() {
    if !docker::available() {
        return;
    }
    let _one = ONE_CLUSTER.lock().unwrap_or_else(PoisonError::into_inner);
    run_for(TEST_LIMIT, async {
        let (cluster, primary) = start().await;
        let writer = Writer::start(cluster.client().await, "replace");
        tokio::time::sleep(STEADY).await;
        // The machine of a backup dies for good; the operator removes it from the
        // configuration and adds a new server, which takes the next rank and its own name.
        let dead = *others(primary).last().expect("two backups");
        let fault = Instant::now();
        blocking(|| cluster.kill(dead));
        let left = others(dead);
        cluster.wait_serving(&left, RECOVER).await;
        blocking(|| cluster.remove_node(dead));
        let added = blocking(|| cluster.add_node());
        assert_eq!(
            added, NODES,
            "ranks are never reused: the new server is rank {NODES}"
        );
        let now: Vec<usize> = left.iter().copied().chain([added]).collect();
        cluster.wait_serving(&now, RECOVER).await;
        let recovered = Instant::now();
        let members = cluster.client().await.members().await.expect("member list");
        let view = members.view.expect("a view");
        let mut ranks: Vec<u32> = view.members.clone();
        ranks.sort_unstable();
        assert_eq!(
            ranks,
            now.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            "the view holds the two servers left and the new one"
        );
        assert!(
            view.config
                .expect("a configuration")
                .servers
                .iter()
                .all(|s| s.rank as usize != dead),
            "the dead server is out of the configuration"
        );
        go_on(&writer, recovered).await;
        let log = writer.stop().await;
        check_writes_on(&cluster, &now, &log, recovered).await;
        results::record(&[row(
            &format!("replace-by-replikv-{added}"),
            dead,
            &log,
            fault,
            recovered,
        )]);
    });
}
