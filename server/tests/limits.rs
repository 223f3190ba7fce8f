//! Limits against abusive clients (docs/security.md): one connection holds at most
//! `MAX_CLIENT_STREAMS` calls open at once; past that its calls wait, and other clients are
//! served as before.

mod common;

use std::time::Duration;

use common::bytes;
use replikv_proto::kv::{GetRequest, PipelineRequest};
use replikv_server::MAX_CLIENT_STREAMS;

#[test]
fn one_connection_cannot_hold_more_than_its_share_of_calls() {
    common::run(async {
        let (cluster, primary) = common::start_healthy(3, &[]).await;
        // One connection: clones of a stub share it.
        let channel = cluster.stub(primary, Duration::from_secs(30));
        // Open the connection's whole share of calls and keep them open.
        let mut held = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..MAX_CLIENT_STREAMS {
            let (tx, rx) = tokio::sync::mpsc::channel::<PipelineRequest>(1);
            let mut c = channel.clone();
            held.push(tokio::spawn(async move {
                c.pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            }));
            senders.push(tx);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // One more call on the same connection waits for a free stream...
        let mut same = channel.clone();
        let waited = tokio::time::timeout(
            Duration::from_secs(1),
            same.get(GetRequest { key: bytes("k") }),
        )
        .await;
        assert!(waited.is_err(), "the extra call got a stream: {waited:?}");
        // ...while another client is served at once.
        let mut other = cluster.stub(primary, Duration::from_secs(30));
        tokio::time::timeout(
            Duration::from_secs(2),
            other.get(GetRequest { key: bytes("k") }),
        )
        .await
        .expect("another connection is served")
        .expect("get");
        drop(senders);
        for h in held {
            h.abort();
        }
    });
}
