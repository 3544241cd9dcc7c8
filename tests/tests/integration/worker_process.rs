//! `wq-worker` as a pod running real commands: what a command can do to the worker (flood its
//! stderr, leave a background process holding its pipes, start children that ignore SIGTERM,
//! read the environment, or the worker's token through /proc) and signals that come before the
//! broker is reachable.

use std::{
    ffi::OsStr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};
use tonic::transport::ClientTlsConfig;
use wq_tests::{pki::Pki, *};

/// `wq-worker` on `queue` with `extra` arguments and `env`, waiting 500 ms per Lease.
fn worker(broker: &Broker, queue: &str, extra: &[&str], env: &[(&str, &OsStr)]) -> Child {
    let mut args = vec!["--max-wait", "500ms"];
    args.extend_from_slice(extra);
    spawn_worker(broker, queue, &args, env)
}

/// Waits until `file` holds a pid, and returns it.
async fn pid_in(file: &Path) -> u32 {
    let mut pid = None;
    eventually("the command writes its pid", async || {
        pid = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.trim().parse().ok());
        pid.is_some()
    })
    .await;
    pid.unwrap_or_default()
}

/// Fields of `/proc/<pid>/stat` after the command name, which may itself hold spaces.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = stat.rsplit_once(')')?;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// Whether `pid` is a running process (a zombie has ended; only its parent has not reaped it).
fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields.first().is_some_and(|state| state != "Z"))
}

/// The running processes of process group `group`.
fn group_members(group: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // State, parent, group.
            stat_fields(*pid).is_some_and(|f| {
                f.first().is_some_and(|s| s != "Z") && f.get(2) == Some(&group.to_string())
            })
        })
        .collect()
}

/// Ends a process the test started through a command, if it is still there.
fn kill_leftover(pid: u32) {
    if alive(pid) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

#[tokio::test]
async fn a_flood_on_stderr_is_kept_as_its_tail_without_being_held_in_memory() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        vec![pb::EnqueueItem {
            max_attempts: 1,
            ..item_with_id("noisy", "x")
        }],
    )
    .await;
    const FLOOD_MIB: u64 = 64;
    let script = format!(
        "head -c {} /dev/zero | tr '\\0' x >&2; echo the real reason >&2; exit 1",
        FLOOD_MIB << 20
    );
    // Until sealed: the worker stays up after the item, so its peak memory can be read.
    let child = worker(
        &broker,
        "q",
        &["--until", "sealed", "--", "sh", "-c", &script],
        &[],
    );
    let pid = child.id().expect("running");
    eventually("the item is dead", async || {
        state(&mut client, "q").await.dead == 1
    })
    .await;
    let peak_kib = proc_status_kib(pid, "VmHWM:");
    signal(pid, "-TERM");
    finish_ok(child, Duration::from_secs(10)).await;
    // The worker alone needs well under this; holding the flood would need all of it.
    assert!(
        peak_kib < (FLOOD_MIB << 10) / 2,
        "peak RSS {peak_kib} KiB for a {FLOOD_MIB} MiB stderr"
    );
    let dead = get_item(&mut client, "q", "noisy").await.expect("kept");
    let error = dead.last_error;
    assert!(
        error.starts_with("command exit status: 1: xxx"),
        "{}",
        &error[..error.len().min(80)]
    );
    // The broker keeps 4 KiB of error text: the end of stderr must be within them.
    assert!(
        error.ends_with("xxxthe real reason"),
        "…{}",
        &error[error.len().saturating_sub(80)..]
    );
    assert!(error.len() <= 4096, "{}", error.len());
}

#[tokio::test]
async fn a_command_that_leaves_a_background_process_completes_when_it_exits() {
    let redis = redis().await;
    let config = BrokerConfig {
        completed_retention: Duration::from_secs(60),
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item_with_id("daemon", "x")]).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let pid_file = dir.path().join("background");
    // The background sleep inherits stdout and stderr and keeps them open for a minute.
    let child = worker(
        &broker,
        "q",
        &[
            "--",
            "sh",
            "-c",
            r#"sleep 60 & echo $! > "$PID_FILE"; echo started"#,
        ],
        &[("PID_FILE", pid_file.as_os_str())],
    );
    // Well under the background process's minute, even on a loaded machine.
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await;
    let background = pid_in(&pid_file).await;
    kill_leftover(background);
    let output = output
        .expect("the worker exits long before the background process does")
        .expect("the worker's output");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("completed=1"), "{err}");
    let done = get_item(&mut client, "q", "daemon")
        .await
        .expect("retained");
    assert_eq!(
        done.result.as_ref(),
        b"started\n",
        "what it wrote before exiting"
    );
}

