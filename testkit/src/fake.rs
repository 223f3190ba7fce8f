//! A scripted in-process `Kv` server for tests that need precise control over
//! what each server answers: N fake servers on `127.0.0.1:0` share one
//! in-memory map (a perfectly replicated store) and one call log, and a
//! script decides per call whether to answer normally, fail, or stall.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use replikv_proto::kv::kv_server::{Kv, KvServer};
use replikv_proto::kv::{
    AddUserRequest, AddUserResponse, DeleteRequest, DeleteResponse, GetRequest, GetResponse,
    ListUsersRequest, ListUsersResponse, MembersRequest, MembersResponse, PipelineRequest,
    PutRequest, PutResponse, RemoveUserRequest, RemoveUserResponse, RequestId, StatusRequest,
    StatusResponse, View,
};
use replikv_proto::{OUTCOME_HEADER, OUTCOME_NONE, OUTCOME_UNKNOWN, PRIMARY_ADDR_HEADER};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

/// Longest a stalled call waits before answering anyway, so no fake can hang
/// a test.
pub const MAX_STALL: Duration = Duration::from_secs(5);

/// One RPC a fake server received.
#[derive(Clone, Debug)]
pub struct Call {
    /// Index of the fake that received it.
    pub server: usize,
    /// Position among all calls to all fakes, from 0.
    pub nth: usize,
    pub method: &'static str,
    pub key: Bytes,
    pub id: Option<RequestId>,
}

/// What a fake does with one call.
pub enum Reply {
    /// Serve it from the shared map.
    Serve,
    /// Serve it as a backup that forwarded it to server `.0`, which the
    /// response names as the primary.
    ServeForwarded(usize),
    /// Fail with this status.
    Fail(Status),
    /// Wait this long (at most [`MAX_STALL`]), then serve it.
    Stall(Duration),
}

/// Decides each call's reply; gets the call and every fake's address.
pub type Script = Arc<dyn Fn(&Call, &[String]) -> Reply + Send + Sync>;

struct Shared {
    addrs: Vec<String>,
    calls: Mutex<Vec<Call>>,
    data: Mutex<HashMap<Bytes, Bytes>>,
    script: Script,
}

/// Running fakes; dropping it stops them.
pub struct FakeCluster {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeCluster {
    /// Starts `n` fakes on the current runtime.
    pub async fn start(
        n: usize,
        script: impl Fn(&Call, &[String]) -> Reply + Send + Sync + 'static,
    ) -> FakeCluster {
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
        }
        let addrs = listeners
            .iter()
            .map(|l| l.local_addr().expect("local addr").to_string())
            .collect();
        let shared = Arc::new(Shared {
            addrs,
            calls: Mutex::new(Vec::new()),
            data: Mutex::new(HashMap::new()),
            script: Arc::new(script),
        });
        let tasks = listeners
            .into_iter()
            .enumerate()
            .map(|(index, listener)| {
                let service = KvServer::new(FakeKv {
                    index,
                    shared: shared.clone(),
                });
                tokio::spawn(async move {
                    let incoming = tonic::transport::server::TcpIncoming::from(listener);
                    let _ = tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(incoming)
                        .await;
                })
            })
            .collect();
        FakeCluster { shared, tasks }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.shared.addrs.clone()
    }

