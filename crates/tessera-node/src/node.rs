//! The node agent: registration, authorization, task execution.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tessera_core::config::deep_merge;
use tessera_core::name::check_ident;
use tessera_core::wire::{self, BlobRef, NodeRecord, Resources, SCHEMA_VERSION, TaskMessage, TaskOutcome, TaskReply};
use tessera_core::{Digest, PackageRef, Role, RuntimeKind};
use tessera_identity::{KeyPair, PublicKey, Verifier, messages, now_ms};
use tessera_package::Limits;
use tessera_ports::{
    Backend, BlobError, BusError, Invocation, Membership, ModuleImage, Outputs, PackageSource, Runtime, RuntimeError,
    WorldError,
};
use tessera_ports::{read_ref, retry_transient};

use crate::cache::{CacheError, PackageCache};
use crate::context::NodeContext;
use crate::policy::NodePolicy;
use crate::slots::TaskSlots;

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
    /// What the node lets run, for whom, on which data (open by default).
    pub policy: NodePolicy,
    /// The node's key: the audience of signed tasks, and the signer of its replies.
    pub identity: Option<Arc<KeyPair>>,
    /// Where the node's HTTP gateway listens, announced so other nodes forward calls.
    pub endpoint: Option<String>,
    /// Labels announced with the node (`zone: eu`), which swarm tasks select nodes by.
    pub labels: BTreeMap<String, String>,
    /// Dataflow operations it runs (announced; parameter sets of these come to it).
    pub operations: Vec<String>,
    /// The sandbox protections its runtimes enforce (announced).
    pub protections: Vec<String>,
    /// Whether it runs without a protection its policy requires (announced).
    pub degraded: bool,
    /// Most tasks it runs at once (at least 1; the machine's cores by default). Tasks
    /// whose modules declare `needs` also reserve those against its resources.
    pub max_tasks: usize,
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
            policy: NodePolicy::open(),
            identity: None,
            endpoint: None,
            labels: BTreeMap::new(),
            operations: Vec::new(),
            protections: Vec::new(),
            degraded: false,
            max_tasks: std::thread::available_parallelism().map_or(1, |n| n.get()),
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
    /// The node's policy refuses the task or package.
    #[error("refused: {0}")]
    Refused(String),
}

/// Where a run's world state and log go.
struct Scope<'a> {
    session: &'a str,
    task: &'a str,
    /// Who the task runs for: the account that signed it, else `unsigned`; `local` for the
    /// node's own callers ([`Node::run`]).
    account: &'a str,
    world: Option<tessera_core::wire::WorldScope>,
    logs: Option<Arc<crate::context::TaskLog>>,
}

/// The most bytes of one output a node puts in its reply, whatever the task asks: replies
/// stay well inside a message.
pub const MAX_INLINE_OUTPUT: u64 = 64 << 10;

/// How long a task retries a backend failure (a lost connection, a server restarting, a
/// cluster electing a leader) on its inputs and outputs before it fails.
const BACKEND_PATIENCE: Duration = Duration::from_secs(60);

/// How many answered tasks a node remembers, so a redelivered task is answered again
/// without running twice.
const REPLY_MEMORY: usize = 1024;

/// A node agent.
pub struct Node {
    pub(crate) id: String,
    datasets: Arc<BTreeMap<String, PathBuf>>,
    resources: Resources,
    runtimes: BTreeMap<RuntimeKind, Arc<dyn Runtime>>,
    cache: PackageCache,
    pub(crate) backend: Backend,
    source: Arc<dyn PackageSource>,
    replies: Mutex<(HashMap<String, TaskReply>, VecDeque<String>)>,
    /// Tasks being executed, by id, each with a gate its other deliveries wait at.
    running: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    stats: Stats,
    policy: NodePolicy,
    pub(crate) identity: Option<Arc<KeyPair>>,
    verifier: Option<Verifier>,
    trusted: Mutex<HashSet<Digest>>,
    usage: Mutex<BTreeMap<String, Usage>>,
    endpoint: Option<String>,
    labels: BTreeMap<String, String>,
    libraries: Vec<String>,
    operations: Vec<String>,
    protections: Vec<String>,
    degraded: bool,
    installs_libraries: bool,
    pub(crate) max_tasks: usize,
    slots: Arc<TaskSlots>,
}

