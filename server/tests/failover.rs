//! Crashes under load: a client keeps writing while a backup or the primary
//! is killed with SIGKILL, and the cluster must keep (or quickly regain) its
//! ability to write without losing anything it acknowledged.

mod common;

use std::time::{Duration, Instant};

use common::Writer;

/// Longest acceptable stall of a continuous writer when one server crashes:
/// failure detection (ack timeout, 250 ms) plus the lease guard before the
/// primary commits without the dead member (L * 1.1 = 550 ms), with room to spare.
const MAX_WRITE_STALL: Duration = Duration::from_millis(1500);
/// A backup takes over a silent primary after L * 1.1 plus a 150 ms stagger,
/// then waits L * 1.1 before serving (docs/design.md §5): about 1.3 s.
const FAILOVER_WITHIN: Duration = Duration::from_secs(2);

#[test]
fn killed_backup_does_not_stall_writes_and_catches_up_after_restart() {
    common::run(async {
        let (mut cluster, primary) = common::start_healthy(3, &[]).await;
        let backup = (primary + 1) % cluster.len();
        let writer = Writer::start(common::client(&cluster).await, "w");
        tokio::time::sleep(Duration::from_millis(700)).await;

        let killed_at = Instant::now();
        cluster.kill(backup).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;

        let restarted_at = Instant::now();
        cluster.restart(backup).unwrap();
        // Keep writing while it rejoins: the join must not stall writes either.
        common::wait_serving(&cluster, backup, Duration::from_secs(15)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stopped_at = Instant::now();
        let log = writer.stop().await;
        eprintln!("writer: {}", log.summary());

        log.assert_no_anomalies();
        let down_gap = log.max_gap(killed_at, restarted_at);
        assert!(
            down_gap <= MAX_WRITE_STALL,
            "writes stalled {down_gap:?} after backup {backup} was killed"
        );
        let rejoin_gap = log.max_gap(restarted_at, stopped_at);
        eprintln!("longest write gap: {down_gap:?} while down, {rejoin_gap:?} while rejoining");
        assert!(
            rejoin_gap <= MAX_WRITE_STALL,
            "writes stalled {rejoin_gap:?} while backup {backup} rejoined"
        );

        cluster
            .wait_converged(Duration::from_secs(15))
            .await
            .expect("the restarted backup catches up");
        let missed = log.acked_between(killed_at, restarted_at);
        assert!(
            !missed.is_empty(),
            "no write was acknowledged while backup {backup} was down"
        );
        let restarted = common::pinned(&cluster, backup).await;
        common::assert_reads(&restarted, &missed, "restarted backup, writes it missed").await;
        common::assert_reads(&restarted, &log.all_acked(), "restarted backup, all writes").await;
    });
}

#[test]
fn killed_primary_is_replaced_by_the_next_rank_without_losing_writes() {
    common::run(async {
        let (mut cluster, old_primary) = common::start_healthy(3, &[]).await;
        let old_epoch = common::epoch(&common::status(&cluster, old_primary).await);
        let writer = Writer::start(common::client(&cluster).await, "w");
        tokio::time::sleep(Duration::from_millis(700)).await;

        let killed_at = Instant::now();
        cluster.kill(old_primary).unwrap();
        let (new_primary, status) = cluster
            .wait_for_primary(FAILOVER_WITHIN)
            .await
            .expect("a new primary within 2 s of the crash");
        let took = killed_at.elapsed();
        eprintln!("rank {new_primary} took over after {took:?}");
        assert_eq!(
            new_primary,
            (old_primary + 1) % cluster.len(),
            "the next rank after the dead primary takes over"
        );
        assert!(
            common::epoch(&status) > old_epoch,
            "the new view has a higher epoch ({} <= {old_epoch})",
            common::epoch(&status)
        );

        // Writes continue under the new primary.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let log = writer.stop().await;
        eprintln!("writer: {}", log.summary());
        log.assert_no_anomalies();
        let after = log.acked_between(killed_at, Instant::now());
        assert!(
            !after.is_empty(),
            "no write was acknowledged after failover"
        );

        let live: Vec<usize> = (0..cluster.len()).filter(|&r| r != old_primary).collect();
        common::assert_every_server_reads(&cluster, live, &log.all_acked()).await;
    });
}

#[test]
fn paused_backup_is_dropped_then_catches_up_after_resume() {
    common::run(async {
        let (mut cluster, primary) = common::start_healthy(3, &[]).await;
        let backup = (primary + 2) % cluster.len();
        let writer = Writer::start(common::primary_routed_client(&cluster).await, "w");
        tokio::time::sleep(Duration::from_millis(500)).await;

        // A pause longer than the lease (500 ms) looks like a crash to the others.
        let paused_at = Instant::now();
        cluster.pause(backup).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let resumed_at = Instant::now();
        cluster.resume(backup).unwrap();
        common::wait_serving(&cluster, backup, Duration::from_secs(15)).await;
        let log = writer.stop().await;
        eprintln!("writer: {}", log.summary());

        log.assert_no_anomalies();
        let gap = log.max_gap(paused_at, resumed_at);
        eprintln!("longest write gap while paused: {gap:?}");
        assert!(
            gap <= MAX_WRITE_STALL,
            "writes stalled {gap:?} while backup {backup} was paused"
        );
        cluster
            .wait_converged(Duration::from_secs(15))
            .await
            .expect("the resumed backup catches up");
        let resumed = common::pinned(&cluster, backup).await;
        common::assert_reads(&resumed, &log.all_acked(), "resumed backup").await;
    });
}
