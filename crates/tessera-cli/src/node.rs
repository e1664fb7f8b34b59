//! `tessera node run`: a node agent on this machine, serving tasks from NATS.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tessera_identity::KeyPair;
use tessera_node::{BuiltinRuntime, Node, NodeConfig, NodePolicy, NodePorts};
use tessera_ports::Runtime;
use tessera_wasm::{WasmLimits, WasmRuntime};

use crate::{HubArg, NatsArg};

#[derive(clap::Args)]
pub struct RunArgs {
    /// This node's id (letters, digits, '_' and '-'); default: the host name.
    #[arg(long)]
    id: Option<String>,
    /// A dataset this node holds, `name=FILE` (repeatable). Its contents never leave the
    /// node: tasks read it through the task context.
    #[arg(long = "dataset", value_name = "NAME=FILE")]
    dataset: Vec<String>,
    /// A label swarm tasks select nodes by, `key=value` (repeatable), e.g. `region=eu`.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    label: Vec<String>,
    /// Dataflow operations this node runs, by their names in flow files (comma-separated or
    /// repeated), e.g. `--ops parse,add`.
    #[arg(long = "ops", value_name = "OPERATION", value_delimiter = ',')]
    ops: Vec<String>,
    /// Where packages are cached (default: $TESSERA_HOME/nodes/<id>/cache).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Time limit of one WebAssembly run, in seconds.
    #[arg(long, default_value = "300", value_parser = tessera_core::time::parse_seconds)]
    wasm_timeout: Duration,
    /// Memory limit of one WebAssembly run.
    #[arg(long, default_value = "1GiB")]
    wasm_memory: tessera_core::ByteSize,
    /// Largest output of one run (all outputs together), on every runtime; larger ones
    /// end the run with the `limit` error.
    #[arg(long, default_value = "256MiB")]
    max_output: tessera_core::ByteSize,
    /// The node's policy (YAML): trusted publishers, grants (who may compute on which
    /// datasets with which modules), quotas. See the README.
    #[arg(long, conflicts_with = "open")]
    policy: Option<PathBuf>,
    /// Run any package for anyone, signed or not (a node on a trusted network only).
    #[arg(long)]
    open: bool,
    /// Start even when this machine cannot enforce a sandbox protection the policy
    /// requires (`tessera node doctor` says which); the node announces itself degraded.
    #[arg(long)]
    degraded: bool,
    /// Do not start a Python or process module's next instance ahead of its next start
    /// (by default one is kept ready, for up to 60 s, after each start).
    #[arg(long)]
    no_prestart: bool,
    /// Most tasks run at once (default: this machine's cores). Tasks whose modules declare
    /// `needs` (cpu, memory, gpu) also wait for those to be free.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    max_tasks: Option<u16>,
    /// Serve the node's gateway (actors, calls, queues) on this address, e.g. 127.0.0.1:7710.
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// The gateway address other nodes and clients use (default: http://<--listen>).
    #[arg(long, value_name = "URL", requires = "listen")]
    advertise: Option<String>,
    /// Run on one machine without NATS: queues, world state and blobs in this process
    /// (--nats and TESSERA_NATS are then not used).
    #[arg(long)]
    embedded: bool,
    /// A call to an actor that is not running does not launch it.
    #[arg(long)]
    no_spawn: bool,
    /// The bound of each queue behind the gateway, in messages.
    #[arg(long, default_value_t = 1024)]
    queue_capacity: u64,
    /// The bound of each queue behind the gateway, in bytes of messages.
    #[arg(long, default_value = "64MiB")]
    queue_max_bytes: tessera_core::ByteSize,
    /// CPU cores actors may reserve (default: detected).
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory actors may reserve (default: detected).
    #[arg(long)]
    memory: Option<tessera_core::ByteSize>,
    /// GPUs actors may reserve (default: detected).
    #[arg(long)]
    gpu: Option<u32>,
    /// Disk actors may reserve (default: detected).
    #[arg(long)]
    disk: Option<tessera_core::ByteSize>,
    #[command(flatten)]
    nats: NatsArg,
    #[command(flatten)]
    hub: HubArg,
}

