//! Half-sent messages on every stream a connection may open, with and without a token: the
//! broker's peak RSS stays within the stated bound.

use super::*;

/// Without a token a caller reaches the health service only: half-sent health checks on every
/// stream of two connections, announcing 4 MiB (tonic's default limit, which the health service
/// had) and sending 2 MiB each, or announcing just under the open services' 64 KiB limit and
/// sending all but a byte, must not grow the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_health_checks_without_a_token_do_not_grow_the_broker() {
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[]).await;
    let before = server.memory_kib("VmRSS");
    let mut attacks = Vec::new();
    for (declared, sent) in [(4 * MIB - 5, 2 * MIB), (64 * KIB - 5, 64 * KIB - 6)] {
        let declared = u32::try_from(declared).expect("small");
        attacks.push(half_sent_messages(server.address, HEALTH, None, 100, declared, sent).await);
    }
    let grown = grown_mib(&server, before);
    let sent: usize = attacks.iter().map(|a| a.sent).sum();
    let ended: usize = attacks.iter().map(|a| a.ended).sum();
    // Others are still served beside the attack.
    let status = health_of(&server.url(), None).await;
    eprintln!(
        "hostile: anonymous half-sent health checks: sent={}MiB ended_by_broker={ended} \
         rss_before={}MiB grown_peak={grown}MiB",
        sent / MIB,
        before / 1024
    );
    assert_eq!(status, Some(ServingStatus::Serving));
    assert!(
        grown < 32,
        "anonymous half-sent health checks grew the broker by {grown} MiB"
    );
}

/// With a producer's token: half-sent Enqueues of 16 MiB - 5 bytes (just under the message
/// limit) on every stream one connection may open, 4 MiB of each sent. The connection's share
/// of the budget admits one of them; another producer is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_enqueues_on_one_connection_stay_within_its_share() {
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[]).await;
    let before = server.memory_kib("VmRSS");
    let declared = u32::try_from(16 * MIB - 5).expect("small");
    let attack = half_sent_messages(
        server.address,
        ENQUEUE,
        Some(PRODUCER),
        100,
        declared,
        4 * MIB,
    )
    .await;
    let grown = grown_mib(&server, before);
    let producer = server.client(PRODUCER).await;
    let enqueued = tokio::time::timeout(
        Duration::from_secs(10),
        producer.enqueue("batch-1", vec![item("beside the attack")]),
    )
    .await;
    eprintln!(
        "hostile: one connection of half-sent enqueues: streams_open={} ended_by_broker={} \
         sent={}MiB rss_before={}MiB grown_peak={grown}MiB",
        attack.streams.len(),
        attack.ended,
        attack.sent / MIB,
        before / 1024
    );
    let bound = stated_bound_mib(1) + SLACK_MIB;
    assert!(
        grown < bound,
        "one connection of half-sent messages grew the broker by {grown} MiB (bound {bound})"
    );
    enqueued
        .expect("an Enqueue beside the attack answers within 10 s")
        .expect("an Enqueue beside the attack succeeds");
    drop(attack);
}

/// With a producer's token, eight connections at the limits: 25 streams each with a message of
/// 1 MiB announced and all but its last byte sent, together twice the broker's budget. The
/// broker holds no more than the stated bound, and serves again once the attack is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_enqueues_on_many_connections_stay_within_the_budget() {
    const CONNECTIONS: usize = 8;
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[]).await;
    let before = server.memory_kib("VmRSS");
    let declared = MIB - 5;
    let attacks = futures_util::future::join_all((0..CONNECTIONS).map(|_| {
        let declared = u32::try_from(declared).expect("small");
        half_sent_messages(
            server.address,
            ENQUEUE,
            Some(PRODUCER),
            25,
            declared,
            MIB - 6,
        )
    }))
    .await;
    let grown = grown_mib(&server, before);
    let sent: usize = attacks.iter().map(|a| a.sent).sum();
    let ended: usize = attacks.iter().map(|a| a.ended).sum();
    eprintln!(
        "hostile: {CONNECTIONS} connections of half-sent enqueues: sent={}MiB \
         ended_by_broker={ended} rss_before={}MiB grown_peak={grown}MiB",
        sent / MIB,
        before / 1024
    );
    let bound = stated_bound_mib(CONNECTIONS) + SLACK_MIB;
    assert!(
        grown < bound,
        "{CONNECTIONS} connections of half-sent messages grew the broker by {grown} MiB (bound {bound})"
    );
    drop(attacks);
    let producer = server.client(PRODUCER).await;
    eventually("the broker serves again after the attack", async || {
        producer
            .enqueue("batch-1", vec![item("after the attack")])
            .await
            .is_ok()
    })
    .await;
}
