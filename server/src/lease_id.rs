//! The opaque `lease_id` handed to workers: which queue, which item, and the fencing token of one
//! grant, packed into a URL-safe string.
//!
//! Layout before base64url (no padding): `1` (format version), queue length (1 byte), queue,
//! token length (1 byte), token, item id (the rest). Carrying the queue lets the broker reject a
//! lease id presented to the wrong queue before touching Redis.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

const VERSION: u8 = 1;

/// A decoded lease id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseId {
    /// The queue the item belongs to.
    pub queue: String,
    /// The item's id.
    pub item_id: String,
    /// The grant's fencing token, as stored in the item while the lease is live.
    pub token: String,
}

/// Why a lease id could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseIdError {
    /// Not a lease id this broker issued (bad encoding, version or layout).
    #[error("is not a lease id issued by this broker")]
    Malformed,
}

impl LeaseId {
    /// Encodes the lease id. Queue and token are at most 255 bytes (queue names are at most 128).
    pub fn encode(queue: &str, item_id: &str, token: &str) -> String {
        let mut raw = Vec::with_capacity(3 + queue.len() + token.len() + item_id.len());
        raw.push(VERSION);
        push_short(&mut raw, queue.as_bytes());
        push_short(&mut raw, token.as_bytes());
        raw.extend_from_slice(item_id.as_bytes());
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Decodes a lease id.
    ///
    /// # Errors
    /// [`LeaseIdError::Malformed`] when `text` is not a lease id in this format.
    pub fn decode(text: &str) -> Result<Self, LeaseIdError> {
        let raw = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| LeaseIdError::Malformed)?;
        let (&version, rest) = raw.split_first().ok_or(LeaseIdError::Malformed)?;
        if version != VERSION {
            return Err(LeaseIdError::Malformed);
        }
        let (queue, rest) = take_short(rest)?;
        let (token, item_id) = take_short(rest)?;
        let text =
            |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|_| LeaseIdError::Malformed);
        let lease = Self {
            queue: text(queue)?,
            token: text(token)?,
            item_id: text(item_id)?,
        };
        if lease.queue.is_empty() || lease.token.is_empty() || lease.item_id.is_empty() {
            return Err(LeaseIdError::Malformed);
        }
        Ok(lease)
    }
}

fn push_short(raw: &mut Vec<u8>, bytes: &[u8]) {
    let len = u8::try_from(bytes.len()).unwrap_or(u8::MAX);
    raw.push(len);
    raw.extend_from_slice(&bytes[..usize::from(len)]);
}

fn take_short(raw: &[u8]) -> Result<(&[u8], &[u8]), LeaseIdError> {
    let (&len, rest) = raw.split_first().ok_or(LeaseIdError::Malformed)?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(LeaseIdError::Malformed);
    }
    Ok(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_url_safe() {
        let encoded = LeaseId::encode("job2", "ä/b?c=d {x}", "0123456789abcdef3");
        assert!(
            encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        let decoded = LeaseId::decode(&encoded).expect("a freshly encoded lease id decodes");
        assert_eq!(decoded.queue, "job2");
        assert_eq!(decoded.item_id, "ä/b?c=d {x}");
        assert_eq!(decoded.token, "0123456789abcdef3");
    }

    #[test]
    fn rejects_garbage_truncation_and_other_versions() {
        for bad in ["", "!!!", "AA", "not-a-lease"] {
            assert_eq!(
                LeaseId::decode(bad),
                Err(LeaseIdError::Malformed),
                "{bad:?}"
            );
        }
        let good = LeaseId::encode("q", "id", "tok");
        assert_eq!(
            LeaseId::decode(&good[..good.len() - 3]),
            Err(LeaseIdError::Malformed)
        );
        let mut raw = URL_SAFE_NO_PAD.decode(&good).expect("valid base64");
        raw[0] = 2;
        assert_eq!(
            LeaseId::decode(&URL_SAFE_NO_PAD.encode(raw)),
            Err(LeaseIdError::Malformed)
        );
    }
}