fn host_id() -> String {
    let raw = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "node".into());
    let id: String =
        raw.trim().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).take(64).collect();
    if id.is_empty() { "node".into() } else { id }
}

/// A node's own key (`$TESSERA_HOME/nodes/<id>/keys/node.json`), made on first use: the
/// audience of tasks signed for it, and the key private packages are sealed for.
pub fn node_identity(id: &str) -> anyhow::Result<Arc<KeyPair>> {
    tessera_core::name::check_ident("node id", id)?;
    let keys = tessera_identity::keystore::Keystore::open(crate::tessera_home().join("nodes").join(id).join("keys"))?;
    if matches!(keys.info("node"), Err(tessera_identity::keystore::KeystoreError::NotFound(_))) {
        keys.create("node", tessera_identity::KeyType::Ed25519, None)?;
    }
    Ok(Arc::new(keys.load("node", None)?))
}

/// `tessera node key`.
pub fn print_key(id: &str) -> anyhow::Result<()> {
    println!("{}", node_identity(id)?.public());
    Ok(())
}

/// Parses `--label key=value` values.
pub fn labels(items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in items {
        let (k, v) = item.split_once('=').ok_or_else(|| anyhow::anyhow!("--label {item:?}: expected KEY=VALUE"))?;
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            anyhow::bail!("--label {k} is given twice");
        }
    }
    Ok(out)
}

/// Parses `--dataset name=FILE` values.
pub fn datasets(items: &[String]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    Ok(crate::name_file_pairs(items, "dataset")?.into_iter().collect())
}

/// How [`build_node`] treats the machine and module processes.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeOptions {
    /// Start even without a protection the policy requires.
    pub degraded: bool,
    /// Keep a Python or process module's next instance started ahead, this long.
    pub prestart: Option<Duration>,
}

/// How long a prestarted module instance is kept for its module's next start.
pub const PRESTART_IDLE: Duration = Duration::from_secs(60);

/// A node over the given ports with every runtime: WebAssembly, builtin, Python (with
/// `$TESSERA_PYTHON`, else `python3`) and process, the last two contained by the sandbox
/// its policy asks for. Refuses to build a node whose policy requires a protection this
/// machine cannot enforce, unless `options.degraded` (then it warns, and announces itself
/// so).
pub fn build_node(
    mut cfg: NodeConfig,
    ports: NodePorts,
    limits: WasmLimits,
    options: NodeOptions,
) -> anyhow::Result<Node> {
    let degraded = options.degraded;
    let defaults = tessera_process::ProcessLimits::default();
    let process_limits = tessera_process::ProcessLimits {
        max_time: limits.max_time,
        max_output_bytes: limits.max_output_bytes,
        // A frame carries an output: one as large as the output limit is accepted.
        max_message_bytes: defaults.max_message_bytes.max(limits.max_output_bytes),
        ..defaults
    };
    // Never opened to a module: the node's home (its keys), its cache (other packages),
    // its dataset files (read through the node, which checks grants).
    let protected = [crate::tessera_home(), cfg.cache_dir.clone()].into_iter().chain(cfg.datasets.values().cloned());
    let sandbox = Arc::new(tessera_process::Sandbox::new(cfg.policy.sandbox.clone()).with_protected(protected));
    if let Err(e) = sandbox.check() {
        if !degraded {
            anyhow::bail!("{e}; `tessera node doctor` shows what this machine offers, and --degraded starts anyway");
        }
        tracing::warn!("{e}: running degraded");
        cfg.degraded = true;
    }
    cfg.protections = sandbox.support().enforced().iter().map(ToString::to_string).collect();
    let mut python = tessera_process::ProcessRuntime::python_default(&cfg.cache_dir, process_limits.clone())?
        .with_sandbox(sandbox.clone());
    let mut process = tessera_process::ProcessRuntime::process(process_limits).with_sandbox(sandbox);
    if let Some(idle) = options.prestart {
        python = python.with_prestart(idle);
        process = process.with_prestart(idle);
    }
    // Runs' scratch and dataset folders beside the cache: datasets are mounted into
    // WebAssembly runs by hard links, so on the file system the node's files are on.
    let wasm_runs = cfg.cache_dir.join("wasm-runs");
    std::fs::create_dir_all(&wasm_runs).with_context(|| format!("making {}", wasm_runs.display()))?;
    let wasm = WasmRuntime::new(limits)?.with_scratch_root(wasm_runs);
    let runtimes: Vec<Arc<dyn Runtime>> =
        vec![Arc::new(wasm), Arc::new(BuiltinRuntime::new()), Arc::new(python), Arc::new(process)];
    Ok(Node::new(cfg, ports, runtimes)?)
}

