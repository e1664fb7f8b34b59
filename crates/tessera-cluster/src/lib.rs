//! A whole Tessera in one process: a hub on disk, the in-process bus, world state and blob
//! store, a WebAssembly runtime, N nodes each holding its own datasets, and a coordinator
//! with its own node for held-out evaluation. This is what `tessera quickstart` runs, and
//! what end-to-end tests start.
//!
//! [`digits`] prepares the digits data set (shipped inside smartcore) as per-node shards and
//! a held-out test split, in the safetensors layout the softmax worker reads.
//!
//! It wires services together; it has no logic of its own.

pub mod digits;
pub mod simulate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_coordinator::Coordinator;
use tessera_core::registry::PackageRecord;
use tessera_hub::{HubError, HubStore, LocalHub};
use tessera_node::{BuiltinRuntime, Node, NodeConfig, NodeError, NodePorts};
use tessera_package::{Limits, PackError, pack_dir};
use tessera_ports::{Backend, PackageSource, Runtime};
use tessera_wasm::{StartError, WasmLimits, WasmRuntime};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why the cluster could not start or act.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The hub failed.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// A node failed.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// The WebAssembly runtime failed to start.
    #[error(transparent)]
    Wasm(#[from] StartError),
    /// Packing a module failed.
    #[error(transparent)]
    Pack(#[from] PackError),
    /// File-system failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Wraps a node's WebAssembly runtime (tests use it to make a node misbehave).
pub type RuntimeWrapper = fn(Arc<dyn Runtime>) -> Arc<dyn Runtime>;

/// Wraps a node's world state (tests use it to make a node drop out).
pub type WorldWrapper = fn(Arc<dyn tessera_ports::WorldState>) -> Arc<dyn tessera_ports::WorldState>;

/// One node of the cluster.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Its id.
    pub id: String,
    /// Its datasets.
    pub datasets: BTreeMap<String, PathBuf>,
    /// Wraps its WebAssembly runtime, if set.
    pub wasm_wrapper: Option<RuntimeWrapper>,
    /// Wraps its world state, if set.
    pub world_wrapper: Option<WorldWrapper>,
    /// The dataflow operations it offers.
    pub operations: Vec<String>,
}

/// How to build the cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Where the hub and the nodes' caches live.
    pub home: PathBuf,
    /// The participant nodes.
    pub nodes: Vec<NodeSpec>,
    /// Datasets of the coordinator's own node (held-out evaluation data).
    pub coordinator_datasets: BTreeMap<String, PathBuf>,
    /// Limits for each WebAssembly run.
    pub wasm_limits: WasmLimits,
    /// A Python interpreter: the nodes also run `python` modules with it.
    pub python: Option<PathBuf>,
}

impl ClusterConfig {
    /// One node per digits shard (`node-<k>`, dataset `digits`), the test split at the
    /// coordinator (dataset `digits-test`).
    pub fn digits(home: impl Into<PathBuf>, data: &digits::Prepared, wasm_limits: WasmLimits) -> Self {
        let nodes = data
            .shards
            .iter()
            .enumerate()
            .map(|(k, p)| NodeSpec {
                id: format!("node-{k}"),
                datasets: BTreeMap::from([("digits".to_string(), p.clone())]),
                wasm_wrapper: None,
                world_wrapper: None,
                operations: Vec::new(),
            })
            .collect();
        ClusterConfig {
            home: home.into(),
            nodes,
            coordinator_datasets: BTreeMap::from([("digits-test".to_string(), data.test.clone())]),
            wasm_limits,
            python: None,
        }
    }
}

impl ClusterConfig {
    /// `nodes` nodes (`node-<k>`) whose dataset `synthetic` describes FedProx's
    /// Synthetic(alpha, beta) rather than holding it (`spec`, e.g. `{"alpha": 0.5, "beta":
    /// 0.5}`; written under `home/data`): each simulated participant of the softmax worker
    /// generates its own device's rows. The coordinator holds no dataset.
    pub fn synthetic(
        home: impl Into<PathBuf>,
        nodes: usize,
        spec: &serde_json::Value,
        wasm_limits: WasmLimits,
    ) -> std::io::Result<Self> {
        let home = home.into();
        let dir = home.join("data");
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("synthetic.json");
        std::fs::write(&file, serde_json::json!({ "synthetic": spec }).to_string())?;
        let nodes = (0..nodes)
            .map(|k| NodeSpec {
                id: format!("node-{k}"),
                datasets: BTreeMap::from([("synthetic".to_string(), file.clone())]),
                wasm_wrapper: None,
                world_wrapper: None,
                operations: Vec::new(),
            })
            .collect();
        Ok(ClusterConfig { home, nodes, coordinator_datasets: BTreeMap::new(), wasm_limits, python: None })
    }
}

/// A running in-process cluster.
pub struct Cluster {
    /// The hub's store.
    pub hub: Arc<HubStore>,
    /// Bus, world state, blobs and membership.
    pub backend: Backend,
    /// The participant nodes.
    pub nodes: Vec<Arc<Node>>,
    /// The coordinator's own node.
    pub coordinator_node: Arc<Node>,
    shutdown: watch::Sender<bool>,
    serving: Vec<JoinHandle<Result<(), NodeError>>>,
}

