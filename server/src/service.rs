//! gRPC services: the public `Kv` API and `Members` (client port), the `Peer` protocol and
//! the fault-injection `Admin` service. They validate input, apply incoming fault rules and call the replica; no
//! protocol decisions are made here.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use replikv_proto::kv::kv_server::Kv;
use replikv_proto::kv::members_server::Members;
use replikv_proto::kv::*;
use replikv_proto::peer::admin_server::Admin;
use replikv_proto::peer::peer_server::Peer;
use replikv_proto::peer::*;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument};

use crate::auth::{self, Account, Principal, Users};
use crate::config::Limits;
use crate::convert as pb;
use crate::engine::membership::Change;
use crate::engine::sequencer::{Expect, MAX_RANGE_DELETE_KEYS};
use crate::error::{PrimaryHint, ServeError};
use crate::fault::{Action, CrashPoint};
use crate::identity::CLUSTER_HEADER;
use crate::limits::{Admitted, InFlight};
use crate::metrics::Op;
use crate::network::FROM_HEADER;
use crate::replica::{CasReq, Node, RangeDeleteReq, WriteReq};
use crate::tls::{self, NodeTls};
use crate::types::ItemRange;

/// How long a request "lost" by fault injection keeps its caller waiting.
const LOST_REQUEST_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct KvService {
    node: Arc<Node>,
    limits: Limits,
    users: Arc<Users>,
    /// Set on the copy that serves one `Pipeline` call: the user the call was opened as
    /// (docs/design.md §13).
    caller: Option<Arc<Principal>>,
    in_flight: InFlight,
    /// The client connection of the `Pipeline` call this copy serves (its requests carry
    /// no connection of their own).
    origin: Option<SocketAddr>,
}

impl KvService {
    pub fn new(node: Arc<Node>, limits: Limits, users: Arc<Users>, in_flight: InFlight) -> Self {
        KvService {
            node,
            limits,
            users,
            caller: None,
            in_flight,
            origin: None,
        }
    }

    /// Who `req` speaks for: the user of its `Pipeline` call, checked again (it may have
    /// been removed since the call opened), else the one its metadata names.
    fn caller<T>(&self, req: &Request<T>) -> Result<Arc<Principal>, Status> {
        match &self.caller {
            Some(p) => {
                self.users.still_valid(&self.node.store, p)?;
                Ok(p.clone())
            }
            None => Ok(Arc::new(
                self.users.authenticate(&self.node.store, req.metadata())?,
            )),
        }
    }

    /// [`KvService::caller`], which must be an admin.
    fn admin<T>(&self, req: &Request<T>, what: &str) -> Result<Arc<Principal>, Status> {
        let p = self.caller(req)?;
        crate::auth::require_admin(&p, what)?;
        Ok(p)
    }

    /// The client connection a request came on.
    fn origin<T>(&self, req: &Request<T>) -> Option<SocketAddr> {
        req.remote_addr().or(self.origin)
    }

    /// A place for one request among the server's `--max-in-flight`, held until it is
    /// answered; over the limit (or its connection's share of it) the request is refused
    /// before it does anything (RESOURCE_EXHAUSTED, docs/design.md §6).
    fn admit(&self, origin: Option<SocketAddr>) -> Result<Admitted, Status> {
        self.in_flight
            .admit(origin)
            .map_err(ServeError::into_status)
    }
}

/// Checks a key against the limits; the error names the limit.
pub fn check_key(key: &[u8], limits: &Limits) -> Result<(), ServeError> {
    if key.is_empty() {
        return Err(ServeError::InvalidArgument("key must not be empty".into()));
    }
    if key.len() > limits.max_key_bytes {
        return Err(ServeError::InvalidArgument(format!(
            "key is {} bytes; the limit is {} bytes",
            key.len(),
            limits.max_key_bytes
        )));
    }
    Ok(())
}

fn check_value(value: &[u8], limits: &Limits) -> Result<(), ServeError> {
    if value.len() > limits.max_value_bytes {
        return Err(ServeError::InvalidArgument(format!(
            "value is {} bytes; the limit is {} bytes",
            value.len(),
            limits.max_value_bytes
        )));
    }
    Ok(())
}

/// Most keys one scan page holds, and the page size when the request names none.
pub const MAX_SCAN_LIMIT: u32 = 10_000;
pub const DEFAULT_SCAN_LIMIT: u32 = 1_000;

