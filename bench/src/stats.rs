//! Latency summaries: p50, p99 and max of a set of samples.

use std::time::Duration;

/// The percentiles of one latency measurement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Percentiles {
    /// How many samples they were computed from.
    pub(crate) samples: usize,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) max: Duration,
}

impl Percentiles {
    /// Summarises `samples` by nearest rank; None when there are none.
    pub(crate) fn of(mut samples: Vec<Duration>) -> Option<Self> {
        samples.sort_unstable();
        let last = samples.len().checked_sub(1)?;
        // Nearest rank: the smallest sample with at least q of the samples at or below it.
        let rank =
            |q: f64| ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        Some(Self {
            samples: samples.len(),
            p50: samples[rank(0.50)],
            p99: samples[rank(0.99)],
            max: samples[last],
        })
    }
}

/// Milliseconds with microsecond resolution, for tables and JSON.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_of_one_to_a_hundred() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(samples).expect("samples are not empty");
        assert_eq!(p.p50, Duration::from_millis(50));
        assert_eq!(p.p99, Duration::from_millis(99));
        assert_eq!(p.max, Duration::from_millis(100));
        assert!(Percentiles::of(Vec::new()).is_none());
    }
}
