//! The `replikv` command line: options, commands, output and exit codes.
//! The binary only calls [`main`].

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use replikv_proto::kv::StatusResponse;

use crate::{Client, ClientConfig, Error, Route};

/// Exit code when `get` finds no value.
pub const EXIT_NOT_FOUND: u8 = 1;
/// Exit code when `cas` finds another value than the expected one (nothing written).
pub const EXIT_MISMATCH: u8 = 4;
/// Exit code for bad usage: bad flags, bad input, bad configuration.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the cluster could not serve the request (or a write's
/// outcome is unknown).
pub const EXIT_UNAVAILABLE: u8 = 3;
/// Exit code when the servers refused the credentials, or the user may not do this.
pub const EXIT_DENIED: u8 = 5;

/// Talk to a replikv cluster.
#[derive(Debug, Parser)]
#[command(name = "replikv", version, about)]
pub struct Opt {
    /// Server addresses, comma-separated (host:port); needed by every command but `cert`.
    #[arg(long, env = "REPLIKV_SERVERS", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// The cluster CA certificate (PEM): speak TLS to the servers and trust this CA.
    #[arg(long, env = "REPLIKV_CA")]
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) to present, with --key.
    #[arg(long, env = "REPLIKV_CERT", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "REPLIKV_KEY", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// The user to speak for (docs/security.md "Users").
    #[arg(long, env = "REPLIKV_USER")]
    pub user: Option<String>,
    /// A file holding the user's token (else REPLIKV_TOKEN is read).
    #[arg(long, env = "REPLIKV_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Budget for the whole request, retries included (e.g. 500ms, 10s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Budget for one attempt on one server.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub attempt_timeout: Duration,
    /// Which server a request tries first.
    #[arg(long, value_enum, default_value_t = Route::Primary)]
    pub route: Route,
    /// Keys and values are given and printed as hex.
    #[arg(long)]
    pub hex: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the value of KEY (exit 1 if it has none).
    Get { key: String },
    /// Set KEY to VALUE and print the value it replaced, or "(none)".
    Put { key: String, value: String },
    /// Remove KEY and print the value it had, or "(none)".
    Delete { key: String },
    /// Print every server's view of the cluster as a table.
    Status,
    /// Print the keys from FROM to TO (both inclusive; no TO: to the last key), or those
    /// starting with --prefix, in key order: one `KEY<TAB>VALUE` line each.
    Scan {
        #[arg(long, conflicts_with_all = ["from", "to"])]
        prefix: Option<String>,
        from: Option<String>,
        to: Option<String>,
        /// Print at most this many keys (default: every key of the range).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Compare-and-swap: set KEY to NEW only if it holds EXPECTED. Prints "swapped" or
    /// "mismatch" (exit 4), then the value before, or "(none)".
    /// `cas --absent KEY NEW` sets KEY only if it does not exist;
    /// `cas --delete KEY EXPECTED` removes KEY only if it holds EXPECTED.
    Cas {
        #[arg(long, conflicts_with = "delete")]
        absent: bool,
        #[arg(long)]
        delete: bool,
        key: String,
        /// EXPECTED NEW, or one of them with --absent or --delete.
        #[arg(num_args = 1..=2)]
        values: Vec<String>,
    },
    /// Remove the keys from FROM to TO (both inclusive) or starting with --prefix, as one
    /// write of at most --limit keys (at most 10000); prints "removed N", and "more remain"
    /// when keys of the range are left. --all repeats until none are.
    DeleteRange {
        #[arg(long, conflicts_with_all = ["from", "to"])]
        prefix: Option<String>,
        #[arg(required_unless_present = "prefix")]
        from: Option<String>,
        #[arg(required_unless_present = "prefix")]
        to: Option<String>,
        #[arg(long, default_value_t = 0)]
        limit: u32,
        #[arg(long)]
        all: bool,
    },
    /// Read commands from stdin, one per line (PUT k v, SWAP k v, GET k, DELETE k, SCAN a b,
    /// STOP),
    /// and answer each on one line, in order.
    Shell,
    /// Make certificates for a secure cluster into a directory (docs/security.md).
    #[command(subcommand)]
    Cert(CertCommand),
    /// Print each server's gRPC health: readiness (service "") and liveness. ADDR (default:
    /// every server) may be `http://host:port` for a plaintext --health-listen. Exit 3 when
    /// one is not ready.
    Health { addr: Option<String> },
    /// Save or check a snapshot of the cluster's keys (docs/design.md §12).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// The cluster's servers: list them, add one, remove one (docs/design.md §11).
    #[command(subcommand)]
    Member(MemberCommand),
    /// Manage users (needs the admin user; docs/security.md "Users").
    #[command(subcommand)]
    User(UserCommand),
}

