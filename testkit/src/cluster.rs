//! LocalCluster: N real replikv-server processes on loopback.
//!
//! Tests, the load generator and the chaos nemesis use it to run a whole cluster
//! on one machine: it picks free ports, gives every server its own data directory and
//! log file, delivers the faults of docs/design.md §8 that are process-level
//! (SIGKILL, SIGTERM, SIGSTOP/SIGCONT, restart), and watches the cluster through
//! the public `Status` RPC only. It knows nothing of the replica's internals, so
//! what it observes is what a client could observe.
//!
//! Every child is killed and reaped when the [`LocalCluster`] is dropped,
//! including during a panic; a panicking test also keeps the base directory and
//! prints the tail of every server's log, since that is usually the only
//! evidence of what went wrong.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replikv_proto::kv::StatusResponse;

use crate::process::{profile_dir, ChildGuard};
use crate::status::{epoch, probe_as, Access, KvStub};
use replikv_client::config::{ClientConfig, Credentials, TlsSettings};
use replikv_proto::ADMIN_USER;

/// The admin token of a cluster with users, in its base directory.
const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Deadline of one `Status` probe, connection included.
const STATUS_DEADLINE: Duration = Duration::from_millis(500);
/// Pause between two rounds of probes while waiting for a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long [`LocalCluster::terminate`] lets a server shut down cleanly.
const TERMINATE_GRACE: Duration = Duration::from_secs(5);
/// Lines of each server log printed when a cluster is dropped during a panic.
const LOG_TAIL_LINES: usize = 30;
/// How long [`ServerCommand::locate_or_build`] lets `cargo build` run.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// How to run the server binary: a program and the arguments that come before
/// the server flags (so a wrapper such as `valgrind` or `cargo run --` fits).
#[derive(Clone, Debug)]
pub struct ServerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl ServerCommand {
    pub fn new(program: impl Into<PathBuf>, args: Vec<String>) -> Self {
        ServerCommand {
            program: program.into(),
            args,
        }
    }

    /// Finds `replikv-server`: `$REPLIKV_SERVER_BIN`, else next to the current
    /// executable, else in its parent directory (integration tests and
    /// examples run from `target/<profile>/deps` or `.../examples`, while the
    /// binary lives in `target/<profile>`).
    pub fn locate() -> io::Result<Self> {
        if let Some(bin) = std::env::var_os("REPLIKV_SERVER_BIN") {
            return Ok(ServerCommand::new(bin, Vec::new()));
        }
        let name = format!("replikv-server{}", std::env::consts::EXE_SUFFIX);
        let exe = std::env::current_exe()?;
        let found = exe
            .parent()
            .into_iter()
            .flat_map(|dir| [Some(dir), dir.parent()])
            .flatten()
            .map(|dir| dir.join(&name))
            .find(|candidate| candidate.is_file());
        found
            .map(|p| ServerCommand::new(p, Vec::new()))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "{name} not found next to {} nor in its parent directory; \
                     run `cargo build -p replikv-server` or set REPLIKV_SERVER_BIN",
                        exe.display()
                    ),
                )
            })
    }

    /// [`ServerCommand::locate`], building the server first if it is not there: only
    /// `cargo test` of the server package, or of the whole workspace, builds the server
    /// binary; `cargo test -p <another package>` does not.
    pub fn locate_or_build() -> io::Result<Self> {
        if let Ok(command) = Self::locate() {
            return Ok(command);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "replikv-server"]);
        if profile_dir()
            .file_name()
            .is_some_and(|name| name == "release")
        {
            build.arg("--release");
        }
        let status = ChildGuard::new(build.spawn()?).wait_bounded(BUILD_TIMEOUT);
        if !status.is_some_and(|s| s.success()) {
            return Err(io::Error::other(format!(
                "cargo build -p replikv-server failed ({status:?})"
            )));
        }
        Self::locate()
    }
}

