//! Paxos state is persisted before any reply that depends on it (docs/design.md §10): an acceptor
//! killed right after promising, before its reply left, still holds that promise when it
//! comes back. The order in which promises, accepted proposals and views survive every
//! storage step is checked by the storage unit tests
//! (`paxos_state_reopens_as_last_saved_whatever_the_step_it_stopped_at`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use replikv_proto::peer::FaultRequest;

/// The acceptor that answers the take-over is armed to die right after persisting its
/// promise; the primary is killed, so the next rank prepares a higher ballot. Once the
/// acceptor is dead the proposer is paused, so that nothing can make the acceptor promise
/// again, and the acceptor is restarted: its status must show a promise above the one it
/// held before, the one it persisted and never got to send.
#[test]
fn an_acceptor_killed_right_after_promising_still_holds_the_promise_after_a_restart() {
    run(async {
        let (mut cluster, primary, _) = start_with_faults(&[]).await;
        let proposer = (primary + 1) % 3;
        let acceptor = (primary + 2) % 3;
        let before = status(&cluster, acceptor).await;
        admin(
            &cluster,
            acceptor,
            FaultRequest {
                crash_at: "promised".into(),
                ..Default::default()
            },
        )
        .await;
        cluster.kill(primary).expect("kill the primary");
        let deadline = Instant::now() + Duration::from_secs(10);
        while cluster.is_running(acceptor) {
            assert!(
                Instant::now() < deadline,
                "server {acceptor} never promised"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cluster.pause(proposer).expect("pause the proposer");
        cluster.restart(acceptor).expect("restart the acceptor");
        // Read as soon as it answers: alone, it would itself propose only after a lease
        // and a stagger (~0.85 s) without a primary.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let after = loop {
            if let Some(s) = cluster.status(acceptor).await {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "server {acceptor} did not come back"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Had it proposed a view change itself since it came back, its own ballot could
        // stand in for the lost promise: the check would prove nothing.
        let log = std::fs::read_to_string(cluster.log_path(acceptor)).unwrap_or_default();
        let this_life = log
            .rsplit("--- LocalCluster: starting rank")
            .next()
            .unwrap_or("");
        assert!(
            !this_life.contains("proposing a view change"),
            "server {acceptor} proposed by itself before its status was read:\n{this_life}"
        );
        assert!(
            after.promised > before.promised,
            "server {acceptor} promised {} before and {} after a crash right after a new \
             promise: the promise was not persisted before its reply",
            before.promised,
            after.promised
        );
        let log = std::fs::read_to_string(cluster.log_path(proposer)).unwrap_or_default();
        cluster.resume(proposer).expect("resume the proposer");
        cluster.restart(primary).expect("restart the old primary");
        cluster
            .wait_converged(BOOT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("after the crash: {e}; proposer log:\n{log}"));
    });
}
