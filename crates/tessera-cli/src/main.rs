//! `tessera`: one binary for the whole platform. It parses arguments, picks the embedded
//! or remote parts, and reports errors; the work lives in the library crates.

mod actors;
mod dataset;
mod flow;
mod hub;
mod key;
mod model;
mod module;
mod node;
mod output;
mod progress;
mod quickstart;
mod runs;
mod scaffold;
mod swarm;

use std::path::PathBuf;

use anyhow::Context as _;
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
    /// Run a node agent on this machine: it registers on NATS, pulls packages from the hub
    /// and runs the tasks sent to it, next to its datasets.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Run swarms (federated sessions and swarms of your own tasks) across machines over
    /// NATS or in this process, and list, show, follow, stop and resume their runs.
    #[command(subcommand)]
    Swarm(swarm::Command),
    /// Check, draw and run dataflows (typed operations wired by definition).
    #[command(subcommand)]
    Flow(flow::Command),
    /// Make, list, show, export and import key pairs (your identity when you publish,
    /// call and grant).
    #[command(subcommand)]
    Key(key::Command),
    /// Show and change who owns a namespace (who may publish under a path prefix).
    #[command(subcommand)]
    Namespace(NamespaceCommand),
    /// Show what your key has used on a hub (signed requests, bytes moved), and on the
    /// nodes of a NATS cluster (tasks, compute seconds, bytes).
    Usage {
        /// Also read node usage from this NATS server.
        #[arg(long)]
        nats: Option<String>,
        #[command(flatten)]
        out: output::JsonArg,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Launch a module as a named, long-lived actor on a node (get-or-create: launching a
    /// name that runs gives the running actor).
    Launch(actors::LaunchArgs),
    /// List the actors of the cluster with what they reserve and how busy they are.
    Actors {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: actors::EndpointArg,
    },
    /// Stop an actor (its state is saved first when it has state hooks).
    Kill {
        /// The actor's name.
        name: String,
        #[command(flatten)]
        endpoint: actors::EndpointArg,
    },
    /// Call a function of an actor and print its result.
    Call(actors::CallArgs),
    /// Cancel a running call by the id it was given (`tessera call --id`).
    Cancel {
        /// The call's id.
        id: String,
        #[command(flatten)]
        endpoint: actors::EndpointArg,
    },
    /// Put, get and count messages of a node's queues (bounded: a full queue refuses puts).
    #[command(subcommand)]
    Queue(actors::QueueCommand),
    /// Run pipelines: modules wired through their queues (fan-in, broadcast, ensembles).
    #[command(subcommand)]
    Pipeline(actors::PipelineCommand),
    /// Show what this machine offers as a node (CPU, memory, GPUs, disk, runtimes).
    NodeInfo {
        /// Directory whose disk is measured.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[command(flatten)]
        out: output::JsonArg,
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
    // Colours only on a terminal: a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Hub(_) | Command::Node(_) => "info",
        _ => "warn",
    };
    init_logging(cli.verbose, default_level);
    // One recorder for the process: every server in it serves the same /metrics.
    tessera_ports::metrics::install();
    // A panic (a bug; servers answer it with 500) is one log line, not a backtrace per
    // request.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        tracing::error!("bug: {what}{at}");
    }));
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
            Command::Node(NodeCommand::Run(args)) => node::run(args).await,
            Command::Node(NodeCommand::Key { id }) => node::print_key(&id),
            Command::Node(NodeCommand::Doctor { policy, out }) => node::doctor(policy.as_deref(), out.json),
            Command::Node(NodeCommand::List { nats, out }) => node::list(&nats, out.json).await,
            Command::Swarm(c) => swarm::run(c).await,
            Command::Flow(c) => flow::run(c).await,
            Command::Key(c) => key::run(c),
            Command::Usage { nats, out, hub } => usage(nats, &hub, out.json).await,
            Command::Namespace(c) => namespace(c).await,
            Command::NodeInfo { dir, out } => node_info(&dir, out.json),
            Command::Launch(a) => actors::launch(a).await,
            Command::Actors { json, endpoint } => actors::list(endpoint, json).await,
            Command::Kill { name, endpoint } => actors::kill(name, endpoint).await,
            Command::Call(a) => actors::call(a).await,
            Command::Cancel { id, endpoint } => actors::cancel(id, endpoint).await,
            Command::Queue(c) => actors::queue(c).await,
            Command::Pipeline(c) => actors::pipeline(c).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each once: a cause whose text the message already holds (an
/// error that prints its source, and also returns it) is not repeated.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn node_info(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let r = tessera_node::resources::detect(dir);
    let sandbox = tessera_process::Sandbox::new(tessera_process::SandboxPolicy::default());
    let enforced: Vec<String> = sandbox.support().enforced().iter().map(ToString::to_string).collect();
    let info = serde_json::json!({
        "cpu": r.cpu,
        "memory": r.memory,
        "gpu": r.gpu,
        "disk": r.disk,
        "dir": dir.display().to_string(),
        "runtimes": ["wasm", "builtin", "python", "process"],
        "protections": enforced,
    });
    output::show(json, &info, |_| {
        println!("cpu:      {} cores", r.cpu);
        println!("memory:   {}", r.memory);
        println!("gpu:      {}", r.gpu);
        println!("disk:     {} free at {}", r.disk, dir.display());
        println!("runtimes: wasm, builtin, python ($TESSERA_PYTHON or python3), process");
        println!(
            "sandbox:  {} (`tessera node doctor` says more)",
            if enforced.is_empty() { "no protection available".to_owned() } else { enforced.join(", ") }
        );
        Ok(())
    })
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Serve tasks until interrupted (Ctrl-C or SIGTERM).
    Run(node::RunArgs),
    /// Print a node's key (made on first use): seal private packages for it, and address
    /// tasks to it.
    Key {
        /// The node's id.
        #[arg(long)]
        id: String,
    },
    /// Which sandbox protections this machine can enforce around module processes
    /// (Landlock, seccomp, cgroups), and whether they meet a policy's `sandbox.require`
    /// (fails when they do not).
    Doctor {
        /// The node's policy (default: the open policy, which requires filesystem and
        /// network protection).
        #[arg(long)]
        policy: Option<std::path::PathBuf>,
        #[command(flatten)]
        out: output::JsonArg,
    },
    /// List the nodes registered on NATS: their datasets, runtimes, resources, labels and
    /// sandbox protections.
    List {
        #[command(flatten)]
        nats: NatsArg,
        #[command(flatten)]
        out: output::JsonArg,
    },
}

