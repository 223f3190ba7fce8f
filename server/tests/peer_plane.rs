//! The peer plane (docs/design.md §10 "Peer plane", docs/security.md): peer calls forged from a
//! client connection, from a connection without a node certificate, with a client
//! certificate, with a certificate of another CA, or with a node certificate naming
//! another rank than the one it claims, are all refused; the cluster keeps one primary and
//! its data. A server dialling a peer takes only that rank's certificate for an answer: one
//! holding another rank's certificate on a dead member's address is not that member.

mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bytes;
use futures::{Stream, StreamExt};
use replikv_proto::kv::View;
use replikv_proto::peer::peer_client::PeerClient;
use replikv_proto::peer::peer_server::{Peer, PeerServer};
use replikv_proto::peer::*;
use replikv_testkit::LocalCluster;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Request, Response, Status, Streaming};

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

/// What an impostor on a member's peer address was asked, by method.
type Calls = Arc<Mutex<Vec<&'static str>>>;

/// A peer server holding a valid node certificate of another rank of the cluster, on the
/// peer address of a member that died. It says yes to everything as a healthy member
/// would: promises, accepts, installs, acknowledges every append. A dialer that took its
/// answers for the dead member's would make it a member, and commit writes on its acks.
#[derive(Clone)]
struct Impostor {
    calls: Calls,
}

type ImpostorStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Impostor {
    fn note(&self, method: &'static str) {
        self.calls.lock().expect("calls lock").push(method);
    }

    /// Serves on `addr` (freed by the dead member: retried for up to 5 s) with the node
    /// certificate of `rank` from `certs`, asking callers for a certificate of the CA as a
    /// real member does.
    async fn start(
        addr: &str,
        certs: &std::path::Path,
        rank: usize,
    ) -> (Calls, tokio::task::JoinHandle<()>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("impostor: {addr} not free yet: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("the impostor cannot listen on {addr}: {e}"),
            }
        };
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                read(certs.join(format!("node-{rank}.pem"))),
                read(certs.join(format!("node-{rank}-key.pem"))),
            ))
            .client_ca_root(Certificate::from_pem(read(certs.join("ca.pem"))));
        let calls = Calls::default();
        let service = PeerServer::new(Impostor {
            calls: calls.clone(),
        });
        let server = Server::builder()
            .tls_config(tls)
            .expect("impostor TLS settings")
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        (calls, task)
    }
}

#[tonic::async_trait]
impl Peer for Impostor {
    async fn forward(&self, _: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        self.note("forward");
        Err(Status::unavailable("not the primary"))
    }

    type AppendStream = ImpostorStream<AppendResponse>;

    async fn append(
        &self,
        req: Request<Streaming<AppendRequest>>,
    ) -> Result<Response<Self::AppendStream>, Status> {
        self.note("append");
        let acks = req.into_inner().map(|m| {
            m.map(|m| AppendResponse {
                status: AppendStatus::Ok as i32,
                applied: m.records.last().map_or(m.prev_lsn, |r| r.lsn),
                view: None,
                promised: 0,
            })
        });
        Ok(Response::new(Box::pin(acks)))
    }

    async fn prepare(
        &self,
        req: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        self.note("prepare");
        let req = req.into_inner();
        Ok(Response::new(PrepareResponse {
            promised: true,
            view: req.view,
            promised_ballot: req.ballot,
            ..Default::default()
        }))
    }

    async fn accept(
        &self,
        req: Request<AcceptRequest>,
    ) -> Result<Response<AcceptResponse>, Status> {
        self.note("accept");
        Ok(Response::new(AcceptResponse {
            accepted: true,
            promised_ballot: req.into_inner().ballot,
            view: None,
        }))
    }

    async fn install(
        &self,
        _: Request<InstallRequest>,
    ) -> Result<Response<InstallResponse>, Status> {
        self.note("install");
        Ok(Response::new(InstallResponse {
            ok: true,
            ..Default::default()
        }))
    }

    type SyncStream = ImpostorStream<SyncChunk>;

    async fn sync(&self, _: Request<SyncRequest>) -> Result<Response<Self::SyncStream>, Status> {
        self.note("sync");
        Err(Status::unavailable("nothing to send"))
    }

    async fn join(&self, _: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.note("join");
        Err(Status::unavailable("not the primary"))
    }

    async fn discover(
        &self,
        _: Request<DiscoverRequest>,
    ) -> Result<Response<DiscoverResponse>, Status> {
        self.note("discover");
        Err(Status::unavailable("busy"))
    }
}

/// The primary and one member die, and a server holding the dead primary's (valid) node
/// certificate takes the member's peer address. The heir, dialling that address for the
/// member's promise, refuses the certificate in the handshake: it never counts the impostor
/// as the member, so alone it cannot take over. Once the old primary is back, the two real
/// servers form a view without the dead member, and every acknowledged write is on both.
#[test]
fn a_dead_members_address_answered_with_another_ranks_certificate_is_not_that_member() {
    common::run_for(Duration::from_secs(120), async {
        let (mut cluster, primary) = common::start_healthy(3, &[]).await;
        let certs = cluster.certs_dir().expect("a secure cluster by default");
        let client = common::client(&cluster).await;
        let mut expected = common::Expected::new();
        common::put_fresh(&client, "before", 20, &mut expected).await;
        cluster
            .wait_converged(common::BOOT_TIMEOUT)
            .await
            .expect("every member holds the writes");
        let (_, before) = cluster.wait_for_primary(CALL).await.expect("a primary");
        let epoch_before = common::epoch(&before);

        // The next rank after the primary takes over first (docs/design.md §5); the third
        // dies with the primary, before either backup notices the primary is gone.
        let heir = (primary + 1) % cluster.len();
        let victim = (primary + 2) % cluster.len();
        cluster.kill(primary).expect("kill the primary");
        cluster.kill(victim).expect("kill a member");
        let (calls, impostor) = Impostor::start(&cluster.peer_addr(victim), &certs, primary).await;

        // Several lease periods and takeover attempts: the heir alone is no quorum of the
        // view, and the impostor must not make it one.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(s) = cluster.status(heir).await {
                let reached = calls.lock().unwrap().clone();
                assert!(
                    !(s.role == "primary" || common::epoch(&s) > epoch_before),
                    "server {heir} made a view with the impostor as rank {victim}: {:?} (calls \
                     that reached the impostor: {reached:?})",
                    s.view,
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The old primary comes back: the view goes on without the dead member.
        cluster.restart(primary).expect("restart the primary");
        let (now, status) = cluster
            .wait_for_primary(common::BOOT_TIMEOUT)
            .await
            .expect("a primary once a quorum is back");
        let view = status.view.expect("the primary's view");
        assert!(
            !view.members.contains(&(victim as u32)),
            "server {now}'s view {view:?} counts the impostor as rank {victim}"
        );
        common::put_fresh(&client, "after", 20, &mut expected).await;
        common::assert_every_server_reads(&cluster, [primary, heir], &expected).await;

        // No peer call ever reached the impostor: the handshake was refused, and said why.
        assert_eq!(*calls.lock().unwrap(), Vec::<&str>::new());
        impostor.abort();
        let log = std::fs::read_to_string(cluster.log_path(heir)).expect("the heir's log");
        let want = format!("expected=replikv://local/rank/{victim}");
        let got = format!("presented=replikv://local/rank/{primary}");
        assert!(
            log.lines().any(|l| l.contains(&want) && l.contains(&got)),
            "server {heir}'s log names neither the rank it dialled nor the one it got"
        );
    });
}