/// Reads a node policy file, or the open policy.
fn read_policy(path: Option<&std::path::Path>) -> anyhow::Result<NodePolicy> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            NodePolicy::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        }
        None => Ok(NodePolicy::open()),
    }
}

/// `tessera node doctor`: what this machine can enforce around module processes, and
/// whether that meets the policy's `sandbox.require`. Fails when it does not.
pub fn doctor(policy: Option<&std::path::Path>, json: bool) -> anyhow::Result<()> {
    let policy = read_policy(policy)?;
    let sandbox = tessera_process::Sandbox::new(policy.sandbox.clone());
    let support = sandbox.support();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let checked = sandbox.check();
    if json {
        let mechanisms: serde_json::Map<String, serde_json::Value> =
            support.report().into_iter().map(|(m, state)| (m, state.into())).collect();
        let protections: Vec<serde_json::Value> = tessera_process::Protection::ALL
            .iter()
            .map(|p| {
                serde_json::json!({
                    "protection": p.to_string(),
                    "enforced": support.enforces(*p),
                    "required": policy.sandbox.require.contains(p),
                })
            })
            .collect();
        crate::output::print_json(&serde_json::json!({
            "kernel": kernel,
            "mechanisms": mechanisms,
            "protections": protections,
            "requirements_met": checked.is_ok(),
        }))?;
    } else {
        println!("kernel:     {kernel}");
        for (mechanism, state) in support.report() {
            println!("{:<11} {state}", format!("{mechanism}:"));
        }
        for p in tessera_process::Protection::ALL {
            let required = if policy.sandbox.require.contains(&p) { "required" } else { "optional" };
            let state = if support.enforces(p) { "enforced" } else { "NOT enforced" };
            println!("{:<11} {state} ({required})", format!("{p}:"));
        }
    }
    checked?;
    if !json {
        println!("the policy's sandbox requirements are met");
    }
    Ok(())
}

