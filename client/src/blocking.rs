//! [`BlockingClient`]: the async client behind a private tokio runtime, for
//! callers without one (the C library, scripts, tests with plain threads).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Duration;

use bytes::Bytes;
use replikv_proto::kv::StatusResponse;

use crate::client::{Client, ClientStats};
use crate::config::ClientConfig;
use crate::error::Error;

/// Worker threads of the private runtime: the client mostly waits on the
/// network, so two are enough to keep timers and connections moving while
/// many caller threads block.
const WORKER_THREADS: usize = 2;

/// A blocking replikv client. Its methods take `&self` and may be called
/// from many threads at once; each call blocks its thread until the request
/// finishes. It must not be used or dropped from inside an async runtime
/// (use [`Client`] there); calls made there fail with
/// [`Error::InvalidArgument`] instead of deadlocking.
///
/// # Fork
///
/// A `BlockingClient` may be used in a child process after `fork`: it
/// notices that the process changed (it remembers the pid it was built in)
/// and, on the child's first call, transparently builds a client of the
/// child's own from the same configuration: a new runtime, new connections
/// and a **fresh session id** (also when the configuration fixed one with
/// [`ClientConfig::with_client_id`], which would otherwise collide with the
/// parent's session). The child's copy of the parent's client is abandoned,
/// never used or dropped: its runtime threads do not exist in the child, so
/// waiting on them would hang forever. The parent's client is unaffected.
/// So a call in a child works, within its deadline, like a call on a new
/// client; [`BlockingClient::stats`] count from zero there. Building the
/// child's client can only fail if the child cannot start threads or read
/// random bytes; the call then fails at once with that error. Dropping a
/// `BlockingClient` in a child never waits for the parent's threads either.
///
/// The abandoned client's memory and its copies of the parent's sockets stay
/// with the child until it exits. Building a runtime in the child of a
/// multi-threaded process relies on the C library keeping the allocator usable
/// after `fork` and letting the child start threads, as glibc and musl do.
/// An async [`Client`] has no such guard: its connections run on the
/// runtime it was built on.
pub struct BlockingClient {
    /// What the client is built from, kept to build a child's own after fork.
    config: ClientConfig,
    /// The client of the process that last used this value: a leaked
    /// `Box<Live>`, swapped for a fresh one when a call finds itself in a
    /// process other than the one it was built in (a forked child).
    ///
    /// Lock-free on purpose: a lock that a parent thread held at the instant
    /// of `fork` stays held forever in the child (its holder does not exist
    /// there), so the path a child takes to notice the fork must not wait on
    /// anything a parent thread could have held. A `Live` that was ever
    /// published here is freed only by `Drop` (which has `&mut self`, so no
    /// call can be reading it), and only in the process that built it; a
    /// replaced one (always a parent's) is leaked, which is what lets calls
    /// hand out plain references into it.
    live: AtomicPtr<Live>,
    /// For drop check and auto traits: this value owns a `Live`.
    _owns: PhantomData<Box<Live>>,
}

/// A client together with the runtime it runs on, in the process that built it.
struct Live {
    /// The process that built this runtime; its threads exist only there.
    pid: u32,
    // Declared before the runtime so it is dropped first: the client's
    // channels hold tasks on that runtime.
    client: Client,
    runtime: tokio::runtime::Runtime,
}

impl Live {
    /// Starts a private runtime and builds the client on it (no network I/O;
    /// see [`Client::connect`]).
    fn start(config: ClientConfig) -> Result<Live, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("replikv-client")
            .on_thread_start(block_sigpipe)
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("cannot start the client runtime: {e}")))?;
        let client = runtime.block_on(Client::connect(config))?;
        Ok(Live {
            pid: std::process::id(),
            client,
            runtime,
        })
    }
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut debug = f.debug_struct("BlockingClient");
        if let Some(live) = self.here() {
            debug.field("client", &live.client);
        }
        debug.finish_non_exhaustive()
    }
}