/// `replikv member`: the configuration of the cluster.
#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Print one line per server: RANK<TAB>ADDRESS<TAB>ROLE (primary, member, joining or
    /// out of the view), then the view's epoch.
    List,
    /// Add the server at ADDR (`host:client_port/peer_port`, or `host:port` for
    /// `host:port/port+1`) and print its new rank; then start it with `--join` and that
    /// `--rank`.
    Add { address: String },
    /// Remove the server of rank RANK, or at address ADDR, from the cluster.
    Remove {
        /// A rank, or an address as for `add`.
        target: String,
    },
}

/// `replikv snapshot`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Stream a consistent snapshot (every key at one committed lsn) from a live cluster
    /// into FILE; prints its key count, lsn and epoch. An admin operation.
    Save { file: std::path::PathBuf },
    /// Check FILE (format and checksum) and print its header.
    Check { file: std::path::PathBuf },
}

/// `replikv user`: add, remove and list the users of a cluster.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add user NAME with a new token, printed once on stdout (the servers keep only its
    /// SHA-256).
    Add {
        name: String,
        /// The user may manage users and call status.
        #[arg(long)]
        admin: bool,
    },
    /// Remove user NAME: every server refuses it from then on. Its keys stay.
    Remove { name: String },
    /// Print every user, one per line (`NAME` or `NAME<TAB>admin`).
    List,
}

/// `replikv cert`: a CA, node and client certificates.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create the cluster CA (once per cluster): DIR/ca.pem, DIR/ca-key.pem.
    Ca {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The cluster's name, written into every certificate this CA signs.
        #[arg(long, default_value = "replikv")]
        cluster: String,
    },
    /// Create rank RANK's certificate (DIR/node-RANK.pem) for the hosts it is reached by.
    Node {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        rank: u32,
        /// Host names and IP addresses of the server, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        hosts: Vec<String>,
    },
    /// Create a client certificate (DIR/client-NAME.pem).
    Client {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        name: String,
    },
}

/// Runs `replikv cert`; prints the files made.
fn cert(cmd: &CertCommand, out: &mut impl Write) -> Result<u8, Error> {
    use crate::certs;
    let made = match cmd {
        CertCommand::Ca { dir, cluster } => vec![certs::create_ca(dir, cluster)],
        CertCommand::Node { dir, rank, hosts } => {
            let r = certs::create_node(dir, *rank, hosts);
            vec![r.map(|(c, _)| c)]
        }
        CertCommand::Client { dir, name } => {
            vec![certs::create_client(dir, name).map(|(c, _)| c)]
        }
    };
    for path in made {
        let path = path.map_err(Error::Config)?;
        write_out(out, format!("{}\n", path.display()).as_bytes())?;
    }
    Ok(0)
}

/// `replikv health`: one line per server, `ADDR ready=STATUS live=STATUS`.
async fn health(
    addrs: Vec<String>,
    tls: Option<&crate::config::TlsSettings>,
    timeout: Duration,
    creds: Option<&crate::config::Credentials>,
    out: &mut impl Write,
) -> Result<u8, Error> {
    let servers = crate::snapshot::Servers::new(addrs, tls, timeout, creds)?;
    let mut code = 0;
    for addr in &servers.addrs {
        let line = match crate::snapshot::health(&servers, addr, timeout).await {
            Ok(h) => {
                if !h.is_ready() {
                    code = EXIT_UNAVAILABLE;
                }
                format!("{addr} ready={} live={}\n", h.ready, h.live)
            }
            Err(e) => {
                code = EXIT_UNAVAILABLE;
                format!("{addr} unreachable: {e}\n")
            }
        };
        write_out(out, line.as_bytes())?;
    }
    Ok(code)
}

