//! A simulated replica: an event-driven state machine that follows the order of the steps of
//! `replikv_server::replica` (one handler per message, one job per async flow) and takes
//! every protocol decision by calling `replikv_server::engine`. It never reads a clock or
//! sends anything itself: each handler gets a [`Ctx`] with the time on this server's clock
//! and leaves in it what to send, which timers to set and what to answer.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use replikv_server::config::Timing;
use replikv_server::engine::append::{self as appending, AppendHeader};
use replikv_server::engine::install::{self as installing, PrimaryInstall};
use replikv_server::engine::monitor::{self, Rejoin};
use replikv_server::engine::paxos::{self, PrepareOutcome, PromiseReply, Reason, Tally};
use replikv_server::engine::sequencer::{self as sequencing, Admission, Route};
use replikv_server::engine::state::LearnOutcome;
use replikv_server::engine::{commit, Now, State, Time};
use replikv_server::message::{
    Accept, AcceptReply, Append, AppendReply, Install, InstallReply, Join, JoinReply, Prepare,
    PrepareRefused, PrepareReply, Refused, RequestId, SyncError, SyncRequest,
};
use replikv_server::session::{Header, OpResult, SessionId, StoredResult, WriteResult};
use replikv_server::storage::Position;
use replikv_server::types::{
    session_header_item, session_result_item, user_item, Item, LogState, Rank, Record, SyncEntry,
    View,
};

use crate::disk::{Disk, Op};
use crate::rng::Rng;

/// Correlates a request with its reply (one counter per server incarnation).
pub type Call = u64;

// Timeouts of the replica (server/src/replica/*).
const PREPARE_TIMEOUT: Duration = Duration::from_millis(400);
const INSTALL_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_ATTEMPTS: u32 = 6;
const STRAGGLER_GRACE: Duration = Duration::from_millis(20);
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
const DISCOVER_TIMEOUT: Duration = Duration::from_millis(300);
const FORWARD_TIMEOUT: Duration = Duration::from_secs(4);
const MAX_RECORDS_PER_MESSAGE: usize = 4096;

/// A peer message (the domain messages of `replikv_server::message`, with a call id).
#[derive(Clone, Debug)]
pub enum Msg {
    Append(Call, Append),
    AppendReply(Call, AppendReply),
    Prepare(Call, Prepare),
    PrepareReply(Call, PrepareReply),
    Accept(Call, Accept),
    AcceptReply(Call, AcceptReply),
    Install(Call, Install),
    InstallReply(Call, InstallReply),
    Sync(Call, SyncRequest),
    SyncReply(Call, Result<(Vec<SyncEntry>, Position), SyncError>),
    Join(Call, Join),
    JoinReply(Call, JoinReply),
    Discover(Call),
    DiscoverReply(Call, Option<View>, u64, bool),
    Forward(Call, Bytes, Option<Bytes>, RequestId),
    ForwardReply(Call, Answer),
}

impl Msg {
    /// Messages of the ordered append stream ride one HTTP/2 stream over TCP: the network
    /// may drop or delay them, never duplicate or reorder them.
    pub fn is_stream(&self) -> bool {
        matches!(self, Msg::Append(..) | Msg::AppendReply(..))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Append(..) => "append",
            Msg::AppendReply(..) => "append-reply",
            Msg::Prepare(..) => "prepare",
            Msg::PrepareReply(..) => "prepare-reply",
            Msg::Accept(..) => "accept",
            Msg::AcceptReply(..) => "accept-reply",
            Msg::Install(..) => "install",
            Msg::InstallReply(..) => "install-reply",
            Msg::Sync(..) => "sync",
            Msg::SyncReply(..) => "sync-reply",
            Msg::Join(..) => "join",
            Msg::JoinReply(..) => "join-reply",
            Msg::Discover(..) => "discover",
            Msg::DiscoverReply(..) => "discover-reply",
            Msg::Forward(..) => "forward",
            Msg::ForwardReply(..) => "forward-reply",
        }
    }
}

/// A client request as a server receives it.
#[derive(Clone, Debug)]
pub enum ClientReq {
    Get(Bytes),
    Write(Bytes, Option<Bytes>, RequestId),
}

/// What a server answers a client (or a forwarding backup).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A read's value, or the value a write replaced.
    Ok(Option<Bytes>),
    /// Not served here (no lease, not primary, pending key): nothing happened.
    Unavailable,
    /// The write may or may not have taken effect (deposed primary, lost forward).
    Unknown,
    /// The session refused the write: its earlier outcome is unknown (§6).
    SessionUnknown,
}

/// Who waits for a write's answer.
#[derive(Clone, Copy, Debug)]
pub enum ReplyTo {
    Client { client: usize, attempt: u64 },
    Forward { to: Rank, call: Call },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerKind {
    Monitor,
    MonitorIdle,
    Heartbeat(Rank, u64),
    CallTimeout(Call),
    GateWake,
    FlushDone,
    Grace(u64),
    Backoff(u64),
    DiscoverDone(u64),
}

/// What a handler asks the world to do.
#[derive(Debug)]
pub enum Out {
    Send(Rank, Msg),
    Timer(Duration, TimerKind),
    Answer(ReplyTo, Answer),
    /// A storage error: the server stops (§3 fail-stop); nothing else of this step happens.
    FailStop,
}

/// What a handler observed that the invariants care about.
#[derive(Debug)]
pub enum Obs {
    /// The primary of `epoch` moved its commit point to `committed`.
    Commit { epoch: u64, committed: u64 },
    /// A write was sequenced at `lsn` in `epoch` with this key and value.
    Sequenced { epoch: u64, lsn: u64 },
}

/// One handler's context: this server's clock, its randomness, and what it asks for.
pub struct Ctx<'a> {
    pub now: Now,
    pub rng: &'a mut Rng,
    /// Probability that an fsync fails.
    pub fsync_fail: f64,
    pub out: Vec<Out>,
    pub obs: Vec<Obs>,
}

impl Ctx<'_> {
    fn send(&mut self, to: Rank, m: Msg) {
        self.out.push(Out::Send(to, m));
    }
    fn timer(&mut self, after: Duration, t: TimerKind) {
        self.out.push(Out::Timer(after, t));
    }
    fn answer(&mut self, to: ReplyTo, a: Answer) {
        self.out.push(Out::Answer(to, a));
    }
    fn ms(&self) -> u64 {
        self.now.steady.since_origin().as_millis() as u64
    }
}

/// One ordered stream of the primary to a member (`replica::append::replicate_to`).
#[derive(Debug)]
struct Stream {
    epoch: u64,
    msg_seq: u64,
    prev: (u64, u64),
    queue: VecDeque<Record>,
    in_flight: Option<InFlight>,
    sent_committed: u64,
    last_send: Time,
    heartbeat_set: bool,
}

#[derive(Debug)]
struct InFlight {
    call: Call,
    sent_boot: Time,
    last: (u64, u64),
    commit_sent: u64,
}

/// Why a view change runs (and whom its end concerns).
#[derive(Clone, Copy, Debug)]
enum Purpose {
    Monitor,
    Drop(Rank),
    Join { from: Rank, call: Call, rank: Rank },
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Backoff,
    Prepare,
    Accept,
    Decided,
}

/// A view change in progress (`replica::viewchange::change_view`).
#[derive(Debug)]
struct Proposal {
    id: u64,
    reason: Reason,
    purpose: Purpose,
    attempt: u32,
    phase: Phase,
    ballot: u64,
    from: View,
    waiting: BTreeSet<Rank>,
    tally: Tally,
    grace: bool,
    prepares: Vec<(Rank, PrepareReply)>,
    accepts: BTreeSet<Rank>,
    promisers: BTreeSet<Rank>,
    states: Vec<LogState>,
    view: Option<View>,
    last_err: String,
}

/// Who asked for an install as primary.
#[derive(Clone, Copy, Debug)]
enum InstallFor {
    Proposal,
    Remote { to: Rank, call: Call },
}