/// `tessera node list`: the nodes registered on NATS, by id.
pub async fn list(nats: &crate::NatsArg, json: bool) -> anyhow::Result<()> {
    let backend = nats.backend().await?;
    let mut nodes = tessera_node::list_nodes(backend.members.as_ref()).await?;
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    crate::output::show(json, &nodes, |nodes| {
        if nodes.is_empty() {
            eprintln!("no nodes registered on {}", nats.nats);
            return Ok(());
        }
        println!(
            "{:<20} {:>5} {:>10} {:>4} {:<24} {:<20} PROTECTIONS",
            "NODE", "CPU", "MEMORY", "GPU", "DATASETS", "RUNTIMES"
        );
        for n in nodes {
            let runtimes: Vec<&str> = n.runtimes.iter().map(|r| r.as_str()).collect();
            println!(
                "{:<20} {:>5} {:>10} {:>4} {:<24} {:<20} {}{}",
                n.id,
                n.resources.cpu,
                n.resources.memory.to_string(),
                n.resources.gpu,
                n.datasets.join(","),
                runtimes.join(","),
                if n.protections.is_empty() { "-".to_owned() } else { n.protections.join(",") },
                if n.degraded { " (degraded)" } else { "" }
            );
        }
        Ok(())
    })
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let policy = match (&args.policy, args.open) {
        (Some(p), _) => read_policy(Some(p))?,
        (None, true) => NodePolicy::open(),
        (None, false) => anyhow::bail!(
            "a node needs --policy FILE (who may publish what runs here, and who may compute on which data) or --open"
        ),
    };
    let id = args.id.unwrap_or_else(host_id);
    let identity = node_identity(&id)?;
    let cache = args.cache.unwrap_or_else(|| crate::tessera_home().join("nodes").join(&id).join("cache"));
    let backend = if args.embedded {
        tessera_ports::Backend::in_process(args.nats.member_ttl.max(Duration::from_secs(1)))
    } else {
        args.nats.backend().await?
    };
    let ports = NodePorts { backend, source: Arc::new(args.hub.client()?.with_signer(identity.clone())) };
    let limits =
        WasmLimits { max_memory: args.wasm_memory.0, max_time: args.wasm_timeout, max_output_bytes: args.max_output.0 };
    let listener = match args.listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?),
        None => None,
    };
    let endpoint = match (&listener, &args.advertise) {
        (_, Some(url)) => Some(url.trim_end_matches('/').to_owned()),
        (Some(l), None) => Some(format!("http://{}", l.local_addr()?)),
        (None, None) => None,
    };
    let mut cfg = NodeConfig::new(&id, cache);
    cfg.datasets = datasets(&args.dataset)?;
    cfg.labels = labels(&args.label)?;
    if let Some(n) = args.max_tasks {
        cfg.max_tasks = usize::from(n);
    }
    cfg.operations = args.ops.clone();
    cfg.policy = policy;
    cfg.identity = Some(identity.clone());
    cfg.endpoint = endpoint.clone();
    let options = NodeOptions { degraded: args.degraded, prestart: (!args.no_prestart).then_some(PRESTART_IDLE) };
    let node = Arc::new(build_node(cfg, ports, limits, options)?);
    let record = node.record();
    eprintln!(
        "node key: {}; {}",
        identity.public(),
        if args.open { "open: runs anything for anyone" } else { "policy enforced" }
    );
    eprintln!(
        "sandbox: {}{}",
        if record.protections.is_empty() { "none".to_owned() } else { record.protections.join(", ") },
        if record.degraded { " (DEGRADED: the policy requires more)" } else { "" }
    );
    eprintln!(
        "node {id}: datasets [{}], {} cores, {} memory; tasks from {} on {}; packages from {}",
        record.datasets.join(", "),
        record.resources.cpu,
        record.resources.memory,
        record.task_queue,
        if args.embedded { "this process (embedded)" } else { args.nats.nats.as_str() },
        args.hub.hub
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        let _ = tx.send(true);
    });
    if let (Some(listener), Some(endpoint)) = (listener, endpoint) {
        let detected = node.record().resources;
        let capacity = tessera_core::wire::Resources {
            cpu: args.cpu.unwrap_or(detected.cpu),
            memory: args.memory.unwrap_or(detected.memory),
            gpu: args.gpu.unwrap_or(detected.gpu),
            disk: args.disk.unwrap_or(detected.disk),
        };
        let actors = Arc::new(tessera_node::Actors::new(node.clone(), Some(capacity)));
        let config = tessera_gateway::GatewayConfig {
            spawn_on_call: !args.no_spawn,
            queue_capacity: args.queue_capacity,
            queue_max_bytes: args.queue_max_bytes.0,
            ..Default::default()
        };
        let app = tessera_gateway::app(tessera_gateway::Gateway::new(node.clone(), actors, config));
        let mut stop = rx.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::error!("gateway: {e}");
            }
        });
        eprintln!("gateway: {endpoint} (calls, actors, queues under /api/v1)");
    }
    node.serve(rx).await.context("serving")?;
    Ok(())
}