fn invalid(message: impl Into<String>) -> Status {
    ServeError::InvalidArgument(message.into()).into_status()
}

/// Checks a key of a range (it may be empty: the range then starts at the first key).
fn check_range_key(what: &str, key: &[u8], limits: &Limits) -> Result<(), Status> {
    if key.len() > limits.max_key_bytes {
        return Err(invalid(format!(
            "{what} is {} bytes; the limit for a key is {} bytes",
            key.len(),
            limits.max_key_bytes
        )));
    }
    Ok(())
}

/// The items of a request's range; `whole_ok` says whether naming no bound at all (every
/// key) is allowed.
fn item_range(r: Option<KeyRange>, whole_ok: bool, limits: &Limits) -> Result<ItemRange, Status> {
    let r = r.unwrap_or_default();
    check_range_key("`from`", &r.from, limits)?;
    check_range_key("`to`", &r.to, limits)?;
    check_range_key("`prefix`", &r.prefix, limits)?;
    if !r.prefix.is_empty() {
        if !r.from.is_empty() || !r.to.is_empty() {
            return Err(invalid(
                "name either a prefix or a range `from`..`to`, not both",
            ));
        }
        return Ok(ItemRange::prefix(&r.prefix));
    }
    if !r.to.is_empty() && r.from > r.to {
        return Err(invalid("inverted range: `from` is above `to`"));
    }
    if r.from.is_empty() && r.to.is_empty() && !whole_ok {
        return Err(invalid(
            "this would take every key: name a prefix or a range `from`..`to`",
        ));
    }
    Ok(ItemRange::keys(
        &r.from,
        (!r.to.is_empty()).then_some(&r.to[..]),
    ))
}

/// A request's limit: `0` means `default`; above `max` is refused.
fn check_limit(limit: u32, default: u32, max: u32) -> Result<usize, Status> {
    match limit {
        0 => Ok(default as usize),
        n if n > max => Err(invalid(format!("limit {n} is above the maximum of {max}"))),
        n => Ok(n as usize),
    }
}

impl KvService {
    async fn write(
        &self,
        who: &Principal,
        origin: Option<SocketAddr>,
        key: Bytes,
        value: Option<Bytes>,
        id: Option<RequestId>,
    ) -> Result<(bool, Bytes, Option<PrimaryHint>), Status> {
        check_key(&key, &self.limits).map_err(ServeError::into_status)?;
        if let Some(v) = &value {
            check_value(v, &self.limits).map_err(ServeError::into_status)?;
        }
        let _admitted = self.admit(origin)?;
        let (r, forwarded_to) = self
            .node
            .write(WriteReq {
                key: who.key(&key),
                value,
                id: id.as_ref().map(Into::into),
            })
            .await
            .map_err(ServeError::into_status)?;
        Ok(match r.old {
            Some(v) => (true, v, forwarded_to),
            None => (false, Bytes::new(), forwarded_to),
        })
    }
}

/// A write response; one that was forwarded names the primary that sequenced it.
fn write_response<T>(body: T, forwarded_to: Option<PrimaryHint>) -> Response<T> {
    let mut resp = Response::new(body);
    if let Some(p) = forwarded_to {
        p.insert_into(resp.metadata_mut());
    }
    resp
}

