//! The node agent: registration, task execution, the serve loop.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tessera_core::config::deep_merge;
use tessera_core::name::check_ident;
use tessera_core::wire::{self, BlobRef, NodeRecord, Resources, SCHEMA_VERSION, TaskMessage, TaskOutcome, TaskReply};
use tessera_core::{Digest, RuntimeKind};
use tessera_package::Limits;
use tessera_ports::bus::check_queue;
use tessera_ports::{
    BlobError, BlobStore, Bus, BusError, Invocation, ModuleImage, Outputs, PackageSource, Runtime, RuntimeError,
    WorldError, WorldState,
};

use crate::cache::{CacheError, PackageCache};
use crate::context::NodeContext;

/// A node's configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The node id (letters, digits, `_`, `-`).
    pub id: String,
    /// Datasets by name: files on this machine that tasks may read and never upload.
    pub datasets: BTreeMap<String, PathBuf>,
    /// Where packages are cached.
    pub cache_dir: PathBuf,
    /// Resources to declare; detected when `None`.
    pub resources: Option<Resources>,
    /// Limits for unpacking packages.
    pub package_limits: Limits,
}

impl NodeConfig {
    /// A config with no datasets and detected resources.
    pub fn new(id: impl Into<String>, cache_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            id: id.into(),
            datasets: BTreeMap::new(),
            cache_dir: cache_dir.into(),
            resources: None,
            package_limits: Limits::default(),
        }
    }
    /// Declares a dataset.
    pub fn dataset(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.datasets.insert(name.into(), path.into());
        self
    }
}

