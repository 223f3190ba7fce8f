//! TLS on the client port (docs/security.md): the client and the `replikv` CLI reach a
//! cluster whose client port speaks TLS when given its CA, and nothing else does.

use std::time::Duration;

use bytes::Bytes;
use replikv_client::config::TlsSettings;
use replikv_client::{Client, ClientConfig};
use replikv_testkit::{ClusterOptions, LocalCluster};

const STEP: Duration = Duration::from_secs(30);

async fn tls_cluster() -> LocalCluster {
    let cluster = LocalCluster::start(ClusterOptions {
        servers: 3,
        client_tls: true,
        ..Default::default()
    })
    .expect("start the servers (is replikv-server built?)");
    cluster.wait_ready(STEP).await.expect("every server serves");
    cluster
}

fn short(config: ClientConfig) -> ClientConfig {
    config
        .with_request_timeout(Duration::from_secs(2))
        .with_attempt_timeout(Duration::from_millis(500))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_ca_works_and_one_without_is_refused() {
    let cluster = tls_cluster().await;
    let ca = cluster.ca_path().unwrap();
    let client = Client::connect(
        ClientConfig::new(cluster.addrs())
            .with_credentials(cluster.admin_credentials())
            .with_tls(Some(TlsSettings::new(&ca))),
    )
    .await
    .unwrap();
    client.put("k", "v").await.unwrap();
    assert_eq!(client.get("k").await.unwrap(), Some(Bytes::from("v")));

    // One address: the members learnt from Status are dialled over TLS too.
    let one = Client::connect(
        ClientConfig::new([cluster.addr(0)])
            .with_credentials(cluster.admin_credentials())
            .with_tls(Some(TlsSettings::new(&ca))),
    )
    .await
    .unwrap();
    assert_eq!(one.servers().len(), 3);
    assert_eq!(one.get("k").await.unwrap(), Some(Bytes::from("v")));

    // In the clear: no answer.
    let plain = Client::connect(short(
        ClientConfig::new(cluster.addrs())
            .with_credentials(cluster.admin_credentials())
            .with_tls(None),
    ))
    .await
    .unwrap();
    assert!(plain.get("k").await.is_err());
    assert!(plain.put("k", "w").await.is_err());

    // Trusting another CA: the servers' certificates are refused.
    let other = tempfile::tempdir().unwrap();
    let other_ca = replikv_client::certs::create_ca(other.path(), "local").unwrap();
    let wrong = Client::connect(short(
        ClientConfig::new(cluster.addrs())
            .with_credentials(cluster.admin_credentials())
            .with_tls(Some(TlsSettings::new(other_ca))),
    ))
    .await
    .unwrap();
    assert!(wrong.get("k").await.is_err());
    assert_eq!(client.get("k").await.unwrap(), Some(Bytes::from("v")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_the_ca_from_the_environment() {
    let cluster = tls_cluster().await;
    let ca = cluster.ca_path().unwrap();
    let run = |args: &[&str], with_ca: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_replikv"));
        cmd.env("REPLIKV_SERVERS", cluster.addrs().join(","))
            .envs(cluster.client_env(cluster.admin_credentials().as_ref()))
            .env_remove("REPLIKV_CA")
            .args(["--timeout", "2s", "--attempt-timeout", "500ms"])
            .args(args);
        if with_ca {
            cmd.env("REPLIKV_CA", &ca);
        }
        cmd.output().unwrap()
    };
    let out = run(&["put", "fruit", "apple"], true);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["get", "fruit"], true);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "apple");
    let out = run(&["get", "fruit"], false);
    assert!(!out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_users_and_each_sees_its_own_keys() {
    let cluster = tls_cluster().await;
    let admin = cluster.admin_credentials().unwrap();
    let run = |args: &[&str], user: Option<(&str, &str)>| {
        let creds = user.map(|(u, t)| replikv_client::config::Credentials::new(u, t));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_replikv"));
        cmd.env("REPLIKV_SERVERS", cluster.addrs().join(","))
            .envs(cluster.client_env(creds.as_ref()))
            .env_remove("REPLIKV_TOKEN_FILE")
            .args(["--timeout", "5s", "--attempt-timeout", "1s"])
            .args(args);
        cmd.output().unwrap()
    };
    let as_admin = Some(("admin", admin.token.as_str()));
    let out = run(&["user", "add", "alice"], as_admin);
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(token.len(), 64, "a 256-bit token in hex: {token:?}");
    let out = run(&["user", "list"], as_admin);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "admin\tadmin\nalice\n"
    );
    let as_alice = Some(("alice", token.as_str()));
    assert!(run(&["put", "fruit", "pear"], as_alice).status.success());
    let out = run(&["get", "fruit"], as_admin);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the admin's fruit is another key"
    );
    let out = run(&["get", "fruit"], as_alice);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pear");
    // Alice is no admin; nobody without credentials gets anything.
    let out = run(&["user", "add", "mallory"], as_alice);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let out = run(&["get", "fruit"], None);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("REPLIKV_USER"),
        "{out:?}"
    );
    let out = run(&["user", "remove", "alice"], as_admin);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "removed alice\n");
    let out = run(&["get", "fruit"], as_alice);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let out = run(&["user", "remove", "alice"], as_admin);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn cert_makes_a_ca_nodes_and_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_replikv"))
            .env_remove("REPLIKV_SERVERS")
            .args(args)
            .output()
            .unwrap()
    };
    assert!(run(&["cert", "ca", "--dir", d, "--cluster", "prod"])
        .status
        .success());
    let out = run(&[
        "cert",
        "node",
        "--dir",
        d,
        "--rank",
        "0",
        "--hosts",
        "10.0.0.1,db0.example",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(run(&["cert", "client", "--dir", d, "--name", "alice"])
        .status
        .success());
    for f in ["ca.pem", "node-0.pem", "node-0-key.pem", "client-alice.pem"] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    // A second CA over the first is refused.
    assert!(!run(&["cert", "ca", "--dir", d]).status.success());
}
