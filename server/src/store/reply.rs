//! Decoding of script replies (`redis::Value`) into plain Rust values. A reply of an unexpected
//! shape is an internal error, never a panic.

use bytes::Bytes;
use redis::Value;

use crate::error::{Error, Result};

fn shape(what: &str, value: &Value) -> Error {
    Error::Internal(format!("unexpected script reply for {what}: {value:?}"))
}

/// The elements of an array reply.
pub fn array(what: &str, value: Value) -> Result<Vec<Value>> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        other => Err(shape(what, &other)),
    }
}

/// An integer reply (Redis sometimes sends integers as strings).
pub fn int(what: &str, value: &Value) -> Result<i64> {
    match value {
        Value::Int(n) => Ok(*n),
        Value::BulkString(raw) => std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| shape(what, value)),
        other => Err(shape(what, other)),
    }
}

/// A non-negative integer reply.
pub fn uint(what: &str, value: &Value) -> Result<u64> {
    u64::try_from(int(what, value)?).map_err(|_| shape(what, value))
}

/// A 32-bit unsigned integer reply.
pub fn u32_of(what: &str, value: &Value) -> Result<u32> {
    u32::try_from(int(what, value)?).map_err(|_| shape(what, value))
}

/// A bulk string reply as bytes; nil is None.
pub fn opt_bytes(what: &str, value: Value) -> Result<Option<Bytes>> {
    match value {
        Value::Nil => Ok(None),
        Value::BulkString(raw) => Ok(Some(Bytes::from(raw))),
        Value::SimpleString(s) => Ok(Some(Bytes::from(s))),
        other => Err(shape(what, &other)),
    }
}

/// A bulk string reply as bytes; nil is empty.
pub fn bytes(what: &str, value: Value) -> Result<Bytes> {
    Ok(opt_bytes(what, value)?.unwrap_or_default())
}

/// A bulk string reply as UTF-8 text.
pub fn text(what: &str, value: Value) -> Result<String> {
    let raw = bytes(what, value)?;
    String::from_utf8(raw.to_vec()).map_err(|_| Error::Internal(format!("{what} is not UTF-8")))
}

/// A list of 0/1 flags.
pub fn flags(what: &str, values: &[Value]) -> Result<Vec<bool>> {
    values.iter().map(|v| Ok(int(what, v)? == 1)).collect()
}

/// A flat field/value list (HGETALL) as pairs of text and bytes.
pub fn pairs(what: &str, value: Value) -> Result<Vec<(String, Bytes)>> {
    let items = match value {
        Value::Map(entries) => entries.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        other => array(what, other)?,
    };
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut iter = items.into_iter();
    while let (Some(field), Some(value)) = (iter.next(), iter.next()) {
        out.push((text(what, field)?, bytes(what, value)?));
    }
    Ok(out)
}
