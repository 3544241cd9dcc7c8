//! Arbitrary protobuf bodies: the storm that sends every class of body to every RPC, and the tally
//! that checks each answer against the oracle and keeps the findings.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use rand::{SeedableRng, rngs::StdRng};
use tonic::{Code, Status, transport::Channel};
use wq_tests::*;

use super::{
    DEFAULT_SEED, QUEUE, assert_still_serving, counts,
    encodings::{Body, garbage_bodies, mutated_bodies, nasty_bodies},
    env_or, fuzz_config,
    methods::{Method, call_raw, methods},
};

/// Random calls (classes a and b together) when `WQ_FUZZ_CALLS` is not set: with the fixed
/// class (c) about 5,000 calls, about 10 s in a debug build on a busy 2-core machine.
const DEFAULT_RANDOM_CALLS: usize = 2_400;

/// Calls in flight at once, spread over [`CHANNELS`] HTTP/2 connections.
const CONCURRENCY: usize = 16;
const CHANNELS: usize = 4;

/// A call that takes longer than this has hung: well past [`CALL_DEADLINE`] and Redis timeouts.
const HANG_LIMIT: Duration = Duration::from_secs(15);

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