#[tokio::test]
async fn shutdown_kills_the_commands_whole_process_group() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item_with_id("stuck", "x")]).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (leader_file, grandchild_file) = (dir.path().join("leader"), dir.path().join("grandchild"));
    // The shell and its child ignore SIGTERM: only SIGKILL stops them. The grandchild writes its
    // own pid (`exec` keeps it for the sleep).
    let script =
        r#"trap "" TERM; echo $$ > "$LEADER"; sh -c 'echo $$ > "$GRANDCHILD"; exec sleep 40'"#;
    let child = worker(
        &broker,
        "q",
        &["--shutdown-grace", "300ms", "--", "sh", "-c", script],
        &[
            ("LEADER", leader_file.as_os_str()),
            ("GRANDCHILD", grandchild_file.as_os_str()),
        ],
    );
    let leader = pid_in(&leader_file).await;
    let grandchild = pid_in(&grandchild_file).await;
    assert!(alive(grandchild));
    signal(child.id().expect("running"), "-TERM");
    let err = finish_ok(child, Duration::from_secs(10)).await;
    assert!(err.contains("released=1"), "{err}");
    // Killed processes are reaped by whoever inherits them; give that a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(grandchild) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let survived = alive(grandchild);
    let members = group_members(leader);
    kill_leftover(grandchild);
    assert!(!survived, "the grandchild outlived the worker");
    assert!(
        members.is_empty(),
        "left in the command's group: {members:?}"
    );
    let s = state(&mut client, "q").await;
    assert_eq!((s.ready, s.leased), (1, 0));
}

fn mutual_tls_broker_config(pki: &Pki) -> BrokerConfig {
    let mut config = test_config();
    config.security.tls_cert = Some(pki.path("server.pem"));
    config.security.tls_key = Some(pki.path("server-key.pem"));
    config.security.tls_client_ca = Some(pki.path("ca.pem"));
    config
}

fn harness_tls(pki: &Pki) -> ClientTlsConfig {
    let read = |file: &str| std::fs::read(pki.path(file)).expect("a PEM file");
    ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read("ca.pem")))
        .identity(tonic::transport::Identity::from_pem(
            read("client.pem"),
            read("client-key.pem"),
        ))
}

#[tokio::test]
async fn commands_get_the_item_variables_but_not_the_workers_credentials() {
    const TOKEN: &str = "a-secret-token-0123456789";
    let redis = redis().await;
    let pki = Pki::generate();
    let config = BrokerConfig {
        completed_retention: Duration::from_secs(60),
        ..mutual_tls_broker_config(&pki)
    };
    let broker = Broker::start_tls(&redis.url(), config, harness_tls(&pki)).await;
    let mut client = broker.client().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).expect("writing the token file");
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client-key.pem"),
    );
    let tls = [
        ("WQ_CA_FILE", ca.as_os_str()),
        ("WQ_CLIENT_CERT", cert.as_os_str()),
        ("WQ_CLIENT_KEY", key.as_os_str()),
    ];
    // The token straight from the environment, then from a file (the two conflict).
    for (id, token) in [
        ("by-value", ("WQ_TOKEN", OsStr::new(TOKEN))),
        ("by-file", ("WQ_TOKEN_FILE", token_file.as_os_str())),
    ] {
        enqueue(&mut client, "q", vec![item_with_id(id, "x")]).await;
        let mut env = tls.to_vec();
        env.push(token);
        let child = worker(&broker, "q", &["--", "env"], &env);
        let log = finish_ok(child, Duration::from_secs(20)).await;
        assert!(log.contains("completed=1"), "{log}");
        let item = get_item(&mut client, "q", id).await.expect("retained");
        let printed = String::from_utf8_lossy(&item.result);
        let vars: Vec<&str> = printed.lines().collect();
        for wanted in [
            "WQ_QUEUE=q".to_owned(),
            format!("WQ_ITEM_ID={id}"),
            "WQ_ATTEMPT=1".to_owned(),
        ] {
            assert!(
                vars.contains(&wanted.as_str()),
                "{wanted} missing: {printed}"
            );
        }
        assert!(
            !printed.contains(TOKEN),
            "the token reached the command: {printed}"
        );
        for secret in [
            "WQ_TOKEN=",
            "WQ_TOKEN_FILE=",
            "WQ_CA_FILE=",
            "WQ_CLIENT_CERT=",
            "WQ_CLIENT_KEY=",
        ] {
            assert!(
                !vars.iter().any(|var| var.starts_with(secret)),
                "{secret} reached the command: {printed}"
            );
        }
    }
}

