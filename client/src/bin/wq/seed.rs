//! `wq seed`: items from the arguments, a file or stdin, streamed to the broker in batches sent
//! one after another, so the queue's order is the input's and memory stays bounded whatever
//! the input's size. A batch goes out when it is full (in items or in bytes) or when the input
//! pauses, so a slow producer's items are in the queue while it is still writing. A line longer
//! than `--max-item-bytes` stops the seed when its first bytes past the limit are read: the rest
//! of it is never held in memory.

use std::{
    fmt,
    io::{BufRead, IsTerminal as _, Read as _},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use wq_client::{
    Client,
    batch::{MAX_BATCH_BYTES, item_bytes},
    pb,
};

/// How `wq seed` reads its input; shown by `wq seed --help`.
pub(crate) const INPUT_RULES: &str = "\
Input: one item per line, sent in batches in input order (a batch goes out when it holds --batch \
items or 4 MiB, or when the input pauses for 100 ms, so items from a slow producer are queued \
as they come).
  - a UTF-8 byte order mark at the start of line 1 is dropped;
  - lines may end in \\n or \\r\\n (the \\r is dropped); the last line needs no newline;
  - empty and whitespace-only lines are skipped; any other line is the item as it is, spaces \
included;
  - a line that is not UTF-8, is longer than --max-item-bytes (read no further than that), or \
(with --ids payload) cannot be an id, stops the seed with exit status 1: the error names its \
line number (counting every line, skipped ones too), and the lines before it have been sent.
Arguments are items as given (none are skipped).";

/// How long the input may pause before a partial batch is sent anyway.
const PAUSE: Duration = Duration::from_millis(100);

/// Lines read ahead of the batch being sent: what bounds memory, whatever the input's size.
const READ_AHEAD: usize = 1024;

/// Bytes of lines read ahead of the batch being sent: with long lines, [`READ_AHEAD`] lines
/// alone could be a gigabyte.
const READ_AHEAD_BYTES: usize = 8 << 20;

/// The broker's default `--max-payload-bytes`: the default longest line.
const DEFAULT_MAX_ITEM_BYTES: usize = 1 << 20;

/// The longest id the broker accepts.
const MAX_ID_BYTES: usize = 128;

/// The flags of `wq seed`.
#[derive(Debug, clap::Args)]
pub(crate) struct SeedArgs {
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
    /// Items per Enqueue call (at most the broker's --max-batch); a batch also goes out at
    /// 4 MiB.
    #[arg(long, default_value_t = wq_client::batch::DEFAULT_BATCH)]
    batch: usize,
    /// Longest line in bytes (without its line ending): the broker's --max-payload-bytes,
    /// 1 MiB by default. A longer line stops the seed, read no further than this.
    #[arg(long, default_value_t = DEFAULT_MAX_ITEM_BYTES)]
    max_item_bytes: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum IdScheme {
    Payload,
    Uuid,
}

/// Where an item came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Argument(u64),
    Line(u64),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Argument(n) => write!(f, "argument {n}"),
            Self::Line(n) => write!(f, "line {n}"),
        }
    }
}

/// What the reading thread hands on.
#[derive(Debug)]
enum Input {
    /// An item, and its share of [`READ_AHEAD_BYTES`], given back once it is in a batch.
    Item(Origin, String, Option<OwnedSemaphorePermit>),
    /// A line that stops the seed, and why.
    Bad(Origin, String),
    /// Reading failed.
    Failed(std::io::Error),
}

/// Items waiting to be sent, with where each came from.
#[derive(Default)]
struct Batch {
    items: Vec<pb::EnqueueItem>,
    origins: Vec<Origin>,
    /// Encoded bytes of `items`.
    bytes: usize,
}

