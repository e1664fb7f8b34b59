//! `tessera hub`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use tessera_hub::{AppState, Database, HubPolicy, HubStore, app};

/// Where a hub keeps its records and blobs.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreArgs {
    /// The hub's data directory: its blobs (a cache of the shared store with --blobs), its
    /// key, and `hub.sqlite` unless --database (default: $TESSERA_HOME/hub).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where the hub keeps its records: a PostgreSQL connection string
    /// (`postgres://user@host:port/db`; TLS by libpq's `sslmode` and `sslrootcert`, e.g.
    /// `?sslmode=verify-full&sslrootcert=ca.pem`), which several hub processes may share; by
    /// default `hub.sqlite` in the data directory (with PostgreSQL the hub's key is kept in
    /// the database too).
    #[arg(long, env = "TESSERA_HUB_DATABASE", value_name = "URL")]
    database: Option<String>,
    /// Keep the hub's blobs in the NATS Object Store at this URL (buckets
    /// `tessera_hub_ID_blobs` and `tessera_hub_ID_small_blobs`, `ID` chosen for the hub's
    /// database, so several hubs may share one NATS server), which hub processes on several
    /// machines share; the data directory is then a cache. By default blobs are only in
    /// the data directory.
    #[arg(long, env = "TESSERA_HUB_BLOBS", value_name = "NATS_URL")]
    blobs: Option<String>,
    /// With --blobs: the most the data directory keeps of the shared store's blobs; past it
    /// the least recently used go (a blob used in the last 5 minutes stays). Default 10GiB.
    #[arg(long, env = "TESSERA_HUB_CACHE_SIZE", value_name = "SIZE")]
    cache_size: Option<tessera_core::ByteSize>,
}

impl StoreArgs {
    fn data(&self) -> PathBuf {
        self.data.clone().unwrap_or_else(|| crate::tessera_home().join("hub"))
    }

    fn database(&self) -> anyhow::Result<Database> {
        parse_database(self.database.as_deref())
    }

    /// Opens the hub, with its shared blobs when --blobs names them. Nothing is written in
    /// the data directory before --blobs is reached and the database's expectations are
    /// checked (its blobs shared, or in this directory).
    ///
    /// `directory`: how the data directory is checked as the one the blobs are in, for a
    /// hub over PostgreSQL without --blobs: `Some(true)` by a serving process (which claims
    /// it on first use), `Some(false)` by a reader of blobs, `None` by a command that
    /// touches no blob.
    async fn open(&self, directory: Option<bool>) -> anyhow::Result<HubStore> {
        let data = self.data();
        let database = self.database()?;
        anyhow::ensure!(
            self.cache_size.is_none() || self.blobs.is_some(),
            "--cache-size bounds the data directory's copy of the --blobs store; without --blobs the directory \
             holds the only copy of the hub's blobs"
        );
        let connected = self.connect_blobs().await?;
        let checks = tessera_hub::OpenChecks { shared_blobs: self.blobs.is_some(), blob_directory: directory };
        let what = match &database {
            Database::Sqlite => "SQLite",
            Database::Postgres(_) => "PostgreSQL",
        };
        let opened = HubStore::open_checked(&data, &database, tessera_package::Limits::default(), checks)
            .with_context(|| format!("opening the hub at {} (records in {what})", data.display()));
        match (opened, connected) {
            (Ok(store), connected) => self.share(store, connected).await,
            (Err(e), Some((_, runtime))) => {
                runtime.shutdown_background();
                Err(e)
            }
            (Err(e), None) => Err(e),
        }
    }

    /// The NATS server --blobs names, if any, connected on a runtime of its own (two
    /// threads), which the store's synchronous writes wait on.
    async fn connect_blobs(&self) -> anyhow::Result<Option<(tessera_nats::Nats, tokio::runtime::Runtime)>> {
        let Some(url) = self.blobs.clone() else { return Ok(None) };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hub-blobs")
            .enable_all()
            .build()
            .context("a runtime for the shared blobs")?;
        on_runtime(runtime, async move { tessera_nats::connect(&url).await.context("--blobs") }).await.map(Some)
    }

    /// Attaches the shared blob store, if any (connected by [`StoreArgs::connect_blobs`]),
    /// to an opened hub.
    async fn share(
        &self,
        store: HubStore,
        connected: Option<(tessera_nats::Nats, tokio::runtime::Runtime)>,
    ) -> anyhow::Result<HubStore> {
        let Some(connected) = connected else { return Ok(store) };
        let buckets = match store.shared_blob_buckets() {
            Ok(b) => b,
            Err(e) => {
                connected.1.shutdown_background();
                return Err(e.into());
            }
        };
        let (blobs, runtime) = self.open_buckets(connected, buckets).await?;
        let store = store.with_shared_blobs(blobs, runtime)?;
        Ok(match self.cache_size {
            Some(size) => store.with_cache_limit(size.0)?,
            None => store,
        })
    }

