//! Limits against abusive clients and heavy work (docs/security.md "Limits"), each tried on
//! real server processes: a `Pipeline` whose answers are never read, more connections than
//! a listener takes, a flood of requests, and state transfers to rejoining servers while a
//! writer measures its latency.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::bytes;
use futures::StreamExt;
use replikv_proto::kv::kv_client::KvClient;
use replikv_proto::kv::pipeline_request::Op;
use replikv_proto::kv::{GetRequest, PipelineRequest, PutRequest};
use replikv_proto::peer::peer_client::PeerClient;
use replikv_proto::peer::{DiscoverRequest, SyncRequest};
use replikv_testkit::{ClusterOptions, LocalCluster};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// Bound on one well-behaved request while the server is under abuse.
const SERVED_WITHIN: Duration = Duration::from_secs(3);

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS line");
    kb * 1024
}

async fn kv_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
}

/// Opens a connection to `addr` and gets a key through it: whether the server serves it.
/// `servers` servers whose client port speaks plain gRPC with no users: these tests open
/// raw connections and streams, and the limits they try are the same with TLS and users.
async fn start_plain(servers: usize, extra_args: &[&str]) -> (LocalCluster, usize) {
    common::start_healthy_with(ClusterOptions {
        servers,
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        client_tls: false,
        auth: false,
        ..ClusterOptions::default()
    })
    .await
}

async fn served_connection(addr: &str) -> Option<KvClient<Channel>> {
    let mut kv = KvClient::new(kv_channel(addr).await.ok()?);
    let get = kv.get(GetRequest { key: bytes("k") });
    match tokio::time::timeout(SERVED_WITHIN, get).await {
        Ok(Ok(_)) => Some(kv),
        _ => None,
    }
}

