//! TLS for both planes (docs/security.md, docs/design.md §10 "Peer plane"): this server's
//! certificate and the cluster CA, the tonic TLS settings built from them, and the identity
//! a verified peer certificate names.
//!
//! A node certificate carries the URI SAN `replikv://<cluster>/rank/<r>`. rustls checks that
//! a peer's certificate chains to the cluster CA; this module then reads which cluster and
//! rank it names. A calling peer's rank is taken from there, never from a request field; a
//! dialled peer must present the certificate of the rank dialled ([`PeerVerifier`]).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Certificate, Identity, ServerTlsConfig, Uri};
use tonic::{Request, Status};
use tracing::warn;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::types::Rank;

/// The only application protocol the peer plane speaks (gRPC over HTTP/2).
const ALPN_H2: &[u8] = b"h2";

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

impl fmt::Display for CertName {
    /// The `replikv://` URI the certificate carries.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertName::Node { cluster, rank } => write!(f, "replikv://{cluster}/rank/{rank}"),
            CertName::Client { cluster, name } => write!(f, "replikv://{cluster}/client/{name}"),
        }
    }
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

    /// Dialling peer rank `rank` at `addr` (`host:port`): the peer's certificate must chain to
    /// the cluster CA, name `host` and name rank `rank` of this cluster ([`PeerVerifier`]);
    /// this server presents its own. TCP connects within `connect_timeout`, and the TLS
    /// handshake then completes within `handshake_timeout`.
    pub fn peer_connector(
        &self,
        addr: &str,
        rank: Rank,
        connect_timeout: Duration,
        handshake_timeout: Duration,
    ) -> Result<PeerConnector, String> {
        let verifier = PeerVerifier::new(&self.ca, &self.cluster, rank)?;
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("this server's certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| format!("this server's key: {e}"))?;
        // "Dangerous" only in name: the verifier is rustls' own, with one check more.
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("this server's certificate and key: {e}"))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = ServerName::try_from(host.to_string())
            .map_err(|e| format!("{host} names no host: {e}"))?;
        Ok(PeerConnector {
            tls: TlsConnector::from(Arc::new(config)),
            host,
            connect_timeout,
            handshake_timeout,
        })
    }
}

/// A dialled peer's certificate chains to the cluster CA and names the host, but names
/// another server than the rank dialled.
#[derive(Debug, thiserror::Error)]
#[error("the peer's certificate names {presented}, and {expected} was dialled")]
pub struct WrongPeer {
    pub expected: CertName,
    /// The name the certificate carries, or why it carries none.
    pub presented: String,
}

/// Verifies the certificate of a peer this server dials (docs/design.md §10 "Peer plane"):
/// rustls' WebPKI verifier checks that it chains to the cluster CA and names the host
/// dialled; then it must name the rank dialled, of this server's cluster. Node
/// certificates commonly share host names (127.0.0.1, a shared DNS name), so the host
/// alone does not say which server answered: a server holding rank 1's certificate on the
/// address of a dead rank 2 would otherwise pass for rank 2.
#[derive(Debug)]
pub struct PeerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    expected: CertName,
}

impl PeerVerifier {
    /// Trusts the CA certificates of `ca` (PEM); the peer must be rank `rank` of `cluster`.
    pub fn new(ca: &[u8], cluster: &str, rank: Rank) -> Result<PeerVerifier, String> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca) {
            let cert = cert.map_err(|e| format!("the CA certificate: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the CA certificate: {e}"))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("the CA certificate: {e}"))?;
        Ok(PeerVerifier {
            webpki,
            expected: CertName::Node {
                cluster: cluster.to_string(),
                rank,
            },
        })
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let presented = cert_name(end_entity.as_ref());
        if presented.as_ref() == Some(&self.expected) {
            return Ok(verified);
        }
        let presented = presented.map_or_else(
            || "no replikv server (no URI SAN replikv://<cluster>/rank/<r>)".to_string(),
            |n| n.to_string(),
        );
        // Once per handshake: a channel dials again only when a call needs it.
        warn!(
            peer = %server_name.to_str(),
            expected = %self.expected,
            presented = %presented,
            "refused a peer: its certificate names another server than the one dialled"
        );
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(WrongPeer {
                expected: self.expected.clone(),
                presented,
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The crypto provider of the dialler: ring, as tonic's listeners use (`tls-ring`). rustls
/// now deprecates it for lacking post-quantum key exchange; the listeners, built on ring too,
/// offer none either, so moving the peer plane to aws-lc-rs is one change for both ends.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Opens connections to one peer for a tonic channel (`Endpoint::connect_with_connector`,
/// over an `http://` URI so tonic adds no TLS of its own): TCP without Nagle's delay, then
/// TLS presenting this server's certificate, in which [`PeerVerifier`] checks that the peer
/// is the rank dialled. A refused certificate fails the connection like an unreachable peer.
#[derive(Clone)]
pub struct PeerConnector {
    tls: TlsConnector,
    host: ServerName<'static>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
}

impl fmt::Debug for PeerConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConnector")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

fn timed_out(what: &str, after: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} timed out after {after:?}"),
    )
}