/// Sizes a server's tokio runtime (read by tokio itself); a local cluster sets it for its
/// servers unless the caller's environment already does.
const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// What [`LocalCluster::start`] runs.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of servers (ranks `0..servers`).
    pub servers: usize,
    /// `--sync` mode: `"always"` or `"none"`.
    pub sync: String,
    /// Passes `--enable-fault-injection`, which serves the Admin service.
    pub fault_injection: bool,
    /// Appended to every server's flags, e.g. `["--lease-ms", "300"]`.
    pub extra_args: Vec<String>,
    /// Appended to one server's flags: entry `r` to rank `r`'s (e.g. its own
    /// `--metrics-listen`); ranks past the end get none.
    pub rank_args: Vec<Vec<String>>,
    /// `None` runs [`ServerCommand::locate`].
    pub command: Option<ServerCommand>,
    /// Where data directories and logs go; `None` uses a temporary directory
    /// that is removed when the cluster is dropped.
    pub base_dir: Option<PathBuf>,
    /// Mutual TLS on the peer plane (default): a CA, node certificates and a client
    /// certificate made into `<base>/certs` (docs/security.md). Off: `--insecure`-free
    /// plaintext on loopback.
    pub secure: bool,
    /// TLS on the client port too (default; needs `secure`); clients then need
    /// [`LocalCluster::ca_path`], which [`LocalCluster::client_config`] holds. Off: the
    /// client port in the clear (`--no-client-tls`), for tests that need plaintext.
    pub client_tls: bool,
    /// Clients authenticate as users (default): the admin token is made into
    /// `<base>/admin-token` and handed to rank 0 (`--admin-token-file`), which creates the
    /// admin user as it forms the cluster; [`LocalCluster::client_config`] speaks as that
    /// user. Off: `--no-auth`.
    pub auth: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            servers: 3,
            sync: "always".to_string(),
            fault_injection: false,
            extra_args: Vec::new(),
            rank_args: Vec::new(),
            command: None,
            base_dir: None,
            secure: true,
            client_tls: true,
            auth: true,
        }
    }
}

/// One server slot: its child process while it runs.
#[derive(Default)]
struct Slot {
    child: Option<Child>,
    /// Stopped with SIGSTOP and not yet continued.
    paused: bool,
    /// A server added at run time (`replikv member add`): it starts with `--join` and the
    /// client address of this rank instead of `--peers` (docs/design.md §11).
    join_via: Option<usize>,
}

/// N `replikv-server` processes on `127.0.0.1`, one per rank.
pub struct LocalCluster {
    opts: ClusterOptions,
    command: ServerCommand,
    /// Client ports by rank.
    ports: Vec<u16>,
    /// Peer ports by rank.
    peer_ports: Vec<u16>,
    base: PathBuf,
    /// Owns `base` when it is temporary; taken (kept on disk) during a panic.
    temp: Option<tempfile::TempDir>,
    slots: Vec<Slot>,
}