/// `install_as_primary` in progress.
#[derive(Debug)]
struct PrimaryJob {
    view: View,
    install: PrimaryInstall,
    reply: InstallFor,
    waiting: BTreeSet<Rank>,
    failed: Vec<Rank>,
    newer: Option<View>,
}

/// What a state transfer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SyncFor {
    PrimaryInstall,
    MemberInstall { to: Rank, call: Call },
    Rejoin { primary: Rank },
}

#[derive(Debug)]
struct SyncJob {
    since: u64,
    call: Call,
    source: Rank,
    purpose: SyncFor,
    /// The view of a member install.
    view: Option<View>,
}

/// What the monitor is doing (its loop awaits each of these in the replica).
#[derive(Debug)]
enum MonitorJob {
    Discover {
        round: u64,
        waiting: BTreeSet<Rank>,
        replies: Vec<(Option<View>, u64, bool)>,
        then: AfterDiscover,
    },
    Syncing,
    Joining,
    Proposing,
    Idle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterDiscover {
    FindCluster,
    TakeOver,
    Rejoin,
}

#[derive(Debug)]
enum Pending {
    Append { to: Rank },
    Prepare { pid: u64 },
    Accept { pid: u64 },
    InstallFromProposer { pid: u64 },
    InstallMember { to: Rank },
    Sync,
    Join,
    Discover { round: u64, from: Rank },
    Forward(ReplyTo),
}

/// A simulated server.
pub struct Node {
    pub me: Rank,
    pub n: usize,
    pub timing: Timing,
    pub st: State,
    pub disk: Disk,
    pub in_cluster: bool,
    max_ballot: u64,
    next_call: Call,
    calls: BTreeMap<Call, Pending>,
    streams: BTreeMap<Rank, Stream>,
    proposal: Option<Proposal>,
    cv_queue: VecDeque<(Reason, Purpose)>,
    next_id: u64,
    pjob: Option<PrimaryJob>,
    sync: Option<SyncJob>,
    member_install: bool,
    monitor: Option<MonitorJob>,
    waiters: BTreeMap<u64, Vec<(ReplyTo, Option<Bytes>)>>,
    waiters_term: u64,
    flush_set: bool,
    gate_set: bool,
}

type NodeResult = Result<(), Stop>;

/// A failed fsync: the server stops here.
#[derive(Debug)]
pub struct Stop;

impl Node {
    /// A server starting from what its disk holds (§7: never a member after a restart).
    /// `incarnation` counts the server's restarts: call ids of each incarnation are its own,
    /// as a real server's calls ride connections that end with its process, so a reply to a
    /// call of an earlier incarnation can never be taken for the answer to a new one.
    pub fn boot(
        me: Rank,
        n: usize,
        timing: Timing,
        disk: Disk,
        incarnation: u64,
        cx: &mut Ctx,
    ) -> Node {
        let img = &disk.current;
        let view = img.view.clone().unwrap_or_else(View::bootstrap);
        let st = State::restarted(
            view,
            img.promise,
            img.accepted.clone(),
            img.pos,
            img.amnesiac_until,
            cx.now.steady,
        );
        let max_ballot = img.promise.ballot.max(st.view.epoch);
        let in_cluster = img.in_cluster;
        cx.timer(timing.heartbeat / 2, TimerKind::Monitor);
        Node {
            me,
            n,
            timing,
            st,
            disk,
            in_cluster,
            max_ballot,
            next_call: (incarnation << 32) + 1,
            calls: BTreeMap::new(),
            streams: BTreeMap::new(),
            proposal: None,
            cv_queue: VecDeque::new(),
            next_id: 1,
            pjob: None,
            sync: None,
            member_install: false,
            monitor: None,
            waiters: BTreeMap::new(),
            waiters_term: 0,
            flush_set: false,
            gate_set: false,
        }
    }

    /// Forms a new cluster (rank 0 with `--bootstrap` on an empty cluster): the first view
    /// and the membership in one synced write, then serve at once (`monitor::form_cluster`).
    pub fn form_cluster(&mut self, cx: &mut Ctx) -> NodeResult {
        let view = View::bootstrap();
        self.disk.write(Op::Membership {
            view: Some(view.clone()),
            amnesiac_until: None,
        });
        self.sync_disk(cx)?;
        self.in_cluster = true;
        self.st.view = view.clone();
        let now = cx.now.steady;
        self.become_primary(cx, &view, now, now, &BTreeSet::new());
        Ok(())
    }

    fn call(&mut self, p: Pending) -> Call {
        let c = self.next_call;
        self.next_call += 1;
        self.calls.insert(c, p);
        c
    }

    fn call_to(&mut self, cx: &mut Ctx, to: Rank, timeout: Duration, p: Pending) -> Call {
        let c = self.call(p);
        cx.timer(timeout, TimerKind::CallTimeout(c));
        let _ = to;
        c
    }

    fn sync_disk(&mut self, cx: &mut Ctx) -> NodeResult {
        if cx.fsync_fail > 0.0 && cx.rng.chance(cx.fsync_fail) {
            cx.out.push(Out::FailStop);
            return Err(Stop);
        }
        self.disk.sync();
        Ok(())
    }

    fn persist_paxos(&mut self, cx: &mut Ctx) -> NodeResult {
        self.disk.write(Op::Paxos {
            view: self.st.view.clone(),
            promise: self.st.promise,
            accepted: self.st.accepted.clone(),
        });
        self.sync_disk(cx)
    }

    fn note_ballot(&mut self, b: u64) {
        if paxos::plausible_ballot(b) {
            self.max_ballot = self.max_ballot.max(b);
        }
    }

    // ------------------------------------------------------------------ dispatch

    pub fn on_msg(&mut self, cx: &mut Ctx, from: Rank, m: Msg) -> NodeResult {
        if !self.in_cluster && !matches!(m, Msg::Discover(..) | Msg::DiscoverReply(..)) {
            // `service::check_cluster`: a server without state takes part in nothing until
            // it has found its cluster.
            return Ok(());
        }
        match m {
            Msg::Append(c, a) => {
                let r = self.on_append(cx, a)?;
                cx.send(from, Msg::AppendReply(c, r));
            }
            Msg::AppendReply(c, r) => self.on_append_reply(cx, c, Ok(r))?,
            Msg::Prepare(c, p) => {
                let r = self.on_prepare(cx, p)?;
                cx.send(from, Msg::PrepareReply(c, r));
            }
            Msg::PrepareReply(c, r) => {
                if let Some(Pending::Prepare { pid }) = self.calls.remove(&c) {
                    self.prepare_reply(cx, pid, from, Some(r))?;
                }
            }
            Msg::Accept(c, a) => {
                let r = self.on_accept(cx, a)?;
                cx.send(from, Msg::AcceptReply(c, r));
            }
            Msg::AcceptReply(c, r) => {
                if let Some(Pending::Accept { pid }) = self.calls.remove(&c) {
                    self.accept_reply(cx, pid, from, Some(r))?;
                }
            }
            Msg::Install(c, i) => self.on_install(cx, from, c, i)?,
            Msg::InstallReply(c, r) => match self.calls.remove(&c) {
                Some(Pending::InstallFromProposer { pid }) => {
                    let ok = r.result.is_ok();
                    self.proposal_installed(cx, pid, ok)?;
                }
                Some(Pending::InstallMember { to }) => self.member_installed(cx, to, Some(r))?,
                _ => {}
            },
            Msg::Sync(c, req) => {
                let r = self.on_sync(req);
                cx.send(from, Msg::SyncReply(c, r));
            }
            Msg::SyncReply(c, r) => {
                if let Some(Pending::Sync) = self.calls.remove(&c) {
                    self.sync_done(cx, c, r.map_err(|e| e.to_string()))?;
                }
            }
            Msg::Join(c, j) => self.on_join(cx, from, c, j)?,
            Msg::JoinReply(c, r) => {
                if let Some(Pending::Join) = self.calls.remove(&c) {
                    self.join_done(cx, Some(r))?;
                }
            }
            Msg::Discover(c) => {
                let view = self.in_cluster.then(|| self.st.view.clone());
                let r = Msg::DiscoverReply(c, view, self.st.promise.ballot, self.in_cluster);
                cx.send(from, r);
            }
            Msg::DiscoverReply(c, view, promised, in_cluster) => {
                if let Some(Pending::Discover { round, from: f }) = self.calls.remove(&c) {
                    self.discover_reply(cx, round, f, Some((view, promised, in_cluster)))?;
                }
            }
            Msg::Forward(c, key, value, id) => {
                self.write_local(cx, key, value, id, ReplyTo::Forward { to: from, call: c })?
            }
            Msg::ForwardReply(c, a) => {
                if let Some(Pending::Forward(to)) = self.calls.remove(&c) {
                    cx.answer(to, a);
                }
            }
        }
        Ok(())
    }