/// A client opens a `Pipeline`, sends thousands of gets of a 256 KiB value and never reads
/// an answer. Unbounded, the server would hold 2 GiB of answers for it, and bounded by count
/// alone (1024 queued and 1024 being served) 512 MiB; it stops reading the call after a few
/// MiB of unread answers, and another client is served meanwhile.
#[test]
fn a_pipeline_whose_answers_are_never_read_holds_bounded_memory() {
    const VALUE: usize = 256 * 1024;
    const GETS: u64 = 8000;
    common::run(async {
        let (cluster, primary) = start_plain(1, &[]).await;
        let pid = cluster.pid(primary).expect("the server runs");
        let client = common::client(&cluster).await;
        client
            .put(bytes("big"), Bytes::from(vec![7u8; VALUE]))
            .await
            .expect("put the big value");
        let before = rss_bytes(pid);

        let mut abuser = KvClient::new(kv_channel(&cluster.addr(primary)).await.expect("connect"))
            .max_decoding_message_size(replikv_proto::MAX_MESSAGE_BYTES);
        let requests = futures::stream::iter((0..GETS).map(|tag| PipelineRequest {
            tag,
            op: Some(Op::Get(GetRequest { key: bytes("big") })),
        }));
        let unread = tokio::time::timeout(SERVED_WITHIN, abuser.pipeline(requests))
            .await
            .expect("the pipeline opens in time")
            .expect("the pipeline opens");

        let mut peak = before;
        let mut slowest = Duration::ZERO;
        let watch_until = Instant::now() + Duration::from_secs(8);
        let mut i = 0;
        while Instant::now() < watch_until {
            peak = peak.max(rss_bytes(pid));
            let started = Instant::now();
            let key = Bytes::from(format!("other-{i}"));
            tokio::time::timeout(SERVED_WITHIN, client.put(key.clone(), bytes("v")))
                .await
                .expect("another client's put is served in time")
                .expect("put");
            let got = tokio::time::timeout(SERVED_WITHIN, client.get(key))
                .await
                .expect("another client's get is served in time")
                .expect("get");
            assert_eq!(got, Some(bytes("v")));
            slowest = slowest.max(started.elapsed());
            i += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let grown = peak.saturating_sub(before);
        println!(
            "server RSS {} MiB before, peak {} MiB while {GETS} answers of {} KiB went unread \
             ({} MiB unbounded); slowest put+get of another client {slowest:?}",
            before >> 20,
            peak >> 20,
            VALUE >> 10,
            (GETS as usize * VALUE) >> 20
        );
        assert!(
            grown < 256 << 20,
            "the server grew by {} MiB for a client that never reads",
            grown >> 20
        );
        drop(unread);
    });
}

/// With `--max-connections 8` the ninth connection is closed as it is accepted, the eight
/// open ones keep being served, and a connection is taken again once one closes; the peer
/// port has its own limit.
#[test]
fn connections_past_the_limit_are_refused_and_open_ones_keep_working() {
    common::run(async {
        let (cluster, primary) = start_plain(
            1,
            &["--max-connections", "8", "--max-peer-connections", "2"],
        )
        .await;
        let addr = cluster.addr(primary);
        // The connections the cluster's start-up probes opened may still be closing: take
        // the eight places as they free up.
        let mut open = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while open.len() < 8 {
            assert!(
                Instant::now() < deadline,
                "only {} connections served",
                open.len()
            );
            match served_connection(&addr).await {
                Some(kv) => open.push(kv),
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        for _ in 0..3 {
            assert!(
                served_connection(&addr).await.is_none(),
                "a ninth connection was served"
            );
        }
        for (i, kv) in open.iter_mut().enumerate() {
            let key = Bytes::from(format!("c{i}"));
            tokio::time::timeout(
                SERVED_WITHIN,
                kv.put(PutRequest {
                    key: key.clone(),
                    value: bytes("v"),
                    id: None,
                }),
            )
            .await
            .expect("an open connection is served in time")
            .expect("put");
            let got = kv.get(GetRequest { key }).await.expect("get").into_inner();
            assert_eq!(got.value, bytes("v"));
        }
        // A place is free again once a connection closes.
        open.truncate(7);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if served_connection(&addr).await.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no place freed by a closed connection"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The peer port: two connections with a node certificate, not a third.
        let discover = |channel: Channel| async move {
            let mut peer = PeerClient::new(channel);
            tokio::time::timeout(SERVED_WITHIN, peer.discover(DiscoverRequest { from: 0 }))
                .await
                .ok()?
                .ok()
                .map(|_| peer)
        };
        let mut peers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while peers.len() < 2 {
            assert!(
                Instant::now() < deadline,
                "only {} peer connections",
                peers.len()
            );
            if let Ok(ch) = cluster.peer_channel(primary, "node-0").await {
                if let Some(p) = discover(ch).await {
                    peers.push(p);
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let third = match cluster.peer_channel(primary, "node-0").await {
            Ok(ch) => discover(ch).await,
            Err(_) => None,
        };
        assert!(third.is_none(), "a third peer connection was served");
        // The client port is not affected by the peer port's limit.
        assert!(open[0].get(GetRequest { key: bytes("c0") }).await.is_ok());
    });
}

/// With `--max-in-flight 64`, eight connections keep 256 puts in flight against the
/// primary: part of them are refused at once with RESOURCE_EXHAUSTED (nothing applied), and
/// a well-behaved client's writes keep completing, each within a bound.
#[test]
fn a_flood_gets_resource_exhausted_and_a_steady_writer_keeps_going() {
    const CONNECTIONS: usize = 8;
    const PER_CONNECTION: usize = 32;
    common::run_for(Duration::from_secs(120), async {
        let (cluster, primary) = start_plain(3, &["--max-in-flight", "64"]).await;
        let addr = cluster.addr(primary);
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        // Microseconds each refusal took, summed.
        let refused_us = Arc::new(AtomicU64::new(0));
        let mut flood = Vec::new();
        for c in 0..CONNECTIONS {
            let channel = kv_channel(&addr).await.expect("connect");
            for t in 0..PER_CONNECTION {
                let kv = KvClient::new(channel.clone());
                let (stop, ok, refused, refused_us) = (
                    stop.clone(),
                    ok.clone(),
                    refused.clone(),
                    refused_us.clone(),
                );
                flood.push(tokio::spawn(async move {
                    let mut kv = kv;
                    let key = Bytes::from(format!("flood-{c}-{t}"));
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let r = kv
                            .put(PutRequest {
                                key: key.clone(),
                                value: Bytes::from_static(&[1u8; 64]),
                                id: None,
                            })
                            .await;
                        match r {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(s) if s.code() == Code::ResourceExhausted => {
                                refused_us.fetch_add(
                                    started.elapsed().as_micros() as u64,
                                    Ordering::Relaxed,
                                );
                                refused.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(s) => panic!("flood put: {s:?}"),
                        };
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;

        let steady = common::primary_routed_client(&cluster).await;
        let mut latencies = Vec::new();
        for i in 0..60 {
            let started = Instant::now();
            steady
                .put(
                    Bytes::from(format!("steady-{i}")),
                    Bytes::from(format!("{i}")),
                )
                .await
                .unwrap_or_else(|e| panic!("steady put {i} under the flood: {e}"));
            latencies.push(started.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        for f in flood {
            tokio::time::timeout(Duration::from_secs(10), f)
                .await
                .expect("flood task ends")
                .expect("flood task");
        }
        latencies.sort();
        let (ok, refused) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
        let mean_refusal =
            Duration::from_micros(refused_us.load(Ordering::Relaxed) / refused.max(1));
        let p99 = latencies[latencies.len() * 99 / 100 - 1];
        let max = *latencies.last().unwrap();
        println!(
            "flood: {ok} puts served, {refused} refused (mean refusal {mean_refusal:?}); \
             steady writer: p50 {:?}, p99 {p99:?}, max {max:?}, {} retries",
            latencies[latencies.len() / 2],
            steady.stats().retries
        );
        assert!(
            refused > 0,
            "a flood of {} was never refused",
            CONNECTIONS * PER_CONNECTION
        );
        assert!(ok > 0, "the flood's admitted puts were served");
        assert!(
            mean_refusal < Duration::from_millis(500),
            "refusals take {mean_refusal:?}: the flood is queued, not refused"
        );
        assert!(
            max < SERVED_WITHIN,
            "a steady write took {max:?} under the flood"
        );
        for i in 0..60 {
            let v = steady
                .get(Bytes::from(format!("steady-{i}")))
                .await
                .expect("get");
            assert_eq!(v, Some(Bytes::from(format!("{i}"))), "steady-{i}");
        }
    });
}

/// A peer's `Sync` call, as rank `as_rank` with its certificate, from scratch.
async fn sync_as(
    cluster: &LocalCluster,
    source: usize,
    as_rank: usize,
    cluster_id: &str,
) -> Result<tonic::Streaming<replikv_proto::peer::SyncChunk>, tonic::Status> {
    let channel = cluster
        .peer_channel(source, &format!("node-{as_rank}"))
        .await
        .map_err(tonic::Status::unavailable)?;
    let mut peer =
        PeerClient::new(channel).max_decoding_message_size(replikv_proto::MAX_MESSAGE_BYTES);
    let mut req = tonic::Request::new(SyncRequest {
        since: 0,
        tail_keys: vec![],
        from: as_rank as u32,
        epoch: 0,
    });
    req.metadata_mut()
        .insert("replikv-cluster", cluster_id.parse().expect("ascii"));
    req.metadata_mut()
        .insert("replikv-from", MetadataValue::from(as_rank as u32));
    let mut stream = tokio::time::timeout(SERVED_WITHIN, peer.sync(req))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("sync did not open"))??
        .into_inner();
    // A refusal may come as the stream's first message.
    match tokio::time::timeout(SERVED_WITHIN, stream.message()).await {
        Ok(Ok(Some(_))) => Ok(stream),
        Ok(Ok(None)) => Err(tonic::Status::internal("empty transfer")),
        Ok(Err(s)) => Err(s),
        Err(_) => Err(tonic::Status::deadline_exceeded("no first chunk")),
    }
}

/// The p-th percentile of sorted latencies.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Writes for `period` by one client, one at a time: their latencies, sorted.
async fn measure_puts(
    client: &replikv_client::Client,
    prefix: &str,
    until: impl Fn() -> bool,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    let mut i = 0;
    while !until() {
        let started = Instant::now();
        client
            .put(Bytes::from(format!("{prefix}-{i}")), bytes("v"))
            .await
            .unwrap_or_else(|e| panic!("put {prefix}-{i}: {e}"));
        latencies.push(started.elapsed());
        i += 1;
    }
    latencies.sort();
    latencies
}

/// With `--max-transfers 1` a second catch-up transfer is refused while one runs, and is
/// served once it ends; a wiped server rejoining a cluster holding 48 MiB copies it all
/// while a writer's put latency stays bounded. (The join's install, at the end, pauses writes
/// for one last delta by design, docs/design.md §7: that pause is among the latencies.)
#[test]
fn transfers_run_in_a_bounded_pool_and_writes_stay_fast_meanwhile() {
    const KEYS: usize = 48_000;
    common::run_for(Duration::from_secs(300), async {
        let (mut cluster, primary) = start_plain(3, &["--max-transfers", "1"]).await;
        let client = common::primary_routed_client(&cluster).await;
        let value = Bytes::from(vec![5u8; 1024]);
        let loaded = futures::stream::iter(0..KEYS)
            .map(|i| {
                let (client, value) = (client.clone(), value.clone());
                async move { client.put(Bytes::from(format!("data-{i:06}")), value).await }
            })
            .buffer_unordered(128)
            .filter(|r| std::future::ready(r.is_err()))
            .count()
            .await;
        assert_eq!(loaded, 0, "every load put succeeded");
        let others: Vec<usize> = (0..3).filter(|&r| r != primary).collect();
        let cluster_id = {
            let ch = cluster
                .peer_channel(primary, &format!("node-{}", others[0]))
                .await
                .unwrap();
            PeerClient::new(ch)
                .discover(DiscoverRequest {
                    from: others[0] as u32,
                })
                .await
                .expect("discover")
                .into_inner()
                .cluster_id
        };

        // One transfer, held open (its receiver does not read): the pool is full.
        let held = sync_as(&cluster, primary, others[0], &cluster_id)
            .await
            .expect("the first transfer is served");
        let second = sync_as(&cluster, primary, others[1], &cluster_id).await;
        let err = second.expect_err("a second transfer while the pool is full");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("--max-transfers"), "{err:?}");
        tokio::time::timeout(SERVED_WITHIN, client.put(bytes("during"), bytes("v")))
            .await
            .expect("writes go on while transfers wait")
            .expect("put");
        // Once it ends, the place is free again.
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match sync_as(&cluster, primary, others[1], &cluster_id).await {
                Ok(_) => break,
                Err(e) if e.code() == Code::ResourceExhausted => {
                    assert!(Instant::now() < deadline, "the pool stayed full: {e:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("transfer after the first ended: {e:?}"),
            }
        }

        // Writes without a transfer, then while a wiped server copies everything.
        let quiet_until = Instant::now() + Duration::from_secs(3);
        let quiet = measure_puts(&client, "quiet", || Instant::now() >= quiet_until).await;
        let wiped = others[0];
        cluster.kill(wiped).unwrap();
        cluster.wipe(wiped).unwrap();
        cluster.restart(wiped).unwrap();
        let rejoined = Arc::new(AtomicBool::new(false));
        let watcher = {
            let rejoined = rejoined.clone();
            let addr = cluster.addr(primary);
            let cluster_status = move || {
                let addr = addr.clone();
                async move {
                    let mut kv = KvClient::new(kv_channel(&addr).await.ok()?);
                    kv.status(replikv_proto::kv::StatusRequest {})
                        .await
                        .ok()
                        .map(|r| r.into_inner())
                }
            };
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(150);
                while Instant::now() < deadline {
                    if let Some(s) = cluster_status().await {
                        if s.view.is_some_and(|v| v.members.contains(&(wiped as u32))) {
                            rejoined.store(true, Ordering::Relaxed);
                            return true;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                rejoined.store(true, Ordering::Relaxed);
                false
            })
        };
        let during = measure_puts(&client, "during", || rejoined.load(Ordering::Relaxed)).await;
        assert!(watcher.await.unwrap(), "the wiped server rejoined in time");
        println!(
            "put latency without a transfer: {} puts, p50 {:?}, p99 {:?}, max {:?}; \
             during the rejoin of a wiped server ({KEYS} keys of 1 KiB): {} puts, p50 {:?}, \
             p99 {:?}, max {:?}",
            quiet.len(),
            percentile(&quiet, 50),
            percentile(&quiet, 99),
            quiet.last().unwrap(),
            during.len(),
            percentile(&during, 50),
            percentile(&during, 99),
            during.last().unwrap(),
        );
        assert!(!during.is_empty(), "writes went on during the transfer");
        let p99 = percentile(&during, 99);
        assert!(
            p99 < Duration::from_secs(1),
            "put p99 {p99:?} while a transfer ran"
        );
        // The rejoined server holds everything.
        let pinned = common::pinned(&cluster, wiped).await;
        for i in (0..KEYS).step_by(997) {
            let got = pinned
                .get(Bytes::from(format!("data-{i:06}")))
                .await
                .expect("get");
            assert_eq!(
                got.as_ref(),
                Some(&value),
                "data-{i:06} on the rejoined server"
            );
        }
    });
}
