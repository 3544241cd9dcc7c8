//! Fuzzing the broker's wire input: arbitrary and malformed bytes, sent over real HTTP/2 and TCP
//! connections, never crash, hang or wedge the broker, and garbage never reaches Redis.
//!
//! 1. Protobuf bodies. Every RPC of `wq.v1.WorkQueueService` and `wq.v1.QueueAdminService`
//!    receives correctly framed gRPC messages whose bodies are (a) random bytes of 0–4 KiB,
//!    (b) realistic requests with bit flips, truncations, inserted, deleted, overwritten and
//!    duplicated bytes and fields, and (c) hand-built nasty encodings: 10- and 11-byte varints,
//!    overlong and non-canonical lengths, wrong and invalid wire types, bad tags, unbalanced and
//!    deep groups, deep nesting, invalid UTF-8, thousands of repeated entries. The oracle is prost
//!    itself: a body that does not decode as the method's request must be answered INTERNAL with
//!    prost's decode error (what tonic answers, as the gRPC status code guide asks), and a body
//!    that decodes must be answered OK or with one of the broker's documented refusals
//!    (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED). Anything else is a
//!    finding: UNKNOWN, UNAVAILABLE, a reset stream or dropped connection (which is how a
//!    panicking handler shows), or a call that does not end. Class (a) runs first and keeps only
//!    bodies that fail to decode, and Redis must be byte for byte unchanged after it. After the
//!    storm the broker still reports SERVING, an Enqueue → Lease → Complete round trip works, and
//!    it stops without error or panic.
//! 2. gRPC framing over raw HTTP/2 (the `h2` client): length prefixes longer than the body or
//!    claiming 4 GiB, the compressed flag without or with an unsupported `grpc-encoding`, flag
//!    bytes 2–255, a body in one-byte and zero-length DATA frames, no message at all, trailers
//!    only, extra messages, a wrong or missing `content-type`, wrong paths and methods, a reset
//!    mid-message. Each ends with the exact status tonic should give within a bounded time, and
//!    nothing is written to Redis.
//! 3. Raw TCP: garbage, HTTP/1.1, a truncated preface and bad frames are disconnected; silent
//!    connections (a truncated preface, a preface and nothing more, an HTTP/2 request stopped
//!    mid-message) hold up no other client, write nothing, and do not keep the broker from
//!    stopping beyond its grace period.
//!
//! Found so far: ListItems of a state with no items answers INTERNAL
//! (`list_items_of_an_empty_state_answers_an_empty_page`, ignored until the broker is fixed; the
//! storm tolerates exactly that answer meanwhile).
//!
//! Each fuzz test prints one `fuzz` line with its figures. The random choices come from a seeded
//! generator (the seed is in the line); they apply to requests that carry the run's own lease
//! ids, so a finding prints the bytes it sent. More calls, or another seed:
//!
//! ```sh
//! WQ_FUZZ_CALLS=50000 cargo test -p wq-tests --test integration fuzz -- --nocapture
//! WQ_FUZZ_SEED=<seed> cargo test -p wq-tests --test integration fuzz -- --nocapture
//! ```

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::{Buf, BufMut, Bytes};
use futures_util::{StreamExt, stream};
use prost::Message;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};
use wq_tests::{health::ServingStatus, *};

/// Random calls (classes a and b together) when `WQ_FUZZ_CALLS` is not set: with the fixed
/// class (c) about 5,000 calls, about 10 s in a debug build on a busy 2-core machine.
const DEFAULT_RANDOM_CALLS: usize = 2_400;

/// The seed when `WQ_FUZZ_SEED` is not set: a fixed one, so the default run is the same every time.
const DEFAULT_SEED: u64 = 0x5eed_f022;

/// Longest random body.
const MAX_BODY: usize = 4 * 1024;

/// Calls in flight at once, spread over [`CHANNELS`] HTTP/2 connections.
const CONCURRENCY: usize = 16;
const CHANNELS: usize = 4;

/// The deadline every fuzz call carries. A mutated Lease may ask to wait up to 60 s; the broker
/// caps the wait by the caller's deadline (documented), so such a call ends OK and empty in
/// about 2 s instead of stalling the run.
const CALL_DEADLINE: Duration = Duration::from_secs(2);

/// A call that takes longer than this has hung: well past [`CALL_DEADLINE`] and Redis timeouts.
const HANG_LIMIT: Duration = Duration::from_secs(15);

/// The queue the realistic requests name, and a second one they may seal.
const QUEUE: &str = "fuzz";
const SEALABLE_QUEUE: &str = "fuzz-sealable";

/// How tonic (through prost) words an undecodable request body.
const DECODE_ERROR: &str = "failed to decode Protobuf message: ";

/// What the broker may refuse a well-formed request with (the documented set, minus UNAVAILABLE:
/// Redis is up here, so UNAVAILABLE would be a finding).
const REFUSALS: [Code; 4] = [
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::ResourceExhausted,
];

