//! Shared fixtures for the kv739 tests: a live local cluster, C programs compiled against
//! `lib739kv.h` and the freshly built `libkv739.so`, and child processes that are always
//! bounded in time and killed on panic.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use replikv_client::{BlockingClient, ClientConfig};
pub use replikv_testkit::fixtures::server_command;
pub use replikv_testkit::process::{line_channel, profile_dir, run_bounded, ChildGuard};
use replikv_testkit::{ClusterOptions, LocalCluster};

/// How long a fresh cluster may take to elect its first primary (debug builds, 2 cores
/// shared with other work).
pub const PRIMARY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running 3-server cluster. `cluster` is declared first so its processes are killed
/// before the runtime that `wait_for_primary` uses goes away.
pub struct Fixture {
    pub cluster: LocalCluster,
    rt: tokio::runtime::Runtime,
}

impl Fixture {
    /// Starts `servers` replicas and waits until one of them serves as primary.
    pub fn start(servers: usize) -> Fixture {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let cluster = LocalCluster::start(ClusterOptions {
            servers,
            command: Some(server_command()),
            ..Default::default()
        })
        .expect("start the local cluster");
        let fixture = Fixture { cluster, rt };
        fixture
            .rt
            .block_on(fixture.cluster.wait_ready(PRIMARY_TIMEOUT))
            .unwrap_or_else(|e| panic!("{e}"));
        fixture
    }

    /// The rank of the serving primary; panics (with the cluster's own diagnosis) if none
    /// appears within [`PRIMARY_TIMEOUT`].
    pub fn wait_for_primary(&self) -> usize {
        let (rank, _) = self
            .rt
            .block_on(self.cluster.wait_for_primary(PRIMARY_TIMEOUT))
            .unwrap_or_else(|e| panic!("{e}"));
        rank
    }

    pub fn addrs(&self) -> Vec<String> {
        self.cluster.addrs()
    }

    /// [`program`] with the environment a client of this cluster needs: `REPLIKV_CA`, and
    /// the admin user in `REPLIKV_USER` and `REPLIKV_TOKEN` (docs/security.md).
    pub fn command(&self, path: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = program(path);
        command.envs(
            self.cluster
                .client_env(self.cluster.admin_credentials().as_ref()),
        );
        // A -1 says why on stderr, which a failed test shows.
        command.env("KV739_DEBUG", "1");
        command
    }

    /// A plain Rust client on the same cluster, to look at the store from outside kv739.
    pub fn client(&self) -> BlockingClient {
        let client = BlockingClient::connect(
            self.cluster
                .client_config()
                .with_request_timeout(Duration::from_secs(10)),
        )
        .expect("build a client");
        client
            .wait_for_any(Duration::from_secs(10))
            .expect("some server answers");
        client
    }
}

/// The directory holding the `libkv739.so` built from this very source.
///
/// That is `target/<profile>/deps`, next to the test binary: when the library is built as
/// a dependency of the tests, rustc writes the cdylib there together with the rlib the
/// tests link, but cargo only copies it up to `target/<profile>` on a plain `cargo build`.
/// The copy in `target/<profile>` may therefore be stale, and testing it would test old
/// code.
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .expect("test binary has a directory")
        .to_path_buf();
    assert!(
        dir.join("libkv739.so").is_file(),
        "libkv739.so not found in {}",
        dir.display()
    );
    dir
}

/// A command for a program that loads `libkv739.so` (a C test program, the driver,
/// python3).
///
/// `cargo test` puts `target/<profile>` first in `LD_LIBRARY_PATH`, and that directory may
/// hold a stale `libkv739.so` from an earlier `cargo build`; the dynamic loader would take
/// it over the rpath the programs are linked with. Without the variable, each program loads
/// the library it was linked against, as it would for a user.
pub fn program(path: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(path);
    command.env_remove("LD_LIBRARY_PATH");
    command
}

/// `client/ffi`.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles C `sources` against the kv739 header and shared library into `out_dir/name`,
/// with the same warnings-as-errors flags users are told to use.
pub fn compile_c(name: &str, sources: &[PathBuf], out_dir: &Path) -> PathBuf {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    compile(&cc, &["-std=c11"], name, sources, out_dir)
}

/// Compiles C++ `sources` as [`compile_c`] does C, with g++ (or `$CXX`) and `extra` flags.
pub fn compile_cxx(name: &str, sources: &[PathBuf], extra: &[&str], out_dir: &Path) -> PathBuf {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".to_string());
    let mut flags = vec!["-std=c++17"];
    flags.extend_from_slice(extra);
    compile(&cxx, &flags, name, sources, out_dir)
}

fn compile(
    compiler: &str,
    flags: &[&str],
    name: &str,
    sources: &[PathBuf],
    out_dir: &Path,
) -> PathBuf {
    let lib = lib_dir();
    let exe = out_dir.join(name);
    let output = Command::new(compiler)
        .args(flags)
        .args(["-Wall", "-Wextra", "-Werror", "-pthread"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg("-I")
        .arg(crate_dir().join("tests/c"))
        .args(sources)
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib)
        .arg("-lkv739")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .output()
        .unwrap_or_else(|e| panic!("run {compiler}: {e}"));
    assert!(
        output.status.success(),
        "compiling {name} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    exe
}

/// A test program from `tests/c/<name>.c`.
pub fn compile_test_program(name: &str, out_dir: &Path) -> PathBuf {
    compile_c(
        name,
        &[crate_dir().join(format!("tests/c/{name}.c"))],
        out_dir,
    )
}

/// Asserts a C test program passed, showing everything it printed if not.
pub fn assert_program_passed(name: &str, output: &Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(&format!("{name}: all checks passed")),
        "{name} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
}

/// Whether `python3` can be run here.
pub fn have_python3() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A scratch directory removed at the end of the test.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kv739-test-")
        .tempdir()
        .expect("temp dir")
}
