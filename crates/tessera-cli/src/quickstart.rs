//! `tessera quickstart`: a federated session on the digits data set, all in this process.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde_json::json;
use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{SessionConfig, new_session_id};
use tessera_wasm::WasmLimits;

use crate::progress::Progress;

#[derive(clap::Args)]
pub struct Args {
    /// Where the hub and the nodes keep their files (default: a new folder under the
    /// system's temporary directory, kept afterwards).
    #[arg(long)]
    home: Option<PathBuf>,
    /// Rounds to run.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Participant nodes.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Fraction of nodes asked each round.
    #[arg(long, default_value_t = 1.0, value_parser = tessera_core::config::parse_finite)]
    ratio: f64,
    /// Learning rate (default: the worker's).
    #[arg(long, value_parser = tessera_core::config::parse_finite)]
    lr: Option<f64>,
    /// Seed for the data split, participant selection and shuffling.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Aggregation strategy: a name (fedavg, fedavgm, fedprox, fedadagrad, fedadam,
    /// fedyogi, fedmedian, fedtrimmedavg, krum, bulyan) or JSON with `name` and parameters,
    /// e.g. '{"name": "fedadam", "eta": 0.05}'.
    #[arg(long, default_value = "fedavg")]
    strategy: String,
    /// Simulate this many participants on each node (each trains on its share of the
    /// node's shard): `--nodes 4 --clients-per-node 250` runs 1,000 participants a round.
    #[arg(long)]
    clients_per_node: Option<usize>,
    /// Serve the dashboard (and the hub's API, read-only without signatures, and /metrics)
    /// on --listen while the session runs, and keep serving after it until Ctrl-C.
    #[arg(long)]
    ui: bool,
    /// Where --ui listens.
    #[arg(long, default_value = "127.0.0.1:7700", requires = "ui")]
    listen: std::net::SocketAddr,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!((1..=64).contains(&args.nodes), "--nodes must be between 1 and 64");
    anyhow::ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let started = Instant::now();
    let session = new_session_id();
    let home = match args.home {
        Some(h) => h,
        None => std::env::temp_dir().join(format!("tessera-quickstart-{session}")),
    };
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    println!(
        "Tessera quickstart: a hub, a coordinator and {} in this process.",
        crate::progress::count(args.nodes as u64, "node")
    );
    if args.ui {
        println!("(Embedded mode: requests are not signed; the dashboard listens on {}.)", args.listen);
    } else {
        println!("(Embedded mode: requests are not signed and nothing listens on the network.)");
    }
    println!("home: {}", home.display());

    let data =
        digits::prepare(&home.join("data"), args.nodes, 0.2, args.seed).context("preparing the digits data set")?;
    println!(
        "data: digits, {} training rows in {} node shards; {} rows held out at the coordinator",
        data.train_rows,
        data.shards.len(),
        data.test_rows
    );
    let cluster = Cluster::start(ClusterConfig::digits(&home, &data, WasmLimits::default())).await?;

    let module_dir = home.join("modules").join("fl.softmax.worker");
    if !module_dir.exists() {
        tessera_modules::write_softmax_worker(&module_dir)?;
    }
    let worker = cluster.publish_dir(&module_dir).context("publishing the worker")?;
    println!("hub: published {}@{} {}", worker.name, worker.version, worker.digest);

