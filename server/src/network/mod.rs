//! The peer network: one trait for every server-to-server call, speaking the domain messages
//! of [`crate::message`], so the replica never touches tonic or prost and tests can swap the
//! transport (CONVENTIONS.md "One network trait for peers").
//!
//! - [`grpc`]: the real transport (tonic), with the fault-injection layer of docs/design.md §8 on
//!   the outgoing side (the incoming side is in `service`).
//! - [`memory`]: an in-process router between replicas of one process, for tests.

pub mod grpc;
pub mod memory;

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

pub use grpc::{GrpcNetwork, FROM_HEADER};

use crate::error::{Outcome, ServeError, SessionRefusal};
use crate::message::{
    Accept, AcceptReply, Append, AppendReply, Discover, DiscoverReply, Forward, Install,
    InstallReply, Join, JoinReply, Prepare, PrepareReply, SyncChunk, SyncRequest,
};
use crate::session::WriteResult;
use crate::types::{Configuration, Rank};

/// What kind of refusal a peer answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusKind {
    InvalidArgument,
    Overloaded,
    /// A session refused a forwarded write (docs/design.md §10 "Sessions").
    Session(SessionRefusal),
    /// Any other precondition (e.g. a server of another cluster).
    Precondition,
    Unavailable,
    Other,
}

impl fmt::Display for StatusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StatusKind::InvalidArgument => "invalid argument",
            StatusKind::Overloaded => "overloaded",
            StatusKind::Session(r) => r.as_str(),
            StatusKind::Precondition => "failed precondition",
            StatusKind::Unavailable => "unavailable",
            StatusKind::Other => "error",
        })
    }
}

/// A peer's refusal of a call: its kind, message, and whether what it refused may still
/// have taken effect.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct PeerStatus {
    pub kind: StatusKind,
    pub message: String,
    pub outcome: Outcome,
}

impl From<ServeError> for PeerStatus {
    /// The same classification the gRPC mapping gives (`ServeError::into_status`).
    fn from(e: ServeError) -> PeerStatus {
        let message = e.to_string();
        let (kind, outcome) = match e {
            ServeError::InvalidArgument(_) => (StatusKind::InvalidArgument, Outcome::None),
            ServeError::Overloaded(_) => (StatusKind::Overloaded, Outcome::None),
            ServeError::Precondition(_) => (StatusKind::Precondition, Outcome::None),
            ServeError::Session { refusal, .. } => (StatusKind::Session(refusal), Outcome::None),
            ServeError::Unavailable { outcome, .. } => (StatusKind::Unavailable, outcome),
            ServeError::Storage(_) => (StatusKind::Unavailable, Outcome::Unknown),
        };
        PeerStatus {
            kind,
            message,
            outcome,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Refused(PeerStatus),
    #[error("unknown peer {0}")]
    UnknownPeer(Rank),
}

pub type NetResult<T> = Result<T, NetError>;

/// Every call the replica makes to a peer. Each takes a deadline; none retries.
pub trait PeerNetwork: Send + Sync + 'static {
    /// The servers to reach from now on (docs/design.md §11): the configuration of the
    /// newest view. Calls to a rank outside it fail with [`NetError::UnknownPeer`].
    fn configure(&self, _config: &Configuration) {}
    /// A write for the primary to sequence (§4); its result is the key's old value.
    fn forward(
        &self,
        to: Rank,
        req: Forward,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<WriteResult>>;
    /// The ordered append stream to `to` for one primary term (docs/design.md §4). It opens with
    /// the first message; dropping the link closes it.
    fn open_append(&self, to: Rank) -> NetResult<Box<dyn AppendLink>>;
    fn prepare(
        &self,
        to: Rank,
        req: Prepare,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<PrepareReply>>;
    fn accept(
        &self,
        to: Rank,
        req: Accept,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<AcceptReply>>;
    fn install(
        &self,
        to: Rank,
        req: Install,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<InstallReply>>;
    fn join(&self, to: Rank, req: Join, timeout: Duration) -> BoxFuture<'_, NetResult<JoinReply>>;
    fn discover(
        &self,
        to: Rank,
        req: Discover,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<DiscoverReply>>;
    /// Opens a state transfer; each chunk must arrive within `timeout` of the previous one.
    fn sync(
        &self,
        to: Rank,
        req: SyncRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<BoxStream<'static, NetResult<SyncChunk>>>>;
}

/// One member's end of the primary's append stream: a response per request, in order.
pub trait AppendLink: Send {
    /// Sends one message and waits for its response, within `timeout`. After an error the
    /// link is unusable: a response may still be on its way.
    fn call(&mut self, req: Append, timeout: Duration) -> BoxFuture<'_, NetResult<AppendReply>>;
}
