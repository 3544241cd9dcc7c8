//! A classic pub/sub subscription kept up until the broker stops: the sentinel watchers' (see
//! [`super::sentinel`]). Subscribing is
//! retried with backoff; a lost subscription is renewed after a pause, so a server that drops
//! every subscription at once cannot make the loop spin.

use std::{future::Future, time::Duration};

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// The first wait after a failed attempt or a lost subscription; it doubles while attempts
/// fail.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// How long a subscription must have held for its loss to be retried after the first backoff
/// again.
const STABLE_AFTER: Duration = Duration::from_secs(1);

/// What one kept-up subscription listens to, and what it does.
pub(crate) struct Subscription<'a> {
    /// For logs.
    pub what: &'a str,
    /// The channels.
    pub channels: &'a [&'a str],
    /// How long one attempt (connect and subscribe) may take.
    pub timeout: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
}

impl Subscription<'_> {
    /// Keeps the channels subscribed until `stop`: `server(attempt)` names the server of each
    /// attempt (counted from 0), `subscribed` runs after every (re)subscription (messages sent
    /// meanwhile are lost) and `message` for each message's channel and payload.
    pub(crate) async fn keep<S, F>(
        &self,
        mut server: S,
        mut subscribed: impl FnMut(),
        mut message: impl FnMut(&str, &[u8]),
        stop: &CancellationToken,
    ) where
        S: FnMut(usize) -> F,
        F: Future<Output = redis::RedisResult<redis::Client>>,
    {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 0.. {
            if stop.is_cancelled() {
                return;
            }
            let connect = async {
                let mut pubsub = server(attempt).await?.get_async_pubsub().await?;
                pubsub.subscribe(self.channels).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            match tokio::time::timeout(self.timeout, connect).await {
                Ok(Ok(pubsub)) => {
                    let since = tokio::time::Instant::now();
                    tracing::debug!(channels = ?self.channels, "subscribed to {}", self.what);
                    subscribed();
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            next = messages.next() => match next {
                                Some(next) => {
                                    message(next.get_channel_name(), next.get_payload_bytes());
                                }
                                None => break,
                            },
                        }
                    }
                    tracing::warn!("{} subscription lost; subscribing again", self.what);
                    // Only a subscription that held for a while earns a quick renewal: a server
                    // that drops each one at once is retried with growing pauses.
                    if since.elapsed() >= STABLE_AFTER {
                        backoff = FIRST_BACKOFF;
                    }
                }
                failure => {
                    let detail = match failure {
                        Ok(Err(error)) => error.to_string(),
                        _ => "timed out".to_owned(),
                    };
                    tracing::debug!(%detail, "cannot subscribe to {}; retrying", self.what);
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}