impl LocalCluster {
    /// Picks `opts.servers` free loopback ports and spawns one server per rank.
    ///
    /// Returns once every process has been spawned, not once the cluster
    /// serves: use [`LocalCluster::wait_ready`] for that.
    pub fn start(opts: ClusterOptions) -> io::Result<Self> {
        if opts.servers == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a cluster needs at least one server",
            ));
        }
        let command = match &opts.command {
            Some(c) => c.clone(),
            None => ServerCommand::locate()?,
        };
        let (base, temp) = match &opts.base_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                (dir.clone(), None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("replikv-cluster-")
                    .tempdir()?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let mut all = free_ports(2 * opts.servers)?;
        let peer_ports = all.split_off(opts.servers);
        let ports = all;
        if opts.secure {
            make_certs(&base.join("certs"), opts.servers)?;
        }
        let admin_token = base.join(ADMIN_TOKEN_FILE);
        if opts.auth && !admin_token.exists() {
            let token = replikv_client::config::generate_token().map_err(io::Error::other)?;
            std::fs::write(&admin_token, format!("{token}\n"))?;
        }
        let mut cluster = LocalCluster {
            peer_ports,
            slots: (0..opts.servers).map(|_| Slot::default()).collect(),
            opts,
            command,
            ports,
            base,
            temp,
        };
        // On an error part-way, dropping `cluster` kills the servers already started.
        for rank in 0..cluster.len() {
            cluster.spawn(rank)?;
        }
        Ok(cluster)
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    /// Always false: a cluster has at least one server.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// Every server's address, by rank: the `--peers` list.
    pub fn addrs(&self) -> Vec<String> {
        (0..self.len()).map(|rank| self.addr(rank)).collect()
    }

    /// Panics if `rank` is out of range, like indexing.
    pub fn addr(&self, rank: usize) -> String {
        format!("127.0.0.1:{}", self.ports[rank])
    }

    /// Rank `rank`'s peer-plane address (panics if out of range).
    pub fn peer_addr(&self, rank: usize) -> String {
        format!("127.0.0.1:{}", self.peer_ports[rank])
    }

    /// Every server's peer-plane address, by rank.
    pub fn peer_addrs(&self) -> Vec<String> {
        (0..self.len()).map(|rank| self.peer_addr(rank)).collect()
    }

    /// The servers' `--peers` value: `127.0.0.1:<client port>/<peer port>` by rank, for the
    /// servers the cluster started with (servers added later are not in it).
    pub fn peers_arg(&self) -> String {
        (0..self.opts.servers)
            .map(|r| self.member_arg(r))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Rank `rank`'s address as `--peers` and `replikv member add` take it:
    /// `127.0.0.1:<client port>/<peer port>`.
    pub fn member_arg(&self, rank: usize) -> String {
        format!("{}/{}", self.addr(rank), self.peer_ports[rank])
    }

    /// Makes room for one more server, to be added with `replikv member add` (docs/design.md
    /// §11): free ports and, on a secure cluster, a node certificate for its rank, the next
    /// one (ranks are never reused, so it is this cluster's server count). Nothing starts:
    /// see [`LocalCluster::start_joining`].
    pub fn add_slot(&mut self) -> io::Result<usize> {
        let rank = self.len();
        let ports = free_ports(2)?;
        if let Some(dir) = self.certs_dir() {
            let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
            replikv_client::certs::create_node(&dir, rank as u32, &hosts)
                .map_err(io::Error::other)?;
        }
        self.ports.push(ports[0]);
        self.peer_ports.push(ports[1]);
        self.slots.push(Slot::default());
        Ok(rank)
    }

    /// Starts the server of slot `rank` (see [`LocalCluster::add_slot`]) with `--join` and the
    /// client address of rank `via`; its restarts do the same.
    pub fn start_joining(&mut self, rank: usize, via: usize) -> io::Result<()> {
        self.slot(rank)?.join_via = Some(via);
        self.spawn(rank)
    }

    /// The certificate directory of a secure cluster (`replikv cert` layout).
    pub fn certs_dir(&self) -> Option<PathBuf> {
        self.opts.secure.then(|| self.base.join("certs"))
    }

    /// The cluster CA certificate of a secure cluster.
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.certs_dir().map(|d| replikv_client::certs::ca_path(&d))
    }

    /// A connection to rank `rank`'s peer plane presenting the certificate `name` of the
    /// cluster's certificate directory (e.g. `node-1` or `client-testkit`); plaintext on a
    /// cluster that is not secure.
    pub async fn peer_channel(
        &self,
        rank: usize,
        name: &str,
    ) -> Result<tonic::transport::Channel, String> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let addr = self.peer_addr(rank);
        let endpoint = match self.certs_dir() {
            None => Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?,
            Some(dir) => {
                let read = |f: String| std::fs::read(dir.join(&f)).map_err(|e| format!("{f}: {e}"));
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read("ca.pem".into())?))
                    .identity(Identity::from_pem(
                        read(format!("{name}.pem"))?,
                        read(format!("{name}-key.pem"))?,
                    ));
                Endpoint::from_shared(format!("https://{addr}"))
                    .map_err(|e| e.to_string())?
                    .tls_config(tls)
                    .map_err(|e| e.to_string())?
            }
        };
        endpoint
            .connect_timeout(STATUS_DEADLINE * 4)
            .connect()
            .await
            .map_err(|e| format!("{addr}: {e}"))
    }

    /// The flags every server gets besides its rank and data directory: `--peers`, on a
    /// secure cluster its TLS settings, and the admin token file (or `--no-auth`).
    pub fn common_args(&self) -> Vec<String> {
        let mut args = vec!["--peers".to_string(), self.peers_arg()];
        if let Some(dir) = self.certs_dir() {
            args.push("--tls-dir".into());
            args.push(dir.display().to_string());
            if !self.opts.client_tls {
                args.push("--no-client-tls".into());
            }
        }
        if self.opts.auth {
            args.push("--admin-token-file".into());
            args.push(self.base.join(ADMIN_TOKEN_FILE).display().to_string());
        } else {
            args.push("--no-auth".into());
        }
        args
    }

    /// The admin user's credentials; `None` on a cluster without auth.
    pub fn admin_credentials(&self) -> Option<Credentials> {
        if !self.opts.auth {
            return None;
        }
        let token = std::fs::read_to_string(self.base.join(ADMIN_TOKEN_FILE)).ok()?;
        Some(Credentials::new(ADMIN_USER, token.trim()))
    }

    /// The CA a client of this cluster trusts: `None` when the client port is in the clear.
    pub fn client_ca(&self) -> Option<PathBuf> {
        self.opts.client_tls.then(|| self.ca_path()).flatten()
    }

    /// How a client reaches this cluster: its CA (when the client port speaks TLS) and the
    /// admin user's credentials (when users are on).
    pub fn access(&self) -> Access {
        Access {
            ca: self.client_ca(),
            credentials: self.admin_credentials(),
        }
    }

    /// A raw Kv stub to `rank` speaking as the admin user over the cluster's TLS; each call
    /// is bounded by `timeout`.
    pub fn stub(&self, rank: usize, timeout: Duration) -> KvStub {
        self.access().stub(&self.addr(rank), timeout)
    }

    /// A client configuration for every server of this cluster, speaking as the admin user
    /// over TLS as the cluster requires (nothing is read from the environment).
    pub fn client_config(&self) -> ClientConfig {
        self.client_config_for(self.addrs())
    }

    /// [`LocalCluster::client_config`] for the given addresses only.
    pub fn client_config_for(&self, addrs: Vec<String>) -> ClientConfig {
        ClientConfig::new(addrs)
            .with_tls(self.client_ca().map(TlsSettings::new))
            .with_credentials(self.admin_credentials())
    }

    /// The variables a child process (the CLI, a C driver) reads to reach this cluster as
    /// `credentials`: `REPLIKV_CA` and `REPLIKV_USER`/`REPLIKV_TOKEN`, each left out when
    /// not needed.
    pub fn client_env(&self, credentials: Option<&Credentials>) -> Vec<(String, String)> {
        let ca = self.client_ca().map(|p| p.display().to_string());
        let vars: Vec<(String, String)> = vec![
            ("REPLIKV_CA".into(), ca.unwrap_or_default()),
            (
                "REPLIKV_USER".into(),
                credentials.map(|c| c.user.clone()).unwrap_or_default(),
            ),
            (
                "REPLIKV_TOKEN".into(),
                credentials.map(|c| c.token.clone()).unwrap_or_default(),
            ),
        ];
        vars.into_iter().filter(|(_, v)| !v.is_empty()).collect()
    }

    /// The directory that holds every data directory and log.
    pub fn base_dir(&self) -> &Path {
        &self.base
    }

    pub fn data_dir(&self, rank: usize) -> PathBuf {
        self.base.join(format!("data-{rank}"))
    }

    /// The server's stdout and stderr, appended to across restarts.
    pub fn log_path(&self, rank: usize) -> PathBuf {
        self.base.join(format!("server-{rank}.log"))
    }

    /// SIGKILL and reap (a crash: nothing is flushed). Does nothing if the
    /// server is not running.
    pub fn kill(&mut self, rank: usize) -> io::Result<()> {
        let slot = self.slot(rank)?;
        slot.paused = false;
        if let Some(mut child) = slot.child.take() {
            // SIGKILL also ends a stopped process, so no SIGCONT is needed.
            signal(&child, libc::SIGKILL)?;
            child.wait()?;
        }
        Ok(())
    }

    /// Kills every server; errors are ignored since the goal is that none runs.
    pub fn kill_all(&mut self) {
        for rank in 0..self.len() {
            let _ = self.kill(rank);
        }
    }

    /// SIGTERM (a clean shutdown), then SIGKILL if the server is still running
    /// after 5 s. Blocks the calling thread while it waits.
    pub fn terminate(&mut self, rank: usize) -> io::Result<()> {
        let slot = self.slot(rank)?;
        let Some(child) = slot.child.as_mut() else {
            return Ok(());
        };
        signal(child, libc::SIGTERM)?;
        if slot.paused {
            // A stopped process only acts on SIGTERM once it runs again.
            signal(child, libc::SIGCONT)?;
            slot.paused = false;
        }
        let deadline = Instant::now() + TERMINATE_GRACE;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                slot.child = None;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill(rank)
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing, like a long
    /// GC pause or a frozen VM.
    pub fn pause(&mut self, rank: usize) -> io::Result<()> {
        let slot = self.slot(rank)?;
        let child = running_child(slot, rank)?;
        signal(child, libc::SIGSTOP)?;
        slot.paused = true;
        Ok(())
    }

    /// SIGCONT after [`LocalCluster::pause`].
    pub fn resume(&mut self, rank: usize) -> io::Result<()> {
        let slot = self.slot(rank)?;
        let child = running_child(slot, rank)?;
        signal(child, libc::SIGCONT)?;
        slot.paused = false;
        Ok(())
    }

    /// Kills the server if it runs, then starts it again on the same port
    /// with the same data directory; its log is appended to.
    pub fn restart(&mut self, rank: usize) -> io::Result<()> {
        self.kill(rank)?;
        self.spawn(rank)
    }

    /// Replaces the data directory of a stopped server by an empty one, as a lost or
    /// replaced disk would. Refuses while the server runs.
    pub fn wipe(&mut self, rank: usize) -> io::Result<()> {
        if self.is_running(rank) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("server {rank} is running: stop it before wiping its data"),
            ));
        }
        let dir = self.data_dir(rank);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(dir)
    }

    /// The process id of a running server (to read its memory use in /proc, say).
    pub fn pid(&self, rank: usize) -> Option<u32> {
        self.slots.get(rank)?.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (paused counts as alive). A server that
    /// exited by itself is reaped here.
    pub fn is_running(&mut self, rank: usize) -> bool {
        let Ok(slot) = self.slot(rank) else {
            return false;
        };
        let exited = match slot.child.as_mut().map(Child::try_wait) {
            None => return false,
            Some(Ok(None)) => false,
            Some(Ok(Some(_)) | Err(_)) => true,
        };
        if exited {
            slot.child = None;
            slot.paused = false;
        }
        !exited
    }

    /// One `Status` RPC to `rank` with a 500 ms deadline, connection included;
    /// `None` if it did not answer in time or the rank does not exist.
    pub async fn status(&self, rank: usize) -> Option<StatusResponse> {
        if rank >= self.len() {
            return None;
        }
        probe_as(&self.addr(rank), &self.access(), STATUS_DEADLINE).await
    }

    /// Polls `Status` on every running server until one reports role
    /// `"primary"` and `serving`; returns its rank and status. If two claim it
    /// (an old primary that has not yet noticed it was deposed), the higher
    /// epoch wins, as it does in the protocol (docs/design.md §2).
    pub async fn wait_for_primary(
        &self,
        timeout: Duration,
    ) -> Result<(usize, StatusResponse), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses = self.poll_live().await;
            let primary = statuses
                .iter()
                .filter_map(|(rank, s)| s.as_ref().map(|s| (*rank, s)))
                .filter(|(_, s)| s.role == "primary" && s.serving)
                .max_by_key(|(_, s)| epoch(s));
            if let Some((rank, status)) = primary {
                return Ok((rank, status.clone()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no serving primary within {timeout:?}; last seen: {}; logs in {}",
                    describe(&statuses),
                    self.base.display()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until a new cluster has formed: every running server serves as a member of one
    /// view (the first view is rank 0 alone; the others join it, docs/design.md §10). Returns the
    /// primary, as [`LocalCluster::wait_for_primary`] does. Call it after
    /// [`LocalCluster::start`] before anything that relies on every server holding the data.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(usize, StatusResponse), String> {
        let deadline = Instant::now() + timeout;
        self.wait_converged(timeout).await?;
        self.wait_for_primary(deadline.saturating_duration_since(Instant::now()))
            .await
    }

    /// Waits until every running, unpaused server answers, serves, is in the
    /// same view epoch and has applied the same lsn: the replicas have
    /// converged (e.g. after a restarted server caught up).
    pub async fn wait_converged(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses = self.poll_live().await;
            let answered: Vec<&StatusResponse> =
                statuses.iter().filter_map(|(_, s)| s.as_ref()).collect();
            let converged = !statuses.is_empty()
                && answered.len() == statuses.len()
                && answered.iter().all(|s| s.serving)
                && answered
                    .windows(2)
                    .all(|w| w[0].applied == w[1].applied && epoch(w[0]) == epoch(w[1]));
            if converged {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "servers did not converge within {timeout:?}; last seen: {}; logs in {}",
                    describe(&statuses),
                    self.base.display()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// `Status` of every server that runs and is not paused, probed concurrently.
    async fn poll_live(&self) -> Vec<(usize, Option<StatusResponse>)> {
        let live: Vec<usize> = (0..self.len())
            .filter(|&r| self.slots[r].child.is_some() && !self.slots[r].paused)
            .collect();
        let statuses = futures::future::join_all(live.iter().map(|&r| self.status(r))).await;
        live.into_iter().zip(statuses).collect()
    }

    fn slot(&mut self, rank: usize) -> io::Result<&mut Slot> {
        let len = self.slots.len();
        self.slots.get_mut(rank).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("rank {rank} is out of range: the cluster has {len} servers"),
            )
        })
    }

    /// Runtime threads per server: the machine's cores shared out among the servers and one
    /// more process (the client that drives them), at least one each. Every server of a
    /// local cluster shares the machine, so a runtime thread per core in each would only
    /// add thread wake-ups between processes that cannot all run at once.
    fn worker_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / (self.opts.servers + 1)).max(1)
    }

    fn spawn(&mut self, rank: usize) -> io::Result<()> {
        let data_dir = self.data_dir(rank);
        std::fs::create_dir_all(&data_dir)?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(rank))?;
        // A marker line so a log appended to across restarts reads as separate lives.
        writeln!(log, "--- LocalCluster: starting rank {rank} ---")?;

        let mut args = self.common_args();
        let join_via = self.slot(rank)?.join_via;
        if let Some(via) = join_via {
            args.splice(0..2, ["--join".to_string(), self.addr(via)]);
        }
        let mut cmd = Command::new(&self.command.program);
        cmd.args(&self.command.args)
            .arg("--rank")
            .arg(rank.to_string())
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--sync")
            .arg(&self.opts.sync)
            // Every restart uses the same flags, as a StatefulSet does: --bootstrap forms a
            // cluster only when no server holds any state (docs/design.md §10).
            .arg("--bootstrap");
        if self.opts.fault_injection {
            cmd.arg("--enable-fault-injection");
        }
        cmd.args(&self.opts.extra_args)
            .args(self.opts.rank_args.get(rank).into_iter().flatten())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        if std::env::var_os(WORKER_THREADS_ENV).is_none() {
            cmd.env(WORKER_THREADS_ENV, self.worker_threads().to_string());
        }
        let child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", self.command.program.display()),
            )
        })?;
        let slot = self.slot(rank)?;
        slot.child = Some(child);
        slot.paused = false;
        Ok(())
    }

    /// Prints the end of every server log, for a test that is failing.
    fn print_log_tails(&self) {
        for rank in 0..self.len() {
            let path = self.log_path(rank);
            match tail(&path, LOG_TAIL_LINES) {
                Ok(text) => eprintln!("--- last lines of {} ---\n{text}", path.display()),
                Err(e) => eprintln!("--- cannot read {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if let Some(mut child) = slot.child.take() {
                // A stopped process dies of SIGKILL too; SIGCONT first anyway so
                // that nothing depends on that subtlety.
                if slot.paused {
                    let _ = signal(&child, libc::SIGCONT);
                }
                let _ = signal(&child, libc::SIGKILL);
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            self.print_log_tails();
            if let Some(temp) = self.temp.take() {
                eprintln!("cluster files kept in {}", temp.keep().display());
            }
        }
    }
}

/// Sends `sig` to a child that has not been reaped yet, so its pid cannot
/// have been reused by another process.
fn signal(child: &Child, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn running_child(slot: &mut Slot, rank: usize) -> io::Result<&mut Child> {
    slot.child.as_mut().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("server {rank} is not running"),
        )
    })
}

