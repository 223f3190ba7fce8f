//! Operations on a cluster as a whole (docs/design.md §12): saving a snapshot through the
//! `Backup` service, checking a snapshot file, and the gRPC health check.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use replikv_proto::ops::backup_client::BackupClient;
use replikv_proto::ops::SnapshotRequest;
use replikv_proto::snapshot::{self as file, Header};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::config::TlsSettings;
use crate::Error;

/// How to reach the servers: addresses and TLS.
pub struct Servers {
    pub addrs: Vec<String>,
    tls: Option<ClientTlsConfig>,
    connect_timeout: Duration,
    credentials: crate::config::AddCredentials,
}

impl Servers {
    /// `addrs` as `host:port`; an address written `http://host:port` is spoken to in the
    /// clear even when `tls` is given (e.g. a server's `--health-listen`).
    pub fn new(
        addrs: Vec<String>,
        tls: Option<&TlsSettings>,
        connect_timeout: Duration,
        credentials: Option<&crate::config::Credentials>,
    ) -> Result<Servers, Error> {
        if addrs.is_empty() {
            return Err(Error::Config(
                "no servers: give --servers or set REPLIKV_SERVERS".into(),
            ));
        }
        let addrs = crate::config::parse_servers(&addrs)?
            .into_iter()
            .zip(
                addrs
                    .iter()
                    .flat_map(|a| a.split(','))
                    .filter(|a| !a.trim().is_empty()),
            )
            .map(|(addr, given)| match given.trim().starts_with("http://") {
                true => format!("http://{addr}"),
                false => addr,
            })
            .collect();
        Ok(Servers {
            addrs,
            tls: tls.map(|t| t.load()).transpose()?,
            connect_timeout,
            credentials: crate::config::AddCredentials(
                credentials.map(|c| c.headers()).transpose()?,
            ),
        })
    }

    fn channel(&self, addr: &str) -> Result<Channel, Error> {
        let (plain, host) = match addr.strip_prefix("http://") {
            Some(host) => (true, host),
            None => (false, addr),
        };
        let tls = self.tls.as_ref().filter(|_| !plain);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}"))
            .map_err(|e| Error::Config(format!("bad server address {addr:?}: {e}")))?
            .connect_timeout(self.connect_timeout);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Error::Config(format!("TLS settings: {e}")))?;
        }
        Ok(endpoint.connect_lazy())
    }
}

/// A server's answers to the two health checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Service `""`: SERVING when the server answers reads.
    pub ready: String,
    /// Service `"liveness"`.
    pub live: String,
}

impl Health {
    pub fn is_ready(&self) -> bool {
        self.ready == "SERVING"
    }
}

/// Asks `addr` for its readiness and liveness, each within `timeout`.
pub async fn health(servers: &Servers, addr: &str, timeout: Duration) -> Result<Health, Error> {
    let mut client = HealthClient::new(servers.channel(addr)?);
    let ready = check_service(&mut client, addr, "", timeout).await?;
    let live = check_service(&mut client, addr, "liveness", timeout).await?;
    Ok(Health { ready, live })
}

/// One health check: the status's name (`SERVING`, `NOT_SERVING`, ...).
async fn check_service(
    client: &mut HealthClient<Channel>,
    addr: &str,
    service: &str,
    timeout: Duration,
) -> Result<String, Error> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: service.into(),
    });
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.check(req)).await {
        Ok(Ok(r)) => Ok(ServingStatus::try_from(r.into_inner().status)
            .unwrap_or(ServingStatus::Unknown)
            .as_str_name()
            .to_string()),
        Ok(Err(s)) => Err(Error::Unavailable(format!("{addr}: {}", s.message()))),
        Err(_) => Err(Error::Unavailable(format!(
            "{addr}: no answer within {timeout:?}"
        ))),
    }
}

/// Saves a snapshot of the cluster into `path`: asks each server in turn (a server that does
/// not answer reads refuses) until one streams a whole snapshot, which is checked before it
/// replaces `path`. Returns its header and number of keys.
pub async fn save(
    servers: &Servers,
    path: &Path,
    timeout: Duration,
) -> Result<(Header, u64), Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let partial = partial_path(path);
    let mut errors = Vec::new();
    loop {
        for addr in &servers.addrs {
            let attempt = tokio::time::timeout_at(deadline, save_from(servers, addr, &partial));
            match attempt.await {
                Ok(Ok(())) => {
                    let checked = file::verify(&partial).map_err(|e| {
                        Error::Unavailable(format!("{addr} sent a bad snapshot: {e}"))
                    });
                    match checked {
                        Ok(found) => {
                            std::fs::rename(&partial, path).map_err(|e| {
                                Error::Config(format!("cannot write {}: {e}", path.display()))
                            })?;
                            return Ok(found);
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                Ok(Err(
                    e @ (Error::Config(_) | Error::Unauthenticated(_) | Error::PermissionDenied(_)),
                )) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(_) => errors.push(format!("{addr}: out of time")),
            }
            let _ = std::fs::remove_file(&partial);
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "no server produced a snapshot within {timeout:?}: {}",
                    errors.join("; ")
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where a snapshot is written until it is whole and checked.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

async fn save_from(servers: &Servers, addr: &str, partial: &Path) -> Result<(), Error> {
    let mut client =
        BackupClient::with_interceptor(servers.channel(addr)?, servers.credentials.clone())
            .max_decoding_message_size(replikv_proto::MAX_MESSAGE_BYTES);
    let unavailable = |s: tonic::Status| crate::client::one_attempt_error(addr, &s);
    let mut stream = client
        .snapshot(SnapshotRequest {})
        .await
        .map_err(unavailable)?
        .into_inner();
    let f = std::fs::File::create(partial)
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", partial.display())))?;
    let mut w = std::io::BufWriter::new(f);
    let write_err =
        |e: std::io::Error| Error::Config(format!("cannot write {}: {e}", partial.display()));
    while let Some(chunk) = stream.message().await.map_err(unavailable)? {
        w.write_all(&chunk.data).map_err(write_err)?;
    }
    let f = w.into_inner().map_err(|e| write_err(e.into_error()))?;
    f.sync_all().map_err(write_err)
}

/// Checks a snapshot file without any server: its header and number of keys.
pub fn check(path: &Path) -> Result<(Header, u64), Error> {
    file::verify(path).map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
}

/// One line describing a snapshot.
pub fn describe(header: &Header, keys: u64) -> String {
    format!(
        "keys {keys} lsn {} epoch {} cluster {} rank {} created_unix_ms {}",
        header.lsn, header.epoch, header.cluster, header.rank, header.created_unix_ms
    )
}
