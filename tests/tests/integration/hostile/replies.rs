//! Replies a slow reader leaves unsent: they are charged while they wait to be sent, so new
//! calls are refused once the budget is full, and the Lease items of replies never delivered
//! go back to their queue when the caller goes away.

use prost::Message as _;

use super::*;

const LEASE: &str = "/wq.v1.WorkQueueService/Lease";
const QUEUE: &str = "batch-replies";

/// With a worker's token, three connections that never open their receive window each make
/// twelve Leases, one after another, of four 960 KiB items (3.8 MiB replies, under
/// `--max-reply-bytes`), twice a 48 MiB budget in all. The unsent replies hold no more than
/// the budget plus one reply per connection; the Leases past it, and another caller's call,
/// are refused with RESOURCE_EXHAUSTED; when the readers go away their items are released
/// (not delivered) and the broker serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_replies_are_charged_and_calls_past_the_budget_are_refused() {
    const CONNECTIONS: usize = 3;
    const CALLS: usize = 12;
    const ITEMS_PER_LEASE: usize = 4;
    const BUDGET_MIB: usize = 48;
    let redis = redis().await;
    let budget = (BUDGET_MIB * MIB).to_string();
    let server = Server::start(&redis.url(), &[("WQ_MAX_BUFFERED_BYTES", &budget)]).await;
    let producer = server.client(PRODUCER).await;
    let total = CONNECTIONS * CALLS * ITEMS_PER_LEASE;
    let payload = Bytes::from(vec![7u8; 960 * KIB]);
    for _ in 0..total / 4 {
        let items = (0..4)
            .map(|_| pb::EnqueueItem {
                payload: payload.clone(),
                ..pb::EnqueueItem::default()
            })
            .collect();
        producer.enqueue(QUEUE, items).await.expect("enqueued");
    }
    let request = pb::LeaseRequest {
        queue: QUEUE.into(),
        max_items: u32::try_from(ITEMS_PER_LEASE).expect("small"),
        ..pb::LeaseRequest::default()
    }
    .encode_to_vec();
    let before = server.memory_kib("VmRSS");
    let attack = futures_util::future::join_all(
        (0..CONNECTIONS)
            .map(|_| open_calls(server.address, LEASE, Some(WORKER), &request, CALLS, 0)),
    )
    .await;
    let grown = usize::try_from(server.memory_kib("VmRSS").saturating_sub(before) / 1024)
        .unwrap_or(usize::MAX);
    let kept: usize = attack.iter().map(|a| a.kept.len()).sum();
    let refused: usize = attack
        .iter()
        .map(|a| a.refused_with(Code::ResourceExhausted))
        .sum();
    let other = server.client(PRODUCER).await;
    let meanwhile = other.queue_state(QUEUE).await;
    eprintln!(
        "hostile: {CONNECTIONS}x{CALLS} unread 3.8 MiB Lease replies: kept={kept} \
         refused={refused} rss_before={}MiB grown={grown}MiB",
        before / 1024
    );
    // The budget, each connection's window and buffers, one reply past the budget per
    // connection (a reply already produced is charged, not refused).
    let bound = BUDGET_MIB + CONNECTIONS + CONNECTIONS * 4 + SLACK_MIB;
    assert!(
        grown < bound,
        "unread replies grew the broker by {grown} MiB (bound {bound})"
    );
    assert!(refused > 0, "no Lease was refused");
    assert_eq!(
        kept + refused,
        CONNECTIONS * CALLS,
        "every Lease is answered"
    );
    assert!(
        kept * 38 <= (BUDGET_MIB + CONNECTIONS * 4) * 10,
        "{kept} replies of 3.8 MiB were kept"
    );
    let error = meanwhile.expect_err("a call while the budget is over is refused");
    assert_eq!(error.code(), Some(Code::ResourceExhausted), "{error}");
    drop(attack);
    eventually("the undelivered replies' items are released", async || {
        other.queue_state(QUEUE).await.is_ok_and(|state| {
            state.leased == 0 && state.ready == u64::try_from(total).expect("small")
        })
    })
    .await;
}
