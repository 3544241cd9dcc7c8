//! Bearer-token authentication and role-based authorization.
//!
//! A token file (`--auth-tokens`, typically a Kubernetes Secret mounted as a file) lists who may
//! call the broker. One grant per line, fields separated by whitespace, `#` starts a comment:
//!
//! ```text
//! # token                          name        roles            queues (optional globs)
//! 9f2c6d0e5b1a4c7e8d3f2a1b0c9d8e7f  seeder      producer         batch-*
//! 4b3a2c1d0e9f8a7b6c5d4e3f2a1b0c9d  job-worker  worker,producer  batch-*
//! 0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d  ops         admin
//! ```
//!
//! Roles: `producer` (Enqueue, QueueState, GetItem), `worker` (Lease, ExtendLease, Complete,
//! Fail, Release, QueueState), `sealer` (SealQueue: a producer that is done closes its queue,
//! without any other admin right) and `admin` (everything, QueueAdminService included). Queue
//! patterns are shell globs (`*`, `?`, `[…]`); without any the grant covers every queue.
//!
//! Names are 1–64 characters of `[A-Za-z0-9._-]`, and a line whose token and name were swapped
//! is refused, so that a token does not become a name that logs and error messages show. A
//! name shorter than [`MIN_TOKEN_BYTES`] cannot be a token (swapped, the token field would be
//! too short). A longer one must [read as words](reads_like_name), and its token must not:
//! swapped, such a line has a token that reads as words or a name that does not. One swap
//! cannot be told from a valid line: a token that itself reads as words (a passphrase such as
//! `correct-horse-battery-staple`) written before a long name that does not
//! (`Worker2Prod-cluster`) loads with the passphrase as its name. Random tokens (`openssl rand
//! -hex 32`, UUIDs, base64) never read as words, so with them every swap is refused.
//!
//! [`Gate`] runs in front of every service as a tower layer: it answers UNAUTHENTICATED
//! without a valid `authorization: Bearer …` header and PERMISSION_DENIED for a method outside
//! the caller's roles, and leaves a [`Caller`] in the request's extensions so that handlers can
//! check the queue they were asked about with [`admit`]. The health service is always
//! open (probes carry no token); reflection is open, token-guarded or off by configuration.
//! Tokens are compared in constant time and never logged, and no message about the file quotes
//! any of its fields (only line numbers and field positions). The file is re-read while the
//! broker runs, so a rotated Secret takes effect without a restart; see [`Tokens::reload`] for
//! what a broken, unreadable or vanished file means.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status, body::Body};
use wq_proto::v1 as pb;

use crate::grpc::validate;

/// A flag value, so it lives in [`crate::config`]; kept here for its public path.
pub use crate::config::ReflectionAccess;

/// Shortest token accepted in the file: guessing must stay out of reach.
pub const MIN_TOKEN_BYTES: usize = 16;

/// Longest grant name: names of existing token files, such as `batch-seeder.eu-west-1`, fit.
pub const MAX_NAME_BYTES: usize = 64;

/// Longest part of a name, between separators, that may mix letters and digits freely (`k8s`).
const SHORT_WORD_BYTES: usize = 3;

