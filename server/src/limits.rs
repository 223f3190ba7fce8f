//! Limits against abusive clients and heavy work (docs/security.md "Limits"): how many
//! connections each listener holds, how many client requests a server serves at once, and
//! how many catch-up state transfers it runs at once. Each limit refuses what is over it at
//! once, with a clear error, instead of letting it queue and stall everyone else.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

use crate::error::ServeError;

/// Default for `--max-connections`: client connections one server holds open.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default for `--max-peer-connections`: connections on the peer port. Each other server
/// holds one or two; the rest is room for tools and reconnects.
pub const DEFAULT_MAX_PEER_CONNECTIONS: usize = 128;
/// Default for `--max-client-streams`: calls one client connection holds open at once;
/// `Pipeline` multiplexes many requests over one.
pub const DEFAULT_MAX_CLIENT_STREAMS: u32 = 256;
/// Default for `--max-in-flight`: client requests one server serves at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;
/// Default for `--max-transfers`: catch-up transfers one server serves at once.
pub const DEFAULT_MAX_TRANSFERS: usize = 2;

/// How often at most a listener logs that it refused connections.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);

/// The server's capacity limits, from its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Open connections on the client port; further ones are closed as they are accepted.
    pub max_connections: usize,
    /// Open connections on the peer port.
    pub max_peer_connections: usize,
    /// Concurrent calls (HTTP/2 streams) per client connection.
    pub max_client_streams: u32,
    /// Client requests served at once; further ones get RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// Catch-up state transfers served at once; further ones are refused and retried.
    pub max_transfers: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_peer_connections: DEFAULT_MAX_PEER_CONNECTIONS,
            max_client_streams: DEFAULT_MAX_CLIENT_STREAMS,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_transfers: DEFAULT_MAX_TRANSFERS,
        }
    }
}

/// The accepted sockets of `incoming`, at most `max` open at once: a socket accepted while
/// `max` are open is closed at once (its client sees the connection reset and may try
/// another server), so a flood of connections cannot exhaust the server's file descriptors
/// or memory, and the connections already open are served as before.
pub fn limit_connections(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    max: usize,
    listener: &'static str,
) -> impl Stream<Item = io::Result<Counted>> + Send + 'static {
    let open = Arc::new(Semaphore::new(max));
    let refusals = Arc::new(RefusalLog::default());
    incoming.filter_map(move |accepted| {
        let open = open.clone();
        let refusals = refusals.clone();
        async move {
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => return Some(Err(e)),
            };
            match open.try_acquire_owned() {
                Ok(permit) => Some(Ok(Counted {
                    inner: stream,
                    _permit: permit,
                })),
                Err(_) => {
                    refusals.refused(listener, max);
                    None
                }
            }
        }
    })
}

/// Logs refused connections at most once per [`REFUSAL_LOG_EVERY`], with how many.
#[derive(Default)]
struct RefusalLog {
    /// `std::sync::Mutex`: a counter and a time, never held across an await.
    state: Mutex<(u64, Option<Instant>)>,
}

impl RefusalLog {
    fn refused(&self, listener: &'static str, max: usize) {
        let mut st = self.state.lock().expect("refusal log lock");
        st.0 += 1;
        if st.1.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
            warn!(
                listener,
                max,
                refused = st.0,
                "connection limit reached: closing new connections"
            );
            *st = (0, Some(Instant::now()));
        }
    }
}

/// An accepted connection that counts against its listener's limit until it closes.
pub struct Counted {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The client requests a server serves at once (`--max-in-flight`), shared fairly between
/// client connections. A request over the limit is refused at once with RESOURCE_EXHAUSTED,
/// before it does anything (docs/design.md §6): a flood is turned away instead of queueing
/// in front of every other client's requests at the sequencer or on the forward to the
/// primary.
///
/// Fair share: with `a` connections holding requests, one connection may hold at most
/// `max / (a + 1)`, so there is always room for a connection that arrives, and a client
/// that floods the server is refused while a well-behaved one keeps being served.
#[derive(Clone)]
pub struct InFlight {
    inner: Arc<InFlightInner>,
}

#[derive(Debug)]
struct InFlightInner {
    max: usize,
    /// `std::sync::Mutex`: a few counter updates per request, never held across an await.
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    /// Requests held per client connection (its remote address); only non-zero counts.
    by_origin: HashMap<SocketAddr, usize>,
}

/// One admitted request; its place is freed when this is dropped.
#[derive(Debug)]
pub struct Admitted {
    inner: Arc<InFlightInner>,
    origin: Option<SocketAddr>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut held = self.inner.held.lock().expect("in-flight lock");
        held.total -= 1;
        if let Some(o) = self.origin {
            if let Some(n) = held.by_origin.get_mut(&o) {
                *n -= 1;
                if *n == 0 {
                    held.by_origin.remove(&o);
                }
            }
        }
    }
}