/// `replikv snapshot save|check`.
async fn snapshot(
    cmd: &SnapshotCommand,
    addrs: Vec<String>,
    tls: Option<&crate::config::TlsSettings>,
    creds: Option<&crate::config::Credentials>,
    opt: &Opt,
    out: &mut impl Write,
) -> Result<u8, Error> {
    use crate::snapshot as snap;
    let (header, keys) = match cmd {
        SnapshotCommand::Check { file } => snap::check(file)?,
        SnapshotCommand::Save { file } => {
            let servers = snap::Servers::new(addrs, tls, opt.attempt_timeout, creds)?;
            // A snapshot of many keys outlasts a request's usual budget.
            let budget = opt.timeout.max(Duration::from_secs(600));
            snap::save(&servers, file, budget).await?
        }
    };
    write_out(
        out,
        format!("{}\n", snap::describe(&header, keys)).as_bytes(),
    )?;
    Ok(0)
}

/// Parses the command line, runs the command and returns its exit code.
pub fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let opt = Opt::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("replikv: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let code = runtime.block_on(run(opt, &mut stdout));
    if let Err(e) = stdout.flush() {
        eprintln!("replikv: cannot write the output: {e}");
    }
    ExitCode::from(code)
}

/// The credentials of `--user` / `--token-file`, completed from the environment.
fn credentials(
    user: Option<String>,
    token_file: Option<std::path::PathBuf>,
) -> Result<Option<crate::config::Credentials>, Error> {
    let from_env = crate::config::Credentials::from_env();
    let Some(user) = user.or_else(|| from_env.as_ref().map(|c| c.user.clone())) else {
        return Err(Error::Config(
            "a token file needs a user: give --user or REPLIKV_USER".into(),
        ));
    };
    let token = match token_file {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?
            .trim()
            .to_string(),
        None => match std::env::var(crate::config::TOKEN_ENV) {
            Ok(t) if !t.is_empty() => t,
            _ => {
                return Err(Error::Config(format!(
                    "user {user:?} needs a token: give --token-file, REPLIKV_TOKEN or \
                     REPLIKV_TOKEN_FILE"
                )))
            }
        },
    };
    Ok(Some(crate::config::Credentials::new(user, token)))
}

/// Runs one command, writing its result to `out` and problems to stderr.
/// Returns the exit code.
pub async fn run(opt: Opt, out: &mut impl Write) -> u8 {
    match execute(opt, out).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("replikv: {e}");
            exit_code(&e)
        }
    }
}

/// The exit code for an error.
pub fn exit_code(err: &Error) -> u8 {
    match err {
        Error::InvalidArgument(_) | Error::Config(_) | Error::Refused(_) => EXIT_USAGE,
        Error::Unauthenticated(_) | Error::PermissionDenied(_) => EXIT_DENIED,
        Error::Unavailable(_)
        | Error::OutcomeUnknown(_)
        | Error::Overloaded(_)
        | Error::SessionExpired(_) => EXIT_UNAVAILABLE,
    }
}