/// A CA, a node certificate per rank (for 127.0.0.1 and localhost) and the client
/// certificate `testkit` into `dir`.
fn make_certs(dir: &Path, servers: usize) -> io::Result<()> {
    use replikv_client::certs;
    let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
    certs::create_ca(dir, "local").map_err(io::Error::other)?;
    for rank in 0..servers as u32 {
        certs::create_node(dir, rank, &hosts).map_err(io::Error::other)?;
    }
    certs::create_client(dir, "testkit").map_err(io::Error::other)?;
    Ok(())
}

/// Distinct free ports on 127.0.0.1. All listeners stay bound until every
/// port is chosen, so the kernel cannot hand out the same one twice; there is
/// still a small window between release and the server's bind.
pub fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// One line per probe for error messages: what each server said, or that it did not answer.
fn describe(statuses: &[(usize, Option<StatusResponse>)]) -> String {
    if statuses.is_empty() {
        return "no server is running".to_string();
    }
    statuses
        .iter()
        .map(|(rank, s)| match s {
            Some(s) => format!(
                "[rank {rank}: {} epoch {} serving {} applied {} committed {}]",
                s.role,
                epoch(s),
                s.serving,
                s.applied,
                s.committed
            ),
            None => format!("[rank {rank}: no answer]"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The last `lines` lines of a file, reading at most its last 64 KiB.
fn tail(path: &Path, lines: usize) -> io::Result<String> {
    const MAX_BYTES: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}
