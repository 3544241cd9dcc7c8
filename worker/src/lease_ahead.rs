//! How many items a worker holds: its handler slots, plus the items it leases ahead of them.
//!
//! Leasing ahead hides the Lease round trip (and lets one Lease and one Complete call carry many
//! items), but an item leased ahead waits in this worker while another worker may be idle. With
//! [`Prefetch::Auto`] the worker leases ahead only as many items as it expects to start within
//! half the window, judged two ways, the smaller one counting: by its recent handler times (as
//! if every slot turned over at that pace) and, once items have had to wait for a slot, by how
//! often a waiting item actually got one (slots held by long handlers do not turn over, and
//! while items wait, a stretch without any start counts as a slow one). Starts of items that
//! found a slot free say nothing about the slots (the time before them is the broker's or the
//! queue's), so they are not counted. It leases nothing ahead until it has timed an item; many
//! items ahead for items of microseconds, none for items that take as long as the window.
//!
//! An item that still waits for a slot after the whole window (the items before it ran longer
//! than their history said) is given back to the queue, where any worker may take it; leasing
//! ahead then stops until items finish quickly again, starts again at one item, and grows
//! (doubling) only while waiting items get their slot within half the window.
//! [`Prefetch::Fixed`] leases a fixed number ahead and never gives items back.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// Most items leased ahead of the slots with [`Prefetch::Auto`]: enough for Lease calls of a
/// hundred items and more, which is where a batch stops paying in Redis.
pub const MAX_AUTO_AHEAD: usize = 256;
/// With [`Prefetch::Auto`], nothing more is leased ahead while the payloads of the items held
/// (waiting or running) come to this much: items of a megabyte must not fill a pod's memory by
/// the hundred because they are quick.
pub const MAX_AUTO_AHEAD_BYTES: usize = 16 * 1024 * 1024;
/// The default [`Prefetch::Auto`] window.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(100);
/// The shortest [`Prefetch::Auto`] window: a shorter one would give items back before a slot
/// could take them.
pub const MIN_WINDOW: Duration = Duration::from_millis(1);
/// Weight of the newest sample in the running means.
const NEWEST_WEIGHT: f64 = 1.0 / 8.0;

/// How many items a worker leases ahead of its free handler slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// As many as the worker expects to start within half of `window`, judged by its recent
    /// handler times and item starts (at most [`MAX_AUTO_AHEAD`]); an item that waited
    /// `window` for a slot is given back to the queue (see the module docs).
    Auto {
        /// The longest an item waits in this worker for a slot before it is given back (at
        /// least [`MIN_WINDOW`]; a shorter one counts as that).
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

/// The worker's recent pace, from which it judges how many items to lease ahead.
#[derive(Debug)]
struct Pace {
    /// Mean handler time in seconds, newest weighted most; None until one has been timed.
    handler_time: Option<f64>,
    /// Mean time before a start of an item that waited for a slot, since the start before it
    /// (at most the wait), in seconds; None while items find slots free, and after an overstay.
    start_interval: Option<f64>,
    last_start: Option<Instant>,
    /// Most items to lease ahead: halved when a waiting item got its slot late (after half the
    /// window), doubled when on time, 1 after an item overstayed (so that leasing ahead
    /// starts again small, as a TCP window does).
    limit: usize,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            handler_time: None,
            start_interval: None,
            last_start: None,
            limit: MAX_AUTO_AHEAD,
        }
    }
}

/// The items a worker holds and how many more it may lease.
#[derive(Debug)]
pub(crate) struct LeaseAhead {
    prefetch: Prefetch,
    concurrency: usize,
    pace: Mutex<Pace>,
    /// Items leased (or being leased) whose handler has not finished.
    held: AtomicUsize,
    /// Payload bytes of the held items whose room was split off to them.
    held_bytes: AtomicUsize,
    /// Items waiting for a slot.
    waiting: AtomicUsize,
    /// Signalled whenever room may have grown.
    freed: Notify,
}

fn weigh_in(mean: Option<f64>, sample: f64) -> f64 {
    match mean {
        Some(mean) => mean + (sample - mean) * NEWEST_WEIGHT,
        None => sample,
    }
}

