//! `tessera hub`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use tessera_hub::{AppState, HubStore, app};

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
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Serve { data, listen } => {
            let data = data.unwrap_or_else(|| crate::tessera_home().join("hub"));
            let store =
                Arc::new(HubStore::open(&data).with_context(|| format!("opening the hub at {}", data.display()))?);
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
            let addr = listener.local_addr()?;
            tracing::info!("hub serving {} at http://{addr} (docs: http://{addr}/docs/)", data.display());
            eprintln!("hub: http://{addr}  docs: http://{addr}/docs/  data: {}", data.display());
            axum::serve(listener, app(AppState { store })).with_graceful_shutdown(crate::shutdown_signal()).await?;
            Ok(())
        }
    }
}
