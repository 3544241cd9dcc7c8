//! Bad input: every rejected request gets INVALID_ARGUMENT naming the field (or NOT_FOUND /
//! FAILED_PRECONDITION), the broker keeps serving, and Redis holds exactly what it held before.

use std::time::Duration;

use tonic::Code;
use wq_tests::*;

fn d(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos })
}

#[tokio::test]
async fn rejected_requests_name_the_field_and_change_nothing() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    enqueue(
        &mut client,
        "q",
        vec![item_with_id("a", "x"), item_with_id("b", "y")],
    )
    .await;
    let live = lease(&mut client, "q", 1, Duration::from_secs(60))
        .await
        .items
        .remove(0)
        .lease_id;
    enqueue(&mut client, "other", vec![item("z")]).await;
    let foreign = lease(&mut client, "other", 1, Duration::from_secs(60))
        .await
        .items
        .remove(0)
        .lease_id;
    let before = redis_dump(&redis).await;

    let long_name = "x".repeat(129);
    let big = vec![0u8; (1 << 20) + 1];
    let many_headers: std::collections::HashMap<String, String> =
        (0..65).map(|i| (format!("h{i}"), "v".to_owned())).collect();
    let lease_req = |f: &dyn Fn(&mut pb::LeaseRequest)| {
        let mut r = pb::LeaseRequest {
            queue: "q".into(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let enq = |f: &dyn Fn(&mut pb::EnqueueItem)| {
        let mut i = item("ok");
        f(&mut i);
        pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![i],
        }
    };

    let mut cases: Vec<(&str, Code, &str, Result<(), tonic::Status>)> = Vec::new();
    macro_rules! case {
        ($name:expr, $code:expr, $field:expr, $call:expr) => {
            cases.push(($name, $code, $field, $call.await.map(|_| ())));
        };
    }
    case!(
        "empty queue",
        Code::InvalidArgument,
        "queue",
        client.enqueue(pb::EnqueueRequest {
            queue: "".into(),
            items: vec![item("x")]
        })
    );
    case!(
        "long queue",
        Code::InvalidArgument,
        "queue",
        client.queue_state(pb::QueueStateRequest {
            queue: long_name.clone()
        })
    );
    case!(
        "forbidden queue chars",
        Code::InvalidArgument,
        "queue",
        client.lease(pb::LeaseRequest {
            queue: "a{b}".into(),
            ..Default::default()
        })
    );
    case!(
        "hostile queue name",
        Code::InvalidArgument,
        "queue",
        client.queue_state(pb::QueueStateRequest {
            queue: "q}:ready\r\nFLUSHALL".into()
        })
    );
    case!(
        "no items",
        Code::InvalidArgument,
        "items",
        client.enqueue(pb::EnqueueRequest {
            queue: "q".into(),
            items: vec![]
        })
    );
    case!(
        "oversized payload",
        Code::InvalidArgument,
        "items[0].payload",
        client.enqueue(enq(&|i| i.payload = big.clone().into()))
    );
    case!(
        "id too long",
        Code::InvalidArgument,
        "items[0].id",
        client.enqueue(enq(&|i| i.id = "i".repeat(129)))
    );
    case!(
        "id with control char",
        Code::InvalidArgument,
        "items[0].id",
        client.enqueue(enq(&|i| i.id = "a\nb".into()))
    );
    case!(
        "negative delay",
        Code::InvalidArgument,
        "items[0].delay",
        client.enqueue(enq(&|i| i.delay = d(-1, 0)))
    );
    case!(
        "huge delay",
        Code::InvalidArgument,
        "items[0].delay",
        client.enqueue(enq(&|i| i.delay = d(400 * 86_400, 0)))
    );
    case!(
        "bad nanos",
        Code::InvalidArgument,
        "items[0].delay",
        client.enqueue(enq(&|i| i.delay = d(1, 2_000_000_000)))
    );
    case!(
        "far not_before",
        Code::InvalidArgument,
        "items[0].not_before",
        client.enqueue(enq(&|i| i.not_before = Some(prost_types::Timestamp {
            seconds: i64::MAX / 2,
            nanos: 0
        })))
    );
    case!(
        "too many headers",
        Code::InvalidArgument,
        "items[0].headers",
        client.enqueue(enq(&|i| i.headers = many_headers.clone()))
    );
    case!(
        "oversized header",
        Code::InvalidArgument,
        "items[0].headers",
        client.enqueue(enq(&|i| {
            i.headers.insert("k".into(), "v".repeat(17 * 1024));
        }))
    );
    case!(
        "too many lease items",
        Code::InvalidArgument,
        "max_items",
        client.lease(lease_req(&|r| r.max_items = 1001))
    );
    case!(
        "lease too short",
        Code::InvalidArgument,
        "lease_duration",
        client.lease(lease_req(&|r| r.lease_duration = d(0, 1_000_000)))
    );
    case!(
        "lease too long",
        Code::InvalidArgument,
        "lease_duration",
        client.lease(lease_req(&|r| r.lease_duration = d(13 * 3600, 0)))
    );
    case!(
        "negative lease",
        Code::InvalidArgument,
        "lease_duration",
        client.lease(lease_req(&|r| r.lease_duration = d(-5, 0)))
    );
    case!(
        "wait too long",
        Code::InvalidArgument,
        "max_wait",
        client.lease(lease_req(&|r| r.max_wait = d(61, 0)))
    );
    case!(
        "negative wait",
        Code::InvalidArgument,
        "max_wait",
        client.lease(lease_req(&|r| r.max_wait = d(0, -1)))
    );
    case!(
        "worker id too long",
        Code::InvalidArgument,
        "worker_id",
        client.lease(lease_req(&|r| r.worker_id = "w".repeat(129)))
    );
    case!(
        "malformed lease id",
        Code::InvalidArgument,
        "completions[0].lease_id",
        client.complete(pb::CompleteRequest {
            queue: "q".into(),
            completions: vec![pb::Completion {
                lease_id: "garbage!".into(),
                result: Default::default()
            }]
        })
    );
    case!(
        "second lease id bad",
        Code::InvalidArgument,
        "lease_ids[1]",
        client.release(pb::ReleaseRequest {
            queue: "q".into(),
            lease_ids: vec![live.clone(), "AAAA".into()]
        })
    );
    case!(
        "cross-queue lease id",
        Code::InvalidArgument,
        "lease_ids[0]",
        client.extend_lease(pb::ExtendLeaseRequest {
            queue: "q".into(),
            lease_ids: vec![foreign.clone()],
            lease_duration: None
        })
    );
    case!(
        "cross-queue fail",
        Code::InvalidArgument,
        "lease_id",
        client.fail(pb::FailRequest {
            queue: "q".into(),
            lease_id: foreign.clone(),
            ..Default::default()
        })
    );
    case!(
        "empty lease ids",
        Code::InvalidArgument,
        "lease_ids",
        client.release(pb::ReleaseRequest {
            queue: "q".into(),
            lease_ids: vec![]
        })
    );
    case!(
        "extend out of range",
        Code::InvalidArgument,
        "lease_duration",
        client.extend_lease(pb::ExtendLeaseRequest {
            queue: "q".into(),
            lease_ids: vec![live.clone()],
            lease_duration: d(100_000, 0)
        })
    );
    case!(
        "oversized result",
        Code::InvalidArgument,
        "completions[0].result",
        client.complete(pb::CompleteRequest {
            queue: "q".into(),
            completions: vec![pb::Completion {
                lease_id: live.clone(),
                result: big.clone().into()
            }]
        })
    );
    case!(
        "negative retry delay",
        Code::InvalidArgument,
        "retry_delay",
        client.fail(pb::FailRequest {
            queue: "q".into(),
            lease_id: live.clone(),
            retry_delay: d(-1, 0),
            ..Default::default()
        })
    );
    case!(
        "get without id",
        Code::InvalidArgument,
        "id",
        client.get_item(pb::GetItemRequest {
            queue: "q".into(),
            id: "".into()
        })
    );
    case!(
        "get unknown id",
        Code::NotFound,
        "",
        client.get_item(pb::GetItemRequest {
            queue: "q".into(),
            id: "unknown".into()
        })
    );

    for (name, code, field, result) in cases {
        let status = result.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{name}: message {:?} names {field}",
            status.message()
        );
    }
    assert_eq!(
        redis_dump(&redis).await,
        before,
        "rejected calls wrote nothing"
    );
    // Still serving, and the live lease is untouched.
    assert_eq!(
        complete(&mut client, "q", &[live]).await,
        [pb::LeaseOutcome::Ok]
    );
}

#[tokio::test]
async fn hostile_ids_stay_inside_their_queue() {
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let hostile = [
        "}:ready",
        "{other}:meta",
        "../x",
        "' or 1=1 --",
        "*",
        "ä€😀",
    ];
    let items = hostile.iter().map(|id| item_with_id(id, id)).collect();
    assert_eq!(enqueue(&mut client, "q", items).await, hostile);
    let keys = redis_keys(&redis, "*").await;
    for key in &keys {
        assert!(
            key == "wq:queues:due" || key.starts_with("wq:{q}:"),
            "key outside the queue: {key}"
        );
    }
    let leased = lease(&mut client, "q", 10, Duration::from_secs(30)).await;
    let ids: Vec<&str> = leased.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, hostile);
    assert_eq!(state(&mut client, "other").await.enqueued_total, 0);
}
