//! Docker for the tests: whether it is there, bounded commands, and the test image.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use replikv_testkit::process::{profile_dir, run_bounded, ChildGuard};

/// Set to `1` to skip the tests that need Docker on a machine without it.
pub const SKIP_ENV: &str = "REPLIKV_SKIP_DOCKER";
/// How long one ordinary docker command may take.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long building the image may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The repository's root directory.
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("deploytest lives in the repository")
        .to_path_buf()
}

/// Whether the Docker tests run: `true` when Docker answers, `false` (with a note) when it
/// does not and `REPLIKV_SKIP_DOCKER=1` says to skip them. Panics with what to do when
/// Docker does not answer and skipping was not asked for: a test that silently passes
/// without Docker would hide a broken deployment.
pub fn available() -> bool {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("{SKIP_ENV}=1: skipping a test that needs Docker");
        return false;
    }
    let answer = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run docker: {e}"))
        .and_then(|child| {
            let mut guard = ChildGuard::new(child);
            match guard.wait_bounded(Duration::from_secs(30)) {
                Some(s) if s.success() => Ok(()),
                Some(s) => Err(format!("`docker info` failed ({s})")),
                None => Err("`docker info` did not answer within 30 s".into()),
            }
        });
    let compose = has_compose();
    match (answer, compose) {
        (Ok(()), true) => true,
        (Err(e), _) => panic!(
            "Docker is not available ({e}). These tests run the cluster in containers and \
             need Docker Engine and docker compose; set {SKIP_ENV}=1 to skip them"
        ),
        (Ok(()), false) => panic!(
            "neither `docker compose` nor `docker-compose` runs. These tests need one; set \
             {SKIP_ENV}=1 to skip them"
        ),
    }
}

fn has_compose() -> bool {
    let runs = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .and_then(|child| ChildGuard::new(child).wait_bounded(Duration::from_secs(30)))
            .is_some_and(|s| s.success())
    };
    runs("docker", &["compose", "version"]) || runs("docker-compose", &["version"])
}

/// Runs `command` within `timeout` and returns its stdout; panics with its output if it
/// fails.
pub fn check(command: &mut Command, timeout: Duration) -> String {
    let shown = format!("{command:?}");
    let out = run_bounded(command, timeout);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `docker ARGS`, which must succeed within [`DOCKER_TIMEOUT`]; its stdout, trimmed.
pub fn docker(args: &[&str]) -> String {
    check(Command::new("docker").args(args), DOCKER_TIMEOUT)
        .trim()
        .to_owned()
}

/// `program ARGS` within `timeout`, its output passed through to the test's own, never
/// panicking: for clean-up paths, which run during a panic too. Whether it succeeded.
pub fn run_quietly(command: &mut Command, timeout: Duration) -> bool {
    let Ok(child) = command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
    else {
        return false;
    };
    ChildGuard::new(child)
        .wait_bounded(timeout)
        .is_some_and(|s| s.success())
}

/// The directory holding the test build's `replikv-server` and `replikv`: `cargo test
/// --workspace` builds both. A test cannot build them itself, since cargo keeps the build
/// directory locked while tests run, so `cargo test -p replikv-deploytest` alone needs
/// `cargo build -p replikv-server -p replikv-client` first (else it uses what is there).
pub fn bin_dir() -> PathBuf {
    let dir = profile_dir();
    for bin in ["replikv-server", "replikv"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: run `cargo build -p replikv-server -p replikv-client` (with \
             --release for a release test build) first, or `cargo test --workspace`",
            dir.join(bin).display()
        );
    }
    dir
}

/// The image of this test build, `replikv:test-<hash of the binaries' directory>`, built
/// once per test binary by `scripts/build-image.sh` from [`bin_dir`]: an image tag per
/// working tree, so that two trees on one machine do not overwrite each other's.
pub fn test_image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let bins = bin_dir();
        // FNV-1a: a short, stable name for the directory.
        let hash = bins
            .to_string_lossy()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        let tag = format!("test-{:08x}", hash as u32);
        let out = check(
            Command::new(repo_dir().join("scripts/build-image.sh"))
                .arg(&tag)
                .env("BIN_DIR", &bins)
                .env("IMAGE", "replikv"),
            BUILD_TIMEOUT,
        );
        eprint!("{out}");
        format!("replikv:{tag}")
    })
}