    /// Every call received so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// Calls of one method.
    pub fn calls_of(&self, method: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.method == method)
            .collect()
    }

    /// Waits (at most `timeout`) until `pred` holds for the call log.
    pub async fn wait_for_calls(&self, timeout: Duration, pred: impl Fn(&[Call]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.calls()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// An address nothing listens on (a port bound and released again).
pub fn closed_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").to_string()
}

/// `UNAVAILABLE` carrying the given outcome header (and primary redirect).
pub fn unavailable(outcome: Option<&'static str>, primary: Option<&str>) -> Status {
    let mut status = Status::unavailable("fake: not now");
    if let Some(outcome) = outcome {
        let value = match outcome {
            OUTCOME_NONE => MetadataValue::from_static(OUTCOME_NONE),
            _ => MetadataValue::from_static(OUTCOME_UNKNOWN),
        };
        status.metadata_mut().insert(OUTCOME_HEADER, value);
    }
    if let Some(primary) = primary {
        status.metadata_mut().insert(
            PRIMARY_ADDR_HEADER,
            primary.parse().expect("address is ascii"),
        );
    }
    status
}

#[derive(Clone)]
struct FakeKv {
    index: usize,
    shared: Arc<Shared>,
}

impl FakeKv {
    /// Logs the call and carries out the script's decision; `Ok` means
    /// "serve it now", naming the primary it was forwarded to, if any.
    async fn admit(
        &self,
        method: &'static str,
        key: &Bytes,
        id: Option<RequestId>,
    ) -> Result<Option<String>, Status> {
        let call = {
            let mut calls = self.shared.calls.lock().unwrap();
            let call = Call {
                server: self.index,
                nth: calls.len(),
                method,
                key: key.clone(),
                id,
            };
            calls.push(call.clone());
            call
        };
        match (self.shared.script)(&call, &self.shared.addrs) {
            Reply::Serve => Ok(None),
            Reply::ServeForwarded(primary) => Ok(Some(self.shared.addrs[primary].clone())),
            Reply::Fail(status) => Err(status),
            Reply::Stall(d) => {
                tokio::time::sleep(d.min(MAX_STALL)).await;
                Ok(None)
            }
        }
    }
}

/// A write response, naming the primary as a server that forwarded it does.
fn write_response<T>(body: T, forwarded_to: Option<String>) -> Response<T> {
    let mut resp = Response::new(body);
    if let Some(addr) = forwarded_to {
        resp.metadata_mut()
            .insert(replikv_proto::PRIMARY_ADDR_HEADER, addr.parse().unwrap());
    }
    resp
}

#[tonic::async_trait]
impl Kv for FakeKv {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let req = request.into_inner();
        self.admit("get", &req.key, None).await?;
        let value = self.shared.data.lock().unwrap().get(&req.key).cloned();
        Ok(Response::new(GetResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
        }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = request.into_inner();
        let via = self.admit("put", &req.key, req.id).await?;
        let old = self.shared.data.lock().unwrap().insert(req.key, req.value);
        Ok(write_response(
            PutResponse {
                had_old: old.is_some(),
                old_value: old.unwrap_or_default(),
            },
            via,
        ))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let req = request.into_inner();
        let via = self.admit("delete", &req.key, req.id).await?;
        let old = self.shared.data.lock().unwrap().remove(&req.key);
        Ok(write_response(
            DeleteResponse {
                had_old: old.is_some(),
                old_value: old.unwrap_or_default(),
            },
            via,
        ))
    }

    type PipelineStream = replikv_proto::pipeline::Answers;

    async fn pipeline(
        &self,
        request: Request<Streaming<PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        Ok(Response::new(replikv_proto::pipeline::serve(
            self.clone(),
            request.into_inner(),
            std::future::pending(),
        )))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        self.admit("status", &Bytes::new(), None).await?;
        let n = self.shared.addrs.len() as u32;
        let writes = self
            .shared
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.method != "get" && c.method != "status")
            .count() as u64;
        Ok(Response::new(StatusResponse {
            rank: self.index as u32,
            address: self.shared.addrs[self.index].clone(),
            view: Some(View {
                epoch: 1,
                primary: 0,
                members: (0..n).collect(),
                config: None,
            }),
            role: if self.index == 0 { "primary" } else { "backup" }.into(),
            applied: writes,
            committed: writes,
            lease_ms: 500,
            writes,
            flushes: writes.max(1),
            serving: true,
            ..Default::default()
        }))
    }

    async fn members(
        &self,
        _request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        self.admit("members", &Bytes::new(), None).await?;
        Ok(Response::new(MembersResponse {
            rank: self.index as u32,
            addresses: self.shared.addrs.clone(),
        }))
    }

    async fn add_user(
        &self,
        _request: Request<AddUserRequest>,
    ) -> Result<Response<AddUserResponse>, Status> {
        Err(Status::unimplemented("the fake server keeps no users"))
    }

    async fn remove_user(
        &self,
        _request: Request<RemoveUserRequest>,
    ) -> Result<Response<RemoveUserResponse>, Status> {
        Err(Status::unimplemented("the fake server keeps no users"))
    }

    async fn list_users(
        &self,
        _request: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        Err(Status::unimplemented("the fake server keeps no users"))
    }
}
