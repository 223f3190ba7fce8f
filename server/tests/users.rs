//! Users and namespaces (docs/design.md §13, docs/security.md "Users"), against real server
//! processes: no credentials or a wrong token get nothing; each user's keys are its own; a
//! removed user is refused by every server within one lease; only the admin manages users
//! and reads Status (nor changes members or takes snapshots); the user table survives a
//! failover and a wiped disk.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::bytes;
use replikv_client::config::Credentials;
use replikv_client::{Client, Error, Range};
use replikv_proto::kv::kv_client::KvClient;
use replikv_proto::kv::{
    pipeline_request, pipeline_response, GetRequest, PipelineRequest, PutRequest, StatusRequest,
};
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

/// The lease the servers run with (the default).
const LEASE: Duration = Duration::from_millis(500);

/// Sends a user name and an `authorization` value, either of which may be absent.
#[derive(Clone)]
struct Creds {
    user: Option<String>,
    authorization: Option<String>,
}

impl tonic::service::Interceptor for Creds {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let md = req.metadata_mut();
        if let Some(u) = &self.user {
            md.insert(
                replikv_proto::USER_HEADER,
                u.parse::<AsciiMetadataValue>().unwrap(),
            );
        }
        if let Some(a) = &self.authorization {
            md.insert(
                replikv_proto::AUTHORIZATION_HEADER,
                a.parse::<AsciiMetadataValue>().unwrap(),
            );
        }
        Ok(req)
    }
}

type Stub = KvClient<InterceptedService<Channel, Creds>>;

/// A raw stub to `rank` over the cluster's TLS, sending exactly `creds`.
fn stub(cluster: &common::LocalCluster, rank: usize, creds: Creds) -> Stub {
    let ca = std::fs::read(cluster.client_ca().expect("client TLS is on")).unwrap();
    let channel = Endpoint::from_shared(format!("https://{}", cluster.addr(rank)))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    KvClient::with_interceptor(channel, creds)
}

fn as_user(c: &Credentials) -> Creds {
    Creds {
        user: Some(c.user.clone()),
        authorization: Some(format!("Bearer {}", c.token)),
    }
}

/// A client of the whole cluster speaking as `creds`.
async fn client_as(cluster: &common::LocalCluster, creds: &Credentials) -> Client {
    Client::connect(
        cluster
            .client_config()
            .with_credentials(Some(creds.clone()))
            .with_request_timeout(common::REQUEST_TIMEOUT),
    )
    .await
    .expect("client config is valid")
}

/// Adds a user with a fresh token through the admin client.
async fn add(admin: &Client, name: &str) -> Credentials {
    let token = replikv_client::config::generate_token().unwrap();
    admin.add_user(name, &token, false).await.unwrap();
    Credentials::new(name, token)
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, what: &str) {
    match r {
        Err(s) => assert_eq!(s.code(), code, "{what}: {s}"),
        Ok(v) => panic!("{what} was served: {v:?}"),
    }
}

/// One pipelined get through a fresh `Pipeline` call: its status, whether the call or the
/// operation was refused.
async fn pipelined_get(stub: &mut Stub, key: &str) -> Result<Bytes, tonic::Status> {
    let req = PipelineRequest {
        tag: 1,
        op: Some(pipeline_request::Op::Get(GetRequest { key: bytes(key) })),
    };
    let mut answers = stub
        .pipeline(futures::stream::iter([req]))
        .await?
        .into_inner();
    let answer = answers
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("no answer"))?;
    match replikv_proto::pipeline::unary_outcome(answer.result, answer.metadata)?.into_inner() {
        pipeline_response::Result::Get(g) => Ok(g.value),
        other => panic!("unexpected answer {other:?}"),
    }
}