async fn execute(opt: Opt, out: &mut impl Write) -> Result<u8, Error> {
    if let Command::Cert(c) = &opt.command {
        return cert(c, out);
    }
    let tls = opt.ca.as_ref().map(|ca| {
        let tls = crate::config::TlsSettings::new(ca);
        match (&opt.cert, &opt.key) {
            (Some(cert), Some(key)) => tls.with_identity(cert, key),
            _ => tls,
        }
    });
    let creds = if opt.user.is_some() || opt.token_file.is_some() {
        credentials(opt.user.clone(), opt.token_file.clone())?
    } else {
        crate::config::Credentials::from_env()
    };
    match &opt.command {
        Command::Health { addr } => {
            let addrs = addr.clone().map_or(opt.servers.clone(), |a| vec![a]);
            return health(
                addrs,
                tls.as_ref(),
                opt.attempt_timeout,
                creds.as_ref(),
                out,
            )
            .await;
        }
        Command::Snapshot(c) => {
            return snapshot(
                c,
                opt.servers.clone(),
                tls.as_ref(),
                creds.as_ref(),
                &opt,
                out,
            )
            .await;
        }
        _ => {}
    }
    let config = ClientConfig::new(opt.servers)
        .with_tls(tls)
        .with_credentials(creds)
        .with_request_timeout(opt.timeout)
        .with_attempt_timeout(opt.attempt_timeout)
        .with_route(opt.route);
    let client = Client::connect(config).await?;
    let codec = Codec { hex: opt.hex };
    match opt.command {
        Command::Get { key } => match client.get(codec.decode("key", &key)?).await? {
            Some(value) => {
                codec.print(out, &value)?;
                Ok(0)
            }
            None => {
                eprintln!("not found");
                Ok(EXIT_NOT_FOUND)
            }
        },
        Command::Put { key, value } => {
            let old = client
                .put(codec.decode("key", &key)?, codec.decode("value", &value)?)
                .await?;
            codec.print_old(out, old)?;
            Ok(0)
        }
        Command::Delete { key } => {
            let old = client.delete(codec.decode("key", &key)?).await?;
            codec.print_old(out, old)?;
            Ok(0)
        }
        Command::Scan {
            prefix,
            from,
            to,
            limit,
        } => {
            let range = codec.range(prefix, from, to)?;
            let mut left = limit.unwrap_or(u64::MAX);
            let page = left.min(1000) as u32;
            let mut pages = std::pin::pin!(client.scan_pages(range, page));
            while left > 0 {
                let Some(p) = futures::StreamExt::next(&mut pages).await else {
                    break;
                };
                for (k, v) in p?.items {
                    if left == 0 {
                        break;
                    }
                    left -= 1;
                    codec.print_pair(out, &k, &v)?;
                }
            }
            Ok(0)
        }
        Command::Cas {
            absent,
            delete,
            key,
            values,
        } => {
            let mut values = values.into_iter();
            let (expected, new) = match (absent, delete, values.len()) {
                (true, false, 1) => (None, values.next()),
                (false, true, 1) => (values.next(), None),
                (false, false, 2) => (values.next(), values.next()),
                _ => {
                    return Err(Error::InvalidArgument(
                        "cas takes KEY EXPECTED NEW, --absent KEY NEW or --delete KEY EXPECTED"
                            .into(),
                    ))
                }
            };
            let expected = expected
                .map(|v| codec.decode("expected value", &v))
                .transpose()?;
            let new = new.map(|v| codec.decode("value", &v)).transpose()?;
            let r = client
                .cas(codec.decode("key", &key)?, expected, new)
                .await?;
            write_out(
                out,
                if r.swapped {
                    b"swapped\n"
                } else {
                    b"mismatch\n"
                },
            )?;
            codec.print_old(out, r.current)?;
            Ok(if r.swapped { 0 } else { EXIT_MISMATCH })
        }
        Command::DeleteRange {
            prefix,
            from,
            to,
            limit,
            all,
        } => {
            let range = codec.range(prefix, from, to)?;
            let mut removed = 0;
            let more = loop {
                let r = client.delete_range(&range, limit).await?;
                removed += r.removed;
                if !(all && r.more) {
                    break r.more;
                }
            };
            write_out(out, format!("removed {removed}\n").as_bytes())?;
            if more {
                write_out(out, b"more remain\n")?;
            }
            Ok(0)
        }
        Command::Shell => {
            let stdin = tokio::io::BufReader::new(tokio::io::stdin());
            crate::shell::run(&client, stdin, out)
                .await
                .map_err(|e| Error::InvalidArgument(format!("shell: {e}")))?;
            Ok(0)
        }
        Command::Status => {
            let replies = client.status_all().await;
            write_out(out, render_status_table(&replies).as_bytes())?;
            for (addr, reply) in &replies {
                if let Err(e) = reply {
                    eprintln!("{addr}: {e}");
                }
            }
            if replies.iter().any(|(_, r)| r.is_ok()) {
                Ok(0)
            } else {
                Ok(EXIT_UNAVAILABLE)
            }
        }
        Command::Cert(c) => cert(&c, out),
        Command::Member(MemberCommand::List) => {
            let r = client.members().await?;
            write_out(out, render_members(r.view.as_ref()).as_bytes())?;
            Ok(0)
        }
        Command::Member(MemberCommand::Add { address }) => {
            let r = client.member_add(&address).await?;
            write_out(out, format!("{}\n", r.rank).as_bytes())?;
            Ok(0)
        }
        Command::Member(MemberCommand::Remove { target }) => {
            use replikv_proto::kv::member_remove_request::Target;
            let target = match target.parse::<u32>() {
                Ok(rank) => Target::Rank(rank),
                Err(_) => Target::Address(target),
            };
            let r = client.member_remove(target).await?;
            write_out(out, format!("removed {}\n", r.rank).as_bytes())?;
            Ok(0)
        }
        Command::User(UserCommand::Add { name, admin }) => {
            let token = crate::config::generate_token()?;
            client.add_user(&name, &token, admin).await?;
            write_out(out, format!("{token}\n").as_bytes())?;
            Ok(0)
        }
        Command::User(UserCommand::Remove { name }) => {
            if client.remove_user(&name).await? {
                write_out(out, format!("removed {name}\n").as_bytes())?;
                Ok(0)
            } else {
                eprintln!("no user {name:?}");
                Ok(EXIT_NOT_FOUND)
            }
        }
        Command::User(UserCommand::List) => {
            for (name, admin) in client.list_users().await? {
                let line = if admin {
                    format!("{name}\tadmin\n")
                } else {
                    format!("{name}\n")
                };
                write_out(out, line.as_bytes())?;
            }
            Ok(0)
        }
        Command::Health { .. } | Command::Snapshot(_) => unreachable!("handled above"),
    }
}

