//! The `wq-worker` library's `Worker` in-process, for what the binary cannot show: a handler
//! that panics.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use wq_tests::*;
use wq_worker::{Handler, LeasedItem, Outcome, Worker, WorkerConfig};

/// Panics on the item whose payload is `boom`, completes the others.
struct PanicsOnBoom;

impl Handler for PanicsOnBoom {
    async fn handle(&self, item: &LeasedItem) -> Outcome {
        assert!(item.payload.as_ref() != b"boom", "the handler met boom");
        Outcome::Complete(bytes::Bytes::new())
    }
}

/// A panic fails the attempt like an error would: the item is retried and, its attempts used
/// up, dead-lettered with the panic's message, instead of being held (and its lease extended)
/// for ever, and the worker still exits once the queue is drained.
#[tokio::test]
async fn a_panicking_handler_fails_its_attempts_and_the_worker_still_drains() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let mut boom = item_with_id("boom", "boom");
    boom.max_attempts = 2;
    enqueue(
        &mut client,
        "q",
        vec![item_with_id("a", "a"), boom, item_with_id("b", "b")],
    )
    .await;
    let library = wq_client::Client::connect(&broker.url())
        .await
        .expect("the library client connects");
    let mut config = WorkerConfig::new("q");
    config.lease_duration = Duration::from_secs(3);
    let worker = Worker::new(library, config);
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        worker.run(Arc::new(PanicsOnBoom), CancellationToken::new()),
    )
    .await
    .expect("the worker exits once the queue is drained");
    assert_eq!((summary.completed, summary.failed), (2, 2), "{summary:?}");
    let dead = get_item(&mut client, "q", "boom")
        .await
        .expect("boom is kept");
    assert_eq!(dead.state(), pb::ItemState::Dead, "{dead:?}");
    assert!(
        dead.last_error
            .contains("the handler panicked: the handler met boom"),
        "{dead:?}"
    );
    let s = state(&mut client, "q").await;
    assert_eq!((s.completed_total, s.dead, s.drained), (2, 1, true));
}
