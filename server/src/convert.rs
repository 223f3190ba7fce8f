//! Conversions between generated protobuf types and the replica's domain types: the only
//! module that knows both.

use replikv_proto::{kv, peer};

use crate::engine::append::{AppendHeader, AppendReject};
use crate::engine::paxos::PrepareRefusal;
use crate::error::SessionRefusal;
use crate::message as msg;
use crate::network::{NetError, PeerStatus, StatusKind};
use crate::storage::Position;
use crate::types::{
    Configuration, Entry, Item, LogState, Record, ServerAddr, SyncEntry, View, MAX_EPOCH,
};

impl From<&View> for kv::View {
    fn from(v: &View) -> kv::View {
        kv::View {
            epoch: v.epoch,
            primary: v.primary,
            members: v.members.clone(),
            config: v.config.as_ref().map(kv::Configuration::from),
        }
    }
}

impl From<&Configuration> for kv::Configuration {
    fn from(c: &Configuration) -> kv::Configuration {
        kv::Configuration {
            servers: c
                .servers
                .iter()
                .map(|(&rank, s)| kv::Server {
                    rank,
                    client: s.client.clone(),
                    peer: s.peer.clone(),
                })
                .collect(),
            next_rank: c.next_rank,
            has_pending: c.pending.is_some(),
            pending: c.pending.unwrap_or(0),
        }
    }
}

/// A configuration from the wire; `None` when malformed (a rank twice or at or above
/// `next_rank`, an empty address, a pending rank that is not a server).
pub fn configuration_from(c: &kv::Configuration) -> Option<Configuration> {
    let mut servers = std::collections::BTreeMap::new();
    for s in &c.servers {
        let ok = s.rank < c.next_rank && !s.client.is_empty() && !s.peer.is_empty();
        let addr = ServerAddr {
            client: s.client.clone(),
            peer: s.peer.clone(),
        };
        if !ok || servers.insert(s.rank, addr).is_some() {
            return None;
        }
    }
    let pending = c.has_pending.then_some(c.pending);
    if pending.is_some_and(|p| !servers.contains_key(&p)) {
        return None;
    }
    Some(Configuration {
        servers,
        next_rank: c.next_rank,
        pending,
    })
}

/// A view from the wire; `None` when absent or malformed (no epoch or one past
/// [`MAX_EPOCH`], primary not a member, a member outside its configuration or, without one,
/// outside the peer list of `n` servers, a malformed configuration).
pub fn view_from(v: Option<&kv::View>, n: usize) -> Option<View> {
    let v = v?;
    let config = match &v.config {
        Some(c) => Some(configuration_from(c)?),
        None => None,
    };
    let known = |m: u32| match &config {
        Some(c) => c.contains(m),
        None => (m as usize) < n,
    };
    let valid = v.epoch > 0
        && v.epoch <= MAX_EPOCH
        && v.members.contains(&v.primary)
        && v.members.iter().all(|&m| known(m));
    valid.then(|| View::new(v.epoch, v.primary, v.members.iter().copied()).with_config(config))
}

pub fn record_to_pb(r: &Record) -> peer::Record {
    peer::Record {
        lsn: r.lsn,
        epoch: r.epoch,
        entries: r
            .items
            .iter()
            .map(|i| peer::Entry {
                key: i.key.clone(),
                present: true,
                lsn: r.lsn,
                value: i.value.clone(),
            })
            .collect(),
    }
}

pub fn record_from_pb(r: peer::Record) -> Record {
    Record {
        lsn: r.lsn,
        epoch: r.epoch,
        items: r
            .entries
            .into_iter()
            .map(|e| Item {
                key: e.key,
                value: e.value,
            })
            .collect(),
    }
}

pub fn sync_entry_to_pb(e: SyncEntry) -> peer::Entry {
    match e.entry {
        Some(Entry { lsn, value }) => peer::Entry {
            key: e.key,
            present: true,
            lsn,
            value,
        },
        None => peer::Entry {
            key: e.key,
            present: false,
            lsn: 0,
            value: None,
        },
    }
}

pub fn sync_entry_from_pb(e: peer::Entry) -> SyncEntry {
    SyncEntry {
        key: e.key,
        entry: e.present.then_some(Entry {
            lsn: e.lsn,
            value: e.value,
        }),
    }
}

impl From<&LogState> for peer::MemberState {
    fn from(s: &LogState) -> peer::MemberState {
        peer::MemberState {
            rank: s.rank,
            applied: s.applied,
            committed: s.committed,
            last_epoch: s.last_epoch,
        }
    }
}

