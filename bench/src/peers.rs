//! `--peers-csv`: the figures in the line format of `../shared/peers` (the harness that runs the
//! same workload on BullMQ, RQ, Celery and the Kubernetes example's pattern), so wq lands in the
//! same table as they do, measured the same way:
//!
//! - `enqueue_bulk`: the median of every bulk fill of this run (the `enqueue` phase and each
//!   drain's fill), as the peers take the median of their fills;
//! - `drain` W: the drain after that fill;
//! - `e2e` W: that fill and drain one after the other, items over the summed seconds;
//! - the `pod` rows (the `wq-worker` binary) as the system `<name>-worker`: `drain` W and
//!   `e2e` W the same way, with their own fills.
//!
//! The CPU columns stay empty: the broker runs inside this process.

use std::fmt::Write as _;

use crate::Row;

/// `RESULT,...` lines for `rows` under the system name `system` (see the module docs).
pub(crate) fn result_lines(system: &str, rows: &[Row], notes: &str) -> String {
    let mut lines = String::new();
    let mut line = |system: &str, phase: &str, workers: String, items: usize, seconds: f64| {
        let rate = items as f64 / seconds;
        let _ = writeln!(
            lines,
            "RESULT,{system},{phase},{workers},{items},{seconds:.3},{rate:.0},,,,{notes}"
        );
    };
    let mut fills: Vec<&Row> = rows
        .iter()
        .filter(|r| r.phase == "enqueue" || r.phase == "fill")
        .collect();
    fills.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    if let Some(median) = fills.get(fills.len() / 2) {
        // The peers label their one producer W=1.
        line(
            system,
            "enqueue_bulk",
            "1".into(),
            median.items,
            median.seconds,
        );
    }
    let pod_system = format!("{system}-worker");
    for (name, drain_phase, fill_phase) in [
        (system, "drain", "fill"),
        (pod_system.as_str(), "pod", "pod fill"),
    ] {
        for drain in rows.iter().filter(|r| r.phase == drain_phase) {
            let workers = drain.workers.to_string();
            line(name, "drain", workers.clone(), drain.items, drain.seconds);
            let fill = rows
                .iter()
                .find(|r| r.phase == fill_phase && r.workers == drain.workers);
            if let Some(fill) = fill {
                let seconds = fill.seconds + drain.seconds;
                line(name, "e2e", workers, drain.items, seconds);
            }
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(phase: &'static str, workers: u32, seconds: f64) -> Row {
        Row {
            phase,
            workers,
            items: 1000,
            seconds,
            redis_us_per_item: None,
        }
    }

    #[test]
    fn fills_and_drains_become_the_peers_phases() {
        let rows = [
            row("enqueue", 0, 0.1),
            row("fill", 4, 0.2),
            row("drain", 4, 0.8),
            row("fill", 16, 0.4),
            row("drain", 16, 0.5),
            row("pod fill", 1, 0.25),
            row("pod", 1, 2.0),
        ];
        let text = result_lines("wq", &rows, "n");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "RESULT,wq,enqueue_bulk,1,1000,0.200,5000,,,,n",
                "RESULT,wq,drain,4,1000,0.800,1250,,,,n",
                "RESULT,wq,e2e,4,1000,1.000,1000,,,,n",
                "RESULT,wq,drain,16,1000,0.500,2000,,,,n",
                "RESULT,wq,e2e,16,1000,0.900,1111,,,,n",
                "RESULT,wq-worker,drain,1,1000,2.000,500,,,,n",
                "RESULT,wq-worker,e2e,1,1000,2.250,444,,,,n",
            ]
        );
    }
}