/// Blocks SIGPIPE on the calling thread (each of the private runtime's threads). A C or C++
/// program that hosts this client (the kv739 library) keeps SIGPIPE's default action, which
/// ends the process, and a write to a connection whose server has just died raises it (HTTP/2
/// writes use `writev`, which cannot ask for `MSG_NOSIGNAL`). Blocked, the write fails with
/// `EPIPE` and the request fails over like after any broken connection. The host's own
/// signal handling is left as it is.
fn block_sigpipe() {
    // SAFETY: `set` is a local signal set initialised by `sigemptyset` before use, and
    // `pthread_sigmask` only changes the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

impl BlockingClient {
    /// Starts the private runtime and builds the client on it (no network
    /// I/O; see [`Client::connect`]).
    pub fn connect(config: ClientConfig) -> Result<Self, Error> {
        not_in_runtime()?;
        let live = Live::start(config.clone())?;
        Ok(Self {
            config,
            live: AtomicPtr::new(Box::into_raw(Box::new(live))),
            _owns: PhantomData,
        })
    }

    /// See [`Client::get`].
    pub fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, Error> {
        self.block_on(|client| client.get(key))
    }

    /// See [`Client::put`].
    pub fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<Option<Bytes>, Error> {
        self.block_on(|client| client.put(key, value))
    }

    /// See [`Client::delete`].
    pub fn delete(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, Error> {
        self.block_on(|client| client.delete(key))
    }

    /// See [`Client::status`].
    pub fn status(&self, server: usize) -> Result<StatusResponse, Error> {
        self.block_on(|client| client.status(server))
    }

    /// See [`Client::status_all`]. Inside an async runtime (or if a forked
    /// child cannot build its client) every entry is that error.
    pub fn status_all(&self) -> Vec<(String, Result<StatusResponse, Error>)> {
        match not_in_runtime().and_then(|()| self.live()) {
            Ok(live) => live.runtime.block_on(live.client.status_all()),
            Err(e) => parse_or_empty(&self.config)
                .into_iter()
                .map(|s| (s, Err(e.clone())))
                .collect(),
        }
    }

    /// See [`Client::wait_for_any`].
    pub fn wait_for_any(&self, timeout: Duration) -> Result<(), Error> {
        self.block_on(|client| client.wait_for_any(timeout))
    }

    /// See [`Client::stats`]. In a forked child that has not called anything
    /// yet, all zero (the parent's counts are the parent's).
    pub fn stats(&self) -> ClientStats {
        self.here()
            .map_or_else(ClientStats::default, |live| live.client.stats())
    }

    /// The async client of this process (in a forked child, built by this
    /// call; see [Fork](#fork)). Its connections run on this client's private
    /// runtime, which lives as long as the `BlockingClient`.
    pub fn client(&self) -> Result<&Client, Error> {
        self.live().map(|live| &live.client)
    }

    /// Runs a request of this process's client on its runtime.
    fn block_on<'a, T, Fut>(&'a self, request: impl FnOnce(&'a Client) -> Fut) -> Result<T, Error>
    where
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        not_in_runtime()?;
        let live = self.live()?;
        live.runtime.block_on(request(&live.client))
    }

    /// The current `Live` if it was built in this process.
    fn here(&self) -> Option<&Live> {
        // SAFETY: a published `Live` stays valid while `self` is borrowed (see `live`).
        let live = unsafe { &*self.live.load(Ordering::Acquire) };
        (live.pid == std::process::id()).then_some(live)
    }

    /// The client of this process: the current one, or, in a process forked
    /// since it was built, a new one built here and published in its place.
    fn live(&self) -> Result<&Live, Error> {
        let pid = std::process::id();
        let mut seen = self.live.load(Ordering::Acquire);
        loop {
            // SAFETY: `seen` was published in `self.live`, and a published `Live`
            // is freed only by `Drop`, which cannot run while `self` is borrowed.
            let live = unsafe { &*seen };
            if live.pid == pid {
                return Ok(live);
            }
            // `seen` belongs to a parent process. Several threads of the child
            // may get here at once: each builds a client, one is published, the
            // others are dropped (they are this process's own, so dropping them
            // is safe) and their threads use the published one.
            let fresh = Live::start(ClientConfig {
                client_id: None,
                ..self.config.clone()
            })?;
            let fresh = Box::into_raw(Box::new(fresh));
            match self
                .live
                .compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire)
            {
                // The parent's `Live` (`seen`) is now unreachable and leaked on
                // purpose: dropping it would wait for threads that do not exist.
                // SAFETY: just published; freed only by `Drop`.
                Ok(_) => return Ok(unsafe { &*fresh }),
                Err(current) => {
                    // SAFETY: `fresh` was never published, so this is its only owner.
                    drop(unsafe { Box::from_raw(fresh) });
                    seen = current;
                }
            }
        }
    }
}

impl Drop for BlockingClient {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `Box::into_raw` and `&mut self` means no
        // call is using it; after this nothing reads `self.live` again.
        let live = unsafe { Box::from_raw(*self.live.get_mut()) };
        if live.pid != std::process::id() {
            // A parent's client, copied by fork: its runtime's threads are not
            // in this process, and shutting the runtime down would wait for them.
            std::mem::forget(live);
        }
    }
}

