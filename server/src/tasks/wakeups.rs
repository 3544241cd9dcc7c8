//! The subscriptions that carry wake-ups from Redis to this broker's waiting Lease calls.
//!
//! Scripts that make items ready `SPUBLISH` `<count>:<queue>` on the queue's own shard channel,
//! `<prefix>:{<queue>}:notify`, which lives in the queue's slot: on a cluster a message stays
//! inside the queue's shard (a classic `PUBLISH` goes to every node). This task subscribes
//! (`SSUBSCRIBE`) to the channel of each queue on which a Lease call of this process parks,
//! keeps the subscription for [`LINGER`] after the queue's last waiter left (workers that wait
//! again and again do not resubscribe each time), and then unsubscribes. An idle broker sends
//! Redis nothing.
//!
//! A notification is a hint, never the only path. A subscription is lost with its node, and
//! Redis drops the sharded subscriptions of a slot that fails over or migrates (a server-sent
//! `SUNSUBSCRIBE` that redis-rs does not re-issue). So the task subscribes again on those
//! events; after every (re)subscription it wakes the queue's waiters to look for themselves,
//! since messages sent meanwhile are lost (this also covers an item enqueued between a first
//! waiter's look and its subscription); and while a queue's subscription is down but the
//! connection stands (a cluster shard failing over), one of that queue's waiters looks every
//! [`FALLBACK_RECHECK`], and wakes the next when it finds items. Without any connection
//! (Redis itself is likely down) the waiters keep waiting: looking would only fail their calls
//! early, and the renewal wakes them.
//!
//! Known gap: a connection that dies without closing (a half-open TCP connection behind a
//! NAT) is not noticed, since an idle subscriber sends nothing; wake-ups then come from the
//! reaper's visits of waited queues until the broker restarts.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{StreamExt as _, future::BoxFuture, stream::FuturesUnordered};
use redis::{
    AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, RedisResult, Value,
    aio::MultiplexedConnection, cluster::ClusterClientBuilder, cluster_async::ClusterConnection,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_util::sync::CancellationToken;

use crate::{store::connection::Subscribers, tasks::notify::Notifier};

/// How long a queue's subscription is kept after its last waiter left.
pub const LINGER: Duration = Duration::from_secs(30);

/// How often the waiters of a queue whose subscription is down look for themselves.
pub const FALLBACK_RECHECK: Duration = Duration::from_secs(1);

/// How long a subscription renewed after Redis dropped it is not trusted: a renewal sent while
/// the cluster still settles can land where the queue's messages no longer go (seen once in
/// several runs right after a `CLUSTER FAILOVER`, as a wake-up that never came). Meanwhile one
/// waiter looks every [`TICK`]; then the channel is subscribed again, where the cluster client
/// routes it by then.
pub const DISTRUST_AFTER_RENEWAL: Duration = Duration::from_secs(3);

/// How often subscriptions are looked after: lingering ones ended, down ones retried.
const TICK: Duration = Duration::from_millis(250);

/// The first wait before a failed subscription (or connection) is tried again; it doubles up to
/// [`FALLBACK_RECHECK`] (connections: 2 s) while attempts fail.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// The longest wait between two attempts to connect.
const MAX_CONNECT_RETRY: Duration = Duration::from_secs(2);

/// Keeps the subscriptions of the queues waited on in this process until `stop`.
pub async fn run(
    subscribers: Subscribers,
    prefix: String,
    notifier: Arc<Notifier>,
    timeout: Duration,
    stop: CancellationToken,
) {
    let mut listener = Listener {
        subscribers,
        prefix,
        notifier,
        timeout,
        connection: None,
        epoch: 0,
        connecting: false,
        connect_at: Instant::now(),
        connect_backoff: FIRST_RETRY,
        queues: HashMap::new(),
        work: FuturesUnordered::new(),
    };
    listener.run(&stop).await;
}

/// One subscription connection: a cluster connection routes each channel to the node serving
/// its slot; otherwise one connection to the (master) server.
#[derive(Clone)]
enum PushConnection {
    Cluster(ClusterConnection),
    Server(MultiplexedConnection),
}

impl PushConnection {
    async fn subscribe(mut self, channel: String) -> RedisResult<()> {
        match &mut self {
            Self::Cluster(conn) => conn.ssubscribe(&channel).await,
            // One channel per command: its reply is then its one confirmation.
            Self::Server(conn) => redis::cmd("SSUBSCRIBE")
                .arg(&channel)
                .query_async::<Value>(conn)
                .await
                .map(drop),
        }
    }

    async fn unsubscribe(mut self, channel: String) -> RedisResult<()> {
        match &mut self {
            Self::Cluster(conn) => conn.sunsubscribe(&channel).await,
            Self::Server(conn) => redis::cmd("SUNSUBSCRIBE")
                .arg(&channel)
                .query_async::<Value>(conn)
                .await
                .map(drop),
        }
    }
}

/// A subscription connection with the pushes it delivers, and the sentinel generation it was
/// made in (0 in the other modes).
struct Connected {
    conn: PushConnection,
    pushes: UnboundedReceiver<PushInfo>,
    generation: u64,
}

/// What a finished piece of background work reports.
enum Done {
    Connected(RedisResult<Connected>),
    Subscribed {
        epoch: u64,
        queue: String,
        result: RedisResult<()>,
    },
    Unsubscribed,
}

/// One queue's subscription.
struct QueueSubscription {
    channel: String,
    /// Confirmed by the server and not lost since.
    up: bool,
    /// A subscribe command is on its way.
    in_flight: bool,
    /// Redis dropped the channel while its subscribe was on its way: whatever that subscribe
    /// answers, it must be sent again.
    dropped_in_flight: bool,
    retry_at: Instant,
    retry_backoff: Duration,
    /// When a Lease call last waited on the queue.
    last_waited: Instant,
    /// When its waiters were last woken because the subscription was down.
    last_fallback: Instant,
    /// It was lost after it had been up, so its next success is a renewal (see
    /// [`DISTRUST_AFTER_RENEWAL`]).
    renewing: bool,
    /// A renewal is not trusted until then; at that moment the channel is subscribed again.
    distrusted_until: Option<Instant>,
}

struct Listener {
    subscribers: Subscribers,
    prefix: String,
    notifier: Arc<Notifier>,
    timeout: Duration,
    connection: Option<Connected>,
    /// Counts connections, so answers on a replaced one are ignored.
    epoch: u64,
    connecting: bool,
    connect_at: Instant,
    connect_backoff: Duration,
    /// By queue name.
    queues: HashMap<String, QueueSubscription>,
    work: FuturesUnordered<BoxFuture<'static, Done>>,
}

impl Listener {
    async fn run(&mut self, stop: &CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.start_work();
            let push = async {
                match self.connection.as_mut() {
                    Some(connected) => connected.pushes.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                push = push => self.on_push(push),
                Some(done) = self.work.next() => self.on_done(done),
                () = self.notifier.parked_queues_changed() => self.take_parked(),
                _ = tick.tick() => self.look_after(),
            }
        }
    }

    /// Starts the connection and the subscriptions that are due.
    fn start_work(&mut self) {
        let now = Instant::now();
        let Some(connected) = &self.connection else {
            if !self.connecting && now >= self.connect_at {
                self.connecting = true;
                let connect = connect(self.subscribers.clone(), self.timeout);
                self.work
                    .push(Box::pin(async move { Done::Connected(connect.await) }));
            }
            return;
        };
        for (queue, subscription) in &mut self.queues {
            if subscription.up || subscription.in_flight || now < subscription.retry_at {
                continue;
            }
            subscription.in_flight = true;
            let subscribe = connected
                .conn
                .clone()
                .subscribe(subscription.channel.clone());
            let (epoch, queue, timeout) = (self.epoch, queue.clone(), self.timeout);
            self.work.push(Box::pin(async move {
                let result = tokio::time::timeout(timeout, subscribe)
                    .await
                    .unwrap_or_else(|_| Err(timed_out()));
                Done::Subscribed {
                    epoch,
                    queue,
                    result,
                }
            }));
        }
    }

    fn on_push(&mut self, push: Option<PushInfo>) {
        let Some(push) = push else {
            // The connection's sender is gone: the same as a disconnection.
            self.lose_connection();
            return;
        };
        match push.kind {
            PushKind::SMessage => {
                if let Some(Value::BulkString(payload)) = push.data.get(1)
                    && let Some((count, queue)) = parse_message(payload)
                {
                    self.notifier.wake(queue, count);
                }
            }
            PushKind::SUnsubscribe => {
                // Ours were forgotten before they were sent, so this one is the server's: the
                // slot failed over or moved.
                let Some(channel) = push.data.first().and_then(bulk_text) else {
                    return;
                };
                if let Some(subscription) = self.queues.values_mut().find(|s| s.channel == channel)
                {
                    if subscription.up {
                        tracing::debug!(%channel, "Redis dropped a wake-up subscription; renewing it");
                        subscription.mark_down(Instant::now());
                    } else if subscription.in_flight {
                        subscription.dropped_in_flight = true;
                    }
                }
            }
            PushKind::Disconnection => match &self.connection {
                // The cluster connection reconnects its nodes itself but does not resubscribe
                // elsewhere; which node was lost is not said, so every channel is renewed (a
                // repeated SSUBSCRIBE on a live node is a no-op there).
                Some(Connected {
                    conn: PushConnection::Cluster(_),
                    ..
                }) => {
                    tracing::debug!("a cluster node's wake-up connection was lost; resubscribing");
                    let now = Instant::now();
                    for subscription in self.queues.values_mut() {
                        subscription.mark_down(now);
                    }
                }
                _ => self.lose_connection(),
            },
            _ => {}
        }
    }

    fn on_done(&mut self, done: Done) {
        let now = Instant::now();
        match done {
            Done::Connected(Ok(connected)) => {
                self.connecting = false;
                self.connect_backoff = FIRST_RETRY;
                self.epoch += 1;
                self.connection = Some(connected);
                for subscription in self.queues.values_mut() {
                    subscription.up = false;
                    subscription.in_flight = false;
                    subscription.dropped_in_flight = false;
                    subscription.retry_at = now;
                }
            }
            Done::Connected(Err(error)) => {
                self.connecting = false;
                tracing::debug!(%error, "cannot connect for wake-ups; retrying");
                self.connect_at = now + self.connect_backoff;
                self.connect_backoff = (self.connect_backoff * 2).min(MAX_CONNECT_RETRY);
            }
            Done::Subscribed {
                epoch,
                queue,
                result,
            } => {
                // A server-sent SUNSUBSCRIBE that overtook this answer must be seen first.
                self.take_pending_pushes();
                if epoch != self.epoch {
                    return;
                }
                let Some(subscription) = self.queues.get_mut(&queue) else {
                    return;
                };
                subscription.in_flight = false;
                if std::mem::take(&mut subscription.dropped_in_flight) {
                    subscription.mark_down(now);
                    return;
                }
                match result {
                    Ok(()) => {
                        subscription.up = true;
                        subscription.retry_backoff = FIRST_RETRY;
                        if std::mem::take(&mut subscription.renewing) {
                            subscription.distrusted_until = Some(now + DISTRUST_AFTER_RENEWAL);
                        }
                        // Whatever was published before this moment was not heard.
                        self.notifier.wake_everyone(&queue);
                    }
                    Err(error) => {
                        tracing::debug!(%queue, %error, "cannot subscribe to wake-ups; retrying");
                        subscription.retry_at = now + subscription.retry_backoff;
                        subscription.retry_backoff =
                            (subscription.retry_backoff * 2).min(FALLBACK_RECHECK);
                    }
                }
            }
            Done::Unsubscribed => {}
        }
    }

    /// Handles the pushes already received.
    fn take_pending_pushes(&mut self) {
        while let Some(push) = self
            .connection
            .as_mut()
            .and_then(|connected| connected.pushes.try_recv().ok())
        {
            self.on_push(Some(push));
        }
    }

    /// Adds the queues on which a Lease call started waiting.
    fn take_parked(&mut self) {
        let now = Instant::now();
        for queue in self.notifier.take_parked() {
            let subscription =
                self.queues
                    .entry(queue)
                    .or_insert_with_key(|queue| QueueSubscription {
                        channel: crate::store::keys::notify_channel(&self.prefix, queue),
                        up: false,
                        in_flight: false,
                        dropped_in_flight: false,
                        renewing: false,
                        distrusted_until: None,
                        retry_at: now,
                        retry_backoff: FIRST_RETRY,
                        last_waited: now,
                        last_fallback: now,
                    });
            subscription.last_waited = now;
        }
    }

    /// Ends lingering subscriptions, wakes the waiters of down ones, and follows a sentinel
    /// failover.
    fn look_after(&mut self) {
        let now = Instant::now();
        if let (Some(connected), Subscribers::Sentinel(master)) =
            (&self.connection, &self.subscribers)
            && master.generation() != connected.generation
        {
            tracing::debug!("the sentinels named another master; moving wake-ups there");
            self.lose_connection();
        }
        let conn = self
            .connection
            .as_ref()
            .map(|connected| connected.conn.clone());
        let connected = conn.is_some();
        let notifier = Arc::clone(&self.notifier);
        let mut ended = Vec::new();
        self.queues.retain(|queue, subscription| {
            if notifier.has_waiters(queue) {
                subscription.last_waited = now;
                let distrusted = subscription.up
                    && subscription
                        .distrusted_until
                        .is_some_and(|until| now < until);
                if subscription.up
                    && subscription
                        .distrusted_until
                        .is_some_and(|until| now >= until)
                {
                    // Subscribed again (a no-op where it already stands), without starting
                    // another period of distrust.
                    subscription.distrusted_until = None;
                    subscription.up = false;
                    subscription.retry_at = now;
                }
                // Without a connection at all, Redis is likely down too: the waiters would only
                // fail early. Its renewal wakes them all.
                if connected
                    && (distrusted
                        || (!subscription.up
                            && now >= subscription.last_fallback + FALLBACK_RECHECK))
                {
                    subscription.last_fallback = now;
                    // One looks; when it finds items ready it wakes the next (see
                    // `grpc::lease`). Waiters that end on a drained queue all look, as a
                    // drain would have told them.
                    notifier.wake(queue, 1);
                    notifier.wake(queue, 0);
                }
                return true;
            }
            if subscription.in_flight || now < subscription.last_waited + LINGER {
                return true;
            }
            // Also when it is down: the subscription may stand in Redis all the same (a subscribe
            // that timed out, or one the cluster client renews by itself).
            if let Some(conn) = &conn {
                ended.push(conn.clone().unsubscribe(subscription.channel.clone()));
            }
            false
        });
        let timeout = self.timeout;
        for unsubscribe in ended {
            self.work.push(Box::pin(async move {
                // A failed unsubscribe leaves a subscription whose messages wake nobody.
                let _ = tokio::time::timeout(timeout, unsubscribe).await;
                Done::Unsubscribed
            }));
        }
    }

    /// Drops the connection: every subscription is down until a new one is made.
    fn lose_connection(&mut self) {
        if self.connection.take().is_some() {
            tracing::warn!("wake-up subscriptions lost; subscribing again");
        }
        self.epoch += 1;
        let now = Instant::now();
        self.connect_at = now.max(self.connect_at);
        for subscription in self.queues.values_mut() {
            subscription.up = false;
            subscription.in_flight = false;
            subscription.dropped_in_flight = false;
            subscription.last_fallback = now;
        }
    }
}

impl QueueSubscription {
    fn mark_down(&mut self, now: Instant) {
        // A subscribe on its way may be answered for a subscription already lost.
        self.dropped_in_flight |= self.in_flight;
        if self.up {
            self.renewing = true;
            self.distrusted_until = None;
            // The first fallback look comes a period after the loss, by when most renewals
            // are done.
            self.last_fallback = now;
        }
        self.up = false;
        // A moment for the cluster to settle, so the renewal goes to the new owner.
        self.retry_at = now + FIRST_RETRY;
    }
}

/// Connects for wake-ups: RESP3, so that pushes arrive next to replies.
async fn connect(subscribers: Subscribers, timeout: Duration) -> RedisResult<Connected> {
    let (sender, pushes) = unbounded_channel();
    match subscribers {
        Subscribers::Nodes(nodes) => {
            let client = ClusterClientBuilder::new(nodes)
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(sender)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()?;
            let conn = tokio::time::timeout(timeout, client.get_async_connection())
                .await
                .unwrap_or_else(|_| Err(timed_out()))?;
            Ok(Connected {
                conn: PushConnection::Cluster(conn),
                pushes,
                generation: 0,
            })
        }
        Subscribers::Server(client) => {
            let conn = connect_server(&client, sender, timeout).await?;
            Ok(Connected {
                conn,
                pushes,
                generation: 0,
            })
        }
        Subscribers::Sentinel(master) => {
            let generation = master.generation();
            let client = master.master_client().await?;
            let conn = connect_server(&client, sender, timeout).await?;
            Ok(Connected {
                conn,
                pushes,
                generation,
            })
        }
    }
}

async fn connect_server(
    client: &redis::Client,
    sender: UnboundedSender<PushInfo>,
    timeout: Duration,
) -> RedisResult<PushConnection> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = redis::Client::open(info.set_redis_settings(settings))?;
    let config = AsyncConnectionConfig::new()
        .set_push_sender(sender)
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    Ok(PushConnection::Server(conn))
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "timed out"))
}

fn bulk_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        _ => None,
    }
}

/// Parses a notification message `<count>:<queue>`.
fn parse_message(payload: &[u8]) -> Option<(u64, &str)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (count, queue) = text.split_once(':')?;
    Some((count.parse().ok()?, queue))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_count_and_queue() {
        assert_eq!(parse_message(b"3:job2"), Some((3, "job2")));
        assert_eq!(parse_message(b"0:a:b"), Some((0, "a:b")));
        assert_eq!(parse_message(b"x:job2"), None);
        assert_eq!(parse_message(b"nocolon"), None);
    }
}