impl From<&peer::MemberState> for LogState {
    fn from(s: &peer::MemberState) -> LogState {
        LogState {
            rank: s.rank,
            applied: s.applied,
            committed: s.committed,
            last_epoch: s.last_epoch,
        }
    }
}

impl From<crate::engine::append::AppendReject> for replikv_proto::peer::AppendStatus {
    fn from(r: crate::engine::append::AppendReject) -> Self {
        use crate::engine::append::AppendReject;
        match r {
            AppendReject::Stale => Self::Stale,
            AppendReject::NotMember => Self::NotMember,
            AppendReject::Gap => Self::Gap,
        }
    }
}

// ---------------------------------------------------------------- peer messages

fn view_pb(v: &Option<View>) -> Option<kv::View> {
    v.as_ref().map(Into::into)
}

impl From<&msg::RequestId> for kv::RequestId {
    fn from(id: &msg::RequestId) -> kv::RequestId {
        kv::RequestId {
            client_id: id.client_id,
            seq: id.seq,
            first_unfinished: id.first_unfinished,
            client_id_hi: id.client_id_hi,
        }
    }
}

impl From<&kv::RequestId> for msg::RequestId {
    fn from(id: &kv::RequestId) -> msg::RequestId {
        msg::RequestId {
            client_id_hi: id.client_id_hi,
            client_id: id.client_id,
            seq: id.seq,
            first_unfinished: id.first_unfinished,
        }
    }
}

pub fn forward_to_pb(f: &msg::Forward) -> peer::WriteRequest {
    peer::WriteRequest {
        key: f.key.clone(),
        value: f.value.clone(),
        id: f.id.as_ref().map(Into::into),
    }
}

pub fn forward_from_pb(f: peer::WriteRequest) -> msg::Forward {
    msg::Forward {
        key: f.key,
        value: f.value,
        id: f.id.as_ref().map(Into::into),
    }
}

pub fn append_to_pb(a: &msg::Append) -> peer::AppendRequest {
    let h = &a.header;
    peer::AppendRequest {
        epoch: h.epoch,
        primary: h.primary,
        msg_seq: h.msg_seq,
        records: a.records.iter().map(record_to_pb).collect(),
        committed: h.committed,
        lease_ms: h.lease_ms,
        prev_lsn: h.prev_lsn,
        prev_epoch: h.prev_epoch,
        gc_horizon: h.gc_horizon,
    }
}

pub fn append_from_pb(a: peer::AppendRequest) -> msg::Append {
    msg::Append {
        header: AppendHeader {
            epoch: a.epoch,
            primary: a.primary,
            msg_seq: a.msg_seq,
            committed: a.committed,
            lease_ms: a.lease_ms,
            prev_lsn: a.prev_lsn,
            prev_epoch: a.prev_epoch,
            gc_horizon: a.gc_horizon,
        },
        records: a.records.into_iter().map(record_from_pb).collect(),
    }
}

pub fn append_reply_to_pb(r: &msg::AppendReply) -> peer::AppendResponse {
    let status = match r.result {
        Ok(()) => peer::AppendStatus::Ok,
        Err(why) => why.into(),
    };
    peer::AppendResponse {
        status: status as i32,
        applied: r.applied,
        view: view_pb(&r.view),
        promised: r.promised,
    }
}

/// An unknown status is taken as "not a member": the primary then drops the member.
pub fn append_reply_from_pb(r: peer::AppendResponse, n: usize) -> msg::AppendReply {
    let result = match peer::AppendStatus::try_from(r.status) {
        Ok(peer::AppendStatus::Ok) => Ok(()),
        Ok(peer::AppendStatus::Stale) => Err(AppendReject::Stale),
        Ok(peer::AppendStatus::Gap) => Err(AppendReject::Gap),
        _ => Err(AppendReject::NotMember),
    };
    msg::AppendReply {
        result,
        applied: r.applied,
        view: view_from(r.view.as_ref(), n),
        promised: r.promised,
    }
}

pub fn prepare_to_pb(p: &msg::Prepare) -> peer::PrepareRequest {
    peer::PrepareRequest {
        ballot: p.ballot,
        proposer: p.proposer,
        view: view_pb(&p.view),
    }
}

pub fn prepare_from_pb(p: peer::PrepareRequest, n: usize) -> msg::Prepare {
    msg::Prepare {
        ballot: p.ballot,
        proposer: p.proposer,
        view: view_from(p.view.as_ref(), n),
    }
}