/// The configured servers, for error lists; empty if the list does not parse
/// (it did when the client was built, so it always does).
fn parse_or_empty(config: &ClientConfig) -> Vec<String> {
    crate::config::parse_servers(&config.servers).unwrap_or_default()
}

/// `Runtime::block_on` panics when called from async code; report it as a
/// usage error instead.
fn not_in_runtime() -> Result<(), Error> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::InvalidArgument(
            "BlockingClient called from inside an async runtime; use Client there".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_send_and_sync() {
        fn shared_across_threads<T: Send + Sync>() {}
        shared_across_threads::<BlockingClient>();
    }

    #[test]
    fn bad_config_is_reported_not_panicked() {
        let err = BlockingClient::connect(ClientConfig::new(["no port"])).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
    }

    #[test]
    fn input_errors_come_back_from_every_thread() {
        let client = BlockingClient::connect(ClientConfig::new(["127.0.0.1:1"])).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    assert!(matches!(client.get(""), Err(Error::InvalidArgument(_))));
                });
            }
        });
    }

    /// Whether SIGPIPE is blocked on the calling thread.
    fn sigpipe_blocked() -> bool {
        // SAFETY: reads the calling thread's mask into a local set.
        unsafe {
            let mut mask: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask);
            libc::sigismember(&mask, libc::SIGPIPE) == 1
        }
    }

    /// A C host keeps SIGPIPE's default action (end the process); the client's threads, which
    /// do its socket writes, must not take it when a server dies under them.
    #[test]
    fn the_client_threads_never_take_sigpipe() {
        assert!(!sigpipe_blocked(), "the test's own thread starts unblocked");
        let client = BlockingClient::connect(ClientConfig::new(["127.0.0.1:1"])).unwrap();
        let runtime = &client.live().unwrap().runtime;
        let on_worker = runtime.spawn(async { sigpipe_blocked() });
        let on_blocking = runtime.spawn_blocking(sigpipe_blocked);
        assert!(runtime.block_on(on_worker).unwrap(), "worker thread");
        assert!(runtime.block_on(on_blocking).unwrap(), "blocking thread");
        assert!(!sigpipe_blocked(), "the caller's thread is left alone");
    }

    #[tokio::test]
    async fn use_inside_a_runtime_is_an_error() {
        assert!(matches!(
            BlockingClient::connect(ClientConfig::new(["127.0.0.1:1"])),
            Err(Error::InvalidArgument(_))
        ));
    }
}
