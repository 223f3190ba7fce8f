//! Bounded growth (docs/design.md §3): writing and then deleting many keys must leave every
//! server's memory and data directory close to where they were before. Takes minutes, so it
//! is ignored by default; `scripts/gc-check.sh` runs it and prints the figures.
//!
//! `REPLIKV_GC_CHECK_KEYS` sets the number of keys (default 1 000 000),
//! `REPLIKV_GC_CHECK_VALUE_BYTES` the value size (default 100),
//! `REPLIKV_GC_CHECK_BASE_KEYS` keys written before the baseline and kept (default 0),
//! `REPLIKV_GC_CHECK_TOLERANCE` the allowed growth (default 0.2, i.e. 20 %),
//! `REPLIKV_GC_CHECK_CYCLES` how many times the keys are written and deleted (default 1).
//!
//! A smaller run, with fewer but larger values, checks the data directories within a minute
//! on every `cargo test`.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use replikv_client::{Client, Route};
use replikv_testkit::{ClusterOptions, LocalCluster, ServerCommand};

/// Writers in flight at once (each request waits for its own answer).
const CONCURRENCY: usize = 128;
/// Upper bound on the whole check.
const LIMIT: Duration = Duration::from_secs(90 * 60);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")),
        Err(_) => default,
    }
}

/// Resident memory of the server whose data directory is `dir`, in bytes.
fn rss_of(dir: &Path) -> u64 {
    let want = dir.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let serves_dir = args
            .windows(2)
            .any(|w| w[0] == b"--data-dir" && w[1] == want);
        if !serves_dir {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("VmRSS:")) {
            let kb: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return kb * 1024;
        }
    }
    panic!("no server process for {}", dir.display())
}

/// Bytes the files under `dir` take on disk (allocated blocks, as `du`), and by sub-folder.
fn disk_of(dir: &Path) -> (u64, Vec<(String, u64)>) {
    use std::os::unix::fs::MetadataExt;
    fn walk(p: &Path) -> u64 {
        let Ok(md) = std::fs::symlink_metadata(p) else {
            return 0;
        };
        if md.is_dir() {
            std::fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| walk(&e.path())).sum())
                .unwrap_or(0)
        } else {
            md.blocks() * 512
        }
    }
    let mut parts: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                walk(&e.path()),
            )
        })
        .collect();
    parts.sort();
    (walk(dir), parts)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

struct Figures {
    rss: Vec<u64>,
    disk: Vec<u64>,
}

fn measure(cluster: &LocalCluster, when: &str) -> Figures {
    let mut f = Figures {
        rss: Vec::new(),
        disk: Vec::new(),
    };
    for rank in 0..cluster.len() {
        let dir = cluster.data_dir(rank);
        let rss = rss_of(&dir);
        let (disk, parts) = disk_of(&dir);
        let parts: Vec<String> = parts
            .iter()
            .map(|(n, b)| format!("{n} {}", mib(*b)))
            .collect();
        println!(
            "{when:<22} server {rank}: rss {:>10}  data dir {:>10}  ({})",
            mib(rss),
            mib(disk),
            parts.join(", ")
        );
        f.rss.push(rss);
        f.disk.push(disk);
    }
    f
}

/// Runs `op` on keys `from..to` with `CONCURRENCY` requests in flight, printing progress.
async fn for_keys<F, Fut>(what: &'static str, from: usize, to: usize, op: F)
where
    F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(from));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (next, op) = (next.clone(), op.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= to {
                        return;
                    }
                    op(i).await;
                    let done = i + 1 - from;
                    if done.is_multiple_of(100_000) {
                        println!(
                            "{what}: {done} in {:.0?} ({:.0}/s)",
                            started.elapsed(),
                            done as f64 / started.elapsed().as_secs_f64()
                        );
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task");
    }
    println!("{what}: {} keys in {:.1?}", to - from, started.elapsed());
}

/// The write of key `i` that [`for_keys`] runs: a put of `value`, or a delete for `None`.
/// A failed write fails the test.
fn write_op(
    client: &Client,
    value: Option<Bytes>,
) -> impl Fn(usize) -> futures::future::BoxFuture<'static, ()> + Clone + Send + Sync + 'static {
    let client = client.clone();
    move |i: usize| {
        let (client, value) = (client.clone(), value.clone());
        Box::pin(async move {
            let (what, done) = match value {
                Some(value) => ("put", client.put(key(i), value).await),
                None => ("delete", client.delete(key(i)).await),
            };
            done.unwrap_or_else(|e| panic!("{what} {i}: {e}"));
        })
    }
}

fn key(i: usize) -> Bytes {
    Bytes::from(format!("gc-check-{i:08}"))
}

