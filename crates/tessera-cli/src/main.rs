//! `tessera`: one binary for the whole platform. It parses arguments, picks the embedded
//! or remote parts, and reports errors; the work lives in the library crates.

mod dataset;
mod hub;
mod model;
mod module;
mod quickstart;
mod scaffold;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Tessera: reusable machine-learning modules, run next to their data.
///
/// Package a model, a data transformation or a training step as a module, publish it to a
/// hub, run it on nodes that hold the data, and orchestrate federated sessions.
///
/// Start with `tessera quickstart`: a federated session on the digits data set, everything
/// embedded in this process.
#[derive(Parser)]
#[command(name = "tessera", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    /// More logging (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a federated learning session end to end, all in this process.
    ///
    /// Starts a hub, a coordinator and four nodes, gives each node its own shard of the
    /// digits data set (the coordinator keeps a held-out test split), packages and publishes
    /// the WebAssembly worker, trains softmax regression for 20 rounds, and publishes the
    /// final model to the hub with its lineage.
    Quickstart(quickstart::Args),
    /// Serve a hub (REST API, OpenAPI document, docs page).
    #[command(subcommand)]
    Hub(hub::Command),
    /// Create, build, pack, publish, pull, list, show and run modules.
    #[command(subcommand)]
    Module(module::Command),
    /// Push, pull, list and show models in a hub.
    #[command(subcommand)]
    Model(model::Command),
    /// Prepare data sets for nodes.
    #[command(subcommand)]
    Dataset(dataset::Command),
    /// Show what this machine offers as a node (CPU, memory, GPUs, disk, runtimes).
    NodeInfo {
        /// Directory whose disk is measured.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

fn init_logging(verbose: u8, default: &str) {
    let level = match verbose {
        0 => default,
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Hub(_) => "info",
        _ => "warn",
    };
    init_logging(cli.verbose, default_level);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Quickstart(args) => quickstart::run(args).await,
            Command::Hub(c) => hub::run(c).await,
            Command::Module(c) => module::run(c).await,
            Command::Model(c) => model::run(c).await,
            Command::Dataset(c) => dataset::run(c),
            Command::NodeInfo { dir } => node_info(&dir),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn node_info(dir: &std::path::Path) -> anyhow::Result<()> {
    let r = tessera_node::resources::detect(dir);
    println!("cpu:      {} cores", r.cpu);
    println!("memory:   {}", r.memory);
    println!("gpu:      {}", r.gpu);
    println!("disk:     {} free at {}", r.disk, dir.display());
    println!("runtimes: wasm, builtin");
    Ok(())
}

/// The hub address from `--hub` or `TESSERA_HUB`.
#[derive(clap::Args, Clone)]
struct HubArg {
    /// The hub's address.
    #[arg(long, env = "TESSERA_HUB", default_value = tessera_client::DEFAULT_HUB)]
    hub: String,
}

impl HubArg {
    fn client(&self) -> anyhow::Result<tessera_client::HubClient> {
        Ok(tessera_client::HubClient::new(&self.hub)?)
    }
}

/// Tessera's home directory: `TESSERA_HOME`, else `~/.tessera`.
fn tessera_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TESSERA_HOME") {
        return PathBuf::from(h);
    }
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".tessera")
}
