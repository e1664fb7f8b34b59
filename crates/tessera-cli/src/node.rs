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
    /// Where packages are cached (default: $TESSERA_HOME/nodes/<id>/cache).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Time limit of one WebAssembly run, in seconds.
    #[arg(long, default_value_t = 300.0)]
    wasm_timeout: f64,
    /// Memory limit of one WebAssembly run.
    #[arg(long, default_value = "1GiB")]
    wasm_memory: tessera_core::ByteSize,
    /// The node's policy (YAML): trusted publishers, grants (who may compute on which
    /// datasets with which modules), quotas. See the README.
    #[arg(long, conflicts_with = "open")]
    policy: Option<PathBuf>,
    /// Run any package for anyone, signed or not (a node on a trusted network only).
    #[arg(long)]
    open: bool,
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

/// Parses `--dataset name=FILE` values.
pub fn datasets(items: &[String]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    Ok(crate::name_file_pairs(items, "dataset")?.into_iter().collect())
}

/// A node over the given ports with both runtimes.
pub fn build_node(
    id: &str,
    datasets: BTreeMap<String, PathBuf>,
    cache: PathBuf,
    ports: NodePorts,
    limits: WasmLimits,
    policy: NodePolicy,
    identity: Option<Arc<KeyPair>>,
) -> anyhow::Result<Node> {
    let mut cfg = NodeConfig::new(id, cache);
    cfg.datasets = datasets;
    cfg.policy = policy;
    cfg.identity = identity;
    let runtimes: Vec<Arc<dyn Runtime>> = vec![Arc::new(WasmRuntime::new(limits)?), Arc::new(BuiltinRuntime::new())];
    Ok(Node::new(cfg, ports, runtimes)?)
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.wasm_timeout.is_finite() && args.wasm_timeout > 0.0, "--wasm-timeout must be positive");
    let policy = match (&args.policy, args.open) {
        (Some(p), _) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            NodePolicy::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        (None, true) => NodePolicy::open(),
        (None, false) => anyhow::bail!(
            "a node needs --policy FILE (who may publish what runs here, and who may compute on which data) or --open"
        ),
    };
    let id = args.id.unwrap_or_else(host_id);
    let identity = node_identity(&id)?;
    let cache = args.cache.unwrap_or_else(|| crate::tessera_home().join("nodes").join(&id).join("cache"));
    let backend = args.nats.backend().await?;
    let ports = NodePorts { backend, source: Arc::new(args.hub.client()?.with_signer(identity.clone())) };
    let limits = WasmLimits {
        max_memory: args.wasm_memory.0,
        max_time: Duration::from_secs_f64(args.wasm_timeout),
        ..WasmLimits::default()
    };
    let node =
        Arc::new(build_node(&id, datasets(&args.dataset)?, cache, ports, limits, policy, Some(identity.clone()))?);
    let record = node.record();
    eprintln!(
        "node key: {}; {}",
        identity.public(),
        if args.open { "open: runs anything for anyone" } else { "policy enforced" }
    );
    eprintln!(
        "node {id}: datasets [{}], {} cores, {} memory; tasks from {} on {}; packages from {}",
        record.datasets.join(", "),
        record.resources.cpu,
        record.resources.memory,
        record.task_queue,
        args.nats.nats,
        args.hub.hub
    );
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        let _ = tx.send(true);
    });
    node.serve(rx).await.context("serving")?;
    Ok(())
}
