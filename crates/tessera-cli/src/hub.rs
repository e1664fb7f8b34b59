//! `tessera hub`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use tessera_hub::{AppState, HubPolicy, HubStore, app};

#[derive(Subcommand)]
pub enum Command {
    /// Serve a hub over HTTP: the REST API under /api/v1, the OpenAPI document at
    /// /openapi.json and an interactive docs page at /docs (no internet needed).
    Serve {
        /// Where the hub keeps its database and blobs (default: $TESSERA_HOME/hub).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7700")]
        listen: SocketAddr,
        /// Accept unsigned requests and packages (signed ones are still checked). By
        /// default every mutating request and every package must be signed.
        #[arg(long)]
        open: bool,
        /// How far a signed request's time may be from the hub's clock, in seconds.
        #[arg(long, default_value_t = 60)]
        window: u64,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Serve { data, listen, open, window } => {
            let data = data.unwrap_or_else(|| crate::tessera_home().join("hub"));
            let store =
                Arc::new(HubStore::open(&data).with_context(|| format!("opening the hub at {}", data.display()))?);
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
            let addr = listener.local_addr()?;
            tracing::info!("hub serving {} at http://{addr} (docs: http://{addr}/docs/)", data.display());
            let mut policy = if open { HubPolicy::open() } else { HubPolicy::signed() };
            policy.window_ms = window.saturating_mul(1000);
            eprintln!("hub: http://{addr}  docs: http://{addr}/docs/  data: {}", data.display());
            eprintln!(
                "hub key: {}; {}",
                store.key().public(),
                if open {
                    "open: unsigned requests are accepted"
                } else {
                    "mutating requests and packages must be signed"
                }
            );
            axum::serve(listener, app(AppState::new(store, policy)))
                .with_graceful_shutdown(crate::shutdown_signal())
                .await?;
            Ok(())
        }
    }
}
