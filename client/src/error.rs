//! What client calls fail with, and how a failure reads: one line naming its cause, with the
//! TLS failures that no retry can fix told apart from a broker that is merely away.

use std::{error::Error as StdError, time::Duration};

use tonic::{Code, Status};

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker URL cannot be used.
    #[error("invalid broker URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The TLS files or the token cannot be used.
    #[error("{0}")]
    Credentials(String),
    /// A connection setting cannot be used (a zero message limit or deadline).
    #[error("{0}")]
    InvalidOption(String),
    /// TLS with the broker failed: its certificate is not trusted, it refused ours, or the URL's
    /// scheme does not match what the port speaks. Retrying with the same settings cannot help.
    #[error("TLS with the broker at {url} failed: {reason}")]
    Tls {
        /// The broker URL.
        url: String,
        /// The cause in words, with the TLS library's own wording in parentheses.
        reason: String,
    },
    /// The broker could not be reached.
    #[error("cannot reach the broker at {url}: {}", causes(.source))]
    Connect {
        /// The URL.
        url: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The broker did not answer within the call's deadline (a frozen broker, or a network
    /// that drops packets, rather than one that refuses connections).
    #[error("the broker did not answer {call} within {}", humantime::format_duration(*.after))]
    Deadline {
        /// The RPC, e.g. `QueueState`.
        call: &'static str,
        /// The deadline it had.
        after: Duration,
    },
    /// The broker answered with an error status, or the call failed on the way.
    #[error("{}", status_line(.0))]
    Status(#[from] Status),
}

impl Error {
    /// The gRPC status code, when the broker answered (DEADLINE_EXCEEDED for
    /// [`Error::Deadline`]).
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status(status) => Some(status.code()),
            Self::Deadline { .. } => Some(Code::DeadlineExceeded),
            _ => None,
        }
    }

    /// Whether the broker refused a batch call for its size, so that smaller batches would
    /// pass: a batch limit (INVALID_ARGUMENT "at most … entries"; one about a single item, say
    /// its result, is no batch limit) or the message limit (RESOURCE_EXHAUSTED "message length
    /// too large"; the code alone also means a busy broker). Like [`broker_busy`], this reads
    /// the broker's wording.
    pub fn is_batch_too_large(&self) -> bool {
        let Self::Status(status) = self else {
            return false;
        };
        let message = status.message();
        (status.code() == Code::InvalidArgument
            && message.contains("at most")
            && message.contains("entries"))
            || (status.code() == Code::ResourceExhausted
                && message.contains("message length too large"))
    }

    /// Whether the caller's own settings cannot work (a bad URL or option, unreadable
    /// credentials, a TLS handshake refused on certificates): retrying would not help.
    pub fn is_settings_error(&self) -> bool {
        matches!(
            self,
            Self::InvalidUrl { .. }
                | Self::Credentials(_)
                | Self::InvalidOption(_)
                | Self::Tls { .. }
        )
    }
}

/// Result of client calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `error` and its sources as one line: each cause once, joined by `: `, without the debug
/// dumps a [`Status`] prints and without the segments a chain repeats ("transport error:
/// transport error"). The binaries print every error through this.
///
/// An [`Error`] already spells out its own causes, so the walk stops there.
pub fn one_line(error: &(dyn StdError + 'static)) -> String {
    let mut line = Line::default();
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(status) = error.downcast_ref::<Status>() {
            line.push(&status_line(status));
            break;
        }
        line.push(&error.to_string());
        if error.is::<Error>() {
            break;
        }
        next = error.source();
    }
    line.0
}

/// An error message built from segments, skipping repeats.
#[derive(Default)]
struct Line(String);

impl Line {
    fn push(&mut self, text: &str) {
        // One line: newlines and runs of spaces in a cause become single spaces.
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.is_empty() || self.0.contains(&text) {
            return;
        }
        if !self.0.is_empty() {
            self.0.push_str(": ");
        }
        self.0.push_str(&text);
    }
}

