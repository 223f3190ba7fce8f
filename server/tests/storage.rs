//! Storage integrity and bounded growth (docs/design.md §3, §7): a damaged write-ahead log stops
//! the server at start naming the damage and changing nothing; deleted keys are collected
//! everywhere, and a member that missed the deletes learns of them through a full transfer.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bytes, Expected};
use replikv_client::Client;
use replikv_server::storage::SEGMENT_BYTES_ENV;
use replikv_testkit::{ClusterOptions, LocalCluster, ServerCommand};

/// The server binary, run through `env` with small log segments: a checkpoint starts a new
/// segment every few writes, so a log of two segments is easy to catch.
fn small_segments() -> ServerCommand {
    ServerCommand::new(
        "env",
        vec![
            format!("{SEGMENT_BYTES_ENV}=4096"),
            env!("CARGO_BIN_EXE_replikv-server").to_string(),
        ],
    )
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let data = std::fs::read(&path).unwrap();
                files.insert(path, data);
            }
        }
    }
    files
}

/// The log's segments, oldest first.
fn segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = match std::fs::read_dir(data_dir.join("wal")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect(),
        Err(_) => Vec::new(),
    };
    segs.sort();
    segs
}

/// Offset of the second record of a segment, if it holds two whole ones.
fn second_record(segment: &Path) -> Option<u64> {
    let data = std::fs::read(segment).ok()?;
    let len = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(raw) as usize).filter(|&l| l > 0)
    };
    let second = 8 + len(0)?;
    let end = second + 8 + len(second)?;
    (end <= data.len()).then_some(second as u64)
}

/// Runs the server binary on `data_dir` by itself and returns its exit status and stderr;
/// fails the test if it is still running after `limit`.
fn run_server_until_exit(
    cluster: &LocalCluster,
    rank: usize,
    limit: Duration,
) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_replikv-server"))
        .arg("--rank")
        .arg(rank.to_string())
        .args(cluster.common_args())
        .arg("--data-dir")
        .arg(cluster.data_dir(rank))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not exit within {limit:?} on a damaged log");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client whose requests give up after 2 s: its writer must not outlive a killed server
/// by long.
async fn impatient_client(cluster: &LocalCluster) -> Client {
    Client::connect(
        cluster
            .client_config()
            .with_request_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("client config is valid")
}

/// Puts fresh keys until aborted; the acknowledged ones go to `acked`.
fn spawn_writer(client: Client, acked: Arc<Mutex<Expected>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0u64.. {
            let (key, value) = (format!("w-{i:06}"), format!("value-{i}"));
            if let Ok(None) = client.put(bytes(&key), bytes(&value)).await {
                acked.lock().unwrap().insert(key, Some(value));
            }
        }
    })
}