const PREPARE_REFUSALS: [PrepareRefusal; 8] = [
    PrepareRefusal::Malformed,
    PrepareRefusal::NotConfigured,
    PrepareRefusal::Amnesiac,
    PrepareRefusal::BallotOutOfRange,
    PrepareRefusal::NewerView,
    PrepareRefusal::PromisedHigher,
    PrepareRefusal::LivePrimary,
    PrepareRefusal::PrimaryAlive,
];

pub fn prepare_reply_to_pb(r: &msg::PrepareReply) -> peer::PrepareResponse {
    let (promised, accepted, reason) = match &r.result {
        Ok(a) => (
            true,
            a.as_ref().map(|(ballot, view)| peer::Accepted {
                ballot: *ballot,
                view: Some(view.into()),
            }),
            String::new(),
        ),
        Err(e) => (false, None, e.to_string()),
    };
    peer::PrepareResponse {
        promised,
        view: view_pb(&r.view),
        promised_ballot: r.promised_ballot,
        accepted,
        applied: r.applied,
        committed: r.committed,
        last_epoch: r.last_epoch,
        reason,
    }
}

pub fn prepare_reply_from_pb(r: peer::PrepareResponse, n: usize) -> msg::PrepareReply {
    let result = if r.promised {
        Ok(r.accepted
            .and_then(|a| Some((a.ballot, view_from(a.view.as_ref(), n)?))))
    } else {
        Err(PREPARE_REFUSALS
            .into_iter()
            .find(|k| k.to_string() == r.reason)
            .map_or(msg::PrepareRefused::Other(r.reason), Into::into))
    };
    msg::PrepareReply {
        result,
        view: view_from(r.view.as_ref(), n),
        promised_ballot: r.promised_ballot,
        applied: r.applied,
        committed: r.committed,
        last_epoch: r.last_epoch,
    }
}

pub fn accept_to_pb(a: &msg::Accept) -> peer::AcceptRequest {
    peer::AcceptRequest {
        ballot: a.ballot,
        proposer: a.proposer,
        from_view: view_pb(&a.from_view),
        view: view_pb(&a.view),
    }
}

pub fn accept_from_pb(a: peer::AcceptRequest, n: usize) -> msg::Accept {
    msg::Accept {
        ballot: a.ballot,
        proposer: a.proposer,
        from_view: view_from(a.from_view.as_ref(), n),
        view: view_from(a.view.as_ref(), n),
    }
}

pub fn accept_reply_to_pb(r: &msg::AcceptReply) -> peer::AcceptResponse {
    peer::AcceptResponse {
        accepted: r.accepted,
        promised_ballot: r.promised_ballot,
        view: view_pb(&r.view),
    }
}

pub fn accept_reply_from_pb(r: peer::AcceptResponse, n: usize) -> msg::AcceptReply {
    msg::AcceptReply {
        accepted: r.accepted,
        promised_ballot: r.promised_ballot,
        view: view_from(r.view.as_ref(), n),
    }
}

pub fn install_to_pb(i: &msg::Install) -> peer::InstallRequest {
    peer::InstallRequest {
        view: view_pb(&i.view),
        from: i.from,
        states: i.states.iter().map(Into::into).collect(),
        previous: view_pb(&i.previous),
    }
}

pub fn install_from_pb(i: peer::InstallRequest, n: usize) -> msg::Install {
    msg::Install {
        view: view_from(i.view.as_ref(), n),
        from: i.from,
        states: i.states.iter().map(Into::into).collect(),
        previous: view_from(i.previous.as_ref(), n),
    }
}

pub fn install_reply_to_pb(r: &msg::InstallReply) -> peer::InstallResponse {
    peer::InstallResponse {
        ok: r.result.is_ok(),
        applied: r.applied,
        reason: r
            .result
            .as_ref()
            .err()
            .map_or(String::new(), |e| e.0.clone()),
        view: view_pb(&r.view),
    }
}

pub fn install_reply_from_pb(r: peer::InstallResponse, n: usize) -> msg::InstallReply {
    msg::InstallReply {
        result: if r.ok {
            Ok(())
        } else {
            Err(msg::Refused(r.reason))
        },
        applied: r.applied,
        view: view_from(r.view.as_ref(), n),
    }
}

pub fn sync_to_pb(s: &msg::SyncRequest) -> peer::SyncRequest {
    peer::SyncRequest {
        since: s.since,
        tail_keys: s.tail_keys.clone(),
        from: s.from,
        epoch: s.epoch,
    }
}

pub fn sync_from_pb(s: peer::SyncRequest) -> msg::SyncRequest {
    msg::SyncRequest {
        since: s.since,
        tail_keys: s.tail_keys,
        from: s.from,
        epoch: s.epoch,
    }
}