/// `error` and its sources, deduplicated, as a line.
fn causes(error: &(dyn StdError + 'static)) -> String {
    let mut line = Line::default();
    line.push_chain(error);
    line.0
}

impl Line {
    /// Pushes `error` and each of its sources.
    fn push_chain(&mut self, error: &(dyn StdError + 'static)) {
        let mut next = Some(error);
        while let Some(error) = next {
            self.push(&error.to_string());
            next = error.source();
        }
    }
}

/// A status as one line. Statuses made on this side of the connection (tonic's transport
/// failures) carry their cause as a source, which the message alone ("transport error") hides.
fn status_line(status: &Status) -> String {
    let mut line = Line::default();
    line.push(match (status.code(), status.source()) {
        (Code::Unavailable, _) => "broker unavailable",
        (_, Some(_)) => "the connection to the broker failed",
        (code, None) => code_name(code),
    });
    line.push(status.message());
    if let Some(source) = status.source() {
        line.push_chain(source);
    }
    line.0
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "not implemented",
        Code::Internal => "internal error",
        Code::Unavailable => "broker unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Whether `status` is the broker saying it is momentarily too busy for this call: its byte
/// budget for calls in flight (`--max-buffered-bytes`, or one connection's share of it) or its
/// Redis calls in flight (`--max-redis-in-flight`) were full. The broker refuses these before
/// the call has any effect, and they pass as calls end, so retrying with backoff is right.
/// Other RESOURCE_EXHAUSTED answers (a message over `--max-message-bytes`, a queue at
/// `--max-queue-length`, waiting-Lease limits) would fail again. The broker names the limit's
/// flag in every such message; that is what this matches, as the status has no other marker.
pub(crate) fn broker_busy(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted
        && ["(--max-buffered-bytes", "(--max-redis-in-flight"]
            .iter()
            .any(|flag| status.message().contains(flag))
}

/// Why TLS failed, in words, when `error` or one of its sources is a TLS failure that no retry
/// with the same settings can fix.
///
/// This reads rustls' wording rather than matching its error type, because on an established
/// connection h2 keeps only the text of the I/O error that carried it.
pub(crate) fn tls_failure(error: &(dyn StdError + 'static)) -> Option<String> {
    const MARKERS: [&str; 5] = [
        "received fatal alert: ",
        "invalid peer certificate: ",
        "received corrupt message",
        "peer is incompatible",
        "peer misbehaved",
    ];
    let mut next = Some(error);
    while let Some(error) = next {
        next = error.source();
        // A Status prints its source's debug dump; its source is read next anyway.
        if error.is::<Status>() {
            continue;
        }
        let text = error.to_string();
        let Some(start) = MARKERS.iter().filter_map(|m| text.find(m)).min() else {
            continue;
        };
        let cause = &text[start..];
        if let Some(hint) = tls_hint(cause) {
            return Some(format!("{hint} ({cause})"));
        }
    }
    None
}

fn tls_hint(text: &str) -> Option<&'static str> {
    if let Some(alert) = text.strip_prefix("received fatal alert: ") {
        // The alert's name, e.g. `CertificateRequired`, without whatever text follows it.
        let alert = alert
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or_default();
        return Some(match alert {
            "CertificateRequired" => {
                "the broker requires a client certificate: pass --client-cert and --client-key"
            }
            "BadCertificate"
            | "DecryptError"
            | "UnknownCA"
            | "CertificateUnknown"
            | "UnsupportedCertificate"
            | "CertificateRevoked"
            | "CertificateExpired"
            | "AccessDenied" => {
                "the broker refused our client certificate: is --client-cert signed by the CA \
                 the broker trusts?"
            }
            _ => "the broker refused the TLS handshake (versions or ciphers that do not match?)",
        });
    }
    if let Some(problem) = text.strip_prefix("invalid peer certificate: ") {
        return Some(
            if ["UnknownIssuer", "BadSignature", "UnknownRevocationStatus"]
                .iter()
                .any(|p| problem.contains(p))
            {
                "the broker's certificate is not signed by a CA we trust: pass its CA with \
                 --ca-file"
            } else if problem.contains("NotValidForName") || problem.contains("not valid for name")
            {
                "the broker's certificate does not name the host in the broker URL"
            } else if problem.contains("Expired") || problem.contains("NotValidYet") {
                "the broker's certificate has expired or is not valid yet"
            } else {
                "the broker's certificate is not acceptable"
            },
        );
    }
    if text.starts_with("received corrupt message") {
        return Some("the broker does not speak TLS on this port: use an http:// URL");
    }
    if text.starts_with("peer is incompatible") || text.starts_with("peer misbehaved") {
        return Some("the broker's TLS does not match ours (versions or ciphers)");
    }
    None
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_the_brokers_momentary_limits_count_as_busy() {
        let busy = [
            "this connection's calls hold too many bytes (--max-buffered-bytes-per-connection \
             25165824); retry when some have ended, or spread calls over more connections",
            "the broker's calls hold too many bytes (--max-buffered-bytes 100663296); retry later",
            "the broker is busy: 1024 Redis calls in flight (--max-redis-in-flight) for over 2s",
        ];
        for message in busy {
            assert!(
                broker_busy(&Status::resource_exhausted(message)),
                "{message}"
            );
            assert!(
                !broker_busy(&Status::invalid_argument(message)),
                "{message}"
            );
        }
        for message in [
            "queue \"q\" is full: it holds 10 items and this batch would add 5, past \
             --max-queue-length 10; nothing was enqueued",
            "request message of 20000000 bytes is over --max-message-bytes 16777216",
            "message length too large: found 20000000 bytes, the limit is: 16777216 bytes",
        ] {
            assert!(
                !broker_busy(&Status::resource_exhausted(message)),
                "{message}"
            );
        }
    }
    use super::*;

    #[test]
    fn a_line_skips_repeated_and_empty_segments() {
        let mut line = Line::default();
        for segment in ["transport error", "transport error", "", "a\n  b"] {
            line.push(segment);
        }
        assert_eq!(line.0, "transport error: a b");
    }

    #[test]
    fn one_line_stops_at_a_status_without_its_debug_dump() {
        let status = Status::unavailable("tcp connect error");
        assert_eq!(one_line(&status), "broker unavailable: tcp connect error");
        let error = Error::from(Status::not_found("queue q"));
        assert_eq!(one_line(&error), "not found: queue q");
        // tonic's own transport failures: message "transport error", source "transport error".
        let mut status = Status::unknown("transport error");
        status.set_source(std::sync::Arc::new(std::io::Error::other(
            "transport error",
        )));
        assert_eq!(
            one_line(&status),
            "the connection to the broker failed: transport error"
        );
    }

    #[test]
    fn tls_failures_are_named_and_others_are_not() {
        let required = std::io::Error::other("received fatal alert: CertificateRequired");
        let reason = tls_failure(&required).expect("a TLS failure");
        assert!(reason.contains("--client-cert"), "{reason}");
        let untrusted = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        assert!(
            tls_failure(&untrusted)
                .is_some_and(|r| r.contains("--ca-file") && r.contains("UnknownIssuer"))
        );
        let refused = std::io::Error::other("Connection refused (os error 111)");
        assert_eq!(tls_failure(&refused), None);
        // Inside a Status, and behind a wrapper's words.
        let mut status = Status::unknown("transport error");
        status.set_source(std::sync::Arc::new(std::io::Error::other(
            "tls handshake: received fatal alert: DecryptError",
        )));
        assert_eq!(
            tls_failure(&status).as_deref(),
            Some(
                "the broker refused our client certificate: is --client-cert signed by the CA \
                 the broker trusts? (received fatal alert: DecryptError)"
            )
        );
    }
}
