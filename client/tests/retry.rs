//! Retry, redirect and outcome classification against scripted fake servers:
//! what a caller is told when servers refuse, redirect, stall or vanish.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{closed_addr, unavailable, Call, FakeCluster, Reply};
use replikv_client::{BlockingClient, Client, ClientConfig, Error, Route};
use replikv_proto::OUTCOME_NONE;
use tonic::Status;

/// Every test's whole-request budget is small so failures come quickly.
fn config(addrs: Vec<String>) -> ClientConfig {
    ClientConfig::new(addrs)
        .with_request_timeout(Duration::from_millis(600))
        .with_attempt_timeout(Duration::from_millis(200))
}

/// A bound on how long any one test step may take.
const STEP: Duration = Duration::from_secs(5);

async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, fut)
        .await
        .expect("step did not finish in time")
}

#[tokio::test]
async fn a_refused_write_moves_to_another_server_with_the_same_request_id() {
    let fakes = FakeCluster::start(2, |call: &Call, _: &[String]| {
        if call.nth == 0 {
            Reply::Fail(unavailable(Some(OUTCOME_NONE), None))
        } else {
            Reply::Serve
        }
    })
    .await;
    let client = Client::connect(config(fakes.addrs())).await.unwrap();

    let old = bounded(client.put("k", "v1")).await.unwrap();
    assert_eq!(old, None);
    assert_eq!(
        bounded(client.get("k")).await.unwrap(),
        Some(Bytes::from("v1"))
    );

    let puts = fakes.calls_of("put");
    assert_eq!(puts.len(), 2, "one refused attempt, one retry: {puts:?}");
    assert_ne!(
        puts[0].server, puts[1].server,
        "retried on the other server"
    );
    let id = puts[0].id.expect("writes carry a request id");
    assert_eq!(puts[1].id, Some(id), "the retry reuses the request id");
    assert_eq!(
        (
            (u128::from(id.client_id_hi) << 64) | u128::from(id.client_id),
            id.seq,
            id.first_unfinished
        ),
        (client.client_id(), 1, 1)
    );
    assert!(
        fakes.calls_of("get").iter().all(|c| c.id.is_none()),
        "reads carry no id"
    );
    let stats = client.stats();
    assert_eq!((stats.requests, stats.retries), (2, 1));
}

#[tokio::test]
async fn a_redirect_goes_to_the_named_primary_and_primary_routing_remembers_it() {
    const PRIMARY: usize = 2;
    let fakes = FakeCluster::start(3, |call: &Call, addrs: &[String]| {
        if call.method == "put" && call.server != PRIMARY {
            Reply::Fail(unavailable(Some(OUTCOME_NONE), Some(&addrs[PRIMARY])))
        } else {
            Reply::Serve
        }
    })
    .await;
    // A new client's first write starts at random; one that lands on the primary teaches
    // the client just as well (see the next test), so new clients are tried until one's
    // first write lands on a backup and is redirected.
    let mut redirected = None;
    for i in 0..30 {
        let client = Client::connect(config(fakes.addrs()).with_route(Route::Primary))
            .await
            .unwrap();
        let before = fakes.calls_of("put").len();
        bounded(client.put(format!("warmup{i}"), "1"))
            .await
            .unwrap();
        let calls = &fakes.calls_of("put")[before..];
        assert!(calls.len() <= 2, "at most one detour: {calls:?}");
        assert_eq!(calls.last().unwrap().server, PRIMARY);
        if calls.len() == 2 {
            redirected = Some(client);
            break;
        }
    }
    let client = redirected.expect("no first write landed on a backup in 30 tries");
    let first = fakes.calls_of("put");

    for i in 0..5 {
        bounded(client.put(format!("k{i}"), "v")).await.unwrap();
    }
    let later = &fakes.calls_of("put")[first.len()..];
    assert_eq!(later.len(), 5, "no detours once the primary is known");
    assert!(later.iter().all(|c| c.server == PRIMARY));
}