#[test]
fn no_credentials_or_a_wrong_token_read_and_write_nothing() {
    common::run(async {
        let (cluster, primary) = common::start_healthy(3, &[]).await;
        let admin = common::client(&cluster).await;
        admin.put(bytes("k"), bytes("secret")).await.unwrap();
        let good = cluster.admin_credentials().unwrap();
        let refused = [
            (
                "no credentials",
                Creds {
                    user: None,
                    authorization: None,
                },
            ),
            (
                "a user without a token",
                Creds {
                    user: Some("admin".into()),
                    authorization: None,
                },
            ),
            (
                "a wrong token",
                Creds {
                    user: Some("admin".into()),
                    authorization: Some(format!("Bearer {}", "0".repeat(64))),
                },
            ),
            (
                "an unknown user",
                Creds {
                    user: Some("mallory".into()),
                    authorization: Some(format!("Bearer {}", good.token)),
                },
            ),
            (
                "a token without `Bearer`",
                Creds {
                    user: Some("admin".into()),
                    authorization: Some(good.token.clone()),
                },
            ),
        ];
        for rank in [primary, (primary + 1) % 3] {
            for (what, creds) in &refused {
                let mut s = stub(&cluster, rank, creds.clone());
                let at = |op: &str| format!("{op} with {what} at server {rank}");
                let r = s.get(GetRequest { key: bytes("k") }).await;
                assert_code(r, Code::Unauthenticated, &at("get"));
                let put = PutRequest {
                    key: bytes("k"),
                    value: bytes("overwritten"),
                    id: None,
                };
                assert_code(s.put(put).await, Code::Unauthenticated, &at("put"));
                let r = pipelined_get(&mut s, "k").await;
                assert_code(r, Code::Unauthenticated, &at("pipeline"));
                assert_code(
                    s.status(StatusRequest {}).await,
                    Code::Unauthenticated,
                    &at("status"),
                );
            }
        }
        // The messages say what is missing, and name no other user's data.
        let mut s = stub(&cluster, primary, refused[0].1.clone());
        let e = s.get(GetRequest { key: bytes("k") }).await.unwrap_err();
        assert!(e.message().contains("REPLIKV_USER"), "{e}");
        // The Rust client without credentials gets a definite, clear error.
        let anonymous = Client::connect(
            cluster
                .client_config()
                .with_credentials(None)
                .with_request_timeout(common::REQUEST_TIMEOUT),
        )
        .await
        .unwrap();
        match anonymous.put(bytes("k"), bytes("overwritten")).await {
            Err(Error::Unauthenticated(m)) => assert!(m.contains("credentials"), "{m}"),
            other => panic!("a put without credentials: {other:?}"),
        }
        // Nothing changed.
        assert_eq!(admin.get(bytes("k")).await.unwrap(), Some(bytes("secret")));
    });
}

#[test]
fn each_user_has_its_own_namespace() {
    common::run(async {
        let (cluster, _) = common::start_healthy(3, &[]).await;
        let admin = common::client(&cluster).await;
        let alice = client_as(&cluster, &add(&admin, "alice").await).await;
        let bob = client_as(&cluster, &add(&admin, "bob").await).await;
        // "alice" + "\0" must not be a prefix of user "alice2"'s keys, nor the other way.
        let alice2 = client_as(&cluster, &add(&admin, "alice2").await).await;

        // The same key name holds one value per user.
        assert_eq!(alice.put(bytes("k"), bytes("a")).await.unwrap(), None);
        assert_eq!(bob.put(bytes("k"), bytes("b")).await.unwrap(), None);
        assert_eq!(alice2.put(bytes("k"), bytes("a2")).await.unwrap(), None);
        for (key, value) in [("l", "bl"), ("m", "bm")] {
            bob.put(bytes(key), bytes(value)).await.unwrap();
        }
        assert_eq!(alice.get(bytes("k")).await.unwrap(), Some(bytes("a")));
        assert_eq!(bob.get(bytes("k")).await.unwrap(), Some(bytes("b")));
        assert_eq!(admin.get(bytes("k")).await.unwrap(), None);
        // Alice cannot read Bob's other keys: for her they do not exist.
        assert_eq!(alice.get(bytes("l")).await.unwrap(), None);

        // Alice cannot overwrite or delete Bob's key.
        assert_eq!(
            alice.put(bytes("k"), bytes("a-again")).await.unwrap(),
            Some(bytes("a"))
        );
        assert_eq!(alice.delete(bytes("l")).await.unwrap(), None);
        let cas = alice
            .cas(bytes("k"), Some(bytes("b")), Some(bytes("stolen")))
            .await
            .unwrap();
        assert!(!cas.swapped, "alice's CAS compared against bob's value");
        assert_eq!(cas.current, Some(bytes("a-again")));
        let cas = alice
            .cas(bytes("m"), None, Some(bytes("mine")))
            .await
            .unwrap();
        assert!(cas.swapped, "bob's key m is absent for alice");

        // Scans see the caller's keys only, whatever the range.
        let everything = Range::Keys {
            from: Bytes::new(),
            to: None,
        };
        let page = alice.scan(&everything, 100, None).await.unwrap();
        assert_eq!(
            page.items,
            vec![(bytes("k"), bytes("a-again")), (bytes("m"), bytes("mine"))]
        );
        let page = bob.scan(&Range::prefix(""), 100, None).await.unwrap();
        assert_eq!(page.items.len(), 3, "{:?}", page.items);
        let page = alice2.scan(&everything, 100, None).await.unwrap();
        assert_eq!(page.items, vec![(bytes("k"), bytes("a2"))]);
        // A page boundary and its continuation stay inside the namespace too.
        let first = bob.scan(&everything, 2, None).await.unwrap();
        assert_eq!(first.items.len(), 2);
        let rest = bob
            .scan(&everything, 2, first.continuation.clone())
            .await
            .unwrap();
        assert_eq!(rest.items, vec![(bytes("m"), bytes("bm"))]);
        assert_eq!(rest.continuation, None);

        // A range delete of "every key" removes the caller's only.
        let removed = alice
            .delete_range(&Range::keys("", "\u{7f}"), 0)
            .await
            .unwrap();
        assert_eq!(removed.removed, 2);
        assert_eq!(bob.get(bytes("k")).await.unwrap(), Some(bytes("b")));
        assert_eq!(bob.get(bytes("m")).await.unwrap(), Some(bytes("bm")));
        assert_eq!(alice2.get(bytes("k")).await.unwrap(), Some(bytes("a2")));

        // The key limit applies to the key as the user sees it, and says so.
        let max = replikv_proto::DEFAULT_MAX_KEY_BYTES;
        let longest = Bytes::from(vec![b'x'; max]);
        alice.put(longest.clone(), bytes("v")).await.unwrap();
        assert_eq!(alice.get(longest).await.unwrap(), Some(bytes("v")));
        match alice
            .put(Bytes::from(vec![b'x'; max + 1]), bytes("v"))
            .await
        {
            Err(Error::InvalidArgument(m)) => {
                assert!(m.contains(&format!("{}", max + 1)), "{m}");
                assert!(!m.contains("alice"), "the error names the namespace: {m}");
            }
            other => panic!("an oversized key: {other:?}"),
        }
    });
}

