//! The deployment files are valid: every Kubernetes manifest of deploy/k8s/ against the
//! Kubernetes API schemas (kubernetes-validate, strict: unknown fields are errors), offline,
//! with a deliberately broken copy rejected to show the check bites; and deploy/compose.yaml
//! as docker compose reads it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use replikv_deploytest::docker::{self, check, repo_dir};
use replikv_testkit::process::{profile_dir, run_bounded};

/// The validator, pinned: its schemas are those of the Kubernetes release it names.
const VALIDATOR: &str = "kubernetes-validate==1.37.0";
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(120);

/// `kubernetes-validate`, installed into a virtual environment under target/ on first use
/// (from PyPI; the schemas ship inside the package, so validating needs no network). The
/// tests of this file run in parallel, so the install happens once, behind a `OnceLock`; an
/// install cut short earlier is redone from scratch (`venv --clear`).
fn validator() -> PathBuf {
    static VALIDATOR_BIN: OnceLock<PathBuf> = OnceLock::new();
    VALIDATOR_BIN.get_or_init(install_validator).clone()
}

fn install_validator() -> PathBuf {
    let target = profile_dir()
        .parent()
        .expect("target/<profile> has a parent")
        .to_path_buf();
    let venv = target.join("kubernetes-validate-venv");
    let bin = venv.join("bin/kubernetes-validate");
    if !bin.is_file() {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let made = Command::new(&python)
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status();
        assert!(
            made.is_ok_and(|s| s.success()),
            "cannot make a Python virtual environment with `{python} -m venv` \
             (install python3 and python3-venv) to validate the Kubernetes manifests"
        );
        check(
            Command::new(venv.join("bin/pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                VALIDATOR,
            ]),
            INSTALL_TIMEOUT,
        );
    }
    bin
}

fn manifests() -> Vec<PathBuf> {
    let dir = repo_dir().join("deploy/k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = run_bounded(
        Command::new(validator())
            .args(["--strict", "--no-warn"])
            .args(files),
        VALIDATE_TIMEOUT,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_kubernetes_manifest_matches_the_api_schemas() {
    let files = manifests();
    let names: Vec<_> = files.iter().filter_map(|p| p.file_name()).collect();
    for expected in ["statefulset.yaml", "services.yaml", "pdb.yaml"] {
        assert!(
            names.iter().any(|n| *n == expected),
            "deploy/k8s/{expected} is missing: {names:?}"
        );
    }
    let (ok, text) = validate(&files);
    assert!(ok, "deploy/k8s does not validate:\n{text}");
    for kind in [
        "statefulset/replikv",
        "service/replikv-peers",
        "service/replikv",
    ] {
        assert!(text.contains(kind), "{kind} was not validated:\n{text}");
    }
}

/// The same check on broken copies of the StatefulSet fails, naming the fault: a wrong
/// type, and a field the API does not have.
#[test]
fn a_broken_manifest_is_rejected() {
    let original = repo_dir().join("deploy/k8s/statefulset.yaml");
    let text = std::fs::read_to_string(&original).expect("statefulset.yaml");
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, from, to, says) in [
        (
            "wrong-type.yaml",
            "replicas: 3",
            "replicas: three",
            "replicas",
        ),
        (
            "unknown-field.yaml",
            "podManagementPolicy: Parallel",
            "podManagementPolicy: Parallel\n  podManagmentPolicy: Parallel",
            "podManagmentPolicy",
        ),
    ] {
        assert!(
            text.contains(from),
            "statefulset.yaml no longer has {from:?}"
        );
        let broken: &Path = &dir.path().join(name);
        std::fs::write(broken, text.replacen(from, to, 1)).expect("write the broken copy");
        let (ok, out) = validate(&[broken.to_path_buf()]);
        assert!(!ok, "{name} validated although broken:\n{out}");
        assert!(
            out.contains(says),
            "{name}: the error does not name {says}:\n{out}"
        );
    }
}

#[test]
fn the_compose_file_is_valid_and_names_three_servers() {
    if !docker::available() {
        return;
    }
    let compose = |args: &[&str]| {
        let mut c = if Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            let mut c = Command::new("docker");
            c.arg("compose");
            c
        } else {
            Command::new("docker-compose")
        };
        c.arg("-f")
            .arg(repo_dir().join("deploy/compose.yaml"))
            .args(args)
            .env("REPLIKV_CERTS", "/nonexistent");
        check(&mut c, VALIDATE_TIMEOUT)
    };
    compose(&["config", "--quiet"]);
    let services = compose(&["config", "--services"]);
    let mut services: Vec<&str> = services.lines().collect();
    services.sort();
    assert_eq!(services, ["replikv-0", "replikv-1", "replikv-2"]);
}