pub fn chunk_to_pb(c: msg::SyncChunk) -> peer::SyncChunk {
    peer::SyncChunk {
        entries: c.entries.into_iter().map(sync_entry_to_pb).collect(),
        done: c.done,
        applied: c.pos.applied,
        last_epoch: c.pos.last_epoch,
        committed: c.pos.committed,
        full: c.full,
        gc_horizon: c.gc_horizon,
    }
}

pub fn chunk_from_pb(c: peer::SyncChunk) -> msg::SyncChunk {
    msg::SyncChunk {
        entries: c.entries.into_iter().map(sync_entry_from_pb).collect(),
        done: c.done,
        pos: Position {
            applied: c.applied,
            committed: c.committed,
            last_epoch: c.last_epoch,
        },
        full: c.full,
        gc_horizon: c.gc_horizon,
    }
}

pub fn join_to_pb(j: &msg::Join) -> peer::JoinRequest {
    peer::JoinRequest {
        rank: j.rank,
        applied: j.applied,
    }
}

pub fn join_from_pb(j: peer::JoinRequest) -> msg::Join {
    msg::Join {
        rank: j.rank,
        applied: j.applied,
    }
}

pub fn join_reply_to_pb(r: &msg::JoinReply) -> peer::JoinResponse {
    peer::JoinResponse {
        ok: r.result.is_ok(),
        view: view_pb(&r.view),
        reason: r
            .result
            .as_ref()
            .err()
            .map_or(String::new(), |e| e.0.clone()),
        primary_applied: r.primary_applied,
    }
}

pub fn join_reply_from_pb(r: peer::JoinResponse, n: usize) -> msg::JoinReply {
    msg::JoinReply {
        result: if r.ok {
            Ok(())
        } else {
            Err(msg::Refused(r.reason))
        },
        view: view_from(r.view.as_ref(), n),
        primary_applied: r.primary_applied,
    }
}

pub fn discover_reply_to_pb(r: &msg::DiscoverReply) -> peer::DiscoverResponse {
    peer::DiscoverResponse {
        rank: r.rank,
        view: view_pb(&r.view),
        promised: r.promised,
        applied: r.applied,
        recovering: r.recovering,
        cluster_id: r.cluster_id.map(|id| id.to_string()).unwrap_or_default(),
        amnesiac: r.amnesiac,
    }
}

/// A peer's cluster id that does not parse names no cluster.
pub fn discover_reply_from_pb(r: peer::DiscoverResponse, n: usize) -> msg::DiscoverReply {
    msg::DiscoverReply {
        rank: r.rank,
        view: view_from(r.view.as_ref(), n),
        promised: r.promised,
        applied: r.applied,
        recovering: r.recovering,
        cluster_id: r.cluster_id.parse().ok(),
        amnesiac: r.amnesiac,
    }
}

/// A peer's gRPC status as a typed network error: the code, the outcome and the session
/// refusal it reports.
pub fn net_error_from_status(s: &tonic::Status) -> NetError {
    let kind = match s.code() {
        tonic::Code::InvalidArgument => StatusKind::InvalidArgument,
        tonic::Code::ResourceExhausted => StatusKind::Overloaded,
        tonic::Code::FailedPrecondition
            if s.metadata().contains_key(crate::error::SESSION_HEADER) =>
        {
            match crate::error::ServeError::session_from_status(s) {
                crate::error::ServeError::Session { refusal, .. } => StatusKind::Session(refusal),
                _ => StatusKind::Session(SessionRefusal::ResultUnknown),
            }
        }
        tonic::Code::FailedPrecondition => StatusKind::Precondition,
        tonic::Code::Unavailable => StatusKind::Unavailable,
        _ => StatusKind::Other,
    };
    NetError::Refused(PeerStatus {
        kind,
        message: s.message().to_string(),
        outcome: crate::error::status_outcome(s),
    })
}

/// The status a peer-side refusal goes back as (the in-process network's inverse of
/// [`net_error_from_status`] is not needed: it hands over [`PeerStatus`] itself).
pub fn sync_error_to_status(e: msg::SyncError) -> tonic::Status {
    match e {
        msg::SyncError::Refused(r) => tonic::Status::failed_precondition(r.to_string()),
        msg::SyncError::Storage(m) => tonic::Status::internal(m),
        msg::SyncError::Busy(m) => tonic::Status::resource_exhausted(m),
    }
}