/// `replikv member list`: a line per server of the configuration, then the epoch and the
/// rank the next added server gets.
pub fn render_members(view: Option<&replikv_proto::kv::View>) -> String {
    let Some(view) = view else {
        return "(no view)\n".into();
    };
    let mut text = String::new();
    let config = view.config.clone().unwrap_or_default();
    for s in &config.servers {
        let role = if s.rank == view.primary {
            "primary"
        } else if view.members.contains(&s.rank) {
            "member"
        } else if config.has_pending && config.pending == s.rank {
            "joining"
        } else {
            "out of the view"
        };
        text.push_str(&format!(
            "{}\t{}/{}\t{role}\n",
            s.rank,
            s.client,
            port_of(&s.peer)
        ));
    }
    text.push_str(&format!("epoch {}\n", view.epoch));
    text.push_str(&format!("next rank {}\n", config.next_rank));
    text
}

/// The port of `host:port`.
fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(_, p)| p)
}

/// How keys and values cross the command line.
#[derive(Debug, Clone, Copy)]
struct Codec {
    hex: bool,
}

impl Codec {
    fn decode(self, what: &str, arg: &str) -> Result<Bytes, Error> {
        if self.hex {
            decode_hex(arg)
                .map(Bytes::from)
                .map_err(|why| Error::InvalidArgument(format!("{what} {arg:?} is not hex: {why}")))
        } else {
            Ok(Bytes::copy_from_slice(arg.as_bytes()))
        }
    }

    /// Prints a value on its own line: hex with `--hex`, else its bytes as
    /// they are (so non-UTF-8 values survive a redirect to a file).
    fn print(self, out: &mut impl Write, value: &[u8]) -> Result<(), Error> {
        if self.hex {
            write_out(out, encode_hex(value).as_bytes())?;
        } else {
            write_out(out, value)?;
        }
        write_out(out, b"\n")
    }

