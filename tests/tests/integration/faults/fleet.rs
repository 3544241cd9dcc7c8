//! The worker side of the load scenarios: fleets of `wq-worker` processes running a command that
//! records every execution, the random work they are given, and the check that each item ran.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};
use wq_tests::*;

use super::harness::{Rng, tail};

/// The command every worker of these tests runs: it records the execution (one short line
/// appended with O_APPEND, which is atomic, so concurrent workers never interleave), then
/// sleeps for as long as the item's payload says.
const RECORD_AND_SLEEP: &str =
    r#"echo "$WQ_ITEM_ID" >> "$FAULTS_LOG"; read pause; exec sleep "$pause""#;

/// Slots per worker process in every scenario.
pub(super) const CONCURRENCY: usize = 4;

/// Items every worker of these tests leases ahead of its slots (`--prefetch`). A fixed number,
/// not the default `auto`: how many `auto` leases ahead depends on the machine's pace at the
/// moment, and these tests bound repeats by what a worker can hold.
pub(super) const PREFETCH: usize = 4;

/// Most items one worker holds unacknowledged: its running items, as many more whose handler
/// is done but whose Complete is still on its way (a slot is given back when its handler ends
/// and its report goes on in the background; see worker/src/worker.rs), and those leased ahead,
/// which a worker runs while Redis is away. Only these can run again when a worker or Redis
/// fails.
pub(super) const HELD_PER_WORKER: usize = 2 * CONCURRENCY + PREFETCH;

/// Lease duration of every worker. Long enough that a worker on a loaded machine keeps its
/// leases by heartbeat (so repeats come from the injected faults only), short enough that a
/// dead worker's items come back quickly.
pub(super) const WORKER_LEASE: &str = "2s";

/// `wq-worker` processes started by one test; their logs and the execution log live in `dir`.
pub(super) struct Fleet {
    dir: PathBuf,
    executions: PathBuf,
    spawned: usize,
    pub(super) running: Vec<FleetWorker>,
}

pub(super) struct FleetWorker {
    name: String,
    broker: String,
    child: Child,
}

impl Fleet {
    pub(super) fn new(dir: &Path) -> Self {
        // Built (or found fresh) now, so a rebuild does not eat into the scenario's time limits.
        binary("wq-worker");
        Self {
            dir: dir.to_path_buf(),
            executions: dir.join("executions.log"),
            spawned: 0,
            running: Vec::new(),
        }
    }

    /// Starts a worker on `broker` with [`CONCURRENCY`] slots, running [`RECORD_AND_SLEEP`].
    pub(super) fn spawn(&mut self, broker: &str, queue: &str, extra: &[&str]) {
        self.spawned += 1;
        let name = format!("worker-{}", self.spawned);
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))
            .expect("the worker log opens");
        let child = Command::new(binary("wq-worker"))
            .args(["--broker", broker, "--queue", queue])
            .args(["--concurrency", &CONCURRENCY.to_string()])
            .args(["--prefetch", &PREFETCH.to_string()])
            .args(["--lease-duration", WORKER_LEASE, "--max-wait", "1s"])
            .args(extra)
            .args(["--", "sh", "-c", RECORD_AND_SLEEP])
            .env("FAULTS_LOG", &self.executions)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("wq-worker starts");
        self.running.push(FleetWorker {
            name,
            broker: broker.to_owned(),
            child,
        });
    }

    /// SIGKILLs the `index`th running worker and reaps it.
    pub(super) async fn kill(&mut self, index: usize) {
        let mut victim = self.running.remove(index);
        victim.child.start_kill().expect("SIGKILL the worker");
        let _ = victim.child.wait().await;
    }

    /// Names of the workers on `broker` that have exited, with their status.
    pub(super) fn exited_on(&mut self, broker: &str) -> Vec<(String, ExitStatus)> {
        self.running
            .iter_mut()
            .filter(|w| w.broker == broker)
            .filter_map(|w| Some((w.name.clone(), w.child.try_wait().ok()??)))
            .collect()
    }

    /// Names of every worker that has exited, with its status.
    pub(super) fn exited(&mut self) -> Vec<(String, ExitStatus)> {
        self.running
            .iter_mut()
            .filter_map(|w| Some((w.name.clone(), w.child.try_wait().ok()??)))
            .collect()
    }

    /// Waits for every running worker to exit, and asserts each exits 0.
    pub(super) async fn all_exit_zero(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        for worker in &mut self.running {
            let left = deadline.saturating_duration_since(Instant::now());
            let log = self.dir.join(format!("{}.log", worker.name));
            let status = match tokio::time::timeout(left, worker.child.wait()).await {
                Ok(status) => status.expect("the worker's status"),
                Err(_) => panic!(
                    "{} did not exit within {limit:?}; its log ends:\n{}",
                    worker.name,
                    tail(&log, 15)
                ),
            };
            assert!(
                status.success(),
                "{} exited with {status}; its log ends:\n{}",
                worker.name,
                tail(&log, 15)
            );
        }
    }

    /// How often each item was executed, from the execution log.
    pub(super) fn executions(&self) -> HashMap<String, usize> {
        let text = std::fs::read_to_string(&self.executions).unwrap_or_default();
        let mut runs = HashMap::new();
        for id in text.lines() {
            *runs.entry(id.to_owned()).or_insert(0) += 1;
        }
        runs
    }
}

/// Enqueues `count` items with ids `<prefix>-<n>` whose payload is a random "work" time of
/// 5–40 ms for [`RECORD_AND_SLEEP`]; returns the ids.
pub(super) async fn enqueue_work(
    client: &mut Client,
    queue: &str,
    prefix: &str,
    count: usize,
    rng: &mut Rng,
) -> Vec<String> {
    let ids: Vec<String> = (0..count).map(|n| format!("{prefix}-{n:05}")).collect();
    for chunk in ids.chunks(500) {
        let items = chunk
            .iter()
            .map(|id| item_with_id(id, &work_time(rng)))
            .collect();
        enqueue(client, queue, items).await;
    }
    ids
}

pub(super) fn work_time(rng: &mut Rng) -> String {
    let pause = rng.between(Duration::from_millis(5), Duration::from_millis(40));
    format!("{:.3}\n", pause.as_secs_f64())
}

/// Asserts that every one of `ids` was executed at least once; returns executions of those ids.
pub(super) fn assert_each_ran(ids: &[String], runs: &HashMap<String, usize>) -> usize {
    let never: Vec<&String> = ids.iter().filter(|id| !runs.contains_key(*id)).collect();
    assert!(
        never.is_empty(),
        "{} items were never executed, e.g. {:?}",
        never.len(),
        &never[..never.len().min(5)]
    );
    ids.iter().map(|id| runs[id]).sum()
}
