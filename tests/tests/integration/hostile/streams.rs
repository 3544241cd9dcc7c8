//! Long-lived calls on the open services: a health `Watch` handler returns at once and its
//! stream lives on, so what the call holds must stay charged until its reply body has ended.

use super::*;

const WATCH: &str = "/grpc.health.v1.Health/Watch";

/// Without a token: 250 connections each opening 100 health Watch streams (the attack that grew
/// the broker by 230 MiB while a Watch's charge ended with its handler). The broker stays within
/// the stated bound and refuses the Watches past what the open services may hold with
/// RESOURCE_EXHAUSTED; a worker is served meanwhile; once the streams are closed, their
/// charges are released and new Watches are admitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_without_a_token_stay_within_the_bound_and_are_released() {
    const CONNECTIONS: usize = 250;
    const STREAMS: usize = 100;
    let redis = redis().await;
    let server = Server::start(&redis.url(), &[]).await;
    let before = server.memory_kib("VmRSS");
    let attack = futures_util::future::join_all(
        (0..CONNECTIONS).map(|_| open_calls(server.address, WATCH, None, &[], STREAMS, 65_535)),
    )
    .await;
    let grown = grown_mib(&server, before);
    let kept: usize = attack.iter().map(|a| a.kept.len()).sum();
    let refused: usize = attack
        .iter()
        .map(|a| a.refused_with(Code::ResourceExhausted))
        .sum();
    // While the attack holds its streams: one more connection's Watches are all refused, and
    // a worker's call (outside the open services' share) is served.
    let probe = open_calls(server.address, WATCH, None, &[], 10, 65_535).await;
    let worker = server.client(WORKER).await;
    let served = worker.queue_state("batch-1").await;
    eprintln!(
        "hostile: {CONNECTIONS}x{STREAMS} health Watch streams: kept={kept} refused={refused} \
         rss_before={}MiB grown_peak={grown}MiB probe_kept={}",
        before / 1024,
        probe.kept.len()
    );
    let stopped: Vec<_> = attack.iter().filter_map(|a| a.stopped.as_deref()).collect();
    eprintln!("hostile: Watch connections stopped early: {stopped:?}");
    let bound = stated_bound_mib(CONNECTIONS) + SLACK_MIB;
    assert!(
        grown < bound,
        "Watch streams grew the broker by {grown} MiB (bound {bound})"
    );
    assert!(refused > 0, "no Watch stream was refused");
    // An attacker connection whose own h2 client gave up early (seen once under load: "user
    // error: inactive stream") leaves some of its streams unanswered; every other is answered.
    assert!(
        kept + refused >= (CONNECTIONS - stopped.len()) * STREAMS,
        "every Watch is answered: {kept} kept + {refused} refused of {}",
        CONNECTIONS * STREAMS
    );
    assert_eq!(
        probe.kept.len(),
        0,
        "a Watch past the open services' share is refused"
    );
    served.expect("a worker's call beside the Watch streams is served");
    drop((attack, probe));
    eventually("the Watch streams' charges are released", async || {
        open_calls(server.address, WATCH, None, &[], STREAMS, 65_535)
            .await
            .kept
            .len()
            == STREAMS
    })
    .await;
}
