//! `--redis-wait-replicas`: state-changing scripts acknowledged only once `WAIT` confirms their
//! write reached that many replicas.
//!
//! Redis replicates asynchronously, so without this a failover loses the writes its new master
//! had not received yet, acknowledged or not (measured with `SENTINEL FAILOVER`: writes the
//! demoted master took before the broker heard of the switch). `WAIT` counts the replicas that
//! have the *connection's* last write, and blocks that connection while it waits; so these
//! writes do not share the store's multiplexed connection (a wait would hold up every other
//! call behind it) but take one of [`WRITE_CONNECTIONS`] connections of their own, one write
//! and its `WAIT` at a time. Reads, the reaper and the queue index stay on the shared
//! connection.
//!
//! On a cluster the write goes to its slot's master on connections of our own to that node:
//! the cluster client may resend a command on a new connection or to another node, where a
//! `WAIT` would count writes that are not this one. `MOVED` and `ASK` (the write did not run)
//! are followed here, within the caller's deadline; see [`ClusterWriters`].

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use redis::{
    ConnectionAddr, ConnectionInfo, ScriptInvocation, ServerErrorKind, Value, cluster_routing::Slot,
};
use tokio::sync::Mutex;

use crate::{
    error::{Error, Result},
    store::{
        connection::{RedisConnection, RedisTarget, sentinel::SentinelMaster},
        keys::QueueKeys,
        scripts::millis,
    },
};

/// How many writes may wait for their replicas at once.
pub const WRITE_CONNECTIONS: usize = 16;

/// One write connection.
enum Writer {
    /// A standalone connection of its own.
    Own(RedisConnection),
    /// Slot `.1` of the sentinels' master, which follows its failovers.
    Sentinel(Arc<SentinelMaster>, usize),
}

/// Connections of which each carries one write and its `WAIT` at a time.
struct Writers {
    writers: Vec<Mutex<Writer>>,
    next: AtomicUsize,
}

impl Writers {
    /// A write connection nobody uses now, or (all busy) the next in turn.
    async fn free(&self) -> tokio::sync::MutexGuard<'_, Writer> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for offset in 0..self.writers.len() {
            if let Ok(writer) = self.writers[(start + offset) % self.writers.len()].try_lock() {
                return writer;
            }
        }
        self.writers[start % self.writers.len()].lock().await
    }
}

/// Where writes go.
enum Destination {
    /// The one server, or the sentinels' master.
    Server(Writers),
    /// Each slot's master.
    Cluster(ClusterWriters),
}

/// The write connections and what they wait for.
pub struct ReplicatedWrites {
    destination: Destination,
    replicas: u32,
    wait: Duration,
}

impl std::fmt::Debug for ReplicatedWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match &self.destination {
            Destination::Server(_) => "server",
            Destination::Cluster(_) => "cluster",
        };
        f.debug_struct("ReplicatedWrites")
            .field("to", &mode)
            .field("replicas", &self.replicas)
            .field("wait", &self.wait)
            .finish()
    }
}

impl ReplicatedWrites {
    /// Write connections to `target` (through `conn`'s sentinel master in sentinel mode; to
    /// each slot's master on a cluster), waiting up to `wait` for `replicas` replicas.
    ///
    /// # Errors
    /// When the target's settings are rejected by redis-rs.
    pub fn new(
        target: &RedisTarget,
        conn: &RedisConnection,
        timeout: Duration,
        replicas: u32,
        wait: Duration,
    ) -> redis::RedisResult<Self> {
        let destination = match (target, conn) {
            (RedisTarget::Cluster(seeds), _) => Destination::Cluster(ClusterWriters {
                seeds: seeds.clone(),
                timeout,
                next_seed: AtomicUsize::new(0),
                slots: std::sync::Mutex::new(HashMap::new()),
                nodes: std::sync::Mutex::new(HashMap::new()),
            }),
            (_, RedisConnection::Sentinel(master)) => Destination::Server(Writers {
                writers: (0..WRITE_CONNECTIONS)
                    .map(|slot| Mutex::new(Writer::Sentinel(Arc::clone(master), slot)))
                    .collect(),
                next: AtomicUsize::new(0),
            }),
            _ => Destination::Server(own_writers(target, timeout)?),
        };
        Ok(Self {
            destination,
            replicas,
            wait,
        })
    }