/// A replica's `Status` for a client.
pub fn status_to_pb(s: crate::replica::ReplicaStatus) -> kv::StatusResponse {
    kv::StatusResponse {
        rank: s.rank,
        address: s.address,
        view: Some((&s.view).into()),
        role: s.role.into(),
        applied: s.applied,
        committed: s.committed,
        lease_ms: s.lease.map_or(0, |d| d.as_millis() as u64),
        peers: s
            .peers
            .into_iter()
            .map(|p| kv::PeerStatus {
                rank: p.rank,
                address: p.address,
                member: p.member,
                acked: p.acked,
            })
            .collect(),
        writes: s.writes,
        flushes: s.flushes,
        promised: s.promised,
        sync_mode: s.sync_mode.into(),
        serving: s.serving,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn prepare_refusals_keep_their_kind_across_the_wire() {
        let reply = |result| msg::PrepareReply {
            result,
            view: Some(View::new(3, 0, [0, 1])),
            promised_ballot: 4,
            applied: 9,
            committed: 8,
            last_epoch: 3,
        };
        for r in PREPARE_REFUSALS {
            let sent = reply(Err(r.into()));
            assert_eq!(prepare_reply_from_pb(prepare_reply_to_pb(&sent), 2), sent);
        }
        let promised = reply(Ok(Some((4, View::new(4, 1, [0, 1])))));
        assert_eq!(
            prepare_reply_from_pb(prepare_reply_to_pb(&promised), 2),
            promised
        );
        let mut other = prepare_reply_to_pb(&reply(Err(PrepareRefusal::Amnesiac.into())));
        other.reason = "something new".into();
        assert_eq!(
            prepare_reply_from_pb(other, 2).result,
            Err(msg::PrepareRefused::Other("something new".into()))
        );
        assert_eq!(
            prepare_reply_from_pb(prepare_reply_to_pb(&promised), 1).view,
            None,
            "a view naming ranks outside the cluster is malformed"
        );
    }

    #[test]
    fn append_replies_map_every_status_and_an_unknown_one_to_not_member() {
        for result in [
            Ok(()),
            Err(AppendReject::Stale),
            Err(AppendReject::Gap),
            Err(AppendReject::NotMember),
        ] {
            let r = msg::AppendReply {
                result,
                applied: 5,
                view: None,
                promised: 2,
            };
            assert_eq!(append_reply_from_pb(append_reply_to_pb(&r), 3), r);
        }
        let mut unknown = append_reply_to_pb(&msg::AppendReply {
            result: Ok(()),
            applied: 0,
            view: None,
            promised: 0,
        });
        unknown.status = 99;
        assert_eq!(
            append_reply_from_pb(unknown, 3).result,
            Err(AppendReject::NotMember)
        );
    }

    #[test]
    fn malformed_views_are_rejected() {
        let ok = kv::View {
            epoch: 2,
            primary: 1,
            members: vec![0, 1],
            config: None,
        };
        assert_eq!(view_from(Some(&ok), 3), Some(View::new(2, 1, [0, 1])));
        assert_eq!(
            view_from(
                Some(&kv::View {
                    epoch: 2,
                    primary: 2,
                    members: vec![0, 1],
                    config: None,
                }),
                3
            ),
            None
        );
        assert_eq!(
            view_from(
                Some(&kv::View {
                    epoch: 2,
                    primary: 0,
                    members: vec![0, 5],
                    config: None,
                }),
                3
            ),
            None
        );
        assert_eq!(
            view_from(
                Some(&kv::View {
                    epoch: 0,
                    primary: 0,
                    members: vec![0],
                    config: None,
                }),
                3
            ),
            None
        );
        assert_eq!(view_from(None, 3), None);
    }

    #[test]
    fn records_and_entries_round_trip() {
        let r = Record {
            lsn: 7,
            epoch: 3,
            items: vec![
                Item {
                    key: Bytes::from_static(b"ua"),
                    value: Some(Bytes::from_static(b"v")),
                },
                Item {
                    key: Bytes::from_static(b"ub"),
                    value: None,
                },
            ],
        };
        assert_eq!(record_from_pb(record_to_pb(&r)), r);
        for e in [
            SyncEntry {
                key: Bytes::from_static(b"k"),
                entry: None,
            },
            SyncEntry {
                key: Bytes::from_static(b"k"),
                entry: Some(Entry {
                    lsn: 4,
                    value: None,
                }),
            },
            SyncEntry {
                key: Bytes::from_static(b"k"),
                entry: Some(Entry {
                    lsn: 4,
                    value: Some(Bytes::from_static(b"x")),
                }),
            },
        ] {
            assert_eq!(sync_entry_from_pb(sync_entry_to_pb(e.clone())), e);
        }
    }
}
