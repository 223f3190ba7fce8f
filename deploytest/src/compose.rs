//! The cluster of `deploy/compose.yaml`, run by `scripts/compose.sh` as a user would, under
//! a compose project, a state directory and host ports of its own, and the faults a
//! container platform deals out: kill, start, restart, network disconnect.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use replikv_client::config::{Credentials, TlsSettings};
use replikv_client::{Client, ClientConfig, Route, StatusResponse};

use crate::docker::{check, docker, repo_dir, run_quietly, DOCKER_TIMEOUT};

/// Servers in deploy/compose.yaml.
pub const NODES: usize = 3;
/// Host ports kept free beyond the servers' for servers `compose.sh add` starts.
const SPARE_PORTS: usize = 1;
/// How long `compose.sh up` may take, image and certificates included.
const UP_TIMEOUT: Duration = Duration::from_secs(240);
/// What `compose.sh up` itself waits for the servers to serve.
const SERVE_TIMEOUT_SECS: &str = "150";
/// Deadline of one client request from the host, retries included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A running compose cluster; `compose.sh down` removes its containers, network, volumes
/// and certificates when it is dropped.
pub struct ComposeCluster {
    project: String,
    state: tempfile::TempDir,
    base_port: u16,
    image: String,
    env: HashMap<String, String>,
    /// Containers started beside the cluster (see [`ComposeCluster::hold_free_address`]),
    /// removed before the cluster.
    extra: Mutex<Vec<String>>,
}

impl ComposeCluster {
    /// `compose.sh up` with `image`: certificates, containers, and a wait until every
    /// server serves.
    pub fn up(image: &str) -> ComposeCluster {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let project = format!(
            "replikvtest{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut cluster = ComposeCluster {
            project,
            state: tempfile::Builder::new()
                .prefix("replikv-compose-")
                .tempdir()
                .expect("state directory"),
            base_port: free_ports((NODES + SPARE_PORTS) as u16),
            image: image.to_owned(),
            env: HashMap::new(),
            extra: Mutex::new(Vec::new()),
        };
        check(&mut cluster.script("up"), UP_TIMEOUT);
        let printed = check(&mut cluster.script("env"), DOCKER_TIMEOUT);
        cluster.env = printed
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        for var in [
            "REPLIKV_SERVERS",
            "REPLIKV_CA",
            "REPLIKV_CERT",
            "REPLIKV_KEY",
        ] {
            assert!(
                cluster.env.contains_key(var),
                "compose.sh env sets no {var}: {printed}"
            );
        }
        cluster
    }

    /// `scripts/compose.sh COMMAND` for this cluster.
    fn script(&self, command: &str) -> Command {
        let mut c = Command::new(repo_dir().join("scripts/compose.sh"));
        c.arg(command)
            .env("REPLIKV_COMPOSE_DIR", self.state_dir())
            .env("REPLIKV_COMPOSE_PROJECT", &self.project)
            .env("REPLIKV_COMPOSE_PORT", self.base_port.to_string())
            .env("REPLIKV_IMAGE", &self.image)
            .env("REPLIKV_COMPOSE_TIMEOUT", SERVE_TIMEOUT_SECS);
        c
    }

    fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    /// What `compose.sh env` exports.
    pub fn env(&self) -> &HashMap<String, String> {
        &self.env
    }

    /// The host's address of server `rank` (its published port).
    pub fn addr(&self, rank: usize) -> String {
        format!("127.0.0.1:{}", self.base_port + rank as u16)
    }

    /// The admin user, with the token `compose.sh env` names.
    fn credentials(&self) -> Option<Credentials> {
        let token = std::fs::read_to_string(&self.env["REPLIKV_TOKEN_FILE"])
            .expect("compose.sh up wrote the admin token");
        Some(Credentials::new(&self.env["REPLIKV_USER"], token.trim()))
    }

    fn tls(&self) -> TlsSettings {
        TlsSettings::new(&self.env["REPLIKV_CA"])
            .with_identity(&self.env["REPLIKV_CERT"], &self.env["REPLIKV_KEY"])
    }

