//! The token file under hostile edits: no token in the log, and a vanished file revokes.

use super::*;

/// A token-file line with its first two fields swapped (name first, then the token) must be
/// reported by line and field only, never quoting a field: at start-up, and on reload in the
/// JSON log. With a short name the token field is too short; with a long name (up to 64
/// characters are allowed) the name field does not read as words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_with_swapped_fields_never_puts_the_token_in_the_log() {
    const SECRET: &str = "3f1c0b5e9a7d4c2e8b6a0f1d3c5e7a9b";
    for swapped in [
        format!("ops {SECRET} admin\n"),
        format!("batch-seeder-production {SECRET} admin\n"),
    ] {
        swapped_line_is_reported_without_the_token(&swapped, SECRET).await;
    }
}

async fn swapped_line_is_reported_without_the_token(swapped: &str, secret: &str) {
    let redis = redis().await;

    // At start-up: the broker refuses to start and says where the problem is.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, swapped).expect("writing the token file");
    let log = dir.path().join("start.log");
    let setup = Setup::default();
    let mut child = spawn(
        &redis.url(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &tokens,
        &log,
        &setup,
    );
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the broker exits")
        .expect("its status");
    let start_log = read(&log);
    assert!(!status.success(), "{start_log}");
    assert!(start_log.contains("line 1"), "{start_log}");
    assert!(
        !start_log.contains(secret),
        "the token is in the log: {start_log}"
    );

    // On reload: the broken file is reported once, without the token; the old tokens stay.
    let server = Server::start(&redis.url(), &[("WQ_AUTH_RELOAD", "100ms")]).await;
    std::fs::write(&server.tokens, swapped).expect("breaking the token file");
    eventually("the reload reports the broken file", async || {
        server.log().contains("invalid")
    })
    .await;
    let log = server.log();
    assert!(log.contains("line 1"), "{log}");
    assert!(!log.contains(secret), "the token is in the log: {log}");
    server
        .client(WORKER)
        .await
        .queue_state("batch-1")
        .await
        .expect("the last good tokens stay in force");
}

/// A token file that vanishes keeps its tokens for `--auth-missing-grace` (a Secret update
/// swaps a symlink), then revokes them all, logging each change once; when it is back, so are
/// its tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_token_file_revokes_every_token_after_the_grace_period() {
    let redis = redis().await;
    let server = Server::start(
        &redis.url(),
        &[("WQ_AUTH_RELOAD", "100ms"), ("WQ_AUTH_MISSING_GRACE", "3s")],
    )
    .await;
    let worker = server.client(WORKER).await;
    worker
        .queue_state("batch-1")
        .await
        .expect("the token works");
    std::fs::remove_file(&server.tokens).expect("removing the token file");
    let removed = Instant::now();
    let within_grace = worker.queue_state("batch-1").await;
    eventually("the tokens are revoked", async || {
        worker
            .queue_state("batch-1")
            .await
            .err()
            .and_then(|e| e.code())
            == Some(Code::Unauthenticated)
    })
    .await;
    let revoked_after = removed.elapsed();
    // More reloads of a missing file add nothing to the log.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = server.log();
    eprintln!("hostile: token file removed; revoked after {revoked_after:?} (grace 3s)");
    if revoked_after > Duration::from_secs(3) {
        // Only a call made well within the grace period must have been admitted.
        within_grace.expect("within the grace period the tokens stay in force");
    }
    assert!(revoked_after >= Duration::from_secs(3), "{revoked_after:?}");
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(lines("cannot read the token file"), 1, "{log}");
    assert_eq!(lines("every token is revoked"), 1, "{log}");

    std::fs::write(&server.tokens, token_table()).expect("restoring the token file");
    eventually("the restored tokens work", async || {
        worker.queue_state("batch-1").await.is_ok()
    })
    .await;
}