#[test]
fn only_the_admin_manages_users_and_reads_status() {
    common::run(async {
        let (cluster, primary) = common::start_healthy(3, &[]).await;
        let admin = common::client(&cluster).await;
        let alice_creds = add(&admin, "alice").await;
        let alice = client_as(&cluster, &alice_creds).await;
        let token = replikv_client::config::generate_token().unwrap();
        match alice.add_user("mallory", &token, true).await {
            Err(Error::PermissionDenied(m)) => assert!(m.contains("admin"), "{m}"),
            other => panic!("a user added a user: {other:?}"),
        }
        assert!(matches!(
            alice.remove_user("admin").await,
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            alice.list_users().await,
            Err(Error::PermissionDenied(_))
        ));
        assert!(matches!(
            alice.status(0).await,
            Err(Error::PermissionDenied(_))
        ));
        let mut s = stub(&cluster, primary, as_user(&alice_creds));
        assert_code(
            s.status(StatusRequest {}).await,
            Code::PermissionDenied,
            "status as alice",
        );
        // Nor change the membership, nor take a snapshot of everyone's keys.
        match alice.member_add("127.0.0.1:1/2").await {
            Err(Error::PermissionDenied(_)) => {}
            other => panic!("a user added a member: {other:?}"),
        }
        let target = replikv_proto::kv::member_remove_request::Target::Rank(2);
        match alice.member_remove(target).await {
            Err(Error::PermissionDenied(_)) => {}
            other => panic!("a user removed a member: {other:?}"),
        }
        let snap = tempfile::tempdir().unwrap();
        let config = cluster.client_config();
        let servers = replikv_client::snapshot::Servers::new(
            cluster.addrs(),
            config.tls.as_ref(),
            std::time::Duration::from_secs(2),
            Some(&alice_creds),
        )
        .unwrap();
        let path = snap.path().join("all.snap");
        match replikv_client::snapshot::save(&servers, &path, std::time::Duration::from_secs(10))
            .await
        {
            Err(Error::PermissionDenied(_)) => assert!(!path.exists()),
            other => panic!("a user took a snapshot of every key: {other:?}"),
        }
        assert_eq!(
            admin.members().await.unwrap().view.unwrap().members.len(),
            3,
            "the view is unchanged"
        );
        // Any user may learn the servers' addresses.
        let members = alice.addresses(0).await.unwrap();
        assert_eq!(members.addresses, cluster.addrs());
        // Nothing was added or removed.
        assert_eq!(
            admin.list_users().await.unwrap(),
            vec![("admin".to_string(), true), ("alice".to_string(), false)]
        );
        // Adding again with the same token succeeds (a retry); another token is refused.
        admin
            .add_user("alice", &alice_creds.token, false)
            .await
            .unwrap();
        assert!(matches!(
            admin.add_user("alice", &token, false).await,
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            admin.add_user("bad name", &token, false).await,
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            admin.add_user("carol", "short", false).await,
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            admin.remove_user("admin").await,
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(admin.list_users().await.unwrap().len(), 2);
    });
}

#[test]
fn a_removed_user_is_refused_by_every_server_within_a_lease() {
    common::run(async {
        let (cluster, _) = common::start_healthy(3, &[]).await;
        let admin = common::client(&cluster).await;
        let alice_creds = add(&admin, "alice").await;
        let alice = client_as(&cluster, &alice_creds).await;
        alice.put(bytes("k"), bytes("v")).await.unwrap();
        // One connection per server, used before the removal: each read is that server's.
        let mut stubs: Vec<Stub> = (0..3)
            .map(|r| stub(&cluster, r, as_user(&alice_creds)))
            .collect();
        for (rank, s) in stubs.iter_mut().enumerate() {
            let deadline = Instant::now() + common::REQUEST_TIMEOUT;
            loop {
                match s.get(GetRequest { key: bytes("k") }).await {
                    Ok(r) => {
                        assert_eq!(r.into_inner().value, bytes("v"), "server {rank}");
                        break;
                    }
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("server {rank} not serving yet: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("server {rank} never served alice: {e}"),
                }
            }
        }

        assert!(admin.remove_user("alice").await.unwrap());
        let removed = Instant::now();
        for (rank, s) in stubs.iter_mut().enumerate() {
            loop {
                match s.get(GetRequest { key: bytes("k") }).await {
                    Err(e) if e.code() == Code::Unauthenticated => break,
                    other => {
                        assert!(
                            removed.elapsed() < LEASE,
                            "server {rank} still served alice {:?} after her removal: {other:?}",
                            removed.elapsed()
                        );
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
        // The client's pipelines, opened while she existed, are refused too.
        assert!(matches!(
            alice.get(bytes("k")).await,
            Err(Error::Unauthenticated(_))
        ));
        assert!(matches!(
            alice.put(bytes("k"), bytes("w")).await,
            Err(Error::Unauthenticated(_))
        ));
        assert!(!admin.remove_user("alice").await.unwrap());
        assert_eq!(
            admin.list_users().await.unwrap(),
            vec![("admin".to_string(), true)]
        );
    });
}

#[test]
fn users_survive_a_failover_and_a_wiped_disk() {
    common::run_for(Duration::from_secs(120), async {
        let (mut cluster, primary) = common::start_healthy(3, &[]).await;
        let admin = common::client(&cluster).await;
        let alice_creds = add(&admin, "alice").await;
        let alice = client_as(&cluster, &alice_creds).await;
        alice.put(bytes("k"), bytes("v1")).await.unwrap();

        cluster.kill(primary).unwrap();
        let (new_primary, _) = cluster
            .wait_for_primary(common::BOOT_TIMEOUT)
            .await
            .expect("a new primary");
        assert_ne!(new_primary, primary);
        assert_eq!(alice.get(bytes("k")).await.unwrap(), Some(bytes("v1")));
        alice.put(bytes("k"), bytes("v2")).await.unwrap();
        let bob_creds = add(&admin, "bob").await;

        // The old primary comes back with an empty disk: it copies the user table too.
        cluster.wipe(primary).unwrap();
        cluster.restart(primary).unwrap();
        cluster
            .wait_converged(common::BOOT_TIMEOUT * 2)
            .await
            .expect("the wiped server rejoins");
        let mut on_wiped = stub(&cluster, primary, as_user(&alice_creds));
        let v = on_wiped
            .get(GetRequest { key: bytes("k") })
            .await
            .expect("the wiped server knows alice")
            .into_inner();
        assert_eq!(v.value, bytes("v2"));
        let mut bob_there = stub(&cluster, primary, as_user(&bob_creds));
        assert!(
            !bob_there
                .get(GetRequest { key: bytes("k") })
                .await
                .unwrap()
                .into_inner()
                .found
        );
        let mut wrong = stub(
            &cluster,
            primary,
            as_user(&Credentials::new("alice", "0".repeat(64))),
        );
        assert_code(
            wrong.get(GetRequest { key: bytes("k") }).await,
            Code::Unauthenticated,
            "a wrong token at the wiped server",
        );
        // A removal reaches the rejoined server as well.
        admin.remove_user("alice").await.unwrap();
        assert_code(
            on_wiped.get(GetRequest { key: bytes("k") }).await,
            Code::Unauthenticated,
            "alice at the wiped server after her removal",
        );
    });
}