/// Whether `text` reads as a name rather than a random token: words separated by `.`, `_` or
/// `-`, each letters followed by digits (`worker`, `eu`, `west1`, `2024`) or at most
/// [`SHORT_WORD_BYTES`] characters of anything. Random tokens practically never do (a hex
/// token would need all its letters before all its digits); passphrase-like tokens do, and are
/// then refused beside a long name (see the module documentation).
pub fn reads_like_name(text: &str) -> bool {
    text.split(['.', '_', '-']).all(|word| {
        let digits_from = word
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(word.len());
        let (letters, digits) = word.split_at(digits_from);
        word.len() <= SHORT_WORD_BYTES
            || (letters.bytes().all(|b| b.is_ascii_alphabetic())
                && digits.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// What a role allows, as a set of bits so a grant can hold several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles(u8);

impl Roles {
    /// Enqueue, QueueState, GetItem.
    pub const PRODUCER: Self = Self(1);
    /// Lease, ExtendLease, Complete, Fail, Release, QueueState.
    pub const WORKER: Self = Self(2);
    /// Everything.
    pub const ADMIN: Self = Self(4);
    /// SealQueue, on the queues the grant's patterns allow.
    pub const SEALER: Self = Self(8);

    /// Whether any role of `self` is in `other`.
    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The roles of a comma-separated list, or None when one is unknown (the caller reports
    /// it without quoting the field).
    fn parse(text: &str) -> Option<Self> {
        text.split(',').try_fold(Self::default(), |roles, role| {
            let role = match role {
                "producer" => Self::PRODUCER,
                "worker" => Self::WORKER,
                "sealer" => Self::SEALER,
                "admin" => Self::ADMIN,
                _ => return None,
            };
            Some(roles.union(role))
        })
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (Self::PRODUCER, "producer"),
            (Self::WORKER, "worker"),
            (Self::SEALER, "sealer"),
            (Self::ADMIN, "admin"),
        ]
        .into_iter()
        .filter(|(role, _)| self.intersects(*role))
        .map(|(_, name)| name)
        .collect();
        f.write_str(&names.join(","))
    }
}

/// An authenticated caller: the grant its token matched. Handlers find it in the request's
/// extensions; without one the broker runs open and everything is allowed.
#[derive(Debug, Clone)]
pub struct Caller(Arc<Grant>);

impl Caller {
    /// The grant's name from the token file (safe to log).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Whether this caller may touch `queue`.
    pub fn may_use_queue(&self, queue: &str) -> bool {
        self.0.queues.is_empty() || self.0.queues.iter().any(|p| p.matches(queue))
    }

    /// Whether this caller is limited to some queues (ListQueues filters then).
    pub fn is_limited(&self) -> bool {
        !self.0.queues.is_empty()
    }
}

/// The caller of `request`, when the broker authenticates.
pub fn caller<T>(request: &Request<T>) -> Option<&Caller> {
    request.extensions().get::<Caller>()
}

/// Request messages that name the one queue they act on.
pub trait QueueScoped {
    /// The queue named by the request.
    fn queue(&self) -> &str;
}

macro_rules! queue_scoped {
    ($($message:ident),* $(,)?) => {
        $(impl QueueScoped for pb::$message {
            fn queue(&self) -> &str {
                &self.queue
            }
        })*
    };
}

queue_scoped!(
    EnqueueRequest,
    LeaseRequest,
    ExtendLeaseRequest,
    CompleteRequest,
    FailRequest,
    ReleaseRequest,
    QueueStateRequest,
    GetItemRequest,
    ListItemsRequest,
    RequeueDeadRequest,
    PurgeQueueRequest,
    PauseQueueRequest,
    ResumeQueueRequest,
    SealQueueRequest,
    DeleteQueueRequest,
);

/// Checks the queue name of a request, then that its caller (if the broker authenticates at
/// all) may use that queue, and unwraps the message.
///
/// # Errors
/// INVALID_ARGUMENT naming `queue`, or PERMISSION_DENIED naming the caller and the queue.
pub fn admit<T: QueueScoped>(request: Request<T>) -> Result<T, Status> {
    let queue = request.get_ref().queue();
    validate::queue_name(queue)?;
    if let Some(caller) = caller(&request) {
        // Every log line of the call then says who made it.
        tracing::Span::current().record("caller", caller.name());
    }
    match caller(&request) {
        Some(caller) if !caller.may_use_queue(queue) => Err(Status::permission_denied(format!(
            "caller {:?} may not use queue {queue:?}",
            caller.name()
        ))),
        _ => Ok(request.into_inner()),
    }
}

/// One line of the token file, without the token.
#[derive(Debug)]
struct Grant {
    name: String,
    roles: Roles,
    queues: Vec<glob::Pattern>,
}

/// The parsed token file.
#[derive(Default)]
pub struct TokenTable {
    entries: Vec<(Vec<u8>, Arc<Grant>)>,
}

impl fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the tokens themselves.
        let names: Vec<&str> = self.entries.iter().map(|(_, g)| g.name.as_str()).collect();
        f.debug_struct("TokenTable")
            .field("grants", &names)
            .finish()
    }
}

impl TokenTable {
    /// Parses the token file format described in the module documentation.
    ///
    /// # Errors
    /// A message naming the line, the field's position and what is wrong with it. It never
    /// quotes a field: with fields in the wrong order, any of them may be a token.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries: Vec<(Vec<u8>, Arc<Grant>)> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(token), Some(name), Some(roles)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!(
                    "line {line_no}: expected `TOKEN NAME ROLES [QUEUE-PATTERN…]`"
                ));
            };
            if token.len() < MIN_TOKEN_BYTES {
                return Err(format!(
                    "line {line_no}: field 1 (the token) must be at least {MIN_TOKEN_BYTES} \
                     characters; the fields are TOKEN NAME ROLES [QUEUE-PATTERN…], in this order"
                ));
            }
            let name_ok = name.len() <= MAX_NAME_BYTES
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !name_ok {
                return Err(format!(
                    "line {line_no}: field 2 (the name) must be 1-{MAX_NAME_BYTES} characters of \
                     [A-Za-z0-9._-]; the fields are TOKEN NAME ROLES [QUEUE-PATTERN…], in this \
                     order"
                ));
            }
            // Both checks refuse a line that may have been written with token and name
            // swapped; neither says more than which rule failed.
            if name.len() >= MIN_TOKEN_BYTES && !reads_like_name(name) {
                return Err(format!(
                    "line {line_no}: field 2 (the name) is {MIN_TOKEN_BYTES} characters or more \
                     and does not read as words (letters then digits, separated by . _ or -), \
                     so it could be a token in the wrong field; use such words, or a name under \
                     {MIN_TOKEN_BYTES} characters"
                ));
            }
            if name.len() >= MIN_TOKEN_BYTES && reads_like_name(token) {
                return Err(format!(
                    "line {line_no}: field 1 (the token) reads as words, like a name, and field 2 \
                     (the name) is {MIN_TOKEN_BYTES} characters or more, so they could be \
                     swapped; use a random token (openssl rand -hex 32), or a name under \
                     {MIN_TOKEN_BYTES} characters"
                ));
            }
            let roles = Roles::parse(roles).ok_or_else(|| {
                format!(
                    "line {line_no}: field 3 (the roles) must be a comma-separated list of \
                     producer, worker, sealer and admin"
                )
            })?;
            let queues = fields
                .enumerate()
                .map(|(index, pattern)| {
                    glob::Pattern::new(pattern).map_err(|e| {
                        format!(
                            "line {line_no}: field {} (a queue pattern) is not a valid glob: {e}",
                            index + 4
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            if entries
                .iter()
                .any(|(known, _)| bool::from(known.as_slice().ct_eq(token.as_bytes())))
            {
                return Err(format!(
                    "line {line_no}: field 1 (the token) is the token of an earlier line too"
                ));
            }
            let grant = Grant {
                name: name.to_owned(),
                roles,
                queues,
            };
            entries.push((token.as_bytes().to_vec(), Arc::new(grant)));
        }
        if entries.is_empty() {
            return Err(
                "the token file holds no tokens; without any, every call would be refused".into(),
            );
        }
        Ok(Self { entries })
    }

    /// Reads and parses a token file.
    ///
    /// # Errors
    /// A message naming the file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// The grant whose token equals `presented`. Every entry is compared, each in constant
    /// time, so the answer's timing says nothing about which token came close.
    fn find(&self, presented: &[u8]) -> Option<Caller> {
        let mut found = None;
        for (token, grant) in &self.entries {
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = Some(Caller(Arc::clone(grant)));
            }
        }
        found
    }

    /// How many grants the table holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table holds no grants (never true for a parsed file; true once a vanished
    /// file's tokens were revoked).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What a method requires.
enum Access {
    Open,
    Roles(Roles),
    AnyCaller,
}

fn required_access(path: &str, reflection: ReflectionAccess) -> Access {
    const PRODUCER: Roles = Roles::PRODUCER;
    const WORKER: Roles = Roles::WORKER;
    let both = PRODUCER.union(WORKER);
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Roles(Roles::ADMIN);
    };
    let roles = match (service, method) {
        ("grpc.health.v1.Health", _) => return Access::Open,
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", _) => {
            return match reflection {
                ReflectionAccess::Open => Access::Open,
                ReflectionAccess::Authenticated | ReflectionAccess::Off => Access::AnyCaller,
            };
        }
        ("wq.v1.WorkQueueService", "Enqueue" | "GetItem") => PRODUCER,
        ("wq.v1.WorkQueueService", "QueueState") => both,
        ("wq.v1.WorkQueueService", "Lease" | "ExtendLease" | "Complete" | "Fail" | "Release") => {
            WORKER
        }
        ("wq.v1.QueueAdminService", "SealQueue") => Roles::SEALER,
        // QueueAdminService, and anything added later that nobody thought about here.
        _ => Roles::ADMIN,
    };
    Access::Roles(roles.union(Roles::ADMIN))
}

