//! Prometheus metrics (docs/design.md §12 "Metrics"), served over HTTP at `/metrics` on
//! `--metrics-listen`.
//!
//! The request path pays only atomics: every counter and histogram a request touches is a
//! handle resolved once, when the server starts ([`Metrics::op`]), never looked up by label
//! per request. What describes the replica (role, epoch, lsns, members' lag) is read from
//! `Status` when a scrape comes, so it costs nothing between scrapes.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::replica::{Node, ReplicaStatus};

/// The client operations timed one by one; a pipelined operation counts as its own kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Delete,
    Cas,
    Scan,
    DeleteRange,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::Get,
        Op::Put,
        Op::Delete,
        Op::Cas,
        Op::Scan,
        Op::DeleteRange,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Cas => "cas",
            Op::Scan => "scan",
            Op::DeleteRange => "delete_range",
        }
    }
}

/// Roles `Status` names; `replikv_role` has one series per role, 1 for the current one.
const ROLES: [&str; 5] = ["primary", "backup", "joining", "recovering", "amnesiac"];

/// Latency buckets, 50 µs to 10 s.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(50e-6, 2.0, 18).expect("valid buckets")
}

/// One operation's handles.
struct OpMetrics {
    requests: IntCounter,
    seconds: Histogram,
}

/// Every metric of one server. Request counters and histograms are updated where things
/// happen; the replica's gauges at scrape time ([`Metrics::refresh`]).
pub struct Metrics {
    registry: Registry,
    ops: Vec<OpMetrics>,
    pub view_changes: IntCounter,
    pub transfer_sent_bytes: IntCounter,
    pub transfer_received_bytes: IntCounter,
    pub snapshots: IntCounter,
    role: IntGaugeVec,
    serving: IntGauge,
    epoch: IntGauge,
    applied: IntGauge,
    committed: IntGauge,
    member_acked: IntGaugeVec,
    member_lag: IntGaugeVec,
    lease_ms: IntGauge,
    writes: IntGauge,
    flushes: IntGauge,
}

