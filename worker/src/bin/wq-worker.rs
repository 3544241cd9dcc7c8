//! The `wq-worker` binary for Kubernetes Job pods: lease items from a queue, run a command per
//! item (or print and sleep, like the walkthrough's worker), exit 0 when the queue is drained.

use std::{process::ExitCode, sync::Arc, time::Duration};

use clap::Parser;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use wq_client::{Client, ConnectOptions};
use wq_worker::{
    ExitPolicy, Prefetch, Worker, WorkerConfig,
    command::{CommandHandler, DEFAULT_PERMANENT_EXIT, SleepHandler},
};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Until {
    /// Exit when the queue has nothing ready, leased or delayed.
    Drained,
    /// Exit when the queue is sealed and drained.
    Sealed,
}

/// Lease items from a wq queue and run COMMAND once per item (payload on stdin; WQ_QUEUE,
/// WQ_ITEM_ID and WQ_ATTEMPT in the environment, the worker's WQ_TOKEN and TLS variables removed
/// from it; the worker itself is non-dumpable, so a command of the same user cannot read the
/// token from /proc/$PPID/environ or the worker's memory). Exit status 0 completes the item with stdout as its result; the
/// --permanent-exit-code status dead-letters it; any other status retries it with the tail of
/// stderr as the error. Without COMMAND, print each item and sleep --work-time (with --work-time 0s,
/// complete each item at once and print nothing: a no-op, for measuring).
#[derive(Debug, Parser)]
#[command(name = "wq-worker", version)]
struct Args {
    /// Where the broker is, TLS and the bearer token.
    #[command(flatten)]
    connection: ConnectOptions,
    /// The queue to work on.
    #[arg(long, env = "WQ_QUEUE")]
    queue: String,
    /// Items in work at once.
    #[arg(long, env = "WQ_CONCURRENCY", default_value_t = 1)]
    concurrency: u32,
    /// Items leased ahead of free slots, so the next Lease call overlaps work. `auto`: as many
    /// as recent items say will start within half of --prefetch-window (none for items that
    /// long or longer), and an item still waiting for a slot after the window goes back to the
    /// queue for other pods. A number: always that many (0 = none), never given back.
    #[arg(long, env = "WQ_PREFETCH", default_value = "auto")]
    prefetch: Prefetch,
    /// With `--prefetch auto`: the longest an item leased ahead waits in this worker for a slot
    /// before it is given back to the queue.
    #[arg(long, env = "WQ_PREFETCH_WINDOW", default_value = "100ms", value_parser = parse_window)]
    prefetch_window: Duration,
    /// Lease duration; extended in the background while an item is in work.
    #[arg(long, env = "WQ_LEASE_DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// How long one Lease call waits for work.
    #[arg(long, env = "WQ_MAX_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    max_wait: Duration,
    /// When to exit.
    #[arg(long, env = "WQ_UNTIL", value_enum, default_value_t = Until::Drained, conflicts_with = "forever")]
    until: Until,
    /// Never exit on an empty queue (Deployment-style workers); only SIGTERM stops it.
    #[arg(long, env = "WQ_FOREVER")]
    forever: bool,
    /// How long running items may go on after SIGTERM before they are released.
    #[arg(long, env = "WQ_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Exit status of COMMAND that means "permanent failure: dead-letter now".
    #[arg(long, env = "WQ_PERMANENT_EXIT_CODE", default_value_t = DEFAULT_PERMANENT_EXIT)]
    permanent_exit_code: i32,
    /// Without COMMAND: how long each item's "work" takes (0s: none at all, and no line printed).
    #[arg(long, env = "WQ_WORK_TIME", default_value = "1s", value_parser = humantime::parse_duration)]
    work_time: Duration,
    /// The command to run per item, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    // First of all, before the token is read from a file into memory: see `hide_from_commands`.
    let hidden = hide_from_commands();
    // Before anything that can wait: as PID 1 of a container a signal with no handler is
    // ignored, and the connect retries below can take more than a minute.
    let termination = Termination::listen();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(error) = hidden {
        tracing::warn!(
            %error,
            "cannot make this process non-dumpable: commands running as this user can read the \
             worker's token from /proc"
        );
    }
    let shutdown = termination.cancel_on_signal();
    let client = tokio::select! {
        client = connect(&args.connection) => match client {
            Some(client) => client,
            None => return ExitCode::FAILURE,
        },
        // Nothing is leased yet, so there is nothing to release: stopping is a clean exit.
        () = shutdown.cancelled() => {
            tracing::info!("stopped before reaching the broker");
            return ExitCode::SUCCESS;
        }
    };
    let config = WorkerConfig {
        queue: args.queue.clone(),
        concurrency: args.concurrency,
        prefetch: match args.prefetch {
            Prefetch::Auto { .. } => Prefetch::Auto {
                window: args.prefetch_window,
            },
            fixed @ Prefetch::Fixed(_) => fixed,
        },
        lease_duration: args.lease_duration,
        max_wait: args.max_wait,
        exit: match (args.forever, args.until) {
            (true, _) => ExitPolicy::Forever,
            (false, Until::Drained) => ExitPolicy::Drained,
            (false, Until::Sealed) => ExitPolicy::Sealed,
        },
        shutdown_grace: args.shutdown_grace,
        worker_id: String::new(),
    };
    let worker = Worker::new(client, config);
    let summary = match args.command.split_first() {
        Some((program, rest)) => {
            let handler = CommandHandler {
                program: program.clone(),
                args: rest.to_vec(),
                queue: args.queue,
                permanent_exit: args.permanent_exit_code,
            };
            worker.run(Arc::new(handler), shutdown).await
        }
        None => {
            let handler = SleepHandler {
                work_time: args.work_time,
            };
            worker.run(Arc::new(handler), shutdown).await
        }
    };
    tracing::info!(
        completed = summary.completed,
        failed = summary.failed,
        lost = summary.lost,
        released = summary.released,
        given_back = summary.given_back,
        "worker stopped"
    );
    if summary.refused {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Makes this process non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`), so that the commands it runs,
/// which run as the same user, cannot read its token: `/proc/<worker>/environ`, `mem`, `maps`
/// and `fd/` become root's, and ptrace and `process_vm_readv` are refused to anyone without
/// CAP_SYS_PTRACE. It also means no core dump of the worker. The commands themselves are
/// unaffected: the kernel makes a process dumpable again when it executes a program, so a
/// command (and a debugger on it) works as before. What it does not hide: the worker's command
/// line (`/proc/<pid>/cmdline` stays world-readable, hence `WQ_TOKEN` or `--token-file` rather
/// than `--token`), a token file the command's user may read, and anything from root in the
/// pod or a process holding CAP_SYS_PTRACE.
fn hide_from_commands() -> std::io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::process::{DumpableBehavior, set_dumpable_behavior};
        set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    }
    Ok(())
}

/// Connects, retrying while the broker is not up yet (pods may start before it), for a minute.
/// Settings that cannot work (a bad URL, unreadable TLS files or token, a TLS handshake that
/// fails on certificates) end it at once: no retry would fix them.
async fn connect(options: &ConnectOptions) -> Option<Client> {
    let mut delay = Duration::from_millis(200);
    let mut last = None;
    for _ in 0..20 {
        match Client::connect_with(options).await {
            Ok(client) => return Some(client),
            Err(error) if error.is_settings_error() => {
                eprintln!("error: {error}");
                return None;
            }
            Err(error) => {
                tracing::warn!(%error, "broker not reachable yet; retrying");
                last = Some(error);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    match last {
        Some(error) => eprintln!("error: {error}"),
        None => eprintln!("error: cannot reach the broker at {}", options.full_url()),
    }
    None
}

/// SIGTERM and SIGINT, listened for from the moment [`Termination::listen`] returns.
struct Termination {
    term: std::io::Result<Signal>,
    int: std::io::Result<Signal>,
}

impl Termination {
    /// Installs the handlers now (tokio registers them when the listener is created, not when
    /// it is first polled).
    fn listen() -> Self {
        Self {
            term: signal(SignalKind::terminate()),
            int: signal(SignalKind::interrupt()),
        }
    }

    /// A token cancelled at the first SIGTERM or SIGINT.
    fn cancel_on_signal(self) -> CancellationToken {
        let listeners = [("SIGTERM", self.term), ("SIGINT", self.int)].map(|(name, listener)| {
            listener
                .inspect_err(|error| tracing::warn!(%error, signal = name, "cannot handle signal"))
                .ok()
        });
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            let [term, int] = listeners;
            tokio::select! {
                () = received(term) => {}
                () = received(int) => {}
            }
            tracing::info!("termination requested");
            trigger.cancel();
        });
        shutdown
    }
}

/// Completes at the first signal `listener` hears; never, without a listener.
async fn received(listener: Option<Signal>) {
    if let Some(mut listener) = listener
        && listener.recv().await.is_some()
    {
        return;
    }
    // No listener, or one that can hear no more: this signal will never come.
    std::future::pending().await
}

/// `--prefetch-window`: a duration of at least a millisecond (a shorter one would give items
/// back before a slot could take them).
fn parse_window(text: &str) -> Result<Duration, String> {
    let window = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if window < Duration::from_millis(1) {
        return Err("must be at least 1ms".to_owned());
    }
    Ok(window)
}