// ---------------------------------------------------------------------------------------------
// 1. Arbitrary protobuf bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_bodies_get_documented_statuses_and_garbage_writes_nothing() {
    let started = Instant::now();
    let seed = env_or("WQ_FUZZ_SEED", DEFAULT_SEED);
    let random_calls = env_or("WQ_FUZZ_CALLS", DEFAULT_RANDOM_CALLS);
    let mut rng = StdRng::seed_from_u64(seed);
    let redis = redis().await;
    let broker = Broker::start_with(&redis.url(), fuzz_config()).await;
    let mut client = broker.client().await;

    // Live leases and stored ids, so mutated requests reach the broker's deeper paths. Leases
    // last an hour and nothing is delayed, so Redis stays still until class (b) writes.
    let ids: Vec<String> = (0..20).map(|i| format!("job-{i}")).collect();
    let items = ids.iter().map(|id| item_with_id(id, "payload")).collect();
    enqueue(&mut client, QUEUE, items).await;
    let lease_ids: Vec<String> = lease(&mut client, QUEUE, 5, Duration::from_secs(3600))
        .await
        .items
        .into_iter()
        .map(|item| item.lease_id)
        .collect();
    let methods = methods(&lease_ids);
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(broker.channel().await);
    }

    let before = redis_dump(&redis).await;
    let garbage = storm(
        &channels,
        &methods,
        garbage_bodies(&mut rng, &methods, random_calls / 3),
    )
    .await;
    assert_eq!(
        redis_dump(&redis).await,
        before,
        "undecodable bodies changed Redis"
    );
    let mutated_count = random_calls - random_calls / 3;
    let mutated = storm(
        &channels,
        &methods,
        mutated_bodies(&mut rng, &methods, mutated_count),
    )
    .await;
    let nasty = storm(&channels, &methods, nasty_bodies(&methods)).await;

    let mut all = Tally::default();
    for class in [&garbage, &mutated, &nasty] {
        all.add(class);
    }
    assert!(
        all.findings.is_empty(),
        "{} of {} calls got an answer outside the documented set (seed {seed}); first ones:\n{}",
        all.findings.len(),
        all.calls,
        all.findings
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The classes must exercise both sides of the oracle, or the run proves little.
    for (name, class) in [("mutated", &mutated), ("nasty", &nasty)] {
        assert!(
            class.decodable > class.calls / 20 && class.decodable < class.calls,
            "{name}: {} of {} bodies decode; the class should mix valid and invalid ones",
            class.decodable,
            class.calls
        );
    }
    assert!(
        mutated.statuses.get("Ok").copied().unwrap_or(0) > 0
            && mutated
                .statuses
                .get("InvalidArgument")
                .copied()
                .unwrap_or(0)
                > 0,
        "mutated requests should both succeed and be refused: {:?}",
        mutated.statuses
    );

    assert_still_serving(&broker, "after-fuzz").await;
    broker.stop().await;
    eprintln!(
        "fuzz: calls={} statuses={} elapsed={:.1}s seed={seed} garbage={} mutated={} nasty={} \
         (decodable: garbage={} mutated={} nasty={})",
        all.calls,
        counts(&all.statuses),
        started.elapsed().as_secs_f64(),
        counts(&garbage.statuses),
        counts(&mutated.statuses),
        counts(&nasty.statuses),
        garbage.decodable,
        mutated.decodable,
        nasty.decodable,
    );
}

/// Broker settings for fuzzing: [`test_config`] with a Redis timeout long enough that a storm on
/// a busy debug build never answers UNAVAILABLE, which would say nothing about input handling.
fn fuzz_config() -> BrokerConfig {
    BrokerConfig {
        redis_timeout: Duration::from_secs(5),
        ..test_config()
    }
}

/// A number from the environment, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
        Err(_) => default,
    }
}

/// One RPC to fuzz.
struct Method {
    /// The gRPC path, `/package.Service/Method`.
    path: &'static str,
    /// Whether prost decodes a body as this method's request: the oracle for the broker's answer.
    decodes: fn(&[u8]) -> bool,
    /// Realistic encoded requests, the seeds of the mutations.
    samples: Vec<Vec<u8>>,
}

fn decodes<M: Message + Default>(body: &[u8]) -> bool {
    M::decode(body).is_ok()
}

fn method<M: Message + Default>(path: &'static str, samples: &[M]) -> Method {
    Method {
        path,
        decodes: decodes::<M>,
        samples: samples.iter().map(Message::encode_to_vec).collect(),
    }
}

/// Every RPC of both services, each with a few realistic requests on [`QUEUE`] that use the live
/// `lease_ids` and the stored item ids.
fn methods(lease_ids: &[String]) -> Vec<Method> {
    let queue = || QUEUE.to_owned();
    let seconds = |seconds| Some(duration(Duration::from_secs(seconds)));
    let full_item = pb::EnqueueItem {
        payload: Bytes::from_static(b"{\"task\":\"resize\",\"size\":[640,480]}"),
        id: "job-new".into(),
        priority: 5,
        delay: seconds(1),
        not_before: None,
        max_attempts: 3,
        headers: [("trace".to_owned(), "abc123".to_owned())].into(),
    };
    let dated_item = pb::EnqueueItem {
        not_before: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        }),
        ..item("dated")
    };
    let state = |state: pb::ItemState| state as i32;
    vec![
        method(
            "/wq.v1.WorkQueueService/Enqueue",
            &[
                pb::EnqueueRequest {
                    queue: queue(),
                    items: vec![full_item, dated_item],
                },
                pb::EnqueueRequest {
                    queue: SEALABLE_QUEUE.into(),
                    items: vec![item("a"), item_with_id("job-1", "b"), item("c")],
                },
            ],
        ),
        method(
            "/wq.v1.WorkQueueService/Lease",
            &[
                pb::LeaseRequest {
                    queue: queue(),
                    max_items: 2,
                    lease_duration: seconds(60),
                    max_wait: None,
                    worker_id: "worker-1".into(),
                    return_if_drained: false,
                },
                pb::LeaseRequest {
                    queue: queue(),
                    return_if_drained: true,
                    ..Default::default()
                },
            ],
        ),
        method(
            "/wq.v1.WorkQueueService/ExtendLease",
            &[pb::ExtendLeaseRequest {
                queue: queue(),
                lease_ids: lease_ids.to_vec(),
                lease_duration: seconds(30),
            }],
        ),
        method(
            "/wq.v1.WorkQueueService/Complete",
            &[pb::CompleteRequest {
                queue: queue(),
                completions: lease_ids
                    .iter()
                    .map(|lease_id| pb::Completion {
                        lease_id: lease_id.clone(),
                        result: Bytes::from_static(b"done"),
                    })
                    .collect(),
            }],
        ),
        method(
            "/wq.v1.WorkQueueService/Fail",
            &[
                pb::FailRequest {
                    queue: queue(),
                    lease_id: lease_ids[0].clone(),
                    error: "connection refused".into(),
                    retry_delay: seconds(0),
                    dead_letter: false,
                },
                pb::FailRequest {
                    queue: queue(),
                    lease_id: lease_ids[1].clone(),
                    error: "bad input".into(),
                    retry_delay: None,
                    dead_letter: true,
                },
            ],
        ),
        method(
            "/wq.v1.WorkQueueService/Release",
            &[pb::ReleaseRequest {
                queue: queue(),
                lease_ids: lease_ids.to_vec(),
            }],
        ),
        method(
            "/wq.v1.WorkQueueService/QueueState",
            &[pb::QueueStateRequest { queue: queue() }],
        ),
        method(
            "/wq.v1.WorkQueueService/GetItem",
            &[pb::GetItemRequest {
                queue: queue(),
                id: "job-3".into(),
            }],
        ),
        method(
            "/wq.v1.QueueAdminService/ListQueues",
            &[pb::ListQueuesRequest {
                page_size: 10,
                page_token: "fuzz".into(),
            }],
        ),
        method(
            "/wq.v1.QueueAdminService/ListItems",
            &[pb::ListItemsRequest {
                queue: queue(),
                state: state(pb::ItemState::Leased),
                page_size: 5,
                page_token: String::new(),
                include_payloads: true,
            }],
        ),
        method(
            "/wq.v1.QueueAdminService/RequeueDead",
            &[
                pb::RequeueDeadRequest {
                    queue: queue(),
                    ids: vec!["job-1".into(), "job-2".into()],
                    all: false,
                },
                pb::RequeueDeadRequest {
                    queue: queue(),
                    ids: Vec::new(),
                    all: true,
                },
            ],
        ),
        method(
            "/wq.v1.QueueAdminService/PurgeQueue",
            &[pb::PurgeQueueRequest {
                queue: queue(),
                states: vec![state(pb::ItemState::Dead), state(pb::ItemState::Delayed)],
            }],
        ),
        method(
            "/wq.v1.QueueAdminService/PauseQueue",
            &[pb::PauseQueueRequest { queue: queue() }],
        ),
        method(
            "/wq.v1.QueueAdminService/ResumeQueue",
            &[pb::ResumeQueueRequest { queue: queue() }],
        ),
        method(
            "/wq.v1.QueueAdminService/SealQueue",
            &[pb::SealQueueRequest {
                queue: SEALABLE_QUEUE.into(),
            }],
        ),
        method(
            "/wq.v1.QueueAdminService/DeleteQueue",
            &[pb::DeleteQueueRequest { queue: queue() }],
        ),
    ]
}