impl LeaseAhead {
    pub(crate) fn new(prefetch: Prefetch, concurrency: u32) -> Arc<Self> {
        let prefetch = match prefetch {
            Prefetch::Auto { window } => Prefetch::Auto {
                window: window.max(MIN_WINDOW),
            },
            fixed @ Prefetch::Fixed(_) => fixed,
        };
        Arc::new(Self {
            prefetch,
            concurrency: concurrency.max(1) as usize,
            pace: Mutex::new(Pace::default()),
            held: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
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
                if self.held_bytes.load(Ordering::SeqCst) >= MAX_AUTO_AHEAD_BYTES {
                    return 0;
                }
                let Ok(pace) = self.pace.lock() else { return 0 };
                let Some(handler_time) = pace.handler_time else {
                    return 0;
                };
                let half = window.as_secs_f64() / 2.0;
                // The last of `ahead` items waits for about ahead × handler time / slots, if
                // every slot turns over at the handlers' pace...
                let by_handlers = half * self.concurrency as f64 / handler_time.max(1e-7);
                // ...and for ahead × the time between starts, as waiting items actually get
                // slots (while some wait, nothing started for a while counts as a long
                // interval).
                let by_starts = pace.start_interval.map_or(f64::INFINITY, |interval| {
                    let stalled = match pace.last_start {
                        Some(last) if self.waiting.load(Ordering::SeqCst) > 0 => {
                            last.elapsed().as_secs_f64()
                        }
                        _ => 0.0,
                    };
                    half / interval.max(stalled).max(1e-7)
                });
                (by_handlers.min(by_starts).floor() as usize).min(pace.limit)
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

    /// Waits until a Lease call is worth making: room for [`Self::worth_a_call`] items (judged
    /// afresh whenever room may have changed), at most `cap`, or for one when `top_up`.
    pub(crate) async fn room_for_a_call(&self, cap: usize, top_up: bool) {
        let wanted = || {
            if top_up {
                1
            } else {
                self.worth_a_call().min(cap).max(1)
            }
        };
        // `notify_one` keeps a permit when nobody waits, so a free between the check and the
        // wait is not missed.
        while self.room() < wanted() {
            self.freed.notified().await;
        }
    }

    /// Reserves room for `count` items about to be leased.
    pub(crate) fn reserve(self: &Arc<Self>, count: usize) -> Reserved {
        self.held.fetch_add(count, Ordering::SeqCst);
        Reserved {
            lease_ahead: Arc::clone(self),
            count,
            bytes: 0,
        }
    }

    /// An item starts waiting for a slot; the guard says when it stops.
    pub(crate) fn waiting(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting {
            lease_ahead: Arc::clone(self),
        }
    }

    /// Records that a handler starts now, after its item waited `waited` for the slot (None
    /// when the slot was free).
    pub(crate) fn started(&self, waited: Option<Duration>) {
        let half = self.window().map(|window| window / 2);
        if let Ok(mut pace) = self.pace.lock() {
            let now = Instant::now();
            match (waited, pace.last_start) {
                (Some(waited), Some(last)) => {
                    // Only the wait is the slots' doing: before it, the item was not here yet.
                    let interval = now.duration_since(last).min(waited).as_secs_f64();
                    pace.start_interval = Some(weigh_in(pace.start_interval, interval));
                    pace.limit = match half {
                        Some(half) if waited > half => (pace.limit / 2).max(1),
                        _ => (pace.limit * 2).min(MAX_AUTO_AHEAD),
                    };
                }
                // A free slot: the slots are not what holds items up, so what was measured of
                // them is stale, and the item was on time.
                (None, _) if self.waiting.load(Ordering::SeqCst) == 0 => {
                    pace.start_interval = None;
                    pace.limit = (pace.limit * 2).min(MAX_AUTO_AHEAD);
                }
                _ => {}
            }
            pace.last_start = Some(now);
        }
        // A shorter interval may have made room.
        self.freed.notify_one();
    }

    /// Records how long a handler took.
    pub(crate) fn timed(&self, took: Duration) {
        if let Ok(mut pace) = self.pace.lock() {
            pace.handler_time = Some(weigh_in(pace.handler_time, took.as_secs_f64()));
        }
        self.freed.notify_one();
    }

    /// An item waited the whole window: the worker starts items more slowly than it judged.
    /// The handler time is raised so that nothing is leased ahead until items have finished
    /// quickly for a while again; then leasing ahead starts again at one item, growing while
    /// items get their slot on time, and the start intervals are measured afresh.
    pub(crate) fn overstayed(&self) {
        let Some(window) = self.window() else { return };
        if let Ok(mut pace) = self.pace.lock() {
            let slowest = window.as_secs_f64() * self.concurrency as f64;
            pace.handler_time = Some(pace.handler_time.map_or(slowest, |m| m.max(slowest)));
            pace.start_interval = None;
            pace.limit = 1;
        }
    }

    fn give_back(&self, count: usize) {
        if count > 0 {
            self.held.fetch_sub(count, Ordering::SeqCst);
            self.freed.notify_one();
        }
    }
}

/// An item waiting for a slot, counted until dropped.
#[derive(Debug)]
pub(crate) struct Waiting {
    lease_ahead: Arc<LeaseAhead>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.lease_ahead.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Room held for items: given back when dropped, unless split off to the items leased.
#[derive(Debug)]
pub(crate) struct Reserved {
    lease_ahead: Arc<LeaseAhead>,
    count: usize,
    /// Payload bytes of the item this room went to (split-off room only).
    bytes: usize,
}

impl Reserved {
    /// Items this room is for.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// One item's room, split off to an item of `bytes` payload bytes; None when none is left.
    pub(crate) fn split_one(&mut self, bytes: usize) -> Option<Reserved> {
        if self.count == 0 {
            return None;
        }
        self.count -= 1;
        self.lease_ahead
            .held_bytes
            .fetch_add(bytes, Ordering::SeqCst);
        Some(Reserved {
            lease_ahead: Arc::clone(&self.lease_ahead),
            count: 1,
            bytes,
        })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.lease_ahead
            .held_bytes
            .fetch_sub(self.bytes, Ordering::SeqCst);
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

    /// Two items started back to back (the second after waiting), then one timed at `took`.
    fn paced(ahead: &LeaseAhead, took: Duration) {
        ahead.started(None);
        ahead.started(Some(Duration::ZERO));
        ahead.timed(took);
    }

    #[test]
    fn nothing_is_leased_ahead_before_an_item_is_timed() {
        let ahead = LeaseAhead::new(auto(100), 4);
        assert_eq!(
            (ahead.ahead(), ahead.room(), ahead.worth_a_call()),
            (0, 4, 1)
        );
        ahead.started(None);
        assert_eq!(ahead.ahead(), 0);
        ahead.timed(Duration::from_micros(5));
        assert_eq!(ahead.ahead(), MAX_AUTO_AHEAD);
    }

    #[test]
    fn short_items_are_leased_ahead_up_to_the_cap_and_long_ones_not_at_all() {
        let short = LeaseAhead::new(auto(100), 1);
        paced(&short, Duration::from_micros(5));
        assert_eq!(short.ahead(), MAX_AUTO_AHEAD);
        assert_eq!(short.worth_a_call(), MAX_AUTO_AHEAD / 2);

        // 10 ms items, 2 slots: 50 ms' worth is 10 items.
        let medium = LeaseAhead::new(auto(100), 2);
        paced(&medium, Duration::from_millis(10));
        assert_eq!(medium.ahead(), 10);

        let long = LeaseAhead::new(auto(100), 1);
        paced(&long, Duration::from_millis(60));
        assert_eq!(long.ahead(), 0);
    }

    #[test]
    fn slots_that_do_not_turn_over_count_through_the_starts() {
        // Short handlers, but waiting items get a slot only every 20 ms or more (the other
        // slots are busy with long items): at most 25 in half a second.
        let ahead = LeaseAhead::new(auto(1000), 16);
        ahead.started(None);
        std::thread::sleep(Duration::from_millis(20));
        ahead.started(Some(Duration::from_millis(20)));
        ahead.timed(Duration::from_micros(1));
        let judged = ahead.ahead();
        assert!((1..=25).contains(&judged), "{judged}");
        // While an item waits, a stretch without starts longer than half the window means
        // nothing more is expected to start soon...
        let stuck = LeaseAhead::new(auto(20), 1);
        paced(&stuck, Duration::from_micros(1));
        let waiting = stuck.waiting();
        std::thread::sleep(Duration::from_millis(15));
        assert_eq!(stuck.ahead(), 0);
        // ...but with nothing waiting, the stretch is the broker's or the queue's, not slow
        // slots.
        drop(waiting);
        assert_eq!(stuck.ahead(), MAX_AUTO_AHEAD);
    }

    #[test]
    fn a_slow_stretch_is_forgotten_once_items_find_slots_free_again() {
        let ahead = LeaseAhead::new(auto(100), 1);
        ahead.started(None);
        ahead.timed(Duration::from_micros(5));
        std::thread::sleep(Duration::from_millis(60));
        // An item that waited 60 ms behind a long one: slow slots, nothing ahead...
        ahead.started(Some(Duration::from_millis(60)));
        assert_eq!(ahead.ahead(), 0);
        // ...until an item finds its slot free, which says the slots are not the limit now.
        ahead.started(None);
        assert_eq!(ahead.ahead(), MAX_AUTO_AHEAD);
    }

    #[test]
    fn starts_of_items_that_found_a_slot_free_do_not_count() {
        // One slot and a slow broker: each start comes a long round trip after the previous
        // one, but the items never waited, so the slots are not the limit.
        let ahead = LeaseAhead::new(auto(100), 1);
        ahead.started(None);
        std::thread::sleep(Duration::from_millis(60));
        ahead.started(None);
        ahead.timed(Duration::from_micros(5));
        assert_eq!(ahead.ahead(), MAX_AUTO_AHEAD);
    }

    #[test]
    fn the_estimate_follows_recent_items() {
        let ahead = LeaseAhead::new(auto(100), 1);
        paced(&ahead, Duration::from_micros(10));
        assert_eq!(ahead.ahead(), MAX_AUTO_AHEAD);
        // One long item is enough to stop leasing ahead...
        ahead.timed(Duration::from_secs(2));
        assert_eq!(ahead.ahead(), 0);
        // ...and short items bring it back.
        for _ in 0..80 {
            ahead.started(Some(Duration::ZERO));
            ahead.timed(Duration::from_micros(10));
        }
        assert_eq!(ahead.ahead(), MAX_AUTO_AHEAD);
    }

    #[test]
    fn an_overstay_stops_leasing_ahead_until_items_start_quickly_again() {
        let ahead = LeaseAhead::new(auto(100), 4);
        paced(&ahead, Duration::from_millis(1));
        assert_eq!(ahead.ahead(), 200);
        ahead.overstayed();
        assert_eq!(ahead.ahead(), 0);
        for _ in 0..60 {
            ahead.started(Some(Duration::ZERO));
            ahead.timed(Duration::from_millis(1));
        }
        assert!(ahead.ahead() > 100, "{}", ahead.ahead());
    }

    #[test]
    fn items_that_get_their_slot_late_halve_the_limit_and_on_time_ones_double_it() {
        let ahead = LeaseAhead::new(auto(100), 4);
        paced(&ahead, Duration::from_micros(1));
        ahead.overstayed();
        for _ in 0..60 {
            ahead.timed(Duration::from_micros(1));
        }
        assert_eq!(ahead.ahead(), 1, "leasing ahead starts again at one item");
        ahead.started(Some(Duration::from_millis(1)));
        ahead.started(Some(Duration::from_millis(1)));
        assert_eq!(ahead.ahead(), 4);
        ahead.started(Some(Duration::from_millis(80)));
        assert_eq!(ahead.ahead(), 2);
    }

    #[test]
    fn nothing_more_is_leased_ahead_while_the_held_payloads_are_large() {
        let ahead = LeaseAhead::new(auto(100), 1);
        paced(&ahead, Duration::from_micros(1));
        assert_eq!(ahead.ahead(), MAX_AUTO_AHEAD);
        let mut reserved = ahead.reserve(20);
        let big: Vec<_> = (0..16)
            .filter_map(|_| reserved.split_one(1024 * 1024))
            .collect();
        assert_eq!(ahead.ahead(), 0, "16 MiB held");
        drop(big);
        assert_eq!(ahead.ahead(), MAX_AUTO_AHEAD);
        // A fixed prefetch is the caller's choice, whatever the sizes.
        let fixed = LeaseAhead::new(Prefetch::Fixed(8), 1);
        let mut reserved = fixed.reserve(1);
        let _big = reserved.split_one(MAX_AUTO_AHEAD_BYTES);
        assert_eq!(fixed.ahead(), 8);
    }

    #[test]
    fn a_window_below_the_minimum_counts_as_the_minimum() {
        let ahead = LeaseAhead::new(
            Prefetch::Auto {
                window: Duration::ZERO,
            },
            1,
        );
        assert_eq!(ahead.window(), Some(MIN_WINDOW));
    }

    #[test]
    fn fixed_prefetch_ignores_the_pace_and_never_gives_back() {
        let ahead = LeaseAhead::new(Prefetch::Fixed(8), 2);
        paced(&ahead, Duration::from_secs(60));
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
        let one = reserved.split_one(10);
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
            async move { ahead.room_for_a_call(256, false).await }
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
