//! How many items a worker holds: its handler slots, plus the items it leases ahead of them.
//!
//! Leasing ahead hides the Lease round trip (and lets one Lease and one Complete call carry many
//! items), but an item leased ahead waits in this worker while another worker may be idle. With
//! [`Prefetch::Auto`] the worker leases ahead only as many items as its recent handlers say it
//! will start within half the window: none until it has timed an item, many for items of
//! microseconds, none for items that take as long as the window. An item that still waits for
//! a slot after the whole window (its predecessors ran longer than their history said) is given
//! back to the queue, where any worker may take it, and leasing ahead stops until items are
//! short again. [`Prefetch::Fixed`] leases a fixed number ahead and never gives items back.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

/// Most items leased ahead of the slots with [`Prefetch::Auto`]: enough for Lease calls of a
/// hundred items and more, which is where a batch stops paying in Redis.
pub const MAX_AUTO_AHEAD: usize = 256;
/// The default [`Prefetch::Auto`] window.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(100);
/// Weight of the newest handler time in the running estimate.
const NEWEST_WEIGHT: f64 = 1.0 / 8.0;

/// How many items a worker leases ahead of its free handler slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// As many as the worker expects to start within half of `window`, judged by its recent
    /// handler times (at most [`MAX_AUTO_AHEAD`]); an item that waited `window` for a slot is
    /// given back to the queue (see the module docs).
    Auto {
        /// The longest an item waits in this worker for a slot before it is given back.
        window: Duration,
    },
    /// Always this many (0: none); items are never given back. For a known workload: many short
    /// items (a large number), or items that must not wait behind others (0).
    Fixed(u32),
}

impl Default for Prefetch {
    fn default() -> Self {
        Self::Auto {
            window: DEFAULT_WINDOW,
        }
    }
}

impl std::str::FromStr for Prefetch {
    type Err = String;

    /// `auto` or a number of items.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("auto") {
            return Ok(Self::default());
        }
        text.parse().map(Self::Fixed).map_err(|_| {
            format!(
                "{text:?} is neither `auto` nor a number of items (0 to {})",
                u32::MAX
            )
        })
    }
}

/// The items a worker holds and how many more it may lease.
#[derive(Debug)]
pub(crate) struct LeaseAhead {
    prefetch: Prefetch,
    concurrency: usize,
    /// Mean handler time in seconds, newest weighted most; None until one has been timed.
    handler_time: Mutex<Option<f64>>,
    /// Items leased (or being leased) whose handler has not finished.
    held: AtomicUsize,
    /// Signalled whenever room may have grown.
    freed: Notify,
}

impl LeaseAhead {
    pub(crate) fn new(prefetch: Prefetch, concurrency: u32) -> Arc<Self> {
        Arc::new(Self {
            prefetch,
            concurrency: concurrency.max(1) as usize,
            handler_time: Mutex::new(None),
            held: AtomicUsize::new(0),
            freed: Notify::new(),
        })
    }

    /// How long an item may wait for a slot before it is given back, if ever.
    pub(crate) fn window(&self) -> Option<Duration> {
        match self.prefetch {
            Prefetch::Auto { window } => Some(window),
            Prefetch::Fixed(_) => None,
        }
    }

    /// Items to lease ahead of the slots now.
    pub(crate) fn ahead(&self) -> usize {
        match self.prefetch {
            Prefetch::Fixed(n) => n as usize,
            Prefetch::Auto { window } => {
                let Some(mean) = self.handler_time.lock().ok().and_then(|t| *t) else {
                    return 0;
                };
                // The last of `ahead` items waits for about ahead × mean / concurrency.
                let ahead = window.as_secs_f64() / 2.0 * self.concurrency as f64 / mean.max(1e-7);
                (ahead.floor() as usize).min(MAX_AUTO_AHEAD)
            }
        }
    }

    /// Items that may be leased now.
    pub(crate) fn room(&self) -> usize {
        (self.concurrency + self.ahead()).saturating_sub(self.held.load(Ordering::SeqCst))
    }

    /// The room worth a Lease call: with items leased ahead, half of them (so that each call
    /// carries many), else one.
    pub(crate) fn worth_a_call(&self) -> usize {
        match self.prefetch {
            Prefetch::Fixed(n) => n.max(1) as usize,
            Prefetch::Auto { .. } => (self.ahead() / 2).max(1),
        }
    }

    /// Waits until at least `wanted` items may be leased.
    pub(crate) async fn room_for(&self, wanted: usize) {
        // `notify_one` keeps a permit when nobody waits, so a free between the check and the
        // wait is not missed.
        while self.room() < wanted {
            self.freed.notified().await;
        }
    }

    /// Reserves room for `count` items about to be leased.
    pub(crate) fn reserve(self: &Arc<Self>, count: usize) -> Reserved {
        self.held.fetch_add(count, Ordering::SeqCst);
        Reserved {
            lease_ahead: Arc::clone(self),
            count,
        }
    }

    /// Records how long a handler took.
    pub(crate) fn timed(&self, took: Duration) {
        if let Ok(mut mean) = self.handler_time.lock() {
            let took = took.as_secs_f64();
            *mean = Some(match *mean {
                Some(mean) => mean + (took - mean) * NEWEST_WEIGHT,
                None => took,
            });
        }
        self.freed.notify_one();
    }

