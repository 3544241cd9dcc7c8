//! Crashes of wq's own processes under load: `wq-worker` processes SIGKILLed at random, and a
//! `wq-server` replica SIGKILLed and restarted while its workers wait.

use std::time::{Duration, Instant};

use wq_tests::*;

use super::{
    fleet::{CONCURRENCY, Fleet, HELD_PER_WORKER, WORKER_LEASE, assert_each_ran, enqueue_work},
    harness::{Rng, ServerProcess, connect, scratch_dir, wait_until},
};

// ---------------------------------------------------------------------------------------------
// Worker crashes.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomly_killed_workers_lose_nothing_and_repeat_only_what_they_held() {
    const ITEMS: usize = 2000;
    const WORKERS: usize = 4;
    const MAX_KILLS: usize = 12;
    let mut rng = Rng::new();
    let dir = scratch_dir();
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let ids = enqueue_work(&mut client, "q", "item", ITEMS, &mut rng).await;

    let mut fleet = Fleet::new(dir.path());
    let started = Instant::now();
    for _ in 0..WORKERS {
        fleet.spawn(&broker.url(), "q", &[]);
    }
    // Kill a random worker every 0.3–0.9 s and start a replacement, until three quarters of
    // the items are done: the last quarter shows the survivors finish the job.
    let mut kills = 0;
    while kills < MAX_KILLS {
        tokio::time::sleep(rng.between(Duration::from_millis(300), Duration::from_millis(900)))
            .await;
        if state(&mut client, "q").await.completed_total as usize >= ITEMS * 3 / 4 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "three quarters of the items were not done within 60 s"
        );
        let exited = fleet.exited();
        assert!(exited.is_empty(), "workers exited early: {exited:?}");
        let victim = rng.below(fleet.running.len() as u64) as usize;
        fleet.kill(victim).await;
        kills += 1;
        fleet.spawn(&broker.url(), "q", &[]);
    }
    fleet.all_exit_zero(Duration::from_secs(60)).await;
    let elapsed = started.elapsed();

    let s = state(&mut client, "q").await;
    assert_eq!(
        (s.drained, s.dead, s.completed_total),
        (true, 0, ITEMS as u64),
        "every item completed exactly once: {s:?}"
    );
    let runs = fleet.executions();
    let executions = assert_each_ran(&ids, &runs);
    let duplicates = executions - ITEMS;
    // Only items a killed worker held (in work, done but not yet acknowledged, or granted in a
    // Lease reply it never read) can run again.
    let bound = kills * HELD_PER_WORKER;
    assert!(
        duplicates <= bound,
        "{duplicates} repeated executions, but {kills} kills explain at most {bound}"
    );
    assert!(
        s.reclaimed_total as usize <= bound,
        "{} reclaimed leases, but {kills} kills explain at most {bound}",
        s.reclaimed_total
    );
    assert!(
        kills >= 3,
        "the run was too short to inject faults: {kills} kills"
    );
    eprintln!(
        "faults: worker crashes: items={ITEMS} workers={WORKERS}x{CONCURRENCY} lease={WORKER_LEASE} \
         kills={kills} executions={executions} duplicates={duplicates} (bound {bound}) \
         reclaimed={} elapsed={:.1}s seed={}",
        s.reclaimed_total,
        elapsed.as_secs_f64(),
        rng.seed
    );
}

// ---------------------------------------------------------------------------------------------
// A broker replica crashes.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_broker_replica_loses_nothing_and_its_workers_resume_after_its_restart() {
    const ITEMS: usize = 1000;
    const WORKERS_PER_BROKER: usize = 2;
    let mut rng = Rng::new();
    let dir = scratch_dir();
    let redis = redis().await;
    let flags = ["--redis-timeout", "500ms"];
    let mut doomed = ServerProcess::start(&redis.url(), dir.path(), &flags).await;
    let survivor = ServerProcess::start(&redis.url(), dir.path(), &flags).await;
    let mut client = connect(&survivor.url()).await;
    let ids = enqueue_work(&mut client, "q", "item", ITEMS, &mut rng).await;

    let mut fleet = Fleet::new(dir.path());
    let started = Instant::now();
    for _ in 0..WORKERS_PER_BROKER {
        fleet.spawn(&doomed.url(), "q", &[]);
        fleet.spawn(&survivor.url(), "q", &[]);
    }
    let kill_at = (ITEMS * (20 + rng.below(31) as usize) / 100) as u64;
    wait_until(Duration::from_secs(60), "the kill point", async || {
        state(&mut client, "q").await.completed_total >= kill_at
    })
    .await;
    doomed.kill().await;
    let done_at_kill = state(&mut client, "q").await.completed_total;
    let down_for = rng.between(Duration::from_secs(2), Duration::from_secs(4));
    tokio::time::sleep(down_for).await;
    let exited = fleet.exited_on(&doomed.url());
    assert!(
        exited.is_empty(),
        "workers of the killed broker exited instead of retrying: {exited:?}"
    );
    let done_while_down = state(&mut client, "q").await.completed_total - done_at_kill;
    assert!(
        done_while_down > 0,
        "the other replica's workers went on while one broker was down"
    );
    // Same address: the workers were told one URL (on Kubernetes, a Service address that
    // would route to the surviving replica by itself).
    let _restarted = ServerProcess::start_at(&redis.url(), doomed.address, dir.path(), &flags, &[])
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the killed broker did not restart on {}: {e}",
                doomed.address
            )
        });
    fleet.all_exit_zero(Duration::from_secs(60)).await;
    let elapsed = started.elapsed();

    let s = state(&mut client, "q").await;
    assert_eq!(
        (s.drained, s.dead, s.completed_total),
        (true, 0, ITEMS as u64),
        "every item completed exactly once: {s:?}"
    );
    let executions = assert_each_ran(&ids, &fleet.executions());
    let duplicates = executions - ITEMS;
    // Only the items that the killed broker's workers held can run twice: those whose
    // Complete could not get through before the reports gave up.
    let bound = WORKERS_PER_BROKER * HELD_PER_WORKER;
    assert!(
        duplicates <= bound,
        "{duplicates} repeated executions; the killed broker's workers held at most {bound}"
    );
    eprintln!(
        "faults: broker crash: items={ITEMS} brokers=2 workers=2x{WORKERS_PER_BROKER}x{CONCURRENCY} \
         killed_at={done_at_kill} down={:.1}s done_while_down={done_while_down} \
         executions={executions} duplicates={duplicates} (bound {bound}) reclaimed={} \
         elapsed={:.1}s seed={}",
        down_for.as_secs_f64(),
        s.reclaimed_total,
        elapsed.as_secs_f64(),
        rng.seed
    );
}
