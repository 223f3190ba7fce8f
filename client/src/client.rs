//! The async [`Client`]: one lazy channel per server and the retry loop.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use replikv_proto::kv::kv_client::KvClient;
use replikv_proto::kv::members_client::MembersClient;
use replikv_proto::kv::pipeline_request::Op;
use replikv_proto::kv::{
    member_remove_request, MemberAddRequest, MemberAddResponse, MemberListRequest,
    MemberListResponse, MemberRemoveRequest, MemberRemoveResponse,
};
use replikv_proto::kv::{
    pipeline_response, AddUserRequest, CasRequest, DeleteRangeRequest, DeleteRequest, GetRequest,
    KeyRange, ListUsersRequest, MembersRequest, MembersResponse, PutRequest, RemoveUserRequest,
    RequestId, ScanRequest, StatusRequest, StatusResponse,
};
use replikv_proto::MAX_MESSAGE_BYTES;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tracing::debug;

use crate::backoff::Backoff;
use crate::config::{AddCredentials, ClientConfig, Stub};
use crate::error::{AttemptFailure, Error, Next};
use crate::pipe::Pipe;
use crate::routing::{OpKind, Plan, Router};
use crate::session::{random_session_id, Session};

/// Room left in a gRPC message for everything but the key and value.
const ENVELOPE_BYTES: usize = 4096;

/// A range of keys for [`Client::scan`] and [`Client::delete_range`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Range {
    /// Every key starting with these bytes (every key when empty).
    Prefix(Bytes),
    /// Keys from `from` to `to`, both inclusive; `to: None` runs to the last key.
    Keys { from: Bytes, to: Option<Bytes> },
}

impl Range {
    /// Keys from `from` to `to`, both inclusive.
    pub fn keys(from: impl Into<Bytes>, to: impl Into<Bytes>) -> Range {
        Range::Keys {
            from: from.into(),
            to: Some(to.into()),
        }
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: impl Into<Bytes>) -> Range {
        Range::Prefix(prefix.into())
    }

    fn is_everything(&self) -> bool {
        match self {
            Range::Prefix(p) => p.is_empty(),
            Range::Keys { from, to } => from.is_empty() && to.is_none(),
        }
    }

    /// What no server would take.
    fn check(&self) -> Result<(), Error> {
        match self {
            Range::Keys { to: Some(to), .. } if to.is_empty() => Err(Error::InvalidArgument(
                "the end of a range must not be empty (use no end instead)".into(),
            )),
            Range::Keys { from, to: Some(to) } if from > to => Err(Error::InvalidArgument(
                "inverted range: the start is above the end".into(),
            )),
            _ => Ok(()),
        }
    }

    fn to_pb(&self) -> KeyRange {
        match self {
            Range::Prefix(p) => KeyRange {
                prefix: p.clone(),
                ..Default::default()
            },
            Range::Keys { from, to } => KeyRange {
                from: from.clone(),
                to: to.clone().unwrap_or_default(),
                prefix: Bytes::new(),
            },
        }
    }
}

/// One page of a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Keys and values, in key order.
    pub items: Vec<(Bytes, Bytes)>,
    /// Set when more keys may follow: pass it to the next [`Client::scan`].
    pub continuation: Option<Bytes>,
}

/// The answer to a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CasOutcome {
    /// Whether the key held the expected value and the new one was written.
    pub swapped: bool,
    /// The value before the operation (on a mismatch, the current value).
    pub current: Option<Bytes>,
}

/// The answer to a range delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeDeleted {
    /// Keys removed by this call.
    pub removed: u64,
    /// Whether keys of the range remain (the call reached its limit).
    pub more: bool,
}

/// Counters of one client (shared by its clones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Attempts beyond each request's first.
    pub retries: u64,
    /// Get, put and delete requests started.
    pub requests: u64,
}

/// A replikv client: cheap to clone (clones share channels, routing state and
/// the write session), `Send + Sync`. [`Client::new_session`] gives another
/// session over the same connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<Transport>,
    session: Session,
    retries: AtomicU64,
    requests: AtomicU64,
}

/// What every session of one [`Client::connect`] shares.
struct Transport {
    servers: Vec<String>,
    /// One per server, built once: a tonic `Channel` multiplexes every
    /// request over one HTTP/2 connection and reconnects by itself.
    stubs: Vec<Stub>,
    /// The same connections, for the `Members` service, and the credentials every call
    /// carries.
    channels: Vec<Channel>,
    credentials: AddCredentials,
    /// One per server, over its stub's connection: gets, puts and deletes.
    pipes: Vec<Pipe>,
    config: ClientConfig,
    router: Router,
}

