//! The standard gRPC health service (docs/design.md §12 "Health"), served on the client port
//! and, for probes that cannot speak TLS, on the plaintext `--health-listen`.
//!
//! - service `""` (readiness): SERVING while this server answers reads: a synced member of
//!   the current view holding a lease. NOT_SERVING otherwise: without state, catching up,
//!   not a member, without a lease.
//! - service `"liveness"`: SERVING while the process runs.
//!
//! A task of its own watches the replica and moves the status when readiness changes. Leases
//! run out with time, not with an event, so it looks every [`POLL`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::info;

use crate::replica::Node;

/// The health service name of the liveness check.
pub const LIVENESS: &str = "liveness";
/// The health service name of the readiness check: the server as a whole.
pub const READINESS: &str = "";

/// How often readiness is looked at: well under a lease, so a probe sees a lost lease
/// within a few tens of milliseconds.
const POLL: Duration = Duration::from_millis(50);

pub use tonic_health::server::health_reporter;

impl Node {
    /// Whether this server is ready: it answers reads now (docs/design.md §4).
    pub fn is_ready(&self) -> bool {
        self.can_read(&self.st())
    }
}

/// Keeps the health statuses in step with the replica until `stop` completes.
pub async fn watch(
    node: Arc<Node>,
    reporter: HealthReporter,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    let mut stop = std::pin::pin!(stop);
    let mut last = None;
    loop {
        let ready = node.is_ready();
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(READINESS, status).await;
            info!(ready, "readiness changed");
            last = Some(ready);
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    // Shutting down: neither ready nor, for long, alive.
    reporter
        .set_service_status(READINESS, ServingStatus::NotServing)
        .await;
}

/// Serves only the health service, in the clear, on `listener` until `stop` completes.
pub async fn serve_plain<S>(
    listener: TcpListener,
    service: tonic_health::pb::health_server::HealthServer<S>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error>
where
    S: tonic_health::pb::health_server::Health,
{
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving the gRPC health service in the clear");
    }
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop,
        )
        .await
}
