//! The clients of the nemesis run: each its own session, doing gets, puts of
//! values unique to the run, and a few deletes on a small key set, recording
//! every operation with its invocation and completion on the run clock.
//!
//! Some puts go to keys of their own ("witness" writes, never overwritten),
//! so that after the run every acknowledged one can be read back from every
//! server: a write lost anywhere shows as a missing key, not only as a
//! history the checker cannot order.

use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use replikv_client::{Client, Error};
use tokio::sync::watch;

use super::history::{Clock, Entry, Fate};
use replikv_lincheck::Call;

/// Share of operations that are gets; the rest are writes.
const GET_SHARE: f64 = 0.5;
/// Share of writes that are deletes (they exercise tombstones in transfers).
const DELETE_SHARE: f64 = 0.1;
/// Share of operations that are witness writes (to a key of their own).
const WITNESS_SHARE: f64 = 0.1;
/// Prefix of the witness keys; the shared keys do not start with it.
pub const WITNESS_PREFIX: &str = "ack-";
/// Margin over the client's own request timeout before this harness gives up
/// on an operation (the client library should give up first).
const DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// Decodes a value read back; values this harness writes are UTF-8, anything
/// else is shown (and compared) as its bytes.
pub fn text(bytes: &Bytes) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => format!("<bytes {:?}>", bytes.as_ref()),
    }
}

/// Runs one client session until `stop` turns true; returns its operations.
/// The operation in flight when `stop` turns true is finished and recorded.
pub async fn run_client(
    process: u64,
    client: Client,
    keys: Vec<String>,
    clock: Clock,
    request_timeout: Duration,
    seed: u64,
    stop: watch::Receiver<bool>,
) -> Vec<Entry> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut entries = Vec::new();
    let mut written = 0u64;
    let mut witnessed = 0u64;
    let deadline = request_timeout + DEADLINE_MARGIN;
    while !*stop.borrow() {
        let mut key = keys[rng.random_range(0..keys.len())].clone();
        let call = if rng.random_bool(WITNESS_SHARE) {
            witnessed += 1;
            key = witness_key(process, witnessed);
            Call::Put(format!("c{process}-a{witnessed}"))
        } else if rng.random_bool(GET_SHARE) {
            Call::Get
        } else if rng.random_bool(DELETE_SHARE) {
            Call::Delete
        } else {
            written += 1;
            Call::Put(format!("c{process}-{written}"))
        };
        let invoke = clock.now();
        let result = match &call {
            Call::Get => tokio::time::timeout(deadline, client.get(key.clone())).await,
            Call::Put(v) => {
                tokio::time::timeout(deadline, client.put(key.clone(), v.clone())).await
            }
            Call::Delete => tokio::time::timeout(deadline, client.delete(key.clone())).await,
            // Not drawn by this workload; run as asked if a caller ever builds one.
            Call::Cas { expected, new } => {
                let cas = client.cas(
                    key.clone(),
                    expected.clone().map(bytes::Bytes::from),
                    new.clone().map(bytes::Bytes::from),
                );
                tokio::time::timeout(deadline, async { cas.await.map(|r| r.current) }).await
            }
        };
        let complete = clock.now();
        let fate = match result {
            Ok(Ok(value)) => Fate::Ok(value.as_ref().map(text)),
            Ok(Err(e)) => fate_of_error(&call, &e),
            // The library did not give up in time; a write may still apply.
            Err(_) if call == Call::Get => Fate::Failed(format!("no answer within {deadline:?}")),
            Err(_) => Fate::Unknown(format!("no answer within {deadline:?}")),
        };
        entries.push(Entry {
            process,
            key,
            call,
            fate,
            invoke,
            complete,
        });
    }
    entries
}

/// The key of the `n`-th witness write of session `process`.
pub fn witness_key(process: u64, n: u64) -> String {
    format!("{WITNESS_PREFIX}c{process}-{n}")
}

/// Whether `entry` is an acknowledged witness write: its value must be
/// readable from every server once the cluster is healed.
pub fn is_acknowledged_witness(entry: &Entry) -> bool {
    entry.key.starts_with(WITNESS_PREFIX)
        && matches!(entry.call, Call::Put(_))
        && matches!(entry.fate, Fate::Ok(_))
}

/// A failed get tells nothing. A failed write is unknown unless the client
/// is sure it did not apply (docs/design.md §6: never a definite failure for an
/// outcome that may have taken effect).
fn fate_of_error(call: &Call, e: &Error) -> Fate {
    if *call != Call::Get && e.is_outcome_unknown() {
        Fate::Unknown(e.to_string())
    } else {
        Fate::Failed(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_errors_are_unknown_only_when_the_client_says_so() {
        let put = Call::Put("v".into());
        assert!(matches!(
            fate_of_error(&put, &Error::OutcomeUnknown("t".into())),
            Fate::Unknown(_)
        ));
        assert!(matches!(
            fate_of_error(&put, &Error::Unavailable("t".into())),
            Fate::Failed(_)
        ));
        assert!(matches!(
            fate_of_error(&Call::Get, &Error::OutcomeUnknown("t".into())),
            Fate::Failed(_)
        ));
    }

    #[test]
    fn non_utf8_values_stay_distinct() {
        assert_eq!(text(&Bytes::from_static(b"c1-2")), "c1-2");
        assert_ne!(
            text(&Bytes::from_static(&[0xff])),
            text(&Bytes::from_static(&[0xfe]))
        );
    }
}