/// What one account has used on a node.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Tasks run.
    pub tasks: u64,
    /// Seconds of compute.
    pub compute_seconds: f64,
    /// Bytes read (inputs) and written (outputs).
    pub bytes: u64,
}

/// Counters of what a node did.
#[derive(Default, Debug)]
pub struct Stats {
    /// Tasks run.
    pub tasks_run: AtomicU64,
    /// Tasks answered again from memory (redeliveries and duplicates), not run.
    pub answered_again: AtomicU64,
}

/// What a node talks through: a backend (bus, world state, blobs, membership) and a
/// package source (the hub).
#[derive(Clone)]
pub struct NodePorts {
    /// Bus, world state, blob store, membership.
    pub backend: Backend,
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
        for (k, v) in &config.labels {
            check_ident("label name", k).map_err(|e| NodeError::Config(e.to_string()))?;
            check_ident("label value", v).map_err(|e| NodeError::Config(format!("label {k}: {e}")))?;
        }
        for op in &config.operations {
            check_ident("operation name", op).map_err(|e| NodeError::Config(e.to_string()))?;
        }
        let cache = PackageCache::open(&config.cache_dir, config.package_limits.clone())?;
        let installs_libraries = runtimes.iter().any(|r| r.installs_libraries());
        let mut libraries: Vec<String> = runtimes.iter().flat_map(|r| r.libraries()).collect();
        libraries.sort();
        libraries.dedup();
        let resources = config.resources.clone().unwrap_or_else(|| crate::resources::detect(&config.cache_dir));
        Ok(Node {
            id: config.id,
            datasets: Arc::new(config.datasets),
            slots: TaskSlots::new(resources.clone()),
            resources,
            runtimes: runtimes.into_iter().map(|r| (r.kind(), r)).collect(),
            cache,
            backend: ports.backend,
            source: ports.source,
            replies: Mutex::new((HashMap::new(), VecDeque::new())),
            running: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            verifier: config.identity.as_ref().map(|k| {
                Verifier::new(k.public().clone())
                    .with_window_ms(config.policy.task_window_secs.saturating_mul(1000))
                    .without_replay_check()
            }),
            policy: config.policy,
            identity: config.identity,
            trusted: Mutex::new(HashSet::new()),
            usage: Mutex::new(BTreeMap::new()),
            endpoint: config.endpoint,
            labels: config.labels,
            libraries,
            operations: config.operations,
            protections: config.protections,
            degraded: config.degraded,
            installs_libraries,
            max_tasks: config.max_tasks.max(1),
        })
    }

    /// The runtime of a kind, if this node offers it.
    pub fn runtime(&self, kind: RuntimeKind) -> Result<Arc<dyn Runtime>, NodeError> {
        Ok(self.runtimes.get(&kind).cloned().ok_or(RuntimeError::Unsupported(kind))?)
    }

    /// The node's datasets.
    pub fn datasets(&self) -> Arc<BTreeMap<String, PathBuf>> {
        self.datasets.clone()
    }

    /// The node's world state.
    pub fn world(&self) -> Arc<dyn tessera_ports::WorldState> {
        self.backend.world.clone()
    }

    /// The node's blob store.
    pub fn blobs(&self) -> Arc<dyn tessera_ports::BlobStore> {
        self.backend.blobs.clone()
    }

    /// The membership the node announces itself in.
    pub fn members(&self) -> Arc<dyn Membership> {
        self.backend.members.clone()
    }

    /// The bus the node takes tasks from.
    pub fn bus(&self) -> Arc<dyn tessera_ports::Bus> {
        self.backend.bus.clone()
    }

    /// Resolves a package reference through the node's package source.
    pub async fn resolve(&self, reference: &PackageRef) -> Result<tessera_core::registry::PackageRecord, NodeError> {
        Ok(self.source.resolve(reference).await.map_err(CacheError::from)?)
    }

    /// What the node has done so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The node id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The queue this node takes tasks from.
    pub fn task_queue(&self) -> String {
        task_queue(&self.id)
    }

    /// Whether the node runs without a sandbox protection its policy requires.
    pub fn degraded(&self) -> bool {
        self.degraded
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
            key: self.identity.as_ref().map(|k| k.public().to_string()),
            endpoint: self.endpoint.clone(),
            labels: self.labels.clone(),
            libraries: self.libraries.clone(),
            operations: self.operations.clone(),
            protections: self.protections.clone(),
            installs_libraries: self.installs_libraries,
            degraded: self.degraded,
        }
    }

    /// Announces the node (or refreshes its announcement). [`Node::serve`] does this
    /// every third of the membership's time-to-live.
    pub async fn register(&self) -> Result<(), NodeError> {
        self.backend.members.announce(&self.id, Bytes::from(wire::encode(&self.record()))).await?;
        Ok(())
    }

    /// Withdraws the node's announcement.
    pub async fn deregister(&self) -> Result<(), NodeError> {
        self.backend.members.withdraw(&self.id).await?;
        Ok(())
    }

    /// Fetches, verifies and unpacks a package (or takes it from the cache).
    /// Checks the package against the node's trust policy (signed by a trusted publisher of
    /// its namespace) before anything of it runs, and, whatever the policy, that its own
    /// manifest names the module and version the hub's record says: a hub cannot pass one
    /// module off as another.
    pub async fn module(&self, digest: &Digest) -> Result<ModuleImage, NodeError> {
        let checked = self.trusted.lock().unwrap_or_else(|p| p.into_inner()).contains(digest);
        let mut expected = None;
        if !checked {
            let record = self.source.resolve(&PackageRef::Digest(*digest)).await.map_err(CacheError::from)?;
            self.policy.check_package(&record, digest).map_err(NodeError::Refused)?;
            expected = Some((record.name, record.version));
        }
        let image = self.cache.get(digest, self.source.as_ref(), self.identity.as_deref()).await?;
        if let Some((name, version)) = expected {
            let same_version = tessera_core::version::Version::parse(&version)
                .is_ok_and(|v| tessera_core::version::same_version(&v, &image.manifest.version));
            if image.manifest.name.as_str() != name || !same_version {
                return Err(NodeError::Refused(format!(
                    "package {digest} is published as {name}@{version} but its manifest says {}@{}",
                    image.manifest.name, image.manifest.version
                )));
            }
            self.trusted.lock().unwrap_or_else(|p| p.into_inner()).insert(*digest);
        }
        Ok(image)
    }

    /// Checks a task's signature and the signer's grant: returns the signer and the
    /// datasets the task may read.
    async fn authorize(
        &self,
        task: &TaskMessage,
        image: &ModuleImage,
    ) -> Result<(Option<PublicKey>, BTreeMap<String, PathBuf>), NodeError> {
        let module = image.manifest.name.as_str();
        let signer = match (&task.auth, &self.verifier) {
            (Some(_), None) => {
                return Err(NodeError::Refused("the task is signed, but this node has no key to check it".into()));
            }
            (Some(_), Some(v)) => messages::verify_task(task, v, &self.task_queue(), now_ms())
                .map_err(|e| NodeError::Refused(format!("task signature: {e}")))?,
            (None, _) if self.policy.require_signed_tasks => {
                return Err(NodeError::Refused("unsigned task; this node runs only signed tasks".into()));
            }
            (None, _) => None,
        };
        let datasets = match &signer {
            Some(k) if self.policy.checks_grants() => {
                let grant = self.policy.grant_for(k, module, now_ms()).map_err(NodeError::Refused)?;
                self.datasets
                    .iter()
                    .filter(|(n, _)| grant.datasets.contains(n))
                    .map(|(n, p)| (n.clone(), p.clone()))
                    .collect()
            }
            _ => (*self.datasets).clone(),
        };
        self.check_access(task, image, signer.as_ref()).await?;
        if let Some(k) = &signer
            && let Some(q) = self.policy.quota(k)
        {
            let used = self.usage_of(k);
            if q.tasks.is_some_and(|t| used.tasks >= t) || q.compute_seconds.is_some_and(|c| used.compute_seconds >= c)
            {
                return Err(NodeError::Refused(format!(
                    "{k} is over its quota on this node (used {} tasks, {:.1} s of compute)",
                    used.tasks, used.compute_seconds
                )));
            }
        }
        Ok((signer, datasets))
    }

    /// Checks the module's own access rules for a task: the function is the task config's
    /// `function`, else its `mode`, else `run`.
    async fn check_access(
        &self,
        task: &TaskMessage,
        image: &ModuleImage,
        signer: Option<&PublicKey>,
    ) -> Result<(), NodeError> {
        let function =
            task.config.get("function").or_else(|| task.config.get("mode")).and_then(|v| v.as_str()).unwrap_or("run");
        self.check_function_access(function, image, signer).await
    }

    /// The node's policy.
    pub fn policy(&self) -> &NodePolicy {
        &self.policy
    }

    /// Checks a call of an actor's `function` by `signer` (`None`: unsigned) against the
    /// node's policy (signed calls required, the signer's grant for the module) and the
    /// module's access role for the function.
    pub async fn authorize_call(
        &self,
        image: &ModuleImage,
        function: &str,
        signer: Option<&PublicKey>,
    ) -> Result<(), NodeError> {
        self.authorize_launch(image, signer)?;
        self.check_function_access(function, image, signer).await
    }

    /// Checks a launch of `image` as an actor by `signer` against the node's policy.
    pub fn authorize_launch(&self, image: &ModuleImage, signer: Option<&PublicKey>) -> Result<(), NodeError> {
        match signer {
            None if self.policy.require_signed_tasks => {
                Err(NodeError::Refused("unsigned request; this node takes only signed calls".into()))
            }
            Some(k) if self.policy.checks_grants() => {
                self.policy.grant_for(k, image.manifest.name.as_str(), now_ms()).map_err(NodeError::Refused)?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Checks the module's own access rules: the role `function` asks for (public,
    /// trusted, owner); the owner is the package's signer.
    async fn check_function_access(
        &self,
        function: &str,
        image: &ModuleImage,
        signer: Option<&PublicKey>,
    ) -> Result<(), NodeError> {
        let role = image.manifest.access.role_for(function);
        if role == Role::Public {
            return Ok(());
        }
        let who = format!("{}'s function {function:?} is for the {role:?} role", image.manifest.name).to_lowercase();
        let signer = signer.ok_or_else(|| NodeError::Refused(format!("{who}: sign the task")))?;
        let owner = self
            .source
            .resolve(&PackageRef::Digest(image.digest))
            .await
            .ok()
            .and_then(|r| r.signer)
            .and_then(|k| k.parse::<PublicKey>().ok());
        if owner.as_ref() == Some(signer) {
            return Ok(());
        }
        if role == Role::Trusted
            && image.manifest.access.trusted.iter().any(|k| k.parse::<PublicKey>().ok().as_ref() == Some(signer))
        {
            return Ok(());
        }
        Err(NodeError::Refused(format!("{who}, which {signer} does not have")))
    }

    /// What an account has used on this node (since it started).
    pub fn usage_of(&self, account: &PublicKey) -> Usage {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).get(&account.to_string()).cloned().unwrap_or_default()
    }

    /// Usage by account, as kept in world state under `usage/<node>/<account digest>`.
    async fn meter(&self, account: &PublicKey, seconds: f64, bytes: u64) {
        let usage = {
            let mut g = self.usage.lock().unwrap_or_else(|p| p.into_inner());
            let u = g.entry(account.to_string()).or_default();
            u.tasks += 1;
            u.compute_seconds += seconds;
            u.bytes += bytes;
            u.clone()
        };
        let key = format!("usage/{}/{}", self.id, &Digest::of(account.to_string().as_bytes()).hex()[..32]);
        let record = serde_json::json!({"account": account.to_string(), "node": self.id, "usage": usage});
        if let Err(e) = self.backend.world.put(&key, Bytes::from(record.to_string())).await {
            tracing::warn!(node = %self.id, "cannot record usage: {e}");
        }
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
        self.run_image(
            &image,
            self.datasets.clone(),
            config,
            inputs,
            Scope { session, task, account: "local", world: None, logs: None },
        )
        .await
    }

    async fn run_image(
        &self,
        image: &ModuleImage,
        datasets: Arc<BTreeMap<String, PathBuf>>,
        config: &Value,
        inputs: Vec<(String, Bytes)>,
        scope: Scope<'_>,
    ) -> Result<Outputs, NodeError> {
        let Scope { session, task, account, world, logs } = scope;
        let kind = image.manifest.runtime;
        let runtime = self.runtimes.get(&kind).ok_or(RuntimeError::Unsupported(kind))?;
        let mut merged = image.manifest.config.clone();
        deep_merge(&mut merged, config);
        let ctx = Arc::new(NodeContext {
            node: self.id.clone(),
            session: session.to_owned(),
            task: task.to_owned(),
            datasets,
            resources: self.resources.clone(),
            world: self.backend.world.clone(),
            scope: world,
            logs,
            reuse: Some(format!("{session} {account}")),
        });
        Ok(runtime.run(image, Invocation { config: merged, inputs, timeout: None }, ctx).await?)
    }

    /// Executes a task: inputs from the blob store, outputs back to it. Never fails: a
    /// failure is the reply's outcome. A task answered before, by this process or by this
    /// node before it restarted (answers are kept in world state under
    /// `done/<node>/<task>`), is answered the same way again without running twice.
    ///
    /// Deliveries of one task that arrive while it runs (the node runs tasks side by
    /// side) wait for its answer rather than running it a second time.
    pub async fn execute(&self, task: &TaskMessage) -> TaskReply {
        let (reply, record) = self.answer(task, false).await;
        if let Some((key, value)) = record {
            self.keep_answer(&key, value, &task.task_id).await;
        }
        reply
    }

    /// The answer to a task, and when it ran now, the record of it to keep (the world
    /// key, and the reply as [`wire::encode`] gives it) for the caller to write: the serve
    /// loop writes it beside the reply, and sends the same bytes when it signs nothing.
    /// `first_delivery`: the bus delivers this message for the first time; with
    /// [`TaskMessage::fresh`] on an unsigned task, the task cannot have been answered by
    /// an earlier run of this node, and the look-up in world state is skipped.
    pub(crate) async fn answer(
        &self,
        task: &TaskMessage,
        first_delivery: bool,
    ) -> (TaskReply, Option<(String, Bytes)>) {
        let gate = {
            let mut g = self.running.lock().unwrap_or_else(|p| p.into_inner());
            g.entry(task.task_id.clone()).or_default().clone()
        };
        let held = gate.lock().await;
        // A signed task may be a replay of a genuine one, which its signature does not
        // tell: its earlier answer is always looked up.
        let answer = self.execute_once(task, first_delivery && task.fresh && task.auth.is_none()).await;
        drop(held);
        let mut g = self.running.lock().unwrap_or_else(|p| p.into_inner());
        // The map's handle and this one: nobody else waits on the gate.
        if Arc::strong_count(&gate) <= 2 {
            g.remove(&task.task_id);
        }
        answer
    }

    /// Keeps the answer to a task durably, so a redelivery after a restart is answered
    /// without running it.
    pub(crate) async fn keep_answer(&self, key: &str, value: Bytes, task_id: &str) {
        if let Err(e) = self.backend.world.put(key, value).await {
            tracing::warn!(node = %self.id, task = %task_id, "cannot record the answer durably: {e}");
        }
    }

    async fn execute_once(&self, task: &TaskMessage, never_answered: bool) -> (TaskReply, Option<(String, Bytes)>) {
        if let Some(r) = self.replies.lock().unwrap_or_else(|p| p.into_inner()).0.get(&task.task_id) {
            tracing::info!(node = %self.id, task = %task.task_id, "task seen before; answering again without running it");
            self.stats.answered_again.fetch_add(1, Ordering::Relaxed);
            return (r.clone(), None);
        }
        // Answered before this process started (a crash between reply and ack)?
        let key = self.done_key(&task.task_id);
        if let Some(key) = key.as_ref().filter(|_| !never_answered)
            && let Ok(Some(e)) = self.backend.world.get(key).await
            && let Ok(r) = wire::decode::<TaskReply>(&e.value)
        {
            tracing::info!(node = %self.id, task = %task.task_id, "task answered before a restart; answering again");
            self.stats.answered_again.fetch_add(1, Ordering::Relaxed);
            self.remember(&r);
            return (r, None);
        }
        let started = Instant::now();
        // The task's span carries the coordinator's trace (W3C ids), so its log lines here
        // join the coordinator's for the same task.
        let trace = task.trace.as_deref().and_then(tessera_core::trace::TraceParent::parse);
        let span = tracing::info_span!(
            "task",
            task_id = %task.task_id,
            session = %task.session,
            round = task.round,
            node = %self.id,
            trace_id = %trace.map(|t| t.trace_hex()).unwrap_or_default(),
            parent_span = %trace.map(|t| t.span_hex()).unwrap_or_default(),
        );
        let result = tracing::Instrument::instrument(self.execute_inner(task), span.clone()).await;
        let seconds = started.elapsed().as_secs_f64();
        let label = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!(tessera_ports::metrics::NODE_TASKS, "node" => self.id.clone(), "outcome" => label)
            .increment(1);
        metrics::histogram!(tessera_ports::metrics::NODE_TASK_SECONDS, "node" => self.id.clone()).record(seconds);
        let outcome = match result {
            Ok(outputs) => TaskOutcome::Ok { outputs, seconds },
            Err(e) => {
                span.in_scope(|| tracing::warn!("task failed: {e}"));
                TaskOutcome::Failed { error: e.to_string() }
            }
        };
        if matches!(outcome, TaskOutcome::Ok { .. }) {
            span.in_scope(|| tracing::debug!(seconds, "task done"));
        }
        let reply = TaskReply {
            schema: SCHEMA_VERSION,
            task_id: task.task_id.clone(),
            session: task.session.clone(),
            round: task.round,
            node: self.id.clone(),
            outcome,
            auth: None,
        };
        self.remember(&reply);
        let record = key.map(|k| (k, Bytes::from(wire::encode(&reply))));
        (reply, record)
    }

    /// Where the answer to a task is kept, so a restarted node answers a redelivery
    /// without running it again (`None` when the task id cannot be a key).
    fn done_key(&self, task_id: &str) -> Option<String> {
        let key = wire::answer_key(&self.id, task_id);
        tessera_core::name::check_key("task key", &key).is_ok().then_some(key)
    }

    fn remember(&self, reply: &TaskReply) {
        let mut g = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        if map.insert(reply.task_id.clone(), reply.clone()).is_none() {
            order.push_back(reply.task_id.clone());
            if order.len() > REPLY_MEMORY
                && let Some(old) = order.pop_front()
            {
                map.remove(&old);
            }
        }
    }

    async fn execute_inner(&self, task: &TaskMessage) -> Result<Vec<BlobRef>, NodeError> {
        let mut image = self.module(&task.module).await?;
        if let Some(entry) = &task.component {
            image.manifest.needs = self.entry_needs(entry, &task.module, &image.manifest.needs).await?;
        }
        let (signer, datasets) = self.authorize(task, &image).await?;
        let _reserved = self.slots.reserve(&task.task_id, &image.manifest.needs).await;
        self.stats.tasks_run.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut moved = 0u64;
        let mut inputs = Vec::with_capacity(task.inputs.len());
        for r in &task.inputs {
            let bytes =
                retry_transient("reading a task input", BACKEND_PATIENCE, || read_ref(self.backend.blobs.as_ref(), r))
                    .await?
                    .ok_or_else(|| NodeError::MissingInput { name: r.name.clone(), digest: r.digest })?;
            moved += bytes.len() as u64;
            inputs.push((r.name.clone(), bytes));
        }
        // The model the update is measured from, kept only when clipping or masking needs
        // it: a large model is not held beside the run's outputs otherwise.
        let measured = task.config.get("dp_clipping_norm").is_some() || task.config.get("secagg").is_some();
        let base = inputs.iter().find(|(n, _)| measured && n == "model").map(|(_, b)| b.clone());
        let logs = crate::context::TaskLog::new(&task.session, &task.task_id, self.backend.world.clone());
        let account = signer.as_ref().map_or_else(|| "unsigned".to_owned(), ToString::to_string);
        let scope = Scope {
            session: &task.session,
            task: &task.task_id,
            account: &account,
            world: task.world.clone(),
            logs: logs.clone(),
        };
        let outputs = self.run_image(&image, Arc::new(datasets), &task.config, inputs, scope).await;
        if let Some(l) = &logs {
            l.flush().await;
        }
        // Client-side differential privacy: the update is clipped here, before it leaves.
        let outputs = match (outputs, task.config.get("dp_clipping_norm").and_then(|v| v.as_f64())) {
            (Ok(out), Some(clip)) => clip_model_output(out, base.as_deref(), clip),
            (other, _) => other,
        };
        // Secure aggregation: the update leaves the node only masked, through the round.
        let outputs = match (outputs, task.config.get("secagg")) {
            (Ok(out), Some(sa)) => match serde_json::from_value::<crate::secagg::SecAggTask>(sa.clone()) {
                Ok(sa) => {
                    crate::secagg::participate(
                        self.backend.world.as_ref(),
                        self.backend.blobs.as_ref(),
                        &sa,
                        base.as_deref(),
                        out,
                    )
                    .await
                }
                Err(e) => Err(NodeError::Runtime(RuntimeError::Module(format!("secure aggregation: {e}")))),
            },
            (other, _) => other,
        };
        if let Some(k) = &signer {
            let out_bytes: u64 = outputs.as_ref().map_or(0, |o| o.iter().map(|(_, b)| b.len() as u64).sum());
            self.meter(k, started.elapsed().as_secs_f64(), moved + out_bytes).await;
        }
        let mut refs = Vec::new();
        for (name, bytes) in outputs? {
            // Small enough for the reply, when the coordinator asked for that.
            if bytes.len() as u64 <= task.inline_outputs.min(MAX_INLINE_OUTPUT) {
                refs.push(BlobRef::inline(name, &bytes));
                continue;
            }
            let size = bytes.len() as u64;
            let digest =
                retry_transient("storing a task output", BACKEND_PATIENCE, || self.backend.blobs.put(bytes.clone()))
                    .await?;
            refs.push(BlobRef::stored(name, digest, size));
        }
        Ok(refs)
    }
}

/// Clips the `model` output to L2 distance `clip` from the `model` input (both
/// safetensors), for client-side differential privacy.
fn clip_model_output(mut outputs: Outputs, base: Option<&[u8]>, clip: f64) -> Result<Outputs, NodeError> {
    use tessera_core::tensor::{Model, TensorLimits};
    let refuse = |why: String| NodeError::Runtime(RuntimeError::Module(format!("differential privacy: {why}")));
    let Some(base) = base else {
        return Err(refuse("clipping needs the `model` input the update is measured from".into()));
    };
    let base = Model::decode(base, TensorLimits::default()).map_err(|e| refuse(format!("model input: {e}")))?;
    for (name, bytes) in outputs.iter_mut().filter(|(n, _)| n == "model") {
        let mut update =
            Model::decode(bytes, TensorLimits::default()).map_err(|e| refuse(format!("{name} output: {e}")))?;
        let norm = tessera_core::privacy::clip_model_update(&base.floats, &mut update.floats, clip as f32)
            .map_err(|e| refuse(e.to_string()))?;
        tracing::debug!(norm, clip, "update clipped for differential privacy");
        *bytes = Bytes::from(update.encode());
    }
    Ok(outputs)
}

/// The task queue of node `id`.
pub fn task_queue(id: &str) -> String {
    format!("tessera.node.{id}.tasks")
}

/// Every node announced within the membership's time-to-live. Records that do not
/// decode are skipped with a warning.
pub async fn list_nodes(members: &dyn Membership) -> Result<Vec<NodeRecord>, WorldError> {
    let mut out = Vec::new();
    for (id, bytes) in members.members().await? {
        match wire::decode::<NodeRecord>(&bytes) {
            Ok(r) if r.id == id => out.push(r),
            Ok(r) => tracing::warn!(%id, "ignoring a node record that names another node ({})", r.id),
            Err(err) => tracing::warn!(%id, "ignoring a node record: {err}"),
        }
    }
    Ok(out)
}