#[tokio::test]
async fn primary_routing_learns_the_primary_from_a_forwarded_write() {
    const PRIMARY: usize = 1;
    let fakes = FakeCluster::start(3, |call: &Call, _: &[String]| {
        if call.server == PRIMARY {
            Reply::Serve
        } else {
            Reply::ServeForwarded(PRIMARY)
        }
    })
    .await;
    let client = Client::connect(config(fakes.addrs())).await.unwrap();

    // The first write goes to a random server; whichever answers, it names the primary (or
    // is it), and every later write goes straight there.
    bounded(client.put("first", "1")).await.unwrap();
    for i in 0..10 {
        bounded(client.put(format!("k{i}"), "v")).await.unwrap();
        bounded(client.delete(format!("k{i}"))).await.unwrap();
    }
    let writes: Vec<_> = fakes
        .calls()
        .into_iter()
        .filter(|c| c.method != "get")
        .collect();
    assert_eq!(writes.len(), 21, "no retries: {writes:?}");
    assert!(
        writes[1..].iter().all(|c| c.server == PRIMARY),
        "later writes skip the forward: {writes:?}"
    );
    assert_eq!(client.stats().retries, 0);

    // Random routing keeps spreading writes over every server.
    let random = Client::connect(config(fakes.addrs()).with_route(Route::Random))
        .await
        .unwrap();
    let before = fakes.calls().len();
    for i in 0..30 {
        bounded(random.put(format!("r{i}"), "v")).await.unwrap();
    }
    let servers: std::collections::BTreeSet<usize> =
        fakes.calls()[before..].iter().map(|c| c.server).collect();
    assert_eq!(servers.len(), 3, "random routing uses every server");
}

#[tokio::test]
async fn a_write_whose_attempts_time_out_has_an_unknown_outcome() {
    let fakes = FakeCluster::start(2, |_: &Call, _: &[String]| {
        Reply::Stall(Duration::from_secs(3))
    })
    .await;
    let client = Client::connect(config(fakes.addrs())).await.unwrap();

    let started = Instant::now();
    let err = bounded(client.put("k", "v")).await.unwrap_err();
    assert!(err.is_outcome_unknown(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the request deadline bounds the wait"
    );
    assert!(
        fakes.calls_of("put").len() >= 2,
        "timed-out attempts are retried"
    );

    // A read that times out changed nothing: it is merely unavailable.
    let err = bounded(client.get("k")).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn servers_that_say_they_did_nothing_make_a_write_unavailable() {
    let fakes = FakeCluster::start(2, |_: &Call, _: &[String]| {
        Reply::Fail(unavailable(Some(OUTCOME_NONE), None))
    })
    .await;
    let client = Client::connect(config(fakes.addrs())).await.unwrap();

    let err = bounded(client.delete("k")).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    let deletes = fakes.calls_of("delete");
    assert!(deletes.len() >= 3, "kept trying until the deadline");
    assert!(deletes.iter().any(|c| c.server == 0) && deletes.iter().any(|c| c.server == 1));
    assert!(deletes.windows(2).all(|w| w[0].id == w[1].id));
}

#[tokio::test]
async fn one_attempt_that_may_have_applied_makes_the_outcome_unknown() {
    // First a bare UNAVAILABLE (the server may have forwarded the write), then
    // only definite refusals: the write may still have happened.
    let fakes = FakeCluster::start(2, |call: &Call, _: &[String]| {
        if call.nth == 0 {
            Reply::Fail(unavailable(None, None))
        } else {
            Reply::Fail(unavailable(Some(OUTCOME_NONE), None))
        }
    })
    .await;
    let client = Client::connect(config(fakes.addrs())).await.unwrap();
    let err = bounded(client.put("k", "v")).await.unwrap_err();
    assert!(err.is_outcome_unknown(), "{err:?}");
}

#[tokio::test]
async fn refused_connections_are_retried_elsewhere_and_prove_nothing_was_applied() {
    let fakes = FakeCluster::start(1, |_: &Call, _: &[String]| Reply::Serve).await;
    let mut addrs = vec![closed_addr(), closed_addr()];
    addrs.extend(fakes.addrs());
    let client = Client::connect(config(addrs.clone())).await.unwrap();
    for i in 0..5 {
        bounded(client.put(format!("k{i}"), "v")).await.unwrap();
    }
    assert_eq!(fakes.calls_of("put").len(), 5);

    let dead = Client::connect(config(addrs[..2].to_vec())).await.unwrap();
    let err = bounded(dead.put("k", "v")).await.unwrap_err();
    assert!(
        matches!(err, Error::Unavailable(_)),
        "nothing listened, so nothing was applied: {err:?}"
    );
}

#[tokio::test]
async fn invalid_input_is_not_retried() {
    let fakes = FakeCluster::start(3, |_: &Call, _: &[String]| {
        Reply::Fail(Status::invalid_argument("value too large"))
    })
    .await;
    let client = Client::connect(config(fakes.addrs())).await.unwrap();
    let err = bounded(client.put("k", "v")).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("value too large")),
        "{err:?}"
    );
    assert_eq!(fakes.calls().len(), 1);

    let err = bounded(client.get("")).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert_eq!(fakes.calls().len(), 1, "empty keys never leave the client");
}

