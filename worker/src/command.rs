//! Handlers of the `wq-worker` binary: run an external command per item, or (with no command)
//! print the item and sleep, as the Kubernetes example's worker does.
//!
//! # What a command may cost the worker
//!
//! A pod runs whatever command it is given, so the worker bounds what one can do to it:
//!
//! - **Memory.** Of stdout only the first [`MAX_RESULT_BYTES`] are kept, of stderr only the
//!   last [`MAX_ERROR_BYTES`]; the rest is read and dropped as it arrives, so a command writing
//!   gigabytes costs a few KiB, and it never blocks on a full pipe.
//! - **Time.** The command's exit ends its item. Its pipes are read for at most [`PIPE_GRACE`]
//!   after that: a background process it left behind inherits them and may keep them open for
//!   ever, and must not keep the item leased.
//! - **Processes.** Each command leads its own process group. When the worker gives up on an
//!   item (its shutdown grace is over, and the handler is dropped) the whole group gets SIGKILL,
//!   not only the command, so `sh -c` scripts and their children go too.
//! - **Secrets.** The worker's own credentials ([`STRIPPED_ENV`]) are removed from the
//!   command's environment: the token is for talking to the broker, not for every program the
//!   queue's payloads make it run. (The `wq-worker` binary also makes itself non-dumpable, so
//!   a command cannot read the token from `/proc/<worker>/environ` or the worker's memory.)

use std::{future::Future, process::Stdio, time::Duration};

use bytes::Bytes;
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _},
    process::Child,
};

use crate::{Handler, LeasedItem, Outcome};

/// Most bytes of a command's stdout kept as the item's result.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;
/// Most bytes of the error text a failed command's item gets: its exit status and the tail of
/// its stderr. The broker's default `--max-error-bytes`, so the broker does not cut off the
/// end of the tail, the part that usually says what went wrong.
pub const MAX_ERROR_BYTES: usize = 4 * 1024;
/// The exit status by which a command says "permanent failure: dead-letter this item now".
pub const DEFAULT_PERMANENT_EXIT: i32 = 100;
/// How long a command's pipes are still read after it exited. Long enough for the kernel to
/// hand over what the command wrote just before exiting; short, because pipes still open after
/// that are held by processes the command left behind, whose output is not the item's.
pub const PIPE_GRACE: Duration = Duration::from_millis(250);
/// Environment variables the worker reads its own credentials from (`ConnectOptions` in
/// `wq-client`: the bearer token, its file, and the TLS CA and client certificate files),
/// removed from every command's environment.
pub const STRIPPED_ENV: &[&str] = &[
    "WQ_TOKEN",
    "WQ_TOKEN_FILE",
    "WQ_CA_FILE",
    "WQ_CLIENT_CERT",
    "WQ_CLIENT_KEY",
];

/// Size of the buffer a pipe is read through.
const READ_CHUNK: usize = 16 * 1024;

/// Runs `program args…` once per item: the payload on stdin, `WQ_QUEUE`, `WQ_ITEM_ID` and
/// `WQ_ATTEMPT` in the environment (and not the worker's credentials, [`STRIPPED_ENV`]). Exit 0
/// completes the item with stdout (first 64 KiB) as its result; the permanent-failure status
/// dead-letters it; any other failure retries it with the tail of stderr as the error. The
/// module's documentation lists the bounds on what a command costs.
#[derive(Debug, Clone)]
pub struct CommandHandler {
    /// The program.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The queue (for `WQ_QUEUE`).
    pub queue: String,
    /// The exit status meaning "dead-letter now".
    pub permanent_exit: i32,
}

impl Handler for CommandHandler {
    async fn handle(&self, item: &LeasedItem) -> Outcome {
        let mut command = tokio::process::Command::new(&self.program);
        command.args(&self.args);
        for name in STRIPPED_ENV {
            command.env_remove(name);
        }
        let spawned = command
            .env("WQ_QUEUE", &self.queue)
            .env("WQ_ITEM_ID", &item.id)
            .env("WQ_ATTEMPT", item.attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so that the command and everything it starts can be killed
            // together (and a Ctrl-C meant for the worker is the worker's to handle).
            .process_group(0)
            // A handler cancelled at shutdown must not leave its command running; the group
            // guard below takes the command's children too.
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                return Outcome::Retry {
                    error: format!("cannot start {}: {error}", self.program),
                    delay: None,
                };
            }
        };
        // Declared after `child`, so dropped before it: the group is killed, then tokio kills
        // and reaps the command itself.
        let group = GroupGuard::of(&child);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Outcome::Retry {
                error: "the command's pipes could not be opened".into(),
                delay: None,
            };
        };
        let mut out = Vec::new();
        let mut err = Tail::new(MAX_ERROR_BYTES);
        let io = async {
            tokio::join!(
                feed(stdin, item.payload.clone()),
                read_head(stdout, &mut out, MAX_RESULT_BYTES),
                read_tail(stderr, &mut err),
            );
        };
        let (status, pipes_closed) = wait_then_drain(&mut child, io).await;
        // Whatever it left running after a normal exit is its own business.
        group.disarm();
        if !pipes_closed {
            tracing::warn!(
                id = %item.id,
                "the command exited but something it started keeps its pipes open; \
                 using what it wrote before exiting"
            );
        }
        match status {
            Ok(status) if status.success() => Outcome::Complete(Bytes::from(out)),
            Ok(status) if status.code() == Some(self.permanent_exit) => {
                Outcome::DeadLetter(describe(status, &err))
            }
            Ok(status) => Outcome::Retry {
                error: describe(status, &err),
                delay: None,
            },
            Err(error) => Outcome::Retry {
                error: format!("waiting for the command failed: {error}"),
                delay: None,
            },
        }
    }
}

