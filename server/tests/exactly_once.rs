//! Exactly-once writes (docs/design.md §6): a request retried with the same
//! `(client_id, seq)` answers with the original result and is not applied
//! again, whichever server the retry goes to. These tests speak raw gRPC so
//! that they control the request ids.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use replikv_proto::kv::{DeleteRequest, PutRequest, RequestId};
use replikv_testkit::status::KvStub;
use replikv_testkit::LocalCluster;
use tonic::{Code, Status};

/// How long a raw request is retried while the server answers UNAVAILABLE
/// (e.g. a backup still acquiring its lease).
const RAW_RETRY_FOR: Duration = Duration::from_secs(5);

fn raw(cluster: &LocalCluster, rank: usize) -> KvStub {
    cluster.stub(rank, Duration::from_secs(5))
}

fn id(client_id: u64, seq: u64, first_unfinished: u64) -> Option<RequestId> {
    Some(RequestId {
        client_id,
        seq,
        first_unfinished,
        client_id_hi: 0,
    })
}

fn put_req(key: &str, value: &str, id: Option<RequestId>) -> PutRequest {
    PutRequest {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        id,
    }
}

/// Whether an error is one the protocol says to retry with the same id.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
    )
}

/// Sends `req` to one server, repeating it (same id) while the server says
/// UNAVAILABLE; returns the old value the put reported.
async fn put(stub: &mut KvStub, req: PutRequest) -> Option<String> {
    let deadline = Instant::now() + RAW_RETRY_FOR;
    loop {
        match stub.put(req.clone()).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                return reply
                    .had_old
                    .then(|| String::from_utf8_lossy(&reply.old_value).into_owned());
            }
            Err(status) if retryable(&status) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("put {:?} failed: {status}", req.key),
        }
    }
}

async fn delete(stub: &mut KvStub, req: DeleteRequest) -> Option<String> {
    let deadline = Instant::now() + RAW_RETRY_FOR;
    loop {
        match stub.delete(req.clone()).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                return reply
                    .had_old
                    .then(|| String::from_utf8_lossy(&reply.old_value).into_owned());
            }
            Err(status) if retryable(&status) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("delete {:?} failed: {status}", req.key),
        }
    }
}

fn some(s: &str) -> Option<String> {
    Some(s.to_string())
}

#[test]
fn retried_put_returns_the_original_old_value_and_applies_once() {
    common::run(async {
        let (cluster, primary) = common::start_healthy(3, &[]).await;
        let mut stub = raw(&cluster, primary);
        let (me, other) = (0x5eed_0001, 0x5eed_0002);

        assert_eq!(put(&mut stub, put_req("n", "1", id(me, 1, 1))).await, None);
        let second = put_req("n", "2", id(me, 2, 2));
        assert_eq!(put(&mut stub, second.clone()).await, some("1"));
        // Another client writes in between, so a second application of the
        // retry would be visible as "2" replacing "3".
        assert_eq!(
            put(&mut stub, put_req("n", "3", id(other, 1, 1))).await,
            some("2")
        );

        assert_eq!(
            put(&mut stub, second.clone()).await,
            some("1"),
            "a retry answers with the original old value"
        );
        assert_eq!(
            put(&mut stub, second).await,
            some("1"),
            "so does a second retry"
        );
        assert_eq!(
            put(&mut stub, put_req("n", "4", id(me, 3, 3))).await,
            some("3"),
            "the retries were not applied again"
        );
    });
}

#[test]
fn retry_through_another_server_is_applied_once() {
    common::run(async {
        let (cluster, primary) = common::start_healthy(3, &[]).await;
        let first_backup = (primary + 1) % cluster.len();
        let second_backup = (primary + 2) % cluster.len();
        let mut via_first = raw(&cluster, first_backup);
        let mut via_second = raw(&cluster, second_backup);
        let mut via_primary = raw(&cluster, primary);
        let (me, other) = (0x5eed_0011, 0x5eed_0012);

        assert_eq!(
            put(&mut via_first, put_req("m", "a", id(me, 1, 1))).await,
            None
        );
        let second = put_req("m", "b", id(me, 2, 2));
        assert_eq!(put(&mut via_first, second.clone()).await, some("a"));
        assert_eq!(
            put(&mut via_primary, put_req("m", "c", id(other, 1, 1))).await,
            some("b")
        );
        // The "lost reply" case: the same request, now through other servers.
        assert_eq!(put(&mut via_second, second.clone()).await, some("a"));
        assert_eq!(put(&mut via_primary, second).await, some("a"));
        assert_eq!(
            put(&mut via_second, put_req("m", "d", id(me, 3, 3))).await,
            some("c"),
            "the retries through other servers were not applied again"
        );

        // Deletes too: a retried delete reports what the first one removed,
        // and does not remove the value written after it.
        let remove = DeleteRequest {
            key: Bytes::from_static(b"m"),
            id: id(me, 4, 4),
        };
        assert_eq!(delete(&mut via_first, remove.clone()).await, some("d"));
        assert_eq!(
            put(&mut via_primary, put_req("m", "e", id(other, 2, 2))).await,
            None
        );
        assert_eq!(delete(&mut via_second, remove).await, some("d"));
        assert_eq!(
            put(&mut via_first, put_req("m", "f", id(me, 5, 5))).await,
            some("e"),
            "the retried delete removed nothing"
        );
    });
}

#[test]
fn retry_after_primary_crash_is_applied_once() {
    common::run(async {
        let (mut cluster, primary) = common::start_healthy(3, &[]).await;
        let mut via_old = raw(&cluster, primary);
        let (me, other) = (0x5eed_0021, 0x5eed_0022);

        assert_eq!(
            put(&mut via_old, put_req("x", "1", id(me, 1, 1))).await,
            None
        );
        let second = put_req("x", "2", id(me, 2, 2));
        assert_eq!(put(&mut via_old, second.clone()).await, some("1"));

        // The session table is replicated state (docs/design.md §3), so the new
        // primary knows the request as well as the old one did.
        cluster.kill(primary).unwrap();
        let (new_primary, _) = cluster
            .wait_for_primary(Duration::from_secs(5))
            .await
            .expect("a new primary after the crash");
        let mut via_new = raw(&cluster, new_primary);
        assert_eq!(
            put(&mut via_new, put_req("x", "3", id(other, 1, 1))).await,
            some("2")
        );
        assert_eq!(put(&mut via_new, second).await, some("1"));
        assert_eq!(
            put(&mut via_new, put_req("x", "4", id(me, 3, 3))).await,
            some("3"),
            "the retry to the new primary was not applied again"
        );
    });
}
