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
        /// Uploads one account may have in progress at once (more get 429).
        #[arg(long, default_value_t = 4)]
        max_uploads: usize,
        /// Largest model binary accepted.
        #[arg(long, default_value = "8GiB")]
        max_model: tessera_core::ByteSize,
    },
    /// Set a namespace's owners directly in a hub's data (the operator's override, for
    /// whoever can read the hub's directory; the hub may be running). For namespaces that
    /// hold things written unsigned on an open hub: a hub that requires signatures gives
    /// them to its own key when it starts, and this hands them on.
    Owners {
        /// The namespace (the first segment of module paths).
        namespace: String,
        /// The new owners (ed25519:… or secp256k1:…).
        #[arg(required = true)]
        owners: Vec<String>,
        /// The hub's data directory (default: $TESSERA_HOME/hub).
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Owners { namespace, owners, data } => {
            let data = data.unwrap_or_else(|| crate::tessera_home().join("hub"));
            let store = HubStore::open(&data).with_context(|| format!("opening the hub at {}", data.display()))?;
            let keys = owners
                .iter()
                .map(|k| k.parse::<tessera_identity::PublicKey>().with_context(|| format!("owner {k:?}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            store.assign_owners(&namespace, &keys)?;
            for k in &keys {
                println!("{k}");
            }
            eprintln!("namespace {namespace} now belongs to {} key(s)", keys.len());
            Ok(())
        }
        Command::Serve { data, listen, open, window, max_uploads, max_model } => {
            let data = data.unwrap_or_else(|| crate::tessera_home().join("hub"));
            let store =
                Arc::new(HubStore::open(&data).with_context(|| format!("opening the hub at {}", data.display()))?);
            if !open {
                // No namespace that holds things may stay claimable by whoever writes first.
                let adopted = store.adopt_unowned()?;
                if !adopted.is_empty() {
                    eprintln!(
                        "hub: {} namespace(s) written unsigned had no owner and now belong to the hub's key: {} \
                         (hand them on with `tessera hub owners NS KEY --data {}`)",
                        adopted.len(),
                        adopted.join(", "),
                        data.display()
                    );
                }
            }
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
            let addr = listener.local_addr()?;
            tracing::info!("hub serving {} at http://{addr} (docs: http://{addr}/docs/)", data.display());
            let mut policy = if open { HubPolicy::open() } else { HubPolicy::signed() };
            policy.window_ms = window.saturating_mul(1000);
            policy.max_uploads_per_account = max_uploads.max(1);
            policy.max_model_bytes = max_model.0;
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
