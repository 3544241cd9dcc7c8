//! How `wq` prints queue states: a human table or JSON.

use serde_json::json;
use wq_client::pb;

pub(crate) fn flags(state: &pb::QueueStateResponse) -> String {
    let mut flags = Vec::new();
    if state.paused {
        flags.push("paused");
    }
    if state.sealed {
        flags.push("sealed");
    }
    if state.drained {
        flags.push("drained");
    }
    flags.join(",")
}

pub(crate) fn print_state(s: &pb::QueueStateResponse) {
    let rows = [
        ("queue", s.queue.clone()),
        ("ready", s.ready.to_string()),
        ("leased", s.leased.to_string()),
        ("delayed", s.delayed.to_string()),
        ("dead", s.dead.to_string()),
        ("enqueued total", s.enqueued_total.to_string()),
        ("completed total", s.completed_total.to_string()),
        ("failed total", s.failed_total.to_string()),
        ("reclaimed total", s.reclaimed_total.to_string()),
        ("paused", s.paused.to_string()),
        ("sealed", s.sealed.to_string()),
        ("drained", s.drained.to_string()),
    ];
    for (name, value) in rows {
        println!("{name:<16} {value}");
    }
}

pub(crate) fn state_json(s: &pb::QueueStateResponse) -> serde_json::Value {
    json!({
        "queue": s.queue,
        "ready": s.ready,
        "leased": s.leased,
        "delayed": s.delayed,
        "dead": s.dead,
        "enqueued_total": s.enqueued_total,
        "completed_total": s.completed_total,
        "failed_total": s.failed_total,
        "reclaimed_total": s.reclaimed_total,
        "dead_dropped_total": s.dead_dropped_total,
        "paused": s.paused,
        "sealed": s.sealed,
        "drained": s.drained,
        "oldest_ready_enqueue_time": s.oldest_ready_enqueue_time.map(|t| t.seconds),
    })
}