/// Waits for `child` to exit while `io` feeds and reads its pipes, then lets `io` go on for at
/// most [`PIPE_GRACE`]. Returns the exit status, and whether `io` finished (every pipe closed).
async fn wait_then_drain(
    child: &mut Child,
    io: impl Future<Output = ()>,
) -> (std::io::Result<std::process::ExitStatus>, bool) {
    let mut io = std::pin::pin!(io);
    let mut io_done = false;
    let status = tokio::select! {
        status = child.wait() => status,
        () = &mut io => {
            // It closed its pipes and goes on; its exit still decides.
            io_done = true;
            child.wait().await
        }
    };
    if !io_done {
        io_done = tokio::time::timeout(PIPE_GRACE, &mut io).await.is_ok();
    }
    (status, io_done)
}

/// Writes the payload to the command's stdin and closes it.
async fn feed(mut stdin: tokio::process::ChildStdin, payload: Bytes) {
    // A command that does not read its input closes the pipe early; that is fine.
    let _ = stdin.write_all(&payload).await;
}

/// Reads `pipe` to its end, keeping its first `limit` bytes in `head` and dropping the rest.
async fn read_head(mut pipe: impl AsyncRead + Unpin, head: &mut Vec<u8>, limit: usize) {
    let mut chunk = vec![0; READ_CHUNK];
    // A read error ends the output like an end of file would: the exit status still decides.
    while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
        let room = limit.saturating_sub(head.len());
        head.extend_from_slice(&chunk[..n.min(room)]);
    }
}

/// Reads `pipe` to its end, keeping its last bytes in `tail`.
async fn read_tail(mut pipe: impl AsyncRead + Unpin, tail: &mut Tail) {
    let mut chunk = vec![0; READ_CHUNK];
    while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
        tail.push(&chunk[..n]);
    }
}

/// The last `limit` bytes of a stream, kept as it is read: memory stays under twice `limit`
/// however much the stream carries.
#[derive(Debug)]
struct Tail {
    /// The stream's last bytes: all of them up to `limit`, and between `limit` and twice that
    /// once more arrived.
    bytes: Vec<u8>,
    limit: usize,
    /// Bytes were dropped from the front, so the first kept byte may be inside a character.
    cut: bool,
}

impl Tail {
    fn new(limit: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(2 * limit),
            limit,
            cut: false,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= self.limit {
            self.cut |= chunk.len() > self.limit || !self.bytes.is_empty();
            self.bytes.clear();
            self.bytes
                .extend_from_slice(&chunk[chunk.len() - self.limit..]);
            return;
        }
        // Slide the last `limit` bytes to the front only when the buffer is full: one copy
        // per `limit` bytes read, rather than one per read.
        if self.bytes.len() + chunk.len() > 2 * self.limit {
            let keep_from = self.bytes.len() - self.limit;
            self.bytes.copy_within(keep_from.., 0);
            self.bytes.truncate(self.limit);
            self.cut = true;
        }
        self.bytes.extend_from_slice(chunk);
    }

    /// The tail as trimmed text of at most `max` bytes (fewer when the cut falls in a
    /// character), never starting with the remains of a character cut in half.
    fn text(&self, max: usize) -> String {
        let bytes = &self.bytes;
        // The buffer may hold more than `limit` bytes, but no more than those are promised.
        let mut start = bytes.len().saturating_sub(max.min(self.limit));
        if self.cut || start > 0 {
            // UTF-8 continuation bytes are 0b10xx_xxxx; a character has at most three.
            let partial = bytes[start..]
                .iter()
                .take(3)
                .take_while(|b| (**b & 0xC0) == 0x80)
                .count();
            start += partial;
        }
        let text = String::from_utf8_lossy(&bytes[start..]);
        let text = text.trim();
        // Invalid bytes became three-byte replacement characters: cut again, at a boundary.
        let mut from = text.len().saturating_sub(max);
        while !text.is_char_boundary(from) {
            from += 1;
        }
        text[from..].trim_start().to_owned()
    }
}

/// The error text of a failed command: its status, then as much of the end of its stderr as
/// fits in [`MAX_ERROR_BYTES`] with it.
fn describe(status: std::process::ExitStatus, err: &Tail) -> String {
    let head = format!("command {status}");
    let tail = err.text(MAX_ERROR_BYTES.saturating_sub(head.len() + 2));
    if tail.is_empty() {
        head
    } else {
        format!("{head}: {tail}")
    }
}

