//! The process-wide kv739 session: one `BlockingClient` between `kv739_init` and
//! `kv739_shutdown`.
//!
//! Gets and puts from many threads run at once: each takes a read lock only long enough to
//! clone an `Arc` of the client and then works without any lock. Init and shutdown are
//! serialised by a separate mutex, so a slow init (waiting for a server to answer) never
//! blocks calls on a session that is already up, and a shutdown while calls are in flight
//! only drops the session's slot: the client (and its runtime) is freed by whichever thread
//! lets go of the last `Arc`, after the calls in flight have finished.

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use replikv_client::{BlockingClient, ClientConfig};

/// The per-call deadline when `KV739_TIMEOUT_MS` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `kv739_init` waits for some listed server to answer when
/// `KV739_INIT_TIMEOUT_MS` is not set: long enough for a cluster that is still starting,
/// short enough that a wrong address list fails quickly.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(5);

/// The session every call uses. `None` outside init..shutdown.
static SESSION: RwLock<Option<Arc<BlockingClient>>> = RwLock::new(None);
/// Held for the whole of init and shutdown, which must not interleave with each other.
/// A std mutex (not the RwLock's write side) so that the seconds init may spend waiting
/// for a server do not stall gets and puts of a live session.
static LIFECYCLE: Mutex<()> = Mutex::new(());

/// Why an init did not happen; the C API folds all of these into -1.
#[derive(Debug, PartialEq, Eq)]
pub enum InitError {
    AlreadyInitialised,
    /// The client could not be built (e.g. its runtime failed to start).
    Client,
    /// No listed server answered within the init deadline.
    NoServerAnswered,
}

/// Reads a millisecond duration from the environment; unset, unparsable or zero means
/// `default`, so a typo cannot turn every call into an immediate failure.
fn env_duration(name: &str, default: Duration) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map_or(default, Duration::from_millis)
}

/// Starts a session on `servers` (already validated), or explains why not.
pub fn init(servers: Vec<String>) -> Result<(), InitError> {
    // A panic elsewhere while a lock was held leaves nothing half-updated here (each
    // critical section is a single assignment), so poisoning is safe to ignore.
    let _lifecycle = LIFECYCLE.lock().unwrap_or_else(PoisonError::into_inner);
    if current().is_some() {
        return Err(InitError::AlreadyInitialised);
    }
    let timeout = env_duration("KV739_TIMEOUT_MS", DEFAULT_TIMEOUT);
    let init_timeout = env_duration("KV739_INIT_TIMEOUT_MS", DEFAULT_INIT_TIMEOUT);
    let client = BlockingClient::connect(ClientConfig::new(servers).with_request_timeout(timeout))
        .map_err(|_| InitError::Client)?;
    client
        .wait_for_any(init_timeout)
        .map_err(|_| InitError::NoServerAnswered)?;
    *SESSION.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(client));
    Ok(())
}

/// Ends the session; false if there was none.
pub fn shutdown() -> bool {
    let _lifecycle = LIFECYCLE.lock().unwrap_or_else(PoisonError::into_inner);
    let taken = SESSION
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    // Dropped here, outside the RwLock: freeing the client shuts its runtime down, which
    // may take a moment and must not hold up threads that only want to see `None`.
    taken.is_some()
}

/// The live session's client, if any. The caller holds its own `Arc`, so a concurrent
/// shutdown cannot free the client under it.
pub fn current() -> Option<Arc<BlockingClient>> {
    SESSION
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_durations_fall_back_on_nonsense() {
        // Names unique to this test, so parallel tests cannot race on them.
        std::env::set_var("KV739_TEST_DUR_OK", "1500");
        std::env::set_var("KV739_TEST_DUR_ZERO", "0");
        std::env::set_var("KV739_TEST_DUR_BAD", "1.5s");
        let d = Duration::from_secs(7);
        assert_eq!(
            env_duration("KV739_TEST_DUR_OK", d),
            Duration::from_millis(1500)
        );
        assert_eq!(env_duration("KV739_TEST_DUR_ZERO", d), d);
        assert_eq!(env_duration("KV739_TEST_DUR_BAD", d), d);
        assert_eq!(env_duration("KV739_TEST_DUR_UNSET", d), d);
    }
}
