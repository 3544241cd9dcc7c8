//! The README's two commands set a fresh machine up themselves: `scripts/system-packages.sh`
//! installs what is missing with apt-get, and only that. Run here with a PATH that lacks
//! `redis-server` and holds a recording `apt-get`, so nothing is really installed.

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use wq_tests::workspace;

fn link(dir: &Path, tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .expect("sh runs");
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    assert!(!path.is_empty(), "{tool} is on this machine");
    std::os::unix::fs::symlink(path, dir.join(tool)).expect("symlink");
}

fn run_with_path(mode: &str, tools: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    for tool in ["bash", "id", "python3"].iter().chain(tools) {
        link(dir.path(), tool);
    }
    let record = dir.path().join("apt-get.log");
    let stub = dir.path().join("apt-get");
    std::fs::write(
        &stub,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", record.display()),
    )
    .expect("stub");
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let status = Command::new(dir.path().join("bash"))
        .arg(workspace().join("scripts/system-packages.sh"))
        .arg(mode)
        .env("PATH", dir.path())
        .status()
        .expect("the script runs");
    let log = std::fs::read_to_string(&record).unwrap_or_default();
    (status.success(), log)
}

#[test]
fn the_demo_setup_installs_a_missing_redis_server_and_nothing_else() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root {
        // Without root the script goes through sudo, which this PATH lacks on purpose: it must
        // then fail with the install command instead of installing.
        let (ok, log) = run_with_path("demo", &[]);
        assert!(!ok && log.is_empty());
        return;
    }
    let (ok, log) = run_with_path("demo", &[]);
    assert!(ok);
    assert!(log.contains("install -y -qq redis-server"), "{log}");
    assert!(!log.contains("python3"), "python3 is there: {log}");
}

#[test]
fn the_demo_setup_installs_nothing_when_everything_is_there() {
    let (ok, log) = run_with_path("demo", &["redis-server"]);
    assert!(ok);
    assert!(log.is_empty(), "{log}");
}
