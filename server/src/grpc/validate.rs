//! Request validation, in one place: every check that can reject a request runs here, before
//! anything reaches Redis, and every error names the offending field.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use wq_proto::v1 as pb;

use crate::{
    config::{BrokerConfig, MAX_NAME_BYTES},
    error::{Error, Result},
    lease_id::LeaseId,
    model::{Due, NewItem},
};

/// Longest `delay`, and furthest `not_before`, an item may have.
pub const MAX_DELAY: Duration = Duration::from_secs(366 * 24 * 3600);

/// Checks a queue name: 1-128 characters of `[A-Za-z0-9._-]`.
///
/// # Errors
/// INVALID_ARGUMENT naming `queue`.
pub fn queue_name(queue: &str) -> Result<()> {
    if queue.is_empty() {
        return Err(Error::invalid("queue", "must not be empty"));
    }
    if queue.len() > MAX_NAME_BYTES {
        return Err(Error::invalid("queue", "must be at most 128 characters"));
    }
    if !queue
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(Error::invalid(
            "queue",
            "may contain only letters, digits, '.', '_' and '-'",
        ));
    }
    Ok(())
}

/// Checks an item id: 1-128 bytes without control characters.
///
/// # Errors
/// INVALID_ARGUMENT naming `field`.
pub fn item_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if id.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(field, "must be at most 128 bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// Converts a proto duration, rejecting negative and malformed ones.
fn duration(field: &str, value: Option<&prost_types::Duration>) -> Result<Option<Duration>> {
    let Some(value) = value else { return Ok(None) };
    if value.seconds < 0 || value.nanos < 0 || value.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "must be a non-negative duration"));
    }
    let seconds = u64::try_from(value.seconds).unwrap_or(0);
    let nanos = u32::try_from(value.nanos).unwrap_or(0);
    Ok(Some(Duration::new(seconds, nanos)))
}

/// Resolves a requested lease duration: unset or zero means the default, otherwise it must lie
/// within the configured bounds.
///
/// # Errors
/// INVALID_ARGUMENT naming `lease_duration`.
pub fn lease_duration(
    config: &BrokerConfig,
    value: Option<&prost_types::Duration>,
) -> Result<Duration> {
    match duration("lease_duration", value)? {
        None => Ok(config.default_lease),
        Some(d) if d.is_zero() => Ok(config.default_lease),
        Some(d) if d < config.min_lease || d > config.max_lease => Err(Error::invalid(
            "lease_duration",
            format!(
                "must lie within [{}, {}]",
                humantime::format_duration(config.min_lease),
                humantime::format_duration(config.max_lease)
            ),
        )),
        Some(d) => Ok(d),
    }
}

/// Resolves a Lease call's `max_wait` (unset means no wait).
///
/// # Errors
/// INVALID_ARGUMENT naming `max_wait`.
pub fn max_wait(config: &BrokerConfig, value: Option<&prost_types::Duration>) -> Result<Duration> {
    let wait = duration("max_wait", value)?.unwrap_or_default();
    if wait > config.max_wait {
        return Err(Error::invalid(
            "max_wait",
            format!(
                "must be at most {}",
                humantime::format_duration(config.max_wait)
            ),
        ));
    }
    Ok(wait)
}

/// Resolves a Lease call's `max_items` (0 means 1).
///
/// # Errors
/// INVALID_ARGUMENT naming `max_items`.
pub fn max_items(config: &BrokerConfig, value: u32) -> Result<u32> {
    if value > config.max_lease_items {
        return Err(Error::invalid(
            "max_items",
            format!("must be at most {}", config.max_lease_items),
        ));
    }
    Ok(value.max(1))
}

/// Checks a worker id (optional, at most 128 bytes, printable).
///
/// # Errors
/// INVALID_ARGUMENT naming `worker_id`.
pub fn worker_id(value: &str) -> Result<()> {
    if value.is_empty() {
        return Ok(());
    }
    item_id("worker_id", value)
}

/// Checks the count of a batch field.
///
/// # Errors
/// INVALID_ARGUMENT naming `field` when the batch is empty or too long.
pub fn batch_len(config: &BrokerConfig, field: &str, len: usize) -> Result<()> {
    if len == 0 {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if len > config.max_batch {
        return Err(Error::invalid(
            field,
            format!("must hold at most {} entries", config.max_batch),
        ));
    }
    Ok(())
}

/// Validates an Enqueue batch and resolves its defaults. One bad item rejects the whole batch.
///
/// # Errors
/// INVALID_ARGUMENT naming the item and field, e.g. `items[3].delay`.
pub fn enqueue_items(config: &BrokerConfig, items: Vec<pb::EnqueueItem>) -> Result<Vec<NewItem>> {
    batch_len(config, "items", items.len())?;
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| enqueue_item(config, index, item))
        .collect()
}