#[tokio::test]
async fn sigterm_while_the_broker_is_unreachable_exits_zero_at_once() {
    // A port nobody listens on: bound, then freed.
    let port = free_port();
    let mut child = Command::new(binary("wq-worker"))
        .args([
            "--broker",
            &format!("http://127.0.0.1:{port}"),
            "--queue",
            "q",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wq-worker starts");
    let mut log = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut seen = String::new();
    let retrying = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = log.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("retrying") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        retrying.ok(),
        Some(true),
        "the worker retries connecting: {seen}"
    );
    let signalled = Instant::now();
    signal(child.id().expect("running"), "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("the worker exits within 5 s of SIGTERM")
        .expect("its status");
    while let Ok(Some(line)) = log.next_line().await {
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(status.success(), "{status:?}: {seen}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
    assert!(
        seen.contains("stopped before reaching the broker"),
        "{seen}"
    );
}

/// Whether this test runs as root (whose CAP_SYS_PTRACE reads any process's /proc files).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// A command running as the worker's own user tries to read the worker's token through /proc:
/// its environment and its memory. The worker is non-dumpable, so both are refused; the command
/// itself is dumpable again (a child of it reads its environment), as `execve` resets the flag.
#[tokio::test]
async fn a_command_of_the_same_user_cannot_read_the_workers_token_from_proc() {
    const TOKEN: &str = "worker-secret-0123456789abcdef";
    let redis = redis().await;
    let config = BrokerConfig {
        completed_retention: Duration::from_secs(60),
        ..test_config()
    };
    let broker = Broker::start_with(&redis.url(), config).await;
    let mut client = broker.client().await;
    enqueue(&mut client, "q", vec![item_with_id("proc", "x")]).await;
    // $PPID is the worker. The last line reads the command's own environment from a child.
    let script = r#"
        tr '\0' '\n' < /proc/$PPID/environ || echo environ-refused
        (exec 3< /proc/$PPID/mem) 2>/dev/null && echo mem-opened || echo mem-refused
        echo "own: $(sh -c 'tr "\0" "\n" < /proc/$PPID/environ' | grep '^WQ_ITEM_ID=')"
    "#;
    let worker_args = [
        "--broker",
        &broker.url(),
        "--queue",
        "q",
        "--",
        "sh",
        "-c",
        script,
    ];
    // As root the command would read everything anyway (CAP_SYS_PTRACE), as it would in a pod
    // running as root: run the worker as nobody, without capabilities, like a restricted pod.
    let mut command = if running_as_root() {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--",
            ])
            .arg(binary("wq-worker"));
        command
    } else {
        Command::new(binary("wq-worker"))
    };
    let child = command
        .args(worker_args)
        .env("WQ_TOKEN", TOKEN)
        .current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wq-worker starts");
    let log = finish_ok(child, Duration::from_secs(20)).await;
    assert!(log.contains("completed=1"), "{log}");
    let item = get_item(&mut client, "q", "proc").await.expect("retained");
    let printed = String::from_utf8_lossy(&item.result);
    assert!(
        !printed.contains(TOKEN),
        "the command read the token: {printed}"
    );
    assert!(printed.contains("environ-refused"), "{printed}");
    assert!(printed.contains("mem-refused"), "{printed}");
    assert!(
        printed.contains("own: WQ_ITEM_ID=proc"),
        "the command itself is dumpable: {printed}"
    );
}