    /// A client of the whole cluster, configured as `compose.sh env` says, that sends
    /// writes to the primary once it has learned which server that is.
    pub async fn client(&self) -> Client {
        let servers: Vec<String> = self.env["REPLIKV_SERVERS"]
            .split(',')
            .map(str::to_owned)
            .collect();
        assert_eq!(servers.len(), NODES, "REPLIKV_SERVERS names every server");
        Client::connect(
            ClientConfig::new(servers)
                .with_tls(Some(self.tls()))
                .with_credentials(self.credentials())
                .with_route(Route::Primary)
                .with_request_timeout(REQUEST_TIMEOUT),
        )
        .await
        .expect("client config is valid")
    }

    /// A client that only ever talks to server `rank`: its published port under two
    /// names (both in the node certificate), so that the client does not replace it by
    /// the member list, whose DNS names only resolve inside the network.
    pub async fn pinned(&self, rank: usize) -> Client {
        let port = self.base_port + rank as u16;
        Client::connect(
            ClientConfig::new([format!("127.0.0.1:{port}"), format!("localhost:{port}")])
                .with_tls(Some(self.tls()))
                .with_credentials(self.credentials())
                .with_route(Route::Random)
                .with_request_timeout(REQUEST_TIMEOUT),
        )
        .await
        .expect("client config is valid")
    }