fn enqueue_item(config: &BrokerConfig, index: usize, item: pb::EnqueueItem) -> Result<NewItem> {
    let field = |name: &str| format!("items[{index}].{name}");
    let id = if item.id.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        item_id(&field("id"), &item.id)?;
        item.id
    };
    if item.payload.len() > config.max_payload_bytes {
        return Err(Error::invalid(
            &field("payload"),
            format!("must be at most {} bytes", config.max_payload_bytes),
        ));
    }
    let due = match (item.delay.as_ref(), item.not_before.as_ref()) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid(
                &field("delay"),
                "must not be set together with not_before",
            ));
        }
        (Some(_), None) => {
            let delay = duration(&field("delay"), item.delay.as_ref())?.unwrap_or_default();
            if delay > MAX_DELAY {
                return Err(Error::invalid(&field("delay"), "must be at most 366 days"));
            }
            Due::After(delay)
        }
        (None, Some(at)) => Due::At(not_before_ms(&field("not_before"), at)?),
        (None, None) => Due::Now,
    };
    let headers = headers(config, &field("headers"), item.headers)?;
    let max_attempts = if item.max_attempts == 0 {
        config.default_max_attempts
    } else {
        item.max_attempts
    };
    Ok(NewItem {
        id,
        payload: item.payload,
        priority: item.priority,
        due,
        max_attempts,
        headers,
    })
}

fn not_before_ms(field: &str, at: &prost_types::Timestamp) -> Result<i64> {
    if at.seconds < 0 || at.nanos < 0 || at.nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "must be a valid time after 1970"));
    }
    let limit = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        + MAX_DELAY;
    if u64::try_from(at.seconds).unwrap_or(u64::MAX) > limit.as_secs() {
        return Err(Error::invalid(
            field,
            "must be at most 366 days in the future",
        ));
    }
    Ok(at.seconds * 1000 + i64::from(at.nanos / 1_000_000))
}

/// Encodes headers for storage (an opaque JSON object; empty when there are none).
fn headers(
    config: &BrokerConfig,
    field: &str,
    headers: std::collections::HashMap<String, String>,
) -> Result<Bytes> {
    if headers.is_empty() {
        return Ok(Bytes::new());
    }
    if headers.len() > config.max_headers {
        return Err(Error::invalid(
            field,
            format!("must hold at most {} entries", config.max_headers),
        ));
    }
    let size: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > config.max_header_bytes {
        return Err(Error::invalid(
            field,
            format!(
                "must total at most {} bytes of names and values",
                config.max_header_bytes
            ),
        ));
    }
    if headers.keys().any(String::is_empty) {
        return Err(Error::invalid(field, "names must not be empty"));
    }
    let sorted: BTreeMap<String, String> = headers.into_iter().collect();
    serde_json::to_vec(&sorted)
        .map(Bytes::from)
        .map_err(|e| Error::Internal(format!("encoding headers: {e}")))
}

/// Decodes stored headers (see [`headers`]).
pub fn decode_headers(raw: Option<&[u8]>) -> std::collections::HashMap<String, String> {
    raw.filter(|raw| !raw.is_empty())
        .and_then(|raw| serde_json::from_slice(raw).ok())
        .unwrap_or_default()
}

/// Decodes the lease ids of a call, all of which must belong to `queue`.
///
/// # Errors
/// INVALID_ARGUMENT naming the entry (e.g. `lease_ids[2]`) when one is malformed or belongs to
/// another queue; the whole call is rejected.
pub fn lease_ids<'a>(
    queue: &str,
    field: &str,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<LeaseId>> {
    ids.into_iter()
        .enumerate()
        .map(|(index, text)| lease_id(queue, &format!("{field}[{index}]"), text))
        .collect()
}

/// Decodes one lease id, which must belong to `queue`.
///
/// # Errors
/// INVALID_ARGUMENT naming `field`.
pub fn lease_id(queue: &str, field: &str, text: &str) -> Result<LeaseId> {
    let lease = LeaseId::decode(text).map_err(|e| Error::invalid(field, e))?;
    if lease.queue != queue {
        return Err(Error::invalid(
            field,
            format!("belongs to another queue, not {queue:?}"),
        ));
    }
    Ok(lease)
}

/// Checks a completion result's size.
///
/// # Errors
/// INVALID_ARGUMENT naming `field`.
pub fn result_payload(config: &BrokerConfig, field: &str, result: &[u8]) -> Result<()> {
    if result.len() > config.max_payload_bytes {
        return Err(Error::invalid(
            field,
            format!("must be at most {} bytes", config.max_payload_bytes),
        ));
    }
    Ok(())
}

/// Truncates a Fail error text to the configured limit, at a character boundary.
pub fn error_text(config: &BrokerConfig, text: &str) -> String {
    if text.len() <= config.max_error_bytes {
        return text.to_owned();
    }
    let mut end = config.max_error_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Resolves a Fail call's `retry_delay` (None = backoff).
///
/// # Errors
/// INVALID_ARGUMENT naming `retry_delay`.
pub fn retry_delay(value: Option<&prost_types::Duration>) -> Result<Option<Duration>> {
    let delay = duration("retry_delay", value)?;
    if delay.is_some_and(|d| d > MAX_DELAY) {
        return Err(Error::invalid("retry_delay", "must be at most 366 days"));
    }
    Ok(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_follow_the_documented_alphabet() {
        assert!(queue_name("job-2_a.b").is_ok());
        for bad in ["", "a b", "a{b}", "ä", &"x".repeat(129)] {
            let err = queue_name(bad).expect_err(bad);
            assert!(err.to_string().starts_with("queue:"), "{err}");
        }
        assert!(queue_name(&"x".repeat(128)).is_ok());
    }

    #[test]
    fn error_text_truncates_on_a_char_boundary() {
        let config = BrokerConfig {
            max_error_bytes: 3,
            ..BrokerConfig::default()
        };
        assert_eq!(error_text(&config, "aéz"), "aé");
        assert_eq!(error_text(&config, "ab"), "ab");
    }
}
