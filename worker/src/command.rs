//! Handlers of the `wq-worker` binary: run an external command per item, or (with no command)
//! print the item and sleep, as the Kubernetes example's worker does.

use std::{process::Stdio, time::Duration};

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{Handler, LeasedItem, Outcome};

/// Most bytes of a command's stdout kept as the item's result.
pub const MAX_RESULT_BYTES: usize = 64 * 1024;
/// Most bytes of a command's stderr kept (its tail) as the item's error.
pub const MAX_ERROR_BYTES: usize = 4 * 1024;
/// The exit status by which a command says "permanent failure: dead-letter this item now".
pub const DEFAULT_PERMANENT_EXIT: i32 = 100;

/// Runs `program args…` once per item: the payload on stdin, `WQ_QUEUE`, `WQ_ITEM_ID` and
/// `WQ_ATTEMPT` in the environment. Exit 0 completes the item with stdout (first 64 KiB) as its
/// result; the permanent-failure status dead-letters it; any other failure retries it with the
/// tail of stderr as the error.
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
        let spawned = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .env("WQ_QUEUE", &self.queue)
            .env("WQ_ITEM_ID", &item.id)
            .env("WQ_ATTEMPT", item.attempt.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A handler cancelled at shutdown must not leave its command running.
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
        let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Outcome::Retry {
                error: "the command's pipes could not be opened".into(),
                delay: None,
            };
        };
        let payload = item.payload.clone();
        let feed = async move {
            // A command that does not read its input closes the pipe early; that is fine.
            let _ = stdin.write_all(&payload).await;
            drop(stdin);
        };
        let read_out = async {
            let mut out = Vec::new();
            let _ = (&mut stdout)
                .take(MAX_RESULT_BYTES as u64)
                .read_to_end(&mut out)
                .await;
            // Drain the rest so the command never blocks on a full pipe.
            let _ = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await;
            out
        };
        let read_err = async {
            let mut err = Vec::new();
            let _ = stderr.read_to_end(&mut err).await;
            err
        };
        let ((), out, err, status) = tokio::join!(feed, read_out, read_err, child.wait());
        let tail = stderr_tail(&err);
        match status {
            Ok(status) if status.success() => Outcome::Complete(Bytes::from(out)),
            Ok(status) if status.code() == Some(self.permanent_exit) => {
                Outcome::DeadLetter(describe(status, &tail))
            }
            Ok(status) => Outcome::Retry {
                error: describe(status, &tail),
                delay: None,
            },
            Err(error) => Outcome::Retry {
                error: format!("waiting for the command failed: {error}"),
                delay: None,
            },
        }
    }
}

fn stderr_tail(err: &[u8]) -> String {
    let start = err.len().saturating_sub(MAX_ERROR_BYTES);
    String::from_utf8_lossy(&err[start..]).trim().to_owned()
}

fn describe(status: std::process::ExitStatus, tail: &str) -> String {
    if tail.is_empty() {
        format!("command {status}")
    } else {
        format!("command {status}: {tail}")
    }
}

/// The demo handler: prints the item, sleeps, completes.
#[derive(Debug, Clone, Copy)]
pub struct SleepHandler {
    /// How long "work" takes.
    pub work_time: Duration,
}

impl Handler for SleepHandler {
    async fn handle(&self, item: &LeasedItem) -> Outcome {
        println!("Working on {}", String::from_utf8_lossy(&item.payload));
        tokio::time::sleep(self.work_time).await;
        Outcome::Complete(Bytes::new())
    }
}