impl InFlight {
    pub fn new(max: usize) -> Self {
        InFlight {
            inner: Arc::new(InFlightInner {
                max,
                held: Mutex::new(Held::default()),
            }),
        }
    }

    /// A place for one request of the connection `origin` (if known), held until it is
    /// answered.
    pub fn admit(&self, origin: Option<SocketAddr>) -> Result<Admitted, ServeError> {
        let max = self.inner.max;
        let mut held = self.inner.held.lock().expect("in-flight lock");
        if held.total >= max {
            return Err(ServeError::Overloaded(format!(
                "this server is serving its limit of {max} requests (--max-in-flight); \
                 nothing was applied, retry after a backoff"
            )));
        }
        if let Some(o) = origin {
            let mine = held.by_origin.get(&o).copied().unwrap_or(0);
            let others = held.by_origin.len() - usize::from(mine > 0);
            let share = (max / (others + 2)).max(1);
            if mine >= share {
                return Err(ServeError::Overloaded(format!(
                    "this connection holds {mine} requests, its share of this server's \
                     {max} (--max-in-flight); nothing was applied, retry after a backoff"
                )));
            }
            *held.by_origin.entry(o).or_insert(0) += 1;
        }
        held.total += 1;
        Ok(Admitted {
            inner: self.inner.clone(),
            origin,
        })
    }
}

/// The catch-up transfers a server serves at once (`--max-transfers`; docs/design.md §7).
/// Each runs on a blocking thread reading sled; bounding them keeps a few rejoining servers
/// from taking the disk, the CPU and the blocking pool that the write-ahead log's flushes
/// also run on, so writes keep being acknowledged while they run.
#[derive(Clone)]
pub struct TransferPool {
    permits: Arc<Semaphore>,
    max: usize,
}

impl TransferPool {
    pub fn new(max: usize) -> Self {
        TransferPool {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A place for one transfer, held until its last chunk is built; `None` when
    /// `max` are running.
    pub fn try_start(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn in_flight_refuses_past_its_limit_and_frees_on_drop() {
        let limit = InFlight::new(2);
        let a = limit.admit(None).expect("first");
        let _b = limit.admit(None).expect("second");
        let refused = limit.admit(None).expect_err("third is over the limit");
        let status = refused.into_status();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("--max-in-flight"), "{status:?}");
        assert_eq!(
            status
                .metadata()
                .get(replikv_proto::OUTCOME_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some(replikv_proto::OUTCOME_NONE),
            "a refused request applied nothing"
        );
        drop(a);
        limit.admit(None).expect("a place was freed");
    }

    #[test]
    fn one_connection_leaves_room_for_the_others() {
        let limit = InFlight::new(8);
        // Alone, a connection may take half: the other half waits for newcomers.
        let flood: Vec<_> = (0..4).map(|_| limit.admit(addr(1)).unwrap()).collect();
        assert!(limit.admit(addr(1)).is_err(), "past its share");
        // A second connection is served; the two now share by thirds.
        let steady = limit.admit(addr(2)).expect("a newcomer finds room");
        let third = limit.admit(addr(3)).expect("and another");
        assert!(limit.admit(addr(1)).is_err());
        drop(flood);
        drop((steady, third));
        let again: Vec<_> = (0..4).map(|_| limit.admit(addr(1)).unwrap()).collect();
        assert_eq!(again.len(), 4, "every place was freed");
        assert!(limit.inner.held.lock().unwrap().by_origin.len() == 1);
    }

    #[test]
    fn transfer_pool_holds_at_most_max() {
        let pool = TransferPool::new(1);
        let t = pool.try_start().expect("first transfer");
        assert!(pool.try_start().is_none());
        drop(t);
        assert!(pool.try_start().is_some());
    }
}
