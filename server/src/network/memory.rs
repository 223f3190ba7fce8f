//! An in-process [`PeerNetwork`]: replicas of one process call each other's handlers
//! directly, through a router that can cut links (a partition, docs/design.md §8). For tests that
//! need several replicas without processes or sockets; the replicas are the real ones.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio_stream::wrappers::ReceiverStream;

use super::{AppendLink, NetError, NetResult, PeerNetwork, PeerStatus, StatusKind};
use crate::error::Outcome;
use crate::identity::Identity;
use crate::message::{
    Accept, AcceptReply, Append, AppendReply, Discover, DiscoverReply, Forward, Install,
    InstallReply, Join, JoinReply, Prepare, PrepareReply, SyncChunk, SyncRequest,
};
use crate::replica::{Node, WriteReq};
use crate::session::WriteResult;
use crate::types::Rank;

/// Connects the replicas of one process. `std::sync` locks: short sections, no awaits.
#[derive(Default)]
pub struct MemoryRouter {
    nodes: RwLock<Vec<Option<Weak<Node>>>>,
    /// Directed links that lose every message: (from, to).
    cut: Mutex<BTreeSet<(Rank, Rank)>>,
    /// Ranks whose installs are lost on the way, while every other message gets through:
    /// a member that promised and accepted a view but never learns it was decided.
    lose_installs: Mutex<BTreeSet<Rank>>,
}

impl MemoryRouter {
    pub fn new() -> Arc<MemoryRouter> {
        Arc::new(MemoryRouter::default())
    }

    /// The network `me` sends through; `identity` is its cluster id, checked as the gRPC
    /// service checks the cluster header (docs/design.md §10).
    pub fn network(self: &Arc<Self>, me: Rank, identity: Arc<Identity>) -> Arc<MemoryNetwork> {
        Arc::new(MemoryNetwork {
            me,
            identity,
            router: self.clone(),
        })
    }

    /// Makes `node` reachable as `rank`.
    pub fn register(&self, rank: Rank, node: &Arc<Node>) {
        let mut nodes = self.nodes.write().expect("router lock");
        if nodes.len() <= rank as usize {
            nodes.resize(rank as usize + 1, None);
        }
        nodes[rank as usize] = Some(Arc::downgrade(node));
    }

    /// Cuts every link to and from `rank` among `n` servers, both ways.
    pub fn isolate(&self, rank: Rank, n: usize) {
        let mut cut = self.cut.lock().expect("router lock");
        for other in (0..n as Rank).filter(|&r| r != rank) {
            cut.insert((rank, other));
            cut.insert((other, rank));
        }
    }

    /// Loses every install sent to `rank` (the sender sees a timeout); other messages
    /// to it get through.
    pub fn lose_installs_to(&self, rank: Rank) {
        self.lose_installs.lock().expect("router lock").insert(rank);
    }

    /// Restores every link and lets installs through again.
    pub fn heal(&self) {
        self.cut.lock().expect("router lock").clear();
        self.lose_installs.lock().expect("router lock").clear();
    }

    fn target(&self, from: Rank, to: Rank) -> Result<Option<Arc<Node>>, NetError> {
        if self.cut.lock().expect("router lock").contains(&(from, to)) {
            return Ok(None);
        }
        let nodes = self.nodes.read().expect("router lock");
        let node = nodes.get(to as usize).and_then(|n| n.as_ref()?.upgrade());
        node.map(Some).ok_or(NetError::UnknownPeer(to))
    }
}

/// One replica's end of a [`MemoryRouter`].
pub struct MemoryNetwork {
    me: Rank,
    identity: Arc<Identity>,
    router: Arc<MemoryRouter>,
}

fn refused(kind: StatusKind, message: impl Into<String>) -> NetError {
    NetError::Refused(PeerStatus {
        kind,
        message: message.into(),
        outcome: Outcome::None,
    })
}

