//! The `Pipeline` call of [`Kv`](crate::kv::kv_server::Kv): many gets, puts and deletes
//! multiplexed over one HTTP/2 stream. Each is served by the unary handler of its kind and
//! answered with that handler's response or status, so both paths behave alike.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::kv::kv_server::Kv;
use crate::kv::PipelineResponse;
use crate::kv::{pipeline_request, pipeline_response, PipelineError, PipelineRequest};

/// Most requests of one call served at once; further ones wait to be read.
pub const MAX_IN_FLIGHT: usize = 1024;

/// The answers of a `Pipeline` call.
pub type Answers = Pin<Box<dyn Stream<Item = Result<PipelineResponse, Status>> + Send>>;

/// Serves every request of a `Pipeline` call with `svc`'s unary handlers, concurrently,
/// and answers each as it completes. Ends when the client closes its side, the call breaks
/// or `until` completes (the server shuts down); requests being served still finish, like
/// unary calls whose client went away.
pub fn serve<S: Kv + Clone>(
    svc: S,
    mut requests: Streaming<PipelineRequest>,
    until: impl Future<Output = ()> + Send + 'static,
) -> Answers {
    // Bounded: a client that sends and never reads fills this queue, then the permits, then
    // stops being read from (HTTP/2 flow control holds it back); it cannot make the server
    // buffer answers without limit.
    let (tx, rx) = tokio::sync::mpsc::channel(MAX_IN_FLIGHT);
    tokio::spawn(async move {
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        while let Ok(Some(r)) = requests.message().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (svc, tx) = (svc.clone(), tx.clone());
            tokio::spawn(async move {
                // The permit is held until the answer is queued.
                let _ = tx.send(Ok(serve_one(&svc, r).await)).await;
                drop(permit);
            });
        }
    });
    Box::pin(ReceiverStream::new(rx).take_until(until))
}

async fn serve_one<S: Kv>(svc: &S, req: PipelineRequest) -> PipelineResponse {
    use pipeline_request::Op;
    use pipeline_response::Result as Res;
    let answer = match req.op {
        Some(Op::Get(r)) => svc.get(Request::new(r)).await.map(|r| r.map(Res::Get)),
        Some(Op::Put(r)) => svc.put(Request::new(r)).await.map(|r| r.map(Res::Put)),
        Some(Op::Delete(r)) => svc
            .delete(Request::new(r))
            .await
            .map(|r| r.map(Res::Delete)),
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
