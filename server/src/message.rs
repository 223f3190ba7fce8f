//! The peer protocol's messages as domain types (docs/design.md §4, §5, §7): what the replica
//! sends to and receives from other servers through [`crate::network::PeerNetwork`].
//! Views in them are already validated (`None`: absent or malformed); rejections are typed.
//! `convert` maps them to and from the generated protobuf types, the only place that knows
//! both.

use bytes::Bytes;

use crate::engine::append::{AppendHeader, AppendReject};
use crate::engine::install::TransferRefusal;
use crate::engine::paxos::PrepareRefusal;
use crate::identity::ClusterId;
use crate::storage::Position;
use crate::types::{LogState, Rank, Record, SyncEntry, View};

/// A write's exactly-once identity (docs/design.md §6): its session `(client_id_hi, client_id)`,
/// its seq, and the client's lowest unfinished seq.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestId {
    pub client_id_hi: u64,
    pub client_id: u64,
    pub seq: u64,
    pub first_unfinished: u64,
}

/// A write a backup forwards to its primary (§4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    pub key: Bytes,
    /// `None` deletes.
    pub value: Option<Bytes>,
    pub id: Option<RequestId>,
}

/// One message of the primary's ordered stream to a member (§4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Append {
    pub header: AppendHeader,
    pub records: Vec<Record>,
}

/// A member's answer to an append message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendReply {
    pub result: Result<(), AppendReject>,
    pub applied: u64,
    /// The member's view, on a refusal.
    pub view: Option<View>,
    pub promised: u64,
}

/// Phase 1 of a view change (§5 step 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepare {
    pub ballot: u64,
    pub proposer: Rank,
    /// The view the proposer leaves.
    pub view: Option<View>,
}

/// Why an acceptor refused a prepare, as the proposer learns it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrepareRefused {
    #[error(transparent)]
    Known(#[from] PrepareRefusal),
    /// A reason this server does not know (a server of another version).
    #[error("{0}")]
    Other(String),
}

/// An acceptor's answer to a prepare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareReply {
    /// On a promise, the proposal it accepted for this instance: (ballot, view).
    pub result: Result<Option<(u64, View)>, PrepareRefused>,
    /// Its installed view.
    pub view: Option<View>,
    pub promised_ballot: u64,
    /// Its log (rank is the acceptor's).
    pub applied: u64,
    pub committed: u64,
    pub last_epoch: u64,
}

/// Phase 2 of a view change (§5 step 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    pub ballot: u64,
    pub proposer: Rank,
    pub from_view: Option<View>,
    pub view: Option<View>,
}

/// An acceptor's answer to an accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptReply {
    pub accepted: bool,
    pub promised_ballot: u64,
    /// Its view, on a refusal.
    pub view: Option<View>,
}

/// Install a decided view (§5 step 4): on the decided primary (from the proposer, with the
/// promisers' states) or on a member (from the primary).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Install {
    pub view: Option<View>,
    pub from: Rank,
    pub states: Vec<LogState>,
    pub previous: Option<View>,
}

/// A refused install or join, with the refusing server's reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallReply {
    pub result: Result<(), Refused>,
    pub applied: u64,
    /// The refusing server's view.
    pub view: Option<View>,
}

/// Ask for a state transfer (§7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRequest {
    pub since: u64,
    pub tail_keys: Vec<Bytes>,
    pub from: Rank,
    /// The decided view's epoch when reconciling in a view change, 0 for a joiner.
    pub epoch: u64,
}

/// One chunk of a state transfer; the last (`done`) carries the source's position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncChunk {
    pub entries: Vec<SyncEntry>,
    pub done: bool,
    /// The source's position (on the last chunk).
    pub pos: Position,
    pub full: bool,
    pub gc_horizon: u64,
}

/// Why a source does not serve (or stopped serving) a transfer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Refused(#[from] TransferRefusal),
    #[error("storage: {0}")]
    Storage(String),
    /// The source serves its limit of catch-up transfers already (`--max-transfers`); the
    /// receiver tries again later.
    #[error("busy: {0}")]
    Busy(String),
}

/// Ask the primary to join its view (§7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Join {
    pub rank: Rank,
    pub applied: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinReply {
    pub result: Result<(), Refused>,
    pub view: Option<View>,
    pub primary_applied: u64,
}

/// Ask a peer for its view (start-up, revival).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Discover {
    pub from: Rank,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoverReply {
    pub rank: Rank,
    pub view: Option<View>,
    pub promised: u64,
    pub applied: u64,
    pub recovering: bool,
    /// The peer's cluster, once it has one (docs/design.md §10).
    pub cluster_id: Option<ClusterId>,
    pub amnesiac: bool,
}