impl Cluster {
    /// Starts the hub, the runtimes and the nodes on the in-process backend.
    pub async fn start(config: ClusterConfig) -> Result<Cluster, ClusterError> {
        Self::start_on(config, Backend::in_process(std::time::Duration::from_secs(30))).await
    }

    /// Starts the hub, the runtimes and the nodes on `backend`; the nodes register and
    /// start serving.
    pub async fn start_on(config: ClusterConfig, backend: Backend) -> Result<Cluster, ClusterError> {
        let hub = Arc::new(HubStore::open(config.home.join("hub"))?);
        let source: Arc<dyn PackageSource> = Arc::new(LocalHub(hub.clone()));
        let wasm: Arc<dyn Runtime> = Arc::new(WasmRuntime::new(config.wasm_limits.clone())?);
        let mut others: Vec<Arc<dyn Runtime>> = vec![Arc::new(BuiltinRuntime::new())];
        if let Some(py) = &config.python {
            let sdk = config.home.join("python-sdk");
            tessera_process::ProcessRuntime::write_sdk(&sdk).map_err(std::io::Error::other)?;
            others.push(Arc::new(tessera_process::ProcessRuntime::python(
                py.clone(),
                sdk,
                tessera_process::ProcessLimits::default(),
            )));
        }
        let ports = NodePorts { backend: backend.clone(), source };

        let make = |id: &str,
                    datasets: &BTreeMap<String, PathBuf>,
                    operations: &[String],
                    wrap: Option<RuntimeWrapper>,
                    world: Option<WorldWrapper>|
         -> Result<Arc<Node>, NodeError> {
            let mut c = NodeConfig::new(id, config.home.join("nodes").join(id).join("cache"));
            c.datasets = datasets.clone();
            c.operations = operations.to_vec();
            let mut runtimes = vec![wrap.map_or_else(|| wasm.clone(), |w| w(wasm.clone()))];
            runtimes.extend(others.iter().cloned());
            let mut ports = ports.clone();
            if let Some(w) = world {
                ports.backend.world = w(ports.backend.world.clone());
            }
            Ok(Arc::new(Node::new(c, ports, runtimes)?))
        };
        let coordinator_node = make("coordinator", &config.coordinator_datasets, &[], None, None)?;
        let mut nodes = Vec::new();
        for spec in &config.nodes {
            nodes.push(make(&spec.id, &spec.datasets, &spec.operations, spec.wasm_wrapper, spec.world_wrapper)?);
        }
        let (shutdown, rx) = watch::channel(false);
        let mut serving = Vec::new();
        for n in &nodes {
            // Announce before serving starts, so a session started right away sees it.
            n.register().await?;
            serving.push(tokio::spawn(n.clone().serve(rx.clone())));
        }
        Ok(Cluster { hub, backend, nodes, coordinator_node, shutdown, serving })
    }

    /// A coordinator over the cluster's ports, evaluating on the coordinator's node.
    pub fn coordinator(&self) -> Coordinator {
        Coordinator::new(
            self.backend.clone(),
            Arc::new(LocalHub(self.hub.clone())),
            Some(self.coordinator_node.clone()),
        )
    }

    /// Packs a module folder and publishes it to the hub (idempotent for the same bytes).
    pub fn publish_dir(&self, dir: &Path) -> Result<PackageRecord, ClusterError> {
        let packed = pack_dir(dir, &Limits::default())?;
        Ok(self.hub.publish(&packed.bytes, Some(packed.digest), None)?.record)
    }

    /// Kills a node as a crash would: its serving stops at once (a task it runs is
    /// dropped, its process killed), it sends no reply and no heartbeat, and it does not
    /// withdraw its announcement, which expires after the membership's time-to-live.
    /// False when no such node is serving.
    pub fn kill_node(&mut self, id: &str) -> bool {
        match self.nodes.iter().position(|n| n.id() == id) {
            Some(i) if !self.serving[i].is_finished() => {
                self.serving[i].abort();
                true
            }
            _ => false,
        }
    }

    /// Announces a node `id` holding `dataset` that never answers: its record is there,
    /// nobody serves its queue (until its announcement lapses).
    pub async fn announce_silent_node(&self, id: &str, dataset: &str) -> Result<(), tessera_ports::WorldError> {
        let record = tessera_core::wire::NodeRecord {
            schema: tessera_core::wire::SCHEMA_VERSION,
            id: id.into(),
            datasets: vec![dataset.into()],
            runtimes: vec![tessera_core::RuntimeKind::Wasm],
            resources: Default::default(),
            task_queue: tessera_node::task_queue(id),
            key: None,
            endpoint: None,
            labels: Default::default(),
            libraries: Vec::new(),
            operations: Vec::new(),
            protections: Vec::new(),
            installs_libraries: false,
            degraded: false,
        };
        self.backend.members.announce(id, bytes::Bytes::from(tessera_core::wire::encode(&record))).await
    }

    /// Stops the nodes (they withdraw their announcements) and waits for them.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for h in self.serving {
            let _ = h.await;
        }
    }
}