impl tower_service::Service<Uri> for PeerConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no address"))
                })?;
            let tcp = tokio::time::timeout(this.connect_timeout, TcpStream::connect(&addr))
                .await
                .map_err(|_| timed_out("connecting", this.connect_timeout))??;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(
                this.handshake_timeout,
                this.tls.connect(this.host.clone(), tcp),
            )
            .await
            .map_err(|_| timed_out("the TLS handshake", this.handshake_timeout))??;
            if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                return Err(io::Error::other("the peer did not agree to speak HTTP/2"));
            }
            Ok(TokioIo::new(tls))
        })
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
    fn names_print_as_their_uris() {
        for uri in ["replikv://alpha/rank/2", "replikv://alpha/client/bob"] {
            assert_eq!(parse_uri(uri).map(|n| n.to_string()).as_deref(), Some(uri));
        }
    }

    /// The first certificate of a PEM file.
    fn der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn verify(v: &PeerVerifier, cert: &Path, host: &str) -> Result<(), rustls::Error> {
        let host = ServerName::try_from(host.to_string()).expect("a host name");
        v.verify_server_cert(&der(cert), &[], &host, &[], UnixTime::now())
            .map(|_| ())
    }

    /// Dialling rank 2 of cluster "alpha": only rank 2's certificate of that cluster, from its
    /// CA and for the host dialled, passes.
    #[test]
    fn the_dialler_takes_only_the_dialled_ranks_certificate() {
        use replikv_client::certs;
        let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
        let alpha = tempfile::tempdir().unwrap();
        certs::create_ca(alpha.path(), "alpha").unwrap();
        let (rank1, _) = certs::create_node(alpha.path(), 1, &hosts).unwrap();
        let (rank2, _) = certs::create_node(alpha.path(), 2, &hosts).unwrap();
        // The same CA signing for another cluster name: what the name check alone refuses.
        let beta = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "ca-key.pem"] {
            std::fs::copy(alpha.path().join(f), beta.path().join(f)).unwrap();
        }
        std::fs::write(beta.path().join("cluster"), "beta\n").unwrap();
        let (beta2, _) = certs::create_node(beta.path(), 2, &hosts).unwrap();
        // Another CA with the same cluster name and rank.
        let other = tempfile::tempdir().unwrap();
        certs::create_ca(other.path(), "alpha").unwrap();
        let (other2, _) = certs::create_node(other.path(), 2, &hosts).unwrap();

        let ca = std::fs::read(certs::ca_path(alpha.path())).unwrap();
        let v = PeerVerifier::new(&ca, "alpha", 2).unwrap();
        verify(&v, &rank2, "127.0.0.1").expect("rank 2's certificate passes");
        verify(&v, &rank2, "localhost").expect("for each of its hosts");

        let wrong_name = |r: Result<(), rustls::Error>, presented: &str| match r {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(e))) => {
                let msg = e.0.to_string();
                assert!(
                    msg.contains("replikv://alpha/rank/2") && msg.contains(presented),
                    "{msg}"
                );
            }
            other => panic!("expected a refused name, got {other:?}"),
        };
        wrong_name(verify(&v, &rank1, "127.0.0.1"), "replikv://alpha/rank/1");
        wrong_name(verify(&v, &beta2, "127.0.0.1"), "replikv://beta/rank/2");
        // Its issuer has the same name as the cluster CA, and another key.
        let r = verify(&v, &other2, "127.0.0.1");
        assert!(
            matches!(
                r,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                ))
            ),
            "another CA's certificate fails the chain: {r:?}"
        );
        assert!(
            matches!(
                verify(&v, &rank2, "10.1.2.3"),
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "a host the certificate does not name fails"
        );
        // A verifier for rank 1 takes rank 1's certificate: the check follows the rank dialled.
        let v1 = PeerVerifier::new(&ca, "alpha", 1).unwrap();
        verify(&v1, &rank1, "127.0.0.1").expect("rank 1's certificate passes for rank 1");
        assert!(PeerVerifier::new(b"not a certificate", "alpha", 2).is_err());
    }

    #[test]
    fn a_claim_must_match_the_certificate() {
        assert!(check_claim(None, 3, "proposer").is_ok());
        assert!(check_claim(Some(3), 3, "proposer").is_ok());
        let e = check_claim(Some(1), 2, "proposer").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
}