    let mut cfg = SessionConfig::new(format!("{}@{}", worker.name, worker.version));
    cfg.rounds = args.rounds;
    cfg.participant_ratio = args.ratio;
    cfg.min_participants = 1;
    cfg.eval_dataset = Some("digits-test".into());
    cfg.seed = args.seed;
    cfg.clients_per_node = args.clients_per_node;
    cfg.round_timeout_secs = 600.0;
    cfg.strategy = if args.strategy.trim_start().starts_with('{') {
        serde_json::from_str(&args.strategy).context("--strategy: not a strategy mapping")?
    } else {
        tessera_coordinator::StrategySpec::named(&args.strategy)
    };
    if let Some(lr) = args.lr {
        cfg.config = json!({ "lr": lr });
    }
    let ui = if args.ui {
        match serve_ui(&cluster, args.listen).await {
            Ok(url) => Some(url),
            Err(e) => {
                cluster.stop().await;
                return Err(e);
            }
        }
    } else {
        None
    };
    let progress = Progress::new(args.rounds);
    let session_started = Instant::now();
    let result = cluster.coordinator().run(&session, &cfg, &progress).await;
    progress.finish();
    let apart = progress.apart();
    let result = match (result, &ui) {
        (Ok(r), _) => r,
        (Err(e), None) => return Err(e.into()),
        // The run failed: its rounds and failures stay on the dashboard until Ctrl-C.
        (Err(e), Some(url)) => {
            eprintln!("error: the session failed: {e}");
            println!("dashboard: {url}/ui#/runs/{session} (Ctrl-C to stop)");
            crate::shutdown_signal().await;
            cluster.stop().await;
            return Err(e.into());
        }
    };
    let session_secs = session_started.elapsed().as_secs_f64();

    let final_metrics = result.final_metrics.clone().context("the session evaluated nothing")?;
    let accuracy = final_metrics.accuracy.unwrap_or(0.0);
    let name = "digits.softmax";
    let hub = cluster.hub.clone();
    let metadata = json!({
        "library": "tessera",
        "format": "safetensors",
        "task": "digits classification (softmax regression)",
        "features": digits::FEATURES,
        "classes": digits::CLASSES,
        "test_accuracy": accuracy,
        "test_loss": final_metrics.loss,
        "test_rows": data.test_rows,
    });
    let model = hub.publish_model(name, &result.model, metadata, Some(result.lineage.clone()), None)?;
    let version = model.version.clone();
    // With --ui the nodes keep serving (and announcing themselves) until Ctrl-C.
    let cluster = match ui {
        None => {
            cluster.stop().await;
            None
        }
        Some(_) => Some(cluster),
    };

    println!();
    println!("final test accuracy: {accuracy:.4} on {} held-out rows", data.test_rows);
    println!("model: {name}@{version} {}", model.digest.map(|d| d.to_string()).unwrap_or_default());
    println!(
        "lineage: session {}, {} rounds of {}, nodes {}, worker {}",
        result.lineage.session,
        result.lineage.rounds,
        result.lineage.strategy,
        result.lineage.nodes.join(", "),
        worker.digest
    );
    if let Some(line) = crate::progress::round_summary_line(&result.reports, apart) {
        println!("{line}");
    }
    println!("time: session {session_secs:.2}s, total {:.2}s", started.elapsed().as_secs_f64());
    if let Some(peak) = peak_memory() {
        println!("peak memory: {:.1} MiB", peak as f64 / 1024.0);
    }
    match ui {
        None => println!("browse: tessera hub serve --data {}", home.join("hub").display()),
        Some(url) => {
            println!("dashboard: {url}/ui#/models/{name}/{version} (Ctrl-C to stop)");
            crate::shutdown_signal().await;
            if let Some(c) = cluster {
                c.stop().await;
            }
        }
    }
    Ok(())
}

/// Serves the hub's API (writes need signatures), the dashboard and /metrics of this
/// process on `addr`; gives the URL.
async fn serve_ui(cluster: &Cluster, addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--listen {addr}"))?;
    let url = format!("http://{}", listener.local_addr()?);
    let state = tessera_hub::AppState::new(cluster.hub.clone(), tessera_hub::HubPolicy::signed());
    let dashboard = crate::hub::dashboard_cluster(cluster.backend.clone(), cluster.hub.clone());
    let app = tessera_hub::app(state).merge(tessera_dashboard::router(Some(dashboard)));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the dashboard stopped serving: {e}");
        }
    });
    println!("dashboard: {url}/ui (live while the session runs)");
    Ok(url)
}

/// This process's peak resident memory in KiB (Linux), if known.
fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
