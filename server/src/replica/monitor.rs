//! Start-up discovery, the failure monitor and revival (docs/design.md §5, §7, §10): a server
//! without state finds its cluster (or, rank 0 with `--bootstrap`, forms one); a backup whose
//! primary went silent takes over; a non-member catches up and asks to join. The timing and
//! the choices are the engine's (`engine::monitor`).

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rand::Rng;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::{Node, OrFailStop, Reason};
use crate::auth;
use crate::engine::monitor::{self, Rejoin};
use crate::error::StorageError;
use crate::identity::{ClusterId, Membership};
use crate::message::{Discover, DiscoverReply, Join, Refused};
use crate::storage::Position;
use crate::types::{user_item, Item, Rank, Record, View};

const DISCOVER_TIMEOUT: Duration = Duration::from_millis(300);
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

impl Node {
    /// A server without state (new, or its data directory lost) asks its peers until it can
    /// either join the cluster one of them belongs to, or (rank 0 with `--bootstrap` only)
    /// form a new cluster because every peer answered that it holds no state either
    /// (docs/design.md §10). An empty data directory alone never means "new cluster": the peers
    /// that hold the data may simply not be up yet.
    pub(super) async fn find_cluster(self: &Arc<Self>) {
        let started = Instant::now();
        let mut next_log = started + Duration::from_secs(5);
        loop {
            let replies = self.discover_all().await;
            let ids: std::collections::BTreeSet<ClusterId> =
                replies.iter().filter_map(|r| r.cluster_id).collect();
            if ids.len() > 1 {
                error!(ids = ?ids, "peers belong to different clusters; joining none of them");
            } else if let Some(&id) = ids.first() {
                self.adopt_cluster(id, &replies).await;
                return;
            } else if self.me == 0
                && self.cfg.bootstrap
                && replies.len() + 1 == self.seed.servers.len()
            {
                self.form_cluster().await;
                return;
            }
            if Instant::now() >= next_log {
                next_log = Instant::now() + Duration::from_secs(5);
                info!(
                    answered = replies.len(),
                    peers = self.seed.servers.len() - 1,
                    waited_s = started.elapsed().as_secs(),
                    "no state here and no cluster found yet: waiting for a peer that holds \
                     the cluster's state{}",
                    if self.me == 0 && self.cfg.bootstrap {
                        ", or for every peer to answer to form a new cluster"
                    } else if self.me == 0 {
                        " (start with --bootstrap to form a new cluster)"
                    } else {
                        ""
                    }
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Bootstrap: a new cluster whose first view is rank 0 alone; the other servers join it
    /// through state transfers, as any server without state does. The id and the view are
    /// one log batch, so a crash leaves either both or neither.
    async fn form_cluster(self: &Arc<Self>) {
        let id = match ClusterId::generate() {
            Ok(id) => id,
            Err(e) => self.fail_stop(StorageError::Corrupt(format!(
                "no randomness for a cluster id: {e}"
            ))),
        };
        // docs/design.md §11: the first configuration is the `--peers` list.
        let view = View::bootstrap().with_config(Some(self.seed.clone()));
        if let Some(path) = &self.cfg.ops.restore {
            // The snapshot's keys go into the log before the id: the id's flush makes both
            // durable, and a crash before it leaves a directory with no cluster to form again.
            if let Err(e) = self.restore(path) {
                self.fail_stop(StorageError::Corrupt(e));
            }
        }
        let membership = Membership {
            cluster: id,
            amnesiac_until: None,
        };
        // The admin user is the new history's first record, logged in the one batch that
        // also holds the id and the view (docs/design.md §13): a cluster never exists
        // without it.
        let (token, file) =
            match auth::admin_token(self.cfg.admin_token_file.as_deref(), &self.cfg.data_dir) {
                Ok(t) => t,
                Err(e) => self.fail_stop(StorageError::Io(std::io::Error::other(e))),
            };
        // After a restore the admin record follows the snapshot's commit point; the old
        // cluster's other users come back with their keys, its admin gets the new token.
        let lsn = self.st().pos.applied + 1;
        let admin = Record {
            lsn,
            epoch: view.epoch,
            items: vec![Item {
                key: user_item(&auth::account_key(auth::ADMIN_USER)),
                value: Some(auth::Account::new(&token, true).encode()),
            }],
        };
        let pos = Position {
            applied: lsn,
            committed: lsn,
            last_epoch: view.epoch,
        };
        self.store
            .apply_records(std::slice::from_ref(&admin), pos)
            .or_fail_stop(self);
        self.st().pos = pos;
        self.store
            .save_membership(&membership, Some(&view))
            .await
            .or_fail_stop(self);
        info!(user = auth::ADMIN_USER, token_file = %file.display(), "created the admin user");
        self.identity.set(id);
        info!(cluster = %id, "formed a new cluster: every peer answered that it holds no state");
        let now = self.clock.steady_now();
        // Nobody held a lease in a brand-new cluster: serve at once.
        self.become_primary(&view, now, now, &Default::default());
    }

    /// Joins the cluster `id` with no state: amnesiac until a state transfer and an install
    /// make this server a member of a view newer than anything it may have voted in.
    async fn adopt_cluster(self: &Arc<Self>, id: ClusterId, replies: &[DiscoverReply]) {
        let ours: Vec<&DiscoverReply> = replies
            .iter()
            .filter(|r| r.cluster_id == Some(id))
            .collect();
        let newest = ours
            .iter()
            .filter_map(|r| r.view.clone())
            .max_by_key(|v| v.epoch);
        let heard = ours
            .iter()
            .map(|r| r.promised.max(r.view.as_ref().map_or(0, |v| v.epoch)))
            .max()
            .unwrap_or(0);
        let membership = Membership {
            cluster: id,
            amnesiac_until: Some(heard),
        };
        let view = {
            let mut st = self.st();
            st.become_amnesiac(newest, heard);
            st.view.clone()
        };
        self.note_ballot(heard);
        self.store
            .save_membership(&membership, Some(&view))
            .await
            .or_fail_stop(self);
        self.identity.set(id);
        self.net.configure(&self.configuration());
        info!(cluster = %id, epoch = view.epoch, heard, "no state here: joining the existing cluster through a state transfer");
    }

    pub fn on_discover(&self) -> DiscoverReply {
        let st = self.st();
        DiscoverReply {
            rank: self.me,
            view: Some(st.view.clone()),
            promised: st.promise.ballot,
            applied: st.pos.applied,
            recovering: !st.member,
            cluster_id: self.identity.get(),
            amnesiac: st.amnesiac(),
        }
    }

    /// Asks every peer for its view (the classic "who is primary, with which timestamp").
    /// Once this server knows its cluster, only answers of servers of that cluster count.
    pub(crate) async fn discover_all(&self) -> Vec<DiscoverReply> {
        let peers: Vec<Rank> = self
            .configuration()
            .ranks()
            .filter(|&r| r != self.me)
            .collect();
        let ours = self.identity.get();
        join_all(peers.into_iter().map(|r| {
            self.net
                .discover(r, Discover { from: self.me }, DISCOVER_TIMEOUT)
        }))
        .await
        .into_iter()
        .filter_map(Result::ok)
        .filter(|r| ours.is_none_or(|id| r.cluster_id == Some(id)))
        .collect()
    }

    /// Background: a backup whose primary went silent takes over (after L(1+eps) plus a
    /// stagger by rank distance, so the next rank goes first); a non-member rejoins.
    pub(crate) async fn monitor(self: Arc<Self>) {
        let tick = self.cfg.timing.heartbeat / 2;
        loop {
            tokio::time::sleep(tick).await;
            let monitor::Tick {
                stuck,
                takeover,
                rejoin,
            } = {
                let st = self.st();
                monitor::tick(
                    &st,
                    self.me,
                    self.rank_bound_of(&st),
                    &self.cfg.timing,
                    self.clock.now(),
                )
            };
            for (m, epoch) in stuck {
                self.member_failed(m, epoch);
            }
            if takeover {
                // Maybe the cluster moved on without us: look before proposing.
                if self.adopt_newer_view().await {
                    continue;
                }
                match self.change_view(Reason::TakeOver).await {
                    Ok(v) => info!(epoch = v.epoch, primary = v.primary, "take-over decided"),
                    Err(e) => {
                        debug!(error = %e, "take-over did not happen");
                        let ms = rand::rng().random_range(50..250);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                }
            } else if rejoin {
                if let Err(e) = self.rejoin().await {
                    debug!(error = %e, "rejoin attempt failed");
                    let ms = rand::rng().random_range(100..300);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
        }
    }

    /// Adopts the newest view any peer reports, if newer than ours. True if it adopted one.
    async fn adopt_newer_view(self: &Arc<Self>) -> bool {
        let replies = self.discover_all().await;
        let newest = replies
            .iter()
            .filter_map(|r| r.view.clone())
            .max_by_key(|v| v.epoch);
        match newest {
            Some(v) if v.epoch > self.st().view.epoch => {
                self.learn_view(v).await;
                true
            }
            _ => false,
        }
    }

    /// One revival attempt (§7): find the newest view; a restarted primary runs a view change;
    /// anyone else catches up from that view's primary and asks it to join.
    async fn rejoin(self: &Arc<Self>) -> Result<(), String> {
        self.adopt_newer_view().await;
        let plan = monitor::rejoin(&self.st(), self.me);
        let primary = match plan {
            Rejoin::WaitForTakeOver => {
                return Err("the view names this server primary, but its state is lost".into());
            }
            Rejoin::Restart => return self.change_view(Reason::Restart).await.map(|_| ()),
            Rejoin::CatchUpFrom(primary) => primary,
        };
        // Bulk transfer while writes go on; the install transfers the rest with writes paused.
        let target = {
            let _guard = self.data.lock().await;
            if self.st().member {
                return Ok(());
            }
            self.sync_from(primary, 0).await?
        };
        debug!(primary, target, "caught up; asking to join");
        let applied = self.st().pos.applied;
        let resp = self
            .net
            .join(
                primary,
                Join {
                    rank: self.me,
                    applied,
                },
                JOIN_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?;
        match resp.result {
            Ok(()) => {
                info!(primary, "rejoined the view");
                Ok(())
            }
            Err(Refused(reason)) => {
                if let Some(v) = resp.view {
                    if v.epoch > self.st().view.epoch {
                        self.learn_view(v).await;
                    }
                }
                warn!(primary, reason, "join refused");
                Err(reason)
            }
        }
    }
}
