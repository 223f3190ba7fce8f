//! Client configuration and server-address parsing.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;

/// Which server a request goes to first (docs/design.md §6). Whatever the route, a
/// request that fails there moves on to the other servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Route {
    /// Every request starts at a server picked at random (the classic policy).
    Random,
    /// Writes start at the primary last learned of (from the previous write's
    /// answer, an `UNAVAILABLE` redirect or a `Status` call), which saves the
    /// forward a backup would make; reads are random. Until a primary is known,
    /// writes start at random too.
    #[default]
    Primary,
    /// Reads start at the server with the lowest observed latency; writes are
    /// random.
    Nearest,
}

/// How a [`crate::Client`] finds and talks to the cluster.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Server addresses, `host:port` or `http://host:port`. An entry may also
    /// be a comma-separated list.
    pub servers: Vec<String>,
    /// Budget for one whole request, retries included.
    pub request_timeout: Duration,
    /// Budget for one RPC attempt on one server.
    pub attempt_timeout: Duration,
    /// Budget for opening a TCP connection to one server.
    pub connect_timeout: Duration,
    /// Which server a request tries first.
    pub route: Route,
    /// Session id for exactly-once writes (128 bits: `client_id_hi:client_id`
    /// on the wire). `None`, the default and the only safe choice outside
    /// tests, draws a fresh id from the operating system for every session.
    /// Two live sessions must never share an id: the servers would take one's
    /// writes for retries of the other's and answer them with the other's
    /// recorded results. A fixed id is used by the session built from this
    /// configuration only; [`crate::Client::new_session`] and a
    /// [`crate::BlockingClient`] rebuilt after `fork` draw fresh ones.
    pub client_id: Option<u128>,
    /// TLS to the servers' client port; `None` speaks in the clear. [`ClientConfig::new`]
    /// takes it from the environment ([`TlsSettings::from_env`]).
    pub tls: Option<TlsSettings>,
    /// The user the client speaks for (docs/security.md "Users"); `None` sends no
    /// credentials, which only a server started with `--no-auth` serves.
    /// [`ClientConfig::new`] takes it from the environment ([`Credentials::from_env`]).
    pub credentials: Option<Credentials>,
}

/// Environment variable naming the user a client speaks for.
pub const USER_ENV: &str = "REPLIKV_USER";
/// Environment variable holding that user's token.
pub const TOKEN_ENV: &str = "REPLIKV_TOKEN";
/// Environment variable naming a file that holds the token (read when `REPLIKV_TOKEN` is
/// not set).
pub const TOKEN_FILE_ENV: &str = "REPLIKV_TOKEN_FILE";

/// A user name and its token, sent with every call (headers `replikv-user` and
/// `authorization: Bearer <token>`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    pub fn new(user: impl Into<String>, token: impl Into<String>) -> Self {
        Credentials {
            user: user.into(),
            token: token.into(),
        }
    }

    /// `REPLIKV_USER` with `REPLIKV_TOKEN` (or the first line of the file
    /// `REPLIKV_TOKEN_FILE` names); `None` without a user or without a token.
    pub fn from_env() -> Option<Credentials> {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        let user = var(USER_ENV)?;
        let token = match var(TOKEN_ENV) {
            Some(t) => t,
            None => std::fs::read_to_string(var(TOKEN_FILE_ENV)?)
                .ok()?
                .trim()
                .to_string(),
        };
        Some(Credentials::new(user, token))
    }

    /// The metadata values; a name or token that cannot be a header is a configuration error.
    pub(crate) fn headers(&self) -> Result<Headers, Error> {
        let bad =
            |what: &str| Error::Config(format!("the {what} holds characters a header cannot"));
        Ok(Headers {
            user: self.user.parse().map_err(|_| bad("user name"))?,
            token: format!("Bearer {}", self.token)
                .parse()
                .map_err(|_| bad("token"))?,
        })
    }
}

/// A fresh token for a new user: 256 random bits from the operating system, as 64 hex
/// digits (the servers keep only its SHA-256).
pub fn generate_token() -> Result<String, Error> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)
        .map_err(|e| Error::Config(format!("no randomness for a token: {e}")))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// Credentials as metadata values, added to every call by [`Headers::add`].
#[derive(Clone, Debug)]
pub(crate) struct Headers {
    user: tonic::metadata::AsciiMetadataValue,
    token: tonic::metadata::AsciiMetadataValue,
}

/// Adds the credentials (if any) to every call of a stub.
#[derive(Clone, Debug)]
pub(crate) struct AddCredentials(pub Option<Headers>);

impl tonic::service::Interceptor for AddCredentials {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.0 {
            let md = req.metadata_mut();
            md.insert(replikv_proto::USER_HEADER, h.user.clone());
            md.insert(replikv_proto::AUTHORIZATION_HEADER, h.token.clone());
        }
        Ok(req)
    }
}

/// A stub of the Kv API that sends the client's credentials with every call.
pub(crate) type Stub = replikv_proto::kv::kv_client::KvClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AddCredentials>,
>;

/// Environment variable naming the cluster CA certificate (PEM) a client trusts.
pub const CA_ENV: &str = "REPLIKV_CA";
/// Environment variable naming a client certificate (PEM) to present.
pub const CERT_ENV: &str = "REPLIKV_CERT";
/// Environment variable naming that certificate's private key (PEM).
pub const KEY_ENV: &str = "REPLIKV_KEY";

