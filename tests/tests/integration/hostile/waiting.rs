//! Fair limits on waiting Leases: one grant's or one connection's flood leaves room for others.

use super::*;

fn waiting_lease(queue: &str) -> pb::LeaseRequest {
    pb::LeaseRequest {
        queue: queue.into(),
        max_items: 1,
        max_wait: Some(duration(Duration::from_secs(30))),
        ..Default::default()
    }
}

/// Starts waiting Leases on `queue`: `per_connection` on each of `connections` connections.
async fn flood(
    server: &Server,
    token: &str,
    queue: &str,
    connections: usize,
    per_connection: usize,
) -> Vec<JoinHandle<wq_client::Result<pb::LeaseResponse>>> {
    let mut calls = Vec::new();
    for _ in 0..connections {
        let client = server.client(token).await;
        for _ in 0..per_connection {
            let client = client.clone();
            let request = waiting_lease(queue);
            calls.push(tokio::spawn(async move { client.lease(request).await }));
        }
    }
    calls
}

/// Waits until `refused` of `calls` have ended (each with RESOURCE_EXHAUSTED naming `flag`),
/// then checks that the others still wait.
async fn expect_refused(
    calls: &mut Vec<JoinHandle<wq_client::Result<pb::LeaseResponse>>>,
    refused: usize,
    flag: &str,
) {
    eventually(
        &format!("{refused} waiting Leases are refused"),
        async || calls.iter().filter(|c| c.is_finished()).count() >= refused,
    )
    .await;
    let mut waiting = Vec::new();
    for call in calls.drain(..) {
        if call.is_finished() {
            let error = call.await.expect("the task").expect_err("refused");
            assert_eq!(error.code(), Some(Code::ResourceExhausted), "{error}");
            assert!(error.to_string().contains(flag), "{error}");
        } else {
            waiting.push(call);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        waiting.iter().all(|c| !c.is_finished()),
        "the admitted Leases keep waiting"
    );
    *calls = waiting;
}

/// One grant's flood of waiting Leases, up to the broker's own limit, stops at its grant's
/// share: another grant's waiting Lease is admitted and gets its item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_grants_flood_of_waiting_leases_leaves_room_for_another_grant() {
    let redis = redis().await;
    let server = Server::start(
        &redis.url(),
        &[
            ("WQ_MAX_WAITING_LEASES", "30"),
            ("WQ_MAX_WAITING_LEASES_PER_GRANT", "10"),
            ("WQ_MAX_WAITING_LEASES_PER_CONNECTION", "4"),
        ],
    )
    .await;
    let mut flood = flood(&server, WORKER, "batch-1", 8, 4).await;
    expect_refused(&mut flood, 22, "--max-waiting-leases-per-grant 10").await;
    let other = server.client(OTHER_WORKER).await;
    let waiting = tokio::spawn(async move { other.lease(waiting_lease("payroll")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the other grant's Lease waits");
    server
        .client(ADMIN)
        .await
        .enqueue("payroll", vec![item("for the other grant")])
        .await
        .expect("admin enqueues");
    let reply = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting Lease returns")
        .expect("the task")
        .expect("the other grant's waiting Lease is admitted");
    assert_eq!(reply.items.len(), 1);
    drop(flood);
}

/// One connection's flood stops at its connection's share: the same grant on another
/// connection is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connections_flood_of_waiting_leases_leaves_room_for_another_connection() {
    let redis = redis().await;
    let server = Server::start(
        &redis.url(),
        &[
            ("WQ_MAX_WAITING_LEASES", "12"),
            ("WQ_MAX_WAITING_LEASES_PER_CONNECTION", "4"),
        ],
    )
    .await;
    let mut flood = flood(&server, WORKER, "batch-1", 1, 12).await;
    expect_refused(&mut flood, 8, "--max-waiting-leases-per-connection 4").await;
    let mut second = self::flood(&server, WORKER, "batch-1", 1, 4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        second.iter().all(|c| !c.is_finished()),
        "another connection of the same grant is admitted"
    );
    server
        .client(ADMIN)
        .await
        .enqueue("batch-1", (0..8).map(|i| item(&i.to_string())).collect())
        .await
        .expect("admin enqueues");
    for call in flood.drain(..).chain(second.drain(..)) {
        let reply = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the waiting Lease returns")
            .expect("the task")
            .expect("an admitted Lease succeeds");
        assert_eq!(reply.items.len(), 1);
    }
}