    /// An item waited the whole window: the estimate was too short. Raised so that nothing is
    /// leased ahead until handlers have been short again for a while.
    pub(crate) fn overstayed(&self) {
        let Some(window) = self.window() else { return };
        if let Ok(mut mean) = self.handler_time.lock() {
            let floor = window.as_secs_f64() * self.concurrency as f64;
            *mean = Some(mean.map_or(floor, |m| m.max(floor)));
        }
    }

    fn give_back(&self, count: usize) {
        if count > 0 {
            self.held.fetch_sub(count, Ordering::SeqCst);
            self.freed.notify_one();
        }
    }
}

/// Room held for items: given back when dropped, unless split off to the items leased.
#[derive(Debug)]
pub(crate) struct Reserved {
    lease_ahead: Arc<LeaseAhead>,
    count: usize,
}

impl Reserved {
    /// Items this room is for.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// One item's room, split off; None when none is left.
    pub(crate) fn split_one(&mut self) -> Option<Reserved> {
        if self.count == 0 {
            return None;
        }
        self.count -= 1;
        Some(Reserved {
            lease_ahead: Arc::clone(&self.lease_ahead),
            count: 1,
        })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.lease_ahead.give_back(self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(window_ms: u64) -> Prefetch {
        Prefetch::Auto {
            window: Duration::from_millis(window_ms),
        }
    }

    #[test]
    fn nothing_is_leased_ahead_before_an_item_is_timed() {
        let ahead = LeaseAhead::new(auto(100), 4);
        assert_eq!(ahead.ahead(), 0);
        assert_eq!(ahead.room(), 4);
        assert_eq!(ahead.worth_a_call(), 1);
    }

    #[test]
    fn short_items_are_leased_ahead_up_to_the_cap_and_long_ones_not_at_all() {
        let short = LeaseAhead::new(auto(100), 1);
        short.timed(Duration::from_micros(5));
        assert_eq!(short.ahead(), MAX_AUTO_AHEAD);
        assert_eq!(short.worth_a_call(), MAX_AUTO_AHEAD / 2);

        // 10 ms items, 2 slots: 50 ms' worth is 10 items.
        let medium = LeaseAhead::new(auto(100), 2);
        medium.timed(Duration::from_millis(10));
        assert_eq!(medium.ahead(), 10);

        let long = LeaseAhead::new(auto(100), 1);
        long.timed(Duration::from_millis(60));
        assert_eq!(long.ahead(), 0);
    }

    #[test]
    fn the_estimate_follows_recent_items() {
        let ahead = LeaseAhead::new(auto(100), 1);
        ahead.timed(Duration::from_micros(10));
        assert_eq!(ahead.ahead(), MAX_AUTO_AHEAD);
        // One long item is enough to stop leasing ahead...
        ahead.timed(Duration::from_secs(2));
        assert_eq!(ahead.ahead(), 0);
        // ...and short items bring it back.
        for _ in 0..80 {
            ahead.timed(Duration::from_micros(10));
        }
        assert_eq!(ahead.ahead(), MAX_AUTO_AHEAD);
    }

    #[test]
    fn an_overstay_stops_leasing_ahead_until_items_are_short_again() {
        let ahead = LeaseAhead::new(auto(100), 4);
        ahead.timed(Duration::from_millis(1));
        assert_eq!(ahead.ahead(), 200);
        ahead.overstayed();
        assert_eq!(ahead.ahead(), 0);
        for _ in 0..60 {
            ahead.timed(Duration::from_millis(1));
        }
        assert!(ahead.ahead() > 100, "{}", ahead.ahead());
    }

    #[test]
    fn fixed_prefetch_ignores_handler_times_and_never_gives_back() {
        let ahead = LeaseAhead::new(Prefetch::Fixed(8), 2);
        ahead.timed(Duration::from_secs(60));
        ahead.overstayed();
        assert_eq!(
            (ahead.ahead(), ahead.room(), ahead.worth_a_call()),
            (8, 10, 8)
        );
        assert_eq!(ahead.window(), None);
        let none = LeaseAhead::new(Prefetch::Fixed(0), 3);
        assert_eq!((none.ahead(), none.room(), none.worth_a_call()), (0, 3, 1));
    }

    #[test]
    fn reserved_room_comes_back_when_dropped_and_split_room_when_its_item_is_done() {
        let ahead = LeaseAhead::new(Prefetch::Fixed(0), 4);
        let mut reserved = ahead.reserve(3);
        assert_eq!(ahead.room(), 1);
        let one = reserved.split_one();
        assert!(one.is_some());
        drop(reserved);
        assert_eq!(ahead.room(), 3);
        drop(one);
        assert_eq!(ahead.room(), 4);
    }

    #[tokio::test]
    async fn a_wait_for_room_ends_when_an_item_is_done() {
        let ahead = LeaseAhead::new(Prefetch::Fixed(0), 1);
        let held = ahead.reserve(1);
        let waiting = tokio::spawn({
            let ahead = Arc::clone(&ahead);
            async move { ahead.room_for(1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("no panic");
    }

    #[test]
    fn prefetch_parses_auto_and_numbers_and_names_what_it_refuses() {
        assert_eq!("auto".parse(), Ok(Prefetch::default()));
        assert_eq!("AUTO".parse(), Ok(Prefetch::default()));
        assert_eq!("64".parse(), Ok(Prefetch::Fixed(64)));
        let refused = "-1".parse::<Prefetch>().expect_err("refused");
        assert!(refused.contains("neither `auto` nor a number"), "{refused}");
    }
}
