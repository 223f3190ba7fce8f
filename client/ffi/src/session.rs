//! The process-wide kv739 session: one `BlockingClient` between `kv739_init` and
//! `kv739_shutdown`.
//!
//! Gets and puts from many threads run at once: each takes a read lock only long enough to
//! clone an `Arc` of the client and then works without any lock. Init and shutdown are
//! serialised by a separate mutex, so a slow init (waiting for a server to answer) never
//! blocks calls on a session that is already up, and a shutdown while calls are in flight
//! only drops the session's slot: the client (and its runtime) is freed by whichever thread
//! lets go of the last `Arc`, after the calls in flight have finished.
//!
//! # Fork
//!
//! A program may fork with a session open (or after kv739_shutdown, or while another
//! thread is in kv739_init). Two things then go wrong unless handled:
//! - The locks. A lock held by a parent thread at the instant of fork is held forever in
//!   the child, whose copy of that thread does not exist: a slow kv739_init in another
//!   thread would leave the child's kv739_init and kv739_shutdown waiting forever, and a
//!   get that was cloning the session's `Arc` could block the child's write lock.
//!   So the locks live in a per-process [`State`], found through an atomic pointer tagged
//!   with the pid that made it: the first call in a child finds a state of another process
//!   and installs a fresh one of its own, reaching into the inherited state only with
//!   `try_` lock calls that never wait. (`pthread_atfork` handlers would also work, but
//!   would make every fork of the host wait for a kv739_init in flight, for seconds; the
//!   pid check costs one `getpid` per call.)
//! - The session. The inherited `BlockingClient` moves into the child's state, where it
//!   notices the fork itself and builds a client of the child's own, with a fresh session
//!   id, on its first call (see `BlockingClient`'s docs): calls on an inherited session
//!   work, in the child, on a session of its own, and kv739_shutdown in the child never
//!   waits for the parent's runtime threads. Only if the inherited slot was locked at the
//!   fork (a parent thread was in init or shutdown) is the session lost: calls in the child
//!   return -1 until it calls kv739_init.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, TryLockError};
use std::time::Duration;

use replikv_client::{BlockingClient, ClientConfig};

/// The per-call deadline when `KV739_TIMEOUT_MS` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `kv739_init` waits for some listed server to answer when
/// `KV739_INIT_TIMEOUT_MS` is not set: long enough for a cluster that is still starting,
/// short enough that a wrong address list fails quickly.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the library holds for one process.
struct State {
    /// The process these locks belong to.
    pid: u32,
    /// The session every call uses. `None` outside init..shutdown.
    session: RwLock<Option<Arc<BlockingClient>>>,
    /// Held for the whole of init and shutdown, which must not interleave with each
    /// other. A std mutex (not the RwLock's write side) so that the seconds init may spend
    /// waiting for a server do not stall gets and puts of a live session.
    lifecycle: Mutex<()>,
}

/// The current process's [`State`]: a leaked `Box`, never freed (so references to it are
/// `'static`), replaced only by a child of the process that made it.
static STATE: AtomicPtr<State> = AtomicPtr::new(ptr::null_mut());

/// This process's state, made on first use here (the first use at all, or the first in a
/// forked child; see the module docs).
fn state() -> &'static State {
    let pid = std::process::id();
    let mut seen = STATE.load(Ordering::Acquire);
    loop {
        // SAFETY: every pointer stored in STATE comes from `Box::into_raw` and is never
        // freed, so it is valid for the rest of the process.
        let current = unsafe { seen.as_ref() };
        if let Some(state) = current.filter(|s| s.pid == pid) {
            return state;
        }
        let fresh = Box::into_raw(Box::new(State {
            pid,
            session: RwLock::new(current.and_then(take_inherited)),
            lifecycle: Mutex::new(()),
        }));
        match STATE.compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: just published, never freed.
            Ok(_) => return unsafe { &*fresh },
            Err(now) => {
                // Another thread of this process installed its state first. Ours was never
                // published; the inherited session, if this thread was the one to take it,
                // goes to the winner's state (whose slot it would have filled).
                // SAFETY: `fresh` was never published, so this is its only owner.
                let ours = unsafe { Box::from_raw(fresh) };
                let taken = ours
                    .session
                    .into_inner()
                    .unwrap_or_else(PoisonError::into_inner);
                // SAFETY: as above, a published pointer is valid for good.
                if let (Some(session), Some(winner)) = (taken, unsafe { now.as_ref() }) {
                    hand_over(winner, session);
                }
                seen = now;
            }
        }
    }
}