/// The broker's token table, swapped whole when the file changes.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    table: RwLock<Arc<TokenTable>>,
}

impl Tokens {
    /// Loads the token file at `path`.
    ///
    /// # Errors
    /// A message naming the file and the problem.
    pub fn load(path: PathBuf) -> Result<Self, String> {
        let table = TokenTable::load(&path)?;
        Ok(Self {
            path,
            table: RwLock::new(Arc::new(table)),
        })
    }

    fn current(&self) -> Arc<TokenTable> {
        match self.table.read() {
            Ok(table) => Arc::clone(&table),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn install(&self, table: TokenTable) {
        let table = Arc::new(table);
        match self.table.write() {
            Ok(mut current) => *current = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
    }

    /// Re-reads the file every `interval` until `stop`:
    ///
    /// - a changed file that parses replaces the table;
    /// - a changed file that does not parse keeps the previous table in force, so a bad edit
    ///   locks nobody out;
    /// - a file that cannot be read (removed, or made unreadable) keeps the previous table for
    ///   `missing_grace`, long enough to ride out a Kubernetes Secret update (an atomic symlink
    ///   swap), and then revokes every token: removing the file is how to lock everyone out.
    ///   When it is readable again, its tokens are in force again.
    ///
    /// Each change of state is logged once (never with a token or any field of the file), not
    /// every round.
    pub async fn reload(
        self: Arc<Self>,
        interval: Duration,
        missing_grace: Duration,
        stop: CancellationToken,
    ) {
        let path = self.path.display().to_string();
        let mut last_text = std::fs::read_to_string(&self.path).ok();
        let mut state = FileState::InForce;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let text = match std::fs::read_to_string(&self.path) {
                Ok(text) => text,
                Err(error) => {
                    // Whatever comes back is news, even the same text.
                    last_text = None;
                    state = match state {
                        FileState::InForce | FileState::Invalid => {
                            tracing::warn!(
                                %path,
                                %error,
                                grace = %humantime::format_duration(missing_grace),
                                "cannot read the token file; its tokens stay in force for \
                                 --auth-missing-grace, then all are revoked"
                            );
                            FileState::Missing {
                                since: Instant::now(),
                            }
                        }
                        FileState::Missing { since } if since.elapsed() >= missing_grace => {
                            self.install(TokenTable::default());
                            tracing::error!(
                                %path,
                                %error,
                                "the token file stayed unreadable for --auth-missing-grace: every \
                                 token is revoked, and every call is refused as UNAUTHENTICATED \
                                 until the file is back"
                            );
                            FileState::Revoked
                        }
                        unchanged @ (FileState::Missing { .. } | FileState::Revoked) => unchanged,
                    };
                    continue;
                }
            };
            if last_text.as_deref() == Some(text.as_str()) {
                continue;
            }
            match TokenTable::parse(&text) {
                Ok(table) => {
                    let grants = table.len();
                    self.install(table);
                    match state {
                        FileState::InForce | FileState::Invalid => {
                            tracing::info!(%path, grants, "token file reloaded");
                        }
                        FileState::Missing { .. } | FileState::Revoked => {
                            tracing::info!(%path, grants, "the token file is back; its tokens are in force");
                        }
                    }
                    state = FileState::InForce;
                }
                Err(error) => {
                    if state == FileState::Revoked {
                        tracing::error!(%path, %error, "the token file is back but invalid; every call stays refused");
                    } else {
                        tracing::error!(%path, %error, "the changed token file is invalid; keeping the tokens in force");
                        state = FileState::Invalid;
                    }
                }
            }
            last_text = Some(text);
        }
    }
}

/// Where [`Tokens::reload`] stands with the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileState {
    /// The table in force is the file's.
    InForce,
    /// The file changed and does not parse; the last good table is in force.
    Invalid,
    /// The file cannot be read since `since`; the last table is in force for the grace period.
    Missing { since: Instant },
    /// It stayed unreadable past the grace period: the table is empty.
    Revoked,
}

/// The authentication gate in front of every service (see the module documentation).
#[derive(Debug, Clone)]
pub struct Gate {
    tokens: Arc<Tokens>,
    reflection: ReflectionAccess,
}

impl Gate {
    /// A gate checking callers against `tokens`.
    pub fn new(tokens: Arc<Tokens>, reflection: ReflectionAccess) -> Self {
        Self { tokens, reflection }
    }

