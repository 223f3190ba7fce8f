//! The gRPC implementation of [`PeerNetwork`]: one lazily connected tonic `Channel` per
//! peer, domain messages converted at this edge (`convert`), and the outgoing side of the
//! fault-injection layer of docs/design.md §8.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use replikv_proto::peer::peer_client::PeerClient;
use replikv_proto::peer::{AppendRequest, AppendResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Streaming};

use super::{AppendLink, NetError, NetResult, PeerNetwork};
use crate::convert as pb;
use crate::fault::{Action, Faults};
use crate::identity::{Identity, CLUSTER_HEADER};
use crate::message::{
    Accept, AcceptReply, Append, AppendReply, Discover, DiscoverReply, Forward, Install,
    InstallReply, Join, JoinReply, Prepare, PrepareReply, SyncChunk, SyncRequest,
};
use crate::session::WriteResult;
use crate::tls::NodeTls;
use crate::types::{Configuration, Rank};
use tracing::warn;

/// Views in answers are checked against their own configuration; this bounds the ranks of a
/// view that carries none.
const MAX_RANKS: usize = 1 << 16;

/// Metadata header naming the calling server's rank on every peer request.
pub const FROM_HEADER: &str = "replikv-from";

/// gRPC transport: one lazily connected tonic `Channel` per peer, cloned per call. The set
/// of peers follows the configuration (docs/design.md §11, [`PeerNetwork::configure`]).
pub struct GrpcNetwork {
    me: Rank,
    tls: Option<NodeTls>,
    /// Rank -> (peer address, channel). `std::sync::RwLock`: read per call, written when the
    /// configuration changes; never held across an await.
    channels: std::sync::RwLock<BTreeMap<Rank, (String, Channel)>>,
    faults: Arc<Faults>,
    identity: Arc<Identity>,
}

impl GrpcNetwork {
    /// Must be called inside a tokio runtime (lazy channels spawn their connection tasks).
    /// `seed`: the servers to reach until the replica configures others.
    pub fn new(
        me: Rank,
        seed: &Configuration,
        tls: Option<&NodeTls>,
        faults: Arc<Faults>,
        identity: Arc<Identity>,
    ) -> Result<GrpcNetwork, String> {
        let channels = seed
            .servers
            .iter()
            .map(|(&r, s)| Ok((r, (s.peer.clone(), channel(&s.peer, r, tls)?))))
            .collect::<Result<BTreeMap<_, _>, String>>()?;
        Ok(GrpcNetwork {
            me,
            tls: tls.cloned(),
            channels: std::sync::RwLock::new(channels),
            faults,
            identity,
        })
    }

