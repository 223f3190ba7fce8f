//! Health, metrics, snapshots, restore and backups (docs/design.md §12), on real server
//! processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replikv_client::snapshot::{self as ops, Servers};
use replikv_client::Client;
use replikv_proto::snapshot as file;
use replikv_testkit::cluster::free_ports;
use replikv_testkit::fixtures::{run, run_for, server_command, BOOT_TIMEOUT};
use replikv_testkit::{ClusterOptions, LocalCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROBE: Duration = Duration::from_millis(500);

/// A cluster with `rank_args` per rank, waited for until it serves.
async fn cluster(
    servers: usize,
    rank_args: Vec<Vec<String>>,
    base: Option<PathBuf>,
) -> LocalCluster {
    let cluster = LocalCluster::start(ClusterOptions {
        servers,
        rank_args,
        base_dir: base,
        command: Some(server_command()),
        ..ClusterOptions::default()
    })
    .expect("start the cluster");
    cluster
        .wait_ready(BOOT_TIMEOUT)
        .await
        .expect("cluster serves");
    cluster
}

async fn client(cluster: &LocalCluster) -> Client {
    Client::connect(
        cluster
            .client_config()
            .with_request_timeout(Duration::from_secs(10)),
    )
    .await
    .expect("client")
}

fn plain(addrs: Vec<String>) -> Servers {
    Servers::new(addrs, None, PROBE, None).expect("addresses")
}

/// Every server of `cluster`, spoken to as its clients are: TLS and the admin user.
fn servers_of(cluster: &LocalCluster) -> Servers {
    let config = cluster.client_config();
    Servers::new(
        cluster.addrs(),
        config.tls.as_ref(),
        PROBE,
        config.credentials.as_ref(),
    )
    .expect("addresses")
}

/// Polls `addr`'s health until `want(ready, live)` holds; panics after `limit`.
async fn wait_health(
    servers: &Servers,
    addr: &str,
    limit: Duration,
    what: &str,
    want: impl Fn(&ops::Health) -> bool,
) -> ops::Health {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(h) = ops::health(servers, addr, PROBE).await {
            if want(&h) {
                return h;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{addr}: {what} not seen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn health_follows_a_killed_primary_and_a_wiped_rejoining_member() {
    run_for(Duration::from_secs(120), async {
        let ports = free_ports(3).unwrap();
        let health_addr = |r: usize| format!("127.0.0.1:{}", ports[r]);
        let args = (0..3)
            .map(|r| vec!["--health-listen".to_string(), health_addr(r)])
            .collect();
        let mut cluster = cluster(3, args, None).await;
        let kv = servers_of(&cluster);
        let probes = plain(
            (0..3)
                .map(|r| format!("http://{}", health_addr(r)))
                .collect(),
        );
        for r in 0..3 {
            for (servers, addr) in [(&kv, cluster.addr(r)), (&probes, probes.addrs[r].clone())] {
                let h = wait_health(servers, &addr, BOOT_TIMEOUT, "ready", |h| h.is_ready()).await;
                assert_eq!(h.live, "SERVING");
            }
        }
        let c = client(&cluster).await;
        for i in 0..2000 {
            c.put(format!("k{i}"), "v").await.unwrap();
        }

        let (primary, _) = cluster.wait_for_primary(BOOT_TIMEOUT).await.unwrap();
        cluster.kill(primary).unwrap();
        for r in (0..3).filter(|&r| r != primary) {
            // A backup's lease runs out before anyone takes over: not ready for a while...
            wait_health(
                &probes,
                &probes.addrs[r],
                Duration::from_secs(5),
                "NOT_SERVING after the kill",
                |h| h.ready == "NOT_SERVING" && h.live == "SERVING",
            )
            .await;
        }
        for r in (0..3).filter(|&r| r != primary) {
            // ...and ready again once the new view serves.
            wait_health(
                &probes,
                &probes.addrs[r],
                Duration::from_secs(20),
                "ready after failover",
                |h| h.is_ready(),
            )
            .await;
        }
        assert!(
            ops::health(&probes, &probes.addrs[primary], PROBE)
                .await
                .is_err(),
            "a killed server answers no probe"
        );

        // The killed server comes back with an empty disk: alive at once, ready only once it
        // has caught up and joined.
        cluster.wipe(primary).unwrap();
        cluster.restart(primary).unwrap();
        let first = wait_health(
            &probes,
            &probes.addrs[primary],
            Duration::from_secs(10),
            "an answer",
            |_| true,
        )
        .await;
        assert_eq!(first.live, "SERVING");
        assert_eq!(
            first.ready, "NOT_SERVING",
            "a wiped server is not ready before it rejoins"
        );
        wait_health(
            &probes,
            &probes.addrs[primary],
            Duration::from_secs(30),
            "ready after rejoining",
            |h| h.is_ready(),
        )
        .await;
        let status = cluster.status(primary).await.expect("status");
        assert!(
            status.serving && status.applied >= 2000,
            "rejoined with the data: {status:?}"
        );

        // The CLI prints it.
        let out = std::process::Command::new(cli())
            .args(["health", &probes.addrs[primary]])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "replikv health: {text}");
        assert_eq!(
            text.trim(),
            format!("{} ready=SERVING live=SERVING", probes.addrs[primary])
        );
    });
}

/// The `replikv` binary beside the server's.
fn cli() -> PathBuf {
    let server = server_command().program;
    let cli = server.with_file_name("replikv");
    if !cli.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = std::process::Command::new(cargo)
            .args(["build", "-p", "replikv-client", "--bin", "replikv"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot build the replikv CLI");
    }
    cli
}

/// One scrape of `/metrics`: `series -> value`.
async fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let mut s = tokio::time::timeout(PROBE * 4, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series}"))
}

#[test]
fn metrics_rise_under_load_and_gauges_match_the_cluster() {
    run(async {
        let ports = free_ports(3).unwrap();
        let metrics = |r: usize| format!("127.0.0.1:{}", ports[r]);
        let args = (0..3)
            .map(|r| vec!["--metrics-listen".to_string(), metrics(r)])
            .collect();
        let cluster = cluster(3, args, None).await;
        let (primary, _) = cluster.wait_for_primary(BOOT_TIMEOUT).await.unwrap();
        let c = client(&cluster).await;
        for i in 0..200 {
            c.put(format!("k{i}"), "v").await.unwrap();
        }
        let before = scrape(&metrics(primary)).await;

        // Load from several writers while scraping.
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(0u64));
        let mut writers = Vec::new();
        for w in 0..4 {
            let c = c.new_session().unwrap();
            let (stop, acked) = (stop.clone(), acked.clone());
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    c.put(format!("w{w}/{i}"), "x").await.unwrap();
                    c.get(format!("w{w}/{i}")).await.unwrap();
                    *acked.lock().unwrap() += 1;
                    i += 1;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let acked_before = *acked.lock().unwrap();
        let during = scrape(&metrics(primary)).await;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        let status = cluster.status(primary).await.unwrap();

        let puts = r#"replikv_requests_total{op="put"}"#;
        assert!(
            get(&during, puts) >= get(&before, puts) + acked_before as f64 / 2.0,
            "put counter rose"
        );
        assert!(get(&during, r#"replikv_request_seconds_count{op="put"}"#) >= get(&during, puts));
        assert!(
            get(&during, "replikv_writes_per_flush_count")
                > get(&before, "replikv_writes_per_flush_count")
        );
        assert!(get(&during, "replikv_fsync_seconds_count") > 0.0);
        // Gauges: this is the primary of the cluster's epoch, and its commit point covers
        // every write acknowledged before the scrape and none it had not made yet.
        assert_eq!(get(&during, r#"replikv_role{role="primary"}"#), 1.0);
        assert_eq!(get(&during, r#"replikv_role{role="backup"}"#), 0.0);
        assert_eq!(
            get(&during, "replikv_epoch"),
            status.view.as_ref().unwrap().epoch as f64
        );
        let committed = get(&during, "replikv_committed_lsn");
        assert!(
            committed >= (200 + acked_before) as f64 && committed <= status.committed as f64,
            "committed {committed}"
        );
        for r in (0..3).filter(|&r| r != primary) {
            let lag = format!(r#"replikv_member_lag{{rank="{r}"}}"#);
            assert!(get(&during, &lag) >= 0.0);
            let backup = scrape(&metrics(r)).await;
            assert_eq!(get(&backup, r#"replikv_role{role="backup"}"#), 1.0);
            assert_eq!(get(&backup, "replikv_serving"), 1.0);
            assert_eq!(
                get(&backup, "replikv_epoch"),
                status.view.as_ref().unwrap().epoch as f64
            );
            // Reads are spread over every server; a backup counts those it served.
            let gets = get(&backup, r#"replikv_requests_total{op="get"}"#);
            assert!(gets > 0.0, "a backup served no read");
        }
        // Anything but GET /metrics is refused.
        let mut s = tokio::net::TcpStream::connect(metrics(primary))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut raw = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut raw))
            .await
            .unwrap()
            .unwrap();
        assert!(raw.contains(" 404 "), "{raw}");
    });
}

/// Every key of a snapshot file, checked.
/// A snapshot's header, the admin user's keys (as that user names them) and the number of
/// entries of every kind (user records and other users' keys included).
fn read_snapshot(path: &Path) -> (file::Header, BTreeMap<String, (String, u64)>, u64) {
    let f = std::fs::File::open(path).unwrap();
    let (mut r, h) = file::Reader::open(std::io::BufReader::new(f)).unwrap();
    let mut keys = BTreeMap::new();
    let mut entries = 0;
    while let Some(e) = r.next().unwrap() {
        entries += 1;
        if let Some(key) = e.key.strip_prefix(b"admin\0".as_slice()) {
            keys.insert(
                String::from_utf8(key.to_vec()).unwrap(),
                (String::from_utf8(e.value).unwrap(), e.lsn),
            );
        }
    }
    (h, keys, entries)
}

/// One writer's record: every write it started, in order, with whether it was acknowledged
/// before the snapshot call started, and whether it started after the call returned.
#[derive(Default)]
struct WriterLog {
    done_before_snapshot: u64,
    started_after_snapshot: Option<u64>,
    written: u64,
}

#[test]
fn a_snapshot_under_writes_restores_exactly_its_commit_point_into_a_new_cluster() {
    run_for(Duration::from_secs(150), async {
        let base = tempfile::tempdir().unwrap();
        let live = cluster(3, Vec::new(), Some(base.path().join("live"))).await;
        let c = client(&live).await;
        for i in 0..3000 {
            c.put(format!("pre/{i:05}"), format!("value-{i}"))
                .await
                .unwrap();
        }
        c.put("gone", "x").await.unwrap();
        c.delete("gone").await.unwrap();

        // Writers: each puts w/<id>/<i> and then last/<id> = i, one after the other.
        let phase = Arc::new(Mutex::new(0u8)); // 0 before the snapshot, 1 during, 2 after
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..4u64 {
            let c = c.new_session().unwrap();
            let (phase, stop) = (phase.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut log = WriterLog::default();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let started = *phase.lock().unwrap();
                    if started == 2 && log.started_after_snapshot.is_none() {
                        log.started_after_snapshot = Some(i);
                    }
                    c.put(format!("w/{w}/{i:06}"), format!("{i}"))
                        .await
                        .unwrap();
                    c.put(format!("last/{w}"), format!("{i}")).await.unwrap();
                    i += 1;
                    log.written = i;
                    if *phase.lock().unwrap() == 0 {
                        log.done_before_snapshot = i;
                    }
                }
                log
            }));
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        let snap = base.path().join("backup.snap");
        let servers = servers_of(&live);
        *phase.lock().unwrap() = 1;
        let (header, keys) = ops::save(&servers, &snap, Duration::from_secs(60))
            .await
            .expect("snapshot saved");
        *phase.lock().unwrap() = 2;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        let mut logs = Vec::new();
        for w in writers {
            logs.push(w.await.unwrap());
        }

        let (h, got, entries) = read_snapshot(&snap);
        assert_eq!(h, header);
        assert_eq!(entries, keys);
        assert!(
            got.values().all(|(_, lsn)| *lsn <= header.lsn),
            "an entry above the commit point"
        );
        assert!(
            !got.contains_key("gone"),
            "a deleted key is not in a snapshot"
        );
        for i in 0..3000 {
            assert_eq!(got[&format!("pre/{i:05}")].0, format!("value-{i}"));
        }
        for (w, log) in logs.iter().enumerate() {
            // The writer's writes in the snapshot are a prefix of its sequence, and `last`
            // agrees with it: one commit point, not keys read at different times.
            let n = got
                .keys()
                .filter(|k| k.starts_with(&format!("w/{w}/")))
                .count() as u64;
            for i in 0..n {
                assert!(
                    got.contains_key(&format!("w/{w}/{i:06}")),
                    "writer {w}: a hole at {i} below {n}"
                );
            }
            let last = got
                .get(&format!("last/{w}"))
                .map(|(v, _)| v.parse::<i64>().unwrap())
                .unwrap_or(-1);
            assert!(
                last == n as i64 - 1 || last == n as i64 - 2,
                "writer {w}: last {last} with {n} writes"
            );
            assert!(
                n >= log.done_before_snapshot,
                "writer {w}: acknowledged before the snapshot but missing ({n} < {})",
                log.done_before_snapshot
            );
            if let Some(after) = log.started_after_snapshot {
                assert!(
                    n <= after,
                    "writer {w}: a write started after the snapshot is in it"
                );
            }
            assert!(
                log.written > log.done_before_snapshot,
                "writer {w} wrote during the snapshot"
            );
        }
        let live_cluster_id = h.cluster.clone();
        drop(live);

        // A new cluster from the snapshot: exactly its keys, a new cluster id, writable.
        let restored = cluster(
            3,
            vec![vec!["--restore".into(), snap.display().to_string()]],
            Some(base.path().join("restored")),
        )
        .await;
        let rc = client(&restored).await;
        let mut scanned = BTreeMap::new();
        let everything = replikv_client::Range::Keys {
            from: "".into(),
            to: None,
        };
        let mut pages = std::pin::pin!(rc.scan_pages(everything, 1000));
        while let Some(page) = futures::StreamExt::next(&mut pages).await {
            for (k, v) in page.expect("scan the restored cluster").items {
                scanned.insert(
                    String::from_utf8(k.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                );
            }
        }
        let expected: BTreeMap<String, String> = got
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        assert_eq!(scanned.len(), expected.len());
        assert!(
            scanned == expected,
            "the restored cluster holds other keys than the snapshot"
        );
        rc.put("after-restore", "yes").await.unwrap();
        assert_eq!(
            rc.get("after-restore").await.unwrap().as_deref(),
            Some(&b"yes"[..])
        );
        let again = base.path().join("again.snap");
        let (h2, _) = ops::save(&servers_of(&restored), &again, Duration::from_secs(60))
            .await
            .unwrap();
        assert_ne!(
            h2.cluster, live_cluster_id,
            "a restored cluster has a cluster id of its own"
        );
        assert!(
            h2.lsn > header.lsn,
            "the restored cluster's lsns go on from the snapshot's"
        );
    });
}

#[test]
fn a_damaged_snapshot_is_refused_and_changes_nothing() {
    run(async {
        let base = tempfile::tempdir().unwrap();
        let live = cluster(1, Vec::new(), Some(base.path().join("live"))).await;
        let c = client(&live).await;
        for i in 0..100 {
            c.put(format!("k{i}"), "v").await.unwrap();
        }
        let good = base.path().join("good.snap");
        ops::save(&servers_of(&live), &good, Duration::from_secs(30))
            .await
            .unwrap();
        drop(live);
        let bytes = std::fs::read(&good).unwrap();
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        let cases = [
            // A flipped byte is caught by the layout checks or the checksum.
            ("flipped", flipped, "damaged"),
            ("truncated", bytes[..bytes.len() - 10].to_vec(), "truncated"),
            (
                "garbage",
                b"hello, world".to_vec(),
                "not a replikv snapshot",
            ),
        ];
        for (name, content, says) in cases {
            let bad = base.path().join(format!("{name}.snap"));
            std::fs::write(&bad, &content).unwrap();
            let err = ops::check(&bad).unwrap_err().to_string();
            assert!(err.contains(says), "{name}: {err}");
            let data = base.path().join(format!("data-{name}"));
            std::fs::create_dir_all(&data).unwrap();
            let port = free_ports(2).unwrap();
            let out = std::process::Command::new(&server_command().program)
                .args([
                    "--rank",
                    "0",
                    "--peers",
                    &format!("127.0.0.1:{}/{}", port[0], port[1]),
                ])
                .arg("--data-dir")
                .arg(&data)
                .args(["--bootstrap", "--restore"])
                .arg(&bad)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{name}: the server started from a bad snapshot"
            );
            assert!(
                stderr.contains("cannot restore") && stderr.contains(says),
                "{name}: {stderr}"
            );
            assert_eq!(
                std::fs::read_dir(&data).unwrap().count(),
                0,
                "{name}: the data directory was touched"
            );
            assert_eq!(
                std::fs::read(&bad).unwrap(),
                content,
                "{name}: the file was changed"
            );
        }
        ops::check(&good).expect("the good file still checks");
    });
}

#[test]
fn periodic_backups_keep_exactly_the_newest_n() {
    run(async {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("backups");
        let args = vec![vec![
            "--backup-dir".into(),
            dir.display().to_string(),
            "--backup-every".into(),
            "1s".into(),
            "--backup-keep".into(),
            "2".into(),
        ]];
        let live = cluster(1, args, Some(base.path().join("live"))).await;
        let c = client(&live).await;
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut i = 0;
        let mut seen = std::collections::BTreeSet::new();
        // Writes go on; wait until at least five backups were made (three removed).
        while seen.len() < 5 {
            assert!(
                Instant::now() < deadline,
                "only {} backups within 40 s",
                seen.len()
            );
            c.put(format!("k{i}"), "v").await.unwrap();
            i += 1;
            let names = backups(&dir);
            assert!(
                names.len() <= 2,
                "more than --backup-keep backups at once: {names:?}"
            );
            seen.extend(names);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let names = backups(&dir);
        assert_eq!(names.len(), 2, "{names:?}");
        let mut lsns = Vec::new();
        for n in &names {
            let (h, keys) = ops::check(&dir.join(n)).expect("a backup checks");
            assert!(keys > 0);
            lsns.push(h.lsn);
        }
        assert!(
            lsns[0] <= lsns[1],
            "the newest backup has the newest commit point"
        );
        // The newest were kept.
        assert_eq!(
            seen.iter().rev().take(2).rev().cloned().collect::<Vec<_>>(),
            names
        );
    });
}

fn backups(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".snap"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
