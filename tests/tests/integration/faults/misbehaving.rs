//! Clients that break the protocol's manners: they complete twice, present stale leases after
//! abandoning their items, release, fail and extend at random; the broker must never finish an
//! item twice and must bring every abandoned item back.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tonic::Code;
use wq_tests::*;

use super::harness::{Rng, assert_no_leftovers, within};

/// What the misbehaving clients did, and what the broker answered.
#[derive(Debug, Default)]
struct Misbehaviour {
    /// The item of every Complete that answered OK.
    completed: Vec<String>,
    leases: u64,
    double_completes: u64,
    abandoned: u64,
    stale_calls: u64,
    releases: u64,
    fails: u64,
    lost_honest_completes: u64,
}

/// Leases one item at a time, and does one random thing with it: completes it (honestly,
/// twice, or after extending), releases it, fails it, or abandons it and, once the broker has
/// moved on, presents the stale lease. Asserts what the proto promises for each.
async fn misbehave(mut client: Client, mut rng: Rng, tally: Arc<Mutex<Misbehaviour>>) {
    const LEASE: Duration = Duration::from_millis(300);
    let queue = "q";
    loop {
        let reply = lease(&mut client, queue, 1, LEASE).await;
        let Some(item) = reply.items.into_iter().next() else {
            if reply.drained {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let lease_id = item.lease_id.clone();
        let ok_completion = |outcome: pb::LeaseOutcome, tally: &mut Misbehaviour| {
            if outcome == pb::LeaseOutcome::Ok {
                tally.completed.push(item.id.clone());
            }
        };
        let choice = rng.below(100);
        let mut seen = Misbehaviour {
            leases: 1,
            ..Misbehaviour::default()
        };
        match choice {
            0..40 => {
                let outcome =
                    complete(&mut client, queue, std::slice::from_ref(&lease_id)).await[0];
                if outcome != pb::LeaseOutcome::Ok {
                    seen.lost_honest_completes += 1;
                }
                ok_completion(outcome, &mut seen);
            }
            40..55 => {
                let first = complete(&mut client, queue, std::slice::from_ref(&lease_id)).await[0];
                ok_completion(first, &mut seen);
                let second = complete(&mut client, queue, std::slice::from_ref(&lease_id)).await[0];
                assert_eq!(second, pb::LeaseOutcome::LeaseLost, "completing twice");
                seen.double_completes += 1;
            }
            55..70 => {
                // Abandon the item, wait until the broker has moved on (reclaimed it, leased
                // it again or seen it completed), then present the stale lease.
                seen.abandoned += 1;
                let expire = item.lease_expire_time;
                let mut moved_on = false;
                for _ in 0..100 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    moved_on = match get_item(&mut client, queue, &item.id).await {
                        Ok(now) => {
                            now.state() != pb::ItemState::Leased || now.lease_expire_time != expire
                        }
                        Err(status) if status.code() == Code::NotFound => true,
                        Err(status) => panic!("GetItem failed: {status:?}"),
                    };
                    if moved_on {
                        break;
                    }
                }
                assert!(
                    moved_on,
                    "an abandoned {LEASE:?} lease of {} was not reclaimed within 5 s",
                    item.id
                );
                let outcome = match rng.below(4) {
                    0 => complete(&mut client, queue, std::slice::from_ref(&lease_id)).await[0],
                    1 => client
                        .fail(pb::FailRequest {
                            queue: queue.into(),
                            lease_id: lease_id.clone(),
                            error: "stale".into(),
                            ..pb::FailRequest::default()
                        })
                        .await
                        .expect("Fail")
                        .into_inner()
                        .result
                        .expect("a result")
                        .outcome(),
                    2 => client
                        .extend_lease(pb::ExtendLeaseRequest {
                            queue: queue.into(),
                            lease_ids: vec![lease_id.clone()],
                            lease_duration: Some(duration(LEASE)),
                        })
                        .await
                        .expect("ExtendLease")
                        .into_inner()
                        .results[0]
                        .outcome(),
                    _ => client
                        .release(pb::ReleaseRequest {
                            queue: queue.into(),
                            lease_ids: vec![lease_id.clone()],
                        })
                        .await
                        .expect("Release")
                        .into_inner()
                        .results[0]
                        .outcome(),
                };
                assert_eq!(
                    outcome,
                    pb::LeaseOutcome::LeaseLost,
                    "a stale lease of {} changed the item",
                    item.id
                );
                seen.stale_calls += 1;
            }
            70..80 => {
                client
                    .release(pb::ReleaseRequest {
                        queue: queue.into(),
                        lease_ids: vec![lease_id.clone()],
                    })
                    .await
                    .expect("Release");
                seen.releases += 1;
            }
            80..90 => {
                client
                    .fail(pb::FailRequest {
                        queue: queue.into(),
                        lease_id: lease_id.clone(),
                        error: "flaky".into(),
                        retry_delay: Some(duration(Duration::ZERO)),
                        dead_letter: false,
                    })
                    .await
                    .expect("Fail");
                seen.fails += 1;
            }
            _ => {
                client
                    .extend_lease(pb::ExtendLeaseRequest {
                        queue: queue.into(),
                        lease_ids: vec![lease_id.clone()],
                        lease_duration: Some(duration(LEASE)),
                    })
                    .await
                    .expect("ExtendLease");
                let outcome =
                    complete(&mut client, queue, std::slice::from_ref(&lease_id)).await[0];
                ok_completion(outcome, &mut seen);
            }
        }
        let mut tally = tally.lock().expect("the tally lock");
        tally.completed.append(&mut seen.completed);
        tally.leases += seen.leases;
        tally.double_completes += seen.double_completes;
        tally.abandoned += seen.abandoned;
        tally.stale_calls += seen.stale_calls;
        tally.releases += seen.releases;
        tally.fails += seen.fails;
        tally.lost_honest_completes += seen.lost_honest_completes;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_never_finish_an_item_twice_and_abandoned_items_come_back() {
    const ITEMS: usize = 300;
    const CLIENTS: usize = 12;
    let mut rng = Rng::new();
    let redis = redis().await;
    let broker = Broker::start(&redis.url()).await;
    let mut client = broker.client().await;
    let ids: Vec<String> = (0..ITEMS).map(|n| format!("m-{n:04}")).collect();
    enqueue(
        &mut client,
        "q",
        ids.iter()
            .map(|id| pb::EnqueueItem {
                // Fails and expiries are part of the game here, not a reason to give up.
                max_attempts: 1000,
                ..item_with_id(id, "x")
            })
            .collect(),
    )
    .await;
    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Misbehaviour::default()));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(tokio::spawn(misbehave(
            broker.client().await,
            Rng::from_seed(rng.next_u64()),
            Arc::clone(&tally),
        )));
    }
    within(
        Duration::from_secs(60),
        "the clients drain the queue",
        async {
            for task in clients {
                task.await.expect("a misbehaving client's assertions hold");
            }
        },
    )
    .await;
    let elapsed = started.elapsed();

    let tally = std::mem::take(&mut *tally.lock().expect("the tally lock"));
    let mut completions: HashMap<&str, usize> = HashMap::new();
    for id in &tally.completed {
        *completions.entry(id.as_str()).or_insert(0) += 1;
    }
    let twice: Vec<_> = completions.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "items completed more than once: {twice:?}"
    );
    assert_eq!(completions.len(), ITEMS, "every item completed");
    let s = state(&mut client, "q").await;
    assert_eq!(
        (s.drained, s.dead, s.completed_total),
        (true, 0, ITEMS as u64),
        "{s:?}"
    );
    assert!(
        s.reclaimed_total >= tally.abandoned,
        "each abandoned lease was reclaimed: {} reclaimed, {} abandoned",
        s.reclaimed_total,
        tally.abandoned
    );
    assert_no_leftovers(&redis, "q").await;
    eprintln!(
        "faults: misbehaving clients: items={ITEMS} clients={CLIENTS} leases={} \
         double_completes={} abandoned={} stale_calls_all_lost={} releases={} fails={} \
         honest_completes_lost={} reclaimed={} elapsed={:.1}s seed={}",
        tally.leases,
        tally.double_completes,
        tally.abandoned,
        tally.stale_calls,
        tally.releases,
        tally.fails,
        tally.lost_honest_completes,
        s.reclaimed_total,
        elapsed.as_secs_f64(),
        rng.seed
    );
}