impl MemoryNetwork {
    /// Runs `call` on `to`'s replica within `timeout`; a cut link is silence until then.
    async fn call<R, F, Fut>(
        &self,
        to: Rank,
        timeout: Duration,
        any_cluster: bool,
        call: F,
    ) -> NetResult<R>
    where
        F: FnOnce(Arc<Node>) -> Fut,
        Fut: std::future::Future<Output = NetResult<R>>,
    {
        let Some(node) = self.router.target(self.me, to)? else {
            tokio::time::sleep(timeout).await;
            return Err(NetError::Timeout(timeout));
        };
        let ours = self.identity.get();
        let theirs = node.identity.get();
        if !any_cluster && (ours.is_none() || ours != theirs) {
            return Err(refused(StatusKind::Precondition, "cluster mismatch"));
        }
        let r = tokio::time::timeout(timeout, call(node))
            .await
            .map_err(|_| NetError::Timeout(timeout))??;
        // A link cut while the call ran loses the answer.
        if self.router.target(to, self.me)?.is_none() {
            return Err(NetError::Timeout(timeout));
        }
        Ok(r)
    }
}

impl PeerNetwork for MemoryNetwork {
    fn forward(
        &self,
        to: Rank,
        req: Forward,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<WriteResult>> {
        self.call(to, t, false, move |node| async move {
            let req = WriteReq {
                key: req.key,
                value: req.value,
                id: req.id,
            };
            node.write_local(req)
                .await
                .map_err(|e| NetError::Refused(e.into()))
        })
        .boxed()
    }

    fn open_append(&self, to: Rank) -> NetResult<Box<dyn AppendLink>> {
        Ok(Box::new(MemoryAppendLink {
            net: MemoryNetwork {
                me: self.me,
                identity: self.identity.clone(),
                router: self.router.clone(),
            },
            to,
        }))
    }

    fn prepare(
        &self,
        to: Rank,
        req: Prepare,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<PrepareReply>> {
        self.call(to, t, false, move |node| async move {
            Ok(node.on_prepare(req).await)
        })
        .boxed()
    }

    fn accept(&self, to: Rank, req: Accept, t: Duration) -> BoxFuture<'_, NetResult<AcceptReply>> {
        self.call(to, t, false, move |node| async move {
            Ok(node.on_accept(req).await)
        })
        .boxed()
    }

    fn install(
        &self,
        to: Rank,
        req: Install,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<InstallReply>> {
        let lost = self
            .router
            .lose_installs
            .lock()
            .expect("router lock")
            .contains(&to);
        if lost {
            return async move {
                tokio::time::sleep(t).await;
                Err(NetError::Timeout(t))
            }
            .boxed();
        }
        self.call(to, t, false, move |node| async move {
            Ok(node.on_install(req).await)
        })
        .boxed()
    }

    fn join(&self, to: Rank, req: Join, t: Duration) -> BoxFuture<'_, NetResult<JoinReply>> {
        self.call(to, t, false, move |node| async move {
            Ok(node.on_join(req).await)
        })
        .boxed()
    }

    fn discover(
        &self,
        to: Rank,
        _req: Discover,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<DiscoverReply>> {
        self.call(
            to,
            t,
            true,
            move |node| async move { Ok(node.on_discover()) },
        )
        .boxed()
    }

    fn sync(
        &self,
        to: Rank,
        req: SyncRequest,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<BoxStream<'static, NetResult<SyncChunk>>>> {
        self.call(to, t, false, move |node| async move {
            let rx = node
                .on_sync(req)
                .map_err(|e| refused(StatusKind::Precondition, e.to_string()))?;
            let chunks = ReceiverStream::new(rx)
                .map(|c| c.map_err(|e| refused(StatusKind::Other, e.to_string())));
            Ok(chunks.boxed())
        })
        .boxed()
    }
}

/// The primary's stream to one member: each message is one call of its handler.
struct MemoryAppendLink {
    net: MemoryNetwork,
    to: Rank,
}

impl AppendLink for MemoryAppendLink {
    fn call(&mut self, req: Append, timeout: Duration) -> BoxFuture<'_, NetResult<AppendReply>> {
        let to = self.to;
        self.net
            .call(to, timeout, false, move |node| async move {
                Ok(node.on_append(req).await)
            })
            .boxed()
    }
}