/// The NATS server from `--nats` or `TESSERA_NATS`.
#[derive(clap::Args, Clone)]
struct NatsArg {
    /// The NATS server (with JetStream), or the servers of a NATS cluster, comma-separated
    /// (`nats://a:4222,nats://b:4222,nats://c:4222`).
    #[arg(long, env = "TESSERA_NATS", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Copies NATS keeps of every stream, bucket and object store Tessera creates (1 to 5;
    /// default: 1 on a single server, 3 on a cluster of three or more). Streams that exist
    /// keep the count they were created with.
    #[arg(long, env = "TESSERA_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    replicas: Option<u8>,
    /// How long a node's announcement lasts without a heartbeat, in seconds. Every process
    /// on one NATS must use the same value.
    #[arg(long, env = "TESSERA_MEMBER_TTL", default_value = "15", value_parser = tessera_core::time::parse_seconds)]
    member_ttl: std::time::Duration,
    /// How long a task may run without a progress signal before it is delivered again, in
    /// seconds.
    #[arg(long, env = "TESSERA_ACK_WAIT", default_value = "30", value_parser = tessera_core::time::parse_seconds)]
    ack_wait: std::time::Duration,
}

impl NatsArg {
    async fn backend(&self) -> anyhow::Result<tessera_ports::Backend> {
        let second = std::time::Duration::from_secs(1);
        anyhow::ensure!(self.member_ttl >= second, "--member-ttl must be at least 1 second");
        anyhow::ensure!(self.ack_wait >= second, "--ack-wait must be at least 1 second");
        let options = tessera_nats::NatsOptions {
            member_ttl: self.member_ttl,
            ack_wait: self.ack_wait,
            replicas: self.replicas.map(usize::from),
            ..tessera_nats::NatsOptions::default()
        };
        tessera_nats::backend(&self.nats, &options).await.context("--nats / TESSERA_NATS")
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Search filters and a page, for listings.
#[derive(clap::Args, Clone, Default)]
struct SearchArgs {
    /// Only under this license (SPDX id, e.g. apache-2.0; manifest, metadata or card).
    #[arg(long)]
    license: Option<String>,
    /// Only for this library (numpy, torch: a package's needs.libraries, a model's
    /// `library` metadata, or a card's library_name).
    #[arg(long)]
    library: Option<String>,
    /// Only signed by this key.
    #[arg(long, value_name = "KEY")]
    signer: Option<String>,
    /// Records to skip.
    #[arg(long)]
    offset: Option<u64>,
    /// Records to show (at most 1,000).
    #[arg(long)]
    limit: Option<u64>,
}

/// The hub address from `--hub` or `TESSERA_HUB`, and the key that signs.
#[derive(clap::Args, Clone)]
struct HubArg {
    /// The hub's address.
    #[arg(long, env = "TESSERA_HUB", default_value = tessera_client::DEFAULT_HUB)]
    hub: String,
    /// The key that signs requests (`tessera key list`); `default` is made on first use.
    #[arg(long, env = "TESSERA_KEY", default_value = "default")]
    key: String,
    /// The hub's own key (its health page says it): requests are signed for this key only.
    /// Without it, the key a hub answers with the first time is remembered
    /// ($TESSERA_HOME/known-hubs.json) and a change is refused.
    #[arg(long, env = "TESSERA_HUB_KEY", value_name = "KEY")]
    hub_key: Option<String>,
}

impl HubArg {
    /// A client for reading.
    fn client(&self) -> anyhow::Result<tessera_client::HubClient> {
        Ok(tessera_client::HubClient::new(&self.hub)?)
    }
    /// A client that signs its requests with the user's key.
    fn signed_client(&self) -> anyhow::Result<tessera_client::HubClient> {
        let client = self.client()?.with_signer(key::load(&self.key)?);
        Ok(match &self.hub_key {
            Some(k) => client.with_hub_key(k.parse().map_err(|e| anyhow::anyhow!("--hub-key: {e}"))?),
            None => client.with_known_hubs(tessera_home().join("known-hubs.json")),
        })
    }
}

#[derive(Subcommand)]
enum NamespaceCommand {
    /// Show a namespace's owners.
    Show {
        /// The namespace (the first segment of module paths, e.g. `fl`).
        namespace: String,
        #[command(flatten)]
        out: output::JsonArg,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Let another key publish in a namespace you own.
    AddOwner {
        /// The namespace.
        namespace: String,
        /// The key to add (ed25519:… or secp256k1:…).
        owner: String,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Take a key's right to publish away (the last owner stays).
    RemoveOwner {
        /// The namespace.
        namespace: String,
        /// The key to remove.
        owner: String,
        #[command(flatten)]
        hub: HubArg,
    },
}

async fn namespace(cmd: NamespaceCommand) -> anyhow::Result<()> {
    let (owners, hub_url) = match cmd {
        NamespaceCommand::Show { namespace, out, hub } => {
            let owners = hub.client()?.namespace(&namespace).await?;
            if out.json {
                let owners: Vec<String> = owners.iter().map(ToString::to_string).collect();
                return output::print_json(&serde_json::json!({ "namespace": namespace, "owners": owners }));
            }
            (owners, hub.hub)
        }
        NamespaceCommand::AddOwner { namespace, owner, hub } => {
            let key: tessera_identity::PublicKey = owner.parse()?;
            (hub.signed_client()?.set_owner(&namespace, &key, false).await?, hub.hub)
        }
        NamespaceCommand::RemoveOwner { namespace, owner, hub } => {
            let key: tessera_identity::PublicKey = owner.parse()?;
            (hub.signed_client()?.set_owner(&namespace, &key, true).await?, hub.hub)
        }
    };
    if owners.is_empty() {
        eprintln!("unclaimed on {hub_url}: the first signed publish claims it");
    }
    for o in owners {
        println!("{o}");
    }
    Ok(())
}

async fn usage(nats: Option<String>, hub: &HubArg, json: bool) -> anyhow::Result<()> {
    let client = hub.signed_client()?;
    let me = client.signer().map(|k| k.public().to_string()).unwrap_or_default();
    let u = client.usage().await?;
    let mut nodes = Vec::new();
    if let Some(url) = nats {
        let backend = tessera_nats::backend(&url, &tessera_nats::NatsOptions::default()).await.context("--nats")?;
        for key in backend.world.keys("usage/").await? {
            if let Some(e) = backend.world.get(&key).await? {
                let v: serde_json::Value = serde_json::from_slice(&e.value)?;
                if v["account"] == me.as_str() {
                    let u = &v["usage"];
                    nodes.push(serde_json::json!({
                        "node": v["node"],
                        "tasks": u["tasks"],
                        "compute_seconds": u["compute_seconds"],
                        "bytes": u["bytes"],
                    }));
                }
            }
        }
    }
    let all = serde_json::json!({
        "account": me,
        "hub": {
            "url": hub.hub,
            "requests": u["requests"],
            "bytes_in": u["bytes_in"],
            "bytes_out": u["bytes_out"],
        },
        "nodes": nodes,
    });
    output::show(json, &all, |_| {
        println!(
            "hub {}: {} signed requests, {} bytes in, {} bytes out",
            hub.hub, u["requests"], u["bytes_in"], u["bytes_out"]
        );
        for n in &nodes {
            println!(
                "node {}: {} tasks, {:.2} s of compute, {} bytes",
                n["node"].as_str().unwrap_or("?"),
                n["tasks"],
                n["compute_seconds"].as_f64().unwrap_or(0.0),
                n["bytes"]
            );
        }
        Ok(())
    })
}

/// Parses repeated `--<what> NAME=FILE` values.
fn name_file_pairs(items: &[String], what: &str) -> anyhow::Result<Vec<(String, PathBuf)>> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(n, p)| (n.to_owned(), PathBuf::from(p)))
                .ok_or_else(|| anyhow::anyhow!("--{what} {s:?}: expected NAME=FILE"))
        })
        .collect()
}