    fn client(&self, to: Rank) -> NetResult<PeerClient<Channel>> {
        let ch = self
            .channels
            .read()
            .expect("channels lock")
            .get(&to)
            .map(|(_, ch)| ch.clone())
            .ok_or(NetError::UnknownPeer(to))?;
        Ok(PeerClient::new(ch.clone())
            .max_decoding_message_size(replikv_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(replikv_proto::MAX_MESSAGE_BYTES))
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(timeout);
        identify(&mut r, self.me, &self.identity);
        r
    }

    /// One unary call through the fault layer, bounded by `timeout`.
    async fn call<T, R, F, Fut>(&self, to: Rank, msg: T, timeout: Duration, f: F) -> NetResult<R>
    where
        F: FnOnce(PeerClient<Channel>, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let client = self.client(to)?;
        through_faults(&self.faults, to, timeout, |left| async move {
            f(client, self.request(msg, left))
                .await
                .map(|r| r.into_inner())
                .map_err(|s| pb::net_error_from_status(&s))
        })
        .await
    }
}

/// Bound on opening a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// Bound on the TLS handshake that follows (a handshake takes milliseconds). Calls keep their
/// own deadlines; this one frees the channel to dial again when a peer takes the connection
/// and then stalls, where an unbounded handshake would hold it until TCP gave up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// A lazily connected channel to rank `rank` at the peer address `p`.
fn channel(p: &str, rank: Rank, tls: Option<&NodeTls>) -> Result<Channel, String> {
    // `http://` in both cases: with TLS the connector speaks it, and tonic must add none.
    let endpoint = Endpoint::from_shared(format!("http://{p}"))
        .map_err(|e| format!("peer {p}: {e}"))?
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    Ok(match tls {
        // Mutual TLS (docs/design.md §10 "Peer plane"): the peer proves it holds the
        // certificate of the cluster CA naming rank `rank` (and its address), and this server
        // presents the certificate naming its own rank. The connector bounds the TCP connect
        // and the handshake itself, separately.
        Some(tls) => {
            let connector = tls
                .peer_connector(p, rank, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT)
                .map_err(|e| format!("peer {p}: {e}"))?;
            endpoint.connect_with_connector_lazy(connector)
        }
        None => endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy(),
    })
}

/// Names the sender and, once it has one, its cluster (docs/design.md §10) on a peer request.
fn identify<T>(r: &mut Request<T>, me: Rank, identity: &Identity) {
    r.metadata_mut()
        .insert(FROM_HEADER, MetadataValue::from(me));
    if let Some(id) = identity.get() {
        if let Ok(v) = MetadataValue::try_from(id.to_string()) {
            r.metadata_mut().insert(CLUSTER_HEADER, v);
        }
    }
}

/// Runs one exchange with `to` under the outgoing fault rules, bounded by `timeout`; the
/// exchange gets the time left after any injected delay.
async fn through_faults<R, F, Fut>(
    faults: &Faults,
    to: Rank,
    timeout: Duration,
    exchange: F,
) -> NetResult<R>
where
    F: FnOnce(Duration) -> Fut,
    Fut: std::future::Future<Output = NetResult<R>>,
{
    let action = faults.outgoing(to);
    let started = tokio::time::Instant::now();
    match action {
        Some(Action::Drop) => {
            // A lost message looks like silence until the caller gives up.
            tokio::time::sleep(timeout).await;
            return Err(NetError::Timeout(timeout));
        }
        Some(Action::Delay(d)) => tokio::time::sleep(d.min(timeout)).await,
        _ => {}
    }
    let left = timeout.saturating_sub(started.elapsed());
    let res = tokio::time::timeout(left, exchange(left))
        .await
        .map_err(|_| NetError::Timeout(timeout))??;
    if let Some(Action::DropResponse) = action {
        tokio::time::sleep(timeout.saturating_sub(started.elapsed())).await;
        return Err(NetError::Timeout(timeout));
    }
    Ok(res)
}

impl PeerNetwork for GrpcNetwork {
    fn configure(&self, config: &Configuration) {
        let mut channels = self.channels.write().expect("channels lock");
        channels.retain(|r, _| config.contains(*r));
        for (&r, s) in &config.servers {
            if channels.get(&r).is_some_and(|(addr, _)| *addr == s.peer) {
                continue;
            }
            match channel(&s.peer, r, self.tls.as_ref()) {
                Ok(ch) => {
                    channels.insert(r, (s.peer.clone(), ch));
                }
                Err(e) => warn!(rank = r, error = %e, "cannot reach a server of the configuration"),
            }
        }
    }
    fn forward(
        &self,
        to: Rank,
        req: Forward,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<WriteResult>> {
        let req = pb::forward_to_pb(&req);
        async move {
            let r = self
                .call(to, req, t, |mut c, r| async move { c.forward(r).await })
                .await?;
            Ok(WriteResult {
                old: r.had_old.then_some(r.old_value),
            })
        }
        .boxed()
    }
    fn open_append(&self, to: Rank) -> NetResult<Box<dyn AppendLink>> {
        Ok(Box::new(GrpcAppendLink {
            to,
            me: self.me,
            n: MAX_RANKS,
            client: self.client(to)?,
            faults: self.faults.clone(),
            identity: self.identity.clone(),
            stream: None,
        }))
    }
    fn prepare(
        &self,
        to: Rank,
        req: Prepare,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<PrepareReply>> {
        let req = pb::prepare_to_pb(&req);
        let n = MAX_RANKS;
        self.call(to, req, t, |mut c, r| async move { c.prepare(r).await })
            .map(move |r| r.map(|r| pb::prepare_reply_from_pb(r, n)))
            .boxed()
    }
    fn accept(&self, to: Rank, req: Accept, t: Duration) -> BoxFuture<'_, NetResult<AcceptReply>> {
        let req = pb::accept_to_pb(&req);
        let n = MAX_RANKS;
        self.call(to, req, t, |mut c, r| async move { c.accept(r).await })
            .map(move |r| r.map(|r| pb::accept_reply_from_pb(r, n)))
            .boxed()
    }
    fn install(
        &self,
        to: Rank,
        req: Install,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<InstallReply>> {
        let req = pb::install_to_pb(&req);
        let n = MAX_RANKS;
        self.call(to, req, t, |mut c, r| async move { c.install(r).await })
            .map(move |r| r.map(|r| pb::install_reply_from_pb(r, n)))
            .boxed()
    }
    fn join(&self, to: Rank, req: Join, t: Duration) -> BoxFuture<'_, NetResult<JoinReply>> {
        let req = pb::join_to_pb(&req);
        let n = MAX_RANKS;
        self.call(to, req, t, |mut c, r| async move { c.join(r).await })
            .map(move |r| r.map(|r| pb::join_reply_from_pb(r, n)))
            .boxed()
    }
    fn discover(
        &self,
        to: Rank,
        req: Discover,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<DiscoverReply>> {
        let req = replikv_proto::peer::DiscoverRequest { from: req.from };
        let n = MAX_RANKS;
        self.call(to, req, t, |mut c, r| async move { c.discover(r).await })
            .map(move |r| r.map(|r| pb::discover_reply_from_pb(r, n)))
            .boxed()
    }
    fn sync(
        &self,
        to: Rank,
        req: SyncRequest,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<BoxStream<'static, NetResult<SyncChunk>>>> {
        let req = pb::sync_to_pb(&req);
        async move {
            let stream = self
                .call(to, req, t, |mut c, mut r| async move {
                    // The whole transfer may take long; only the gap between chunks is bounded.
                    r.metadata_mut().remove("grpc-timeout");
                    c.sync(r).await
                })
                .await?;
            let per_chunk = t;
            let s = futures::stream::unfold(Some(stream), move |st| async move {
                let mut stream = st?;
                match tokio::time::timeout(per_chunk, stream.message()).await {
                    Err(_) => Some((Err(NetError::Timeout(per_chunk)), None)),
                    Ok(Err(s)) => Some((Err(pb::net_error_from_status(&s)), None)),
                    Ok(Ok(None)) => None,
                    Ok(Ok(Some(c))) => Some((Ok(pb::chunk_from_pb(c)), Some(stream))),
                }
            });
            Ok(s.boxed())
        }
        .boxed()
    }
}

/// [`AppendLink`] over one bidirectional gRPC call, through the fault layer per message.
struct GrpcAppendLink {
    to: Rank,
    me: Rank,
    /// Servers in the cluster, to validate the views in answers.
    n: usize,
    client: PeerClient<Channel>,
    faults: Arc<Faults>,
    identity: Arc<Identity>,
    /// The open call: where requests go and responses come from.
    stream: Option<(mpsc::Sender<AppendRequest>, Streaming<AppendResponse>)>,
}

impl GrpcAppendLink {
    /// Sends `req` on the stream, opening it first if needed, and reads its response.
    async fn exchange(&mut self, req: AppendRequest) -> NetResult<AppendResponse> {
        let responses = match &mut self.stream {
            Some((tx, responses)) => {
                tx.send(req).await.map_err(|_| closed())?;
                responses
            }
            None => {
                // Stop-and-wait: one request at a time is ever queued.
                let (tx, rx) = mpsc::channel(1);
                tx.send(req).await.map_err(|_| closed())?;
                // No deadline on the call itself: it lasts the whole term.
                let mut open = Request::new(ReceiverStream::new(rx));
                identify(&mut open, self.me, &self.identity);
                let responses = self
                    .client
                    .append(open)
                    .await
                    .map_err(|s| pb::net_error_from_status(&s))?
                    .into_inner();
                &mut self.stream.insert((tx, responses)).1
            }
        };
        match responses.message().await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(closed()),
            Err(s) => Err(pb::net_error_from_status(&s)),
        }
    }
}

fn closed() -> NetError {
    pb::net_error_from_status(&tonic::Status::unavailable("append stream closed"))
}

impl AppendLink for GrpcAppendLink {
    fn call(&mut self, req: Append, timeout: Duration) -> BoxFuture<'_, NetResult<AppendReply>> {
        let (faults, to, n) = (self.faults.clone(), self.to, self.n);
        let req = pb::append_to_pb(&req);
        async move {
            through_faults(&faults, to, timeout, |_| self.exchange(req))
                .await
                .map(|r| pb::append_reply_from_pb(r, n))
        }
        .boxed()
    }
}