impl std::ops::Deref for Inner {
    type Target = Transport;

    fn deref(&self) -> &Transport {
        &self.transport
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.inner.servers)
            .field("client_id", &self.client_id())
            .field("route", &self.inner.config.route)
            .finish_non_exhaustive()
    }
}

/// What a request needs to know to classify its failure.
#[derive(Clone, Copy)]
struct RequestSpec {
    op: &'static str,
    kind: OpKind,
}

impl Client {
    /// Validates the configuration and prepares one channel per server.
    /// Connections open on first use, so a client can be built while servers
    /// are still starting. Given a single server, it first asks that server
    /// for the cluster's members (one `Status` attempt, bounded by the
    /// connect timeout) and uses them all, so it survives that server's
    /// death; given several, it does no network I/O. Must run inside a tokio
    /// runtime (the channels start their background tasks on it).
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        let client = Client::build(config)?;
        if client.servers().len() > 1 {
            return Ok(client);
        }
        Ok(client.learn_members().await)
    }

    /// The client for `config`, with no network I/O.
    fn build(config: ClientConfig) -> Result<Client, Error> {
        let servers = config.validate()?;
        let tls = config.tls.as_ref().map(|t| t.load()).transpose()?;
        let credentials = AddCredentials(
            config
                .credentials
                .as_ref()
                .map(|c| c.headers())
                .transpose()?,
        );
        let channels = servers
            .iter()
            .map(|addr| {
                let scheme = if tls.is_some() { "https" } else { "http" };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
                    .map_err(|e| Error::Config(format!("bad server address {addr:?}: {e}")))?
                    .connect_timeout(config.connect_timeout)
                    .tcp_nodelay(true);
                if let Some(tls) = &tls {
                    endpoint = endpoint
                        .tls_config(tls.clone())
                        .map_err(|e| Error::Config(format!("TLS settings: {e}")))?;
                }
                Ok(endpoint.connect_lazy())
            })
            .collect::<Result<Vec<Channel>, Error>>()?;
        let stubs: Vec<Stub> = channels
            .iter()
            .map(|ch| {
                KvClient::with_interceptor(ch.clone(), credentials.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
            })
            .collect();
        let client_id = match config.client_id {
            Some(id) => id,
            None => session_id()?,
        };
        let transport = Arc::new(Transport {
            router: Router::new(config.route, servers.len()),
            servers,
            pipes: stubs.iter().cloned().map(Pipe::new).collect(),
            stubs,
            channels,
            credentials,
            config,
        });
        Ok(Client::with_session(transport, client_id))
    }

    /// This new client (it has sent no write: its session id is reused) over every
    /// member of the cluster, as the first of its servers that answers `Status` lists
    /// them (the peer list the servers were started with). The answering server keeps the
    /// address it was reached by. When no server answers within the connect timeout, or
    /// the cluster has a single server, the client is returned as it is. A client given
    /// one address so goes on working when that server dies, as etcd's client syncs its
    /// endpoints.
    async fn learn_members(self) -> Client {
        let budget = self.inner.config.connect_timeout;
        let replies = tokio::time::timeout(
            budget,
            join_all((0..self.servers().len()).map(|i| self.addresses(i))),
        )
        .await;
        let Some((addr, reply)) = replies
            .into_iter()
            .flatten()
            .zip(self.servers().iter())
            .find_map(|(reply, addr)| Some((addr.clone(), reply.ok()?)))
        else {
            debug!("no server answered Members; keeping the configured servers");
            return self;
        };
        let members: Vec<String> = reply
            .addresses
            .into_iter()
            .enumerate()
            .map(|(rank, a)| {
                if rank as u32 == reply.rank {
                    addr.clone()
                } else {
                    a
                }
            })
            .collect();
        if members.len() <= self.servers().len() {
            return self;
        }
        let mut config = self.inner.config.clone();
        config.servers = members;
        config.client_id = Some(self.client_id());
        match Client::build(config) {
            Ok(client) => {
                debug!(servers = ?client.servers(), "learned the cluster's members");
                client
            }
            Err(e) => {
                debug!(%e, "the cluster's member list is not usable; keeping the configured servers");
                self
            }
        }
    }

    fn with_session(transport: Arc<Transport>, client_id: u128) -> Client {
        Client {
            inner: Arc::new(Inner {
                transport,
                session: Session::new(client_id),
                retries: AtomicU64::new(0),
                requests: AtomicU64::new(0),
            }),
        }
    }

    /// Another client with a write session of its own (a fresh session id from the
    /// operating system) that shares this one's connections and what it learned of the
    /// primary. Many independent writers can so share a few HTTP/2 connections, whose
    /// frames the connection then batches into fewer system calls than one connection per
    /// writer would take. Fails only if the operating system gives no random bytes.
    pub fn new_session(&self) -> Result<Client, Error> {
        Ok(Client::with_session(
            self.inner.transport.clone(),
            session_id()?,
        ))
    }

    /// Reads `key`: `None` when it is absent.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, Error> {
        let key = key.into();
        check_input(&key, 0)?;
        let spec = RequestSpec {
            op: "get",
            kind: OpKind::Read,
        };
        let reply = self
            .request(spec, |pipe| {
                let op = Op::Get(GetRequest { key: key.clone() });
                async move { answer(pipe.call(op).await, |r| as_variant!(r, Get)) }
            })
            .await?;
        Ok(reply.found.then_some(reply.value))
    }

    /// Stores `value` under `key`; returns the value it replaced. Applied
    /// exactly once however many attempts it takes.
    pub async fn put(
        &self,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> Result<Option<Bytes>, Error> {
        let (key, value) = (key.into(), value.into());
        check_input(&key, value.len())?;
        let reply = self
            .session_write("put", |id| {
                let op = Op::Put(PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    id,
                });
                move |pipe: &Pipe| {
                    let op = op.clone();
                    async move { answer(pipe.call(op).await, |r| as_variant!(r, Put)) }
                }
            })
            .await?;
        Ok(reply.had_old.then_some(reply.old_value))
    }

    /// Removes `key`; returns the value it removed. Applied exactly once
    /// however many attempts it takes.
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, Error> {
        let key = key.into();
        check_input(&key, 0)?;
        let reply = self
            .session_write("delete", |id| {
                let op = Op::Delete(DeleteRequest {
                    key: key.clone(),
                    id,
                });
                move |pipe: &Pipe| {
                    let op = op.clone();
                    async move { answer(pipe.call(op).await, |r| as_variant!(r, Delete)) }
                }
            })
            .await?;
        Ok(reply.had_old.then_some(reply.old_value))
    }

    /// One page of a scan (linearizable, docs/design.md §6 "Scans"): the first `limit` keys of
    /// `range` (at most 10 000; `0` asks for the server's default of 1 000) after
    /// `continuation`, in key order, with their values. Retried on other servers like a get.
    pub async fn scan(
        &self,
        range: &Range,
        limit: u32,
        continuation: Option<Bytes>,
    ) -> Result<ScanPage, Error> {
        range.check()?;
        let spec = RequestSpec {
            op: "scan",
            kind: OpKind::Read,
        };
        let request = ScanRequest {
            range: Some(range.to_pb()),
            limit,
            continuation: continuation.unwrap_or_default(),
        };
        let reply = self
            .request(spec, |pipe| {
                let op = Op::Scan(request.clone());
                async move { answer(pipe.call(op).await, |r| as_variant!(r, Scan)) }
            })
            .await?;
        Ok(ScanPage {
            items: reply
                .items
                .into_iter()
                .map(|kv| (kv.key, kv.value))
                .collect(),
            continuation: reply.more.then_some(reply.continuation),
        })
    }

    /// Every key of `range` as a stream of pages of up to `page` keys each, in key order.
    /// Each page is one linearizable [`Client::scan`] (the pages together are not one
    /// snapshot); the stream ends after the last page or the first error.
    pub fn scan_pages(
        &self,
        range: Range,
        page: u32,
    ) -> impl futures::Stream<Item = Result<ScanPage, Error>> + Send + 'static {
        let client = self.clone();
        // `None` once the last page is out.
        futures::stream::unfold(Some(None), move |next: Option<Option<Bytes>>| {
            let (client, range) = (client.clone(), range.clone());
            async move {
                let continuation = next?;
                match client.scan(&range, page, continuation).await {
                    Ok(p) => {
                        let next = p.continuation.clone().map(Some);
                        Some((Ok(p), next))
                    }
                    Err(e) => Some((Err(e), None)),
                }
            }
        })
    }

    /// Compare-and-swap: writes `new` (`None` deletes the key) only if the key holds
    /// `expected` (`None`: only if it is absent), decided by the primary in the order of
    /// writes. The answer says whether it wrote and carries the value before it (on a
    /// mismatch, the current value). Exactly once, like every write.
    pub async fn cas(
        &self,
        key: impl Into<Bytes>,
        expected: Option<Bytes>,
        new: Option<Bytes>,
    ) -> Result<CasOutcome, Error> {
        let key = key.into();
        check_input(
            &key,
            expected.as_ref().map_or(0, Bytes::len) + new.as_ref().map_or(0, Bytes::len),
        )?;
        if expected.is_none() && new.is_none() {
            return Err(Error::InvalidArgument(
                "deleting a key expected to be absent changes nothing".into(),
            ));
        }
        let reply = self
            .session_write("cas", |id| {
                let op = Op::Cas(CasRequest {
                    key: key.clone(),
                    expected: expected.clone().unwrap_or_default(),
                    expect_absent: expected.is_none(),
                    value: new.clone().unwrap_or_default(),
                    delete: new.is_none(),
                    id,
                });
                move |pipe: &Pipe| {
                    let op = op.clone();
                    async move { answer(pipe.call(op).await, |r| as_variant!(r, Cas)) }
                }
            })
            .await?;
        Ok(CasOutcome {
            swapped: reply.swapped,
            current: reply.had_current.then_some(reply.current),
        })
    }

    /// Removes the keys of `range` as one write: up to `limit` of them (at most 10 000, `0`
    /// for that maximum, and fewer when their keys pass 4 MiB). Returns how many it removed
    /// and whether keys of the range remain (call again to remove them). Exactly once.
    pub async fn delete_range(&self, range: &Range, limit: u32) -> Result<RangeDeleted, Error> {
        range.check()?;
        if range.is_everything() {
            return Err(Error::InvalidArgument(
                "this would remove every key: name a prefix or a range".into(),
            ));
        }
        let pb = range.to_pb();
        let reply = self
            .session_write("delete-range", |id| {
                let op = Op::DeleteRange(DeleteRangeRequest {
                    range: Some(pb.clone()),
                    limit,
                    id,
                });
                move |pipe: &Pipe| {
                    let op = op.clone();
                    async move { answer(pipe.call(op).await, |r| as_variant!(r, DeleteRange)) }
                }
            })
            .await?;
        Ok(RangeDeleted {
            removed: reply.removed,
            more: reply.more,
        })
    }

    /// Runs a write under this client's session: one request id for every attempt
    /// (exactly once, docs/design.md §6). If the servers no longer hold the session (it was idle
    /// past their session TTL, §10), the write was not applied: the session is replaced by
    /// a new one and the write runs once more under it.
    async fn session_write<'s, T, A, Fut>(
        &'s self,
        op: &'static str,
        attempt_with: impl Fn(Option<RequestId>) -> A,
    ) -> Result<T, Error>
    where
        A: FnMut(&'s Pipe) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let spec = RequestSpec {
            op,
            kind: OpKind::Write,
        };
        let mut renewed = false;
        loop {
            let ticket = self.inner.session.begin();
            let result = self.request(spec, attempt_with(Some(ticket.id()))).await;
            drop(ticket);
            match result {
                Err(Error::SessionExpired(why)) if !renewed => {
                    debug!(op, %why, "session expired on the servers; starting a new one");
                    self.inner.session.renew(session_id()?);
                    renewed = true;
                }
                other => return other,
            }
        }
    }

    /// Asks server number `server` (an index into [`Client::servers`]) for
    /// its status: one attempt, no retry. A server that says it is the
    /// primary is remembered as such.
    pub async fn status(&self, server: usize) -> Result<StatusResponse, Error> {
        let started = Instant::now();
        let reply = self
            .one_attempt(server, |mut stub, t| async move {
                stub.status(with_timeout(StatusRequest {}, t)).await
            })
            .await?;
        self.inner.router.record_latency(server, started.elapsed());
        if reply.role == "primary" {
            self.inner.router.set_primary(server);
        }
        Ok(reply)
    }

    /// One call to server number `server`, bounded by the attempt timeout: no retry.
    async fn one_attempt<R, F, Fut>(&self, server: usize, call: F) -> Result<R, Error>
    where
        F: FnOnce(Stub, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let Some(stub) = self.inner.stubs.get(server) else {
            return Err(Error::InvalidArgument(format!(
                "no server number {server}; there are {}",
                self.inner.servers.len()
            )));
        };
        let addr = &self.inner.servers[server];
        let timeout = self.inner.config.attempt_timeout;
        match tokio::time::timeout(timeout, call(stub.clone(), timeout)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(one_attempt_error(addr, &status)),
            Err(_) => Err(Error::Unavailable(format!(
                "{addr}: {}",
                AttemptFailure::timed_out(timeout).detail
            ))),
        }
    }

    /// The cluster's view with its configuration (docs/design.md §11), as the first server
    /// to answer holds it.
    pub async fn members(&self) -> Result<MemberListResponse, Error> {
        self.members_call("member list", |mut c, t| async move {
            c.list(with_timeout(MemberListRequest {}, t)).await
        })
        .await
    }

    /// Adds a server at `address` (`host:client_port/peer_port`) to the configuration; the
    /// answer names its rank. An admin operation, decided by the primary.
    pub async fn member_add(&self, address: &str) -> Result<MemberAddResponse, Error> {
        let req = MemberAddRequest {
            address: address.to_string(),
        };
        self.members_call("member add", move |mut c, t| {
            let req = req.clone();
            async move { c.add(with_timeout(req, t)).await }
        })
        .await
    }

    /// Removes the server of rank `rank`, or at `address`, from the configuration and the
    /// view. An admin operation, decided by the primary.
    pub async fn member_remove(
        &self,
        target: member_remove_request::Target,
    ) -> Result<MemberRemoveResponse, Error> {
        let req = MemberRemoveRequest {
            target: Some(target),
        };
        self.members_call("member remove", move |mut c, t| {
            let req = req.clone();
            async move { c.remove(with_timeout(req, t)).await }
        })
        .await
    }

    /// One `Members` call, tried on each server in turn (the known primary first) until one
    /// answers or the request deadline passes. A backup answers a change `UNAVAILABLE`
    /// naming the primary, which is tried next. Bad input, refusals and a user that may not
    /// make the call are not retried.
    async fn members_call<R, F, Fut>(&self, op: &str, call: F) -> Result<R, Error>
    where
        F: Fn(
            MembersClient<tonic::service::interceptor::InterceptedService<Channel, AddCredentials>>,
            Duration,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.inner.config.request_timeout;
        let n = self.inner.servers.len();
        let mut next = self.inner.router.primary().unwrap_or(0);
        let mut backoff = Backoff::new();
        let mut last = String::from("no attempt finished");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Unavailable(format!("{op}: {last}")));
            }
            let t = left.min(
                self.inner
                    .config
                    .attempt_timeout
                    .max(Duration::from_secs(5)),
            );
            let client = MembersClient::with_interceptor(
                self.inner.channels[next].clone(),
                self.inner.credentials.clone(),
            );
            let addr = self.inner.servers[next].clone();
            match tokio::time::timeout(t, call(client, t)).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => match s.code() {
                    tonic::Code::InvalidArgument => {
                        return Err(Error::InvalidArgument(s.message().to_string()))
                    }
                    tonic::Code::FailedPrecondition => {
                        return Err(Error::Refused(s.message().to_string()))
                    }
                    // Every server holds the same users: another answers the same.
                    tonic::Code::PermissionDenied => {
                        return Err(Error::PermissionDenied(format!("{op}: {}", s.message())))
                    }
                    tonic::Code::Unauthenticated => {
                        return Err(Error::Unauthenticated(format!("{op}: {}", s.message())))
                    }
                    _ => {
                        last = format!("{addr}: {}", s.message());
                        let hinted = s
                            .metadata()
                            .get(replikv_proto::PRIMARY_ADDR_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|a| self.inner.servers.iter().position(|s| s == a));
                        next = hinted.filter(|&h| h != next).unwrap_or((next + 1) % n);
                    }
                },
                Err(_) => {
                    last = format!("{addr}: no answer within {t:?}");
                    next = (next + 1) % n;
                }
            }
            let pause = backoff.next_delay();
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// Asks server number `server` for the client addresses of every server, by rank, and
    /// its own rank: one attempt, no retry. Any user may ask.
    pub async fn addresses(&self, server: usize) -> Result<MembersResponse, Error> {
        self.one_attempt(server, |mut stub, t| async move {
            stub.members(with_timeout(MembersRequest {}, t)).await
        })
        .await
    }

    /// Adds user `name` with `token` (docs/security.md "Users"); `admin` lets it manage
    /// users. Needs the admin user. Sent again with the same token, it succeeds; a name
    /// taken already is [`Error::InvalidArgument`].
    pub async fn add_user(&self, name: &str, token: &str, admin: bool) -> Result<(), Error> {
        let req = AddUserRequest {
            name: name.to_string(),
            token: token.to_string(),
            admin,
        };
        self.admin_call("add user", |mut stub, t| {
            let req = req.clone();
            async move { stub.add_user(with_timeout(req, t)).await }
        })
        .await
        .map(|_| ())
    }

    /// Removes user `name`: whether it existed. Every server refuses it once this returns.
    /// Needs the admin user.
    pub async fn remove_user(&self, name: &str) -> Result<bool, Error> {
        let req = RemoveUserRequest {
            name: name.to_string(),
        };
        self.admin_call("remove user", |mut stub, t| {
            let req = req.clone();
            async move { stub.remove_user(with_timeout(req, t)).await }
        })
        .await
        .map(|r| r.removed)
    }

    /// Every user, by name, and whether it is an admin. Needs the admin user.
    pub async fn list_users(&self) -> Result<Vec<(String, bool)>, Error> {
        let r = self
            .admin_call("list users", |mut stub, t| async move {
                stub.list_users(with_timeout(ListUsersRequest {}, t)).await
            })
            .await?;
        Ok(r.users.into_iter().map(|u| (u.name, u.admin)).collect())
    }

    /// A user-management call through the retry loop, as a write: it goes on to the
    /// primary when a backup names it.
    async fn admin_call<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, Error>
    where
        F: Fn(Stub, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let spec = RequestSpec {
            op,
            kind: OpKind::Write,
        };
        let t = self.inner.config.attempt_timeout;
        self.request(spec, |pipe| call(pipe.stub(), t)).await
    }

    /// Asks every server for its status, concurrently. Results are in
    /// [`Client::servers`] order.
    pub async fn status_all(&self) -> Vec<(String, Result<StatusResponse, Error>)> {
        let replies = join_all((0..self.inner.servers.len()).map(|i| self.status(i))).await;
        self.inner.servers.iter().cloned().zip(replies).collect()
    }

    /// Waits until some server answers (`Members`), or `timeout` passes.
    pub async fn wait_for_any(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new();
        let mut last = String::from("no attempt finished");
        loop {
            let all = join_all((0..self.servers().len()).map(|i| self.addresses(i)));
            let round = tokio::time::timeout_at(deadline, all).await;
            match round {
                Ok(replies) => {
                    let mut errors = Vec::new();
                    for reply in replies {
                        match reply {
                            Ok(_) => return Ok(()),
                            // Every server holds the same users: waiting changes nothing.
                            Err(e @ (Error::Unauthenticated(_) | Error::PermissionDenied(_))) => {
                                return Err(e)
                            }
                            Err(e) => errors.push(e.to_string()),
                        }
                    }
                    last = errors.join("; ");
                }
                Err(_) => break,
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tokio::time::sleep(backoff.next_delay().min(deadline - now)).await;
        }
        Err(Error::Unavailable(format!(
            "no server answered within {}: {last}",
            humantime::format_duration(timeout)
        )))
    }

    /// The servers, normalised to `host:port`, in configuration order.
    pub fn servers(&self) -> &[String] {
        &self.inner.servers
    }

    /// This client's session id (128 bits; see [`ClientConfig::client_id`]).
    pub fn client_id(&self) -> u128 {
        self.inner.session.client_id()
    }

    /// Request and retry counters so far.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            retries: self.inner.retries.load(Ordering::Relaxed),
            requests: self.inner.requests.load(Ordering::Relaxed),
        }
    }

    /// Runs one request: attempts on one server after another, with backoff,
    /// until one succeeds, one says the input is bad, or the request deadline
    /// passes (docs/design.md §6).
    async fn request<'s, T, F, Fut>(&'s self, spec: RequestSpec, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut(&'s Pipe) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let inner = &*self.inner;
        inner.requests.fetch_add(1, Ordering::Relaxed);
        let request_timeout = inner.config.request_timeout;
        let deadline = Instant::now() + request_timeout;
        let mut plan = inner.router.plan(spec.kind);
        let mut backoff = Backoff::new();
        let mut attempts = 0u32;
        // Whether some write attempt may have been applied: once set, the
        // request can only end in success or `OutcomeUnknown`.
        let mut may_have_applied = false;
        // Whether the last server that answered at all said it is overloaded.
        let mut overloaded = false;
        let mut last = String::from("no attempt was made");

        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let timeout = inner.config.attempt_timeout.min(deadline - now);
            // A retry left with a sliver of the budget is mostly cut short, and a write cut
            // short may have been applied: it would turn the definite answers so far
            // (overloaded, unavailable) into an unknown outcome.
            if attempts > 0 && timeout < inner.config.attempt_timeout / 4 {
                break;
            }
            let server = plan.next_server();
            let addr = &inner.servers[server];
            if attempts > 0 {
                inner.retries.fetch_add(1, Ordering::Relaxed);
            }
            attempts += 1;
            let started = Instant::now();
            let outcome = tokio::time::timeout(timeout, attempt(&inner.pipes[server])).await;
            let failure = match outcome {
                Ok(Ok(reply)) => {
                    inner.router.mark_responsive(server);
                    if spec.kind == OpKind::Read {
                        // Writes are forwarded to the primary, so only reads
                        // measure the distance to the contacted server.
                        inner.router.record_latency(server, started.elapsed());
                    } else {
                        self.learn_primary(server, reply.metadata());
                    }
                    return Ok(reply.into_inner());
                }
                Ok(Err(status)) => AttemptFailure::from_status(&status),
                Err(_) => AttemptFailure::timed_out(timeout),
            };
            last = format!("{addr}: {}", failure.detail);
            if spec.kind == OpKind::Write {
                may_have_applied |= failure.may_have_applied;
            }
            if failure.answered {
                overloaded = failure.overloaded;
                inner.router.mark_responsive(server);
            } else {
                inner.router.mark_unresponsive(server);
            }
            debug!(
                op = spec.op,
                server = %addr,
                attempt = attempts,
                may_have_applied,
                error = %failure.detail,
                "attempt failed"
            );
            match failure.next {
                // Only reads feed the latency averages (`Route::Nearest`
                // routes reads only); a write refused mid view change says
                // nothing about how close the server is.
                Next::Retry if spec.kind == OpKind::Read && !failure.overloaded => inner
                    .router
                    .record_failure(server, inner.config.attempt_timeout),
                Next::Retry => {}
                Next::GiveUpInvalid if !may_have_applied => {
                    return Err(Error::InvalidArgument(last));
                }
                Next::GiveUpConfig if !may_have_applied => {
                    return Err(Error::Config(format!("{last} (is this a replikv server?)")));
                }
                // Refused before anything ran: every server holds the same users.
                Next::GiveUpAuth { denied: false } if !may_have_applied => {
                    return Err(Error::Unauthenticated(last));
                }
                Next::GiveUpAuth { denied: true } if !may_have_applied => {
                    return Err(Error::PermissionDenied(last));
                }
                Next::GiveUpSession { expired: true } if !may_have_applied => {
                    return Err(Error::SessionExpired(last));
                }
                // The write's result is no longer known: it may have been applied by an
                // earlier attempt (or by this one's forerunner on another client), and
                // the servers will not apply it again.
                Next::GiveUpSession { .. } => {
                    return Err(Error::OutcomeUnknown(format!(
                        "{}: the servers no longer know this write's result; {last}",
                        spec.op
                    )));
                }
                Next::GiveUpInvalid | Next::GiveUpConfig | Next::GiveUpAuth { .. } => {
                    return Err(Error::OutcomeUnknown(format!(
                        "{}: an earlier attempt may have been applied; then {last}",
                        spec.op
                    )));
                }
            }
            if failure.overloaded {
                // An overloaded server refused the request before doing anything
                // (docs/design.md §6): it is alive and still where it was, so wait and try it
                // again rather than fail over and forget which server is the primary.
                plan.put_first(server);
            } else {
                self.follow_redirect(server, &failure, &mut plan);
            }

            let now = Instant::now();
            if now >= deadline {
                break;
            }
            tokio::time::sleep(backoff.next_delay().min(deadline - now)).await;
        }

        let summary = format!(
            "{} did not succeed within {} ({attempts} attempts); last error: {last}",
            spec.op,
            humantime::format_duration(request_timeout),
        );
        Err(if may_have_applied {
            Error::OutcomeUnknown(summary)
        } else if overloaded {
            Error::Overloaded(summary)
        } else {
            Error::Unavailable(summary)
        })
    }

    /// A write succeeded on `server`: a server that forwarded it names the primary in the
    /// response, one that did not is the primary. Either way, `Route::Primary` now knows
    /// where to send writes without paying a forward.
    fn learn_primary(&self, server: usize, metadata: &tonic::metadata::MetadataMap) {
        let named = metadata
            .get(replikv_proto::PRIMARY_ADDR_HEADER)
            .and_then(|v| v.to_str().ok());
        match named {
            Some(addr) => {
                if let Some(primary) = self.server_index(addr) {
                    self.inner.router.set_primary(primary);
                }
            }
            None => self.inner.router.set_primary(server),
        }
    }

    /// Acts on a failed attempt's primary hint: try the primary next and
    /// remember it. Without a hint, a remembered primary that just failed is
    /// forgotten, so `Route::Primary` stops sending writes to a dead server.
    fn follow_redirect(&self, failed: usize, failure: &AttemptFailure, plan: &mut Plan) {
        let router = &self.inner.router;
        let hinted = failure
            .primary_addr
            .as_deref()
            .and_then(|addr| self.server_index(addr));
        match hinted {
            Some(primary) => {
                router.set_primary(primary);
                if primary != failed {
                    plan.put_first(primary);
                }
            }
            None => {
                if let Some(addr) = &failure.primary_addr {
                    debug!(primary = %addr, "redirect to a server not in the client's list");
                }
                router.forget_primary(failed);
            }
        }
    }

    /// Index of `addr` in the server list, comparing normalised forms.
    fn server_index(&self, addr: &str) -> Option<usize> {
        let addr = crate::config::parse_server_addr(addr).ok()?;
        self.inner.servers.iter().position(|s| *s == addr)
    }
}

