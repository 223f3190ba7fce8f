//! The status probe: the public `Status` RPC, bounded by a deadline, as a client would
//! see it. A server that does not answer in time (dead, paused, cut off) is `None`, never
//! an error to handle: for a watcher a silent server is an observation like any other.

use std::path::PathBuf;
use std::time::Duration;

use replikv_client::config::Credentials;
use replikv_proto::kv::kv_client::KvClient;
use replikv_proto::kv::{StatusRequest, StatusResponse};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};

/// How a probe reaches a cluster's client port: the CA to trust (TLS when given) and the
/// user to speak for (an admin: `Status` needs one, docs/security.md "Users").
#[derive(Clone, Debug, Default)]
pub struct Access {
    pub ca: Option<PathBuf>,
    pub credentials: Option<Credentials>,
}

impl Access {
    /// A channel to `addr`, connecting lazily, with these settings; `None` if the address
    /// or the CA file is unusable.
    fn endpoint(&self, addr: &str, deadline: Duration) -> Option<Endpoint> {
        let endpoint = match &self.ca {
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
        Some(endpoint.connect_timeout(deadline).timeout(deadline))
    }

    /// A stub of the Kv API on `addr` (connecting lazily) that sends the credentials with
    /// every call; `timeout` bounds each call.
    pub fn stub(&self, addr: &str, timeout: Duration) -> KvStub {
        let endpoint = self
            .endpoint(addr, timeout)
            .unwrap_or_else(|| panic!("cannot reach {addr} with {self:?}"));
        KvClient::with_interceptor(endpoint.connect_lazy(), AsUser::new(&self.credentials))
    }

    /// A `Status` request carrying the credentials.
    fn request(&self) -> tonic::Request<StatusRequest> {
        let mut req = tonic::Request::new(StatusRequest {});
        if let Some(c) = &self.credentials {
            let md = req.metadata_mut();
            if let (Ok(user), Ok(token)) = (
                c.user.parse::<AsciiMetadataValue>(),
                format!("Bearer {}", c.token).parse::<AsciiMetadataValue>(),
            ) {
                md.insert(replikv_proto::USER_HEADER, user);
                md.insert(replikv_proto::AUTHORIZATION_HEADER, token);
            }
        }
        req
    }
}

/// Adds a user's credentials to every call of a stub.
#[derive(Clone, Debug)]
pub struct AsUser(Option<(AsciiMetadataValue, AsciiMetadataValue)>);

impl AsUser {
    pub fn new(credentials: &Option<Credentials>) -> AsUser {
        AsUser(credentials.as_ref().and_then(|c| {
            Some((
                c.user.parse().ok()?,
                format!("Bearer {}", c.token).parse().ok()?,
            ))
        }))
    }
}

impl tonic::service::Interceptor for AsUser {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some((user, token)) = &self.0 {
            let md = req.metadata_mut();
            md.insert(replikv_proto::USER_HEADER, user.clone());
            md.insert(replikv_proto::AUTHORIZATION_HEADER, token.clone());
        }
        Ok(req)
    }
}

/// A raw Kv stub speaking as a user (see [`Access::stub`]).
pub type KvStub = KvClient<tonic::service::interceptor::InterceptedService<Channel, AsUser>>;

/// One `Status` RPC to `addr` on a fresh connection; `None` unless it answered within
/// `deadline`, connection included.
pub async fn probe(addr: &str, deadline: Duration) -> Option<StatusResponse> {
    probe_as(addr, &Access::default(), deadline).await
}

/// [`probe`] over TLS, trusting the CA certificate `ca`, when `ca` is given.
pub async fn probe_tls(
    addr: &str,
    ca: Option<&std::path::Path>,
    deadline: Duration,
) -> Option<StatusResponse> {
    let access = Access {
        ca: ca.map(Into::into),
        credentials: None,
    };
    probe_as(addr, &access, deadline).await
}

/// [`probe`] with `access`'s TLS settings and credentials.
pub async fn probe_as(addr: &str, access: &Access, deadline: Duration) -> Option<StatusResponse> {
    let call = async {
        let channel = access.endpoint(addr, deadline)?.connect().await.ok()?;
        let response = KvClient::new(channel).status(access.request()).await.ok()?;
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
    access: Access,
    deadline: Duration,
}

impl StatusProbe {
    /// One channel per address; no I/O yet. A malformed address is a server that never
    /// answers.
    pub fn new(addrs: &[String], deadline: Duration) -> Self {
        Self::with_access(addrs, Access::default(), deadline)
    }

    /// [`StatusProbe::new`] with `access`'s TLS settings and credentials.
    pub fn with_access(addrs: &[String], access: Access, deadline: Duration) -> Self {
        let clients = addrs
            .iter()
            .map(|addr| {
                access
                    .endpoint(addr, deadline)
                    .map(|e| KvClient::new(e.connect_lazy()))
            })
            .collect();
        StatusProbe {
            clients,
            access,
            deadline,
        }
    }

    /// Every server's `Status`, probed concurrently, by rank.
    pub async fn all(&self) -> Vec<Option<StatusResponse>> {
        let deadline = self.deadline;
        let access = &self.access;
        let probes = self.clients.iter().map(|client| async move {
            let mut client = client.clone()?;
            let reply = tokio::time::timeout(deadline, client.status(access.request())).await;
            reply.ok()?.ok().map(tonic::Response::into_inner)
        });
        futures::future::join_all(probes).await
    }
}
