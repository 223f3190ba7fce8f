//! The `Pipeline` call of [`Kv`](crate::kv::kv_server::Kv): many gets, puts and deletes (and
//! scans, compare-and-swaps and range deletes, see [`Extra`]) multiplexed over one HTTP/2 stream. Each is served by the unary handler of its kind and
//! answered with that handler's response or status, so both paths behave alike.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::Notify;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::kv::kv_server::Kv;
use crate::kv::PipelineResponse;
use crate::kv::{pipeline_request, pipeline_response, PipelineError, PipelineRequest};
use crate::kv::{
    CasRequest, CasResponse, DeleteRangeRequest, DeleteRangeResponse, ScanRequest, ScanResponse,
};

/// Most requests of one call served at once; further ones wait to be read.
pub const MAX_IN_FLIGHT: usize = 1024;

/// Most bytes of answers one call holds that its client has not taken yet: past it, no
/// further request of the call is read until the client reads answers.
pub const MAX_UNREAD_BYTES: usize = 4 << 20;

/// The answers of a `Pipeline` call.
pub type Answers = Pin<Box<dyn Stream<Item = Result<PipelineResponse, Status>> + Send>>;

/// Serves every request of a `Pipeline` call with `svc`'s unary handlers, concurrently,
/// and answers each as it completes. Ends when the client closes its side, the call breaks
/// or `until` completes (the server shuts down); requests being served still finish, like
/// unary calls whose client went away.
pub fn serve<S: Kv + Clone>(
    svc: S,
    requests: Streaming<PipelineRequest>,
    until: impl Future<Output = ()> + Send + 'static,
) -> Answers {
    serve_with(svc, Unsupported, requests, until)
}