    /// Runs `call` and `WAIT` in one pipeline on one connection (so the `WAIT` covers that
    /// write and no other connection's), loading the script first if Redis lacks it.
    ///
    /// # Errors
    /// UNAVAILABLE when Redis does not answer, when the sentinels' master changed meanwhile,
    /// or when fewer replicas confirmed the write in time (it may have applied).
    pub async fn invoke(&self, queue: &str, call: &ScriptInvocation<'_>) -> Result<Value> {
        let wait = redis::cmd("WAIT")
            .arg(self.replicas)
            .arg(millis(self.wait))
            .clone();
        let (reply, confirmed) = match &self.destination {
            Destination::Server(writers) => invoke_on(writers, call, &wait).await?,
            Destination::Cluster(cluster) => cluster.invoke(queue, call, &wait).await?,
        };
        if confirmed < i64::from(self.replicas) {
            return Err(Error::NotReplicated(format!(
                "the write reached {confirmed} of --redis-wait-replicas {} replicas within \
                 --redis-wait-timeout {:?}; it may have applied",
                self.replicas, self.wait
            )));
        }
        Ok(reply)
    }
}

/// [`WRITE_CONNECTIONS`] connections of their own to the server `target` names.
fn own_writers(target: &RedisTarget, timeout: Duration) -> redis::RedisResult<Writers> {
    Ok(Writers {
        writers: (0..WRITE_CONNECTIONS)
            .map(|_| {
                Ok(Mutex::new(Writer::Own(
                    RedisConnection::new(target, timeout)?.0,
                )))
            })
            .collect::<redis::RedisResult<_>>()?,
        next: AtomicUsize::new(0),
    })
}

/// `call` and `wait` on a free connection of `writers`: the reply and the confirmed replicas.
async fn invoke_on(
    writers: &Writers,
    call: &ScriptInvocation<'_>,
    wait: &redis::Cmd,
) -> Result<(Value, i64)> {
    let mut writer = writers.free().await;
    Ok(match &mut *writer {
        Writer::Own(conn) => with_wait(conn, call, wait, false).await?,
        Writer::Sentinel(master, slot) => {
            let (generation, mut conn) = master.slot_connection(*slot).await?;
            let done = with_wait(&mut conn, call, wait, false).await;
            master.check(generation, done.as_ref().err());
            let done = done?;
            if master.generation() != generation {
                // A failover began while the write waited: its replicas may be the old
                // master's, whose writes are lost.
                return Err(Error::NotReplicated(
                    "the sentinels' master changed while the write waited for its \
                         replicas; it may have applied"
                        .into(),
                ));
            }
            done
        }
    })
}

/// Most redirections (`MOVED`, `ASK`, `TRYAGAIN`, a refused connection) one cluster write
/// follows; the caller's deadline bounds them too.
const MAX_REDIRECTIONS: usize = 8;

/// Writes to a cluster: each to its slot's master, through [`WRITE_CONNECTIONS`] connections
/// of our own to that node, made when first needed. Which master serves a slot is learnt from
/// `MOVED` replies (a write sent to the wrong node does not run), starting from the seeds.
pub(crate) struct ClusterWriters {
    /// `--redis-url`'s nodes; their credentials and TLS settings are used for every node.
    seeds: Vec<ConnectionInfo>,
    timeout: Duration,
    next_seed: AtomicUsize,
    /// The node (`host:port`) last known to serve each slot written to.
    slots: std::sync::Mutex<HashMap<Slot, String>>,
    nodes: std::sync::Mutex<HashMap<String, Arc<Writers>>>,
}

impl ClusterWriters {
    async fn invoke(
        &self,
        queue: &str,
        call: &ScriptInvocation<'_>,
        wait: &redis::Cmd,
    ) -> Result<(Value, i64)> {
        let slot = Slot::for_key(QueueKeys::new("", queue).ready.as_bytes());
        let mut asking: Option<String> = None;
        let mut last_error = None;
        for attempt in 0..MAX_REDIRECTIONS {
            let node = match &asking {
                Some(node) => node.clone(),
                None => self.node_of(slot),
            };
            let writers = self.writers_of(&node)?;
            let mut writer = writers.free().await;
            let Writer::Own(conn) = &mut *writer else {
                unreachable!("cluster writers are connections of their own");
            };
            let error = match with_wait(conn, call, wait, asking.is_some()).await {
                Ok(done) => {
                    if asking.is_none() {
                        self.learn(slot, node);
                    }
                    return Ok(done);
                }
                Err(error) => error,
            };
            drop(writer);
            asking = None;
            match error.kind() {
                redis::ErrorKind::Server(ServerErrorKind::Moved) => {
                    if let Some((to, _)) = error.redirect_node() {
                        self.learn(slot, to.to_owned());
                    }
                }
                redis::ErrorKind::Server(ServerErrorKind::Ask) => {
                    asking = error.redirect_node().map(|(to, _)| to.to_owned());
                }
                redis::ErrorKind::Server(ServerErrorKind::TryAgain) => {
                    // A migration is under way: give it a moment.
                    tokio::time::sleep(Duration::from_millis(20 << attempt.min(4))).await;
                }
                redis::ErrorKind::Server(ServerErrorKind::ClusterDown) => {
                    // A failover is under way, or the node left the cluster: ask again who
                    // serves the slot.
                    self.forget(slot);
                    tokio::time::sleep(Duration::from_millis(20 << attempt.min(4))).await;
                }
                // The write never reached the node: ask another.
                _ if error.is_connection_refusal() => self.forget(slot),
                _ => {
                    // The write may have run; what became of it is not known.
                    if error.is_io_error() {
                        self.forget(slot);
                    }
                    return Err(error.into());
                }
            }
            last_error = Some(error);
        }
        Err(last_error.map_or_else(
            || Error::NotReplicated("no cluster node took the write".into()),
            Error::from,
        ))
    }

