//! etcd through its v3 gRPC KV API: `/etcdserverpb.KV/Put` and `/etcdserverpb.KV/Range`.
//!
//! The messages are the subset of etcd's `rpc.proto` and `kv.proto` these two calls use,
//! written out as prost structs with the same field numbers; fields left out are skipped
//! on decode, as protobuf allows, so nothing else of etcd's schema is needed.

use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::SeedableRng;
use replikv_client::Route;
use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_prost::ProstCodec;

use crate::target::{TargetError, TargetOptions, TargetStats};

const PUT_PATH: &str = "/etcdserverpb.KV/Put";
const RANGE_PATH: &str = "/etcdserverpb.KV/Range";

/// `etcdserverpb.PutRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    #[prost(int64, tag = "3")]
    pub lease: i64,
    /// Return the replaced key-value, as replikv's Put returns the old value.
    #[prost(bool, tag = "4")]
    pub prev_kv: bool,
}

/// `etcdserverpb.PutResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(message, optional, tag = "2")]
    pub prev_kv: Option<KeyValue>,
}

/// `etcdserverpb.RangeRequest` (the fields up to `serializable`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    /// Empty: only `key` itself.
    #[prost(bytes = "bytes", tag = "2")]
    pub range_end: Bytes,
    #[prost(int64, tag = "3")]
    pub limit: i64,
    #[prost(int64, tag = "4")]
    pub revision: i64,
    #[prost(int32, tag = "5")]
    pub sort_order: i32,
    #[prost(int32, tag = "6")]
    pub sort_target: i32,
    /// false: linearizable read through the leader; true: the member's local state.
    #[prost(bool, tag = "7")]
    pub serializable: bool,
}

/// `etcdserverpb.RangeResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
    #[prost(bool, tag = "3")]
    pub more: bool,
    #[prost(int64, tag = "4")]
    pub count: i64,
}

/// `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(int64, tag = "3")]
    pub revision: i64,
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// `mvccpb.KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    #[prost(int64, tag = "4")]
    pub version: i64,
    #[prost(bytes = "bytes", tag = "5")]
    pub value: Bytes,
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// The CA etcd's members are trusted by, as etcdctl takes it (`ETCDCTL_CACERT`, the
/// environment form of `--cacert`): with it the members are spoken to over TLS.
pub const CACERT_ENV: &str = "ETCDCTL_CACERT";

/// TLS settings from [`CACERT_ENV`]; `None` (plaintext) when it is unset or empty.
fn etcd_tls() -> Result<Option<ClientTlsConfig>, TargetError> {
    let Some(path) = std::env::var_os(CACERT_ENV).filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let pem = std::fs::read(&path).map_err(|e| {
        TargetError::Config(format!(
            "{CACERT_ENV}={}: {e}",
            std::path::Path::new(&path).display()
        ))
    })?;
    Ok(Some(
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
    ))
}

/// One session to an etcd cluster: a channel per member.
pub struct EtcdKv {
    members: Vec<Grpc<Channel>>,
    route: Route,
    serializable: bool,
    timeout: Duration,
    rng: StdRng,
    requests: u64,
}

impl EtcdKv {
    /// Prepares a channel to every member. Channels connect on first use, so a member that
    /// is down fails only the requests sent to it, as a dead replikv server does.
    pub fn connect(opts: &TargetOptions) -> Result<Self, TargetError> {
        let tls = etcd_tls()?;
        let members = opts
            .servers
            .iter()
            .map(|addr| {
                let connect_error = |source| TargetError::Connect {
                    addr: addr.clone(),
                    source,
                };
                let scheme = if tls.is_some() { "https" } else { "http" };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
                    .map_err(connect_error)?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .timeout(opts.request_timeout);
                if let Some(tls) = &tls {
                    endpoint = endpoint.tls_config(tls.clone()).map_err(connect_error)?;
                }
                Ok(Grpc::new(endpoint.connect_lazy()))
            })
            .collect::<Result<Vec<_>, TargetError>>()?;
        Ok(EtcdKv {
            members,
            route: opts.route,
            serializable: opts.etcd_serializable,
            timeout: opts.request_timeout,
            rng: StdRng::from_os_rng(),
            requests: 0,
        })
    }

    /// Another session over the same channels (etcd's own client shares one connection
    /// among all the goroutines that use it).
    pub fn new_session(&self) -> Self {
        EtcdKv {
            members: self.members.clone(),
            route: self.route,
            serializable: self.serializable,
            timeout: self.timeout,
            rng: StdRng::from_os_rng(),
            requests: 0,
        }
    }

    pub async fn get(&mut self, key: Bytes) -> Result<Option<Bytes>, TargetError> {
        let request = RangeRequest {
            key,
            serializable: self.serializable,
            ..RangeRequest::default()
        };
        let response: RangeResponse = self.call(RANGE_PATH, request).await?;
        Ok(response.kvs.into_iter().next().map(|kv| kv.value))
    }

    pub async fn put(&mut self, key: Bytes, value: Bytes) -> Result<Option<Bytes>, TargetError> {
        let request = PutRequest {
            key,
            value,
            prev_kv: true,
            ..PutRequest::default()
        };
        let response: PutResponse = self.call(PUT_PATH, request).await?;
        Ok(response.prev_kv.map(|kv| kv.value))
    }

    pub fn stats(&self) -> TargetStats {
        TargetStats {
            requests: self.requests,
            retries: 0,
        }
    }

    async fn call<Req, Resp>(
        &mut self,
        path: &'static str,
        request: Req,
    ) -> Result<Resp, TargetError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.requests += 1;
        let member = super::pick_server(self.route, self.members.len(), &mut self.rng);
        let mut grpc = self.members[member].clone();
        let call = async move {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("member not ready: {e}")))?;
            grpc.unary(
                tonic::Request::new(request),
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Resp>::default(),
            )
            .await
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(response) => Ok(response?.into_inner()),
            Err(_) => Err(TargetError::Timeout(self.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The bytes etcd's own generated code produces for a serializable single-key Range
    /// (`key = "k"`, `serializable = true`): field 1 length-delimited, field 7 varint.
    #[test]
    fn range_request_encodes_like_etcd() {
        let request = RangeRequest {
            key: Bytes::from_static(b"k"),
            serializable: true,
            ..RangeRequest::default()
        };
        assert_eq!(request.encode_to_vec(), vec![0x0a, 0x01, b'k', 0x38, 0x01]);
    }

    #[test]
    fn put_response_decodes_prev_value() {
        let response = PutResponse {
            header: Some(ResponseHeader {
                revision: 7,
                ..ResponseHeader::default()
            }),
            prev_kv: Some(KeyValue {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"old"),
                ..KeyValue::default()
            }),
        };
        let decoded = PutResponse::decode(response.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.prev_kv.unwrap().value, Bytes::from_static(b"old"));
    }
}
