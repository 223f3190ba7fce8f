//! `--join` (docs/design.md §11): a server added with `replikv member add` learns the cluster's
//! configuration from any running server's client port (`Members.List`), so it needs no
//! `--peers`. What it learns is a seed: it then finds the cluster id and the newest view by
//! Discover, catches up by state transfer and joins, amnesiac until then (§10).

use std::time::Duration;

use replikv_proto::kv::members_client::MembersClient;
use replikv_proto::kv::MemberListRequest;
use tokio::time::Instant;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::warn;

use crate::config::Opt;
use crate::types::Configuration;

/// How long a starting server waits for the `--join` address to answer.
const JOIN_WAIT: Duration = Duration::from_secs(60);
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The configuration the server at client address `addr` holds, asked again every half
/// second until it answers or [`JOIN_WAIT`] has passed. With TLS (`--tls-dir`, and the
/// client port not in the clear) the server's certificate must chain to the cluster CA.
pub async fn configuration(opt: &Opt, addr: &str) -> Result<Configuration, String> {
    let ca_path = opt
        .tls_ca
        .clone()
        .or_else(|| opt.tls_dir.as_ref().map(|d| d.join("ca.pem")));
    let ca = match ca_path {
        Some(p) if !opt.no_client_tls => {
            Some(std::fs::read(&p).map_err(|e| format!("cannot read CA {}: {e}", p.display()))?)
        }
        _ => None,
    };
    let deadline = Instant::now() + JOIN_WAIT;
    loop {
        match fetch(addr, ca.as_deref()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                warn!(join = addr, error = %e, "no configuration from the join address yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("--join {addr}: {e}")),
        }
    }
}

async fn fetch(addr: &str, ca: Option<&[u8]>) -> Result<Configuration, String> {
    let scheme = if ca.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("bad address: {e}"))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    if let Some(ca) = ca {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        endpoint = endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name(host.trim_start_matches('[').trim_end_matches(']')),
            )
            .map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let reply = MembersClient::new(channel)
        .list(MemberListRequest {})
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let config = reply
        .view
        .and_then(|v| v.config)
        .ok_or("the server holds no configuration")?;
    crate::convert::configuration_from(&config).ok_or_else(|| "malformed configuration".into())
}
