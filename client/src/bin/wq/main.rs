//! `wq`: the command line of the wq broker. Seeds queues, inspects them and operates on them.
//! Every error, a bad command line included, is one line on stderr and exit status 1; the
//! other statuses are `wq wait`'s (see [`EXIT_STATUS`]).

use std::{future::Future, io::IsTerminal as _, process::ExitCode, time::Duration};

use anyhow::bail;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use wq_client::{Client, ConnectOptions, ServingStatus, pb};

mod output;
mod seed;
use output::{flags, print_state, state_json};

/// Exit status of `wq wait` when its timeout ends first.
const EXIT_TIMEOUT: u8 = 2;
/// Exit status of `wq wait --require-exists` for a queue that has never been used.
const EXIT_NEVER_USED: u8 = 3;

/// Every exit status, for `--help`.
const EXIT_STATUS: &str = "\
Exit status:
  0  success (wq wait: the queue is drained; wq health: the broker is SERVING)
  1  an error, a bad command line included: one line on stderr
  2  wq wait: --timeout ended first
  3  wq wait --require-exists: the queue has never been used";

#[derive(Debug, Parser)]
#[command(
    name = "wq",
    version,
    about = "Command line of the wq work-queue broker",
    after_help = EXIT_STATUS
)]
struct Cli {
    /// Where the broker is, TLS and the bearer token.
    #[command(flatten)]
    connection: ConnectOptions,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Add items to a queue: the arguments, or the lines of --file, or of stdin.
    #[command(after_help = seed::INPUT_RULES)]
    Seed(seed::SeedArgs),
    /// Show a queue's counts and flags.
    State {
        /// The queue.
        queue: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a queue is drained (exit 0), or the timeout ends (exit 2). A queue that was
    /// never used counts as drained, with a warning; --require-exists makes it exit 3.
    #[command(after_help = EXIT_STATUS)]
    Wait(WaitArgs),
    /// Check the broker's health (grpc.health.v1): exit 0 only when it is SERVING, for an
    /// exec probe (it speaks TLS and sends the token like every other command).
    #[command(after_help = EXIT_STATUS)]
    Health {
        /// The service to ask about; the default "" is the broker as a whole.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// List every queue that has been used.
    Queues {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List a queue's items in one state.
    Items {
        /// The queue.
        queue: String,
        /// Which items.
        #[arg(long, value_enum, default_value_t = StateArg::Ready)]
        state: StateArg,
        /// Most items to show.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Show payloads too.
        #[arg(long)]
        payloads: bool,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to ready: the given ids, or all with --all.
    Requeue {
        /// The queue.
        queue: String,
        /// Ids of dead items.
        ids: Vec<String>,
        /// Requeue every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete every item in the given states.
    Purge {
        /// The queue.
        queue: String,
        /// States to purge (repeat the flag for several).
        #[arg(long = "state", value_enum, required = true)]
        states: Vec<StateArg>,
    },
    /// Stop a queue from leasing (enqueue still works).
    Pause {
        /// The queue.
        queue: String,
    },
    /// Let a paused queue lease again.
    Resume {
        /// The queue.
        queue: String,
    },
    /// Refuse further items: workers know no more work will come.
    Seal {
        /// The queue.
        queue: String,
    },
    /// Delete a queue and all its items.
    Delete {
        /// The queue.
        queue: String,
    },
}

/// The flags of `wq wait`.
#[derive(Debug, clap::Args)]
struct WaitArgs {
    /// The queue.
    queue: String,
    /// Wait until the queue is sealed *and* drained.
    #[arg(long)]
    sealed: bool,
    /// Give up after this long (e.g. `90s`, `10m`), connecting included.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Exit 3 instead of 0 when the queue has never been used (nothing ever enqueued, never
    /// paused or sealed): most likely a misspelt name.
    #[arg(long)]
    require_exists: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StateArg {
    Ready,
    Delayed,
    Leased,
    Dead,
}

impl From<StateArg> for pb::ItemState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Ready => Self::Ready,
            StateArg::Delayed => Self::Delayed,
            StateArg::Leased => Self::Leased,
            StateArg::Dead => Self::Dead,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage(&error),
    };
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", wq_client::one_line(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Handles what clap made of the command line when it is not a command: help and the version
/// print as usual (status 0); a mistake is one line and status 1 like any other error, so that
/// status 2 means only "`wq wait` timed out".
fn usage(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = error.print();
        return ExitCode::SUCCESS;
    }
    // clap's text: a paragraph "error: <what>" (a list of missing arguments goes on over
    // the next lines), then tips, "Usage: <usage>" and a pointer to --help.
    let text = error.to_string();
    let what = match error.kind() {
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => "a command is needed".to_owned(),
        _ => text
            .lines()
            .map(str::trim)
            .skip_while(|line| line.is_empty())
            .take_while(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    };
    let what = match what.strip_prefix("error: ").unwrap_or(&what) {
        "" => "invalid command line",
        what => what,
    };
    match text
        .lines()
        .find_map(|line| line.trim().strip_prefix("Usage: "))
    {
        Some(usage) => eprintln!("error: {what} (usage: {usage}; see --help)"),
        None => eprintln!("error: {what} (see wq --help)"),
    }
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let connect = || Client::connect_with(&cli.connection);
    match cli.command {
        Command::Seed(args) => seed::run(&connect().await?, args).await?,
        Command::State { queue, json } => {
            let state = connect().await?.queue_state(&queue).await?;
            if json {
                println!("{}", state_json(&state));
            } else {
                print_state(&state);
            }
        }
        // Connecting is part of the wait: a frozen broker cannot outlast --timeout.
        Command::Wait(args) => return wait(connect(), args).await,
        Command::Health { service } => return health(&connect().await?, &service).await,
        Command::Queues { json } => {
            let queues = connect().await?.list_queues().await?;
            if json {
                let all: Vec<_> = queues.iter().map(state_json).collect();
                println!("{}", serde_json::Value::Array(all));
            } else {
                println!(
                    "{:<32} {:>9} {:>9} {:>9} {:>9} {:>11}  flags",
                    "QUEUE", "READY", "LEASED", "DELAYED", "DEAD", "COMPLETED"
                );
                for q in &queues {
                    println!(
                        "{:<32} {:>9} {:>9} {:>9} {:>9} {:>11}  {}",
                        q.queue,
                        q.ready,
                        q.leased,
                        q.delayed,
                        q.dead,
                        q.completed_total,
                        flags(q)
                    );
                }
            }
        }
        Command::Items {
            queue,
            state,
            limit,
            payloads,
            json,
        } => items(&connect().await?, &queue, state, limit, payloads, json).await?,
        Command::Requeue { queue, ids, all } => {
            if ids.is_empty() && !all {
                bail!("name the dead items to requeue, or pass --all");
            }
            let count = connect().await?.requeue_dead(&queue, ids).await?;
            println!("requeued {count} dead items in {queue}");
        }
        Command::Purge { queue, states } => {
            let count = connect()
                .await?
                .purge(&queue, states.into_iter().map(Into::into).collect())
                .await?;
            println!("purged {count} items from {queue}");
        }
        Command::Pause { queue } => {
            connect().await?.pause(&queue).await?;
            println!("paused {queue}");
        }
        Command::Resume { queue } => {
            connect().await?.resume(&queue).await?;
            println!("resumed {queue}");
        }
        Command::Seal { queue } => {
            connect().await?.seal(&queue).await?;
            println!("sealed {queue}");
        }
        Command::Delete { queue } => {
            let count = connect().await?.delete_queue(&queue).await?;
            println!("deleted {queue} with {count} items");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `wq wait`: polls the queue's state until it is drained (and sealed, with --sealed), all of
/// it, connecting included, within --timeout.
async fn wait(
    connect: impl Future<Output = wq_client::Result<Client>>,
    args: WaitArgs,
) -> anyhow::Result<ExitCode> {
    let bar = std::io::stderr()
        .is_terminal()
        .then(indicatif::ProgressBar::new_spinner);
    let mut last = None;
    let watch = watch(connect, &args, &mut last, bar.as_ref());
    let outcome = match args.timeout {
        Some(limit) => tokio::time::timeout(limit, watch).await.ok(),
        None => Some(watch.await),
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(outcome) = outcome {
        return outcome;
    }
    let queue = &args.queue;
    match last {
        Some(state) => eprintln!(
            "timed out: {queue} still has {} ready, {} leased, {} delayed{}",
            state.ready,
            state.leased,
            state.delayed,
            if args.sealed && !state.sealed {
                " and is not sealed"
            } else {
                ""
            }
        ),
        None => eprintln!("timed out: the broker did not tell the state of {queue} in time"),
    }
    Ok(ExitCode::from(EXIT_TIMEOUT))
}

/// The loop of `wq wait`, keeping the last state it read in `last` for the timeout message.
async fn watch(
    connect: impl Future<Output = wq_client::Result<Client>>,
    args: &WaitArgs,
    last: &mut Option<pb::QueueStateResponse>,
    bar: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<ExitCode> {
    let queue = &args.queue;
    let client = connect.await?;
    let mut first = true;
    loop {
        let state = client.queue_state(queue).await?;
        // QueueState cannot tell a queue that never existed from an empty one; what it can
        // tell is that nothing was ever enqueued and no flag was ever set.
        if first && state.enqueued_total == 0 && !state.paused && !state.sealed {
            if args.require_exists {
                eprintln!(
                    "error: queue {queue:?} has never been used (nothing was ever enqueued, \
                     and it was never paused or sealed)"
                );
                return Ok(ExitCode::from(EXIT_NEVER_USED));
            }
            eprintln!(
                "warning: queue {queue:?} has never been used; it counts as drained \
                 (--require-exists makes this an error)"
            );
        }
        first = false;
        let done = state.drained && (!args.sealed || state.sealed);
        if let Some(bar) = bar {
            bar.set_message(format!(
                "{queue}: {} ready, {} leased, {} delayed, {} completed{}",
                state.ready,
                state.leased,
                state.delayed,
                state.completed_total,
                if args.sealed && !state.sealed {
                    ", not sealed yet"
                } else {
                    ""
                }
            ));
            bar.tick();
        }
        if done {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            println!(
                "{queue} is {}drained: {} completed, {} dead",
                if args.sealed { "sealed and " } else { "" },
                state.completed_total,
                state.dead
            );
            return Ok(ExitCode::SUCCESS);
        }
        *last = Some(state);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `wq health`: SERVING is exit 0; anything else is an error line and exit 1.
async fn health(client: &Client, service: &str) -> anyhow::Result<ExitCode> {
    let name = if service.is_empty() {
        "the broker".to_owned()
    } else {
        format!("service {service:?}")
    };
    match client.health(service).await {
        Ok(ServingStatus::Serving) => {
            println!("SERVING");
            Ok(ExitCode::SUCCESS)
        }
        Ok(status) => bail!("{name} is {}", status.as_str_name()),
        Err(error) if error.code() == Some(tonic::Code::NotFound) => {
            bail!("the broker does not know the {name}")
        }
        Err(error) => Err(error.into()),
    }
}

async fn items(
    client: &Client,
    queue: &str,
    state: StateArg,
    limit: u32,
    payloads: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut shown = 0;
    let mut page_token = String::new();
    while shown < limit {
        let page = client
            .list_items(pb::ListItemsRequest {
                queue: queue.to_owned(),
                state: pb::ItemState::from(state) as i32,
                page_size: (limit - shown).min(1000),
                page_token,
                include_payloads: payloads,
            })
            .await?;
        for item in &page.items {
            if json {
                println!(
                    "{}",
                    json!({
                        "id": item.id,
                        "state": item.state().as_str_name(),
                        "attempts": item.attempts,
                        "max_attempts": item.max_attempts,
                        "priority": item.priority,
                        "last_error": item.last_error,
                        "payload": payloads.then(|| String::from_utf8_lossy(&item.payload).into_owned()),
                    })
                );
            } else {
                let mut line = format!(
                    "{}  attempts {}/{}",
                    item.id, item.attempts, item.max_attempts
                );
                if !item.last_error.is_empty() {
                    line.push_str(&format!("  error: {}", item.last_error.replace('\n', " ")));
                }
                if payloads {
                    line.push_str(&format!(
                        "  payload: {}",
                        String::from_utf8_lossy(&item.payload)
                    ));
                }
                println!("{line}");
            }
            shown += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(())
}