/// Runs `wq seed`.
///
/// # Errors
/// The first bad line, a read error, or the broker's refusal of a batch; the batches before
/// it stay enqueued, and stdout says how many items that was.
pub(crate) async fn run(client: &Client, args: SeedArgs) -> anyhow::Result<()> {
    let (sender, mut input) = mpsc::channel(READ_AHEAD);
    if !args.items.is_empty() {
        let items = args.items;
        std::thread::spawn(move || {
            for (index, item) in (1..).zip(items) {
                if sender
                    .blocking_send(Input::Item(Origin::Argument(index), item, None))
                    .is_err()
                {
                    return;
                }
            }
        });
    } else if let Some(path) = &args.file {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let reader = std::io::BufReader::new(file);
        let lines = Lines::new(args.max_item_bytes);
        std::thread::spawn(move || lines.read(reader, &sender));
    } else {
        if std::io::stdin().is_terminal() {
            eprintln!("reading items from stdin, one per line (Ctrl-D to end)");
        }
        // A plain thread, not spawn_blocking: a read blocked on stdin must not keep the
        // runtime (and so the process) alive after an error.
        let lines = Lines::new(args.max_item_bytes);
        std::thread::spawn(move || lines.read(std::io::stdin().lock(), &sender));
    }

    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos} items sent {per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    });
    let mut seeder = Seeder {
        client,
        queue: &args.queue,
        batch_size: args.batch.max(1),
        bar: bar.as_ref(),
        added: 0,
        duplicates: 0,
    };
    let outcome = seeder.feed(&mut input, args.ids).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    println!(
        "added {} items to {}, {} duplicates",
        seeder.added, args.queue, seeder.duplicates
    );
    outcome?;
    if args.seal {
        client.seal(&args.queue).await?;
        println!("sealed {}", args.queue);
    }
    Ok(())
}

/// Sends batches one at a time and counts what the broker did with them.
struct Seeder<'a> {
    client: &'a Client,
    queue: &'a str,
    batch_size: usize,
    bar: Option<&'a indicatif::ProgressBar>,
    added: u64,
    duplicates: u64,
}

impl Seeder<'_> {
    /// Batches `input` until it ends or something stops the seed. Whatever came before a bad
    /// line is sent before the error is returned.
    async fn feed(
        &mut self,
        input: &mut mpsc::Receiver<Input>,
        ids: IdScheme,
    ) -> anyhow::Result<()> {
        let mut batch = Batch::default();
        loop {
            let next = if batch.items.is_empty() {
                input.recv().await
            } else {
                match tokio::time::timeout(PAUSE, input.recv()).await {
                    Ok(next) => next,
                    Err(_) => {
                        // The input paused: send what we have rather than wait for more.
                        self.send(&mut batch).await?;
                        continue;
                    }
                }
            };
            let stop = match next {
                None => None,
                Some(Input::Item(origin, text, _read_ahead)) => match item(text, ids) {
                    Ok(item) => {
                        let bytes = item_bytes(&item);
                        if batch.bytes + bytes > MAX_BATCH_BYTES {
                            self.send(&mut batch).await?;
                        }
                        batch.bytes += bytes;
                        batch.items.push(item);
                        batch.origins.push(origin);
                        if batch.items.len() >= self.batch_size {
                            self.send(&mut batch).await?;
                        }
                        continue;
                    }
                    Err(reason) => Some(anyhow!("{origin}: {reason}")),
                },
                Some(Input::Bad(origin, reason)) => Some(anyhow!("{origin}: {reason}")),
                Some(Input::Failed(error)) => Some(anyhow!(error).context("cannot read the input")),
            };
            self.send(&mut batch).await?;
            return stop.map_or(Ok(()), Err);
        }
    }

    /// Sends `batch` (if it holds anything) and waits for the answer, so batches are applied
    /// in input order.
    async fn send(&mut self, batch: &mut Batch) -> anyhow::Result<()> {
        if batch.items.is_empty() {
            return Ok(());
        }
        let items = std::mem::take(&mut batch.items);
        let origins = std::mem::take(&mut batch.origins);
        batch.bytes = 0;
        let results = self
            .client
            .enqueue(self.queue, items)
            .await
            .map_err(|error| refused(&error, &origins))?;
        for result in results {
            if result.duplicate {
                self.duplicates += 1;
            } else {
                self.added += 1;
            }
        }
        if let Some(bar) = self.bar {
            bar.set_position(self.added + self.duplicates);
        }
        Ok(())
    }
}

/// The line reader of a file or stdin: line by line, each at most `max_bytes`, with at most
/// [`READ_AHEAD_BYTES`] read ahead of the sender.
struct Lines {
    max_bytes: usize,
    read_ahead: std::sync::Arc<Semaphore>,
    /// The runtime, to wait for read-ahead room from the reading thread.
    runtime: tokio::runtime::Handle,
}