    /// Decides on one request: `Ok` with the caller to record (None for open methods), or the
    /// status to answer with.
    fn admit<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, Status> {
        let access = required_access(request.uri().path(), self.reflection);
        if matches!(access, Access::Open) {
            return Ok(None);
        }
        let presented = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?
            .as_bytes();
        let token = presented
            .strip_prefix(b"Bearer ")
            .or_else(|| presented.strip_prefix(b"bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
            })?;
        let caller = self
            .tokens
            .current()
            .find(token)
            .ok_or_else(|| Status::unauthenticated("unknown bearer token"))?;
        if let Access::Roles(allowed) = access
            && !caller.0.roles.intersects(allowed)
        {
            return Err(Status::permission_denied(format!(
                "caller {:?} (role {}) may not call {}",
                caller.name(),
                caller.0.roles,
                request.uri().path()
            )));
        }
        Ok(Some(caller))
    }
}

impl<B> tower_http::validate_request::ValidateRequest<B> for Gate {
    type ResponseBody = Body;

    fn validate(&mut self, request: &mut http::Request<B>) -> Result<(), http::Response<Body>> {
        match self.admit(request) {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Ok(())
            }
            Err(status) => {
                tracing::debug!(path = request.uri().path(), code = ?status.code(), "refused at the gate");
                Err(status.into_http())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "
        # comment line
        producer-token-0123456789 seeder producer batch-* other
        worker-token-0123456789ab runner worker,producer   # trailing comment
        admin-token-0123456789abc ops admin
    ";

    fn caller_for(table: &TokenTable, token: &str) -> Option<Caller> {
        table.find(token.as_bytes())
    }

    #[test]
    fn parses_grants_and_finds_tokens() {
        let table = TokenTable::parse(FILE).expect("valid file");
        assert_eq!(table.len(), 3);
        let seeder = caller_for(&table, "producer-token-0123456789").expect("seeder");
        assert_eq!(seeder.name(), "seeder");
        assert!(seeder.may_use_queue("batch-7"));
        assert!(seeder.may_use_queue("other"));
        assert!(!seeder.may_use_queue("payroll"));
        let runner = caller_for(&table, "worker-token-0123456789ab").expect("runner");
        assert_eq!(runner.0.roles.to_string(), "producer,worker");
        assert!(runner.may_use_queue("anything"));
        assert!(caller_for(&table, "worker-token-0123456789a").is_none());
        assert!(caller_for(&table, "").is_none());
    }

    #[test]
    fn rejects_bad_files_naming_the_line_without_the_token() {
        for (text, expected) in [
            ("", "holds no tokens"),
            (
                "short name producer",
                "line 1: field 1 (the token) must be at least 16",
            ),
            ("abcdefghijklmnopq name", "line 1: expected"),
            ("abcdefghijklmnopq name boss", "line 1: field 3 (the roles)"),
            (
                "abcdefghijklmnopq name admin batch-* [",
                "line 1: field 5 (a queue pattern) is not a valid glob",
            ),
            (
                "abcdefghijklmnopq first admin\nabcdefghijklmnopq second worker",
                "line 2: field 1 (the token) is the token of an earlier line too",
            ),
            ("abcdefghijklmnopq a/b admin", "line 1: field 2 (the name)"),
        ] {
            let error = TokenTable::parse(text).expect_err(text);
            assert!(error.contains(expected), "{text:?} gave {error:?}");
            assert!(
                !error.contains("abcdefghijklmnopq"),
                "token leaked: {error}"
            );
            assert_quotes_no_field(text, &error);
        }
    }

    #[test]
    fn swapped_fields_are_refused_without_quoting_any_field() {
        const SECRET: &str = "3f1c0b5e9a7d4c2e8b6a0f1d3c5e7a9b";
        for line in [
            format!("ops {SECRET} admin"),
            format!("seeder-for-batch {SECRET} producer"),
            format!("batch-seeder.eu-west-1 {SECRET} producer"),
            format!("{SECRET} admin ops"),
            format!("admin ops {SECRET}"),
            // Tokens of other shapes, swapped with a long name.
            "batch-seeder.eu-west-1 0b7c0c5e-9f3a-4d47-8f0e-5d2c9b1a7e44 producer".to_owned(),
            "batch-seeder.eu-west-1 Zm9vYmFyYmF6cXV4cXV1eA producer".to_owned(),
            "batch-seeder.eu-west-1 correct-horse-battery-staple producer".to_owned(),
        ] {
            let error = TokenTable::parse(&line).expect_err(&line);
            assert!(error.starts_with("line 1: field "), "{error}");
            assert_quotes_no_field(&line, &error);
        }
    }

    /// The documented limit of the swap rules: a passphrase token before a long name that does
    /// not read as words is indistinguishable from a valid line. A random token in the same
    /// place is refused.
    #[test]
    fn only_a_passphrase_token_swapped_with_an_unwordlike_name_loads() {
        let passphrase = "Worker2Prod-cluster correct-horse-battery-staple worker";
        let table = TokenTable::parse(passphrase).expect("indistinguishable from a valid line");
        assert_eq!(table.len(), 1);
        let random = "Worker2Prod-cluster 3f1c0b5e9a7d4c2e8b6a0f1d3c5e7a9b worker";
        let error = TokenTable::parse(random).expect_err(random);
        assert_quotes_no_field(random, &error);
    }

    #[test]
    fn long_names_of_existing_token_files_load() {
        let file = "
            3f1c0b5e9a7d4c2e8b6a0f1d3c5e7a9b batch-seeder-production producer,sealer batch-*
            0b7c0c5e-9f3a-4d47-8f0e-5d2c9b1a7e44 job-worker.eu-west-1 worker
            Zm9vYmFyYmF6cXV4cXV1eA_k8s-2 k8s_nightly_cleanup_2024 admin
            short-name-token-0123 ops admin
        ";
        let table = TokenTable::parse(file).expect("realistic long names");
        assert_eq!(table.len(), 4);
        let worker = caller_for(&table, "0b7c0c5e-9f3a-4d47-8f0e-5d2c9b1a7e44").expect("worker");
        assert_eq!(worker.name(), "job-worker.eu-west-1");
        let name = "a".repeat(MAX_NAME_BYTES);
        TokenTable::parse(&format!("3f1c0b5e9a7d4c2e8b6a0f1d3c5e7a9b {name} admin"))
            .expect("64 characters");
        let error = TokenTable::parse(&format!("3f1c0b5e9a7d4c2e8b6a0f1d3c5e7a9b {name}a admin"))
            .expect_err("65 characters");
        assert!(error.contains("field 2 (the name) must be 1-64"), "{error}");
    }

    #[test]
    fn names_read_as_words_and_random_tokens_do_not() {
        for name in [
            "ops",
            "seeder-for-batch",
            "job-worker.eu-west-1",
            "k8s_nightly_cleanup_2024",
            "JobWorkerProduction",
        ] {
            assert!(reads_like_name(name), "{name}");
        }
        for token in [
            "3f1c0b5e9a7d4c2e8b6a0f1d3c5e7a9b",
            "0b7c0c5e-9f3a-4d47-8f0e-5d2c9b1a7e44",
            "Zm9vYmFyYmF6cXV4cXV1eA",
            "producer-token-0123456789x",
        ] {
            assert!(!reads_like_name(token), "{token}");
        }
    }

    /// No field of `text` appears in `error`, except role names (the messages list them).
    fn assert_quotes_no_field(text: &str, error: &str) {
        let roles = ["producer", "worker", "sealer", "admin"];
        for field in text.split_whitespace().filter(|f| !roles.contains(f)) {
            assert!(!error.contains(field), "{text:?} quoted {field:?}: {error}");
        }
    }

    #[test]
    fn methods_need_the_documented_roles() {
        let needs = |path| match required_access(path, ReflectionAccess::Authenticated) {
            Access::Open => "open".to_owned(),
            Access::AnyCaller => "any".to_owned(),
            Access::Roles(roles) => roles.to_string(),
        };
        assert_eq!(needs("/grpc.health.v1.Health/Check"), "open");
        assert_eq!(needs("/wq.v1.WorkQueueService/Enqueue"), "producer,admin");
        assert_eq!(needs("/wq.v1.WorkQueueService/GetItem"), "producer,admin");
        assert_eq!(
            needs("/wq.v1.WorkQueueService/QueueState"),
            "producer,worker,admin"
        );
        assert_eq!(needs("/wq.v1.WorkQueueService/Lease"), "worker,admin");
        assert_eq!(needs("/wq.v1.WorkQueueService/Release"), "worker,admin");
        assert_eq!(needs("/wq.v1.QueueAdminService/PurgeQueue"), "admin");
        assert_eq!(needs("/wq.v1.QueueAdminService/SealQueue"), "sealer,admin");
        assert_eq!(needs("/wq.v1.QueueAdminService/DeleteQueue"), "admin");
        assert_eq!(needs("/wq.v1.QueueAdminService/ListQueues"), "admin");
        assert_eq!(
            needs("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "any"
        );
        assert_eq!(needs("/wq.v2.Future/Call"), "admin");
        assert_eq!(needs("/nonsense"), "admin");
    }
}