/// Why a node could not start or run something.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node's config is wrong.
    #[error("node config: {0}")]
    Config(String),
    /// The package could not be made ready.
    #[error(transparent)]
    Package(#[from] CacheError),
    /// The run failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// An input blob is missing.
    #[error("input {name:?} ({digest}) is not in the blob store")]
    MissingInput {
        /// The input name.
        name: String,
        /// Its digest.
        digest: Digest,
    },
    /// The blob store failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// World state failed.
    #[error(transparent)]
    World(#[from] WorldError),
}

/// How many answered tasks a node remembers, so a redelivered task is answered again
/// without running twice.
const REPLY_MEMORY: usize = 1024;

/// A node agent.
pub struct Node {
    id: String,
    datasets: Arc<BTreeMap<String, PathBuf>>,
    resources: Resources,
    runtimes: BTreeMap<RuntimeKind, Arc<dyn Runtime>>,
    cache: PackageCache,
    bus: Arc<dyn Bus>,
    world: Arc<dyn WorldState>,
    blobs: Arc<dyn BlobStore>,
    source: Arc<dyn PackageSource>,
    replies: Mutex<(HashMap<String, TaskReply>, VecDeque<String>)>,
}

/// The ports a node talks through.
#[derive(Clone)]
pub struct NodePorts {
    /// Where tasks arrive and replies go.
    pub bus: Arc<dyn Bus>,
    /// Run state and node registration.
    pub world: Arc<dyn WorldState>,
    /// Inputs and outputs.
    pub blobs: Arc<dyn BlobStore>,
    /// Packages.
    pub source: Arc<dyn PackageSource>,
}

impl Node {
    /// Starts a node: checks its config, detects resources, opens its cache.
    pub fn new(config: NodeConfig, ports: NodePorts, runtimes: Vec<Arc<dyn Runtime>>) -> Result<Self, NodeError> {
        check_ident("node id", &config.id).map_err(|e| NodeError::Config(e.to_string()))?;
        for (name, path) in &config.datasets {
            check_ident("dataset name", name).map_err(|e| NodeError::Config(e.to_string()))?;
            if !path.is_file() {
                return Err(NodeError::Config(format!("dataset {name}: {} is not a readable file", path.display())));
            }
        }
        let cache = PackageCache::open(&config.cache_dir, config.package_limits.clone())?;
        let resources = config.resources.clone().unwrap_or_else(|| crate::resources::detect(&config.cache_dir));
        Ok(Node {
            id: config.id,
            datasets: Arc::new(config.datasets),
            resources,
            runtimes: runtimes.into_iter().map(|r| (r.kind(), r)).collect(),
            cache,
            bus: ports.bus,
            world: ports.world,
            blobs: ports.blobs,
            source: ports.source,
            replies: Mutex::new((HashMap::new(), VecDeque::new())),
        })
    }

    /// The node id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The queue this node takes tasks from.
    pub fn task_queue(&self) -> String {
        task_queue(&self.id)
    }

    /// What the node tells the world about itself.
    pub fn record(&self) -> NodeRecord {
        NodeRecord {
            schema: SCHEMA_VERSION,
            id: self.id.clone(),
            datasets: self.datasets.keys().cloned().collect(),
            runtimes: self.runtimes.keys().copied().collect(),
            resources: self.resources.clone(),
            task_queue: self.task_queue(),
        }
    }

    /// Announces the node in world state (`nodes/<id>`).
    pub async fn register(&self) -> Result<(), NodeError> {
        self.world.put(&node_key(&self.id), Bytes::from(wire::encode(&self.record()))).await?;
        Ok(())
    }

    /// Withdraws the node's announcement.
    pub async fn deregister(&self) -> Result<(), NodeError> {
        self.world.delete(&node_key(&self.id)).await?;
        Ok(())
    }

    /// Fetches, verifies and unpacks a package (or takes it from the cache).
    pub async fn module(&self, digest: &Digest) -> Result<ModuleImage, NodeError> {
        Ok(self.cache.get(digest, self.source.as_ref()).await?)
    }

    /// Runs a package on this node with the given config (merged over the module's
    /// default) and inputs.
    pub async fn run(
        &self,
        digest: &Digest,
        config: &Value,
        inputs: Vec<(String, Bytes)>,
        session: &str,
        task: &str,
    ) -> Result<Outputs, NodeError> {
        let image = self.module(digest).await?;
        let kind = image.manifest.runtime;
        let runtime = self.runtimes.get(&kind).ok_or(RuntimeError::Unsupported(kind))?;
        let mut merged = image.manifest.config.clone();
        deep_merge(&mut merged, config);
        let ctx = Arc::new(NodeContext {
            node: self.id.clone(),
            session: session.to_owned(),
            task: task.to_owned(),
            datasets: self.datasets.clone(),
            resources: self.resources.clone(),
            world: self.world.clone(),
        });
        Ok(runtime.run(&image, Invocation { config: merged, inputs }, ctx).await?)
    }

    /// Executes a task: inputs from the blob store, outputs back to it. Never fails: a
    /// failure is the reply's outcome. A task answered before is answered the same way
    /// again, without running twice.
    pub async fn execute(&self, task: &TaskMessage) -> TaskReply {
        if let Some(r) = self.replies.lock().unwrap_or_else(|p| p.into_inner()).0.get(&task.task_id) {
            tracing::info!(node = %self.id, task = %task.task_id, "task seen before; answering again without running it");
            return r.clone();
        }
        let started = Instant::now();
        let outcome = match self.execute_inner(task).await {
            Ok(outputs) => TaskOutcome::Ok { outputs, seconds: started.elapsed().as_secs_f64() },
            Err(e) => {
                tracing::warn!(node = %self.id, task = %task.task_id, "task failed: {e}");
                TaskOutcome::Failed { error: e.to_string() }
            }
        };
        let reply = TaskReply {
            schema: SCHEMA_VERSION,
            task_id: task.task_id.clone(),
            session: task.session.clone(),
            round: task.round,
            node: self.id.clone(),
            outcome,
        };
        let mut g = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        if map.insert(task.task_id.clone(), reply.clone()).is_none() {
            order.push_back(task.task_id.clone());
            if order.len() > REPLY_MEMORY
                && let Some(old) = order.pop_front()
            {
                map.remove(&old);
            }
        }
        reply
    }

    async fn execute_inner(&self, task: &TaskMessage) -> Result<Vec<BlobRef>, NodeError> {
        let mut inputs = Vec::with_capacity(task.inputs.len());
        for r in &task.inputs {
            let bytes = self
                .blobs
                .get(&r.digest)
                .await?
                .ok_or_else(|| NodeError::MissingInput { name: r.name.clone(), digest: r.digest })?;
            inputs.push((r.name.clone(), bytes));
        }
        let outputs = self.run(&task.module, &task.config, inputs, &task.session, &task.task_id).await?;
        let mut refs = Vec::with_capacity(outputs.len());
        for (name, bytes) in outputs {
            let size = bytes.len() as u64;
            let digest = self.blobs.put(bytes).await?;
            refs.push(BlobRef { name, digest, size });
        }
        Ok(refs)
    }

    /// Takes tasks from the node's queue until `shutdown` turns true. Malformed messages
    /// are logged and dropped; they never stop the node.
    pub async fn serve(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<(), NodeError> {
        let queue = self.task_queue();
        tracing::info!(node = %self.id, %queue, "node serving");
        loop {
            if *shutdown.borrow() {
                break;
            }
            let delivery = tokio::select! {
                _ = shutdown.changed() => break,
                d = self.bus.get(&queue, Duration::from_secs(1)) => d,
            };
            let delivery = match delivery {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(node = %self.id, "bus: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let task: TaskMessage = match wire::decode(&delivery.payload) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(node = %self.id, "refused a message on {queue}: {e}");
                    delivery.ack().await?;
                    continue;
                }
            };
            if let Err(e) = check_queue(&task.reply_to) {
                tracing::warn!(node = %self.id, task = %task.task_id, "refused a task with a bad reply queue: {e}");
                delivery.ack().await?;
                continue;
            }
            let reply = self.execute(&task).await;
            self.bus.put(&task.reply_to, Bytes::from(wire::encode(&reply))).await?;
            delivery.ack().await?;
        }
        tracing::info!(node = %self.id, "node stopped");
        Ok(())
    }
}

/// The task queue of node `id`.
pub fn task_queue(id: &str) -> String {
    format!("tessera.node.{id}.tasks")
}

/// The world key of node `id`'s record.
pub fn node_key(id: &str) -> String {
    format!("nodes/{id}")
}

/// Reads every registered node record. Records that do not decode are skipped with a
/// warning.
pub async fn list_nodes(world: &dyn WorldState) -> Result<Vec<NodeRecord>, WorldError> {
    let mut out = Vec::new();
    for key in world.keys("nodes/").await? {
        if let Some(e) = world.get(&key).await? {
            match wire::decode::<NodeRecord>(&e.value) {
                Ok(r) => out.push(r),
                Err(err) => tracing::warn!(%key, "ignoring a node record: {err}"),
            }
        }
    }
    Ok(out)
}