impl Lines {
    /// Must be called within the runtime.
    fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            read_ahead: std::sync::Arc::new(Semaphore::new(READ_AHEAD_BYTES)),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Reads `reader` into `sender` until it ends, a line stops the seed, or the receiver is
    /// gone.
    fn read(self, mut reader: impl BufRead, sender: &mpsc::Sender<Input>) {
        let mut raw = Vec::new();
        let mut number = 0;
        // A BOM on line 1 and a CRLF ending are not part of the item.
        let most = self.max_bytes.saturating_add(5);
        loop {
            raw.clear();
            let complete = match read_line(&mut reader, &mut raw, most) {
                Ok(None) => return,
                Ok(Some(complete)) => complete,
                Err(error) => {
                    let _ = sender.blocking_send(Input::Failed(error));
                    return;
                }
            };
            number += 1;
            let input = if complete {
                line(number, &raw, self.max_bytes)
            } else {
                Some(too_long(number, self.max_bytes))
            };
            let Some(mut input) = input else {
                continue;
            };
            if let Input::Item(_, text, permit) = &mut input {
                let bytes = u32::try_from(text.len().min(READ_AHEAD_BYTES)).unwrap_or(u32::MAX);
                *permit = self
                    .runtime
                    .block_on(std::sync::Arc::clone(&self.read_ahead).acquire_many_owned(bytes))
                    .ok();
            }
            let stop = matches!(input, Input::Bad(..));
            if sender.blocking_send(input).is_err() || stop {
                return;
            }
        }
    }
}

/// Reads one line (its `\n` included) into the empty `raw`, but no more than `most` bytes of
/// it: `None` at the end of the input, `Some(false)` when the line goes on past `most` (the
/// rest is left unread), `Some(true)` otherwise.
fn read_line(
    reader: &mut impl BufRead,
    raw: &mut Vec<u8>,
    most: usize,
) -> std::io::Result<Option<bool>> {
    let limit = u64::try_from(most).unwrap_or(u64::MAX);
    if reader.take(limit).read_until(b'\n', raw)? == 0 {
        return Ok(None);
    }
    Ok(Some(raw.ends_with(b"\n") || raw.len() < most))
}

/// The error for line `number`, longer than `max_bytes`.
fn too_long(number: u64, max_bytes: usize) -> Input {
    Input::Bad(
        Origin::Line(number),
        format!(
            "longer than {max_bytes} bytes (--max-item-bytes, the broker's --max-payload-bytes); \
             nothing after it was read"
        ),
    )
}

/// Line `number` of the input as the input rules read it: `None` for a line that is skipped.
fn line(number: u64, raw: &[u8], max_bytes: usize) -> Option<Input> {
    const BOM: &[u8] = "\u{feff}".as_bytes();
    let mut line = raw.strip_suffix(b"\n").unwrap_or(raw);
    line = line.strip_suffix(b"\r").unwrap_or(line);
    if number == 1 {
        line = line.strip_prefix(BOM).unwrap_or(line);
    }
    let origin = Origin::Line(number);
    match std::str::from_utf8(line) {
        Err(error) => Some(Input::Bad(
            origin,
            format!("not UTF-8 text (byte {})", error.valid_up_to() + 1),
        )),
        Ok(text) if text.trim().is_empty() => None,
        Ok(_) if line.len() > max_bytes => Some(too_long(number, max_bytes)),
        Ok(text) => Some(Input::Item(origin, text.to_owned(), None)),
    }
}

/// The item for `text`, or why it cannot be one.
fn item(text: String, ids: IdScheme) -> Result<pb::EnqueueItem, String> {
    let id = match ids {
        IdScheme::Uuid => String::new(),
        IdScheme::Payload => {
            if text.is_empty() || text.len() > MAX_ID_BYTES || text.chars().any(char::is_control) {
                return Err(format!(
                    "cannot be its own id (empty, over {MAX_ID_BYTES} bytes or control \
                     characters); use --ids uuid"
                ));
            }
            text.clone()
        }
    };
    Ok(pb::EnqueueItem {
        id,
        payload: text.into_bytes().into(),
        ..Default::default()
    })
}

