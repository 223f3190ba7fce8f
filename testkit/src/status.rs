//! The status probe: the public `Status` RPC, bounded by a deadline, as a client would
//! see it. A server that does not answer in time (dead, paused, cut off) is `None`, never
//! an error to handle: for a watcher a silent server is an observation like any other.

use std::time::Duration;

use replikv_proto::kv::kv_client::KvClient;
use replikv_proto::kv::{StatusRequest, StatusResponse};
use tonic::transport::{Channel, Endpoint};

/// One `Status` RPC to `addr` on a fresh connection; `None` unless it answered within
/// `deadline`, connection included.
pub async fn probe(addr: &str, deadline: Duration) -> Option<StatusResponse> {
    probe_tls(addr, None, deadline).await
}

/// [`probe`] over TLS, trusting the CA certificate `ca`, when `ca` is given.
pub async fn probe_tls(
    addr: &str,
    ca: Option<&std::path::Path>,
    deadline: Duration,
) -> Option<StatusResponse> {
    let call = async {
        let endpoint = match ca {
            None => Endpoint::from_shared(format!("http://{addr}")).ok()?,
            Some(ca) => {
                let pem = std::fs::read(ca).ok()?;
                Endpoint::from_shared(format!("https://{addr}"))
                    .ok()?
                    .tls_config(
                        tonic::transport::ClientTlsConfig::new()
                            .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                    )
                    .ok()?
            }
        };
        let channel = endpoint
            .connect_timeout(deadline)
            .timeout(deadline)
            .connect()
            .await
            .ok()?;
        let response = KvClient::new(channel).status(StatusRequest {}).await.ok()?;
        Some(response.into_inner())
    };
    tokio::time::timeout(deadline, call).await.ok().flatten()
}

/// The view epoch a status reports (0 before the server has a view).
pub fn epoch(status: &StatusResponse) -> u64 {
    status.view.as_ref().map_or(0, |v| v.epoch)
}

/// Probes a fixed set of servers again and again over one lazily connected channel each,
/// so that a watcher polling every 100 ms does not open a connection per probe.
#[derive(Clone)]
pub struct StatusProbe {
    clients: Vec<Option<KvClient<Channel>>>,
    deadline: Duration,
}

impl StatusProbe {
    /// One channel per address; no I/O yet. A malformed address is a server that never
    /// answers.
    pub fn new(addrs: &[String], deadline: Duration) -> Self {
        let clients = addrs
            .iter()
            .map(|addr| {
                Endpoint::from_shared(format!("http://{addr}"))
                    .ok()
                    .map(|e| KvClient::new(e.connect_timeout(deadline).connect_lazy()))
            })
            .collect();
        StatusProbe { clients, deadline }
    }

    /// Every server's `Status`, probed concurrently, by rank.
    pub async fn all(&self) -> Vec<Option<StatusResponse>> {
        let deadline = self.deadline;
        let probes = self.clients.iter().map(|client| async move {
            let mut client = client.clone()?;
            let reply = tokio::time::timeout(deadline, client.status(StatusRequest {})).await;
            reply.ok()?.ok().map(tonic::Response::into_inner)
        });
        futures::future::join_all(probes).await
    }
}
