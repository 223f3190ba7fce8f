//! The peer network: one trait for every server-to-server call, so the replica never touches
//! tonic directly and tests can swap the transport, and its gRPC implementation with the
//! fault-injection layer of DESIGN.md §8 (outgoing side; the incoming side is in `service`).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use replikv_proto::peer::peer_client::PeerClient;
use replikv_proto::peer::*;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::fault::{Action, Faults};
use crate::types::Rank;

/// Metadata header naming the calling server's rank on every peer request.
pub const FROM_HEADER: &str = "replikv-from";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    #[error("unknown peer {0}")]
    UnknownPeer(Rank),
}

pub type NetResult<T> = Result<T, NetError>;

/// Every call the replica makes to a peer. Each takes a deadline; none retries.
pub trait PeerNetwork: Send + Sync + 'static {
    fn forward(
        &self,
        to: Rank,
        req: WriteRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<WriteResponse>>;
    fn append(
        &self,
        to: Rank,
        req: AppendRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<AppendResponse>>;
    fn prepare(
        &self,
        to: Rank,
        req: PrepareRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<PrepareResponse>>;
    fn accept(
        &self,
        to: Rank,
        req: AcceptRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<AcceptResponse>>;
    fn install(
        &self,
        to: Rank,
        req: InstallRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<InstallResponse>>;
    fn join(
        &self,
        to: Rank,
        req: JoinRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<JoinResponse>>;
    fn discover(
        &self,
        to: Rank,
        req: DiscoverRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<DiscoverResponse>>;
    /// Opens a state transfer; each chunk must arrive within `timeout` of the previous one.
    fn sync(
        &self,
        to: Rank,
        req: SyncRequest,
        timeout: Duration,
    ) -> BoxFuture<'_, NetResult<BoxStream<'static, NetResult<SyncChunk>>>>;
}

/// gRPC transport: one lazily connected tonic `Channel` per peer, cloned per call.
pub struct GrpcNetwork {
    me: Rank,
    channels: Vec<Channel>,
    faults: Arc<Faults>,
}

impl GrpcNetwork {
    /// Must be called inside a tokio runtime (lazy channels spawn their connection tasks).
    pub fn new(me: Rank, peers: &[String], faults: Arc<Faults>) -> Result<GrpcNetwork, String> {
        let channels = peers
            .iter()
            .map(|p| {
                Endpoint::from_shared(format!("http://{p}"))
                    .map(|e| {
                        e.connect_timeout(Duration::from_millis(300))
                            .tcp_nodelay(true)
                            .initial_stream_window_size(Some(8 << 20))
                            .initial_connection_window_size(Some(16 << 20))
                            .http2_keep_alive_interval(Duration::from_secs(5))
                            .keep_alive_timeout(Duration::from_secs(5))
                            .connect_lazy()
                    })
                    .map_err(|e| format!("peer {p}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GrpcNetwork {
            me,
            channels,
            faults,
        })
    }

    fn client(&self, to: Rank) -> NetResult<PeerClient<Channel>> {
        let ch = self
            .channels
            .get(to as usize)
            .ok_or(NetError::UnknownPeer(to))?;
        Ok(PeerClient::new(ch.clone())
            .max_decoding_message_size(replikv_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(replikv_proto::MAX_MESSAGE_BYTES))
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(timeout);
        r.metadata_mut()
            .insert(FROM_HEADER, MetadataValue::from(self.me));
        r
    }

    /// One unary call through the fault layer, bounded by `timeout`.
    async fn call<T, R, F, Fut>(&self, to: Rank, msg: T, timeout: Duration, f: F) -> NetResult<R>
    where
        F: FnOnce(PeerClient<Channel>, Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let client = self.client(to)?;
        let action = self.faults.outgoing(to);
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
        let req = self.request(msg, left);
        let res = tokio::time::timeout(left, f(client, req)).await;
        let res = match res {
            Err(_) => return Err(NetError::Timeout(timeout)),
            Ok(r) => r.map(|r| r.into_inner()).map_err(NetError::Status)?,
        };
        if let Some(Action::DropResponse) = action {
            tokio::time::sleep(timeout.saturating_sub(started.elapsed())).await;
            return Err(NetError::Timeout(timeout));
        }
        Ok(res)
    }
}

impl PeerNetwork for GrpcNetwork {
    fn forward(
        &self,
        to: Rank,
        req: WriteRequest,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<WriteResponse>> {
        self.call(to, req, t, |mut c, r| async move { c.forward(r).await })
            .boxed()
    }
    fn append(
        &self,
        to: Rank,
        req: AppendRequest,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<AppendResponse>> {
        self.call(to, req, t, |mut c, r| async move { c.append(r).await })
            .boxed()
    }
    fn prepare(
        &self,
        to: Rank,
        req: PrepareRequest,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<PrepareResponse>> {
        self.call(to, req, t, |mut c, r| async move { c.prepare(r).await })
            .boxed()
    }
    fn accept(
        &self,
        to: Rank,
        req: AcceptRequest,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<AcceptResponse>> {
        self.call(to, req, t, |mut c, r| async move { c.accept(r).await })
            .boxed()
    }
    fn install(
        &self,
        to: Rank,
        req: InstallRequest,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<InstallResponse>> {
        self.call(to, req, t, |mut c, r| async move { c.install(r).await })
            .boxed()
    }
    fn join(
        &self,
        to: Rank,
        req: JoinRequest,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<JoinResponse>> {
        self.call(to, req, t, |mut c, r| async move { c.join(r).await })
            .boxed()
    }
    fn discover(
        &self,
        to: Rank,
        req: DiscoverRequest,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<DiscoverResponse>> {
        self.call(to, req, t, |mut c, r| async move { c.discover(r).await })
            .boxed()
    }
    fn sync(
        &self,
        to: Rank,
        req: SyncRequest,
        t: Duration,
    ) -> BoxFuture<'_, NetResult<BoxStream<'static, NetResult<SyncChunk>>>> {
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
                    Ok(Err(s)) => Some((Err(NetError::Status(s)), None)),
                    Ok(Ok(None)) => None,
                    Ok(Ok(Some(c))) => Some((Ok(c), Some(stream))),
                }
            });
            Ok(s.boxed())
        }
        .boxed()
    }
}