    /// The shared blob store --blobs names, if any, in `buckets`.
    async fn shared_blobs(
        &self,
        buckets: Option<(String, String)>,
    ) -> anyhow::Result<Option<(Arc<dyn tessera_ports::BlobStore>, tokio::runtime::Runtime)>> {
        let Some(buckets) = buckets else { return Ok(None) };
        match self.connect_blobs().await? {
            Some(connected) => Ok(Some(self.open_buckets(connected, buckets).await?)),
            None => Ok(None),
        }
    }

    /// The hub's `buckets` on a connected NATS server (its runtime shut down on failure).
    async fn open_buckets(
        &self,
        (nats, runtime): (tessera_nats::Nats, tokio::runtime::Runtime),
        (bucket, small): (String, String),
    ) -> anyhow::Result<(Arc<dyn tessera_ports::BlobStore>, tokio::runtime::Runtime)> {
        let url = self.blobs.clone().unwrap_or_default();
        let (blobs, runtime) = on_runtime(runtime, async move {
            tessera_nats::NatsBlobs::open_buckets(&nats, &bucket, &small)
                .await
                .with_context(|| format!("--blobs {url}: the hub's buckets {bucket} and {small}"))
        })
        .await?;
        Ok((Arc::new(blobs), runtime))
    }
}

