//! View changes (docs/design.md §5): each transition out of a view is one single-decree Paxos
//! instance whose acceptors are that view's members and whose ballots are epochs. This module
//! holds the proposer (`change_view`), the acceptor handlers (`on_prepare`, `on_accept`) and
//! the install + reconcile step.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{join_all, Either, FutureExt};
use futures::stream::{FuturesUnordered, StreamExt};
use rand::Rng;
use tracing::{info, warn};

use super::{Node, OrFailStop};
use crate::engine::install::{self as installing, PrimaryInstall};
use crate::engine::paxos::{self, PrepareOutcome, PrepareRefusal, PromiseReply, Tally};
use crate::fault::CrashPoint;
use crate::message::{
    Accept, AcceptReply, Install, InstallReply, Prepare, PrepareRefused, PrepareReply, Refused,
};
use crate::network::NetResult;
use crate::types::{LogState, Rank, View};

pub use crate::engine::paxos::Reason;

const PREPARE_TIMEOUT: Duration = Duration::from_millis(400);
/// A member's install includes a state transfer from the primary, usually small (members
/// are in step, and joiners catch up before they ask to join). Writes pause meanwhile, so a
/// member that cannot finish in time is dropped instead of waited for.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_ATTEMPTS: u32 = 6;

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
    let mut tally = Tally::new(view);
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
        let quorum_now = reply.as_ref().is_ok_and(&yes) && tally.yes(rank);
        replies.push((rank, reply));
        if quorum_now {
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

    /// Whether `reason` still calls for a view change now (see [`paxos::still_needed`]).
    fn still_needed(&self, reason: Reason) -> Result<(), String> {
        let now = self.clock.steady_now();
        paxos::still_needed(
            &self.st(),
            self.me,
            reason,
            now,
            self.cfg.timing.lease_guard(),
        )
        .map_err(String::from)
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
            self.still_needed(reason.clone())?;
            let from = self.st().view.clone();
            let seen = self.max_ballot.load(std::sync::atomic::Ordering::Relaxed);
            let ballot = paxos::next_ballot(seen, from.epoch).ok_or("the ballots are exhausted")?;
            self.note_ballot(ballot);
            info!(
                ?reason,
                ballot,
                from_epoch = from.epoch,
                "proposing a view change"
            );

            // Phase 1: prepare.
            let req = Prepare {
                ballot,
                proposer: self.me,
                view: Some(from.clone()),
            };
            let replies = self
                .ask(
                    &from,
                    from.members.iter().copied(),
                    &req,
                    move |req| self.on_prepare(req),
                    move |m, req| self.net.prepare(m, req, PREPARE_TIMEOUT),
                    |r: &PrepareReply| r.result.is_ok(),
                )
                .await;
            let mut answers = Vec::new();
            for (m, r) in replies {
                let Ok(resp) = r else { continue };
                self.note_ballot(resp.promised_ballot);
                let (promised, accepted, reason) = match resp.result {
                    Ok(accepted) => (true, accepted, String::new()),
                    Err(why) => (false, None, why.to_string()),
                };
                answers.push(PromiseReply {
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
                });
            }
            // Phase 2's value (§5 step 2): an accepted proposal must be re-proposed (Paxos),
            // else ours.
            let (promisers, states, view) =
                match paxos::after_prepare(self.me, &from, ballot, reason.clone(), &answers) {
                    PrepareOutcome::NewerView(v) => {
                        self.learn_view(v).await;
                        return Err("a newer view exists".into());
                    }
                    PrepareOutcome::NoQuorum {
                        promisers,
                        last_refusal,
                    } => {
                        if let Some(e) = last_refusal {
                            last_err = e;
                        }
                        warn!(ballot, promisers = ?promisers, last_err, "no quorum of promises");
                        continue;
                    }
                    PrepareOutcome::Quorum {
                        promisers,
                        states,
                        view,
                    } => (promisers, states, view),
                };
            self.faults.crash_point(CrashPoint::Prepared);

            // Phase 2: accept.
            let req = Accept {
                ballot,
                proposer: self.me,
                from_view: Some(from.clone()),
                view: Some(view.clone()),
            };
            let replies = self
                .ask(
                    &from,
                    promisers.iter().copied(),
                    &req,
                    move |req| self.on_accept(req),
                    move |m, req| self.net.accept(m, req, PREPARE_TIMEOUT),
                    |r: &AcceptReply| r.accepted,
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
                let req = Install {
                    view: Some(view.clone()),
                    from: self.me,
                    states,
                    previous: Some(from.clone()),
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

    /// Acceptor, phase 1 (see [`paxos::prepare`]): the promise is persisted before the reply
    /// (§10).
    pub async fn on_prepare(self: &Arc<Self>, req: Prepare) -> PrepareReply {
        let refuse = |st: &super::State, why: PrepareRefusal| PrepareReply {
            result: Err(PrepareRefused::Known(why)),
            view: Some(st.view.clone()),
            promised_ballot: st.promise.ballot,
            applied: st.pos.applied,
            committed: st.pos.committed,
            last_epoch: st.pos.last_epoch,
        };
        let now = self.clock.steady_now();
        let resp = {
            let mut st = self.st();
            let Some(from) = req.view else {
                return refuse(&st, PrepareRefusal::Malformed);
            };
            let prepare = paxos::Prepare {
                ballot: req.ballot,
                proposer: req.proposer,
                from,
            };
            let guard = self.cfg.timing.lease_guard();
            let accepted = match paxos::prepare(&mut st, self.me, &prepare, now, guard) {
                Ok(a) => a,
                Err(why) => return refuse(&st, why),
            };
            PrepareReply {
                result: Ok(accepted.map(|a| (a.ballot, a.view))),
                view: Some(st.view.clone()),
                promised_ballot: req.ballot,
                applied: st.pos.applied,
                committed: st.pos.committed,
                last_epoch: st.pos.last_epoch,
            }
        };
        self.note_ballot(req.ballot);
        self.persist_paxos().await;
        self.faults.crash_point(CrashPoint::Promised);
        resp
    }

    /// Acceptor, phase 2 (see [`paxos::accept`]): persisted before the reply (§10).
    pub async fn on_accept(self: &Arc<Self>, req: Accept) -> AcceptReply {
        let accepted = {
            let mut st = self.st();
            let views = (req.from_view, req.view);
            let accepted = match views {
                (Some(from), Some(view)) => paxos::accept(
                    &mut st,
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
                return AcceptReply {
                    accepted: false,
                    promised_ballot: st.promise.ballot,
                    view: Some(st.view.clone()),
                };
            }
            accepted
        };
        self.persist_paxos().await;
        self.faults.crash_point(CrashPoint::Accepted);
        AcceptReply {
            accepted,
            promised_ballot: req.ballot,
            view: None,
        }
    }

    /// Step 4 on the decided primary: take the most advanced member state, have every member
    /// sync from it, then serve (after the lease wait when the primary changed, §5 step 5).
    pub(crate) async fn install_as_primary(
        self: &Arc<Self>,
        view: View,
        prev: View,
        states: Vec<LogState>,
    ) -> Result<(), String> {
        let guard = self.data.lock().await;
        let install: PrimaryInstall = {
            let mut st = self.st();
            let install = installing::begin_install_as_primary(&mut st, self.me, &view, &prev)?;
            // The old role's streams end with it (a new set starts with the new role).
            self.feeds_stop();
            if install.term_changed {
                self.publish_commit(&st);
            }
            install
        };
        self.persist_paxos().await;

        let (mine, amnesiac) = {
            let st = self.st();
            let mine = LogState {
                rank: self.me,
                applied: st.pos.applied,
                committed: st.pos.committed,
                last_epoch: st.pos.last_epoch,
            };
            (mine, st.amnesiac())
        };
        let source = match installing::reconcile_source(self.me, &view, &states, mine, amnesiac) {
            Ok(source) => source,
            Err(e) => {
                drop(guard);
                return Err(e.into());
            }
        };
        if let Some(source) = source {
            info!(source, "taking the most advanced member state");
            if let Err(e) = self.sync_from(source, view.epoch).await {
                warn!(source, error = %e, "could not take the most advanced state");
                drop(guard);
                self.st().member = false;
                return Err(e);
            }
        }
        // The commit point does not move here: everything applied is about to be on every
        // member, but it may only commit once the lease gates allow (`advance_commit`).
        self.st().member = true;
        self.store.flush_data().await.or_fail_stop(self);
        self.faults.crash_point(CrashPoint::Reconciled);

        // Every other member syncs from this server while writes are paused.
        let req = Install {
            view: Some(view.clone()),
            from: self.me,
            states: Vec::new(),
            previous: Some(prev.clone()),
        };
        let results = join_all(view.backups().map(|m| {
            let req = req.clone();
            async move { (m, self.net.install(m, req, INSTALL_TIMEOUT).await) }
        }))
        .await;
        let mut failed = Vec::new();
        for (m, r) in results {
            match r {
                Ok(InstallReply { result: Ok(()), .. }) => {}
                Ok(InstallReply {
                    result: Err(why),
                    view: theirs,
                    ..
                }) => {
                    warn!(member = m, reason = %why, "member refused the install");
                    if let Some(v) = theirs.filter(|v| v.epoch > view.epoch) {
                        drop(guard);
                        self.learn_view(v).await;
                        return Err("a newer view exists".into());
                    }
                    failed.push(m)
                }
                Err(e) => {
                    warn!(member = m, error = %e, "member install failed");
                    failed.push(m)
                }
            }
        }
        let (serve_after, commit_after) = installing::install_waits(
            &install,
            &view,
            self.clock.steady_now(),
            self.cfg.timing.lease_guard(),
        );
        installing::still_installing(&self.st(), self.me, &view)?;
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
    pub async fn on_install(self: &Arc<Self>, req: Install) -> InstallReply {
        let refuse = |node: &Node, reason: String| {
            let st = node.st();
            InstallReply {
                result: Err(Refused(reason)),
                applied: st.pos.applied,
                view: Some(st.view.clone()),
            }
        };
        let Some(view) = req.view else {
            return refuse(self, "malformed view".into());
        };
        if view.primary == self.me {
            let prev = req.previous.unwrap_or_else(|| view.clone());
            return match self.install_as_primary(view, prev, req.states).await {
                Ok(()) => InstallReply {
                    result: Ok(()),
                    applied: self.st().pos.applied,
                    view: None,
                },
                Err(e) => refuse(self, e),
            };
        }
        if let Err(e) = installing::check_member_install(self.me, &view, req.from) {
            return refuse(self, e.into());
        }
        let _guard = self.data.lock().await;
        {
            let mut st = self.st();
            match installing::begin_member_install(&mut st, &view, self.clock.steady_now()) {
                Ok(true) => self.stepped_down(&st),
                Ok(false) => {}
                Err(e) => {
                    drop(st);
                    return refuse(self, e.into());
                }
            }
        }
        self.persist_paxos().await;
        if let Err(e) = self.sync_from(view.primary, view.epoch).await {
            return refuse(self, format!("state transfer from the primary failed: {e}"));
        }
        let installed = {
            let mut st = self.st();
            let applied =
                installing::finish_member_install(&mut st, &view, self.clock.steady_now());
            if applied.is_some() {
                self.publish_commit(&st);
            }
            applied
        };
        let Some(applied) = installed else {
            return refuse(self, "superseded during install".into());
        };
        self.faults.crash_point(CrashPoint::Installed);
        self.metrics.view_changes.inc();
        info!(
            epoch = view.epoch,
            primary = view.primary,
            applied,
            "installed view as backup"
        );
        self.end_amnesia_if_past(&view).await;
        InstallReply {
            result: Ok(()),
            applied,
            view: None,
        }
    }
}
