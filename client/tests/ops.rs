//! Scans, compare-and-swap and range deletes against real three-server clusters
//! (`LocalCluster` spawns `replikv-server` processes; build it first with
//! `cargo build -p replikv-server`), through primary kills and pauses. The cluster kills its
//! processes when dropped, also when a test panics.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use replikv_client::{Client, Error, Range, Route};
use replikv_lincheck::{check, Call, CheckOptions, Operation, Outcome, Verdict};
use replikv_proto::kv::{
    pipeline_request, pipeline_response, CasRequest, CasResponse, DeleteRangeRequest,
    DeleteRangeResponse, KeyRange, PipelineRequest, RequestId, ScanRequest,
};
use replikv_testkit::{ClusterOptions, LocalCluster};
use tokio::time::Instant;

/// Bound for a cluster to elect a primary and for any single test step.
const STEP: Duration = Duration::from_secs(30);

async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .expect("step did not finish in time")
}

async fn start_cluster() -> LocalCluster {
    let cluster = LocalCluster::start(ClusterOptions {
        servers: 3,
        ..Default::default()
    })
    .expect("start the servers (is replikv-server built?)");
    cluster.wait_ready(STEP).await.expect("every server serves");
    cluster
}

async fn client_of(cluster: &LocalCluster) -> Client {
    Client::connect(
        cluster
            .client_config()
            .with_request_timeout(Duration::from_secs(15))
            .with_route(Route::Primary),
    )
    .await
    .expect("client config is valid")
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// Every key and value of `range`, through the page stream.
async fn scan_all(client: &Client, range: Range, page: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pages = std::pin::pin!(client.scan_pages(range, page));
    while let Some(p) = pages.next().await {
        for (k, v) in p.expect("scan page").items {
            out.push((text(&k), text(&v)));
        }
    }
    out
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_cas_and_range_delete_keep_their_meaning_across_a_primary_kill() {
    let mut cluster = start_cluster().await;
    let client = client_of(&cluster).await;
    for k in ["a3", "a1", "a2", "a5", "a4", "b1", "a"] {
        bounded(client.put(b(k), b(&format!("v-{k}"))))
            .await
            .unwrap();
    }
    // A prefix, in key order, across pages of two.
    let got = bounded(scan_all(&client, Range::prefix("a"), 2)).await;
    let want: Vec<_> = ["a", "a1", "a2", "a3", "a4", "a5"]
        .iter()
        .map(|k| (k.to_string(), format!("v-{k}")))
        .collect();
    assert_eq!(got, want);
    // An inclusive range, one page with a continuation.
    let page = bounded(client.scan(&Range::keys("a2", "b1"), 3, None))
        .await
        .unwrap();
    let keys: Vec<_> = page.items.iter().map(|(k, _)| text(k)).collect();
    assert_eq!(keys, ["a2", "a3", "a4"]);
    let next = bounded(client.scan(&Range::keys("a2", "b1"), 3, page.continuation))
        .await
        .unwrap();
    let keys: Vec<_> = next.items.iter().map(|(k, _)| text(k)).collect();
    assert_eq!(keys, ["a5", "b1"]);
    assert_eq!(next.continuation, None, "the range ends there");

    // Compare-and-swap: put if absent, put if equal, delete if equal.
    let r = bounded(client.cas(b("c"), None, Some(b("1"))))
        .await
        .unwrap();
    assert!(r.swapped && r.current.is_none());
    let r = bounded(client.cas(b("c"), None, Some(b("x"))))
        .await
        .unwrap();
    assert!(!r.swapped, "the key exists");
    assert_eq!(
        r.current,
        Some(b("1")),
        "a mismatch carries the current value"
    );
    let r = bounded(client.cas(b("c"), Some(b("1")), Some(b("2"))))
        .await
        .unwrap();
    assert!(r.swapped);
    assert_eq!(r.current, Some(b("1")));
    let r = bounded(client.cas(b("c"), Some(b("1")), None))
        .await
        .unwrap();
    assert!(!r.swapped);
    assert_eq!(bounded(client.get(b("c"))).await.unwrap(), Some(b("2")));

    // A range delete removes exactly its range, and says how many.
    let d = bounded(client.delete_range(&Range::keys("a1", "a3"), 0))
        .await
        .unwrap();
    assert_eq!((d.removed, d.more), (3, false));
    // With a limit: the first keys, and "more".
    let d = bounded(client.delete_range(&Range::prefix("a"), 2))
        .await
        .unwrap();
    assert_eq!((d.removed, d.more), (2, true));
    let got = bounded(scan_all(&client, Range::Prefix(Bytes::new()), 100)).await;
    assert_eq!(got, pairs(&[("a5", "v-a5"), ("b1", "v-b1"), ("c", "2")]));

    // The primary dies: everything above holds on the new one, and the operations go on.
    let (primary, _) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    cluster.kill(primary).unwrap();
    let (new_primary, _) = bounded(async {
        loop {
            if let Ok((p, st)) = cluster.wait_for_primary(STEP).await {
                if p != primary {
                    return (p, st);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_ne!(new_primary, primary);
    let got = bounded(scan_all(&client, Range::Prefix(Bytes::new()), 1)).await;
    assert_eq!(got, pairs(&[("a5", "v-a5"), ("b1", "v-b1"), ("c", "2")]));
    let r = bounded(client.cas(b("c"), Some(b("2")), Some(b("3"))))
        .await
        .unwrap();
    assert!(r.swapped);
    let d = bounded(client.delete_range(&Range::prefix("a"), 0))
        .await
        .unwrap();
    assert_eq!((d.removed, d.more), (1, false));
    let got = bounded(scan_all(&client, Range::keys("a", "z"), 10)).await;
    assert_eq!(got, pairs(&[("b1", "v-b1"), ("c", "3")]));
}

/// One pipelined request straight to `addr`: its answer.
async fn raw(
    (cluster, rank): (&LocalCluster, usize),
    op: pipeline_request::Op,
) -> pipeline_response::Result {
    let mut stub = cluster.stub(rank, Duration::from_secs(15));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(PipelineRequest {
        tag: 1,
        op: Some(op),
    })
    .await
    .unwrap();
    let mut answers = stub
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    drop(tx);
    answer.result.expect("an answer with a result")
}

/// One pipelined request straight to `addr`: the gRPC code of its answer (0 for OK).
async fn raw_code(addr: (&LocalCluster, usize), op: pipeline_request::Op) -> i32 {
    match raw(addr, op).await {
        pipeline_response::Result::Error(e) => e.code,
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_cas_or_range_delete_returns_its_first_answer() {
    let cluster = start_cluster().await;
    let client = client_of(&cluster).await;
    for k in ["d/1", "d/2"] {
        bounded(client.put(b(k), b("v"))).await.unwrap();
    }
    let (primary, _) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    let addr = (&cluster, primary);
    let id = |seq| {
        Some(RequestId {
            client_id: 0x5eed,
            client_id_hi: 7,
            seq,
            first_unfinished: 1,
        })
    };
    let cas = pipeline_request::Op::Cas(CasRequest {
        key: b("c"),
        expect_absent: true,
        value: b("first"),
        id: id(1),
        ..Default::default()
    });
    let first = CasResponse {
        swapped: true,
        had_current: false,
        current: Bytes::new(),
    };
    for attempt in 0..3 {
        let r = bounded(raw(addr, cas.clone())).await;
        assert_eq!(
            r,
            pipeline_response::Result::Cas(first.clone()),
            "attempt {attempt}: the first answer, not a mismatch against its own write"
        );
    }
    let range = pipeline_request::Op::DeleteRange(DeleteRangeRequest {
        range: Some(KeyRange {
            prefix: b("d/"),
            ..Default::default()
        }),
        limit: 0,
        id: id(2),
    });
    let removed = pipeline_response::Result::DeleteRange(DeleteRangeResponse {
        removed: 2,
        more: false,
    });
    assert_eq!(bounded(raw(addr, range.clone())).await, removed);
    bounded(client.put(b("d/3"), b("after"))).await.unwrap();
    assert_eq!(
        bounded(raw(addr, range)).await,
        removed,
        "answered from the session, not applied again"
    );
    assert_eq!(
        bounded(client.get(b("d/3"))).await.unwrap(),
        Some(b("after"))
    );
    assert_eq!(bounded(client.get(b("c"))).await.unwrap(), Some(b("first")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ranges_limits_and_keys_are_invalid_arguments_and_change_nothing() {
    let cluster = start_cluster().await;
    let client = client_of(&cluster).await;
    for k in ["k1", "k2", "k3"] {
        bounded(client.put(b(k), b("v"))).await.unwrap();
    }
    let before = bounded(scan_all(&client, Range::Prefix(Bytes::new()), 10)).await;
    let (primary, _) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    let addr = (&cluster, primary);
    let invalid = tonic::Code::InvalidArgument as i32;
    let range = |from: &str, to: &str, prefix: &str| {
        Some(KeyRange {
            from: b(from),
            to: b(to),
            prefix: b(prefix),
        })
    };
    let long = "x".repeat(2000);
    let cases: Vec<(&str, pipeline_request::Op)> = vec![
        (
            "inverted scan",
            pipeline_request::Op::Scan(ScanRequest {
                range: range("k3", "k1", ""),
                ..Default::default()
            }),
        ),
        (
            "scan limit above the maximum",
            pipeline_request::Op::Scan(ScanRequest {
                range: range("k1", "k3", ""),
                limit: 10_001,
                ..Default::default()
            }),
        ),
        (
            "oversized scan bound",
            pipeline_request::Op::Scan(ScanRequest {
                range: range(&long, "", ""),
                ..Default::default()
            }),
        ),
        (
            "prefix and range together",
            pipeline_request::Op::Scan(ScanRequest {
                range: range("k1", "k3", "k"),
                ..Default::default()
            }),
        ),
        (
            "continuation outside the range",
            pipeline_request::Op::Scan(ScanRequest {
                range: range("k1", "k2", ""),
                continuation: b("z"),
                ..Default::default()
            }),
        ),
        (
            "inverted range delete",
            pipeline_request::Op::DeleteRange(DeleteRangeRequest {
                range: range("k3", "k1", ""),
                ..Default::default()
            }),
        ),
        (
            "range delete of everything",
            pipeline_request::Op::DeleteRange(DeleteRangeRequest::default()),
        ),
        (
            "range delete limit above the maximum",
            pipeline_request::Op::DeleteRange(DeleteRangeRequest {
                range: range("k1", "k3", ""),
                limit: 10_001,
                ..Default::default()
            }),
        ),
        (
            "oversized CAS key",
            pipeline_request::Op::Cas(CasRequest {
                key: b(&long),
                value: b("v"),
                expect_absent: true,
                ..Default::default()
            }),
        ),
        (
            "CAS expecting a value and absence",
            pipeline_request::Op::Cas(CasRequest {
                key: b("k1"),
                expected: b("v"),
                expect_absent: true,
                value: b("w"),
                ..Default::default()
            }),
        ),
    ];
    for (what, op) in cases {
        assert_eq!(bounded(raw_code(addr, op)).await, invalid, "{what}");
    }
    // Through the client: refused as bad input, locally or by the server.
    for r in [
        bounded(client.scan(&Range::keys("k3", "k1"), 0, None))
            .await
            .map(|_| ()),
        bounded(client.scan(&Range::keys("k1", "k3"), 20_000, None))
            .await
            .map(|_| ()),
        bounded(client.scan(&Range::prefix(long.clone()), 0, None))
            .await
            .map(|_| ()),
        bounded(client.delete_range(&Range::keys("k3", "k1"), 0))
            .await
            .map(|_| ()),
        bounded(client.delete_range(&Range::prefix(""), 0))
            .await
            .map(|_| ()),
        bounded(client.cas(b(&long), None, Some(b("v"))))
            .await
            .map(|_| ()),
    ] {
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }
    let after = bounded(scan_all(&client, Range::Prefix(Bytes::new()), 10)).await;
    assert_eq!(before, after, "bad input changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_delete_across_a_primary_kill_is_applied_once() {
    let mut cluster = start_cluster().await;
    let client = client_of(&cluster).await;
    for i in 0..100 {
        bounded(client.put(b(&format!("r/{i:03}")), b("v")))
            .await
            .unwrap();
    }
    let (primary, st) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    let view = st.view.expect("a primary has a view");
    let backup = *view
        .members
        .iter()
        .find(|&&m| m as usize != primary)
        .expect("a backup") as usize;
    // With one backup paused the primary cannot commit: the delete is sequenced and
    // replicated to the other backup, then its primary dies before answering.
    cluster.pause(backup).unwrap();
    let deleting = {
        let client = client.clone();
        tokio::spawn(async move { client.delete_range(&Range::prefix("r/"), 0).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(primary).unwrap();
    cluster.resume(backup).unwrap();
    // If the pause got the backup dropped, the other backup alone is no quorum of the
    // two-member view left (docs/design.md §5): the killed primary comes back, as after a crash.
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart(primary).unwrap();
    let d = bounded(deleting)
        .await
        .unwrap()
        .expect("the retried range delete succeeds");
    assert_eq!((d.removed, d.more), (100, false), "its one answer");
    // A key written after it stays: the delete is never applied a second time.
    bounded(client.put(b("r/100"), b("after"))).await.unwrap();
    bounded(cluster.wait_converged(STEP)).await.unwrap();
    let got = bounded(scan_all(&client, Range::prefix("r/"), 50)).await;
    assert_eq!(got, pairs(&[("r/100", "after")]));
}

/// Each written key -> (invoked, acknowledged), in microseconds since the test began.
type Writes = Arc<Mutex<BTreeMap<String, (u64, Option<u64>)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_under_concurrent_writes_sees_every_acknowledged_write() {
    let cluster = start_cluster().await;
    let client = client_of(&cluster).await;
    let origin = Instant::now();
    let writes: Writes = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, writes, stop) = (client.new_session().unwrap(), writes.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Keys of all writers interleave in key order.
                let key = format!("s/{i:05}/{w}");
                let invoked = origin.elapsed().as_micros() as u64;
                writes.lock().unwrap().insert(key.clone(), (invoked, None));
                if client.put(b(&key), b(&key)).await.is_ok() {
                    let acked = origin.elapsed().as_micros() as u64;
                    writes.lock().unwrap().get_mut(&key).unwrap().1 = Some(acked);
                }
                i += 1;
            }
        }));
    }
    let reader = Client::connect(cluster.client_config().with_route(Route::Random))
        .await
        .unwrap();
    let mut scans = 0;
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        let started = origin.elapsed().as_micros() as u64;
        let got = bounded(scan_all(&reader, Range::prefix("s/"), 64)).await;
        let ended = origin.elapsed().as_micros() as u64;
        let seen: Vec<&String> = got.iter().map(|(k, _)| k).collect();
        assert!(seen.windows(2).all(|p| p[0] < p[1]), "key order");
        for (k, v) in &got {
            assert_eq!(k, v);
        }
        let seen: HashSet<&str> = seen.into_iter().map(String::as_str).collect();
        let writes = writes.lock().unwrap();
        for (key, (invoked, acked)) in writes.iter() {
            if acked.is_some_and(|a| a < started) {
                assert!(
                    seen.contains(key.as_str()),
                    "scan {scans} misses acknowledged {key}"
                );
            }
            if seen.contains(key.as_str()) {
                assert!(
                    *invoked < ended,
                    "scan {scans} shows {key}, written after it"
                );
            }
        }
        for key in &seen {
            assert!(writes.contains_key(*key), "{key} was never written");
        }
        scans += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        bounded(w).await.unwrap();
    }
    // Nothing a later read would not see: every key a scan showed is still there.
    let last = bounded(scan_all(&reader, Range::prefix("s/"), 1000)).await;
    let acked = writes
        .lock()
        .unwrap()
        .values()
        .filter(|(_, a)| a.is_some())
        .count();
    assert!(
        last.len() >= acked,
        "{} keys, {acked} acknowledged",
        last.len()
    );
    assert!(scans >= 3, "only {scans} scans ran");
}

/// One client of the counter: reads, then increments by compare-and-swap, recording the
/// history. Values are `n/process/i`, unique to one attempt, so that an increment whose
/// outcome is unknown can be told applied (its value was seen) or not.
async fn count(
    client: Client,
    process: u64,
    origin: Instant,
    until: Instant,
    history: Arc<Mutex<Vec<Operation>>>,
) {
    let now = || origin.elapsed().as_nanos() as u64;
    let mut known: Option<String> = None;
    let mut i = 0u64;
    while Instant::now() < until {
        let current = match known.take() {
            Some(v) => Some(v),
            None => {
                let invoke = now();
                match client.get(b("counter")).await {
                    Ok(v) => {
                        let v = v.map(|v| text(&v));
                        history.lock().unwrap().push(Operation {
                            process,
                            key: "counter".into(),
                            call: Call::Get,
                            outcome: Outcome::Ok(v.clone()),
                            invoke,
                            complete: now(),
                        });
                        v
                    }
                    Err(_) => continue,
                }
            }
        };
        let n: u64 = current
            .as_deref()
            .map_or(0, |v| v.split('/').next().unwrap().parse().unwrap());
        i += 1;
        let new = format!("{}/{process}/{i}", n + 1);
        let invoke = now();
        let r = client
            .cas(b("counter"), current.as_deref().map(b), Some(b(&new)))
            .await;
        let outcome = match r {
            Ok(r) => {
                let seen = r.current.map(|v| text(&v));
                known = if r.swapped {
                    Some(new.clone())
                } else {
                    seen.clone()
                };
                Outcome::Ok(seen)
            }
            // Definitely not applied: nothing to record.
            Err(Error::Unavailable(_)) | Err(Error::Overloaded(_)) => continue,
            Err(_) => Outcome::Unknown,
        };
        history.lock().unwrap().push(Operation {
            process,
            key: "counter".into(),
            call: Call::Cas {
                expected: current,
                new: Some(new),
            },
            outcome,
            invoke,
            complete: now(),
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cas_counter_of_16_clients_through_kills_and_pauses_counts_every_increment() {
    let mut cluster = start_cluster().await;
    let client = client_of(&cluster).await;
    let origin = Instant::now();
    let until = Instant::now() + Duration::from_secs(12);
    let history: Arc<Mutex<Vec<Operation>>> = Default::default();
    let mut counters = Vec::new();
    for p in 0..16 {
        let c = client.new_session().unwrap();
        counters.push(tokio::spawn(count(c, p, origin, until, history.clone())));
    }
    // Faults while they count: the primary killed and restarted, then a backup paused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (primary, _) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    cluster.kill(primary).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart(primary).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (primary, st) = bounded(cluster.wait_for_primary(STEP)).await.unwrap();
    let paused = st
        .view
        .and_then(|v| v.members.into_iter().find(|&m| m as usize != primary))
        .map(|m| m as usize);
    if let Some(p) = paused {
        cluster.pause(p).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.resume(p).unwrap();
    }
    for c in counters {
        tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("a counter finishes")
            .unwrap();
    }
    let final_value = bounded(client.get(b("counter")))
        .await
        .unwrap()
        .map(|v| text(&v));
    let mut history = std::mem::take(&mut *history.lock().unwrap());
    let end = origin.elapsed().as_nanos() as u64;
    history.push(Operation {
        process: 99,
        key: "counter".into(),
        call: Call::Get,
        outcome: Outcome::Ok(final_value.clone()),
        invoke: end,
        complete: end + 1,
    });
    // Applied increments: every swap, and every unknown one whose value someone saw.
    let seen: BTreeSet<&str> = history
        .iter()
        .filter_map(|op| match &op.outcome {
            Outcome::Ok(Some(v)) => Some(v.as_str()),
            _ => None,
        })
        .collect();
    let mut swapped = 0u64;
    let mut unknown_applied = 0u64;
    for op in &history {
        if let Call::Cas {
            expected,
            new: Some(new),
        } = &op.call
        {
            match &op.outcome {
                Outcome::Ok(before) if before == expected => swapped += 1,
                Outcome::Unknown if seen.contains(new.as_str()) => unknown_applied += 1,
                _ => {}
            }
        }
    }
    let n: u64 = final_value
        .as_deref()
        .map_or(0, |v| v.split('/').next().unwrap().parse().unwrap());
    assert!(swapped > 50, "only {swapped} increments in 12 s");
    assert_eq!(
        n,
        swapped + unknown_applied,
        "the counter is its number of increments ({swapped} acknowledged, \
         {unknown_applied} with an unknown outcome that took effect)"
    );
    let report = check(&history, &CheckOptions::default());
    assert_eq!(
        report.verdict(),
        Verdict::Linearizable,
        "{} operations",
        history.len()
    );
}
