//! Bad input changes nothing: requests over the limits are refused with
//! INVALID_ARGUMENT naming the limit, and a server given a bad configuration
//! refuses to start with one clear line instead of running half-configured.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::bytes;
use replikv_client::Error;
use replikv_proto::kv::{DeleteRequest, GetRequest, PutRequest, RequestId};
use replikv_testkit::status::KvStub;
use tonic::Code;

const MAX_KEY: usize = replikv_proto::DEFAULT_MAX_KEY_BYTES;
/// Kept small so that an oversized value is cheap to send.
const MAX_VALUE: usize = 1024;

fn raw(cluster: &common::LocalCluster, rank: usize) -> KvStub {
    cluster.stub(rank, Duration::from_secs(5))
}

/// A well-formed request id, so that only the key or value can be at fault.
fn some_id(seq: u64) -> Option<RequestId> {
    Some(RequestId {
        client_id: 0xbad1d,
        seq,
        first_unfinished: seq,
        client_id_hi: 0,
    })
}

/// Fails unless `result` is INVALID_ARGUMENT whose message contains `names`.
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, names: &str, what: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status}");
            assert!(
                status.message().contains(names),
                "{what}: the message {:?} should name {names:?}",
                status.message()
            );
        }
        Ok(reply) => panic!("{what} was accepted: {reply:?}"),
    }
}

#[test]
fn oversized_or_empty_input_is_refused_and_changes_nothing() {
    common::run(async {
        let max_value = MAX_VALUE.to_string();
        let (cluster, primary) = common::start_healthy(3, &["--max-value-bytes", &max_value]).await;
        let client = common::client(&cluster).await;
        client.put(bytes("k"), bytes("orig")).await.unwrap();

        // The largest key and value are accepted: the limits are inclusive.
        let max_key = Bytes::from(vec![b'a'; MAX_KEY]);
        let max_val = Bytes::from(vec![b'v'; MAX_VALUE]);
        client.put(max_key.clone(), max_val.clone()).await.unwrap();

        let applied_before = common::status(&cluster, primary).await.applied;
        let long_key = Bytes::from(vec![b'a'; MAX_KEY + 1]);
        let long_value = Bytes::from(vec![b'v'; MAX_VALUE + 1]);
        let limit_key = MAX_KEY.to_string();
        // Both the primary and a backup (which would forward) must check.
        for rank in [primary, (primary + 1) % cluster.len()] {
            let mut stub = raw(&cluster, rank);
            let at = |what: &str| format!("{what} at server {rank}");
            // Distinct ids per server, so no request looks like a retry of another.
            let seq = |n: u64| some_id(rank as u64 * 10 + n);
            let put = |key: &Bytes, value: &Bytes, n| PutRequest {
                key: key.clone(),
                value: value.clone(),
                id: seq(n),
            };
            assert_invalid(
                stub.put(put(&Bytes::new(), &bytes("v"), 1)).await,
                "empty",
                &at("put with an empty key"),
            );
            assert_invalid(
                stub.put(put(&long_key, &bytes("v"), 2)).await,
                &limit_key,
                &at("put with a 1025-byte key"),
            );
            assert_invalid(
                stub.put(put(&bytes("k"), &long_value, 3)).await,
                &max_value,
                &at("put with an oversized value"),
            );
            assert_invalid(
                stub.delete(DeleteRequest {
                    key: Bytes::new(),
                    id: seq(4),
                })
                .await,
                "empty",
                &at("delete with an empty key"),
            );
            assert_invalid(
                stub.delete(DeleteRequest {
                    key: long_key.clone(),
                    id: seq(5),
                })
                .await,
                &limit_key,
                &at("delete with a 1025-byte key"),
            );
            assert_invalid(
                stub.get(GetRequest { key: Bytes::new() }).await,
                "empty",
                &at("get with an empty key"),
            );
            assert_invalid(
                stub.get(GetRequest {
                    key: long_key.clone(),
                })
                .await,
                &limit_key,
                &at("get with a 1025-byte key"),
            );
        }

        // Through the client library: refused without retries, as a definite failure.
        let started = Instant::now();
        match client.put(bytes("k"), long_value.clone()).await {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains(&max_value), "{msg}"),
            other => panic!("oversized value through the client: {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "bad input is not retried until the deadline"
        );
        assert!(matches!(
            client.put(long_key.clone(), bytes("v")).await,
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            client.put(Bytes::new(), bytes("v")).await,
            Err(Error::InvalidArgument(_))
        ));

        assert_eq!(
            common::status(&cluster, primary).await.applied,
            applied_before,
            "no refused request was applied"
        );
        for rank in 0..cluster.len() {
            let reader = common::pinned(&cluster, rank).await;
            assert_eq!(
                reader.get(bytes("k")).await.unwrap(),
                Some(bytes("orig")),
                "server {rank}: the key keeps its value"
            );
            assert_eq!(
                reader.get(max_key.clone()).await.unwrap(),
                Some(max_val.clone()),
                "server {rank}: the largest key and value are stored"
            );
        }
    });
}

/// Kills and reaps a server that was expected to exit, if it did not.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the server binary with `args` and returns its stderr, asserting that
/// it exits with a failure status within 5 s and prints exactly one line.
fn expect_startup_failure(args: &[String], what: &str) -> String {
    let child = Command::new(env!("CARGO_BIN_EXE_replikv-server"))
        .args(args)
        // Judge the default output, whatever the environment of the test run.
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn replikv-server");
    let mut child = Reap(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for replikv-server") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the server is still running after 5 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.0.stderr.take() {
        pipe.read_to_string(&mut stderr)
            .expect("read the server's stderr");
    }
    assert!(!status.success(), "{what}: exited with {status}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line, got {stderr:?}");
    lines[0].to_string()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn malformed_configuration_exits_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();

    let file = dir.path().join("server.toml");
    std::fs::write(
        &file,
        format!("rank = \"zero\"\npeers = [\"127.0.0.1:1\"]\ndata_dir = \"{data}\"\n"),
    )
    .unwrap();
    let line = expect_startup_failure(
        &args(&["--config", file.to_str().unwrap()]),
        "wrong type in the config file",
    );
    assert!(line.contains("invalid type"), "{line}");
    assert!(line.contains("server.toml"), "names the file: {line}");

    let line = expect_startup_failure(
        &args(&[
            "--rank",
            "3",
            "--peers",
            "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3",
            "--data-dir",
            data,
        ]),
        "rank out of range",
    );
    assert!(line.contains("out of range"), "{line}");

    let line = expect_startup_failure(
        &args(&[
            "--rank",
            "0",
            "--peers",
            "127.0.0.1:1,127.0.0.1",
            "--data-dir",
            data,
        ]),
        "peer without a port",
    );
    assert!(line.contains("host:port"), "{line}");

    let line = expect_startup_failure(
        &args(&["--rank", "0", "--peers", "127.0.0.1:1"]),
        "no data directory",
    );
    assert!(line.contains("data-dir"), "{line}");
}
