//! A driver given a single server learns the cluster's members from it and survives that
//! server's death; C++ drivers compile with g++ against every header name the kv739 API
//! goes by.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::{compile_cxx, crate_dir, line_channel, scratch, ChildGuard, Fixture};

#[test]
fn a_cxx_driver_given_one_server_survives_its_death() {
    let dir = scratch();
    let source = crate_dir().join("tests/cpp/one_address.cpp");
    for (exe_name, header) in [
        ("one_address_kv739", "kv739.h"),
        ("one_address_739kv", "739kv.h"),
    ] {
        let mut fixture = Fixture::start(3);
        let define = format!("-DKV739_HEADER=\"{header}\"");
        let exe = compile_cxx(
            exe_name,
            std::slice::from_ref(&source),
            &[&define],
            dir.path(),
        );
        // The server the driver is given is the serving primary: its death also takes the
        // cluster through a view change.
        let primary = fixture.wait_for_primary();
        let mut child = ChildGuard::new(
            fixture
                .command(&exe)
                .arg(&fixture.addrs()[primary])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn one_address"),
        );
        let lines = line_channel(child.child().stdout.take().expect("stdout"));
        let ready = lines.recv_timeout(Duration::from_secs(30));
        assert_eq!(
            ready.as_deref(),
            Ok("ready"),
            "{header}: the driver did not get ready"
        );

        fixture
            .cluster
            .kill(primary)
            .expect("kill the driver's server");
        let mut stdin = child.child().stdin.take().expect("stdin");
        writeln!(stdin, "go").expect("tell the driver to go");
        drop(stdin);
        let verdict = lines.recv_timeout(Duration::from_secs(60));
        let status = child.wait(Duration::from_secs(10));
        assert_eq!(
            verdict.as_deref(),
            Ok("one_address: all checks passed"),
            "{header}: the driver failed ({status})"
        );
        assert!(status.success(), "{header}: {status}");
    }
}