/// A bad record in a segment older than the newest is damage, not a torn tail: the records
/// after it may have been acknowledged. The server must stop at start, name the file and
/// the offset, and leave its data directory exactly as it was; once the damage is undone
/// it starts and has every acknowledged write.
#[test]
fn damage_in_an_older_log_segment_stops_the_server_and_changes_nothing() {
    common::run(async {
        let mut cluster = LocalCluster::start(ClusterOptions {
            servers: 1,
            command: Some(small_segments()),
            ..ClusterOptions::default()
        })
        .expect("start the server");
        cluster
            .wait_for_primary(common::BOOT_TIMEOUT)
            .await
            .expect("the server serves");
        let acked = Arc::new(Mutex::new(Expected::new()));
        let writer = spawn_writer(impatient_client(&cluster).await, acked.clone());

        // Checkpoints run back to back under writes; stop the server when one is under way,
        // so the log has an older segment (full of records) and a newer one.
        let data_dir = cluster.data_dir(0);
        let deadline = Instant::now() + Duration::from_secs(20);
        let (older, at) = loop {
            assert!(Instant::now() < deadline, "never saw a log of two segments");
            tokio::time::sleep(Duration::from_millis(15)).await;
            if acked.lock().unwrap().len() < 50 {
                continue;
            }
            let found = || {
                let segs = segments(&data_dir);
                let at = second_record(segs.first()?)?;
                (segs.len() >= 2).then(|| (segs[0].clone(), at))
            };
            // SIGSTOP takes effect a moment after it is sent.
            cluster.pause(0).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            if found().is_none() {
                cluster.resume(0).unwrap();
                continue;
            }
            cluster.kill(0).unwrap();
            // Dead now: what is on disk stays.
            if let Some(found) = found() {
                break found;
            }
            cluster.restart(0).unwrap();
            cluster
                .wait_for_primary(common::BOOT_TIMEOUT)
                .await
                .expect("the server serves again");
        };
        writer.abort();
        let _ = writer.await;
        let acked = acked.lock().unwrap().clone();

        // A byte of the second record's payload flipped: it fails its checksum.
        let mut data = std::fs::read(&older).unwrap();
        let flip = at as usize + 9;
        let original = data[flip];
        data[flip] ^= 0x5a;
        std::fs::write(&older, &data).unwrap();
        let before = snapshot(&data_dir);

        let (status, stderr) = run_server_until_exit(&cluster, 0, Duration::from_secs(20));
        assert!(!status.success(), "the server started on a damaged log");
        assert!(
            stderr.contains(&older.display().to_string()),
            "names the segment: {stderr}"
        );
        assert!(
            stderr.contains(&format!("offset {at}")),
            "names the offset {at}: {stderr}"
        );
        assert!(
            stderr.contains("data directory"),
            "says what to do: {stderr}"
        );
        assert!(
            snapshot(&data_dir) == before,
            "the data directory was changed"
        );

        // Undone, the log is whole again: nothing acknowledged was lost meanwhile.
        data[flip] = original;
        std::fs::write(&older, &data).unwrap();
        cluster.restart(0).unwrap();
        cluster
            .wait_for_primary(common::BOOT_TIMEOUT)
            .await
            .expect("the server serves once the log is whole");
        let client = common::pinned(&cluster, 0).await;
        common::assert_reads(&client, &acked, "the restarted server").await;
    });
}

/// How many tombstones the server of `log` reported collecting, over all its lives.
fn tombstones_collected(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("tombstones collected"))
        .filter_map(|l| {
            let rest = &l[l.find("dropped=")? + "dropped=".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A member misses many deletes while it is down, and the others collect their tombstones.
/// When it comes back, the primary no longer has tombstones to send for those keys: only a
/// full transfer, which removes whatever it does not send, can tell the member they are gone.
#[test]
fn a_member_that_missed_collected_deletes_loses_those_keys_when_it_rejoins() {
    common::run(async {
        const DELETED: usize = 400;
        let (mut cluster, primary) = common::start_healthy(3, &[]).await;
        let client = common::client(&cluster).await;
        let mut expected = Expected::new();
        common::put_fresh(&client, "doomed", DELETED, &mut expected).await;
        common::put_fresh(&client, "kept", 20, &mut expected).await;
        let member = (primary + 1) % cluster.len();
        cluster
            .wait_converged(Duration::from_secs(10))
            .await
            .expect("every server has every key");
        cluster.kill(member).unwrap();

        for (key, value) in expected.iter_mut() {
            if key.starts_with("doomed") {
                let old = client
                    .delete(bytes(key))
                    .await
                    .unwrap_or_else(|e| panic!("delete {key}: {e}"));
                assert_eq!(old, value.take().map(|v| bytes(&v)), "{key}");
            }
        }
        common::put_fresh(&client, "after", 20, &mut expected).await;

        // Both remaining servers collect the tombstones of every delete.
        let others: Vec<usize> = (0..cluster.len()).filter(|&r| r != member).collect();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let counts: Vec<u64> = others
                .iter()
                .map(|&r| tombstones_collected(&cluster.log_path(r)))
                .collect();
            if counts.iter().all(|&c| c >= DELETED as u64) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tombstones collected by {others:?}: {counts:?}, want {DELETED} each"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        cluster.restart(member).unwrap();
        cluster
            .wait_converged(Duration::from_secs(20))
            .await
            .expect("the member rejoins");
        let pinned = common::pinned(&cluster, member).await;
        common::assert_reads(&pinned, &expected, "the member that missed the deletes").await;
        let log = std::fs::read_to_string(cluster.log_path(member)).unwrap();
        assert!(
            log.lines()
                .any(|l| l.contains("state transfer done") && l.contains("full=true")),
            "the rejoin took a full transfer"
        );
    });
}
