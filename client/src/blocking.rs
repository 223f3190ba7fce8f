//! [`BlockingClient`]: the async client behind a private tokio runtime, for
//! callers without one (the C library, scripts, tests with plain threads).

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
pub struct BlockingClient {
    // Declared before the runtime so it is dropped first: the client's
    // channels hold tasks on that runtime.
    client: Client,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for BlockingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockingClient")
            .field("client", &self.client)
            .finish_non_exhaustive()
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("replikv-client")
            .on_thread_start(block_sigpipe)
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("cannot start the client runtime: {e}")))?;
        let client = runtime.block_on(Client::connect(config))?;
        Ok(Self { client, runtime })
    }

    /// See [`Client::get`].
    pub fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, Error> {
        self.block_on(self.client.get(key))
    }

    /// See [`Client::put`].
    pub fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<Option<Bytes>, Error> {
        self.block_on(self.client.put(key, value))
    }

    /// See [`Client::delete`].
    pub fn delete(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, Error> {
        self.block_on(self.client.delete(key))
    }

    /// See [`Client::status`].
    pub fn status(&self, server: usize) -> Result<StatusResponse, Error> {
        self.block_on(self.client.status(server))
    }

    /// See [`Client::status_all`]. Inside an async runtime every entry is an
    /// [`Error::InvalidArgument`].
    pub fn status_all(&self) -> Vec<(String, Result<StatusResponse, Error>)> {
        match not_in_runtime() {
            Ok(()) => self.runtime.block_on(self.client.status_all()),
            Err(e) => self
                .client
                .servers()
                .iter()
                .map(|s| (s.clone(), Err(e.clone())))
                .collect(),
        }
    }

    /// See [`Client::wait_for_any`].
    pub fn wait_for_any(&self, timeout: Duration) -> Result<(), Error> {
        self.block_on(self.client.wait_for_any(timeout))
    }

    /// See [`Client::stats`].
    pub fn stats(&self) -> ClientStats {
        self.client.stats()
    }

    /// The async client inside.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn block_on<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        not_in_runtime()?;
        self.runtime.block_on(fut)
    }
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
        let on_worker = client.runtime.spawn(async { sigpipe_blocked() });
        let on_blocking = client.runtime.spawn_blocking(sigpipe_blocked);
        assert!(client.runtime.block_on(on_worker).unwrap(), "worker thread");
        assert!(
            client.runtime.block_on(on_blocking).unwrap(),
            "blocking thread"
        );
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
