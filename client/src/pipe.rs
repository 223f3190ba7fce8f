//! Requests to one server multiplexed over one `Pipeline` call: many requests share its
//! HTTP/2 stream instead of opening one each, which costs both ends far less per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use replikv_proto::kv::{pipeline_request, pipeline_response, PipelineRequest};
use replikv_proto::pipeline::unary_outcome;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Response, Status};

use crate::config::Stub;

type Reply = Result<Response<pipeline_response::Result>, Status>;

/// The pipeline to one server: opened on first use, opened again after it breaks.
pub(crate) struct Pipe {
    stub: Stub,
    open: Mutex<Option<Arc<Call>>>,
}

/// One open `Pipeline` call.
struct Call {
    requests: mpsc::UnboundedSender<PipelineRequest>,
    /// Callers waiting for an answer, by tag; `None` once the call has ended.
    waiting: Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>,
    next_tag: AtomicU64,
}

/// Takes a caller's tag off the waiting list when it stops waiting (its attempt timed out).
struct Forget<'a>(&'a Call, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.0.waiting.lock().expect("pipeline lock").as_mut() {
            w.remove(&self.1);
        }
    }
}

impl Pipe {
    pub(crate) fn new(stub: Stub) -> Pipe {
        Pipe {
            stub,
            open: Mutex::new(None),
        }
    }

    /// The stub this pipe opens its calls on, for calls outside the pipeline.
    pub(crate) fn stub(&self) -> Stub {
        self.stub.clone()
    }

    /// Sends `op` and waits for its answer: the unary call's response (with its metadata)
    /// or its status. A broken call fails every request in flight on it with the transport's
    /// status, as a broken connection fails unary calls.
    pub(crate) async fn call(&self, op: pipeline_request::Op) -> Reply {
        let call = self.current();
        let tag = call.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match call.waiting.lock().expect("pipeline lock").as_mut() {
            Some(w) => w.insert(tag, tx),
            None => return Err(not_sent()),
        };
        let _forget = Forget(&call, tag);
        let req = PipelineRequest { tag, op: Some(op) };
        if call.requests.send(req).is_err() {
            return Err(not_sent());
        }
        rx.await
            .unwrap_or_else(|_| Err(Status::unavailable("pipeline call ended")))
    }

    /// The open call, or a new one if there is none or it ended.
    fn current(&self) -> Arc<Call> {
        let mut open = self.open.lock().expect("pipeline lock");
        if let Some(call) = open.as_ref() {
            if call.waiting.lock().expect("pipeline lock").is_some() {
                return call.clone();
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let call = Arc::new(Call {
            requests: tx,
            waiting: Mutex::new(Some(HashMap::new())),
            next_tag: AtomicU64::new(0),
        });
        tokio::spawn(run(self.stub.clone(), rx, call.clone()));
        *open = Some(call.clone());
        call
    }
}

/// Drives one call: hands each answer to its caller until the call ends, then fails the
/// callers still waiting.
async fn run(mut stub: Stub, requests: mpsc::UnboundedReceiver<PipelineRequest>, call: Arc<Call>) {
    // Dropped when this function returns: the request side then ends too, so the server
    // sees the call closed rather than idle.
    let (_closing, closed) = oneshot::channel::<()>();
    let requests = UnboundedReceiverStream::new(requests).take_until(closed);
    let ended = match stub.pipeline(requests).await {
        Err(status) => status,
        Ok(answers) => {
            let mut answers = answers.into_inner();
            loop {
                match answers.message().await {
                    Ok(Some(answer)) => {
                        let waiter = call
                            .waiting
                            .lock()
                            .expect("pipeline lock")
                            .as_mut()
                            .and_then(|w| w.remove(&answer.tag));
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(unary_outcome(answer.result, answer.metadata));
                        }
                    }
                    Ok(None) => break Status::unavailable("server ended the pipeline call"),
                    Err(status) => break status,
                }
            }
        }
    };
    let waiting = call.waiting.lock().expect("pipeline lock").take();
    for (_, waiter) in waiting.into_iter().flatten() {
        let _ = waiter.send(Err(ended.clone()));
    }
}

/// The call ended before this request was handed to it: it certainly was not applied.
fn not_sent() -> Status {
    let mut s = Status::unavailable("pipeline call ended before the request was sent");
    s.metadata_mut().insert(
        replikv_proto::OUTCOME_HEADER,
        MetadataValue::from_static(replikv_proto::OUTCOME_NONE),
    );
    s
}
