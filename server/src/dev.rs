//! A private `redis-server` child process: the broker's `--dev` mode and the test harness's Redis.
//! It listens on a free loopback port, keeps its files in its own temporary directory, and is
//! killed when dropped.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

/// How to install the server when it is missing.
pub const INSTALL_HINT: &str =
    "redis-server was not found on PATH; install it, e.g. `sudo apt-get install redis-server`";

/// Why a private Redis could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DevRedisError {
    /// `redis-server` is not installed.
    #[error("{INSTALL_HINT}")]
    NotInstalled,
    /// Spawning or preparing failed.
    #[error("starting redis-server: {0}")]
    Io(#[from] std::io::Error),
    /// It did not answer in time.
    #[error("redis-server on port {port} did not answer within 10 s; its log: {log}")]
    NotReady {
        /// The port it was started on.
        port: u16,
        /// Its log file.
        log: String,
    },
}

/// A running private Redis.
#[derive(Debug)]
pub struct RedisProcess {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
    _tempdir: Option<tempfile::TempDir>,
}

impl RedisProcess {
    /// Starts a Redis without persistence on a free port, in a fresh temporary directory.
    ///
    /// # Errors
    /// [`DevRedisError::NotInstalled`] when there is no `redis-server`, or when it fails to start.
    pub async fn start() -> Result<Self, DevRedisError> {
        Self::start_with(&["--save", "", "--appendonly", "no"]).await
    }

    /// Starts a Redis with the given extra arguments (e.g. persistence settings).
    ///
    /// # Errors
    /// As [`RedisProcess::start`].
    pub async fn start_with(args: &[&str]) -> Result<Self, DevRedisError> {
        let tempdir = tempfile::Builder::new().prefix("wq-redis-").tempdir()?;
        let mut last = None;
        // Another process may take the port between our probe and redis-server's bind: retry.
        for _ in 0..5 {
            let mut redis = Self {
                child: None,
                port: free_port()?,
                dir: tempdir.path().to_path_buf(),
                extra_args: args.iter().map(|s| (*s).to_owned()).collect(),
                _tempdir: None,
            };
            match redis.spawn().await {
                Ok(()) => {
                    redis._tempdir = Some(tempdir);
                    return Ok(redis);
                }
                Err(DevRedisError::NotReady { port, log }) => {
                    last = Some(DevRedisError::NotReady { port, log });
                }
                Err(other) => return Err(other),
            }
        }
        Err(last.unwrap_or(DevRedisError::NotInstalled))
    }

    async fn spawn(&mut self) -> Result<(), DevRedisError> {
        let log = self.dir.join(format!("redis-{}.log", self.port));
        let mut command = Command::new("redis-server");
        command
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let child = command.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DevRedisError::NotInstalled,
            _ => DevRedisError::Io(e),
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(self.port).await {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && child.try_wait()?.is_some()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill().await;
        Err(DevRedisError::NotReady {
            port: self.port,
            log: log.display().to_string(),
        })
    }

    /// The `redis://` URL of this server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data directory (for persistence tests).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Kills the server and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port and directory (after [`RedisProcess::kill`]).
    ///
    /// # Errors
    /// When it does not come back.
    pub async fn restart(&mut self) -> Result<(), DevRedisError> {
        self.kill().await;
        self.spawn().await
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn ping(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return false;
    };
    // A server that refuses us for want of a password (`--requirepass` among its arguments)
    // answers too.
    let attempt = async {
        let mut conn = match client.get_multiplexed_async_connection().await {
            Ok(conn) => conn,
            Err(error) if error.kind() == redis::ErrorKind::AuthenticationFailed => {
                return Some(());
            }
            Err(_) => return None,
        };
        match redis::cmd("PING").query_async::<String>(&mut conn).await {
            Ok(_) => Some(()),
            Err(error) if error.code() == Some("NOAUTH") => Some(()),
            Err(_) => None,
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(_))
    )
}