    /// The container of server `rank`: a service of compose.yaml, or one `compose.sh add`
    /// started.
    pub fn container(&self, rank: usize) -> String {
        let find = |label: String| {
            docker(&[
                "ps",
                "-aq",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.project),
                "--filter",
                &label,
            ])
        };
        let mut id = find(format!("label=com.docker.compose.service=replikv-{rank}"));
        if id.is_empty() {
            id = find(format!("label=replikv.rank={rank}"));
        }
        assert!(
            !id.is_empty() && !id.contains('\n'),
            "one container for replikv-{rank}, found {id:?}"
        );
        id
    }

    /// The compose network the servers share.
    pub fn network(&self) -> String {
        format!("{}_replikv", self.project)
    }

    /// Server `rank`'s address on the network, or "" while it has none.
    pub fn ip(&self, rank: usize) -> String {
        docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.container(rank),
        ])
    }

    /// SIGKILL to server `rank`'s container.
    pub fn kill(&self, rank: usize) {
        docker(&["kill", &self.container(rank)]);
    }

    /// Starts server `rank`'s stopped container again, with its volume.
    pub fn start(&self, rank: usize) {
        docker(&["start", &self.container(rank)]);
    }

    /// `docker restart`: SIGTERM, up to 10 s to stop, then start.
    pub fn restart(&self, rank: usize) {
        docker(&["restart", "--time", "10", &self.container(rank)]);
    }

    /// Cuts server `rank` off the network: its process runs on, reaching no peer.
    pub fn disconnect(&self, rank: usize) {
        docker(&[
            "network",
            "disconnect",
            &self.network(),
            &self.container(rank),
        ]);
    }

    /// Connects server `rank` again, under its service name, which is how the others
    /// find it (compose gives it that alias; a manual connect must give it again).
    pub fn connect(&self, rank: usize) {
        docker(&[
            "network",
            "connect",
            "--alias",
            &format!("replikv-{rank}"),
            &self.network(),
            &self.container(rank),
        ]);
    }

    /// Starts a container on the network that takes the lowest free address, which Docker
    /// would otherwise give back to the next container to start: a server started or
    /// connected after this gets an address it never had. It runs a one-server replikv on
    /// loopback, a process that stays up and talks to nobody. Returns its address.
    pub fn hold_free_address(&self) -> String {
        let id = docker(&[
            "run",
            "--detach",
            "--network",
            &self.network(),
            "--entrypoint",
            "/usr/local/bin/replikv-server",
            &self.image,
            "--rank",
            "0",
            "--peers",
            "127.0.0.1:7000",
            "--data-dir",
            "/tmp/placeholder",
        ]);
        self.extra
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(id.clone());
        docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &id,
        ])
    }

    /// `compose.sh add`: a new server, with its certificate, added to the configuration
    /// and started in a container of its own; returns its rank once it serves.
    pub fn add_node(&self) -> usize {
        let out = check(&mut self.script("add"), UP_TIMEOUT);
        let rank = out
            .lines()
            .find_map(|l| l.split("(rank ").nth(1)?.split(')').next()?.parse().ok())
            .unwrap_or_else(|| panic!("compose.sh add names no rank: {out}"));
        assert!(
            rank < NODES + SPARE_PORTS,
            "rank {rank} has no port reserved"
        );
        rank
    }

    /// `compose.sh remove RANK`: out of the configuration, container removed.
    pub fn remove_node(&self, rank: usize) {
        check(
            self.script("remove").arg(rank.to_string()),
            DOCKER_TIMEOUT + Duration::from_secs(30),
        );
    }

    /// Every server's Status, by rank, through a fresh pinned client each.
    pub async fn statuses(&self) -> Vec<Option<StatusResponse>> {
        self.statuses_of(&(0..NODES).collect::<Vec<_>>()).await
    }

    /// The Status of the servers of `ranks`, at their rank's index (`None` where a server
    /// does not answer within 3 s, and at the ranks not asked).
    pub async fn statuses_of(&self, ranks: &[usize]) -> Vec<Option<StatusResponse>> {
        let len = ranks.iter().max().map_or(0, |&r| r + 1);
        let mut all = vec![None; len];
        for &rank in ranks {
            let client = self.pinned(rank).await;
            all[rank] = tokio::time::timeout(Duration::from_secs(3), client.status(0))
                .await
                .ok()
                .and_then(Result::ok);
        }
        all
    }

    /// Waits until the servers of `ranks` all serve as members of one view that has a
    /// primary among them; returns that primary's rank.
    pub async fn wait_serving(&self, ranks: &[usize], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses = self.statuses_of(ranks).await;
            if let Some(primary) = serving_view(&statuses, ranks) {
                return primary;
            }
            assert!(
                Instant::now() < deadline,
                "servers {ranks:?} do not all serve in one view within {timeout:?}: {statuses:#?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// The primary of the one view in which every server of `ranks` serves, if they do.
fn serving_view(statuses: &[Option<StatusResponse>], ranks: &[usize]) -> Option<usize> {
    let views: Vec<_> = ranks
        .iter()
        .map(|&r| {
            statuses
                .get(r)?
                .as_ref()
                .filter(|s| s.serving)?
                .view
                .clone()
        })
        .collect::<Option<_>>()?;
    let first = views.first()?;
    let members_all = ranks.iter().all(|&r| first.members.contains(&(r as u32)));
    let one_view = views
        .iter()
        .all(|v| v.epoch == first.epoch && v.primary == first.primary);
    (members_all && one_view && ranks.contains(&(first.primary as usize)))
        .then_some(first.primary as usize)
}

/// A base port with `count` consecutive free ports on 127.0.0.1 from it.
fn free_ports(count: u16) -> u16 {
    let start = 20_000 + (std::process::id() % 20_000) as u16;
    (start..60_000)
        .step_by(7)
        .find(|&base| (0..count).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()))
        .expect("free ports on 127.0.0.1")
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- last log lines of compose project {} ---", self.project);
            let mut logs = self.script("status");
            run_quietly(&mut logs, Duration::from_secs(30));
            run_quietly(&mut self.script("logs"), Duration::from_secs(60));
        }
        let extra = std::mem::take(self.extra.get_mut().unwrap_or_else(PoisonError::into_inner));
        if !extra.is_empty() {
            let mut rm = Command::new("docker");
            rm.args(["rm", "--force", "--volumes"]).args(&extra);
            run_quietly(&mut rm, Duration::from_secs(60));
        }
        if !run_quietly(&mut self.script("down"), Duration::from_secs(180)) {
            eprintln!(
                "compose.sh down failed for project {}; remove it with: \
                 REPLIKV_COMPOSE_PROJECT={} scripts/compose.sh down",
                self.project, self.project
            );
        }
    }
}