/// TLS to the servers (docs/security.md): the CA the servers' certificates must chain to,
/// and optionally a client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub ca: PathBuf,
    /// Client certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsSettings {
    /// Trusts the CA certificate at `ca`.
    pub fn new(ca: impl Into<PathBuf>) -> Self {
        TlsSettings {
            ca: ca.into(),
            identity: None,
        }
    }

    /// Presents the client certificate `cert` with its key `key`.
    pub fn with_identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// `REPLIKV_CA`, with `REPLIKV_CERT` and `REPLIKV_KEY` if set; `None` without
    /// `REPLIKV_CA` (or with it empty).
    pub fn from_env() -> Option<TlsSettings> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        let ca = var(CA_ENV)?;
        let mut tls = TlsSettings::new(ca);
        if let (Some(cert), Some(key)) = (var(CERT_ENV), var(KEY_ENV)) {
            tls = tls.with_identity(cert, key);
        }
        Some(tls)
    }

    /// The tonic settings: reads the files.
    pub(crate) fn load(&self) -> Result<tonic::transport::ClientTlsConfig, Error> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| Error::Config(format!("cannot read {}: {e}", p.display())))
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&self.ca)?));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(tls)
    }
}

/// Default [`ClientConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ClientConfig::attempt_timeout`].
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default [`ClientConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl ClientConfig {
    /// A configuration with default timeouts and random routing.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(servers: I) -> Self {
        Self {
            servers: servers.into_iter().map(Into::into).collect(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            route: Route::default(),
            client_id: None,
            tls: TlsSettings::from_env(),
            credentials: Credentials::from_env(),
        }
    }

    /// Sets [`ClientConfig::credentials`].
    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// Sets [`ClientConfig::tls`].
    pub fn with_tls(mut self, tls: Option<TlsSettings>) -> Self {
        self.tls = tls;
        self
    }

    /// Sets [`ClientConfig::route`].
    pub fn with_route(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// Sets [`ClientConfig::request_timeout`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`ClientConfig::attempt_timeout`].
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Sets [`ClientConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`ClientConfig::client_id`] (for tests that need a known id).
    pub fn with_client_id(mut self, client_id: u128) -> Self {
        self.client_id = Some(client_id);
        self
    }

    /// Checks the timeouts and the client id, and returns the normalised
    /// (`host:port`) server list.
    pub(crate) fn validate(&self) -> Result<Vec<String>, Error> {
        for (name, value) in [
            ("request timeout", self.request_timeout),
            ("attempt timeout", self.attempt_timeout),
            ("connect timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        if self.client_id.is_some_and(|id| id as u64 == 0) {
            // 0 is what an unset proto3 field reads as: a server that reads only
            // the low half (`client_id`) would take the writes for writes without
            // a session.
            return Err(Error::Config(
                "client id must have non-zero low 64 bits".into(),
            ));
        }
        parse_servers(&self.servers)
    }
}

/// Normalises a list of server addresses (each entry may hold several,
/// comma-separated) into `host:port` strings.
///
/// Duplicates are rejected rather than merged: they would silently give one
/// server a double share of random picks, and [`crate::Client::status`]
/// indexes this list.
pub fn parse_servers<I, S>(entries: I) -> Result<Vec<String>, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out: Vec<String> = Vec::new();
    for entry in entries {
        for part in entry.as_ref().split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let addr = parse_server_addr(part)?;
            if out.contains(&addr) {
                return Err(Error::Config(format!("server {addr} is listed twice")));
            }
            out.push(addr);
        }
    }
    if out.is_empty() {
        return Err(Error::Config("no servers given".into()));
    }
    Ok(out)
}

/// Parses one server address, `host:port` or `http://host:port` (IPv6 hosts
/// in brackets), into its `host:port` form.
pub fn parse_server_addr(input: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::Config(format!("bad server address {input:?}: {why}"));
    let s = input.trim();
    let s = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .unwrap_or(s);
    let s = s.strip_suffix('/').unwrap_or(s);
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    if host.contains(['/', '@', '?', '#', ' ']) {
        return Err(bad("expected host:port"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad("IPv6 hosts must be in brackets, as in [::1]:7000"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| bad("port must be a number from 1 to 65535"))?;
    if port == 0 {
        return Err(bad("port must be a number from 1 to 65535"));
    }
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_http_addresses() {
        assert_eq!(
            parse_server_addr("127.0.0.1:7000").unwrap(),
            "127.0.0.1:7000"
        );
        assert_eq!(
            parse_server_addr("http://localhost:7001/").unwrap(),
            "localhost:7001"
        );
        assert_eq!(parse_server_addr(" [::1]:7002 ").unwrap(), "[::1]:7002");
    }

    #[test]
    fn rejects_bad_addresses_with_config_errors() {
        for bad in [
            "",
            "localhost",
            ":7000",
            "host:",
            "host:0",
            "host:70000",
            "host:port",
            "::1:7000",
            "http://user@host:7000",
            "host/path:7000",
        ] {
            assert!(
                matches!(parse_server_addr(bad), Err(Error::Config(_))),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn server_lists_split_on_commas_and_reject_duplicates() {
        assert_eq!(
            parse_servers(["a:1,b:2", " c:3 ", ""]).unwrap(),
            vec!["a:1", "b:2", "c:3"]
        );
        assert!(matches!(
            parse_servers(["a:1", "http://a:1"]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            parse_servers(Vec::<String>::new()),
            Err(Error::Config(_))
        ));
        assert!(matches!(parse_servers([" , "]), Err(Error::Config(_))));
    }

    #[test]
    fn validate_rejects_zero_timeouts_and_zero_client_id() {
        let ok = ClientConfig::new(["a:1"]);
        assert!(ok.validate().is_ok());
        assert!(ok
            .clone()
            .with_attempt_timeout(Duration::ZERO)
            .validate()
            .is_err());
        assert!(ok.clone().with_client_id(0).validate().is_err());
        assert!(ok.clone().with_client_id(1 << 64).validate().is_err());
        assert!(ok.clone().with_client_id((1 << 64) | 1).validate().is_ok());
    }
}