#[tonic::async_trait]
impl Kv for KvService {
    #[instrument(level = "debug", skip_all)]
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let _timer = self.node.metrics.op(Op::Get);
        let who = self.caller(&req)?;
        let origin = self.origin(&req);
        let key = req.into_inner().key;
        check_key(&key, &self.limits).map_err(ServeError::into_status)?;
        let _admitted = self.admit(origin)?;
        let v = self
            .node
            .read(&who.key(&key))
            .await
            .map_err(ServeError::into_status)?;
        Ok(Response::new(match v {
            Some(value) => GetResponse { found: true, value },
            None => GetResponse {
                found: false,
                value: Bytes::new(),
            },
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let _timer = self.node.metrics.op(Op::Put);
        let who = self.caller(&req)?;
        let origin = self.origin(&req);
        let r = req.into_inner();
        let (had_old, old_value, via) =
            self.write(&who, origin, r.key, Some(r.value), r.id).await?;
        Ok(write_response(PutResponse { had_old, old_value }, via))
    }

    #[instrument(level = "debug", skip_all)]
    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let _timer = self.node.metrics.op(Op::Delete);
        let who = self.caller(&req)?;
        let origin = self.origin(&req);
        let r = req.into_inner();
        let (had_old, old_value, via) = self.write(&who, origin, r.key, None, r.id).await?;
        Ok(write_response(DeleteResponse { had_old, old_value }, via))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        // A server without a user table holds no data either: its status (it is forming
        // or catching up) is what an operator needs to see.
        if !self.users.holds_none(&self.node.store) {
            self.admin(&req, "Status")?;
        }
        Ok(Response::new(pb::status_to_pb(self.node.status())))
    }

    type PipelineStream = replikv_proto::pipeline::Answers;

    /// Authenticated once, as the call opens; every operation then checks that its user
    /// still exists (docs/design.md §13).
    async fn pipeline(
        &self,
        req: Request<Streaming<PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        let who = Arc::new(self.users.authenticate(&self.node.store, req.metadata())?);
        let call = KvService {
            caller: Some(who),
            origin: req.remote_addr(),
            ..self.clone()
        };
        Ok(Response::new(replikv_proto::pipeline::serve_with(
            call.clone(),
            call,
            req.into_inner(),
            self.node.stopped(),
        )))
    }

    async fn members(
        &self,
        req: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        self.caller(&req)?;
        Ok(Response::new(MembersResponse {
            rank: self.node.me,
            addresses: self.node.cfg.peers.clone(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn add_user(
        &self,
        req: Request<AddUserRequest>,
    ) -> Result<Response<AddUserResponse>, Status> {
        self.admin(&req, "adding a user")?;
        let r = req.into_inner();
        auth::check_name(&r.name).map_err(invalid)?;
        auth::check_token(&r.token).map_err(invalid)?;
        let record = Account::new(&r.token, r.admin).encode();
        // Put-if-absent, decided by the primary: two admins adding one name cannot both
        // succeed; the same request sent again finds its own record and succeeds.
        let (swapped, current) = self
            .node
            .cas(CasReq {
                key: auth::account_key(&r.name),
                expect: Expect::Absent,
                value: Some(record.clone()),
                id: None,
            })
            .await
            .map_err(ServeError::into_status)?;
        if !swapped && current.as_ref() != Some(&record) {
            return Err(Status::already_exists(format!(
                "user {:?} exists already",
                r.name
            )));
        }
        info!(user = r.name, admin = r.admin, "user added");
        Ok(Response::new(AddUserResponse {}))
    }

    #[instrument(level = "debug", skip_all)]
    async fn remove_user(
        &self,
        req: Request<RemoveUserRequest>,
    ) -> Result<Response<RemoveUserResponse>, Status> {
        let who = self.admin(&req, "removing a user")?;
        let r = req.into_inner();
        auth::check_name(&r.name).map_err(invalid)?;
        if *who.name == *r.name {
            return Err(invalid("a user cannot remove itself: ask another admin"));
        }
        // A write like any other: committed, hence applied by every member, before it is
        // answered, so every serving server refuses the user from then on.
        let (r, _) = self
            .node
            .write(WriteReq {
                key: auth::account_key(&r.name),
                value: None,
                id: None,
            })
            .await
            .map_err(ServeError::into_status)?;
        Ok(Response::new(RemoveUserResponse {
            removed: r.old.is_some(),
        }))
    }

    async fn list_users(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        self.admin(&req, "listing users")?;
        let accounts = self.users.accounts(&self.node.store)?;
        let mut users: Vec<UserInfo> = accounts
            .iter()
            .map(|(name, a)| UserInfo {
                name: name.clone(),
                admin: a.admin,
            })
            .collect();
        users.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListUsersResponse { users }))
    }
}

/// A request's range of keys, within the caller's namespace (docs/design.md §13): its
/// bounds never reach another user's keys.
fn user_range(
    who: &Principal,
    r: Option<KeyRange>,
    whole_ok: bool,
    limits: &Limits,
) -> Result<ItemRange, Status> {
    let r = r.unwrap_or_default();
    // Checked on the keys as the user gave them, so errors name the user's own sizes.
    item_range(Some(r.clone()), whole_ok, limits)?;
    let ns = who.namespace();
    let everything = ItemRange::prefix(ns);
    if !r.prefix.is_empty() {
        return Ok(ItemRange::prefix(&who.key(&r.prefix)));
    }
    let mut range = ItemRange::keys(&who.key(&r.from), Some(&who.key(&r.to)));
    if r.to.is_empty() {
        range.end = everything.end;
    }
    Ok(range)
}

/// Scans, compare-and-swaps and range deletes: pipelined operations (docs/protocol.md).
#[tonic::async_trait]
impl replikv_proto::pipeline::Extra for KvService {
    #[instrument(level = "debug", skip_all)]
    async fn scan(&self, req: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let _timer = self.node.metrics.op(Op::Scan);
        let who = self.caller(&req)?;
        let origin = self.origin(&req);
        let r = req.into_inner();
        let mut range = user_range(&who, r.range, true, &self.limits)?;
        let limit = check_limit(r.limit, DEFAULT_SCAN_LIMIT, MAX_SCAN_LIMIT)?;
        if !r.continuation.is_empty() {
            check_range_key("the continuation", &r.continuation, &self.limits)?;
            let stored = who.key(&r.continuation);
            if !range.contains_key(&stored) {
                return Err(invalid("the continuation is not a key of the range"));
            }
            range = range.after(&stored);
        }
        let _admitted = self.admit(origin)?;
        let (items, more) = self
            .node
            .scan(&range, limit)
            .await
            .map_err(ServeError::into_status)?;
        // Every key of the range is in the caller's namespace; the check costs nothing.
        let items: Vec<(Bytes, Bytes)> = items
            .into_iter()
            .filter_map(|(k, v)| {
                let own = who.own_key(&k)?.len();
                Some((k.slice(k.len() - own..), v))
            })
            .collect();
        let continuation = match items.last() {
            Some((k, _)) if more => k.clone(),
            _ if more => r.continuation,
            _ => Bytes::new(),
        };
        Ok(Response::new(ScanResponse {
            items: items
                .into_iter()
                .map(|(key, value)| KeyValue { key, value })
                .collect(),
            continuation,
            more,
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn cas(&self, req: Request<CasRequest>) -> Result<Response<CasResponse>, Status> {
        let _timer = self.node.metrics.op(Op::Cas);
        let who = self.caller(&req)?;
        let origin = self.origin(&req);
        let r = req.into_inner();
        check_key(&r.key, &self.limits).map_err(ServeError::into_status)?;
        check_value(&r.expected, &self.limits).map_err(ServeError::into_status)?;
        check_value(&r.value, &self.limits).map_err(ServeError::into_status)?;
        if r.expect_absent && !r.expected.is_empty() {
            return Err(invalid(
                "an expected value and `expect_absent` exclude each other",
            ));
        }
        if r.delete && !r.value.is_empty() {
            return Err(invalid("a new value and `delete` exclude each other"));
        }
        if r.delete && r.expect_absent {
            return Err(invalid(
                "deleting a key expected to be absent changes nothing",
            ));
        }
        let _admitted = self.admit(origin)?;
        let (swapped, current) = self
            .node
            .cas(CasReq {
                key: who.key(&r.key),
                expect: if r.expect_absent {
                    Expect::Absent
                } else {
                    Expect::Value(r.expected)
                },
                value: (!r.delete).then_some(r.value),
                id: r.id.as_ref().map(Into::into),
            })
            .await
            .map_err(ServeError::into_status)?;
        Ok(Response::new(CasResponse {
            swapped,
            had_current: current.is_some(),
            current: current.unwrap_or_default(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let _timer = self.node.metrics.op(Op::DeleteRange);
        let who = self.caller(&req)?;
        let origin = self.origin(&req);
        let r = req.into_inner();
        let range = user_range(&who, r.range, false, &self.limits)?;
        let max = MAX_RANGE_DELETE_KEYS as u32;
        let limit = check_limit(r.limit, max, max)?;
        let _admitted = self.admit(origin)?;
        let (removed, more) = self
            .node
            .delete_range(RangeDeleteReq {
                range,
                limit,
                id: r.id.as_ref().map(Into::into),
            })
            .await
            .map_err(ServeError::into_status)?;
        Ok(Response::new(DeleteRangeResponse { removed, more }))
    }
}

/// Membership on the client port (docs/design.md §11): list, add, remove. Add and Remove are
/// admin operations (`auth::Users::admin`).
pub struct MembersService {
    node: Arc<Node>,
    users: Arc<Users>,
}

impl MembersService {
    pub fn new(node: Arc<Node>, users: Arc<Users>) -> Self {
        MembersService { node, users }
    }
}

#[tonic::async_trait]
impl Members for MembersService {
    async fn list(
        &self,
        _req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        // Open to every caller: a server started with --join reads the configuration here
        // before it holds any credentials; it reveals addresses only.
        Ok(Response::new(MemberListResponse {
            view: Some((&self.node.member_view()).into()),
            cluster: self
                .node
                .identity
                .get()
                .map(|id| id.to_string())
                .unwrap_or_default(),
        }))
    }

    #[instrument(skip(self))]
    async fn add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.users
            .admin(&self.node.store, req.metadata(), "member add")?;
        let address = req.into_inner().address;
        let addr = crate::config::parse_server(&address)
            .map_err(|e| invalid(format!("address {address:?}: {e}")))?;
        let (rank, view) = self
            .node
            .change_membership(Change::Add(addr))
            .await
            .map_err(ServeError::into_status)?;
        Ok(Response::new(MemberAddResponse {
            rank,
            view: Some((&view).into()),
        }))
    }

    #[instrument(skip(self))]
    async fn remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.users
            .admin(&self.node.store, req.metadata(), "member remove")?;
        let rank = match req.into_inner().target {
            Some(member_remove_request::Target::Rank(r)) => r,
            Some(member_remove_request::Target::Address(a)) => {
                let addr = crate::config::parse_server(&a)
                    .map_err(|e| invalid(format!("address {a:?}: {e}")))?;
                let config = self.node.member_view().config.unwrap_or_default();
                config
                    .rank_of(&addr.client)
                    .filter(|&r| config.servers[&r] == addr)
                    .ok_or_else(|| invalid(format!("no server of the configuration is at {a}")))?
            }
            None => return Err(invalid("name a rank or an address to remove")),
        };
        let (rank, view) = self
            .node
            .change_membership(Change::Remove(rank))
            .await
            .map_err(ServeError::into_status)?;
        Ok(Response::new(MemberRemoveResponse {
            rank,
            view: Some((&view).into()),
        }))
    }
}

pub struct PeerService {
    node: Arc<Node>,
    limits: Limits,
    users: Arc<Users>,
    /// `None` on a server without TLS (loopback only, or `--insecure`).
    tls: Option<Arc<NodeTls>>,
}

impl PeerService {
    pub fn new(
        node: Arc<Node>,
        limits: Limits,
        users: Arc<Users>,
        tls: Option<Arc<NodeTls>>,
    ) -> Self {
        PeerService {
            node,
            limits,
            users,
            tls,
        }
    }

    /// The sender's rank (docs/design.md §10 "Peer plane"): with TLS, the rank its verified
    /// certificate names, which the rank named in its metadata and the rank the request
    /// claims to come from (`claimed`: value and field name) must equal; without TLS, the
    /// rank its metadata names.
    fn authenticate<T>(
        &self,
        req: &Request<T>,
        claimed: Option<(u32, &str)>,
    ) -> Result<Option<u32>, Status> {
        let verified = tls::peer_rank(req, self.tls.as_deref())?;
        let header = sender(req);
        if let Some(from) = header {
            tls::check_claim(verified, from, "sender")?;
        }
        if let Some((rank, field)) = claimed {
            tls::check_claim(verified, rank, field)?;
        }
        Ok(verified.or(header))
    }

    /// Refuses a request that does not name this server's cluster (docs/design.md §10): servers of
    /// different clusters never exchange data or votes, and a server without state takes
    /// part in nothing until it has found its cluster. Discover is the exception: it is how
    /// a server without state finds its cluster, and it reveals no data.
    fn check_cluster<T>(&self, req: &Request<T>, discover: bool) -> Result<(), Status> {
        let theirs = req
            .metadata()
            .get(CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok());
        if self.node.identity.matches(theirs) {
            return Ok(());
        }
        let ours = self.node.identity.get();
        if discover && (theirs.is_none() || ours.is_none()) {
            return Ok(());
        }
        Err(Status::failed_precondition(match ours {
            None => "this server holds no state and has not found its cluster yet".to_string(),
            Some(ours) => format!(
                "cluster mismatch: this server belongs to cluster {ours}, the request names {}",
                theirs.unwrap_or("none")
            ),
        }))
    }

    /// Refuses a sender outside this server's configuration (docs/design.md §11): a removed
    /// server takes part in nothing. Discover is not checked: it is how a removed server
    /// learns that it was removed.
    fn check_configured(&self, from: Option<u32>) -> Result<(), Status> {
        match from {
            Some(r) if !self.node.st().view.in_config(r) => Err(Status::permission_denied(
                format!("rank {r} is not in this cluster's configuration (removed, or not added)"),
            )),
            _ => Ok(()),
        }
    }

    /// Authenticates the sender and checks the request's cluster, then applies the incoming
    /// fault rules for a request from that sender. Returns the action still to apply after
    /// handling (a lost response).
    async fn incoming<T>(
        &self,
        req: &Request<T>,
        claimed: Option<(u32, &str)>,
    ) -> Result<Option<Action>, Status> {
        let from = self.authenticate(req, claimed)?;
        self.check_cluster(req, false)?;
        self.check_configured(from)?;
        self.faults_in(from).await
    }

    async fn faults_in(&self, from: Option<u32>) -> Result<Option<Action>, Status> {
        match from.and_then(|from| self.node.faults.incoming(from)) {
            Some(Action::Drop) => {
                tokio::time::sleep(LOST_REQUEST_WAIT).await;
                Err(Status::unavailable("request lost (fault injection)"))
            }
            Some(Action::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(None)
            }
            other => Ok(other),
        }
    }

    async fn finish<R>(&self, after: Option<Action>, r: R) -> Result<Response<R>, Status> {
        if after == Some(Action::DropResponse) {
            tokio::time::sleep(LOST_REQUEST_WAIT).await;
            return Err(Status::unavailable("response lost (fault injection)"));
        }
        Ok(Response::new(r))
    }
}

/// The rank of the server that sent `req`, as its metadata names it.
fn sender<T>(req: &Request<T>) -> Option<u32> {
    req.metadata()
        .get(FROM_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<SyncChunk, Status>> + Send>>;
type AppendStream = Pin<Box<dyn Stream<Item = Result<AppendResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    async fn forward(&self, req: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        let after = self.incoming(&req, None).await?;
        let r = req.into_inner();
        // The same limits as a client's Put: a forward is no way around them. Its key is
        // the stored one, its namespace in front (docs/design.md §13).
        let stored = Limits {
            max_key_bytes: self.limits.max_key_bytes + auth::MAX_NAMESPACE_BYTES,
            ..self.limits
        };
        check_key(&r.key, &stored).map_err(ServeError::into_status)?;
        if let Some(v) = &r.value {
            check_value(v, &self.limits).map_err(ServeError::into_status)?;
        }
        self.users.check_stored_key(&self.node.store, &r.key)?;
        // Only the primary sequences; a forwarded write is never forwarded again.
        let res = self
            .node
            .write_local(WriteReq {
                key: r.key,
                value: r.value,
                id: r.id.as_ref().map(Into::into),
            })
            .await
            .map_err(ServeError::into_status)?;
        let resp = match res.old {
            Some(v) => WriteResponse {
                had_old: true,
                old_value: v,
            },
            None => WriteResponse {
                had_old: false,
                old_value: Bytes::new(),
            },
        };
        self.finish(after, resp).await
    }

    type AppendStream = AppendStream;

    /// Answers each message of the primary's stream in turn, under the incoming fault rules:
    /// a lost message or response is simply never answered, and the primary times out.
    async fn append(
        &self,
        req: Request<Streaming<AppendRequest>>,
    ) -> Result<Response<AppendStream>, Status> {
        let from = self.authenticate(&req, None)?;
        self.check_cluster(&req, false)?;
        self.check_configured(from)?;
        let verified = tls::peer_rank(&req, self.tls.as_deref())?;
        let state = (self.node.clone(), Some(req.into_inner()));
        let responses = futures::stream::unfold(state, move |(node, requests)| async move {
            let mut requests = requests?;
            loop {
                // The primary closed the stream (its term ended or it gave up on this
                // member) or the connection broke: nothing is left to answer.
                let req = requests.message().await.ok()??;
                // Every message names its primary: only that server's certificate may.
                if let Err(s) = tls::check_claim(verified, req.primary, "primary") {
                    return Some((Err(s), (node, None)));
                }
                let action = from.and_then(|from| node.faults.incoming(from));
                match action {
                    Some(Action::Drop) => continue,
                    Some(Action::Delay(d)) => tokio::time::sleep(d).await,
                    _ => {}
                }
                let r = node.on_append(pb::append_from_pb(req)).await;
                if action != Some(Action::DropResponse) {
                    return Some((Ok(pb::append_reply_to_pb(&r)), (node, Some(requests))));
                }
            }
        });
        Ok(Response::new(Box::pin(
            responses.take_until(self.node.stopped()),
        )))
    }

    async fn prepare(
        &self,
        req: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        let claim = (req.get_ref().proposer, "proposer");
        let after = self.incoming(&req, Some(claim)).await?;
        let r = pb::prepare_from_pb(req.into_inner(), self.node.rank_bound());
        let r = self.node.on_prepare(r).await;
        self.finish(after, pb::prepare_reply_to_pb(&r)).await
    }

    async fn accept(
        &self,
        req: Request<AcceptRequest>,
    ) -> Result<Response<AcceptResponse>, Status> {
        let claim = (req.get_ref().proposer, "proposer");
        let after = self.incoming(&req, Some(claim)).await?;
        let r = pb::accept_from_pb(req.into_inner(), self.node.rank_bound());
        let r = self.node.on_accept(r).await;
        self.finish(after, pb::accept_reply_to_pb(&r)).await
    }

    async fn install(
        &self,
        req: Request<InstallRequest>,
    ) -> Result<Response<InstallResponse>, Status> {
        let claim = (req.get_ref().from, "from");
        let after = self.incoming(&req, Some(claim)).await?;
        let r = pb::install_from_pb(req.into_inner(), self.node.rank_bound());
        let r = self.node.on_install(r).await;
        self.finish(after, pb::install_reply_to_pb(&r)).await
    }

    type SyncStream = SyncStream;

    async fn sync(&self, req: Request<SyncRequest>) -> Result<Response<SyncStream>, Status> {
        let claim = (req.get_ref().from, "from");
        let after = self.incoming(&req, Some(claim)).await?;
        if after.is_some() {
            return self
                .finish(after, Box::pin(futures::stream::empty()) as SyncStream)
                .await;
        }
        let rx = self
            .node
            .on_sync(pb::sync_from_pb(req.into_inner()))
            .map_err(pb::sync_error_to_status)?;
        let s: SyncStream = Box::pin(tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            |c| c.map(pb::chunk_to_pb).map_err(pb::sync_error_to_status),
        ));
        Ok(Response::new(s))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let claim = (req.get_ref().rank, "rank");
        let after = self.incoming(&req, Some(claim)).await?;
        let r = self.node.on_join(pb::join_from_pb(req.into_inner())).await;
        self.finish(after, pb::join_reply_to_pb(&r)).await
    }

    async fn discover(
        &self,
        req: Request<DiscoverRequest>,
    ) -> Result<Response<DiscoverResponse>, Status> {
        let from = self.authenticate(&req, Some((req.get_ref().from, "from")))?;
        self.check_cluster(&req, true)?;
        let after = self.faults_in(from).await?;
        let r = self.node.on_discover();
        self.finish(after, pb::discover_reply_to_pb(&r)).await
    }
}

pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> Self {
        AdminService { node }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn fault(&self, req: Request<FaultRequest>) -> Result<Response<FaultResponse>, Status> {
        let r = req.into_inner();
        for rule in &r.rules {
            if rule.peer as usize >= self.node.rank_bound() {
                return Err(Status::invalid_argument(format!(
                    "unknown peer {}",
                    rule.peer
                )));
            }
        }
        let crash_at = match r.crash_at.as_str() {
            "" => None,
            name => Some(
                name.parse::<CrashPoint>()
                    .map_err(Status::invalid_argument)?,
            ),
        };
        self.node.faults.crash_at(crash_at);
        if r.heal {
            self.node.faults.set(Vec::new());
        } else {
            self.node.faults.set(r.rules);
        }
        if r.fail_storage {
            self.node.store.inject_flush_failure();
        }
        if r.panic_task {
            // A background task dies: the server must stop, not serve on without it (§10).
            tokio::spawn(async { panic!("injected panic in a background task") });
        }
        let rules = self.node.faults.len() as u32;
        info!(
            rules,
            heal = r.heal,
            fail_storage = r.fail_storage,
            panic_task = r.panic_task,
            crash_at = r.crash_at,
            "fault rules changed"
        );
        Ok(Response::new(FaultResponse { rules }))
    }
}
