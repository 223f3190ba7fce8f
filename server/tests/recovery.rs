//! Restarts: servers that crashed come back, in any order, and end with every
//! write the cluster acknowledged, including after a crash of all of them
//! (docs/design.md §7).

mod common;

use std::time::Duration;

use common::{bytes, Expected};
use rand::seq::SliceRandom;

/// A cluster shrinks one crash at a time down to its primary alone
/// (docs/design.md §5: a quorum of a view may be exactly half of it when that half
/// holds the primary), writing all along; then the crashed servers come back
/// in a random order and catch up.
#[test]
fn shrink_to_one_survivor_then_restart_everyone_in_random_order() {
    common::run(async {
        let (mut cluster, _) = common::start_healthy(5, &[]).await;
        let client = common::client(&cluster).await;
        let mut expected = Expected::new();
        common::put_fresh(&client, "start", 10, &mut expected).await;

        let mut rng = rand::rng();
        let mut killed = Vec::new();
        for step in 0..cluster.len() - 1 {
            let (primary, _) = cluster
                .wait_for_primary(Duration::from_secs(10))
                .await
                .expect("a primary before each crash");
            let mut candidates: Vec<usize> = (0..cluster.len())
                .filter(|&r| r != primary && !killed.contains(&r))
                .collect();
            candidates.shuffle(&mut rng);
            let victim = candidates[0];
            let victim_status = common::status(&cluster, victim).await;
            assert_ne!(
                victim_status.role, "primary",
                "only backups are crashed here"
            );
            eprintln!("step {step}: killing {victim} (primary {primary})");
            cluster.kill(victim).unwrap();
            killed.push(victim);

            // The survivors must take writes, and reads must see the latest value.
            common::put_fresh(&client, &format!("after-kill-{step}"), 10, &mut expected).await;
            let old = client.put(bytes("counter"), bytes(&step.to_string())).await;
            let want_old = step.checked_sub(1).map(|s| bytes(&s.to_string()));
            assert_eq!(old.unwrap(), want_old, "counter after kill {step}");
            expected.insert("counter".into(), Some(step.to_string()));
        }
        let survivors: Vec<usize> = (0..cluster.len())
            .filter(|r| cluster.is_running(*r))
            .collect();
        assert_eq!(survivors.len(), 1, "one server left");
        let survivor_status = common::status(&cluster, survivors[0]).await;
        assert_eq!(
            survivor_status.role, "primary",
            "the last server is the primary"
        );
        assert!(survivor_status.serving, "the last server still serves");

        killed.shuffle(&mut rng);
        eprintln!("restarting in order {killed:?}");
        for (i, &rank) in killed.iter().enumerate() {
            cluster.restart(rank).unwrap();
            common::put_fresh(&client, &format!("after-restart-{i}"), 5, &mut expected).await;
        }
        cluster
            .wait_converged(Duration::from_secs(20))
            .await
            .expect("every restarted server catches up");
        common::assert_every_server_reads(&cluster, 0..cluster.len(), &expected).await;
    });
}

/// Every server crashes at once (SIGKILL, no flush on exit); after a restart
/// in a random order, with a pause between servers, every acknowledged
/// write is there, deletes included.
#[test]
fn whole_cluster_crash_loses_no_acknowledged_write() {
    common::run(async {
        let (mut cluster, _) = common::start_healthy(3, &[]).await;
        let client = common::client(&cluster).await;
        let mut expected = Expected::new();
        common::put_fresh(&client, "k", 100, &mut expected).await;
        for i in (0..100).step_by(7) {
            let key = format!("k-{i:04}");
            client.put(bytes(&key), bytes("second")).await.unwrap();
            expected.insert(key, Some("second".into()));
        }
        for i in (3..100).step_by(7) {
            let key = format!("k-{i:04}");
            client.delete(bytes(&key)).await.unwrap();
            expected.insert(key, None);
        }

        cluster.kill_all();
        let mut order: Vec<usize> = (0..cluster.len()).collect();
        order.shuffle(&mut rand::rng());
        eprintln!("restarting in order {order:?}");
        for &rank in &order {
            cluster.restart(rank).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        cluster
            .wait_for_primary(common::BOOT_TIMEOUT)
            .await
            .expect("a primary after the total restart");
        cluster
            .wait_converged(common::BOOT_TIMEOUT)
            .await
            .expect("every server serves after the total restart");
        common::assert_every_server_reads(&cluster, 0..cluster.len(), &expected).await;

        // The recovered state is the one new writes build on.
        assert_eq!(
            client.put(bytes("k-0000"), bytes("third")).await.unwrap(),
            Some(bytes("second"))
        );
        assert_eq!(
            client.put(bytes("k-0003"), bytes("back")).await.unwrap(),
            None
        );
    });
}

/// SIGTERM is a clean shutdown: every server exits promptly on its own and
/// comes back with its data.
#[test]
fn clean_shutdown_and_restart_keeps_the_data() {
    common::run(async {
        let (mut cluster, _) = common::start_healthy(3, &[]).await;
        let client = common::client(&cluster).await;
        let mut expected = Expected::new();
        common::put_fresh(&client, "kept", 20, &mut expected).await;

        for rank in 0..cluster.len() {
            let started = std::time::Instant::now();
            cluster.terminate(rank).unwrap();
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(4),
                "server {rank} took {took:?} to stop on SIGTERM"
            );
            assert!(!cluster.is_running(rank));
        }
        for rank in 0..cluster.len() {
            cluster.restart(rank).unwrap();
        }
        cluster
            .wait_converged(common::BOOT_TIMEOUT)
            .await
            .expect("every server serves after the restart");
        common::assert_every_server_reads(&cluster, 0..cluster.len(), &expected).await;
    });
}