    fn print_pair(self, out: &mut impl Write, key: &[u8], value: &[u8]) -> Result<(), Error> {
        if self.hex {
            write_out(out, encode_hex(key).as_bytes())?;
        } else {
            write_out(out, key)?;
        }
        write_out(out, b"\t")?;
        self.print(out, value)
    }

    /// The range the arguments name.
    fn range(
        self,
        prefix: Option<String>,
        from: Option<String>,
        to: Option<String>,
    ) -> Result<crate::Range, Error> {
        Ok(match prefix {
            Some(p) => crate::Range::Prefix(self.decode("prefix", &p)?),
            None => crate::Range::Keys {
                from: from
                    .map(|f| self.decode("start key", &f))
                    .transpose()?
                    .unwrap_or_default(),
                to: to.map(|t| self.decode("end key", &t)).transpose()?,
            },
        })
    }

    fn print_old(self, out: &mut impl Write, old: Option<Bytes>) -> Result<(), Error> {
        match old {
            Some(v) => self.print(out, &v),
            None => write_out(out, b"(none)\n"),
        }
    }
}

fn write_out(out: &mut impl Write, bytes: &[u8]) -> Result<(), Error> {
    // A result that could not be printed must not end in exit code 0.
    out.write_all(bytes)
        .map_err(|e| Error::InvalidArgument(format!("cannot write the output: {e}")))
}

/// Parses hex (either case, no separators) into bytes.
pub fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("odd number of digits".into());
    }
    let digit = |c: u8| -> Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!("{:?} is not a hex digit", char::from(c))),
        }
    };
    s.as_bytes()
        .chunks_exact(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Formats bytes as lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

const STATUS_COLUMNS: [&str; 12] = [
    "RANK",
    "ADDRESS",
    "STATE",
    "ROLE",
    "EPOCH",
    "PRIMARY",
    "MEMBERS",
    "APPLIED",
    "COMMITTED",
    "LAG",
    "LEASE_MS",
    "WRITES/FLUSH",
];

/// Renders `replikv status`: one row per server, in the given order. Lag is
/// how far a server's applied lsn is behind the most advanced answering
/// server; a server that did not answer shows "down" and dashes.
pub fn render_status_table(replies: &[(String, Result<StatusResponse, Error>)]) -> String {
    let max_applied = replies
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|s| s.applied))
        .max()
        .unwrap_or(0);
    let rows: Vec<[String; 12]> = replies
        .iter()
        .map(|(addr, reply)| match reply {
            Ok(s) => status_row(addr, s, max_applied),
            Err(_) => {
                let mut row: [String; 12] = std::array::from_fn(|_| "-".to_owned());
                row[1] = addr.clone();
                row[2] = "down".to_owned();
                row
            }
        })
        .collect();

    let mut widths = STATUS_COLUMNS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut table = String::new();
    let header = STATUS_COLUMNS.map(str::to_owned);
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        table.push_str(line.join("  ").trim_end());
        table.push('\n');
    }
    table
}

