//! The `wq-server` binary itself: `--dev` brings up a private Redis and serves; SIGTERM stops it
//! cleanly with exit status 0; bad flags fail with one clear message.

use std::{process::Stdio, time::Duration};

use tokio::process::Command;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use wq_proto::v1 as pb;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

#[tokio::test]
async fn dev_mode_serves_and_sigterm_exits_zero() {
    assert!(
        std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok(),
        "{}",
        wq_server::dev::INSTALL_HINT
    );
    let address = format!("127.0.0.1:{}", free_port());
    let mut server = Command::new(env!("CARGO_BIN_EXE_wq-server"))
        .args(["--dev", "--listen", &address])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("wq-server starts");

    let url = format!("http://{address}");
    let mut serving = false;
    for _ in 0..200 {
        if let Ok(channel) = tonic::transport::Channel::from_shared(url.clone())
            .expect("valid url")
            .connect()
            .await
        {
            let mut health = HealthClient::new(channel);
            if let Ok(reply) = health
                .check(HealthCheckRequest {
                    service: "wq.v1.WorkQueueService".into(),
                })
                .await
                && reply.into_inner().status() == ServingStatus::Serving
            {
                serving = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(serving, "wq-server --dev reports SERVING within 10 s");

    let mut client = pb::work_queue_service_client::WorkQueueServiceClient::connect(url)
        .await
        .expect("connect");
    let reply = client
        .enqueue(pb::EnqueueRequest {
            queue: "dev".into(),
            items: vec![pb::EnqueueItem::default()],
        })
        .await
        .expect("enqueue through the dev broker")
        .into_inner();
    assert_eq!(reply.results.len(), 1);

    let pid = server.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("exits within 10 s of SIGTERM")
        .expect("exit status");
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    let mut log = String::new();
    if let Some(mut stderr) = server.stderr.take() {
        use tokio::io::AsyncReadExt as _;
        let _ = stderr.read_to_string(&mut log).await;
    }
    assert!(
        log.contains("shutting down"),
        "graceful shutdown is logged:\n{log}"
    );
}

#[tokio::test]
async fn bad_flags_fail_with_one_clear_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_wq-server"))
        .args(["--key-prefix", "a{b}", "--listen", "127.0.0.1:0"])
        .output()
        .await
        .expect("wq-server runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--key-prefix"), "{stderr}");
}
