//! Fixtures of the integration tests: a bounded, serial runner, clusters of
//! real server processes, clients bound to one server, a background writer
//! that records what was acknowledged and when, and checks that every
//! acknowledged write can be read back.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use replikv_client::{Client, Error, Route};
use replikv_proto::kv::StatusResponse;
use replikv_proto::peer::FaultRequest;

use crate::cluster::{ClusterOptions, LocalCluster, ServerCommand};
use crate::fault::FaultClient;
pub use crate::status::epoch;

/// Upper bound on any one test, cluster start-up included.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a cluster may take to elect a primary after a cold start or a
/// total restart.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of one client request, retries included: long enough to ride out
/// a view change.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Cluster tests in one binary run one at a time: the timing assertions
/// (failover within 2 s, no write stall over 1.5 s) are about the servers,
/// not about several clusters fighting over two cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one test body on its own runtime, alone, bounded by [`TEST_TIMEOUT`].
///
/// The timeout fires while the body is still alive, so the panic unwinds
/// through the body and its [`LocalCluster`] reports the server logs.
pub fn run<F: Future<Output = ()>>(body: F) {
    run_for(TEST_TIMEOUT, body)
}

/// [`run`] with a bound of its own, for a test that moves much more data than most.
pub fn run_for<F: Future<Output = ()>>(limit: Duration, body: F) {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build tokio runtime");
    runtime.block_on(async move {
        let body = std::pin::pin!(body);
        tokio::select! {
            () = body => {}
            () = tokio::time::sleep(limit) => {
                panic!("test did not finish within {limit:?}")
            }
        }
    });
}