/// Runs `work` on `runtime` (the shared blobs' own), handing the runtime back with the
/// result, or shutting it down in the background when `work` fails: a runtime dropped
/// inside the caller's would panic.
async fn on_runtime<T: Send + 'static>(
    runtime: tokio::runtime::Runtime,
    work: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<(T, tokio::runtime::Runtime)> {
    match runtime.spawn(work).await {
        Ok(Ok(value)) => Ok((value, runtime)),
        Ok(Err(e)) => {
            runtime.shutdown_background();
            Err(e)
        }
        Err(e) => {
            runtime.shutdown_background();
            Err(e.into())
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve a hub over HTTP: the REST API under /api/v1, the OpenAPI document at
    /// /openapi.json, an interactive docs page at /docs, the dashboard at /ui and Prometheus
    /// metrics at /metrics (no internet needed).
    Serve {
        #[command(flatten)]
        store: StoreArgs,
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
        /// Show this NATS cluster's nodes, runs and actors on the dashboard (/ui). Without
        /// it the dashboard shows the hub's modules and models only.
        #[arg(long, value_name = "URL")]
        nats: Option<String>,
        /// With --nats: the cluster's node announcement time-to-live, in seconds (as its
        /// nodes were given it: the membership is kept per value).
        #[arg(long, env = "TESSERA_MEMBER_TTL", default_value = "15", value_parser = tessera_core::time::parse_seconds)]
        member_ttl: std::time::Duration,
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
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Write the hub's whole state (records, blobs verified by digest, its key) to FILE,
    /// which must not exist. The hub may be running: the records are read in one
    /// transaction. FILE holds the hub's secret key: it is written 0600.
    Dump {
        /// The dump file to write.
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Restore a dump into a data directory that holds no hub yet (every blob checked
    /// against its digest; nothing is written when anything is refused).
    Restore {
        /// The dump file to read.
        file: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// `--database`: a PostgreSQL connection string, or SQLite in the data directory.
fn parse_database(url: Option<&str>) -> anyhow::Result<Database> {
    match url.map(str::trim) {
        None | Some("") | Some("sqlite") => Ok(Database::Sqlite),
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            Ok(Database::Postgres(u.to_owned()))
        }
        // The value may hold a password: only its scheme is repeated.
        Some(u) => anyhow::bail!(
            "--database: expected a PostgreSQL URL (postgres://user@host:port/db) or `sqlite`, got {}",
            u.split_once("://")
                .map_or("a value without a scheme".to_owned(), |(scheme, _)| format!("scheme {scheme:?}"))
        ),
    }
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Dump { file, store } => {
            let data = store.data();
            anyhow::ensure!(
                store.database()? != Database::Sqlite || data.join("hub.sqlite").exists(),
                "no hub at {}",
                data.display()
            );
            let store = store.open(Some(false)).await?;
            let s = tokio::task::spawn_blocking(move || store.dump(&file).map(|s| (s, file))).await??;
            print_summary("dumped", &s.0);
            println!("{}", s.1.display());
            Ok(())
        }
        Command::Restore { file, store: args } => {
            let data = args.data();
            let database = args.database()?;
            let d2 = data.clone();
            // With shared blobs, the restored blobs go there before the records are committed,
            // in the buckets the database records if it does (a restore refused before).
            let buckets = match args.blobs {
                Some(_) => Some(HubStore::restore_blob_buckets(&database)?),
                None => None,
            };
            let shared = args.shared_blobs(buckets.clone()).await?;
            let (_, s) = tokio::task::spawn_blocking(move || {
                let put = |path: &std::path::Path, digest: &tessera_core::Digest| {
                    let (blobs, runtime) = shared.as_ref().expect("only called with shared blobs");
                    // Off this runtime's threads: the shared store's runtime drives the put.
                    std::thread::scope(|s| {
                        s.spawn(|| runtime.block_on(blobs.put_file(path, digest)))
                            .join()
                            .unwrap_or_else(|p| std::panic::resume_unwind(p))
                    })
                    .map_err(tessera_hub::HubError::from)
                };
                let share = match (&shared, buckets) {
                    (Some(_), Some(buckets)) => Some(tessera_hub::SharedRestore { buckets, put: &put }),
                    _ => None,
                };
                let restored = HubStore::restore_with(&d2, &database, &file, share.as_ref());
                if let Some((_, runtime)) = shared {
                    runtime.shutdown_background();
                }
                restored
            })
            .await??;
            print_summary("restored", &s);
            println!("{}", data.display());
            Ok(())
        }
        Command::Owners { namespace, owners, store } => {
            let store = store.open(None).await?;
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
        Command::Serve { store, listen, open, window, max_uploads, max_model, nats, member_ttl } => {
            let data = store.data();
            let store = Arc::new(store.open(Some(true)).await?);
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
            let cluster = match nats {
                Some(url) => {
                    anyhow::ensure!(member_ttl.as_secs() >= 1, "--member-ttl must be at least 1 second");
                    let options = tessera_nats::NatsOptions { member_ttl, ..tessera_nats::NatsOptions::default() };
                    let backend = tessera_nats::backend(&url, &options).await.context("--nats")?;
                    Some(dashboard_cluster(backend, store.clone()))
                }
                None => None,
            };
            eprintln!("dashboard: http://{addr}/ui  metrics: http://{addr}/metrics");
            axum::serve(listener, app(AppState::new(store, policy)).merge(tessera_dashboard::router(cluster)))
                .with_graceful_shutdown(crate::shutdown_signal())
                .await?;
            Ok(())
        }
    }
}

/// The dashboard's view of a cluster: its nodes and actors, and its runs read through a
/// coordinator that sends nothing.
pub fn dashboard_cluster(backend: tessera_ports::Backend, hub: Arc<HubStore>) -> tessera_dashboard::Cluster {
    let reader = tessera_coordinator::Coordinator::new(backend.clone(), Arc::new(tessera_hub::LocalHub(hub)), None);
    tessera_dashboard::Cluster::new(backend, reader)
}

fn print_summary(what: &str, s: &tessera_hub::DumpSummary) {
    let rows: Vec<String> = s.rows.iter().filter(|(_, n)| **n > 0).map(|(t, n)| format!("{n} {t}")).collect();
    eprintln!(
        "{what} {} blob(s) ({} bytes, each checked against its digest); rows: {}",
        s.blobs,
        s.blob_bytes,
        rows.join(", ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_are_sqlite_or_postgres_and_errors_keep_passwords_out() {
        assert_eq!(parse_database(None).unwrap(), Database::Sqlite);
        assert_eq!(parse_database(Some("  ")).unwrap(), Database::Sqlite);
        assert_eq!(parse_database(Some("sqlite")).unwrap(), Database::Sqlite);
        assert_eq!(
            parse_database(Some("postgresql://u@h:5432/hub")).unwrap(),
            Database::Postgres("postgresql://u@h:5432/hub".into())
        );
        let e = parse_database(Some("mysql://user:s3cret@h/db")).unwrap_err().to_string();
        assert!(e.contains("\"mysql\"") && !e.contains("s3cret"), "{e}");
        let e = parse_database(Some("host=h password=s3cret")).unwrap_err().to_string();
        assert!(e.contains("without a scheme") && !e.contains("s3cret"), "{e}");
    }
}