/// Takes the session out of a parent's state without ever waiting: `None` if there is
/// none, or if a parent thread held the slot's lock at the fork (it never will release it
/// here).
fn take_inherited(parent: &State) -> Option<Arc<BlockingClient>> {
    match parent.session.try_write() {
        Ok(mut slot) => slot.take(),
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().take(),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Gives the session taken by [`take_inherited`] to the state another thread of this
/// process installed first, unless that one already has a session (a kv739_init that ran
/// in between wins; the inherited client is then dropped, which waits for nothing).
fn hand_over(winner: &State, session: Arc<BlockingClient>) {
    if winner.pid != std::process::id() {
        return;
    }
    // This process's own lock: whoever holds it exists here and lets go soon.
    let mut slot = winner
        .session
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    if slot.is_none() {
        *slot = Some(session);
    }
}

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
    let state = state();
    // A panic elsewhere while a lock was held leaves nothing half-updated here (each
    // critical section is a single assignment), so poisoning is safe to ignore.
    let _lifecycle = state
        .lifecycle
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if current().is_some() {
        return Err(InitError::AlreadyInitialised);
    }
    let timeout = env_duration("KV739_TIMEOUT_MS", DEFAULT_TIMEOUT);
    let init_timeout = env_duration("KV739_INIT_TIMEOUT_MS", DEFAULT_INIT_TIMEOUT);
    let config = ClientConfig::new(servers).with_request_timeout(timeout);
    let mut client = BlockingClient::connect(config.clone()).map_err(|_| InitError::Client)?;
    client
        .wait_for_any(init_timeout)
        .map_err(|_| InitError::NoServerAnswered)?;
    if client.client().is_ok_and(|c| c.servers().len() == 1) {
        // One server given, and it was not up yet when the client was built: now that it
        // answers, a new client learns the other members from it (see `Client::connect`),
        // so the session survives that server's death.
        client = BlockingClient::connect(config).map_err(|_| InitError::Client)?;
    }
    *state
        .session
        .write()
        .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(client));
    Ok(())
}

/// Ends the session; false if there was none.
pub fn shutdown() -> bool {
    let state = state();
    let _lifecycle = state
        .lifecycle
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let taken = state
        .session
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    // Dropped here, outside the RwLock: freeing the client shuts its runtime down, which
    // may take a moment and must not hold up threads that only want to see `None`. (A
    // client inherited across fork and never used here frees nothing of the parent's:
    // see `BlockingClient`.)
    taken.is_some()
}

/// The live session's client, if any. The caller holds its own `Arc`, so a concurrent
/// shutdown cannot free the client under it.
pub fn current() -> Option<Arc<BlockingClient>> {
    state()
        .session
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on another thread and fails the test if it takes more than a few seconds,
    /// instead of hanging the test run.
    fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a call waited on a lock held by a thread that does not exist")
    }

    /// Installs, as the current state, a state that another process (a parent, as seen
    /// from its forked child) left behind with `session` in its slot.
    fn parent_state(session: Option<Arc<BlockingClient>>) -> &'static State {
        let parent: &'static State = Box::leak(Box::new(State {
            pid: std::process::id().wrapping_add(1),
            session: RwLock::new(session),
            lifecycle: Mutex::new(()),
        }));
        STATE.store(ptr::from_ref(parent).cast_mut(), Ordering::SeqCst);
        parent
    }

    /// What a forked child finds, made without forking: the state of another pid. (The
    /// only test that touches the global state, so nothing races with it.)
    #[test]
    fn a_child_takes_over_the_session_and_never_waits_on_the_parents_locks() {
        // The parent was in kv739_init (lifecycle held) and swapping the session (slot
        // locked) when it forked: those threads do not exist in the child.
        let parent = parent_state(None);
        std::mem::forget(parent.lifecycle.lock().unwrap());
        std::mem::forget(parent.session.write().unwrap());
        assert!(
            bounded(current).is_none(),
            "the locked slot's session is lost"
        );
        assert!(!bounded(shutdown), "no session to end");
        assert_eq!(state().pid, std::process::id());

        // A session open across the fork moves into the child's state, and shutdown in the
        // child ends it there.
        let client =
            Arc::new(BlockingClient::connect(ClientConfig::new(["127.0.0.1:1"])).expect("client"));
        parent_state(Some(client.clone()));
        let inherited = bounded(current).expect("the inherited session is the child's");
        assert!(Arc::ptr_eq(&inherited, &client));
        drop(inherited);
        drop(client);
        assert!(bounded(shutdown));
        assert!(bounded(current).is_none());
        assert!(!bounded(shutdown));
    }

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