/// The server binary: the one cargo built next to the test binary (built on demand when
/// the test's package does not build it).
pub fn server_command() -> ServerCommand {
    ServerCommand::locate_or_build().unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `servers` servers with `extra_args` added to their flags.
pub fn start(servers: usize, extra_args: &[&str]) -> LocalCluster {
    LocalCluster::start(ClusterOptions {
        servers,
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        command: Some(server_command()),
        ..ClusterOptions::default()
    })
    .expect("start the cluster")
}

/// Starts a cluster and waits until every server is a serving member of one
/// view; returns the cluster and the primary's rank.
pub async fn start_healthy(servers: usize, extra_args: &[&str]) -> (LocalCluster, usize) {
    wait_healthy(start(servers, extra_args)).await
}

/// [`start_healthy`] with the options given.
pub async fn start_healthy_with(options: ClusterOptions) -> (LocalCluster, usize) {
    let cluster = LocalCluster::start(ClusterOptions {
        command: Some(server_command()),
        ..options
    })
    .expect("start the cluster");
    wait_healthy(cluster).await
}

/// Waits until every server of `cluster` is a serving member of one view; returns the
/// cluster and the primary's rank.
async fn wait_healthy(cluster: LocalCluster) -> (LocalCluster, usize) {
    cluster
        .wait_converged(BOOT_TIMEOUT)
        .await
        .expect("every server serves after start");
    let (primary, _) = cluster
        .wait_for_primary(BOOT_TIMEOUT)
        .await
        .expect("a primary after start");
    (cluster, primary)
}

/// Starts 3 servers with the fault-injection admin service and waits until they serve;
/// returns the cluster, the primary's rank and its status.
pub async fn start_with_faults(extra_args: &[&str]) -> (LocalCluster, usize, StatusResponse) {
    let cluster = LocalCluster::start(ClusterOptions {
        servers: 3,
        fault_injection: true,
        extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        command: Some(server_command()),
        ..ClusterOptions::default()
    })
    .expect("start the cluster");
    let (primary, status) = cluster
        .wait_ready(BOOT_TIMEOUT)
        .await
        .expect("cluster serves");
    (cluster, primary, status)
}

/// Sends one fault-injection request to `rank`, which must accept it.
pub async fn admin(cluster: &LocalCluster, rank: usize, req: FaultRequest) {
    FaultClient::with_deadline(cluster, REQUEST_TIMEOUT)
        .expect("server addresses are valid")
        .send(rank, req)
        .await
        .unwrap_or_else(|e| panic!("fault request accepted: {e}"));
}

/// A client of the whole cluster (random routing, as the classic client).
pub async fn client(cluster: &LocalCluster) -> Client {
    Client::connect(
        cluster
            .client_config()
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_route(Route::Random),
    )
    .await
    .expect("client config is valid")
}

/// A client that sends writes to the primary first, having learned which
/// server that is. Its writes stall only as long as the primary cannot
/// commit, which is what a test of the servers' failover should measure; a
/// randomly routed request that lands on a paused server waits out the
/// client's attempt timeout instead.
pub async fn primary_routed_client(cluster: &LocalCluster) -> Client {
    let client = Client::connect(
        cluster
            .client_config()
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_route(Route::Primary),
    )
    .await
    .expect("client config is valid");
    // A Status answer from the primary is how the client learns of it.
    let replies = client.status_all().await;
    assert!(
        replies
            .iter()
            .any(|(_, r)| r.as_ref().is_ok_and(|s| s.role == "primary")),
        "no server says it is the primary: {replies:?}"
    );
    client
}

/// A client that only ever talks to `rank`: what it reads is that server's state.
pub async fn pinned(cluster: &LocalCluster, rank: usize) -> Client {
    Client::connect(
        cluster
            .client_config_for(vec![cluster.addr(rank)])
            .with_request_timeout(REQUEST_TIMEOUT),
    )
    .await
    .expect("client config is valid")
}

/// Status of `rank`, which must answer.
pub async fn status(cluster: &LocalCluster, rank: usize) -> StatusResponse {
    cluster
        .status(rank)
        .await
        .unwrap_or_else(|| panic!("server {rank} does not answer Status"))
}

pub fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// What every server must return for each key: `Some(value)`, or `None` for
/// a key that is absent (deleted).
pub type Expected = BTreeMap<String, Option<String>>;

/// Reads every key of `expected` through `client` and fails the test with the
/// first mismatches if any value differs. Reads run 16 at a time.
pub async fn assert_reads(client: &Client, expected: &Expected, whose: &str) {
    let mismatches: Vec<String> = futures::stream::iter(expected.iter())
        .map(|(key, want)| async move {
            let got = client.get(bytes(key)).await;
            let want_bytes = want.as_deref().map(bytes);
            match got {
                Ok(got) if got == want_bytes => None,
                other => Some(format!("{key}: expected {want:?}, got {other:?}")),
            }
        })
        .buffer_unordered(16)
        .filter_map(|m| async move { m })
        .collect()
        .await;
    assert!(
        mismatches.is_empty(),
        "{whose}: {} of {} keys read wrong, e.g. {:?}",
        mismatches.len(),
        expected.len(),
        &mismatches[..mismatches.len().min(5)]
    );
}

/// [`assert_reads`] through a client pinned to each of `ranks`.
pub async fn assert_every_server_reads(
    cluster: &LocalCluster,
    ranks: impl IntoIterator<Item = usize>,
    expected: &Expected,
) {
    for rank in ranks {
        let client = pinned(cluster, rank).await;
        assert_reads(&client, expected, &format!("server {rank}")).await;
    }
}

/// Puts `count` fresh keys `<prefix>-<i>` through `client`; each must be
/// acknowledged with no old value. Records them in `expected`.
pub async fn put_fresh(client: &Client, prefix: &str, count: usize, expected: &mut Expected) {
    for i in 0..count {
        let key = format!("{prefix}-{i:04}");
        let value = format!("{prefix}-value-{i}");
        let old = client
            .put(bytes(&key), bytes(&value))
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
        assert_eq!(old, None, "{key} is new, so it replaced nothing");
        expected.insert(key, Some(value));
    }
}

/// One acknowledged write of a [`Writer`].
#[derive(Clone, Debug)]
pub struct Acked {
    pub at: Instant,
    pub key: String,
    pub value: String,
}

/// What a [`Writer`] saw.
#[derive(Debug, Default)]
pub struct WriteLog {
    /// Acknowledged writes, in order.
    pub acked: Vec<Acked>,
    /// Writes that failed with an unknown outcome (they may or may not exist), with the
    /// error.
    pub unknown: Vec<(String, Error)>,
    /// Writes that definitely failed.
    pub failed: Vec<(String, Error)>,
    /// Keys whose put returned an old value although the key was new: a write
    /// applied twice, or state that appeared from nowhere.
    pub anomalies: Vec<(String, Bytes)>,
}

impl WriteLog {
    /// The longest stretch of `[from, to]` without an acknowledged write
    /// (counting from `from` to the first ack after it, and from the last
    /// ack to `to`).
    pub fn max_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut prev = from;
        let mut longest = Duration::ZERO;
        for ack in self.acked.iter().filter(|a| a.at > from && a.at <= to) {
            longest = longest.max(ack.at - prev);
            prev = ack.at;
        }
        longest.max(to.saturating_duration_since(prev))
    }

    /// Acknowledged writes made within `[from, to]`.
    pub fn acked_between(&self, from: Instant, to: Instant) -> Expected {
        self.acked
            .iter()
            .filter(|a| a.at >= from && a.at <= to)
            .map(|a| (a.key.clone(), Some(a.value.clone())))
            .collect()
    }

    pub fn all_acked(&self) -> Expected {
        self.acked
            .iter()
            .map(|a| (a.key.clone(), Some(a.value.clone())))
            .collect()
    }

    /// Fails the test if any write was seen to apply twice.
    pub fn assert_no_anomalies(&self) {
        assert!(
            self.anomalies.is_empty(),
            "fresh keys returned old values (a write applied twice?): {:?}",
            &self.anomalies[..self.anomalies.len().min(5)]
        );
    }

    /// Counts, and the last error of each kind (what a failed test needs to be read).
    pub fn summary(&self) -> String {
        let last = |errors: &[(String, Error)]| {
            errors
                .last()
                .map(|(key, e)| format!(" (last: {key}: {e})"))
                .unwrap_or_default()
        };
        format!(
            "{} acked, {} unknown{}, {} failed{}",
            self.acked.len(),
            self.unknown.len(),
            last(&self.unknown),
            self.failed.len(),
            last(&self.failed)
        )
    }
}

