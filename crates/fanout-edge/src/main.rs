//! `fanout-edge`: parse and validate configuration, start the node, serve until SIGTERM
//! or Ctrl-C, then close every connection with 1001 and exit 0.

use clap::Parser;
use fanout_edge::{Args, Node, Settings};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    raise_nofile_limit();
    let args = Args::parse();
    let settings = match Settings::from_args(args) {
        Ok(s) => s,
        Err(error) => {
            eprintln!("fanout-edge: configuration error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_env("FANOUT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if settings.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    if settings.dev_mode() {
        tracing::warn!("no JWT key configured: DEV MODE with a random HS256 secret and admin token; do not use in production");
    }
    if settings.allowed_origins.is_none() {
        tracing::warn!("no --allowed-origins: WebSocket connections from any Origin are accepted");
    }
    let dev_token = settings.dev_token.clone();
    let dev_admin = settings
        .dev_mode()
        .then(|| settings.admin_token.clone())
        .flatten();
    let node = match Node::start(settings).await {
        Ok(n) => n,
        Err(error) => {
            eprintln!("fanout-edge: {error}");
            return std::process::ExitCode::from(1);
        }
    };
    if let (Some(token), Some(admin)) = (dev_token, dev_admin) {
        let mut addr = node.local_addr();
        // 0.0.0.0 / [::] are where we listen, not where a client connects.
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        // Printed to stdout on purpose, once, in dev mode only: these are throwaway
        // credentials for this process.
        println!("\nfanout dev mode — try it:\n");
        println!("  websocat 'ws://{addr}/ws?token={token}'");
        println!("  {{\"type\":\"subscribe\",\"id\":1,\"channel\":\"user:demo\"}}\n");
        println!("  curl -X POST http://{addr}/api/publish -H 'Authorization: Bearer {admin}' \\");
        println!("       -d '{{\"channel\":\"user:demo\",\"data\":{{\"hello\":\"world\"}}}}'\n");
        println!("  demo user token: {token}");
        println!("  admin token:     {admin}\n");
    }
    shutdown_signal().await;
    let window = node.settings().drain;
    tracing::info!(
        window_secs = window.as_secs_f64(),
        connections = node.connections(),
        "shutdown signal received; draining: connections close with 1001 over the window"
    );
    node.drain(window).await;
    std::process::ExitCode::SUCCESS
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Raises the soft open-files limit to the hard limit: every socket is a descriptor.
fn raise_nofile_limit() {
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("fanout-edge: cannot raise the open-files limit: {error}");
    }
}
