//! The `wq-server` binary: parse flags, set up logging, bind, and run [`wq_server::serve`].

use anyhow::Context as _;
use clap::Parser as _;
use wq_server::{
    config::{Config, LogFormat},
    connection::{RedisMode, RedisTarget},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_tracing(config.log_format);

    // Kept alive for the whole run: dropping it stops the private Redis.
    let mut dev_redis = None;
    if config.dev && config.redis_mode != RedisMode::Standalone {
        anyhow::bail!("--dev starts one private redis-server: it takes no --redis-mode");
    }
    let redis_url = if config.dev {
        let redis = wq_server::dev::RedisProcess::start()
            .await
            .context("--dev needs a local redis-server")?;
        tracing::info!(url = %redis.url(), "dev mode: started a private redis-server (no persistence)");
        let url = redis.url();
        dev_redis = Some(redis);
        url
    } else {
        config.redis_url.clone()
    };
    let redis = RedisTarget::parse(
        config.redis_mode,
        &redis_url,
        config.sentinel_master.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    wq_server::serve(
        listener,
        redis,
        config.broker,
        wq_server::shutdown::signal(),
    )
    .await?;
    if let Some(mut redis) = dev_redis {
        redis.kill().await;
    }
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