/// A task that puts fresh keys one after another until stopped, recording
/// when each was acknowledged: the tests measure availability from the gaps.
pub struct Writer {
    stop: Arc<AtomicBool>,
    /// When the newest acknowledgement came.
    last_ack: Arc<Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<WriteLog>,
}

impl Writer {
    pub fn start(client: Client, prefix: &str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let last_ack = Arc::new(Mutex::new(None));
        let prefix = prefix.to_string();
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            let last_ack = Arc::clone(&last_ack);
            async move {
                let mut log = WriteLog::default();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("{prefix}-{i:06}");
                    let value = format!("{prefix}-value-{i}");
                    i += 1;
                    match client.put(bytes(&key), bytes(&value)).await {
                        Ok(None) => {
                            let at = Instant::now();
                            *last_ack.lock().unwrap_or_else(PoisonError::into_inner) = Some(at);
                            log.acked.push(Acked { at, key, value });
                        }
                        Ok(Some(old)) => log.anomalies.push((key, old)),
                        Err(e) if e.is_outcome_unknown() => log.unknown.push((key, e)),
                        Err(e) => log.failed.push((key, e)),
                    }
                }
                log
            }
        });
        Writer {
            stop,
            last_ack,
            task,
        }
    }

    /// Waits until a write is acknowledged after `since`, for at most `timeout`; whether
    /// one was. A fault can leave one request retrying to its deadline after the cluster
    /// serves again: this waits for the writer to be seen going on, not a fixed time.
    pub async fn wait_for_ack_after(&self, since: Instant, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let last = *self.last_ack.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| at > since) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops after the write in flight and returns the log.
    pub async fn stop(self) -> WriteLog {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer task panicked")
    }
}

/// Polls `rank` until it reports `serving`, or fails after `timeout`.
pub async fn wait_serving(cluster: &LocalCluster, rank: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = cluster.status(rank).await;
        if status.as_ref().is_some_and(|s| s.serving) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "server {rank} does not serve within {timeout:?}; last status: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