/// The highest collection horizon the server of `log` reported: from collecting tombstones,
/// or taken from a full transfer's source.
fn horizon_reported(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("tombstones collected") || l.contains("full transfer: removed"))
        .filter_map(|l| {
            let rest = &l[l.find("horizon=")? + "horizon=".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// How many times the server of `log` reported compacting sled, over all its lives.
fn compactions(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("compacted sled"))
        .count()
}

/// Waits until every server's collection horizon reaches `last` (bounded by `limit`).
async fn wait_collected(cluster: &LocalCluster, last: u64, limit: Duration) {
    let started = Instant::now();
    loop {
        let horizons: Vec<u64> = (0..cluster.len())
            .map(|r| horizon_reported(&cluster.log_path(r)))
            .collect();
        if horizons.iter().all(|&h| h >= last) {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "collection horizons {horizons:?}, want {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The CI-sized check: 3 servers, 12 000 keys of 4 KiB (~50 MB per server) written and
/// deleted while 200 other keys stay, and the client's session expires.
/// Every server's data directory must end within 20 % of its size before the writes (plus
/// the kept keys' share), the kept keys must read back from every server, and again after
/// every server restarts on its compacted database.
#[test]
fn the_data_directories_shrink_back_after_a_write_then_delete_run() {
    const KEYS: usize = 12_000;
    const VALUE_BYTES: usize = 4096;
    common::run_for(Duration::from_secs(90), async {
        // The client's session keeps the results (old values) of its last writes until it
        // expires: a short TTL lets it be collected too, as the kept keys' share is.
        let (mut cluster, _) = common::start_healthy(3, &["--session-ttl", "3s"]).await;
        let client = Client::connect(
            cluster
                .client_config()
                .with_route(Route::Primary)
                .with_request_timeout(Duration::from_secs(10)),
        )
        .await
        .expect("client");
        let mut kept = common::Expected::new();
        common::put_fresh(&client, "kept", 200, &mut kept).await;
        cluster
            .wait_converged(Duration::from_secs(10))
            .await
            .unwrap();
        // The log holds the bootstrap and the kept keys until a checkpoint: let the idle one
        // (after 10 s) not fall between the two measurements by taking the baseline after it.
        let before = measure(&cluster, "before");
        let value = Bytes::from(vec![b'v'; VALUE_BYTES]);
        let put = write_op(&client, Some(value.clone()));
        for_keys("puts", 0, KEYS, put).await;
        cluster
            .wait_converged(Duration::from_secs(20))
            .await
            .unwrap();
        let written = measure(&cluster, "after the puts");
        let delete = write_op(&client, None);
        for_keys("deletes", 0, KEYS, delete).await;
        cluster
            .wait_converged(Duration::from_secs(20))
            .await
            .unwrap();
        let (_, status) = cluster
            .wait_for_primary(Duration::from_secs(10))
            .await
            .unwrap();
        wait_collected(&cluster, status.applied, Duration::from_secs(20)).await;
        // sled is compacted within seconds of the collection pass that dropped the last
        // tombstones (once the removals have reached it).
        let bound = |rank: usize| before.disk[rank] as f64 * 1.2 + (1 << 20) as f64;
        let deadline = Instant::now() + Duration::from_secs(20);
        while (0..cluster.len()).any(|r| disk_of(&cluster.data_dir(r)).0 as f64 > bound(r)) {
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for rank in 0..cluster.len() {
            assert!(
                compactions(&cluster.log_path(rank)) > 0,
                "server {rank} never compacted sled"
            );
        }
        let after = measure(&cluster, "after deletes + GC");
        for rank in 0..cluster.len() {
            let (b, w, a) = (before.disk[rank], written.disk[rank], after.disk[rank]);
            assert!(
                w > 10 * b,
                "server {rank}: the puts took {} on disk from {}",
                mib(w),
                mib(b)
            );
            // The log may have started a new 1 MiB segment between the two measurements.
            assert!(
                a as f64 <= bound(rank),
                "server {rank}: data dir {} before, {} after the puts, {} after deletes + GC",
                mib(b),
                mib(w),
                mib(a)
            );
        }
        common::assert_every_server_reads(&cluster, 0..cluster.len(), &kept).await;
        for rank in 0..cluster.len() {
            cluster.restart(rank).unwrap();
        }
        cluster
            .wait_converged(Duration::from_secs(30))
            .await
            .unwrap();
        measure(&cluster, "after a restart");
        common::assert_every_server_reads(&cluster, 0..cluster.len(), &kept).await;
        let deleted: common::Expected = (0..KEYS)
            .step_by(97)
            .map(|i| (String::from_utf8(key(i).to_vec()).unwrap(), None))
            .collect();
        common::assert_every_server_reads(&cluster, 0..cluster.len(), &deleted).await;
    });
}

#[test]
#[ignore = "takes minutes: run by scripts/gc-check.sh"]
fn writing_then_deleting_many_keys_leaves_memory_and_disk_where_they_were() {
    let keys: usize = env_or("REPLIKV_GC_CHECK_KEYS", 1_000_000);
    let value_bytes: usize = env_or("REPLIKV_GC_CHECK_VALUE_BYTES", 100);
    let base: usize = env_or("REPLIKV_GC_CHECK_BASE_KEYS", 0);
    let tolerance: f64 = env_or("REPLIKV_GC_CHECK_TOLERANCE", 0.2);
    let cycles: usize = env_or("REPLIKV_GC_CHECK_CYCLES", 1).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        tokio::time::timeout(LIMIT, async move {
            let mut cluster = LocalCluster::start(ClusterOptions {
                servers: 3,
                // `REPLIKV_SERVER_BIN` (e.g. a release build) if set, else cargo's.
                command: Some(match std::env::var_os("REPLIKV_SERVER_BIN") {
                    Some(_) => ServerCommand::locate().expect("REPLIKV_SERVER_BIN"),
                    None => ServerCommand::new(env!("CARGO_BIN_EXE_replikv-server"), Vec::new()),
                }),
                ..ClusterOptions::default()
            })
            .expect("start the cluster");
            cluster
                .wait_converged(Duration::from_secs(30))
                .await
                .expect("the cluster serves");
            let client = Client::connect(
                cluster.client_config()
                    .with_route(Route::Primary)
                    .with_request_timeout(Duration::from_secs(30)),
            )
            .await
            .expect("client");
            let value = Bytes::from(vec![b'v'; value_bytes]);
            let put = write_op(&client, Some(value.clone()));
            if base > 0 {
                for_keys("base puts", keys, keys + base, put.clone()).await;
                cluster.wait_converged(Duration::from_secs(60)).await.unwrap();
            }
            // Let the servers settle (sled's flush, a checkpoint) before the baseline.
            tokio::time::sleep(Duration::from_secs(5)).await;
            let before = measure(&cluster, "before");
            // Each cycle writes and deletes the same keys again: memory that a cycle leaves
            // behind and the next one reuses is the allocator's, memory that grows with every
            // cycle would be a leak.
            let mut written = None;
            let mut afters = Vec::new();
            for cycle in 1..=cycles {
                let label = |what: &str| match cycles {
                    1 => what.to_string(),
                    _ => format!("{what} ({cycle})"),
                };
                for_keys("puts", 0, keys, put.clone()).await;
                cluster.wait_converged(Duration::from_secs(60)).await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
                let w = measure(&cluster, &label("after the puts"));
                written.get_or_insert(w);
                let delete = write_op(&client, None);
                for_keys("deletes", 0, keys, delete).await;
                cluster.wait_converged(Duration::from_secs(60)).await.unwrap();
                // The last write was a delete: once every server's horizon reaches it, every
                // tombstone of the run is gone (collected, or never sent by a full transfer).
                let (_, status) = cluster.wait_for_primary(Duration::from_secs(30)).await.unwrap();
                let started = Instant::now();
                wait_collected(&cluster, status.applied, Duration::from_secs(300)).await;
                println!("every server collected its tombstones after {:.1?}", started.elapsed());
                tokio::time::sleep(Duration::from_secs(10)).await;
                afters.push(measure(&cluster, &label("after deletes + GC")));
            }
            let written = written.expect("at least one cycle");
            let after = afters.last().expect("at least one cycle");
            // What a fresh process needs for the same data: tells caches and the allocator's
            // retained memory from what the server actually holds.
            for rank in 0..cluster.len() {
                cluster.restart(rank).unwrap();
            }
            cluster.wait_converged(Duration::from_secs(120)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            measure(&cluster, "after a restart");

            println!("\nkeys {keys}, values {value_bytes} B, kept base keys {base}");
            let mut over = Vec::new();
            for rank in 0..cluster.len() {
                for (what, b, w, a) in [
                    ("rss", before.rss[rank], written.rss[rank], after.rss[rank]),
                    ("disk", before.disk[rank], written.disk[rank], after.disk[rank]),
                ] {
                    let ratio = a as f64 / b as f64;
                    println!(
                        "server {rank} {what:<4}: before {:>10}, after puts {:>10}, after deletes+GC {:>10} ({:+.0} %)",
                        mib(b),
                        mib(w),
                        mib(a),
                        (ratio - 1.0) * 100.0
                    );
                    if ratio > 1.0 + tolerance {
                        over.push(format!("server {rank} {what} {:+.0} %", (ratio - 1.0) * 100.0));
                    }
                }
            }
            if cycles > 1 {
                for rank in 0..cluster.len() {
                    let rss: Vec<String> = afters.iter().map(|f| mib(f.rss[rank])).collect();
                    let (first, last) = (afters[0].rss[rank], after.rss[rank]);
                    println!(
                        "server {rank} rss after deletes+GC, cycle by cycle: {} ({:+.0} % from the first cycle to the last)",
                        rss.join(", "),
                        (last as f64 / first as f64 - 1.0) * 100.0
                    );
                }
            }
            assert!(
                over.is_empty(),
                "more than {:.0} % above the baseline: {over:?}",
                tolerance * 100.0
            );
        })
        .await
        .expect("the check finished in time");
    });
}