/// Tessera's home directory: `TESSERA_HOME`, else `~/.tessera`.
fn tessera_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TESSERA_HOME") {
        return PathBuf::from(h);
    }
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".tessera")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// Commands named so list or show something: each takes `--json` and has its fields
    /// documented in docs/json.md.
    const READING: [&str; 13] = [
        "list",
        "show",
        "status",
        "grants",
        "card",
        "lineage",
        "tensors",
        "logs",
        "doctor",
        "node-info",
        "actors",
        "len",
        "usage",
    ];

    fn leaves(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        if cmd.get_subcommands().next().is_none() {
            out.push((path.clone(), cmd.clone()));
        }
        for sub in cmd.get_subcommands() {
            leaves(sub, format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_listing_and_show_command_has_documented_json() {
        let docs = include_str!("../../../docs/json.md");
        let mut all = Vec::new();
        leaves(&super::Cli::command(), "tessera".into(), &mut all);
        let mut reading = Vec::new();
        for (path, cmd) in &all {
            if READING.contains(&cmd.get_name()) {
                assert!(cmd.get_arguments().any(|a| a.get_id() == "json"), "`{path}` lists or shows but has no --json");
                assert!(docs.contains(&format!("## `{path}`\n")), "`{path}` --json is not documented in docs/json.md");
                reading.push(path.clone());
            }
        }
        assert!(reading.len() >= 20, "only {} reading commands found: {reading:?}", reading.len());
        for line in docs.lines() {
            if let Some(path) = line.strip_prefix("## `").and_then(|l| l.strip_suffix('`')) {
                assert!(
                    reading.iter().any(|r| r == path),
                    "docs/json.md documents `{path}`, which is not a reading command"
                );
            }
        }
    }
}
