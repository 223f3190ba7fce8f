//! TLS for both planes (docs/security.md, docs/design.md §10 "Peer plane"): this server's
//! certificate and the cluster CA, the tonic TLS settings built from them, and the identity
//! a verified peer certificate names.
//!
//! A node certificate carries the URI SAN `replikv://<cluster>/rank/<r>`. rustls checks that
//! a peer's certificate chains to the cluster CA; this module then reads which cluster and
//! rank it names. A peer's rank is taken from there, never from a request field.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::types::Rank;

/// Where this server's TLS material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM): peers and client certificates must chain to it.
    pub ca: PathBuf,
    /// This server's certificate (PEM), naming its cluster and rank.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `replikv cert` writes for rank `rank` into `dir`.
    pub fn in_dir(dir: &Path, rank: Rank) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("node-{rank}.pem")),
            key: dir.join(format!("node-{rank}-key.pem")),
        }
    }
}

/// What a verified certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertName {
    /// A server of `cluster` with rank `rank`.
    Node { cluster: String, rank: Rank },
    /// A client of `cluster`.
    Client { cluster: String, name: String },
}

/// Parses a `replikv://` URI SAN.
pub fn parse_uri(uri: &str) -> Option<CertName> {
    let rest = uri.strip_prefix("replikv://")?;
    let mut parts = rest.split('/');
    let (cluster, kind, id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || cluster.is_empty() {
        return None;
    }
    let cluster = cluster.to_string();
    match kind {
        "rank" => Some(CertName::Node {
            cluster,
            rank: id.parse().ok()?,
        }),
        "client" if !id.is_empty() => Some(CertName::Client {
            cluster,
            name: id.to_string(),
        }),
        _ => None,
    }
}

/// The `replikv://` name of a DER certificate, if it has exactly one.
pub fn cert_name(der: &[u8]) -> Option<CertName> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut names = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => parse_uri(u),
        _ => None,
    });
    let first = names.next()?;
    names.next().is_none().then_some(first)
}

/// This server's TLS material, loaded and checked at start-up.
#[derive(Clone, Debug)]
pub struct NodeTls {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    /// The cluster name this server's certificate names: peers must name the same.
    pub cluster: String,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

impl NodeTls {
    /// Loads the files and checks that the certificate names rank `rank`.
    pub fn load(files: &TlsFiles, rank: Rank) -> Result<NodeTls, String> {
        let ca = read(&files.ca, "CA certificate")?;
        let cert = read(&files.cert, "certificate")?;
        let key = read(&files.key, "key")?;
        let der = x509_parser::pem::parse_x509_pem(&cert)
            .map_err(|e| format!("{}: not a PEM certificate: {e}", files.cert.display()))?
            .1
            .contents;
        let cluster = match cert_name(&der) {
            Some(CertName::Node { cluster, rank: r }) if r == rank => cluster,
            Some(CertName::Node { rank: r, .. }) => {
                return Err(format!(
                    "{} is rank {r}'s certificate, and this server is rank {rank}",
                    files.cert.display()
                ))
            }
            _ => {
                return Err(format!(
                    "{} names no replikv node (URI SAN replikv://<cluster>/rank/<r>); \
                     make node certificates with `replikv cert node`",
                    files.cert.display()
                ))
            }
        };
        Ok(NodeTls {
            ca,
            cert,
            key,
            cluster,
        })
    }

    /// The peer listener: a client certificate from the cluster CA is required.
    pub fn peer_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// The client listener: a client certificate is optional (and, when given, must chain
    /// to the cluster CA).
    pub fn client_server(&self) -> ServerTlsConfig {
        self.peer_server().client_auth_optional(true)
    }

    /// Dialling a peer at `host`: the peer's certificate must chain to the cluster CA and
    /// name `host`; this server presents its own.
    pub fn peer_client(&self, host: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(host.trim_start_matches('[').trim_end_matches(']'))
    }
}

/// The rank of the peer that sent `req`, from its verified certificate (docs/design.md §10
/// "Peer plane"). `Ok(None)` on a server without TLS (`--insecure`), which trusts its
/// network; otherwise a certificate that names no server of `cluster` is refused.
pub fn peer_rank<T>(req: &Request<T>, tls: Option<&NodeTls>) -> Result<Option<Rank>, Status> {
    let Some(tls) = tls else {
        return Ok(None);
    };
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("peer calls need a node certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("peer calls need a node certificate"))?;
    match cert_name(leaf.as_ref()) {
        Some(CertName::Node { cluster, rank }) if cluster == tls.cluster => Ok(Some(rank)),
        Some(CertName::Node { cluster, .. }) => Err(Status::permission_denied(format!(
            "certificate of cluster {cluster:?}; this server belongs to {:?}",
            tls.cluster
        ))),
        _ => Err(Status::permission_denied(
            "the certificate names no server of this cluster",
        )),
    }
}

/// Refuses a request whose claimed sender (`claimed`, a rank in the request) is not the rank
/// its certificate names (`verified`).
pub fn check_claim(verified: Option<Rank>, claimed: Rank, field: &str) -> Result<(), Status> {
    match verified {
        Some(v) if v != claimed => Err(Status::permission_denied(format!(
            "the request names {field} {claimed}, and the sender's certificate is rank {v}'s"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_nodes_and_clients() {
        assert_eq!(
            parse_uri("replikv://alpha/rank/2"),
            Some(CertName::Node {
                cluster: "alpha".into(),
                rank: 2
            })
        );
        assert_eq!(
            parse_uri("replikv://alpha/client/bob"),
            Some(CertName::Client {
                cluster: "alpha".into(),
                name: "bob".into()
            })
        );
        for bad in [
            "replikv://alpha/rank/x",
            "replikv:///rank/1",
            "replikv://a/rank/1/2",
            "https://a/rank/1",
            "replikv://a/client/",
        ] {
            assert_eq!(parse_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_claim_must_match_the_certificate() {
        assert!(check_claim(None, 3, "proposer").is_ok());
        assert!(check_claim(Some(3), 3, "proposer").is_ok());
        let e = check_claim(Some(1), 2, "proposer").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
}