/// One request body for one method.
struct Body {
    method: usize,
    bytes: Bytes,
}

/// Class (a): random bytes of random length, short lengths as likely as long ones. Random bytes
/// that happen to decode (the empty body, short runs) are valid requests, not garbage; they are
/// left out so the class can promise that nothing reaches Redis.
fn garbage_bodies(rng: &mut StdRng, methods: &[Method], count: usize) -> Vec<Body> {
    let mut bodies = Vec::with_capacity(count);
    while bodies.len() < count {
        let method = rng.random_range(0..methods.len());
        let len = if rng.random_bool(0.5) {
            rng.random_range(0..64)
        } else {
            rng.random_range(0..=MAX_BODY)
        };
        let mut bytes = vec![0; len];
        rng.fill(bytes.as_mut_slice());
        if !(methods[method].decodes)(&bytes) {
            bodies.push(Body {
                method,
                bytes: bytes.into(),
            });
        }
    }
    bodies
}

/// Class (b): realistic requests with one to three random mutations each.
fn mutated_bodies(rng: &mut StdRng, methods: &[Method], count: usize) -> Vec<Body> {
    (0..count)
        .map(|_| {
            let method = rng.random_range(0..methods.len());
            let samples = &methods[method].samples;
            let sample = &samples[rng.random_range(0..samples.len())];
            let donor = &methods[rng.random_range(0..methods.len())].samples[0];
            Body {
                method,
                bytes: mutate(rng, sample, donor).into(),
            }
        })
        .collect()
}

