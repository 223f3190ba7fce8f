//! View changes (DESIGN.md §5): each transition out of a view is one single-decree Paxos
//! instance whose acceptors are that view's members and whose ballots are epochs. This module
//! holds the proposer (`change_view`), the acceptor handlers (`on_prepare`, `on_accept`) and
//! the install + reconcile step.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{join_all, Either, FutureExt};
use futures::stream::{FuturesUnordered, StreamExt};
use rand::Rng;
use replikv_proto::peer::{
    AcceptRequest, AcceptResponse, InstallRequest, InstallResponse, PrepareRequest, PrepareResponse,
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::convert::view_from;
use crate::fault::CrashPoint;
use crate::network::NetResult;
use crate::node::{Node, OrFailStop};
use crate::storage::{Accepted, Promise};
use crate::types::{most_advanced, LogState, Rank, View, MAX_EPOCH};

const PREPARE_TIMEOUT: Duration = Duration::from_millis(400);
/// A member's install includes a state transfer from the primary, usually small (members
/// are in step, and joiners catch up before they ask to join). Writes pause meanwhile, so a
/// member that cannot finish in time is dropped instead of waited for.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_ATTEMPTS: u32 = 6;

/// Why a view change is proposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The primary drops a member whose acks timed out in the primary term of this epoch
    /// (a failure seen in an earlier term says nothing about the member after a re-install).
    Drop(Rank, u64),
    /// The primary adds a caught-up joiner (or re-adds a restarted member).
    Add(Rank),
    /// A backup whose primary went silent takes over.
    TakeOver,
    /// A restarted primary never resumes silently (§7).
    Restart,
}

/// After a quorum has said yes, how long stragglers may still answer (so a slightly slower
/// member is not left out of the new view for nothing).
const STRAGGLER_GRACE: Duration = Duration::from_millis(20);