/// Kills a command's process group when dropped, unless disarmed. The handler's future is
/// dropped when the worker gives up on the item (the shutdown grace is over); the command and
/// everything it started must not outlive that.
struct GroupGuard {
    /// The group's id: the command's pid, as it leads the group. None once disarmed, or when
    /// the pid could not be had (the command is then only killed by `kill_on_drop`).
    group: Option<Pid>,
}

impl GroupGuard {
    fn of(child: &Child) -> Self {
        let group = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(Pid::from_raw);
        Self { group }
    }

    /// The command has exited and its item is done: nothing to kill.
    fn disarm(mut self) {
        self.group = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            // SIGKILL, as the grace for finishing is already over when the handler is dropped.
            // An error means the group is gone already: nothing left to kill.
            if kill_process_group(group, Signal::KILL).is_ok() {
                tracing::debug!(
                    group = group.as_raw_nonzero().get(),
                    "killed the command's group"
                );
            }
        }
    }
}

/// The demo handler: prints the item, sleeps, completes. With no work time it does nothing at
/// all but complete, so it measures the worker itself.
#[derive(Debug, Clone, Copy)]
pub struct SleepHandler {
    /// How long "work" takes.
    pub work_time: Duration,
}

impl Handler for SleepHandler {
    async fn handle(&self, item: &LeasedItem) -> Outcome {
        // Even a zero sleep waits for the timer's next tick (about a millisecond per item), and
        // a line per item is a write per item: no work time means neither.
        if !self.work_time.is_zero() {
            println!("Working on {}", String::from_utf8_lossy(&item.payload));
            tokio::time::sleep(self.work_time).await;
        }
        Outcome::Complete(Bytes::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_only_the_last_bytes_whatever_the_chunks() {
        let mut tail = Tail::new(8);
        tail.push(b"0123");
        assert_eq!(tail.text(8), "0123");
        tail.push(b"4567");
        tail.push(b"89");
        assert_eq!(tail.text(8), "23456789");
        tail.push(b"a very long chunk, longer than the limit");
        assert_eq!(tail.text(8), "he limit");
        assert!(tail.bytes.len() <= 16);
        assert_eq!(tail.text(3), "mit");
    }

    #[test]
    fn a_tail_cut_inside_a_character_drops_its_remains() {
        let mut tail = Tail::new(5);
        // "é" is two bytes: the cut leaves its second byte first.
        tail.push("xxé!!!\n".as_bytes());
        assert_eq!(tail.text(5), "!!!");
        let mut tail = Tail::new(16);
        tail.push("ééé".as_bytes());
        assert_eq!(tail.text(3), "é");
    }

    #[test]
    fn the_error_text_fits_the_brokers_limit_and_ends_with_the_end_of_stderr() {
        let mut tail = Tail::new(MAX_ERROR_BYTES);
        tail.push(&vec![b'x'; 3 * MAX_ERROR_BYTES]);
        tail.push(b"the real reason\n");
        // A wait status of 1 << 8 is "exited with status 1".
        let status = std::os::unix::process::ExitStatusExt::from_raw(1 << 8);
        let text = describe(status, &tail);
        assert!(text.len() <= MAX_ERROR_BYTES, "{}", text.len());
        assert!(text.starts_with("command exit status: 1: xxx"), "{text}");
        assert!(text.ends_with("the real reason"), "{text}");
    }

    /// Every variable `ConnectOptions` reads is stripped unless it is a known non-secret
    /// setting: a new one added there without being classified here fails this test.
    #[test]
    fn every_credential_variable_of_the_client_is_stripped() {
        use clap::Args as _;
        let command = wq_client::ConnectOptions::augment_args(clap::Command::new("wq-worker"));
        let read: Vec<String> = command
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned())
            .collect();
        assert!(read.iter().any(|env| env == "WQ_TOKEN"), "{read:?}");
        // The broker's address and the client's limits are no secrets; commands may need them.
        const NOT_SECRET: [&str; 3] = ["WQ_BROKER", "WQ_MAX_MESSAGE_BYTES", "WQ_CALL_TIMEOUT"];
        for env in read {
            if !NOT_SECRET.contains(&env.as_str()) {
                assert!(
                    STRIPPED_ENV.contains(&env.as_str()),
                    "{env} is not stripped"
                );
            }
        }
    }

    /// With no work time the demo handler never touches the timer: on a runtime without one,
    /// a sleep, even of zero, would panic.
    #[test]
    fn zero_work_time_does_not_sleep() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime without timers");
        let handler = SleepHandler {
            work_time: Duration::ZERO,
        };
        let item = LeasedItem {
            payload: Bytes::from_static(b"x"),
            ..LeasedItem::default()
        };
        let outcome = runtime.block_on(handler.handle(&item));
        assert_eq!(outcome, Outcome::Complete(Bytes::new()));
    }
}