fn mutate(rng: &mut StdRng, sample: &[u8], donor: &[u8]) -> Vec<u8> {
    let mut body = sample.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        let len = body.len();
        let at = rng.random_range(0..=len);
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let bit = rng.random_range(0..len * 8);
                body[bit / 8] ^= 1 << (bit % 8);
            }
            1 => body.truncate(at),
            2 => {
                let inserted: Vec<u8> =
                    (0..rng.random_range(1..=8)).map(|_| rng.random()).collect();
                body.splice(at..at, inserted);
            }
            3 => {
                let end = rng.random_range(at..=len);
                body.drain(at..end);
            }
            4 => {
                // A copy of a stretch of the body elsewhere: fields and fragments repeated.
                let end = rng.random_range(at..=len);
                let copy = body[at..end].to_vec();
                let to = rng.random_range(0..=len);
                body.splice(to..to, copy);
            }
            5 => {
                // Every field twice: scalars take the last value, messages merge, lists grow.
                body.extend_from_slice(sample);
            }
            6 if len > 0 => {
                let interesting = [0x00, 0x01, 0x7f, 0x80, 0xff];
                body[at.min(len - 1)] = interesting[rng.random_range(0..interesting.len())];
            }
            _ => {
                // Another method's fields appended: known numbers with the wrong meaning.
                let end = rng.random_range(0..=donor.len());
                body.extend_from_slice(&donor[..end]);
            }
        }
    }
    body
}

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn key(field: u64, wire_type: u8) -> Vec<u8> {
    let mut out = Vec::new();
    varint((field << 3) | u64::from(wire_type), &mut out);
    out
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A length-delimited field holding `inner`.
fn len_field(field: u64, inner: &[u8]) -> Vec<u8> {
    let mut out = key(field, LEN);
    varint(inner.len() as u64, &mut out);
    out.extend_from_slice(inner);
    out
}

/// Class (c): hand-built encodings that stress the decoder, each sent to every method (where its
/// field numbers mean different things), and once more after a valid request of one method (so
/// valid fields are followed by junk).
fn nasty_bodies(methods: &[Method]) -> Vec<Body> {
    let mut bodies = Vec::new();
    for (index, shape) in nasty_shapes().into_iter().enumerate() {
        let after = index % methods.len();
        bodies.push(Body {
            method: after,
            bytes: concat(&[&methods[after].samples[0], &shape]).into(),
        });
        let shape = Bytes::from(shape);
        for method in 0..methods.len() {
            bodies.push(Body {
                method,
                bytes: shape.clone(),
            });
        }
    }
    bodies
}

fn nasty_shapes() -> Vec<Vec<u8>> {
    // u64::MAX (-1 as int32 or int64): the longest legal varint.
    let max_varint = concat(&[&[0xff; 9], &[0x01]]);
    let eleven_byte_varint = concat(&[&[0x80; 10], &[0x00]]);
    // Ten bytes whose last one carries more than the 64th bit.
    let overflowing_varint = concat(&[&[0xff; 9], &[0x7f]]);
    // 3, spelled in ten bytes: legal, but no encoder writes it.
    let padded_three = concat(&[&[0x83], &[0x80; 8], &[0x00]]);
    let mut shapes: Vec<Vec<u8>> = vec![Vec::new()];
    // Every field number a request message uses, with every wire type and broken payloads: wrong
    // wire types for the field's real type, lengths beyond the body, truncated values.
    for field in 1..=6 {
        let k = |wire_type| key(field, wire_type);
        let mut huge_len = k(LEN);
        varint(u64::MAX, &mut huge_len);
        let mut two_gib_len = k(LEN);
        varint(1 << 31, &mut two_gib_len);
        shapes.extend([
            concat(&[&k(VARINT), &max_varint]),
            concat(&[&k(VARINT), &eleven_byte_varint]),
            concat(&[&k(VARINT), &overflowing_varint]),
            concat(&[&k(VARINT), &[0x80]]),
            concat(&[&k(FIXED64), &[1, 2, 3, 4, 5, 6, 7, 8]]),
            concat(&[&k(FIXED64), &[1, 2, 3]]),
            concat(&[&k(FIXED32), &[0xff, 0xff, 0xff, 0x7f]]),
            concat(&[&k(FIXED32), &[1]]),
            concat(&[&huge_len, b"abc"]),
            concat(&[&two_gib_len, b"abc"]),
            concat(&[&k(LEN), &[4], b"abc"]),
            concat(&[&k(LEN), &[0]]),
            concat(&[&k(LEN), &padded_three, b"abc"]),
            k(START_GROUP),
            concat(&[&k(START_GROUP), &k(END_GROUP)]),
            concat(&[&k(START_GROUP), &key(field + 1, END_GROUP)]),
            k(END_GROUP),
            concat(&[&k(6), &[1]]),
            concat(&[&k(7), &[1]]),
            // The key itself in ten bytes.
            concat(&[&[0x80 | ((field as u8) << 3)], &[0x80; 8], &[0x00, 0x01]]),
            // Nested, with an inner length that overruns the outer one.
            len_field(field, &concat(&[&k(LEN), &[100], &len_field(field, b"x")])),
            // Nested through the field again and again: a message field holds a message whose
            // same-numbered field is a string, bytes or a scalar that receives the nesting.
            (0..50).fold(b"leaf".to_vec(), |inner, _| len_field(field, &inner)),
            // Thousands of entries: an empty message or string per entry.
            [k(LEN), vec![0]].concat().repeat(2_000),
            // A packed run of ten-byte negative numbers, a large one and a small one.
            len_field(
                field,
                &concat(&[
                    &max_varint.repeat(10),
                    &[0xff, 0xff, 0xff, 0xff, 0x07],
                    &[6],
                ]),
            ),
            // A packed run whose last number is cut off.
            len_field(field, &[0x01, 0x02, 0x80]),
        ]);
    }
    let mut max_field = Vec::new();
    varint((((1 << 29) - 1) << 3) | u64::from(VARINT), &mut max_field);
    let mut beyond_max_field = Vec::new();
    varint(((1 << 29) << 3) | u64::from(VARINT), &mut beyond_max_field);
    let groups = |depth: usize| {
        concat(&[
            &key(99, START_GROUP).repeat(depth),
            &key(99, END_GROUP).repeat(depth),
        ])
    };
    shapes.extend([
        // Field number 0, the largest legal one, and one beyond.
        vec![0x00, 0x01],
        concat(&[&max_field, &[1]]),
        concat(&[&beyond_max_field, &[1]]),
        // Unknown groups nested just inside and beyond prost's recursion limit of 100.
        groups(100),
        groups(101),
        groups(1_000),
        // The queue named twice: a valid name, then a hostile one (the last one counts).
        concat(&[&len_field(1, QUEUE.as_bytes()), &len_field(1, b"a{b}\r\n")]),
        concat(&[&len_field(1, b"a{b}\r\n"), &len_field(1, QUEUE.as_bytes())]),
        // Invalid UTF-8 in a string field, a queue name far over the limit, control characters.
        len_field(1, &[0xc3, 0x28]),
        len_field(1, &[0xed, 0xa0, 0x80]),
        len_field(1, &b"q".repeat(4_000)),
        len_field(1, b"\0\x01\x7f"),
        // A map entry (EnqueueItem.headers inside EnqueueRequest.items) without key, without
        // value, with its fields swapped, and twice with the same key.
        len_field(2, &len_field(7, &[])),
        len_field(2, &len_field(7, &len_field(2, b"v"))),
        len_field(
            2,
            &len_field(7, &concat(&[&len_field(2, b"v"), &len_field(1, b"k")])),
        ),
        len_field(
            2,
            &concat(&[
                &len_field(7, &len_field(1, b"k")),
                &len_field(7, &len_field(1, b"k")),
            ]),
        ),
        // Durations and timestamps at extremes: EnqueueItem.delay and .not_before, and the
        // durations of LeaseRequest, ExtendLeaseRequest and FailRequest.
        len_field(
            2,
            &len_field(
                4,
                &concat(&[&key(1, VARINT), &max_varint, &key(2, VARINT), &max_varint]),
            ),
        ),
        len_field(
            2,
            &len_field(
                5,
                &concat(&[
                    &key(1, VARINT),
                    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                ]),
            ),
        ),
        len_field(3, &concat(&[&key(1, VARINT), &max_varint])),
        len_field(
            4,
            &concat(&[&key(2, VARINT), &[0xff, 0xff, 0xff, 0xff, 0x07]]),
        ),
    ]);
    shapes
}

/// Sends every body, [`CONCURRENCY`] at a time, and checks each answer against the oracle.
async fn storm(channels: &[Channel], methods: &[Method], bodies: Vec<Body>) -> Tally {
    let answers: Vec<_> = stream::iter(bodies.into_iter().enumerate())
        .map(|(index, body)| {
            let channel = channels[index % channels.len()].clone();
            let path = methods[body.method].path;
            async move {
                let answer =
                    tokio::time::timeout(HANG_LIMIT, call_raw(channel, path, body.bytes.clone()))
                        .await
                        .ok();
                (body, answer)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut tally = Tally::default();
    for (body, answer) in answers {
        tally.record(&methods[body.method], &body.bytes, answer);
    }
    tally
}

/// One unary call whose request body is `body` exactly, correctly framed.
async fn call_raw(channel: Channel, path: &'static str, body: Bytes) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| Status::unknown(format!("the channel is not ready: {error}")))?;
    let mut request = tonic::Request::new(body);
    request.set_timeout(CALL_DEADLINE);
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A codec that passes message bodies through untouched, so the test chooses every byte the
/// broker's decoder sees.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        Self
    }

    fn decoder(&mut self) -> Self {
        Self
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The answers of a batch of calls.
#[derive(Debug, Default)]
struct Tally {
    calls: usize,
    /// Bodies prost decodes as the method's request: these reached the broker's own code.
    decodable: usize,
    /// Answers by status code name (`Hang` for no answer).
    statuses: BTreeMap<String, usize>,
    /// Answers outside the documented set, with the method and body to reproduce them.
    findings: Vec<String>,
}

impl Tally {
    fn record(&mut self, method: &Method, body: &[u8], answer: Option<Result<Bytes, Status>>) {
        self.calls += 1;
        let decodes = (method.decodes)(body);
        self.decodable += usize::from(decodes);
        let name = match &answer {
            None => "Hang".to_owned(),
            Some(Ok(_)) => format!("{:?}", Code::Ok),
            Some(Err(status)) => format!("{:?}", status.code()),
        };
        *self.statuses.entry(name).or_default() += 1;
        let documented = match &answer {
            None => false,
            Some(Ok(_)) => decodes,
            Some(Err(status)) if decodes => REFUSALS.contains(&status.code()),
            Some(Err(status)) => {
                status.code() == Code::Internal && status.message().starts_with(DECODE_ERROR)
            }
        };
        if !documented {
            let answer = match answer {
                None => format!("no answer within {HANG_LIMIT:?}"),
                Some(Ok(reply)) => format!("OK with {} bytes", reply.len()),
                Some(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
            };
            self.findings.push(format!(
                "{} ({} bytes, decodes: {decodes}) {}: {answer}",
                method.path,
                body.len(),
                hex(body)
            ));
        }
    }

    fn add(&mut self, other: &Self) {
        self.calls += other.calls;
        self.decodable += other.decodable;
        for (name, count) in &other.statuses {
            *self.statuses.entry(name.clone()).or_default() += count;
        }
        self.findings.extend(other.findings.iter().cloned());
    }
}

/// The first 64 bytes in hex: enough to recognise a body, and to reproduce most of them.
fn hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    for byte in bytes.iter().take(64) {
        let _ = write!(out, "{byte:02x}");
    }
    if bytes.len() > 64 {
        out.push('…');
    }
    out
}

/// `{name:count,…}`.
fn counts<K: std::fmt::Display>(counts: &BTreeMap<K, usize>) -> String {
    let inner: Vec<String> = counts.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    format!("{{{}}}", inner.join(","))
}

/// Health says SERVING and a full round trip on a fresh `queue` works.
async fn assert_still_serving(broker: &Broker, queue: &str) {
    let mut health = tonic_health_client(broker.channel().await);
    let status = health
        .check(health::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status;
    assert_eq!(
        status,
        ServingStatus::Serving as i32,
        "health after fuzzing"
    );
    let mut client = broker.client().await;
    enqueue(&mut client, queue, vec![item("still works")]).await;
    let leased = lease(&mut client, queue, 1, Duration::from_secs(30)).await;
    assert_eq!(leased.items.len(), 1, "the round trip leases its item");
    assert_eq!(leased.items[0].payload.as_ref(), b"still works");
    let lease_ids = [leased.items[0].lease_id.clone()];
    assert_eq!(
        complete(&mut client, queue, &lease_ids).await,
        [pb::LeaseOutcome::Ok]
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Malformed gRPC framing over raw HTTP/2
// ---------------------------------------------------------------------------------------------

/// A raw exchange that has not ended by then has hung.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(5);

/// What a raw HTTP/2 client sends after the request headers.
#[derive(Debug, Clone)]
enum Step {
    /// One DATA frame.
    Data(Bytes),
    /// An empty DATA frame that ends the request.
    End,
    /// A trailers frame (empty), which ends the request.
    Trailers,
    /// RST_STREAM with CANCEL.
    Reset,
}

/// How a raw HTTP/2 request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// A gRPC status, from a trailers-only response or the trailers.
    Status(Code),
    /// A response that is not HTTP 200.
    Http(u16),
    /// A 200 response that ended without `grpc-status`.
    NoStatus,
    /// The stream was reset.
    Reset(h2::Reason),
    /// The connection went away.
    Closed,
}

/// One framing case: a request, what follows its headers, and the ending it must get.
struct FramingCase {
    name: String,
    request: http::Request<()>,
    steps: Vec<Step>,
    expected: Ending,
}

/// A gRPC request for `path` with the usual headers, minus or plus some.
fn grpc_request(address: SocketAddr, path: &str) -> http::request::Builder {
    http::Request::post(format!("http://{address}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
}

fn build(builder: http::request::Builder) -> http::Request<()> {
    builder
        .body(())
        .expect("the test's request headers are valid")
}

/// A gRPC frame: the compressed flag, the big-endian length, the body.
fn frame(flag: u8, declared_len: u32, body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(flag);
    out.extend_from_slice(&declared_len.to_be_bytes());
    out.extend_from_slice(body);
    out.into()
}

fn message(body: &[u8]) -> Bytes {
    frame(0, u32::try_from(body.len()).expect("small body"), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grpc_framing_gets_a_status_and_writes_nothing() {
    let started = Instant::now();
    let redis = redis().await;
    let broker = Broker::start_with(&redis.url(), fuzz_config()).await;
    let address = broker.address();
    let before = redis_dump(&redis).await;

    // Bodies that would write if the broker handled them, and a valid read-only one for the
    // cases whose framing is legal.
    let enqueue_path = "/wq.v1.WorkQueueService/Enqueue";
    let enqueue_body = pb::EnqueueRequest {
        queue: QUEUE.into(),
        items: vec![item("must not be stored")],
    }
    .encode_to_vec();
    let state_path = "/wq.v1.WorkQueueService/QueueState";
    let state_body = pb::QueueStateRequest {
        queue: QUEUE.into(),
    }
    .encode_to_vec();
    let enqueue = || grpc_request(address, enqueue_path);
    let state = || grpc_request(address, state_path);
    let data = Step::Data;
    let limit = u32::try_from(fuzz_config().max_message_bytes).expect("a limit under 4 GiB");

    let mut cases = vec![
        FramingCase {
            name: "length prefix longer than the body, then END_STREAM".into(),
            request: build(enqueue()),
            steps: vec![data(frame(0, 100, &enqueue_body)), Step::End],
            // tonic: "Unexpected EOF decoding stream."
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "length prefix of 4 GiB, stream left open".into(),
            request: build(enqueue()),
            steps: vec![data(frame(0, u32::MAX, &enqueue_body))],
            // Refused from the prefix alone, without waiting for 4 GiB: over the message limit.
            expected: Ending::Status(Code::ResourceExhausted),
        },
        FramingCase {
            name: "length prefix just over the broker's message limit, then END_STREAM".into(),
            request: build(enqueue()),
            steps: vec![data(frame(0, limit + 1, &enqueue_body)), Step::End],
            expected: Ending::Status(Code::ResourceExhausted),
        },
        FramingCase {
            name: "compressed flag without grpc-encoding".into(),
            request: build(enqueue()),
            steps: vec![
                data(frame(1, enqueue_body.len() as u32, &enqueue_body)),
                Step::End,
            ],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "compressed flag with grpc-encoding gzip, which the broker does not accept"
                .into(),
            request: build(enqueue().header("grpc-encoding", "gzip")),
            steps: vec![
                data(frame(1, enqueue_body.len() as u32, &enqueue_body)),
                Step::End,
            ],
            expected: Ending::Status(Code::Unimplemented),
        },
        FramingCase {
            name: "unknown grpc-encoding".into(),
            request: build(enqueue().header("grpc-encoding", "x-bogus")),
            steps: vec![data(message(&enqueue_body)), Step::End],
            expected: Ending::Status(Code::Unimplemented),
        },
        FramingCase {
            name: "valid body, one byte per DATA frame".into(),
            request: build(state()),
            steps: message(&state_body)
                .iter()
                .map(|byte| data(Bytes::copy_from_slice(&[*byte])))
                .chain([Step::End])
                .collect(),
            expected: Ending::Status(Code::Ok),
        },
        FramingCase {
            name: "valid body with zero-length DATA frames around every byte".into(),
            request: build(state()),
            steps: message(&state_body)
                .iter()
                .flat_map(|byte| [data(Bytes::new()), data(Bytes::copy_from_slice(&[*byte]))])
                .chain([data(Bytes::new()), Step::End])
                .collect(),
            expected: Ending::Status(Code::Ok),
        },
        FramingCase {
            name: "only zero-length DATA frames".into(),
            request: build(enqueue()),
            steps: vec![data(Bytes::new()), data(Bytes::new()), Step::End],
            // tonic: "Missing request message."
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "headers with END_STREAM, no body".into(),
            request: build(enqueue()),
            steps: Vec::new(),
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "headers then trailers, no body".into(),
            request: build(enqueue()),
            steps: vec![Step::Trailers],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "valid message ended by trailers".into(),
            request: build(state()),
            steps: vec![data(message(&state_body)), Step::Trailers],
            expected: Ending::Status(Code::Ok),
        },
        FramingCase {
            name: "half a gRPC prefix, then END_STREAM".into(),
            request: build(enqueue()),
            steps: vec![data(Bytes::from_static(&[0, 0])), Step::End],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "valid message followed by garbage bytes".into(),
            request: build(enqueue()),
            steps: vec![
                data(message(&enqueue_body)),
                data(Bytes::from_static(b"\xff\xff\xff")),
                Step::End,
            ],
            // The unary handler reads the body to its end before it runs.
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "valid message followed by an undecodable second message".into(),
            request: build(enqueue()),
            steps: vec![
                data(message(&enqueue_body)),
                data(message(&[0x0a, 0xff])),
                Step::End,
            ],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "two valid messages in a unary call".into(),
            request: build(state()),
            steps: vec![
                data(message(&state_body)),
                data(message(&state_body)),
                Step::End,
            ],
            // tonic reads and drops extra messages of a unary request; only the first is
            // handled (grpc-go would refuse the call). Harmless: QueueState only reads.
            expected: Ending::Status(Code::Ok),
        },
        // tonic routes by path alone and checks neither content-type nor method: these bodies
        // are decoded as usual (and do not decode), so a lenient server, not a crash.
        FramingCase {
            name: "wrong content-type".into(),
            request: build(
                http::Request::post(format!("http://{address}{enqueue_path}"))
                    .header("content-type", "text/plain")
                    .header("te", "trailers"),
            ),
            steps: vec![data(message(&[0x0a, 0xff])), Step::End],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "no content-type".into(),
            request: build(
                http::Request::post(format!("http://{address}{enqueue_path}"))
                    .header("te", "trailers"),
            ),
            steps: vec![data(message(&[0x0a, 0xff])), Step::End],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "GET instead of POST".into(),
            request: build(
                http::Request::get(format!("http://{address}{enqueue_path}"))
                    .header("content-type", "application/grpc"),
            ),
            steps: vec![data(message(&[0x0a, 0xff])), Step::End],
            expected: Ending::Status(Code::Internal),
        },
        FramingCase {
            name: "reset mid-message".into(),
            request: build(enqueue()),
            steps: vec![
                data(message(&enqueue_body).slice(..enqueue_body.len() / 2)),
                Step::Reset,
            ],
            // Our own reset ends the stream; the broker must neither write nor break.
            expected: Ending::Reset(h2::Reason::CANCEL),
        },
    ];
    for path in [
        "/wq.v1.WorkQueueService/NoSuchMethod",
        "/wq.v1.NoSuchService/Enqueue",
        "/wq.v1.workqueueservice/enqueue",
        "/wq.v1.WorkQueueService/Enqueue/extra",
        "/wq.v1.WorkQueueService",
        "/",
        "/%00%ff",
        &format!("/{}", "x".repeat(4_000)),
    ] {
        cases.push(FramingCase {
            name: format!("wrong path {path:.40}"),
            request: build(grpc_request(address, path)),
            steps: vec![data(message(&enqueue_body)), Step::End],
            expected: Ending::Status(Code::Unimplemented),
        });
    }
    for flag in 2..=u8::MAX {
        cases.push(FramingCase {
            name: format!("compressed flag byte {flag}"),
            request: build(enqueue()),
            steps: vec![
                data(frame(flag, enqueue_body.len() as u32, &enqueue_body)),
                Step::End,
            ],
            expected: Ending::Status(Code::Internal),
        });
    }

    let mut endings: BTreeMap<String, usize> = BTreeMap::new();
    let mut mismatches = Vec::new();
    let case_count = cases.len();
    for case in cases {
        let ending = tokio::time::timeout(
            EXCHANGE_LIMIT,
            h2_exchange(address, case.request, case.steps),
        )
        .await
        .unwrap_or_else(|_| panic!("{}: no ending within {EXCHANGE_LIMIT:?}", case.name));
        *endings.entry(format!("{ending:?}")).or_default() += 1;
        if ending != case.expected {
            mismatches.push(format!(
                "{}: expected {:?}, got {ending:?}",
                case.name, case.expected
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "framing cases ended unexpectedly:\n{}",
        mismatches.join("\n")
    );
    assert_eq!(
        redis_dump(&redis).await,
        before,
        "malformed framing changed Redis"
    );
    assert_still_serving(&broker, "after-framing").await;
    broker.stop().await;
    eprintln!(
        "fuzz framing: cases={case_count} endings={} elapsed={:.1}s",
        counts(&endings),
        started.elapsed().as_secs_f64()
    );
}

/// Sends one request with `steps` on a fresh HTTP/2 connection and reports how it ended.
async fn h2_exchange(address: SocketAddr, request: http::Request<()>, steps: Vec<Step>) -> Ending {
    let tcp = TcpStream::connect(address)
        .await
        .expect("connecting to the broker");
    let (send, connection) = h2::client::handshake(tcp)
        .await
        .expect("HTTP/2 handshake with the broker");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let ending = exchange(send, request, steps).await;
    driver.abort();
    ending
}

async fn exchange(
    send: h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    steps: Vec<Step>,
) -> Ending {
    let mut send = match send.ready().await {
        Ok(send) => send,
        Err(error) => return ending_of(&error),
    };
    let (response, mut stream) = match send.send_request(request, steps.is_empty()) {
        Ok(sent) => sent,
        Err(error) => return ending_of(&error),
    };
    for step in steps {
        let sent = match step {
            Step::Data(bytes) => stream.send_data(bytes, false),
            Step::End => stream.send_data(Bytes::new(), true),
            Step::Trailers => stream.send_trailers(http::HeaderMap::new()),
            Step::Reset => {
                stream.send_reset(h2::Reason::CANCEL);
                Ok(())
            }
        };
        // The broker may answer (and close the stream) before the request is complete.
        if sent.is_err() {
            break;
        }
    }
    match response.await {
        Ok(response) => read_ending(response).await,
        Err(error) => ending_of(&error),
    }
}

async fn read_ending(response: http::Response<h2::RecvStream>) -> Ending {
    if response.status() != http::StatusCode::OK {
        return Ending::Http(response.status().as_u16());
    }
    if let Some(code) = grpc_status(response.headers()) {
        return Ending::Status(code);
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(bytes) => {
                let _ = body.flow_control().release_capacity(bytes.len());
            }
            Err(error) => return ending_of(&error),
        }
    }
    match body.trailers().await {
        Ok(trailers) => trailers
            .as_ref()
            .and_then(grpc_status)
            .map_or(Ending::NoStatus, Ending::Status),
        Err(error) => ending_of(&error),
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(Code::from(code))
}

fn ending_of(error: &h2::Error) -> Ending {
    match error.reason() {
        Some(reason) if error.is_reset() => Ending::Reset(reason),
        _ => Ending::Closed,
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Raw TCP and silent connections
// ---------------------------------------------------------------------------------------------

/// The client connection preface of HTTP/2.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Silent connections of each kind held open while other clients work.
const SILENT_EACH: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_garbage_is_disconnected_and_silent_connections_hold_up_nobody() {
    let started = Instant::now();
    let redis = redis().await;
    // A short grace, because the stop below waits all of it out.
    let config = BrokerConfig {
        shutdown_grace: Duration::from_secs(2),
        ..fuzz_config()
    };
    let broker = Broker::start_with(&redis.url(), config.clone()).await;
    let address = broker.address();
    let before = redis_dump(&redis).await;
    let mut rng = StdRng::seed_from_u64(env_or("WQ_FUZZ_SEED", DEFAULT_SEED));
    let mut garbage = vec![0; 1024];
    rng.fill(garbage.as_mut_slice());

    // An empty SETTINGS frame, then a frame header announcing 16 MiB, over the 16 KiB default.
    let oversized_frame = concat(&[
        PREFACE,
        &[0, 0, 0, 4, 0, 0, 0, 0, 0],
        &[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1],
    ]);
    // SETTINGS, then HEADERS on stream 1 whose header block is not valid HPACK.
    let bad_hpack = concat(&[
        PREFACE,
        &[0, 0, 0, 4, 0, 0, 0, 0, 0],
        &[0, 0, 4, 1, 0x05, 0, 0, 0, 1],
        &[0xff, 0xff, 0xff, 0xff],
    ]);
    let disconnected = [
        ("random bytes", garbage.clone(), false),
        (
            "an HTTP/1.1 request",
            b"POST /wq.v1.WorkQueueService/Enqueue HTTP/1.1\r\nHost: wq\r\nContent-Length: 0\r\n\r\n"
                .to_vec(),
            false,
        ),
        ("a truncated preface, then FIN", PREFACE[..10].to_vec(), true),
        ("a preface then random bytes", concat(&[PREFACE, &garbage]), false),
        ("a frame over the size limit", oversized_frame, false),
        ("a header block that is not HPACK", bad_hpack, false),
    ];
    let mut outcomes = Vec::new();
    for (name, bytes, finish) in disconnected {
        let replied = tokio::time::timeout(EXCHANGE_LIMIT, send_raw(address, &bytes, finish))
            .await
            .unwrap_or_else(|_| panic!("{name}: the broker kept the connection open"));
        outcomes.push(format!("{name}: closed after {replied} reply bytes"));
    }

    // Silent connections in every state the broker can be left in, all at once.
    let silent_since = Instant::now();
    let mut silent_tcp = Vec::new();
    for _ in 0..SILENT_EACH {
        for start in [&PREFACE[..10], PREFACE] {
            let mut tcp = TcpStream::connect(address).await.expect("connecting");
            tcp.write_all(start).await.expect("writing the preface");
            silent_tcp.push(tcp);
        }
    }
    let half_enqueue = message(
        &pb::EnqueueRequest {
            queue: "silent".into(),
            items: vec![item("never finished")],
        }
        .encode_to_vec(),
    );
    let mut silent_h2 = Vec::new();
    for _ in 0..SILENT_EACH {
        let tcp = TcpStream::connect(address).await.expect("connecting");
        let (send, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut send = send
            .ready()
            .await
            .expect("a fresh connection takes a stream");
        let request = build(grpc_request(address, "/wq.v1.WorkQueueService/Enqueue"));
        let (response, mut stream) = send
            .send_request(request, false)
            .expect("sending request headers");
        stream
            .send_data(half_enqueue.slice(..half_enqueue.len() / 2), false)
            .expect("sending half a message");
        silent_h2.push((send, stream, response, driver));
    }
    // With all of them open, other clients are served at their usual pace.
    tokio::time::timeout(
        EXCHANGE_LIMIT,
        assert_still_serving(&broker, "beside-silence"),
    )
    .await
    .expect("the broker serves others beside silent connections");
    let still_open = count_open(&mut silent_tcp).await;
    let held_for = silent_since.elapsed();

    // Shutting down with all of them still open ends by the end of the grace period: silent
    // peers do not keep the broker alive. (Peers that never finish the HTTP/2 handshake do keep
    // it for the whole grace period, even with no call in flight; see the report line.)
    let stopping = Instant::now();
    broker.stop().await;
    let stop_time = stopping.elapsed();
    assert!(
        stop_time < config.shutdown_grace + Duration::from_secs(2),
        "stopping beside silent connections took {stop_time:?}"
    );
    // Connections tonic accepted live in their own tasks: a stopped in-process broker may leave
    // the silent ones open (the binary exits, which closes them). Reported, not asserted.
    let open_after_stop = count_open(&mut silent_tcp).await;
    drop(silent_tcp);
    for (_, _, _, driver) in &silent_h2 {
        driver.abort();
    }
    drop(silent_h2);
    let after = redis_dump(&redis).await;
    let new_keys: Vec<&String> = after
        .iter()
        .map(|(key, _)| key)
        .filter(|key| !before.iter().any(|(old, _)| old == *key))
        .filter(|key| !key.contains("{beside-silence}") && *key != "wq:queues")
        .collect();
    assert!(
        new_keys.is_empty(),
        "garbage or unfinished requests wrote keys: {new_keys:?}"
    );
    eprintln!(
        "fuzz raw: {}; silent raw connections the broker still held after {:.1}s: \
         {still_open}/{}; stop beside them took {:.1}s (grace {:?}), still open after it: \
         {open_after_stop}; elapsed={:.1}s",
        outcomes.join("; "),
        held_for.as_secs_f64(),
        2 * SILENT_EACH,
        stop_time.as_secs_f64(),
        config.shutdown_grace,
        started.elapsed().as_secs_f64()
    );
}

/// Writes `bytes` on a fresh connection (then FIN when `finish`) and reads until the broker
/// closes it; returns how many bytes the broker sent meanwhile.
async fn send_raw(address: SocketAddr, bytes: &[u8], finish: bool) -> usize {
    let mut tcp = TcpStream::connect(address).await.expect("connecting");
    // The broker may close before reading everything; a failed write is an answer too.
    if tcp.write_all(bytes).await.is_ok() && finish {
        let _ = tcp.shutdown().await;
    }
    let mut received = 0;
    let mut buffer = [0; 4096];
    loop {
        match tcp.read(&mut buffer).await {
            Ok(0) | Err(_) => return received,
            Ok(n) => received += n,
        }
    }
}

/// How many of `connections` the broker has not closed (without waiting for any).
async fn count_open(connections: &mut [TcpStream]) -> usize {
    let mut open = 0;
    for tcp in connections {
        let mut buffer = [0; 4096];
        // Drain what the broker sent (its SETTINGS); EOF or an error means it closed.
        let closed = loop {
            match tcp.try_read(&mut buffer) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        open += usize::from(!closed);
    }
    open
}