/// Client-side input checks. The servers enforce the real (configurable)
/// limits; these only catch what no server could accept.
fn check_input(key: &[u8], value_len: usize) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidArgument("key must not be empty".into()));
    }
    let size = key.len().saturating_add(value_len);
    if size > MAX_MESSAGE_BYTES - ENVELOPE_BYTES {
        return Err(Error::InvalidArgument(format!(
            "key and value take {size} bytes; the protocol allows at most {}",
            MAX_MESSAGE_BYTES - ENVELOPE_BYTES
        )));
    }
    Ok(())
}

/// A pipelined answer as the unary call of its kind would have returned it.
fn answer<T>(
    reply: Result<tonic::Response<pipeline_response::Result>, tonic::Status>,
    unwrap: impl FnOnce(pipeline_response::Result) -> Option<T>,
) -> Result<tonic::Response<T>, tonic::Status> {
    let (metadata, result, extensions) = reply?.into_parts();
    match unwrap(result) {
        Some(r) => Ok(tonic::Response::from_parts(metadata, r, extensions)),
        None => Err(tonic::Status::internal(
            "answer of another kind than the request",
        )),
    }
}

/// The `$variant` answer, or `None`.
macro_rules! as_variant {
    ($r:expr, $variant:ident) => {
        match $r {
            pipeline_response::Result::$variant(v) => Some(v),
            _ => None,
        }
    };
}
use as_variant;