/// The operations only the pipeline carries: scans, compare-and-swaps and range deletes.
/// They are not unary `Kv` methods, so a `Kv` implementation written before them (a test
/// double) needs no change and answers them `UNIMPLEMENTED`.
#[tonic::async_trait]
pub trait Extra: Send + Sync + 'static {
    async fn scan(&self, r: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status>;
    async fn cas(&self, r: Request<CasRequest>) -> Result<Response<CasResponse>, Status>;
    async fn delete_range(
        &self,
        r: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status>;
}

/// Serves none of [`Extra`]'s operations.
#[derive(Clone, Copy)]
pub struct Unsupported;

#[tonic::async_trait]
impl Extra for Unsupported {
    async fn scan(&self, _: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        Err(Status::unimplemented("this server does not serve scans"))
    }
    async fn cas(&self, _: Request<CasRequest>) -> Result<Response<CasResponse>, Status> {
        Err(Status::unimplemented(
            "this server does not serve compare-and-swap",
        ))
    }
    async fn delete_range(
        &self,
        _: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(Status::unimplemented(
            "this server does not serve range deletes",
        ))
    }
}

/// [`serve`], with `extra` serving the operations of [`Extra`].
pub fn serve_with<S: Kv + Clone, E: Extra + Clone>(
    svc: S,
    extra: E,
    mut requests: Streaming<PipelineRequest>,
    until: impl Future<Output = ()> + Send + 'static,
) -> Answers {
    // Bounded by count and by bytes: a client that sends and never reads fills the answer
    // queue up to MAX_UNREAD_BYTES (or MAX_IN_FLIGHT answers), after which no further
    // request is read and HTTP/2 flow control holds the client back. What the call holds is
    // then at most MAX_UNREAD_BYTES plus the answers of the requests that were being served
    // when it crossed that mark (never more than MAX_IN_FLIGHT answers in all); it cannot
    // make the server buffer answers without limit.
    let (tx, rx) = tokio::sync::mpsc::channel(MAX_IN_FLIGHT);
    let unread = Arc::new(Unread::default());
    let reader_unread = unread.clone();
    tokio::spawn(async move {
        let unread = reader_unread;
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        loop {
            // A call whose answers are no longer taken (the client went away, the server
            // stops) ends here rather than wait for ever.
            tokio::select! {
                () = unread.below(MAX_UNREAD_BYTES) => {}
                () = tx.closed() => break,
            }
            let Ok(Some(r)) = requests.message().await else {
                break;
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (svc, extra, tx, unread) = (svc.clone(), extra.clone(), tx.clone(), unread.clone());
            tokio::spawn(async move {
                // The permit is held until the answer is taken: served and unread answers
                // together are at most MAX_IN_FLIGHT.
                let answer = serve_one(&svc, &extra, r).await;
                let bytes = answer.encoded_len();
                unread.add(bytes);
                if tx.send((answer, bytes, permit)).await.is_err() {
                    unread.taken(bytes);
                }
            });
        }
    });
    let answers = ReceiverStream::new(rx).map(move |(answer, bytes, _permit)| {
        unread.taken(bytes);
        Ok(answer)
    });
    Box::pin(answers.take_until(until))
}

/// Bytes of answers queued for a call and not yet taken by its response stream.
#[derive(Default)]
struct Unread {
    bytes: AtomicUsize,
    taken: Notify,
}

impl Unread {
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    fn taken(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
        self.taken.notify_waiters();
    }

    /// Completes once fewer than `limit` bytes are unread.
    async fn below(&self, limit: usize) {
        loop {
            let taken = self.taken.notified();
            tokio::pin!(taken);
            // Registered before the check, so a `taken` between the check and the wait
            // still wakes it.
            taken.as_mut().enable();
            if self.bytes.load(Ordering::Acquire) < limit {
                return;
            }
            taken.await;
        }
    }
}

async fn serve_one<S: Kv, E: Extra>(svc: &S, extra: &E, req: PipelineRequest) -> PipelineResponse {
    use pipeline_request::Op;
    use pipeline_response::Result as Res;
    let answer = match req.op {
        Some(Op::Get(r)) => svc.get(Request::new(r)).await.map(|r| r.map(Res::Get)),
        Some(Op::Put(r)) => svc.put(Request::new(r)).await.map(|r| r.map(Res::Put)),
        Some(Op::Delete(r)) => svc
            .delete(Request::new(r))
            .await
            .map(|r| r.map(Res::Delete)),
        Some(Op::Scan(r)) => extra.scan(Request::new(r)).await.map(|r| r.map(Res::Scan)),
        Some(Op::Cas(r)) => extra.cas(Request::new(r)).await.map(|r| r.map(Res::Cas)),
        Some(Op::DeleteRange(r)) => extra
            .delete_range(Request::new(r))
            .await
            .map(|r| r.map(Res::DeleteRange)),
        None => Err(Status::invalid_argument(
            "pipelined request names no operation",
        )),
    };
    let (result, metadata) = match answer {
        Ok(resp) => {
            let (metadata, result, _) = resp.into_parts();
            (result, metadata)
        }
        Err(status) => (
            Res::Error(PipelineError {
                code: status.code() as i32,
                message: status.message().to_owned(),
            }),
            status.metadata().clone(),
        ),
    };
    PipelineResponse {
        tag: req.tag,
        result: Some(result),
        metadata: metadata
            .into_headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
    }
}

/// What the unary call would have returned, from its pipelined answer.
pub fn unary_outcome(
    result: Option<pipeline_response::Result>,
    metadata: HashMap<String, String>,
) -> Result<Response<pipeline_response::Result>, Status> {
    let mut map = MetadataMap::new();
    for (k, v) in metadata {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(k.as_bytes()),
            MetadataValue::try_from(v.as_str()),
        ) {
            map.insert(k, v);
        }
    }
    match result {
        Some(pipeline_response::Result::Error(e)) => {
            Err(Status::with_metadata(Code::from(e.code), e.message, map))
        }
        Some(r) => Ok(Response::from_parts(map, r, Default::default())),
        None => Err(Status::internal("pipelined answer without a result")),
    }
}