    pub fn on_timer(&mut self, cx: &mut Ctx, t: TimerKind) -> NodeResult {
        match t {
            TimerKind::Monitor => {
                cx.timer(self.timing.heartbeat / 2, TimerKind::Monitor);
                self.monitor_tick(cx)?;
            }
            TimerKind::MonitorIdle => {
                if matches!(self.monitor, Some(MonitorJob::Idle)) {
                    self.monitor = None;
                }
            }
            TimerKind::Heartbeat(m, epoch) => {
                if let Some(s) = self.streams.get_mut(&m) {
                    if s.epoch == epoch {
                        s.heartbeat_set = false;
                    }
                }
                self.pump(cx, m);
            }
            TimerKind::CallTimeout(c) => self.call_timeout(cx, c)?,
            TimerKind::GateWake => {
                self.gate_set = false;
                commit::gate_woke(&mut self.st);
                self.advance_commit(cx);
            }
            TimerKind::FlushDone => {
                self.flush_set = false;
                let applied = self.st.pos.applied;
                self.sync_disk(cx)?;
                if let Some(p) = self.st.primary.as_mut() {
                    p.durable = p.durable.max(applied);
                }
                self.advance_commit(cx);
            }
            TimerKind::Grace(pid) => {
                if let Some(p) = self.proposal.as_mut().filter(|p| p.id == pid) {
                    p.waiting.clear();
                    self.phase_end(cx)?;
                }
            }
            TimerKind::Backoff(pid) => {
                if self
                    .proposal
                    .as_ref()
                    .is_some_and(|p| p.id == pid && p.phase == Phase::Backoff)
                {
                    self.attempt(cx)?;
                }
            }
            TimerKind::DiscoverDone(round) => self.discover_reply(cx, round, u32::MAX, None)?,
        }
        Ok(())
    }

