//! Certificates for a secure cluster (docs/security.md): a cluster CA, one node certificate
//! per rank and client certificates, written as PEM files into one directory.
//!
//! A node certificate names its cluster and rank in a URI SAN,
//! `replikv://<cluster>/rank/<r>` ([`node_uri`]), beside DNS and IP SANs for its addresses:
//! the servers take a peer's rank from that SAN, never from a request field. A client
//! certificate names `replikv://<cluster>/client/<name>`, which no server accepts as a peer.
//!
//! Layout of a certificate directory:
//!
//! | file                          | what                                          |
//! |-------------------------------|-----------------------------------------------|
//! | `ca.pem`, `ca-key.pem`        | the cluster CA (keep the key private)         |
//! | `cluster`                     | the cluster name the CA was made for          |
//! | `node-<r>.pem`, `node-<r>-key.pem` | rank r's certificate, for both its ports |
//! | `client-<name>.pem`, `client-<name>-key.pem` | a client certificate           |

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The URI SAN of rank `rank`'s certificate in cluster `cluster`.
pub fn node_uri(cluster: &str, rank: u32) -> String {
    format!("replikv://{cluster}/rank/{rank}")
}

/// The URI SAN of client `name`'s certificate in cluster `cluster`.
pub fn client_uri(cluster: &str, name: &str) -> String {
    format!("replikv://{cluster}/client/{name}")
}

/// `ca.pem` in `dir`.
pub fn ca_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// `node-<rank>.pem` and `node-<rank>-key.pem` in `dir`.
pub fn node_paths(dir: &Path, rank: u32) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("node-{rank}.pem")),
        dir.join(format!("node-{rank}-key.pem")),
    )
}

/// `client-<name>.pem` and `client-<name>-key.pem` in `dir`.
pub fn client_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("client-{name}.pem")),
        dir.join(format!("client-{name}-key.pem")),
    )
}

fn err(what: impl std::fmt::Display) -> impl FnOnce(rcgen::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!(
            "{kind} {name:?} must be non-empty letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn write_public(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Creates `dir` and a new CA in it for cluster `cluster`; refuses to overwrite one.
pub fn create_ca(dir: &Path, cluster: &str) -> Result<PathBuf, String> {
    check_name("cluster name", cluster)?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = ca_path(dir);
    if path.exists() {
        return Err(format!(
            "{} exists already: a CA is made once per cluster",
            path.display()
        ));
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err("CA"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("replikv CA {cluster}"));
    dn.push(DnType::OrganizationName, cluster);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = KeyPair::generate().map_err(err("CA key"))?;
    let cert = params.self_signed(&key).map_err(err("CA"))?;
    write_private(&dir.join("ca-key.pem"), &key.serialize_pem())?;
    write_public(&dir.join("cluster"), &format!("{cluster}\n"))?;
    write_public(&path, &cert.pem())?;
    Ok(path)
}

/// The cluster name a CA was made for (its organisation), and the issuer to sign with.
fn load_ca(dir: &Path) -> Result<(String, Issuer<'static, KeyPair>), String> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| {
            format!(
                "cannot read {}: {e} (run `replikv cert ca` first)",
                p.display()
            )
        })
    };
    let cert = read(ca_path(dir))?;
    let key = KeyPair::from_pem(&read(dir.join("ca-key.pem"))?).map_err(err("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&cert, key).map_err(err("CA certificate"))?;
    let cluster = read(dir.join("cluster"))?.trim().to_string();
    check_name("cluster name", &cluster)?;
    Ok((cluster, issuer))
}

/// Hosts (names or IP addresses) as SANs.
fn host_sans(hosts: &[String]) -> Result<Vec<SanType>, String> {
    hosts
        .iter()
        .map(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            Ok(match h.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    h.try_into()
                        .map_err(|e| format!("host {h:?} is no DNS name: {e}"))?,
                ),
            })
        })
        .collect()
}

/// Signs a certificate for rank `rank` reachable at `hosts` with the CA of `dir`.
pub fn create_node(dir: &Path, rank: u32, hosts: &[String]) -> Result<(PathBuf, PathBuf), String> {
    let (cluster, issuer) = load_ca(dir)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err("node"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("replikv {cluster} rank {rank}"));
    let uri = node_uri(&cluster, rank);
    params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().map_err(err(&uri))?)];
    params.subject_alt_names.extend(host_sans(hosts)?);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    let key = KeyPair::generate().map_err(err("node key"))?;
    let cert = params.signed_by(&key, &issuer).map_err(err("node"))?;
    let (cert_path, key_path) = node_paths(dir, rank);
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok((cert_path, key_path))
}

/// Signs a client certificate named `name` with the CA of `dir`.
pub fn create_client(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), String> {
    check_name("client name", name)?;
    let (cluster, issuer) = load_ca(dir)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err("client"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, name.to_string());
    let uri = client_uri(&cluster, name);
    params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().map_err(err(&uri))?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    let key = KeyPair::generate().map_err(err("client key"))?;
    let cert = params.signed_by(&key, &issuer).map_err(err("client"))?;
    let (cert_path, key_path) = client_paths(dir, name);
    write_private(&key_path, &key.serialize_pem())?;
    write_public(&cert_path, &cert.pem())?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_signs_nodes_and_clients_and_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), "alpha").unwrap();
        assert!(create_ca(dir.path(), "alpha").is_err());
        let (cert, key) = create_node(
            dir.path(),
            2,
            &["127.0.0.1".to_string(), "localhost".to_string()],
        )
        .unwrap();
        let text = std::fs::read_to_string(cert).unwrap();
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(std::fs::read_to_string(key)
            .unwrap()
            .contains("PRIVATE KEY"));
        create_client(dir.path(), "admin").unwrap();
        assert!(create_client(dir.path(), "a/b").is_err());
        let (cluster, _) = load_ca(dir.path()).unwrap();
        assert_eq!(cluster, "alpha");
    }
}