/// A fresh session id, or why the operating system could not give one.
fn session_id() -> Result<u128, Error> {
    random_session_id().map_err(|e| {
        Error::Config(format!(
            "the operating system gave no random bytes for a session id: {e}"
        ))
    })
}

/// Wraps a message in a request that tells the server how long the client
/// will wait (`grpc-timeout`), so it can give up on work nobody awaits.
/// The error of a single attempt (no retry) that a server or the transport failed.
pub(crate) fn one_attempt_error(addr: &str, status: &tonic::Status) -> Error {
    let failure = AttemptFailure::from_status(status);
    let detail = format!("{addr}: {}", failure.detail);
    match failure.next {
        Next::GiveUpAuth { denied: false } => Error::Unauthenticated(detail),
        Next::GiveUpAuth { denied: true } => Error::PermissionDenied(detail),
        _ => Error::Unavailable(detail),
    }
}

fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(timeout);
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_keys_and_oversized_messages_are_rejected_locally() {
        assert!(matches!(
            check_input(b"", 0),
            Err(Error::InvalidArgument(_))
        ));
        assert!(check_input(b"k", 1024).is_ok());
        assert!(matches!(
            check_input(b"k", MAX_MESSAGE_BYTES),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            check_input(b"k", usize::MAX),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn connect_validates_without_network_io() {
        // Nothing listens on port 1; connect must still succeed (lazily).
        let client = Client::connect(ClientConfig::new(["127.0.0.1:1", "http://localhost:2"]))
            .await
            .unwrap();
        assert_eq!(client.servers(), ["127.0.0.1:1", "localhost:2"]);
        assert_ne!(client.client_id(), 0);
        let err = Client::connect(ClientConfig::new(["nope"]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        let fixed = Client::connect(ClientConfig::new(["a:1"]).with_client_id(9))
            .await
            .unwrap();
        assert_eq!(fixed.client_id(), 9);
    }

    #[tokio::test]
    async fn a_new_session_shares_the_servers_but_not_the_id() {
        let client = Client::connect(ClientConfig::new(["127.0.0.1:1"]).with_client_id(9))
            .await
            .unwrap();
        let other = client.new_session().unwrap();
        assert_eq!(other.servers(), client.servers());
        assert!(Arc::ptr_eq(&other.inner.transport, &client.inner.transport));
        assert_ne!(other.client_id(), 9);
        assert_ne!(other.client_id(), 0);
        assert_eq!(other.stats(), ClientStats::default());
    }

    #[tokio::test]
    async fn status_of_a_server_out_of_range_is_invalid_argument() {
        let client = Client::connect(ClientConfig::new(["127.0.0.1:1"]))
            .await
            .unwrap();
        assert!(matches!(
            client.status(5).await,
            Err(Error::InvalidArgument(_))
        ));
    }
}
