//! `wq`: the command line of the wq broker. Seeds queues, inspects them and operates on them.
//! Every error is one line on stderr and a non-zero exit status.

use std::{
    io::{BufRead, IsTerminal as _},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use wq_client::{Client, ConnectOptions, pb};

mod output;
use output::{flags, print_state, state_json};

/// Exit status of `wq wait` when its timeout ends first.
const EXIT_TIMEOUT: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "wq",
    version,
    about = "Command line of the wq work-queue broker"
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
    Seed {
        /// The queue.
        queue: String,
        /// Items (payloads). Without any, lines are read from --file or stdin.
        items: Vec<String>,
        /// Read one item per line from this file.
        #[arg(long, conflicts_with = "items")]
        file: Option<PathBuf>,
        /// How items get their ids: `payload` (the item itself, so seeding twice adds nothing
        /// new) or `uuid` (a fresh id per item).
        #[arg(long, value_enum, default_value_t = IdScheme::Payload)]
        ids: IdScheme,
        /// Seal the queue when done: workers waiting with `--until sealed` then exit when it is
        /// drained.
        #[arg(long)]
        seal: bool,
        /// Items per Enqueue call.
        #[arg(long, default_value_t = wq_client::batch::DEFAULT_BATCH)]
        batch: usize,
    },
    /// Show a queue's counts and flags.
    State {
        /// The queue.
        queue: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a queue is drained (exit 0), or the timeout ends (exit 2).
    Wait {
        /// The queue.
        queue: String,
        /// Wait until the queue is sealed *and* drained.
        #[arg(long)]
        sealed: bool,
        /// Give up after this long (e.g. `90s`, `10m`).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum IdScheme {
    Payload,
    Uuid,
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
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            // One line: the chain joined, never a backtrace.
            eprintln!("error: {}", format!("{error:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = Client::connect_with(&cli.connection).await?;
    match cli.command {
        Command::Seed {
            queue,
            items,
            file,
            ids,
            seal,
            batch,
        } => seed(&client, &queue, items, file, ids, seal, batch).await?,
        Command::State { queue, json } => {
            let state = client.queue_state(&queue).await?;
            if json {
                println!("{}", state_json(&state));
            } else {
                print_state(&state);
            }
        }
        Command::Wait {
            queue,
            sealed,
            timeout,
        } => return wait(&client, &queue, sealed, timeout).await,
        Command::Queues { json } => {
            let queues = client.list_queues().await?;
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
        } => items(&client, &queue, state, limit, payloads, json).await?,
        Command::Requeue { queue, ids, all } => {
            if ids.is_empty() && !all {
                bail!("name the dead items to requeue, or pass --all");
            }
            let count = client.requeue_dead(&queue, ids).await?;
            println!("requeued {count} dead items in {queue}");
        }
        Command::Purge { queue, states } => {
            let count = client
                .purge(&queue, states.into_iter().map(Into::into).collect())
                .await?;
            println!("purged {count} items from {queue}");
        }
        Command::Pause { queue } => {
            client.pause(&queue).await?;
            println!("paused {queue}");
        }
        Command::Resume { queue } => {
            client.resume(&queue).await?;
            println!("resumed {queue}");
        }
        Command::Seal { queue } => {
            client.seal(&queue).await?;
            println!("sealed {queue}");
        }
        Command::Delete { queue } => {
            let count = client.delete_queue(&queue).await?;
            println!("deleted {queue} with {count} items");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn seed(
    client: &Client,
    queue: &str,
    args: Vec<String>,
    file: Option<PathBuf>,
    ids: IdScheme,
    seal: bool,
    batch: usize,
) -> anyhow::Result<()> {
    let lines: Vec<String> = if !args.is_empty() {
        args
    } else if let Some(path) = &file {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        read_lines(std::io::BufReader::new(file))
            .with_context(|| format!("cannot read {}", path.display()))?
    } else {
        if std::io::stdin().is_terminal() {
            eprintln!("reading items from stdin, one per line (Ctrl-D to end)");
        }
        read_lines(std::io::stdin().lock()).context("cannot read stdin")?
    };
    let mut items = Vec::with_capacity(lines.len());
    for (index, line) in lines.into_iter().enumerate() {
        let id = match ids {
            IdScheme::Uuid => String::new(),
            IdScheme::Payload => {
                if line.is_empty() || line.len() > 128 || line.chars().any(char::is_control) {
                    bail!(
                        "item {} cannot be its own id (empty, over 128 bytes or control \
                         characters); use --ids uuid",
                        index + 1
                    );
                }
                line.clone()
            }
        };
        items.push(pb::EnqueueItem {
            id,
            payload: line.into_bytes().into(),
            ..Default::default()
        });
    }
    let total = items.len() as u64;
    let bar = (std::io::stderr().is_terminal() && total >= 1000).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} items {per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let summary = client
        .enqueue_all(
            queue,
            futures_util::stream::iter(items),
            batch,
            wq_client::batch::DEFAULT_IN_FLIGHT,
            |done| {
                if let Some(bar) = &bar {
                    bar.set_position(done);
                }
            },
        )
        .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    println!(
        "added {} items to {queue}, {} duplicates",
        summary.added, summary.duplicates
    );
    if seal {
        client.seal(queue).await?;
        println!("sealed {queue}");
    }
    Ok(())
}

fn read_lines(reader: impl BufRead) -> std::io::Result<Vec<String>> {
    reader
        .lines()
        .filter(|line| !matches!(line, Ok(l) if l.is_empty()))
        .collect()
}

async fn wait(
    client: &Client,
    queue: &str,
    sealed: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let bar = std::io::stderr()
        .is_terminal()
        .then(indicatif::ProgressBar::new_spinner);
    loop {
        let state = client.queue_state(queue).await?;
        let done = state.drained && (!sealed || state.sealed);
        if let Some(bar) = &bar {
            bar.set_message(format!(
                "{queue}: {} ready, {} leased, {} delayed, {} completed{}",
                state.ready,
                state.leased,
                state.delayed,
                state.completed_total,
                if sealed && !state.sealed {
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
                if sealed { "sealed and " } else { "" },
                state.completed_total,
                state.dead
            );
            return Ok(ExitCode::SUCCESS);
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            eprintln!(
                "timed out: {queue} still has {} ready, {} leased, {} delayed{}",
                state.ready,
                state.leased,
                state.delayed,
                if sealed && !state.sealed {
                    " and is not sealed"
                } else {
                    ""
                }
            );
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
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