#[tokio::test]
async fn an_overloaded_server_is_tried_again_after_a_backoff_not_failed_over() {
    static PUTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let fakes = FakeCluster::start(2, |call: &Call, _: &[String]| {
        if call.method == "put" && PUTS.fetch_add(1, Ordering::SeqCst) < 2 {
            Reply::Fail(Status::resource_exhausted("too many requests"))
        } else {
            Reply::Serve
        }
    })
    .await;
    let client = Client::connect(config(fakes.addrs())).await.unwrap();
    let started = Instant::now();
    bounded(client.put("k", "v")).await.unwrap();
    let puts = fakes.calls_of("put");
    assert_eq!(puts.len(), 3, "two refusals, then served: {puts:?}");
    assert!(
        puts.iter().all(|c| c.server == puts[0].server),
        "every attempt went to the server that said it is overloaded: {puts:?}"
    );
    assert_eq!(puts[1].id, puts[0].id, "the retry reuses the request id");
    // Two backoffs (from 2.5 ms, doubling) separate the three attempts.
    assert!(started.elapsed() >= Duration::from_millis(5));
}

#[tokio::test]
async fn persistent_overload_is_reported_as_overloaded() {
    let fakes = FakeCluster::start(2, |_: &Call, _: &[String]| {
        Reply::Fail(Status::resource_exhausted("too many requests"))
    })
    .await;
    let client = Client::connect(config(fakes.addrs())).await.unwrap();
    let err = bounded(client.put("k", "v")).await.unwrap_err();
    assert!(matches!(err, Error::Overloaded(_)), "{err:?}");
    let err = bounded(client.get("k")).await.unwrap_err();
    assert!(matches!(err, Error::Overloaded(_)), "{err:?}");
}

#[tokio::test]
async fn first_unfinished_is_the_oldest_write_still_in_flight() {
    let fakes = FakeCluster::start(1, |call: &Call, _: &[String]| {
        if call.key == "slow" {
            Reply::Stall(Duration::from_millis(500))
        } else {
            Reply::Serve
        }
    })
    .await;
    let client = Client::connect(ClientConfig::new(fakes.addrs()))
        .await
        .unwrap();

    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.put("slow", "1").await }
    });
    assert!(
        fakes
            .wait_for_calls(STEP, |calls| calls.iter().any(|c| c.key == "slow"))
            .await
    );
    bounded(client.put("fast", "2")).await.unwrap();
    bounded(slow).await.unwrap().unwrap();
    bounded(client.delete("fast")).await.unwrap();

    // The client, given one server, first asked it for the members (a Members call).
    let ids: Vec<_> = fakes
        .calls()
        .iter()
        .filter(|c| c.method != "status" && c.method != "members")
        .map(|c| {
            let id = c.id.unwrap();
            (id.seq, id.first_unfinished)
        })
        .collect();
    assert_eq!(
        ids,
        vec![(1, 1), (2, 1), (3, 3)],
        "seq 2 was sent while seq 1 was in flight; seq 3 after both finished"
    );
}