/// A batch failed as a whole: say which input it held, name the item when the broker did (its
/// messages point at `items[i]`, the index within the batch), and whether the batch is known
/// not to be in the queue.
fn refused(error: &wq_client::Error, origins: &[Origin]) -> anyhow::Error {
    use tonic::Code;
    let span = match (origins.first(), origins.last()) {
        (Some(first), Some(last)) if first == last => first.to_string(),
        (Some(Origin::Line(a)), Some(Origin::Line(b))) => format!("lines {a}-{b}"),
        (Some(Origin::Argument(a)), Some(Origin::Argument(b))) => format!("arguments {a}-{b}"),
        _ => "a batch".to_owned(),
    };
    // These the broker answers before it writes anything; after a timeout or a broken
    // connection the batch may or may not have been applied.
    let refused_unwritten = matches!(
        error,
        wq_client::Error::Status(status) if std::error::Error::source(status).is_none()
            && matches!(
                status.code(),
                Code::InvalidArgument
                    | Code::FailedPrecondition
                    | Code::PermissionDenied
                    | Code::Unauthenticated
                    | Code::ResourceExhausted
                    | Code::NotFound
                    | Code::OutOfRange
            )
    );
    let fate = if refused_unwritten {
        format!("not added: {span}")
    } else {
        format!("{span} may or may not have been added")
    };
    let message = error.to_string();
    let named = message
        .split_once("items[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .and_then(|(index, _)| index.parse::<usize>().ok())
        .and_then(|index| origins.get(index));
    match named {
        Some(origin) => anyhow!("{origin}: {message} ({fate})"),
        None => anyhow!("{message} ({fate})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(input: Option<Input>) -> Option<String> {
        match input {
            Some(Input::Item(_, text, _)) => Some(text),
            Some(other) => panic!("not an item: {other:?}"),
            None => None,
        }
    }

    #[test]
    fn lines_lose_a_leading_bom_and_crlf_and_blank_ones_are_skipped() {
        assert_eq!(
            text(line(1, "\u{feff}a b\r\n".as_bytes(), 100)).as_deref(),
            Some("a b")
        );
        // A BOM after line 1 is data.
        assert_eq!(
            text(line(2, "\u{feff}x\n".as_bytes(), 100)).as_deref(),
            Some("\u{feff}x")
        );
        assert_eq!(text(line(3, b"last", 100)).as_deref(), Some("last"));
        assert_eq!(text(line(4, b" \t \r\n", 100)), None);
        assert_eq!(text(line(5, b"\n", 100)), None);
        assert!(matches!(
            line(6, b"a\xffb\n", 100),
            Some(Input::Bad(Origin::Line(6), reason)) if reason.contains("UTF-8")
        ));
    }

    #[test]
    fn a_line_is_read_no_further_than_its_limit() {
        let mut input = std::io::BufReader::with_capacity(4, &b"abcdefgh\nij\nk"[..]);
        let mut raw = Vec::new();
        assert_eq!(read_line(&mut input, &mut raw, 5).ok(), Some(Some(false)));
        assert_eq!(raw, b"abcde", "only the limit's bytes are taken");
        raw.clear();
        // What follows is where the reader stopped; the caller stops there too.
        assert_eq!(read_line(&mut input, &mut raw, 5).ok(), Some(Some(true)));
        assert_eq!(raw, b"fgh\n");
        raw.clear();
        assert_eq!(read_line(&mut input, &mut raw, 5).ok(), Some(Some(true)));
        assert_eq!(raw, b"ij\n");
        raw.clear();
        assert_eq!(read_line(&mut input, &mut raw, 5).ok(), Some(Some(true)));
        assert_eq!(raw, b"k");
        raw.clear();
        assert_eq!(read_line(&mut input, &mut raw, 5).ok(), Some(None));
        assert!(matches!(
            line(7, b"abcd\n", 3),
            Some(Input::Bad(Origin::Line(7), reason)) if reason.contains("longer than 3 bytes")
        ));
    }

    #[test]
    fn a_refused_batch_names_the_line_the_broker_points_at() {
        let origins = [Origin::Line(3), Origin::Line(5), Origin::Line(6)];
        let error = wq_client::Error::Status(tonic::Status::invalid_argument(
            "items[1].payload: must be at most 1048576 bytes",
        ));
        let message = refused(&error, &origins).to_string();
        assert!(message.starts_with("line 5: invalid argument"), "{message}");
        assert!(message.ends_with("(not added: lines 3-6)"), "{message}");
        let unknown = wq_client::Error::Deadline {
            call: "Enqueue",
            after: Duration::from_secs(10),
        };
        let message = refused(&unknown, &origins).to_string();
        assert!(
            message.ends_with("(lines 3-6 may or may not have been added)"),
            "{message}"
        );
    }
}