fn status_row(addr: &str, s: &StatusResponse, max_applied: u64) -> [String; 12] {
    let (epoch, primary, members) = match &s.view {
        Some(v) => (
            v.epoch.to_string(),
            v.primary.to_string(),
            v.members
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    };
    let ratio = if s.flushes == 0 {
        "-".to_owned()
    } else {
        format!("{:.1}", s.writes as f64 / s.flushes as f64)
    };
    [
        s.rank.to_string(),
        addr.to_owned(),
        // Answering Status is not the same as answering reads (docs/design.md §4).
        if s.serving { "up" } else { "not-serving" }.to_owned(),
        if s.role.is_empty() { "-" } else { &s.role }.to_owned(),
        epoch,
        primary,
        if members.is_empty() {
            "-".into()
        } else {
            members
        },
        s.applied.to_string(),
        s.committed.to_string(),
        max_applied.saturating_sub(s.applied).to_string(),
        s.lease_ms.to_string(),
        ratio,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use replikv_proto::kv::View;

    fn status(rank: u32, role: &str, applied: u64) -> StatusResponse {
        StatusResponse {
            rank,
            address: format!("127.0.0.1:{}", 7000 + rank),
            view: Some(View {
                epoch: 3,
                primary: 0,
                members: vec![0, 1],
                config: None,
            }),
            role: role.into(),
            applied,
            committed: 40,
            lease_ms: 420,
            writes: 90,
            flushes: 30,
            serving: true,
            ..Default::default()
        }
    }

    #[test]
    fn status_table_shows_lag_and_down_servers() {
        let replies = vec![
            ("127.0.0.1:7000".to_owned(), Ok(status(0, "primary", 42))),
            ("127.0.0.1:7001".to_owned(), Ok(status(1, "backup", 40))),
            (
                "127.0.0.1:7002".to_owned(),
                Err(Error::Unavailable("connection refused".into())),
            ),
        ];
        let table = render_status_table(&replies);
        let lines: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0][0], "RANK");
        assert_eq!(
            lines[1],
            [
                "0",
                "127.0.0.1:7000",
                "up",
                "primary",
                "3",
                "0",
                "0,1",
                "42",
                "40",
                "0",
                "420",
                "3.0"
            ]
        );
        assert_eq!(lines[2][9], "2", "backup lags the primary by 2");
        assert_eq!(
            lines[3],
            [
                "-",
                "127.0.0.1:7002",
                "down",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-"
            ]
        );
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        assert_eq!(decode_hex("00ffA0").unwrap(), vec![0, 255, 160]);
        assert_eq!(encode_hex(&[0, 255, 160]), "00ffa0");
        assert!(decode_hex("abc").is_err());
        assert!(decode_hex("zz").is_err());
        assert!(decode_hex("é1").is_err());
        assert_eq!(decode_hex("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn member_list_names_each_server_and_its_place() {
        use replikv_proto::kv::{Configuration, Server};
        let server = |rank: u32| Server {
            rank,
            client: format!("127.0.0.1:{}", 7000 + rank),
            peer: format!("127.0.0.1:{}", 7100 + rank),
        };
        let view = View {
            epoch: 9,
            primary: 2,
            members: vec![0, 2],
            config: Some(Configuration {
                servers: vec![server(0), server(2), server(3), server(4)],
                next_rank: 5,
                has_pending: true,
                pending: 4,
            }),
        };
        assert_eq!(
            render_members(Some(&view)),
            "0\t127.0.0.1:7000/7100\tmember\n2\t127.0.0.1:7002/7102\tprimary\n\
             3\t127.0.0.1:7003/7103\tout of the view\n4\t127.0.0.1:7004/7104\tjoining\n\
             epoch 9\nnext rank 5\n"
        );
        assert_eq!(exit_code(&Error::Refused("busy".into())), EXIT_USAGE);
    }

    #[test]
    fn exit_codes_separate_usage_from_unavailability() {
        assert_eq!(exit_code(&Error::InvalidArgument("x".into())), EXIT_USAGE);
        assert_eq!(exit_code(&Error::Config("x".into())), EXIT_USAGE);
        assert_eq!(exit_code(&Error::Unavailable("x".into())), EXIT_UNAVAILABLE);
        assert_eq!(
            exit_code(&Error::OutcomeUnknown("x".into())),
            EXIT_UNAVAILABLE
        );
    }

    #[test]
    fn command_line_parses_servers_timeout_and_route() {
        let opt = Opt::try_parse_from([
            "replikv",
            "--servers",
            "a:1,b:2",
            "--timeout",
            "1500ms",
            "--route",
            "random",
            "put",
            "k",
            "v",
        ])
        .unwrap();
        assert_eq!(opt.servers, ["a:1", "b:2"]);
        assert_eq!(opt.timeout, Duration::from_millis(1500));
        assert_eq!(opt.route, Route::Random);
        assert!(matches!(opt.command, Command::Put { .. }));
        assert!(Opt::try_parse_from(["replikv", "--servers", "a:1", "frobnicate"]).is_err());
    }
}