/// Collects replies until the "yes" answers form a quorum of `view` (plus a short grace) or
/// every call has finished. Waiting for every member would let one silent member (an
/// isolated primary) stretch every round to the full timeout, long enough for the next
/// proposer to pre-empt it, round after round.
async fn gather<R, F>(
    view: &View,
    calls: impl IntoIterator<Item = F>,
    yes: impl Fn(&R) -> bool,
) -> Vec<(Rank, Result<R, String>)>
where
    F: std::future::Future<Output = (Rank, Result<R, String>)>,
{
    let mut pending: FuturesUnordered<F> = calls.into_iter().collect();
    let mut replies = Vec::new();
    let mut ayes = BTreeSet::new();
    let mut grace: Option<tokio::time::Instant> = None;
    loop {
        let next = match grace {
            Some(until) => match tokio::time::timeout_at(until, pending.next()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => pending.next().await,
        };
        let Some((rank, reply)) = next else { break };
        if reply.as_ref().is_ok_and(&yes) {
            ayes.insert(rank);
        }
        replies.push((rank, reply));
        if grace.is_none() && view.is_quorum(&ayes) {
            grace = Some(tokio::time::Instant::now() + STRAGGLER_GRACE);
        }
    }
    replies
}

impl Node {
    /// Sends `req` to every rank in `to` (this server answers its own copy through `local`,
    /// the others through `remote`) and gathers the replies of a phase of `from`'s view
    /// change (see [`gather`]).
    async fn ask<Req, R, LF, NF>(
        &self,
        from: &View,
        to: impl IntoIterator<Item = Rank>,
        req: &Req,
        local: impl Fn(Req) -> LF,
        remote: impl Fn(Rank, Req) -> NF,
        yes: impl Fn(&R) -> bool,
    ) -> Vec<(Rank, Result<R, String>)>
    where
        Req: Clone,
        LF: std::future::Future<Output = R>,
        NF: std::future::Future<Output = NetResult<R>>,
    {
        let calls = to.into_iter().map(|m| {
            let req = req.clone();
            let call = if m == self.me {
                Either::Left(local(req).map(Ok))
            } else {
                Either::Right(remote(m, req).map(|r| r.map_err(|e| e.to_string())))
            };
            call.map(move |r| (m, r))
        });
        gather(from, calls, yes).await
    }

    /// Whether `reason` still calls for a view change given the current state.
    fn still_needed(&self, reason: Reason) -> Result<(), String> {
        let st = self.st();
        let now = Instant::now();
        match reason {
            Reason::Drop(r, epoch) => {
                let same_term = st.primary.as_ref().is_some_and(|p| p.epoch == epoch);
                if !same_term || !st.view.is_member(r) {
                    return Err(
                        "the failure belongs to an earlier view, or the member is gone".into(),
                    );
                }
            }
            Reason::Add(_) => {
                if st.primary.is_none() {
                    return Err("not the primary".into());
                }
            }
            Reason::TakeOver => {
                if st.amnesiac_until.is_some() {
                    return Err("this server lost its state and has not rejoined yet".into());
                }
                if st.primary.is_some() || !st.view.is_member(self.me) {
                    return Err("not a backup of the current view".into());
                }
                if now < st.last_heard + self.cfg.timing.lease_guard() {
                    return Err("the primary is alive".into());
                }
            }
            Reason::Restart => {
                if st.amnesiac_until.is_some() {
                    return Err("this server lost its state and has not rejoined yet".into());
                }
                if st.view.primary != self.me || st.primary.is_some() {
                    return Err("not a restarted primary".into());
                }
            }
        }
        Ok(())
    }

    /// Runs the Paxos instance that replaces the current view; returns the decided view.
    pub(crate) async fn change_view(self: &Arc<Self>, reason: Reason) -> Result<View, String> {
        let _one_at_a_time = self.proposing.lock().await;
        let mut last_err = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                let ms = rand::rng().random_range(20..80u64) * (1u64 << attempt.min(4));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            self.still_needed(reason)?;
            let from = self.st().view.clone();
            let ballot = self
                .max_ballot
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(from.epoch)
                .checked_add(1)
                .filter(|&b| b <= MAX_EPOCH)
                .ok_or("the ballots are exhausted")?;
            self.note_ballot(ballot);
            info!(
                ?reason,
                ballot,
                from_epoch = from.epoch,
                "proposing a view change"
            );

            // Phase 1: prepare.
            let req = PrepareRequest {
                ballot,
                proposer: self.me,
                view: Some((&from).into()),
            };
            let replies = self
                .ask(
                    &from,
                    from.members.iter().copied(),
                    &req,
                    move |req| self.on_prepare(req),
                    move |m, req| self.net.prepare(m, req, PREPARE_TIMEOUT),
                    |r: &PrepareResponse| r.promised,
                )
                .await;
            let mut promisers = BTreeSet::new();
            let mut states = Vec::new();
            let mut best: Option<Accepted> = None;
            for (m, r) in replies {
                let Ok(resp) = r else { continue };
                self.note_ballot(resp.promised_ballot);
                if let Some(v) = self.peer_view(resp.view.as_ref()) {
                    if v.epoch > from.epoch {
                        self.learn_view(v).await;
                        return Err("a newer view exists".into());
                    }
                }
                if !resp.promised {
                    last_err = format!("rank {m} refused: {}", resp.reason);
                    continue;
                }
                promisers.insert(m);
                states.push(LogState {
                    rank: m,
                    applied: resp.applied,
                    committed: resp.committed,
                    last_epoch: resp.last_epoch,
                });
                if let Some(a) = resp.accepted {
                    if let Some(v) = self.peer_view(a.view.as_ref()) {
                        if best.as_ref().is_none_or(|b| a.ballot > b.ballot) {
                            best = Some(Accepted {
                                ballot: a.ballot,
                                from_epoch: from.epoch,
                                view: v,
                            });
                        }
                    }
                }
            }
            if !from.is_quorum(&promisers) {
                warn!(ballot, promisers = ?promisers, last_err, "no quorum of promises");
                continue;
            }
            self.faults.crash_point(CrashPoint::Prepared);

            // Phase 2: accept. An accepted proposal must be re-proposed (Paxos), else ours.
            let view = match best {
                Some(a) => View::new(ballot, a.view.primary, a.view.members),
                None => {
                    let mut members = promisers.clone();
                    match reason {
                        Reason::Drop(r, _) => {
                            members.remove(&r);
                        }
                        Reason::Add(j) => {
                            members.insert(j);
                        }
                        Reason::TakeOver | Reason::Restart => {}
                    }
                    View::new(ballot, self.me, members)
                }
            };
            let req = AcceptRequest {
                ballot,
                proposer: self.me,
                from_view: Some((&from).into()),
                view: Some((&view).into()),
            };
            let replies = self
                .ask(
                    &from,
                    promisers.iter().copied(),
                    &req,
                    move |req| self.on_accept(req),
                    move |m, req| self.net.accept(m, req, PREPARE_TIMEOUT),
                    |r: &AcceptResponse| r.accepted,
                )
                .await;
            let accepters: BTreeSet<Rank> = replies
                .into_iter()
                .filter_map(|(m, r)| {
                    let r = r.ok()?;
                    self.note_ballot(r.promised_ballot);
                    r.accepted.then_some(m)
                })
                .collect();
            if !from.is_quorum(&accepters) {
                warn!(ballot, accepters = ?accepters, "no quorum of accepts");
                last_err = "no quorum of accepts".into();
                continue;
            }

            // Decided. Its primary installs it everywhere and reconciles (step 4).
            self.faults.crash_point(CrashPoint::Decided);
            info!(epoch = view.epoch, primary = view.primary, members = ?view.members, "view decided");
            if view.primary == self.me {
                self.install_as_primary(view.clone(), from, states).await?;
            } else {
                let req = InstallRequest {
                    view: Some((&view).into()),
                    from: self.me,
                    states: states.iter().map(Into::into).collect(),
                    previous: Some((&from).into()),
                };
                let r = self.net.install(view.primary, req, INSTALL_TIMEOUT).await;
                if let Err(e) = r {
                    warn!(primary = view.primary, error = %e, "decided primary did not take the view");
                }
            }
            return Ok(view);
        }
        Err(format!("view change gave up: {last_err}"))
    }

    /// Acceptor, phase 1.
    pub async fn on_prepare(self: &Arc<Self>, req: PrepareRequest) -> PrepareResponse {
        let now = Instant::now();
        let from = view_from(req.view.as_ref(), self.n);
        let resp = {
            let mut st = self.st();
            let refuse = |st: &crate::node::State, reason: &str| PrepareResponse {
                promised: false,
                view: Some((&st.view).into()),
                promised_ballot: st.promise.ballot,
                accepted: None,
                applied: st.pos.applied,
                committed: st.pos.committed,
                last_epoch: st.pos.last_epoch,
                reason: reason.into(),
            };
            let Some(from) = from else {
                return refuse(&st, "malformed view");
            };
            if st.amnesiac_until.is_some() {
                // It forgot what it promised and accepted: its vote could undo a decision.
                return refuse(&st, "this server lost its state and has not rejoined yet");
            }
            if req.ballot > MAX_EPOCH {
                return refuse(&st, "ballot out of range");
            }
            if from.epoch < st.view.epoch {
                return refuse(&st, "a newer view exists");
            }
            if req.ballot <= st.promise.ballot || req.ballot <= from.epoch {
                return refuse(&st, "promised a higher ballot");
            }
            if req.proposer != self.me {
                if st.primary.is_some() {
                    return refuse(&st, "this server is the live primary");
                }
                // Loyalty (§4): do not help depose a primary heard from within L(1+eps).
                if req.proposer != st.view.primary
                    && from.epoch == st.view.epoch
                    && now < st.last_heard + self.cfg.timing.lease_guard()
                {
                    return refuse(&st, "the primary is alive");
                }
            }
            if from.epoch > st.view.epoch {
                // This server missed the install of `from`; promising is still safe (it has
                // accepted nothing for that instance), but its data is not a member's.
                st.view = from.clone();
                st.member = false;
                st.lease_until = None;
            }
            st.promise = Promise {
                ballot: req.ballot,
                to: req.proposer,
            };
            if req.proposer != st.view.primary {
                // Stop acting on the old primary's lease: it can no longer commit without us.
                st.lease_until = None;
            }
            let accepted = st
                .accepted
                .as_ref()
                .filter(|a| a.from_epoch == from.epoch)
                .map(|a| replikv_proto::peer::Accepted {
                    ballot: a.ballot,
                    view: Some((&a.view).into()),
                });
            PrepareResponse {
                promised: true,
                view: Some((&st.view).into()),
                promised_ballot: req.ballot,
                accepted,
                applied: st.pos.applied,
                committed: st.pos.committed,
                last_epoch: st.pos.last_epoch,
                reason: String::new(),
            }
        };
        self.note_ballot(req.ballot);
        self.persist_paxos().await;
        self.faults.crash_point(CrashPoint::Promised);
        resp
    }

    /// Acceptor, phase 2.
    pub async fn on_accept(self: &Arc<Self>, req: AcceptRequest) -> AcceptResponse {
        let (Some(from), Some(view)) = (
            view_from(req.from_view.as_ref(), self.n),
            view_from(req.view.as_ref(), self.n),
        ) else {
            let st = self.st();
            return AcceptResponse {
                accepted: false,
                promised_ballot: st.promise.ballot,
                view: Some((&st.view).into()),
            };
        };
        {
            let mut st = self.st();
            // An equal ballot promised to another proposer is not ours to accept.
            let promised_other = req.ballot == st.promise.ballot && st.promise.to != req.proposer;
            if st.amnesiac_until.is_some()
                || from.epoch < st.view.epoch
                || req.ballot < st.promise.ballot
                || promised_other
                || view.epoch != req.ballot
            {
                return AcceptResponse {
                    accepted: false,
                    promised_ballot: st.promise.ballot,
                    view: Some((&st.view).into()),
                };
            }
            st.promise = Promise {
                ballot: req.ballot,
                to: req.proposer,
            };
            let a = Accepted {
                ballot: req.ballot,
                from_epoch: from.epoch,
                view,
            };
            st.accepted = Some(a);
        }
        self.persist_paxos().await;
        self.faults.crash_point(CrashPoint::Accepted);
        AcceptResponse {
            accepted: true,
            promised_ballot: req.ballot,
            view: None,
        }
    }

    /// Step 4 on the decided primary: take the most advanced member state, have every member
    /// sync from it, then serve (after the lease wait when the primary changed).
    pub(crate) async fn install_as_primary(
        self: &Arc<Self>,
        view: View,
        prev: View,
        states: Vec<LogState>,
    ) -> Result<(), String> {
        let guard = self.data.lock().await;
        let (was_primary, old_commit_after, removed_last_send) = {
            let mut st = self.st();
            if view.epoch < st.view.epoch || (view.epoch == st.view.epoch && st.primary.is_some()) {
                return Err("a newer view is already installed".into());
            }
            let old = st.primary.take();
            let was_primary = old.is_some()
                && prev.primary == self.me
                && old.as_ref().is_some_and(|p| p.epoch == prev.epoch);
            if old.is_some() && !was_primary {
                st.term += 1;
                self.publish_commit(&st);
            }
            let mut commit_after = Instant::now();
            let mut last_send = None;
            if let Some(p) = &old {
                commit_after = p.commit_after;
                for (r, pr) in &p.peers {
                    if !view.is_member(*r) {
                        if let Some(t) = pr.last_send {
                            last_send = Some(last_send.map_or(t, |l: Instant| l.max(t)));
                        }
                    }
                }
            }
            st.view = view.clone();
            st.accepted = None;
            st.member = false;
            st.lease_until = None;
            st.stream = None;
            (was_primary, commit_after, last_send)
        };
        self.persist_paxos().await;

        // Take the most advanced state among the members (and this server, unless it lost
        // its state: then it must take a member's state whatever its own looks like).
        let (mine, amnesiac) = {
            let st = self.st();
            let mine = LogState {
                rank: self.me,
                applied: st.pos.applied,
                committed: st.pos.committed,
                last_epoch: st.pos.last_epoch,
            };
            (mine, st.amnesiac_until.is_some())
        };
        let mut all: Vec<LogState> = states
            .into_iter()
            .filter(|s| view.is_member(s.rank) && s.rank != self.me)
            .collect();
        if !amnesiac {
            all.push(mine);
        }
        let best = most_advanced(&all, self.me);
        if amnesiac && best.is_none() {
            drop(guard);
            return Err("this server lost its state and no member's state is known".into());
        }
        if let Some(best) = best {
            if best.rank != self.me {
                info!(source = best.rank, "taking the most advanced member state");
                if let Err(e) = self.sync_from(best.rank, view.epoch).await {
                    warn!(source = best.rank, error = %e, "could not take the most advanced state");
                    drop(guard);
                    self.st().member = false;
                    return Err(e);
                }
            }
        }
        // The commit point does not move here: everything applied is about to be on every
        // member, but it may only commit once the lease gates allow (`advance_commit`).
        self.st().member = true;
        self.store.flush_data().await.or_fail_stop(self);
        self.faults.crash_point(CrashPoint::Reconciled);

        // Every other member syncs from this server while writes are paused.
        let req = InstallRequest {
            view: Some((&view).into()),
            from: self.me,
            states: Vec::new(),
            previous: Some((&prev).into()),
        };
        let results = join_all(view.backups().map(|m| {
            let req = req.clone();
            async move { (m, self.net.install(m, req, INSTALL_TIMEOUT).await) }
        }))
        .await;
        let mut failed = Vec::new();
        for (m, r) in results {
            match r {
                Ok(resp) if resp.ok => {}
                Ok(resp) => {
                    warn!(
                        member = m,
                        reason = resp.reason,
                        "member refused the install"
                    );
                    if let Some(v) = self.peer_view(resp.view.as_ref()) {
                        if v.epoch > view.epoch {
                            drop(guard);
                            self.learn_view(v).await;
                            return Err("a newer view exists".into());
                        }
                    }
                    failed.push(m)
                }
                Err(e) => {
                    warn!(member = m, error = %e, "member install failed");
                    failed.push(m)
                }
            }
        }
        let now = Instant::now();
        let guard_time = self.cfg.timing.lease_guard();
        let serve_after = if was_primary { now } else { now + guard_time };
        let commit_after =
            removed_last_send.map_or(old_commit_after, |t| old_commit_after.max(t + guard_time));
        // A single-member view grants no leases, so only a change of primary needs a wait.
        let serve_after = if view.members.len() == 1 && was_primary {
            now
        } else {
            serve_after
        };
        {
            let st = self.st();
            if st.view.epoch != view.epoch {
                return Err("superseded during install".into());
            }
        }
        // A member whose install failed holds nothing of this view: it must not count as
        // having acknowledged anything (§10), or a write could commit without it.
        let synced = view.backups().filter(|m| !failed.contains(m)).collect();
        self.become_primary(&view, serve_after, commit_after, &synced);
        drop(guard);
        self.end_amnesia_if_past(&view).await;
        for f in failed {
            self.member_failed(f, view.epoch);
        }
        Ok(())
    }

    /// Install on a member (from the decided view's primary), or on the decided primary
    /// (from the proposer, with the promisers' states).
    pub async fn on_install(self: &Arc<Self>, req: InstallRequest) -> InstallResponse {
        let refuse = |node: &Node, reason: String| {
            let st = node.st();
            InstallResponse {
                ok: false,
                applied: st.pos.applied,
                reason,
                view: Some((&st.view).into()),
            }
        };
        let Some(view) = view_from(req.view.as_ref(), self.n) else {
            return refuse(self, "malformed view".into());
        };
        if view.primary == self.me {
            let prev = view_from(req.previous.as_ref(), self.n).unwrap_or_else(|| view.clone());
            let states = req.states.iter().map(Into::into).collect();
            return match self.install_as_primary(view, prev, states).await {
                Ok(()) => InstallResponse {
                    ok: true,
                    applied: self.st().pos.applied,
                    reason: String::new(),
                    view: None,
                },
                Err(e) => refuse(self, e),
            };
        }
        if req.from != view.primary || !view.is_member(self.me) {
            return refuse(
                self,
                "install must come from the view's primary to a member".into(),
            );
        }
        let _guard = self.data.lock().await;
        {
            let mut st = self.st();
            if view.epoch < st.view.epoch {
                drop(st);
                return refuse(self, "a newer view exists".into());
            }
            self.step_down(&mut st);
            st.view = view.clone();
            st.member = false;
            st.lease_until = None;
            st.stream = None;
            st.accepted = None;
            st.last_heard = Instant::now();
        }
        self.persist_paxos().await;
        if let Err(e) = self.sync_from(view.primary, view.epoch).await {
            return refuse(self, format!("state transfer from the primary failed: {e}"));
        }
        let installed = {
            let mut st = self.st();
            (st.view.epoch == view.epoch).then(|| {
                st.member = true;
                st.last_heard = Instant::now();
                self.publish_commit(&st);
                st.pos.applied
            })
        };
        let Some(applied) = installed else {
            return refuse(self, "superseded during install".into());
        };
        self.faults.crash_point(CrashPoint::Installed);
        info!(
            epoch = view.epoch,
            primary = view.primary,
            applied,
            "installed view as backup"
        );
        self.end_amnesia_if_past(&view).await;
        InstallResponse {
            ok: true,
            applied,
            reason: String::new(),
            view: None,
        }
    }
}