/// A request being timed: recorded when dropped, so every way out of a handler counts.
pub struct Timer<'a> {
    op: &'a OpMetrics,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.op.requests.inc();
        self.op.seconds.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("replikv".into()), None).expect("valid registry prefix");
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Client operations served, by operation"),
            &["op"],
        )
        .expect("valid metric");
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "request_seconds",
                "Time to serve a client operation, by operation",
            )
            .buckets(latency_buckets()),
            &["op"],
        )
        .expect("valid metric");
        let ops = Op::ALL
            .iter()
            .map(|op| OpMetrics {
                requests: requests.with_label_values(&[op.name()]),
                seconds: seconds.with_label_values(&[op.name()]),
            })
            .collect();
        let counter = |name: &str, help: &str| {
            IntCounter::with_opts(Opts::new(name, help)).expect("valid metric")
        };
        let gauge = |name: &str, help: &str| {
            IntGauge::with_opts(Opts::new(name, help)).expect("valid metric")
        };
        let gauge_vec = |name: &str, help: &str, label: &str| {
            IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric")
        };
        let m = Metrics {
            ops,
            view_changes: counter(
                "view_changes_total",
                "Views this server was installed in (as primary or backup)",
            ),
            transfer_sent_bytes: counter(
                "transfer_sent_bytes_total",
                "Key and value bytes this server sent in state transfers",
            ),
            transfer_received_bytes: counter(
                "transfer_received_bytes_total",
                "Key and value bytes this server received in state transfers",
            ),
            snapshots: counter(
                "snapshots_total",
                "Snapshots this server produced (streamed or backed up)",
            ),
            role: gauge_vec("role", "1 for this server's current role", "role"),
            serving: gauge(
                "serving",
                "1 while this server answers reads: a synced member holding a lease",
            ),
            epoch: gauge("epoch", "Epoch of this server's view"),
            applied: gauge("applied_lsn", "Highest lsn this server applied"),
            committed: gauge("committed_lsn", "Highest lsn this server knows committed"),
            member_acked: gauge_vec(
                "member_acked_lsn",
                "On the primary: highest lsn each member acknowledged",
                "rank",
            ),
            member_lag: gauge_vec(
                "member_lag",
                "On the primary: writes each member has not acknowledged yet",
                "rank",
            ),
            lease_ms: gauge("lease_remaining_ms", "What is left of this server's lease"),
            writes: gauge("writes", "Records applied since start"),
            flushes: gauge("flushes", "Log flushes since start"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(requests),
            Box::new(seconds),
            Box::new(m.view_changes.clone()),
            Box::new(m.transfer_sent_bytes.clone()),
            Box::new(m.transfer_received_bytes.clone()),
            Box::new(m.snapshots.clone()),
            Box::new(m.role.clone()),
            Box::new(m.serving.clone()),
            Box::new(m.epoch.clone()),
            Box::new(m.applied.clone()),
            Box::new(m.committed.clone()),
            Box::new(m.member_acked.clone()),
            Box::new(m.member_lag.clone()),
            Box::new(m.lease_ms.clone()),
            Box::new(m.writes.clone()),
            Box::new(m.flushes.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// Adds collectors owned elsewhere (the store's flush metrics) to the registry.
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            warn!(error = %e, "metric not registered");
        }
    }

    /// Starts timing one operation; it is counted and observed when the timer drops.
    pub fn op(&self, op: Op) -> Timer<'_> {
        Timer {
            op: &self.ops[op as usize],
            start: Instant::now(),
        }
    }

    /// Sets the replica's gauges from its status.
    pub fn refresh(&self, s: &ReplicaStatus) {
        for role in ROLES {
            self.role
                .with_label_values(&[role])
                .set(i64::from(s.role == role));
        }
        self.serving.set(i64::from(s.serving));
        self.epoch.set(s.view.epoch as i64);
        self.applied.set(s.applied as i64);
        self.committed.set(s.committed as i64);
        self.lease_ms
            .set(s.lease.map_or(0, |l| l.as_millis() as i64));
        self.writes.set(s.writes as i64);
        self.flushes.set(s.flushes as i64);
        self.member_acked.reset();
        self.member_lag.reset();
        if s.role == "primary" {
            for p in s.peers.iter().filter(|p| p.member) {
                let rank = p.rank.to_string();
                self.member_acked
                    .with_label_values(&[rank.as_str()])
                    .set(p.acked as i64);
                self.member_lag
                    .with_label_values(&[rank.as_str()])
                    .set(s.applied.saturating_sub(p.acked) as i64);
            }
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            warn!(error = %e, "cannot encode metrics");
        }
        buf
    }
}

/// How long one metrics connection may stay open.
const CONNECTION_LIMIT: Duration = Duration::from_secs(30);

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving Prometheus metrics at /metrics");
    }
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let node = node.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(answer(&node, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_LIMIT, conn).await;
        });
    }
}

fn answer(node: &Node, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found: metrics are at /metrics\n".to_vec(),
        );
    }
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"only GET\n".to_vec(),
        );
    }
    node.metrics.refresh(&node.status());
    reply(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        node.metrics.render(),
    )
}

/// The store's flush metrics: owned by the store, registered with [`Metrics`].
pub struct FlushMetrics {
    pub fsync_seconds: Histogram,
    pub writes_per_flush: Histogram,
    /// The store's write count at the previous flush.
    flushed_writes: std::sync::atomic::AtomicU64,
}

impl Default for FlushMetrics {
    fn default() -> Self {
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric")
        };
        FlushMetrics {
            fsync_seconds: histogram(
                "fsync_seconds",
                "Time to make the write-ahead log durable (fdatasync)",
                latency_buckets(),
            ),
            writes_per_flush: histogram(
                "writes_per_flush",
                "Records made durable by one flush (the group-commit factor)",
                prometheus::exponential_buckets(1.0, 2.0, 14).expect("valid buckets"),
            ),
            flushed_writes: Default::default(),
        }
    }
}

impl FlushMetrics {
    /// Records one flush that took `took`, with the store's write count `writes` after it.
    pub fn flushed(&self, took: Duration, writes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.fsync_seconds.observe(took.as_secs_f64());
        let before = self.flushed_writes.swap(writes, Relaxed);
        if writes > before {
            self.writes_per_flush.observe((writes - before) as f64);
        }
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.fsync_seconds.clone()),
            Box::new(self.writes_per_flush.clone()),
        ]
    }
}