    /// The node to send a write for `slot` to: the one last known to serve it, or the next
    /// seed (which redirects a write of a slot not its own with `MOVED`, naming the node in
    /// the endpoint the cluster prefers, a hostname where TLS certificates need one).
    fn node_of(&self, slot: Slot) -> String {
        if let Some(node) = self
            .slots
            .lock()
            .ok()
            .and_then(|slots| slots.get(&slot).cloned())
        {
            return node;
        }
        let seed = self.next_seed.fetch_add(1, Ordering::Relaxed) % self.seeds.len().max(1);
        self.seeds
            .get(seed)
            .map(|info| info.addr().to_string())
            .unwrap_or_default()
    }

    fn learn(&self, slot: Slot, node: String) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.insert(slot, node);
        }
    }

    fn forget(&self, slot: Slot) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(&slot);
        }
    }

    /// The write connections to `node` (`host:port`), with the seeds' credentials and TLS.
    fn writers_of(&self, node: &str) -> Result<Arc<Writers>> {
        let mut nodes = self
            .nodes
            .lock()
            .map_err(|_| Error::NotReplicated("the cluster writers are unusable".into()))?;
        if let Some(writers) = nodes.get(node) {
            return Ok(Arc::clone(writers));
        }
        let info = self
            .seeds
            .first()
            .and_then(|seed| node_info(seed, node))
            .ok_or_else(|| {
                Error::NotReplicated(format!("the cluster named an unusable node {node:?}"))
            })?;
        let target = RedisTarget::Standalone(redis::Client::open(info)?);
        let writers = Arc::new(own_writers(&target, self.timeout)?);
        nodes.insert(node.to_owned(), Arc::clone(&writers));
        Ok(writers)
    }
}

/// `seed`'s settings with the address `node` (`host:port`, as `MOVED` gives it).
fn node_info(seed: &ConnectionInfo, node: &str) -> Option<ConnectionInfo> {
    let (host, port) = node.rsplit_once(':')?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = port.parse().ok()?;
    let addr = match seed.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    Some(seed.clone().set_addr(addr))
}

/// `call` then `wait` down `conn` in one pipeline: the script's reply and the replicas that
/// confirmed it. A script's error reply comes back as the same error a lone call gives (so its
/// code maps as usual: OOM, BUSY, NOREPLICAS…). A pipelined script is not loaded by redis-rs,
/// so a NOSCRIPT (a restarted or new master) loads it and sends the pair again; the first
/// `WAIT` covered nothing, and may have waited its whole timeout.
///
/// `asking` sends `ASKING` first, for a slot being imported by this node.
async fn with_wait<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    call: &ScriptInvocation<'_>,
    wait: &redis::Cmd,
    asking: bool,
) -> redis::RedisResult<(Value, i64)> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    if asking {
        pipe.cmd("ASKING").ignore();
    }
    pipe.invoke_script(call).add_command(wait.clone());
    match send(conn, &pipe).await {
        Err(error)
            if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
        {
            call.load_async(conn).await?;
            send(conn, &pipe).await
        }
        result => result,
    }
}

async fn send<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    pipe: &redis::Pipeline,
) -> redis::RedisResult<(Value, i64)> {
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    let Ok([reply, confirmed]) = <[Value; 2]>::try_from(replies) else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "a write and its WAIT got the wrong number of replies",
        )));
    };
    if let Value::ServerError(error) = reply {
        return Err(error.into());
    }
    let confirmed = match confirmed {
        Value::ServerError(error) => return Err(error.into()),
        confirmed => redis::from_redis_value(confirmed)?,
    };
    Ok((reply, confirmed))
}

#[cfg(test)]
mod tests {
    use redis::IntoConnectionInfo as _;

    use super::*;

    #[test]
    fn a_node_keeps_the_seeds_tls_and_credentials() {
        let seed = "rediss://:pw@10.0.0.1:6380"
            .into_connection_info()
            .expect("a URL");
        let info = node_info(&seed, "10.0.0.2:6390").expect("an address");
        assert!(matches!(
            info.addr(),
            ConnectionAddr::TcpTls { host, port: 6390, .. } if host == "10.0.0.2"
        ));
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert!(
            node_info(&seed, "?:6390").is_some_and(|info| info.addr().to_string().contains('?'))
        );
        assert!(node_info(&seed, "no-port").is_none());
    }
}