#[tokio::test]
async fn status_all_reports_every_server_and_wait_for_any_finds_one() {
    let fakes = FakeCluster::start(2, |_: &Call, _: &[String]| Reply::Serve).await;
    let down = closed_addr();
    let mut addrs = fakes.addrs();
    addrs.push(down.clone());
    let client = Client::connect(config(addrs.clone())).await.unwrap();

    bounded(client.wait_for_any(Duration::from_secs(2)))
        .await
        .unwrap();
    let all = bounded(client.status_all()).await;
    assert_eq!(
        all.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(),
        addrs
    );
    assert_eq!(all[0].1.as_ref().unwrap().role, "primary");
    assert_eq!(all[1].1.as_ref().unwrap().rank, 1);
    assert!(matches!(all[2].1, Err(Error::Unavailable(_))));

    let nobody = Client::connect(config(vec![down])).await.unwrap();
    let started = Instant::now();
    let err = bounded(nobody.wait_for_any(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn blocking_client_serves_many_threads_at_once() {
    let fakes_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fakes = fakes_rt.block_on(FakeCluster::start(2, |call: &Call, _: &[String]| {
        // Every other write is refused once, so the threads also retry.
        if call.method == "put" && call.nth.is_multiple_of(2) {
            Reply::Fail(unavailable(Some(OUTCOME_NONE), None))
        } else {
            Reply::Serve
        }
    }));
    let client = BlockingClient::connect(
        ClientConfig::new(fakes.addrs()).with_request_timeout(Duration::from_secs(5)),
    )
    .unwrap();

    std::thread::scope(|s| {
        for t in 0..4 {
            let client = &client;
            s.spawn(move || {
                for i in 0..10 {
                    let key = format!("t{t}-{i}");
                    assert_eq!(client.put(key.clone(), "v").unwrap(), None);
                    assert_eq!(client.get(key).unwrap(), Some(Bytes::from("v")));
                }
            });
        }
    });
    let puts = fakes.calls_of("put");
    let mut seqs: Vec<u64> = puts.iter().map(|c| c.id.unwrap().seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>(), "one seq per write");
    assert_eq!(client.stats().requests, 80);

    drop(client);
    drop(fakes);
}

#[tokio::test]
async fn concurrent_requests_on_one_connection_each_get_their_own_answer() {
    // Earlier requests stall longer, so the server answers them in reverse order; the
    // first read of one key stalls past the attempt timeout, and its late answer must not
    // reach anyone.
    let stalled_once = std::sync::atomic::AtomicBool::new(false);
    let fakes = FakeCluster::start(1, move |call: &Call, _: &[String]| {
        let i: u64 = std::str::from_utf8(&call.key[1..])
            .unwrap()
            .parse()
            .unwrap();
        if call.method == "get" && i == 7 && !stalled_once.swap(true, Ordering::SeqCst) {
            return Reply::Stall(Duration::from_millis(400));
        }
        Reply::Stall(Duration::from_millis((20 - i) * 5))
    })
    .await;
    let client =
        Client::connect(config(fakes.addrs()).with_request_timeout(Duration::from_secs(2)))
            .await
            .unwrap();
    let writers = (0..20u64).map(|i| {
        let c = client.new_session().unwrap();
        async move {
            let key = format!("k{i}");
            let first = c.put(key.clone(), format!("a{i}")).await;
            let second = c.put(key.clone(), format!("b{i}")).await;
            let read = c.get(key).await;
            (i, first, second, read)
        }
    });
    for (i, first, second, read) in bounded(futures::future::join_all(writers)).await {
        assert_eq!(first.unwrap(), None, "k{i} was new");
        assert_eq!(second.unwrap(), Some(Bytes::from(format!("a{i}"))), "k{i}");
        assert_eq!(read.unwrap(), Some(Bytes::from(format!("b{i}"))), "k{i}");
    }
    assert_eq!(fakes.calls_of("put").len(), 40, "no put was retried");
    assert_eq!(
        fakes.calls_of("get").len(),
        21,
        "the stalled get was retried"
    );
}