    fn call_timeout(&mut self, cx: &mut Ctx, c: Call) -> NodeResult {
        let Some(p) = self.calls.remove(&c) else {
            return Ok(());
        };
        match p {
            Pending::Append { to } => self.on_append_reply(cx, c, Err(to)),
            Pending::Prepare { pid } => {
                let from = self.proposal_waiting_rank(c);
                self.prepare_reply(cx, pid, from, None)
            }
            Pending::Accept { pid } => {
                let from = self.proposal_waiting_rank(c);
                self.accept_reply(cx, pid, from, None)
            }
            Pending::InstallFromProposer { pid } => self.proposal_installed(cx, pid, false),
            Pending::InstallMember { to } => self.member_installed(cx, to, None),
            Pending::Sync => self.sync_done(cx, c, Err("transfer timed out".into())),
            Pending::Join => self.join_done(cx, None),
            Pending::Discover { round, from } => self.discover_reply(cx, round, from, None),
            Pending::Forward(to) => {
                cx.answer(to, Answer::Unknown);
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------- client requests

    /// A client request reaches this server (`replica::read`, `replica::write::write`).
    pub fn on_client(&mut self, cx: &mut Ctx, to: ReplyTo, req: ClientReq) -> NodeResult {
        if !self.in_cluster {
            cx.answer(to, Answer::Unavailable);
            return Ok(());
        }
        match req {
            ClientReq::Get(key) => {
                let a = self.read(cx, &key);
                cx.answer(to, a);
            }
            ClientReq::Write(key, value, id) => {
                match sequencing::route(&self.st, self.me, self.in_cluster) {
                    Route::Sequence => self.write_local(cx, key, value, id, to)?,
                    Route::Forward(p) => {
                        let c = self.call_to(cx, p, FORWARD_TIMEOUT, Pending::Forward(to));
                        cx.send(p, Msg::Forward(c, key, value, id));
                    }
                    Route::Recovering | Route::NoCluster => cx.answer(to, Answer::Unavailable),
                }
            }
        }
        Ok(())
    }

    /// A local read: with a lease, and never of a pending key (§4). A pending key is refused
    /// at once rather than waited on (the client retries).
    fn read(&mut self, cx: &mut Ctx, key: &[u8]) -> Answer {
        if commit::read_refusal(&self.st, self.timing.lease, cx.now).is_some() {
            return Answer::Unavailable;
        }
        let entry = self.disk.get(&user_item(key));
        if entry.is_some_and(|e| commit::read_is_pending(&self.st, e.lsn)) {
            return Answer::Unavailable;
        }
        Answer::Ok(entry.and_then(|e| e.value.clone()))
    }

    /// The primary's sequencer for one write (`replica::write::sequencer`).
    fn write_local(
        &mut self,
        cx: &mut Ctx,
        key: Bytes,
        value: Option<Bytes>,
        id: RequestId,
        to: ReplyTo,
    ) -> NodeResult {
        let Some(p) = self.st.primary.as_ref() else {
            cx.answer(to, Answer::Unavailable);
            return Ok(());
        };
        let (epoch, term, committed) = (p.epoch, self.st.term, self.st.pos.committed);
        let sid = SessionId::new(id.client_id_hi, id.client_id).expect("clients have sessions");
        let hkey = session_header_item(sid.hi, sid.lo);
        let mut header: Option<Header> = self
            .disk
            .get(&hkey)
            .and_then(|e| e.value.clone())
            .and_then(Header::decode);
        match sequencing::admit(header.as_ref(), id.seq, id.first_unfinished) {
            Err(_) => {
                cx.answer(to, Answer::Unavailable);
                return Ok(());
            }
            Ok(Admission::Apply) => {}
            Ok(Admission::Duplicate { slot }) => {
                let rkey = session_result_item(sid.hi, sid.lo, slot.unwrap_or(u16::MAX));
                let stored = self
                    .disk
                    .get(&rkey)
                    .and_then(|e| e.value.clone())
                    .and_then(StoredResult::decode);
                match stored {
                    // The simulated clients only put and delete.
                    Some(StoredResult {
                        seq,
                        lsn,
                        result: OpResult::Write(w),
                    }) if seq == id.seq => self.wait_commit(cx, lsn, term, to, w),
                    _ => cx.answer(to, Answer::SessionUnknown),
                }
                return Ok(());
            }
            Ok(Admission::Refuse(_)) => {
                cx.answer(to, Answer::SessionUnknown);
                return Ok(());
            }
        }
        let item = user_item(&key);
        let old = self.disk.get(&item).and_then(|e| e.value.clone());
        let lsn = self.st.pos.applied + 1;
        let h = header.get_or_insert_with(Header::default);
        h.record(id.seq, id.first_unfinished, cx.ms());
        let slot = h.slot_of(id.seq).expect("just recorded");
        let result = WriteResult { old };
        let stored = StoredResult {
            seq: id.seq,
            lsn,
            result: OpResult::Write(result.clone()),
        };
        let rec = Record {
            lsn,
            epoch,
            items: vec![
                Item { key: item, value },
                Item {
                    key: session_result_item(sid.hi, sid.lo, slot),
                    value: Some(stored.encode()),
                },
                Item {
                    key: hkey,
                    value: Some(h.encode()),
                },
            ],
        };
        let pos = Position {
            applied: lsn,
            committed,
            last_epoch: epoch,
        };
        self.disk.write(Op::Records(vec![rec.clone()], pos));
        self.st.pos.applied = lsn;
        self.st.pos.last_epoch = epoch;
        cx.obs.push(Obs::Sequenced { epoch, lsn });
        let members: Vec<Rank> = self.streams.keys().copied().collect();
        for m in members {
            if let Some(s) = self.streams.get_mut(&m) {
                s.queue.push_back(rec.clone());
            }
            self.pump(cx, m);
        }
        if !self.flush_set {
            self.flush_set = true;
            let d = Duration::from_micros(cx.rng.range(100, 1500));
            cx.timer(d, TimerKind::FlushDone);
        }
        self.wait_commit(cx, lsn, term, to, result);
        Ok(())
    }

    fn wait_commit(&mut self, cx: &mut Ctx, lsn: u64, term: u64, to: ReplyTo, r: WriteResult) {
        if self.waiters_term != term {
            cx.answer(to, Answer::Unknown);
        } else if self.st.pos.committed >= lsn {
            cx.answer(to, Answer::Ok(r.old));
        } else {
            self.waiters.entry(lsn).or_default().push((to, r.old));
        }
    }

    /// `Node::publish_commit`: writes waiting on the commit point learn their outcome.
    fn publish_commit(&mut self, cx: &mut Ctx) {
        if self.waiters_term != self.st.term {
            self.waiters_term = self.st.term;
            for (_, ws) in std::mem::take(&mut self.waiters) {
                for (to, _) in ws {
                    cx.answer(to, Answer::Unknown);
                }
            }
        }
        let later = self.waiters.split_off(&(self.st.pos.committed + 1));
        for (_, ws) in std::mem::replace(&mut self.waiters, later) {
            for (to, old) in ws {
                cx.answer(to, Answer::Ok(old));
            }
        }
        let members: Vec<Rank> = self.streams.keys().copied().collect();
        for m in members {
            self.pump(cx, m);
        }
    }

    fn advance_commit(&mut self, cx: &mut Ctx) {
        let a = commit::advance_commit(&mut self.st, cx.now.steady);
        if let Some(at) = a.wake_at {
            if !self.gate_set {
                self.gate_set = true;
                cx.timer(at - cx.now.steady, TimerKind::GateWake);
            }
        }
        if a.moved {
            if let Some(p) = &self.st.primary {
                cx.obs.push(Obs::Commit {
                    epoch: p.epoch,
                    committed: self.st.pos.committed,
                });
            }
            self.publish_commit(cx);
        }
    }

    // ------------------------------------------------------------- primary role

    fn become_primary(
        &mut self,
        cx: &mut Ctx,
        view: &View,
        serve_after: Time,
        commit_after: Time,
        synced: &BTreeSet<Rank>,
    ) {
        self.st
            .become_primary(view, serve_after, commit_after, synced, cx.now.boot);
        let start = (self.st.pos.applied, self.st.pos.last_epoch);
        self.streams.clear();
        for m in view.backups() {
            self.streams.insert(
                m,
                Stream {
                    epoch: view.epoch,
                    msg_seq: 0,
                    prev: start,
                    queue: VecDeque::new(),
                    in_flight: None,
                    sent_committed: 0,
                    last_send: Time::ZERO,
                    heartbeat_set: false,
                },
            );
        }
        self.advance_commit(cx);
        self.publish_commit(cx);
    }

    fn stepped_down(&mut self, cx: &mut Ctx) {
        self.streams.clear();
        self.publish_commit(cx);
    }

    /// One step of the stream to `m`: send what is queued, a new commit point, or a
    /// heartbeat when H has passed; one message in flight (`replicate_to`).
    fn pump(&mut self, cx: &mut Ctx, m: Rank) {
        let Some(s) = self.streams.get(&m) else {
            return;
        };
        if !appending::stream_current(&self.st, m, s.epoch) {
            self.streams.remove(&m);
            return;
        }
        if s.in_flight.is_some() {
            return;
        }
        let committed = self.st.pos.committed;
        let due = cx.now.steady >= s.last_send + self.timing.heartbeat || s.msg_seq == 0;
        if s.queue.is_empty() && committed <= s.sent_committed && !due {
            if !s.heartbeat_set {
                let wait = (s.last_send + self.timing.heartbeat) - cx.now.steady;
                let epoch = s.epoch;
                self.streams.get_mut(&m).expect("exists").heartbeat_set = true;
                cx.timer(wait, TimerKind::Heartbeat(m, epoch));
            }
            return;
        }
        let lease_ms = appending::lease_to_lend(&self.st, self.timing.lease, cx.now);
        let gc_horizon = commit::gc_horizon(&self.st);
        let c = self.call_to(cx, m, self.timing.ack_timeout, Pending::Append { to: m });
        appending::sending(&mut self.st, m, cx.now.steady);
        let s = self.streams.get_mut(&m).expect("exists");
        let k = s.queue.len().min(MAX_RECORDS_PER_MESSAGE);
        let records: Vec<Record> = s.queue.drain(..k).collect();
        let last = records.last().map_or(s.prev, |r| (r.lsn, r.epoch));
        s.msg_seq += 1;
        let header = AppendHeader {
            epoch: s.epoch,
            primary: self.me,
            msg_seq: s.msg_seq,
            committed: committed.min(last.0),
            lease_ms,
            prev_lsn: s.prev.0,
            prev_epoch: s.prev.1,
            gc_horizon,
        };
        s.in_flight = Some(InFlight {
            call: c,
            sent_boot: cx.now.boot,
            last,
            commit_sent: header.committed,
        });
        s.sent_committed = committed;
        s.last_send = cx.now.steady;
        cx.send(m, Msg::Append(c, Append { header, records }));
    }

    fn on_append_reply(
        &mut self,
        cx: &mut Ctx,
        c: Call,
        r: Result<AppendReply, Rank>,
    ) -> NodeResult {
        let Some((&m, s)) = self
            .streams
            .iter_mut()
            .find(|(_, s)| s.in_flight.as_ref().is_some_and(|f| f.call == c))
        else {
            return Ok(());
        };
        self.calls.remove(&c);
        let f = s.in_flight.take().expect("matched");
        let epoch = s.epoch;
        match r {
            Ok(AppendReply { result: Ok(()), .. }) => {
                s.prev = f.last;
                if !appending::acked(&mut self.st, m, epoch, f.last.0, f.commit_sent, f.sent_boot) {
                    self.streams.remove(&m);
                    return Ok(());
                }
                self.advance_commit(cx);
                self.pump(cx, m);
            }
            Ok(r) => {
                self.streams.remove(&m);
                if let Some(v) = r.view.filter(|v| v.epoch > epoch) {
                    return self.learn_view(cx, v);
                }
                self.note_ballot(r.promised);
                self.member_failed(cx, m, epoch)?;
            }
            Err(_) => {
                self.streams.remove(&m);
                self.member_failed(cx, m, epoch)?;
            }
        }
        Ok(())
    }

    fn member_failed(&mut self, cx: &mut Ctx, rank: Rank, epoch: u64) -> NodeResult {
        if !appending::begin_drop(&mut self.st, rank, epoch) {
            return Ok(());
        }
        self.change_view(cx, Reason::Drop(rank, epoch), Purpose::Drop(rank))
    }

    // ------------------------------------------------------------- member side

    /// `replica::append::on_append`, with the flush done in the same step.
    fn on_append(&mut self, cx: &mut Ctx, req: Append) -> Result<AppendReply, Stop> {
        let reject = |st: &State, why| AppendReply {
            result: Err(why),
            applied: st.pos.applied,
            view: Some(st.view.clone()),
            promised: st.promise.ballot,
        };
        let msg = req.header;
        if let Err(why) = appending::check(&self.st, msg.epoch, msg.primary) {
            return Ok(reject(&self.st, why));
        }
        self.st.last_heard = cx.now.steady;
        if self.sync.is_some() && !req.records.is_empty() {
            // The replica's data lock is held by a transfer: the append would wait behind it
            // longer than the primary's ack timeout.
            return Ok(reject(&self.st, appending::AppendReject::NotMember));
        }
        if let Err(why) = appending::admit(&self.st, &msg, &req.records) {
            return Ok(reject(&self.st, why));
        }
        if let Some(last) = req.records.last() {
            let committed = appending::commit_point(&self.st, msg.committed, last.lsn);
            let pos = Position {
                applied: last.lsn,
                committed,
                last_epoch: last.epoch,
            };
            let (l, e) = (last.lsn, last.epoch);
            self.disk.write(Op::Records(req.records, pos));
            self.sync_disk(cx)?;
            self.st.pos.applied = l;
            self.st.pos.last_epoch = e;
        }
        let _ = appending::accepted(&mut self.st, &msg, self.timing.lease, cx.now);
        self.publish_commit(cx);
        Ok(AppendReply {
            result: Ok(()),
            applied: self.st.pos.applied,
            view: None,
            promised: self.st.promise.ballot,
        })
    }

    fn on_prepare(&mut self, cx: &mut Ctx, req: Prepare) -> Result<PrepareReply, Stop> {
        let refuse = |st: &State, why| PrepareReply {
            result: Err(PrepareRefused::Known(why)),
            view: Some(st.view.clone()),
            promised_ballot: st.promise.ballot,
            applied: st.pos.applied,
            committed: st.pos.committed,
            last_epoch: st.pos.last_epoch,
        };
        let Some(from) = req.view else {
            return Ok(refuse(&self.st, paxos::PrepareRefusal::Malformed));
        };
        let p = paxos::Prepare {
            ballot: req.ballot,
            proposer: req.proposer,
            from,
        };
        let guard = self.timing.lease_guard();
        let was_primary = self.st.primary.is_some();
        let accepted = match paxos::prepare(&mut self.st, self.me, &p, cx.now.steady, guard) {
            Ok(a) => a,
            Err(why) => return Ok(refuse(&self.st, why)),
        };
        if was_primary && self.st.primary.is_none() {
            self.stepped_down(cx);
        }
        let resp = PrepareReply {
            result: Ok(accepted.map(|a| (a.ballot, a.view))),
            view: Some(self.st.view.clone()),
            promised_ballot: req.ballot,
            applied: self.st.pos.applied,
            committed: self.st.pos.committed,
            last_epoch: self.st.pos.last_epoch,
        };
        self.note_ballot(req.ballot);
        self.persist_paxos(cx)?;
        Ok(resp)
    }

    fn on_accept(&mut self, cx: &mut Ctx, req: Accept) -> Result<AcceptReply, Stop> {
        let accepted = match (req.from_view, req.view) {
            (Some(from), Some(view)) => paxos::accept(
                &mut self.st,
                paxos::Accept {
                    ballot: req.ballot,
                    proposer: req.proposer,
                    from,
                    view,
                },
            ),
            _ => false,
        };
        if !accepted {
            return Ok(AcceptReply {
                accepted: false,
                promised_ballot: self.st.promise.ballot,
                view: Some(self.st.view.clone()),
            });
        }
        self.persist_paxos(cx)?;
        Ok(AcceptReply {
            accepted,
            promised_ballot: req.ballot,
            view: None,
        })
    }

    fn learn_view(&mut self, cx: &mut Ctx, v: View) -> NodeResult {
        let learned = self.st.learn_view(v);
        if learned == LearnOutcome::SteppedDown {
            self.stepped_down(cx);
        }
        if learned.adopted() {
            self.persist_paxos(cx)?;
        }
        Ok(())
    }

    fn end_amnesia_if_past(&mut self, cx: &mut Ctx, view: &View) -> NodeResult {
        if self.st.end_amnesia_if_past(view) {
            self.disk.write(Op::Membership {
                view: None,
                amnesiac_until: None,
            });
            self.sync_disk(cx)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------- view changes

    fn change_view(&mut self, cx: &mut Ctx, reason: Reason, purpose: Purpose) -> NodeResult {
        self.cv_queue.push_back((reason, purpose));
        if self.proposal.is_none() {
            self.next_proposal(cx)?;
        }
        Ok(())
    }

    fn next_proposal(&mut self, cx: &mut Ctx) -> NodeResult {
        let Some((reason, purpose)) = self.cv_queue.pop_front() else {
            return Ok(());
        };
        let id = self.next_id;
        self.next_id += 1;
        self.proposal = Some(Proposal {
            id,
            reason,
            purpose,
            attempt: 0,
            phase: Phase::Backoff,
            ballot: 0,
            from: self.st.view.clone(),
            waiting: BTreeSet::new(),
            tally: Tally::new(&self.st.view),
            grace: false,
            prepares: Vec::new(),
            accepts: BTreeSet::new(),
            promisers: BTreeSet::new(),
            states: Vec::new(),
            view: None,
            last_err: String::new(),
        });
        self.attempt(cx)
    }

    /// One attempt of `change_view`: still needed? then prepare to the view's members.
    fn attempt(&mut self, cx: &mut Ctx) -> NodeResult {
        let p = self.proposal.as_ref().expect("proposing");
        let reason = p.reason.clone();
        if let Err(e) = paxos::still_needed(
            &self.st,
            self.me,
            reason,
            cx.now.steady,
            self.timing.lease_guard(),
        ) {
            return self.proposal_done(cx, Err(e.into()));
        }
        let from = self.st.view.clone();
        let Some(ballot) = paxos::next_ballot(self.max_ballot, from.epoch) else {
            return self.proposal_done(cx, Err("ballots exhausted".into()));
        };
        self.note_ballot(ballot);
        let pid = {
            let p = self.proposal.as_mut().expect("proposing");
            p.phase = Phase::Prepare;
            p.ballot = ballot;
            p.from = from.clone();
            p.tally = Tally::new(&from);
            p.grace = false;
            p.prepares.clear();
            p.accepts.clear();
            p.waiting = from.members.iter().copied().collect();
            p.id
        };
        let req = Prepare {
            ballot,
            proposer: self.me,
            view: Some(from.clone()),
        };
        let me = self.me;
        for m in from.members.iter().copied().filter(|&m| m != me) {
            let c = self.call_to(cx, m, PREPARE_TIMEOUT, Pending::Prepare { pid });
            cx.send(m, Msg::Prepare(c, req.clone()));
        }
        if from.is_member(self.me) {
            let r = self.on_prepare(cx, req)?;
            self.prepare_reply(cx, pid, self.me, Some(r))?;
        }
        Ok(())
    }

    fn proposal_waiting_rank(&self, c: Call) -> Rank {
        // Timed-out calls are matched to their rank through the prepare/accept tables.
        let _ = c;
        u32::MAX
    }

    fn prepare_reply(
        &mut self,
        cx: &mut Ctx,
        pid: u64,
        from: Rank,
        r: Option<PrepareReply>,
    ) -> NodeResult {
        let Some(p) = self.proposal.as_mut().filter(|p| p.id == pid) else {
            return Ok(());
        };
        if p.phase != Phase::Prepare {
            return Ok(());
        }
        if from == u32::MAX {
            // A timeout: that member's answer is lost.
            p.waiting.clear();
            return self.phase_end(cx);
        }
        p.waiting.remove(&from);
        if let Some(r) = r {
            if paxos::plausible_ballot(r.promised_ballot) {
                self.max_ballot = self.max_ballot.max(r.promised_ballot);
            }
            let p = self.proposal.as_mut().expect("matched");
            let yes = r.result.is_ok();
            p.prepares.push((from, r));
            if yes && p.tally.yes(from) {
                p.grace = true;
                cx.timer(STRAGGLER_GRACE, TimerKind::Grace(pid));
            }
        }
        if self.proposal.as_ref().expect("matched").waiting.is_empty() {
            self.phase_end(cx)?;
        }
        Ok(())
    }

    fn accept_reply(
        &mut self,
        cx: &mut Ctx,
        pid: u64,
        from: Rank,
        r: Option<AcceptReply>,
    ) -> NodeResult {
        let Some(p) = self.proposal.as_mut().filter(|p| p.id == pid) else {
            return Ok(());
        };
        if p.phase != Phase::Accept {
            return Ok(());
        }
        if from == u32::MAX {
            p.waiting.clear();
            return self.phase_end(cx);
        }
        p.waiting.remove(&from);
        if let Some(r) = r {
            if paxos::plausible_ballot(r.promised_ballot) {
                self.max_ballot = self.max_ballot.max(r.promised_ballot);
            }
            let p = self.proposal.as_mut().expect("matched");
            if r.accepted {
                p.accepts.insert(from);
                if p.tally.yes(from) {
                    p.grace = true;
                    cx.timer(STRAGGLER_GRACE, TimerKind::Grace(pid));
                }
            }
        }
        if self.proposal.as_ref().expect("matched").waiting.is_empty() {
            self.phase_end(cx)?;
        }
        Ok(())
    }

    /// Every answer of the phase is in (or the grace after a quorum, or the timeout, ended).
    fn phase_end(&mut self, cx: &mut Ctx) -> NodeResult {
        let p = self.proposal.as_mut().expect("proposing");
        let pid = p.id;
        // Outstanding calls of this phase are abandoned.
        self.calls.retain(|_, c| {
            !matches!(c, Pending::Prepare { pid: x } | Pending::Accept { pid: x } if *x == pid)
        });
        let p = self.proposal.as_mut().expect("proposing");
        match p.phase {
            Phase::Prepare => {
                let answers: Vec<PromiseReply> = p
                    .prepares
                    .drain(..)
                    .map(|(m, resp)| {
                        let (promised, accepted, reason) = match resp.result {
                            Ok(a) => (true, a, String::new()),
                            Err(why) => (false, None, why.to_string()),
                        };
                        PromiseReply {
                            rank: m,
                            promised,
                            view: resp.view,
                            promised_ballot: resp.promised_ballot,
                            accepted,
                            log: LogState {
                                rank: m,
                                applied: resp.applied,
                                committed: resp.committed,
                                last_epoch: resp.last_epoch,
                            },
                            reason,
                        }
                    })
                    .collect();
                match paxos::after_prepare(self.me, &p.from, p.ballot, p.reason.clone(), &answers) {
                    PrepareOutcome::NewerView(v) => {
                        self.learn_view(cx, v)?;
                        self.proposal_done(cx, Err("a newer view exists".into()))
                    }
                    PrepareOutcome::NoQuorum { last_refusal, .. } => {
                        if let Some(e) = last_refusal {
                            p.last_err = e;
                        }
                        self.retry(cx)
                    }
                    PrepareOutcome::Quorum {
                        promisers,
                        states,
                        view,
                    } => {
                        p.phase = Phase::Accept;
                        p.tally = Tally::new(&p.from);
                        p.grace = false;
                        p.waiting = promisers.clone();
                        p.promisers = promisers.clone();
                        p.states = states;
                        p.view = Some(view.clone());
                        let req = Accept {
                            ballot: p.ballot,
                            proposer: self.me,
                            from_view: Some(p.from.clone()),
                            view: Some(view),
                        };
                        let me = self.me;
                        for m in promisers.iter().copied().filter(|&m| m != me) {
                            let c = self.call_to(cx, m, PREPARE_TIMEOUT, Pending::Accept { pid });
                            cx.send(m, Msg::Accept(c, req.clone()));
                        }
                        if promisers.contains(&self.me) {
                            let r = self.on_accept(cx, req)?;
                            self.accept_reply(cx, pid, self.me, Some(r))?;
                        }
                        Ok(())
                    }
                }
            }
            Phase::Accept => {
                if !p.from.is_quorum(&p.accepts) {
                    p.last_err = "no quorum of accepts".into();
                    return self.retry(cx);
                }
                p.phase = Phase::Decided;
                let view = p.view.clone().expect("decided");
                let (from, states) = (p.from.clone(), std::mem::take(&mut p.states));
                if view.primary == self.me {
                    self.install_as_primary(cx, view, from, states, InstallFor::Proposal)
                } else {
                    let c = self.call_to(
                        cx,
                        view.primary,
                        INSTALL_TIMEOUT,
                        Pending::InstallFromProposer { pid },
                    );
                    let req = Install {
                        view: Some(view.clone()),
                        from: self.me,
                        states,
                        previous: Some(from),
                    };
                    cx.send(view.primary, Msg::Install(c, req));
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    fn retry(&mut self, cx: &mut Ctx) -> NodeResult {
        let p = self.proposal.as_mut().expect("proposing");
        p.attempt += 1;
        if p.attempt >= MAX_ATTEMPTS {
            let e = format!("view change gave up: {}", p.last_err);
            return self.proposal_done(cx, Err(e));
        }
        p.phase = Phase::Backoff;
        let ms = cx.rng.range(20, 80) * (1u64 << p.attempt.min(4));
        let pid = p.id;
        cx.timer(Duration::from_millis(ms), TimerKind::Backoff(pid));
        Ok(())
    }

    fn proposal_installed(&mut self, cx: &mut Ctx, pid: u64, _ok: bool) -> NodeResult {
        if self.proposal.as_ref().is_some_and(|p| p.id == pid) {
            let v = self.proposal.as_ref().and_then(|p| p.view.clone());
            return self.proposal_done(cx, v.ok_or_else(|| "no view".to_string()));
        }
        Ok(())
    }

    fn proposal_done(&mut self, cx: &mut Ctx, r: Result<View, String>) -> NodeResult {
        let Some(p) = self.proposal.take() else {
            return Ok(());
        };
        match p.purpose {
            Purpose::Monitor => {
                if r.is_err() {
                    self.monitor_idle(cx, 50, 250);
                } else {
                    self.monitor = None;
                }
            }
            Purpose::Drop(rank) => appending::end_drop(&mut self.st, rank),
            Purpose::Join { from, call, rank } => {
                let (result, view) = match r {
                    Ok(v) if v.is_member(rank) => (Ok(()), v),
                    Ok(v) => (Err(Refused("not included".into())), v),
                    Err(e) => (Err(Refused(e)), self.st.view.clone()),
                };
                let reply = JoinReply {
                    result,
                    view: Some(view),
                    primary_applied: self.st.pos.applied,
                };
                cx.send(from, Msg::JoinReply(call, reply));
            }
        }
        self.next_proposal(cx)
    }

    // ------------------------------------------------------------- installs

    fn install_as_primary(
        &mut self,
        cx: &mut Ctx,
        view: View,
        prev: View,
        states: Vec<LogState>,
        reply: InstallFor,
    ) -> NodeResult {
        if self.pjob.is_some() || self.sync.is_some() {
            return self.primary_install_done(cx, reply, Err("busy".into()), &view);
        }
        let install =
            match installing::begin_install_as_primary(&mut self.st, self.me, &view, &prev) {
                Ok(i) => i,
                Err(e) => return self.primary_install_done(cx, reply, Err(e.into()), &view),
            };
        self.streams.clear();
        if install.term_changed {
            self.publish_commit(cx);
        }
        self.persist_paxos(cx)?;
        let mine = LogState {
            rank: self.me,
            applied: self.st.pos.applied,
            committed: self.st.pos.committed,
            last_epoch: self.st.pos.last_epoch,
        };
        let amnesiac = self.st.amnesiac();
        let source = match installing::reconcile_source(self.me, &view, &states, mine, amnesiac) {
            Ok(s) => s,
            Err(e) => return self.primary_install_done(cx, reply, Err(e.into()), &view),
        };
        self.pjob = Some(PrimaryJob {
            view: view.clone(),
            install,
            reply,
            waiting: BTreeSet::new(),
            failed: Vec::new(),
            newer: None,
        });
        match source {
            Some(src) => self.sync_from(cx, src, view.epoch, SyncFor::PrimaryInstall, None),
            None => self.primary_reconciled(cx),
        }
    }

    fn primary_reconciled(&mut self, cx: &mut Ctx) -> NodeResult {
        self.st.member = true;
        self.sync_disk(cx)?;
        let job = self.pjob.as_mut().expect("installing");
        let view = job.view.clone();
        let req = Install {
            view: Some(view.clone()),
            from: self.me,
            states: Vec::new(),
            previous: None,
        };
        let backups: Vec<Rank> = view.backups().collect();
        job.waiting = backups.iter().copied().collect();
        for m in backups {
            let c = self.call_to(cx, m, INSTALL_TIMEOUT, Pending::InstallMember { to: m });
            cx.send(m, Msg::Install(c, req.clone()));
        }
        if self.pjob.as_ref().expect("installing").waiting.is_empty() {
            self.primary_members_done(cx)?;
        }
        Ok(())
    }

    fn member_installed(&mut self, cx: &mut Ctx, to: Rank, r: Option<InstallReply>) -> NodeResult {
        let Some(job) = self.pjob.as_mut() else {
            return Ok(());
        };
        if !job.waiting.remove(&to) {
            return Ok(());
        }
        match r {
            Some(InstallReply { result: Ok(()), .. }) => {}
            Some(InstallReply { view, .. }) => {
                if let Some(v) = view.filter(|v| v.epoch > job.view.epoch) {
                    job.newer = Some(v);
                }
                job.failed.push(to);
            }
            None => job.failed.push(to),
        }
        if job.waiting.is_empty() {
            self.primary_members_done(cx)?;
        }
        Ok(())
    }

    fn primary_members_done(&mut self, cx: &mut Ctx) -> NodeResult {
        let job = self.pjob.take().expect("installing");
        let view = job.view.clone();
        if let Some(v) = job.newer {
            self.learn_view(cx, v)?;
            return self.primary_install_done(cx, job.reply, Err("newer".into()), &view);
        }
        let (serve_after, commit_after) = installing::install_waits(
            &job.install,
            &view,
            cx.now.steady,
            self.timing.lease_guard(),
        );
        if let Err(e) = installing::still_installing(&self.st, self.me, &view) {
            return self.primary_install_done(cx, job.reply, Err(e.into()), &view);
        }
        let synced = view.backups().filter(|m| !job.failed.contains(m)).collect();
        self.become_primary(cx, &view, serve_after, commit_after, &synced);
        self.end_amnesia_if_past(cx, &view)?;
        for f in job.failed {
            self.member_failed(cx, f, view.epoch)?;
        }
        self.primary_install_done(cx, job.reply, Ok(()), &view)
    }

    fn primary_install_done(
        &mut self,
        cx: &mut Ctx,
        reply: InstallFor,
        r: Result<(), String>,
        view: &View,
    ) -> NodeResult {
        match reply {
            InstallFor::Proposal => {
                let r = r.map(|()| view.clone());
                self.proposal_done(cx, r)
            }
            InstallFor::Remote { to, call } => {
                let reply = InstallReply {
                    applied: self.st.pos.applied,
                    view: r.is_err().then(|| self.st.view.clone()),
                    result: r.map_err(Refused),
                };
                cx.send(to, Msg::InstallReply(call, reply));
                Ok(())
            }
        }
    }

    fn on_install(&mut self, cx: &mut Ctx, from: Rank, call: Call, req: Install) -> NodeResult {
        let refuse = |st: &State, why: String| InstallReply {
            result: Err(Refused(why)),
            applied: st.pos.applied,
            view: Some(st.view.clone()),
        };
        let Some(view) = req.view else {
            cx.send(
                from,
                Msg::InstallReply(call, refuse(&self.st, "malformed".into())),
            );
            return Ok(());
        };
        if view.primary == self.me {
            let prev = req.previous.unwrap_or_else(|| view.clone());
            let reply = InstallFor::Remote { to: from, call };
            return self.install_as_primary(cx, view, prev, req.states, reply);
        }
        if let Err(e) = installing::check_member_install(self.me, &view, req.from) {
            cx.send(from, Msg::InstallReply(call, refuse(&self.st, e.into())));
            return Ok(());
        }
        if self.sync.is_some() || self.pjob.is_some() {
            cx.send(
                from,
                Msg::InstallReply(call, refuse(&self.st, "busy".into())),
            );
            return Ok(());
        }
        match installing::begin_member_install(&mut self.st, &view, cx.now.steady) {
            Ok(true) => self.stepped_down(cx),
            Ok(false) => {}
            Err(e) => {
                cx.send(from, Msg::InstallReply(call, refuse(&self.st, e.into())));
                return Ok(());
            }
        }
        self.persist_paxos(cx)?;
        self.member_install = true;
        let purpose = SyncFor::MemberInstall { to: from, call };
        self.sync_from(cx, view.primary, view.epoch, purpose, Some(view))
    }

    // ------------------------------------------------------------- transfers

    fn sync_from(
        &mut self,
        cx: &mut Ctx,
        source: Rank,
        epoch: u64,
        purpose: SyncFor,
        view: Option<View>,
    ) -> NodeResult {
        let since = self.st.pos.committed;
        let tail: Vec<Bytes> = self
            .disk
            .changed_since(since)
            .map(|(k, _)| k.clone())
            .collect();
        let c = self.call_to(cx, source, SYNC_TIMEOUT, Pending::Sync);
        self.sync = Some(SyncJob {
            since,
            call: c,
            source,
            purpose,
            view,
        });
        let req = SyncRequest {
            since,
            tail_keys: tail,
            from: self.me,
            epoch,
        };
        if source == self.me {
            let r = self.on_sync(req);
            self.calls.remove(&c);
            return self.sync_done(cx, c, r.map_err(|e| e.to_string()));
        }
        cx.send(source, Msg::Sync(c, req));
        Ok(())
    }

    /// The source side (`on_sync`): who may serve is the engine's rule. One chunk; nothing
    /// is collected in the simulation, so a transfer is never full.
    fn on_sync(&self, req: SyncRequest) -> Result<(Vec<SyncEntry>, Position), SyncError> {
        let pos = installing::transfer_source(&self.st, self.me, req.epoch, req.since)?;
        let mut entries: Vec<SyncEntry> = self
            .disk
            .changed_since(req.since)
            .map(|(k, e)| SyncEntry {
                key: k.clone(),
                entry: Some(e.clone()),
            })
            .collect();
        for key in req.tail_keys {
            let entry = self.disk.get(&key).cloned();
            entries.push(SyncEntry { key, entry });
        }
        Ok((
            entries,
            Position {
                committed: pos.committed.min(pos.applied),
                ..pos
            },
        ))
    }

    fn sync_done(
        &mut self,
        cx: &mut Ctx,
        c: Call,
        r: Result<(Vec<SyncEntry>, Position), String>,
    ) -> NodeResult {
        let Some(job) = self.sync.take_if(|j| j.call == c) else {
            return Ok(());
        };
        let _ = job.source;
        let r = r.and_then(|(entries, pos)| {
            installing::transfer_end(job.since, pos)
                .map(|pos| (entries, pos))
                .map_err(|e| e.to_string())
        });
        let r = match r {
            Ok((entries, pos)) => {
                self.disk.write(Op::Entries(entries, Some(pos)));
                self.sync_disk(cx)?;
                self.st.pos = pos;
                self.publish_commit(cx);
                Ok(pos.applied)
            }
            Err(e) => Err(e),
        };
        match job.purpose {
            SyncFor::PrimaryInstall => match r {
                Ok(_) => self.primary_reconciled(cx),
                Err(e) => {
                    self.st.member = false;
                    let j = self.pjob.take().expect("installing");
                    self.primary_install_done(cx, j.reply, Err(e), &j.view)
                }
            },
            SyncFor::MemberInstall { to, call } => {
                self.member_install = false;
                let view = job.view.expect("member install has a view");
                let reply = match r {
                    Err(e) => InstallReply {
                        result: Err(Refused(e)),
                        applied: self.st.pos.applied,
                        view: Some(self.st.view.clone()),
                    },
                    Ok(_) => {
                        match installing::finish_member_install(&mut self.st, &view, cx.now.steady)
                        {
                            Some(applied) => {
                                self.publish_commit(cx);
                                self.end_amnesia_if_past(cx, &view)?;
                                InstallReply {
                                    result: Ok(()),
                                    applied,
                                    view: None,
                                }
                            }
                            None => InstallReply {
                                result: Err(Refused("superseded".into())),
                                applied: self.st.pos.applied,
                                view: Some(self.st.view.clone()),
                            },
                        }
                    }
                };
                cx.send(to, Msg::InstallReply(call, reply));
                Ok(())
            }
            SyncFor::Rejoin { primary } => match r {
                Ok(_) => {
                    let c = self.call_to(cx, primary, JOIN_TIMEOUT, Pending::Join);
                    self.monitor = Some(MonitorJob::Joining);
                    let j = Join {
                        rank: self.me,
                        applied: self.st.pos.applied,
                    };
                    cx.send(primary, Msg::Join(c, j));
                    Ok(())
                }
                Err(_) => {
                    self.monitor_idle(cx, 100, 300);
                    Ok(())
                }
            },
        }
    }

    fn on_join(&mut self, cx: &mut Ctx, from: Rank, call: Call, req: Join) -> NodeResult {
        if let Err(e) = installing::check_join(&self.st, self.me, self.n, req.rank, req.applied) {
            let r = JoinReply {
                result: Err(Refused(e.into())),
                view: Some(self.st.view.clone()),
                primary_applied: self.st.pos.applied,
            };
            cx.send(from, Msg::JoinReply(call, r));
            return Ok(());
        }
        let purpose = Purpose::Join {
            from,
            call,
            rank: req.rank,
        };
        self.change_view(cx, Reason::Add(req.rank), purpose)
    }

    fn join_done(&mut self, cx: &mut Ctx, r: Option<JoinReply>) -> NodeResult {
        if !matches!(self.monitor, Some(MonitorJob::Joining)) {
            return Ok(());
        }
        match r {
            Some(JoinReply { result: Ok(()), .. }) => {
                self.monitor = None;
            }
            Some(JoinReply { view, .. }) => {
                if let Some(v) = view.filter(|v| v.epoch > self.st.view.epoch) {
                    self.learn_view(cx, v)?;
                }
                self.monitor_idle(cx, 100, 300);
            }
            None => self.monitor_idle(cx, 100, 300),
        }
        Ok(())
    }

    // ------------------------------------------------------------- monitor

    fn monitor_idle(&mut self, cx: &mut Ctx, lo: u64, hi: u64) {
        self.monitor = Some(MonitorJob::Idle);
        let ms = cx.rng.range(lo, hi);
        cx.timer(Duration::from_millis(ms), TimerKind::MonitorIdle);
    }

    /// `replica::monitor::monitor`, one tick: the engine decides, the jobs carry it out.
    fn monitor_tick(&mut self, cx: &mut Ctx) -> NodeResult {
        if self.monitor.is_some() {
            return Ok(());
        }
        if !self.in_cluster {
            return self.discover(cx, AfterDiscover::FindCluster);
        }
        let t = monitor::tick(&self.st, self.me, self.n, &self.timing, cx.now);
        for (m, epoch) in t.stuck {
            self.member_failed(cx, m, epoch)?;
        }
        if t.takeover {
            self.discover(cx, AfterDiscover::TakeOver)
        } else if t.rejoin {
            self.discover(cx, AfterDiscover::Rejoin)
        } else {
            Ok(())
        }
    }

    fn discover(&mut self, cx: &mut Ctx, then: AfterDiscover) -> NodeResult {
        let round = self.next_id;
        self.next_id += 1;
        let peers: BTreeSet<Rank> = (0..self.n as Rank).filter(|&r| r != self.me).collect();
        for &r in &peers {
            let c = self.call(Pending::Discover { round, from: r });
            cx.send(r, Msg::Discover(c));
        }
        cx.timer(DISCOVER_TIMEOUT, TimerKind::DiscoverDone(round));
        self.monitor = Some(MonitorJob::Discover {
            round,
            waiting: peers,
            replies: Vec::new(),
            then,
        });
        Ok(())
    }

    fn discover_reply(
        &mut self,
        cx: &mut Ctx,
        round: u64,
        from: Rank,
        r: Option<(Option<View>, u64, bool)>,
    ) -> NodeResult {
        let Some(MonitorJob::Discover {
            round: cur,
            waiting,
            replies,
            then,
        }) = self.monitor.as_mut()
        else {
            return Ok(());
        };
        if *cur != round {
            return Ok(());
        }
        if from == u32::MAX {
            waiting.clear();
        } else {
            waiting.remove(&from);
        }
        if let Some(r) = r {
            if r.2 {
                replies.push(r);
            }
        }
        if !waiting.is_empty() {
            return Ok(());
        }
        let (replies, then) = (std::mem::take(replies), *then);
        self.calls
            .retain(|_, c| !matches!(c, Pending::Discover { round: x, .. } if *x == round));
        self.monitor = None;
        let newest = replies
            .iter()
            .filter_map(|r| r.0.clone())
            .max_by_key(|v| v.epoch);
        match then {
            AfterDiscover::FindCluster => {
                if replies.is_empty() {
                    self.monitor_idle(cx, 200, 201);
                    return Ok(());
                }
                // `adopt_cluster`: amnesiac until installed in a view newer than any heard of.
                let heard = replies
                    .iter()
                    .map(|r| r.1.max(r.0.as_ref().map_or(0, |v| v.epoch)))
                    .max()
                    .unwrap_or(0);
                self.st.become_amnesiac(newest, heard);
                self.note_ballot(heard);
                self.disk.write(Op::Membership {
                    view: Some(self.st.view.clone()),
                    amnesiac_until: Some(heard),
                });
                self.sync_disk(cx)?;
                self.in_cluster = true;
                Ok(())
            }
            AfterDiscover::TakeOver => {
                if let Some(v) = newest.filter(|v| v.epoch > self.st.view.epoch) {
                    return self.learn_view(cx, v);
                }
                self.monitor = Some(MonitorJob::Proposing);
                self.change_view(cx, Reason::TakeOver, Purpose::Monitor)
            }
            AfterDiscover::Rejoin => {
                if let Some(v) = newest.filter(|v| v.epoch > self.st.view.epoch) {
                    self.learn_view(cx, v)?;
                }
                match monitor::rejoin(&self.st, self.me) {
                    Rejoin::WaitForTakeOver => {
                        self.monitor_idle(cx, 100, 300);
                        Ok(())
                    }
                    Rejoin::Restart => {
                        self.monitor = Some(MonitorJob::Proposing);
                        self.change_view(cx, Reason::Restart, Purpose::Monitor)
                    }
                    Rejoin::CatchUpFrom(p) => {
                        if self.st.member {
                            return Ok(());
                        }
                        if self.sync.is_some() || self.pjob.is_some() || self.member_install {
                            self.monitor_idle(cx, 100, 300);
                            return Ok(());
                        }
                        self.monitor = Some(MonitorJob::Syncing);
                        self.sync_from(cx, p, 0, SyncFor::Rejoin { primary: p }, None)
                    }
                }
            }
        }
    }

    /// The user items this server holds (for the convergence check).
    pub fn user_items(&self) -> Vec<(Bytes, Option<Bytes>)> {
        self.disk
            .current
            .items
            .iter()
            .filter(|(k, _)| k.first() == Some(&b'u'))
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect()
    }

    /// Whether anything of this server is still in motion (for the end of a run).
    pub fn idle(&self) -> bool {
        self.proposal.is_none() && self.pjob.is_none() && self.sync.is_none()
    }
}
