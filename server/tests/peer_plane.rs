//! The peer plane (docs/design.md §10 "Peer plane", docs/security.md): peer calls forged from a
//! client connection, from a connection without a node certificate, with a client
//! certificate, with a certificate of another CA, or with a node certificate naming
//! another rank than the one it claims, are all refused; the cluster keeps one primary and
//! its data.

mod common;

use std::time::Duration;

use common::bytes;
use replikv_proto::kv::View;
use replikv_proto::peer::peer_client::PeerClient;
use replikv_proto::peer::*;
use replikv_testkit::LocalCluster;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const CALL: Duration = Duration::from_secs(3);

fn read(p: std::path::PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// TLS settings trusting `ca_dir`'s CA and presenting `identity` (cert, key), if any.
fn tls(ca_dir: &std::path::Path, identity: Option<(&str, &str)>) -> ClientTlsConfig {
    let mut t = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca_dir.join("ca.pem"))))
        .domain_name("127.0.0.1");
    if let Some((cert, key)) = identity {
        t = t.identity(Identity::from_pem(
            read(ca_dir.join(cert)),
            read(ca_dir.join(key)),
        ));
    }
    t
}

async fn connect(addr: &str, tls: Option<ClientTlsConfig>) -> Option<PeerClient<Channel>> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(CALL)
        .timeout(CALL);
    if let Some(t) = tls {
        e = e.tls_config(t).unwrap();
    }
    // A refused handshake is a refusal too.
    tokio::time::timeout(CALL, e.connect())
        .await
        .ok()?
        .ok()
        .map(PeerClient::new)
}

fn sole(rank: u32, epoch: u64) -> Option<View> {
    Some(View {
        epoch,
        primary: rank,
        members: vec![rank],
        config: None,
    })
}

/// Every forged call of the brief, claiming to come from rank `claim`; returns how many were
/// accepted (answered OK).
async fn forge_all(addr: &str, tls: Option<ClientTlsConfig>, claim: u32) -> usize {
    let Some(mut c) = connect(addr, tls).await else {
        return 0;
    };
    let huge = u64::MAX / 2;
    let mut accepted = 0;
    for target in [1u32, 2] {
        let r = c
            .install(InstallRequest {
                view: sole(target, 1000 + target as u64),
                from: claim,
                states: vec![],
                previous: None,
            })
            .await;
        accepted += r.is_ok() as usize;
    }
    let r = c
        .prepare(PrepareRequest {
            ballot: huge,
            proposer: claim,
            view: None,
        })
        .await;
    accepted += r.is_ok() as usize;
    let r = c
        .accept(AcceptRequest {
            ballot: huge,
            proposer: claim,
            from_view: None,
            view: sole(claim, huge),
        })
        .await;
    accepted += r.is_ok() as usize;
    let append = AppendRequest {
        epoch: huge,
        primary: claim,
        msg_seq: 1,
        records: vec![Record {
            lsn: 1_000_000,
            epoch: huge,
            entries: vec![Entry {
                key: bytes("planted"),
                present: true,
                lsn: 1_000_000,
                value: Some(bytes("evil")),
            }],
        }],
        committed: 1_000_000,
        lease_ms: 10_000,
        prev_lsn: 0,
        prev_epoch: 0,
        gc_horizon: 0,
    };
    if let Ok(resp) = c.append(futures::stream::iter(vec![append])).await {
        if let Ok(Ok(Some(_))) = tokio::time::timeout(CALL, resp.into_inner().message()).await {
            accepted += 1;
        }
    }
    if let Ok(resp) = c
        .sync(SyncRequest {
            since: 0,
            tail_keys: vec![],
            from: claim,
            epoch: 0,
        })
        .await
    {
        if let Ok(Ok(Some(_))) = tokio::time::timeout(CALL, resp.into_inner().message()).await {
            accepted += 1;
        }
    }
    let r = c
        .join(JoinRequest {
            rank: claim,
            applied: 0,
        })
        .await;
    accepted += r.is_ok() as usize;
    accepted
}

/// One serving primary, the same as before, and the data unchanged.
async fn assert_unharmed(cluster: &LocalCluster, primary: usize) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (now, _) = cluster.wait_for_primary(CALL).await.unwrap();
    assert_eq!(now, primary, "the primary did not change");
    let mut primaries = 0;
    for rank in 0..cluster.len() {
        let s = cluster.status(rank).await.expect("every server answers");
        primaries += (s.role == "primary") as usize;
    }
    assert_eq!(primaries, 1, "exactly one primary");
    let client = common::client(cluster).await;
    assert_eq!(
        client.get(bytes("fruit")).await.unwrap(),
        Some(bytes("apple"))
    );
    assert_eq!(client.get(bytes("planted")).await.unwrap(), None);
}

#[test]
fn forged_peer_calls_are_refused_on_every_path() {
    common::run_for(Duration::from_secs(120), async {
        let (cluster, primary) = common::start_healthy(3, &[]).await;
        common::client(&cluster)
            .await
            .put(bytes("fruit"), bytes("apple"))
            .await
            .unwrap();
        let certs = cluster.certs_dir().expect("a secure cluster by default");
        let victim = (primary + 1) % cluster.len();
        let other = (primary + 2) % cluster.len();

        // The client port serves no peer call at all.
        assert_eq!(forge_all(&cluster.addr(victim), None, 0).await, 0);
        // The peer port: in the clear, with TLS but no certificate, with a client
        // certificate: the handshake or the call is refused.
        let peer = cluster.peer_addr(victim);
        assert_eq!(forge_all(&peer, None, 0).await, 0);
        assert_eq!(forge_all(&peer, Some(tls(&certs, None)), 0).await, 0);
        let client_cert = Some(("client-testkit.pem", "client-testkit-key.pem"));
        assert_eq!(forge_all(&peer, Some(tls(&certs, client_cert)), 0).await, 0);
        // A real node certificate (rank `other`) claiming to be the primary.
        let node = format!("node-{other}.pem");
        let node_key = format!("node-{other}-key.pem");
        let cert = Some((node.as_str(), node_key.as_str()));
        // The same certificate under its own rank gets an answer: what refuses the forged
        // calls below is the false claim, not a broken connection.
        let mut honest = connect(&peer, Some(tls(&certs, cert)))
            .await
            .expect("a node certificate connects");
        honest
            .discover(DiscoverRequest { from: other as u32 })
            .await
            .expect("an honest discovery is answered");
        let e = honest
            .discover(DiscoverRequest {
                from: primary as u32,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert_eq!(
            forge_all(&peer, Some(tls(&certs, cert)), primary as u32).await,
            0
        );
        // A node certificate of another CA naming the right rank.
        let foreign = tempfile::tempdir().unwrap();
        replikv_client::certs::create_ca(foreign.path(), "local").unwrap();
        replikv_client::certs::create_node(foreign.path(), primary as u32, &["127.0.0.1".into()])
            .unwrap();
        let mut foreign_tls = tls(foreign.path(), None);
        foreign_tls = foreign_tls.identity(Identity::from_pem(
            read(foreign.path().join(format!("node-{primary}.pem"))),
            read(foreign.path().join(format!("node-{primary}-key.pem"))),
        ));
        assert_eq!(forge_all(&peer, Some(foreign_tls), primary as u32).await, 0);
        assert_unharmed(&cluster, primary).await;
    });
}

#[test]
fn a_public_address_without_certificates_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_replikv-server"))
        .args(["--rank", "0", "--peers", "0.0.0.0:0/1", "--data-dir"])
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the server");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without TLS") && err.contains("--insecure"),
        "{err}"
    );
}
