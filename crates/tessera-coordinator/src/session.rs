//! Federated sessions: configuration, the round loop, and what a session leaves behind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tessera_core::aggregate::fedavg;
use tessera_core::config::deep_merge;
use tessera_core::name::check_ident;
use tessera_core::registry::PackageRecord;
use tessera_core::select::select_participants;
use tessera_core::tensor::{TensorLimits, Tensors};
use tessera_core::wire::{
    self, BlobRef, Failure, Lineage, ModuleUse, NodeRecord, RoundReport, SCHEMA_VERSION, TaskMessage, TaskOutcome,
    TaskReply, WorkerMetrics,
};
use tessera_core::{Digest, PackageRef};
use tessera_identity::{KeyPair, PublicKey, Verifier, messages, now_ms};
use tessera_node::{Node, NodeError, list_nodes, task_queue};
use tessera_ports::{Backend, BlobError, BusError, PackageSource, SourceError, WorldError};

/// A federated learning session, as written in a swarm file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// The worker package: `name[@version|@alias]` or a digest.
    pub module: String,
    /// Rounds to run.
    #[serde(default = "default_rounds")]
    pub rounds: u32,
    /// Fewest participants a round may aggregate.
    #[serde(default = "default_min")]
    pub min_participants: usize,
    /// Fraction of eligible nodes asked each round, in (0, 1].
    #[serde(default = "default_ratio")]
    pub participant_ratio: f64,
    /// Seconds a round waits for replies.
    #[serde(default = "default_timeout")]
    pub round_timeout_secs: f64,
    /// Aggregation strategy (`fedavg`).
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// Dataset participants train on (nodes without it are not asked).
    #[serde(default = "default_dataset")]
    pub dataset: String,
    /// Dataset the coordinator's own node evaluates each global model on.
    #[serde(default)]
    pub eval_dataset: Option<String>,
    /// Config overrides for the worker, merged over its module's default config.
    #[serde(default = "empty")]
    pub config: Value,
    /// Seed for participant selection and worker shuffling.
    #[serde(default)]
    pub seed: u64,
    /// Name under which the final model is published to the hub (nothing is published
    /// when absent).
    #[serde(default)]
    pub publish_as: Option<String>,
}

fn default_rounds() -> u32 {
    20
}
fn default_min() -> usize {
    2
}
fn default_ratio() -> f64 {
    1.0
}
fn default_timeout() -> f64 {
    60.0
}
fn default_strategy() -> String {
    "fedavg".into()
}
fn default_dataset() -> String {
    "digits".into()
}
fn empty() -> Value {
    Value::Object(Default::default())
}

impl SessionConfig {
    /// Reads a swarm file (YAML). Errors name the field and the line.
    pub fn from_yaml(text: &str) -> Result<Self, SessionError> {
        let options = serde_saphyr::options! {
            with_snippet: false,
            duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        };
        let cfg: SessionConfig = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
            let loc = e.location().filter(|l| l.line() > 0);
            let mut msg = e.to_string();
            if let Some(i) = msg.find(" at line ") {
                msg.truncate(i);
            }
            match loc {
                Some(l) => SessionError::Config(format!("line {}, column {}: {msg}", l.line(), l.column())),
                None => SessionError::Config(msg),
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// A session of `module` with the defaults.
    pub fn new(module: impl Into<String>) -> Self {
        SessionConfig {
            module: module.into(),
            rounds: default_rounds(),
            min_participants: default_min(),
            participant_ratio: default_ratio(),
            round_timeout_secs: default_timeout(),
            strategy: default_strategy(),
            dataset: default_dataset(),
            eval_dataset: None,
            config: empty(),
            seed: 0,
            publish_as: None,
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<PackageRef, SessionError> {
        let bad = |m: String| Err(SessionError::Config(m));
        let module: PackageRef = self.module.parse().map_err(|e| SessionError::Config(format!("module: {e}")))?;
        if self.rounds == 0 {
            return bad("rounds must be at least 1".into());
        }
        if self.min_participants == 0 {
            return bad("min_participants must be at least 1".into());
        }
        if !(self.participant_ratio > 0.0 && self.participant_ratio <= 1.0) {
            return bad(format!("participant_ratio {} must be in (0, 1]", self.participant_ratio));
        }
        if !(self.round_timeout_secs.is_finite() && self.round_timeout_secs > 0.0) {
            return bad("round_timeout_secs must be a positive number".into());
        }
        if self.strategy != "fedavg" {
            return bad(format!("unknown strategy {:?}; available: fedavg", self.strategy));
        }
        check_ident("dataset", &self.dataset).map_err(|e| SessionError::Config(e.to_string()))?;
        if let Some(e) = &self.eval_dataset {
            check_ident("eval_dataset", e).map_err(|e| SessionError::Config(e.to_string()))?;
        }
        if !self.config.is_object() {
            return bad("config must be a mapping".into());
        }
        if let Some(name) = &self.publish_as {
            name.parse::<tessera_core::ModulePath>().map_err(|e| SessionError::Config(format!("publish_as: {e}")))?;
        }
        Ok(module)
    }
}

/// Why a session stopped.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The session's config is wrong.
    #[error("session config: {0}")]
    Config(String),
    /// The worker package could not be resolved.
    #[error("worker module: {0}")]
    Module(#[from] SourceError),
    /// Not enough nodes.
    #[error("{0}")]
    Participants(String),
    /// A round ended with fewer updates than the minimum.
    #[error("round {round}: {got} update(s) arrived, the minimum is {min}; failures: {failures}")]
    RoundFailed {
        /// The round.
        round: u32,
        /// Updates that arrived.
        got: usize,
        /// The minimum.
        min: usize,
        /// Who failed and why.
        failures: String,
    },
    /// Updates could not be combined.
    #[error("aggregation: {0}")]
    Aggregate(String),
    /// The coordinator's own node failed (init or evaluation).
    #[error("coordinator node: {0}")]
    Node(#[from] NodeError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// World state failed.
    #[error(transparent)]
    World(#[from] WorldError),
    /// The blob store failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// No session has this id.
    #[error("no session {0} in world state")]
    Unknown(String),
}

/// What a session has done so far, stored at `sessions/<id>` after every round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    /// Always the wire schema version.
    pub schema: u32,
    /// The session id.
    pub id: String,
    /// Its config.
    pub config: SessionConfig,
    /// The worker package.
    pub module: ModuleUse,
    /// Rounds completed.
    pub completed_rounds: u32,
    /// The current global model.
    pub model: Digest,
    /// Nodes that contributed to at least one round.
    pub contributors: BTreeSet<String>,
    /// Reports of completed rounds.
    pub reports: Vec<RoundReport>,
}

/// What a finished session gives back.
#[derive(Clone, Debug)]
pub struct SessionResult {
    /// The session id.
    pub session: String,
    /// The final global model (safetensors).
    pub model: Bytes,
    /// Its digest.
    pub model_digest: Digest,
    /// One report per round.
    pub reports: Vec<RoundReport>,
    /// Where the model came from.
    pub lineage: Lineage,
    /// Evaluation of the final model on the coordinator's held-out data.
    pub final_metrics: Option<WorkerMetrics>,
}

/// Watches a session's progress.
pub trait Observer: Send + Sync {
    /// The session resolved its module and found its nodes (`done` rounds already
    /// completed when it resumes).
    fn started(&self, _session: &str, _module: &PackageRecord, _eligible: &[NodeRecord], _rounds: u32, _done: u32) {}
    /// A round sent its tasks.
    fn round_started(&self, _round: u32, _selected: &[String]) {}
    /// A round finished.
    fn round_finished(&self, _report: &RoundReport) {}
}

/// Observes nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// A fresh session id: `s-` and 12 hex digits.
pub fn new_session_id() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let seed = format!("{t}-{}-{:?}", std::process::id(), std::thread::current().id());
    format!("s-{}", &Digest::of(seed.as_bytes()).hex()[..12])
}

/// Errors worth retrying: the backend may come back (a restarting server, a lost
/// connection); bad names and oversized values will not.
trait Transient {
    fn transient(&self) -> bool;
}
impl Transient for BusError {
    fn transient(&self) -> bool {
        matches!(self, BusError::Backend(_))
    }
}
impl Transient for WorldError {
    fn transient(&self) -> bool {
        matches!(self, WorldError::Backend(_))
    }
}
impl Transient for BlobError {
    fn transient(&self) -> bool {
        matches!(self, BlobError::Backend(_) | BlobError::Io { .. })
    }
}

/// The world key of a session's state.
pub fn state_key(id: &str) -> String {
    format!("sessions/{id}")
}

/// Runs sessions.
pub struct Coordinator {
    /// Signs tasks for nodes that have keys, and checks their replies.
    identity: Option<Arc<KeyPair>>,
    /// Unique to this coordinator instance: tasks it sends carry it (see
    /// [`TaskMessage::dispatch`]).
    dispatch: String,
    backend: Backend,
    source: Arc<dyn PackageSource>,
    local: Option<Arc<Node>>,
    threads: usize,
    retry_for: Duration,
}

/// What a round's wait collected.
struct Replies {
    /// Replies by node.
    replies: BTreeMap<String, TaskReply>,
    /// Nodes that left while the round waited for them.
    gone: BTreeSet<String>,
}

struct Update {
    node: String,
    tensors: Tensors,
    metrics: WorkerMetrics,
    seconds: f64,
}

impl Coordinator {
    /// A coordinator over a backend and a package source. `local` is the coordinator's
    /// own node: it creates the initial model and evaluates each global model on its
    /// held-out data.
    pub fn new(backend: Backend, source: Arc<dyn PackageSource>, local: Option<Arc<Node>>) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let dispatch = new_session_id().replacen("s-", "d-", 1);
        Coordinator { identity: None, dispatch, backend, source, local, threads, retry_for: Duration::from_secs(60) }
    }

    /// Signs tasks with `key` (for nodes that announce a key) and accepts from such nodes
    /// only replies they signed for it.
    pub fn with_identity(mut self, key: Arc<KeyPair>) -> Self {
        self.identity = Some(key);
        self
    }

    /// How long backend failures are retried before the session gives up (default 60 s).
    pub fn with_retry_window(mut self, window: Duration) -> Self {
        self.retry_for = window;
        self
    }

    async fn retry<T, E, F, Fut>(&self, what: &str, mut f: F) -> Result<T, E>
    where
        E: Transient + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let deadline = Instant::now() + self.retry_for;
        let mut backoff = Duration::from_millis(100);
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.transient() && Instant::now() < deadline => {
                    tracing::warn!("{what}: {e}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs a new session to the end. An id that already has a session is refused (use
    /// [`Coordinator::resume`]).
    pub async fn run(
        &self,
        id: &str,
        cfg: &SessionConfig,
        observer: &dyn Observer,
    ) -> Result<SessionResult, SessionError> {
        check_ident("session id", id).map_err(|e| SessionError::Config(e.to_string()))?;
        let module_ref = cfg.validate()?;
        if self.state(id).await?.is_some() {
            return Err(SessionError::Config(format!("session {id} exists already; resume it or pick another id")));
        }
        let record = self.source.resolve(&module_ref).await?;
        let module_use = ModuleUse {
            module: format!("{}@{}", record.name, record.version),
            digest: record.digest,
            role: "worker".into(),
        };
        let eligible = self.eligible(cfg, &record).await?;
        if eligible.len() < cfg.min_participants {
            return Err(SessionError::Participants(format!(
                "{} node(s) hold dataset {:?} and run {} modules; the session needs at least {}",
                eligible.len(),
                cfg.dataset,
                record.runtime,
                cfg.min_participants
            )));
        }
        observer.started(id, &record, &eligible, cfg.rounds, 0);
        let model = self.initial_model(id, cfg, &record, &eligible).await?;
        let model = self.retry("storing the initial model", || self.backend.blobs.put(model.clone())).await?;
        let state = SessionState {
            schema: SCHEMA_VERSION,
            id: id.to_owned(),
            config: cfg.clone(),
            module: module_use,
            completed_rounds: 0,
            model,
            contributors: BTreeSet::new(),
            reports: Vec::new(),
        };
        self.save(&state).await?;
        self.drive(state, &record, observer).await
    }

    /// Continues a session from its last completed round (after its coordinator died).
    /// A finished session gives its result again without running anything.
    pub async fn resume(&self, id: &str, observer: &dyn Observer) -> Result<SessionResult, SessionError> {
        check_ident("session id", id).map_err(|e| SessionError::Config(e.to_string()))?;
        let state = self.state(id).await?.ok_or_else(|| SessionError::Unknown(id.to_owned()))?;
        let module_ref: PackageRef =
            state.module.module.parse().map_err(|e| SessionError::Config(format!("stored module reference: {e}")))?;
        let record = self.source.resolve(&module_ref).await?;
        if record.digest != state.module.digest {
            return Err(SessionError::Config(format!(
                "{} is now {}, but the session ran {}",
                state.module.module, record.digest, state.module.digest
            )));
        }
        let eligible = self.eligible(&state.config, &record).await?;
        observer.started(id, &record, &eligible, state.config.rounds, state.completed_rounds);
        tracing::info!(session = id, done = state.completed_rounds, "resuming");
        self.drive(state, &record, observer).await
    }

    async fn drive(
        &self,
        mut state: SessionState,
        record: &PackageRecord,
        observer: &dyn Observer,
    ) -> Result<SessionResult, SessionError> {
        let cfg = state.config.clone();
        for round in state.completed_rounds + 1..=cfg.rounds {
            let report = self.round(&state, record, round, observer).await?;
            state.completed_rounds = round;
            state.model = report.model;
            state.contributors.extend(report.contributed.iter().cloned());
            state.reports.push(report.clone());
            self.save(&state).await?;
            observer.round_finished(&report);
        }
        let model = self
            .retry("reading the final model", || self.backend.blobs.get(&state.model))
            .await?
            .ok_or_else(|| SessionError::Aggregate("the final model vanished from the blob store".into()))?;
        let final_metrics = state.reports.last().and_then(|r| {
            Some(WorkerMetrics { num_examples: r.eval_examples?, loss: r.eval_loss?, accuracy: r.eval_accuracy })
        });
        let lineage = Lineage {
            session: state.id.clone(),
            strategy: cfg.strategy.clone(),
            modules: vec![state.module.clone()],
            nodes: state.contributors.iter().cloned().collect(),
            rounds: state.completed_rounds,
            metrics: state.reports.clone(),
        };
        Ok(SessionResult {
            session: state.id,
            model_digest: state.model,
            model,
            reports: state.reports,
            lineage,
            final_metrics,
        })
    }

    async fn save(&self, state: &SessionState) -> Result<(), SessionError> {
        let bytes = Bytes::from(serde_json::to_vec(state).map_err(|e| SessionError::Aggregate(e.to_string()))?);
        let key = state_key(&state.id);
        self.retry("saving the session state", || self.backend.world.put(&key, bytes.clone())).await?;
        Ok(())
    }

    /// Reads a session's stored state.
    pub async fn state(&self, id: &str) -> Result<Option<SessionState>, SessionError> {
        let key = state_key(id);
        match self.retry("reading the session state", || self.backend.world.get(&key)).await? {
            None => Ok(None),
            Some(e) => serde_json::from_slice(&e.value)
                .map(Some)
                .map_err(|err| SessionError::Config(format!("stored session state: {err}"))),
        }
    }

    async fn eligible(&self, cfg: &SessionConfig, record: &PackageRecord) -> Result<Vec<NodeRecord>, SessionError> {
        let nodes = self.retry("listing nodes", || list_nodes(self.backend.members.as_ref())).await?;
        let local = self.local.as_ref().map(|n| n.id().to_owned());
        Ok(nodes
            .into_iter()
            .filter(|n| Some(&n.id) != local.as_ref())
            .filter(|n| n.datasets.contains(&cfg.dataset) && n.runtimes.contains(&record.runtime))
            .collect())
    }

    fn worker_config(cfg: &SessionConfig, mode: &str, seed: u64) -> Value {
        let mut c = cfg.config.clone();
        deep_merge(&mut c, &json!({"mode": mode, "seed": seed, "dataset": cfg.dataset}));
        c
    }

    async fn initial_model(
        &self,
        id: &str,
        cfg: &SessionConfig,
        record: &PackageRecord,
        eligible: &[NodeRecord],
    ) -> Result<Bytes, SessionError> {
        let config = Self::worker_config(cfg, "init", cfg.seed);
        if let Some(local) = &self.local {
            let out = local.run(&record.digest, &config, Vec::new(), id, &format!("{id}.init")).await?;
            return out
                .into_iter()
                .find(|(n, _)| n == "model")
                .map(|(_, b)| b)
                .ok_or_else(|| SessionError::Aggregate("the worker's init gave no `model` output".into()));
        }
        // No local node: ask the first eligible node.
        let first = vec![eligible[0].id.clone()];
        let timeout = Duration::from_secs_f64(cfg.round_timeout_secs);
        let replies = self.dispatch(id, 0, &first, record, |_| config.clone(), &[], timeout).await?;
        for r in replies.replies.into_values() {
            if let TaskOutcome::Ok { outputs, .. } = r.outcome
                && let Some(m) = outputs.iter().find(|o| o.name == "model")
                && let Some(b) = self.retry("reading the initial model", || self.backend.blobs.get(&m.digest)).await?
            {
                return Ok(b);
            }
        }
        Err(SessionError::Aggregate("no node produced an initial model".into()))
    }

    /// Sends one task per node and collects replies until all answered or `timeout`.
    /// Replies are matched by task id: duplicates, strays from other rounds and malformed
    /// messages are logged and dropped.
    #[allow(clippy::too_many_arguments)]
    async fn dispatch(
        &self,
        id: &str,
        round: u32,
        nodes: &[String],
        record: &PackageRecord,
        config_for: impl Fn(usize) -> Value,
        inputs: &[BlobRef],
        timeout: Duration,
    ) -> Result<Replies, SessionError> {
        let reply_to = reply_queue(id);
        let mut pending: BTreeMap<String, String> = BTreeMap::new();
        // The keys nodes announced: tasks are signed for them, replies checked against them.
        let node_keys: BTreeMap<String, PublicKey> = match &self.identity {
            None => BTreeMap::new(),
            Some(_) => self
                .retry("listing nodes", || list_nodes(self.backend.members.as_ref()))
                .await?
                .into_iter()
                .filter_map(|n| Some((n.id.clone(), n.key.as_deref()?.parse().ok()?)))
                .collect(),
        };
        let reply_verifier = self
            .identity
            .as_ref()
            .map(|k| Verifier::new(k.public().clone()).with_window_ms(3_600_000).without_replay_check());
        for (i, node) in nodes.iter().enumerate() {
            let task_id = format!("{id}.r{round}.{node}");
            let mut task = TaskMessage {
                schema: SCHEMA_VERSION,
                task_id: task_id.clone(),
                session: id.to_owned(),
                round,
                module: record.digest,
                config: config_for(i),
                inputs: inputs.to_vec(),
                reply_to: reply_to.clone(),
                dispatch: self.dispatch.clone(),
                auth: None,
            };
            let queue = task_queue(node);
            if let (Some(key), Some(node_key)) = (&self.identity, node_keys.get(node)) {
                messages::sign_task(&mut task, key, node_key, &queue, now_ms());
            }
            let bytes = Bytes::from(wire::encode(&task));
            let msg_id = format!("{task_id}.{}", self.dispatch);
            self.retry("sending a task", || self.backend.bus.put_once(&queue, &msg_id, bytes.clone())).await?;
            pending.insert(task_id, node.clone());
        }
        let deadline = Instant::now() + timeout;
        let mut replies = BTreeMap::new();
        let mut gone = BTreeSet::new();
        // A node whose announcement lapses (killed, disconnected) is not waited for.
        let check_every = (self.backend.members.ttl() / 2).max(Duration::from_millis(200));
        let mut last_check = Instant::now();
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if last_check.elapsed() >= check_every {
                last_check = Instant::now();
                if let Ok(nodes) = list_nodes(self.backend.members.as_ref()).await {
                    let alive: BTreeSet<String> = nodes.into_iter().map(|n| n.id).collect();
                    pending.retain(|task, node| {
                        let keep = alive.contains(node);
                        if !keep {
                            tracing::warn!(%task, %node, "node left during the round");
                            gone.insert(node.clone());
                        }
                        keep
                    });
                    if pending.is_empty() {
                        break;
                    }
                }
            }
            let d = match self.backend.bus.get(&reply_to, left.min(check_every)).await {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("waiting for replies: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200).min(left)).await;
                    continue;
                }
            };
            let decoded = wire::decode::<TaskReply>(&d.payload).map_err(|e| e.to_string()).and_then(|r| {
                // A node that announced a key must sign its replies for this coordinator.
                match (node_keys.get(&r.node), &reply_verifier) {
                    (Some(expected), Some(v)) => match messages::verify_reply(&r, v, &reply_to, now_ms()) {
                        Ok(Some(signer)) if &signer == expected => Ok(r),
                        Ok(Some(signer)) => Err(format!("reply for {} signed by {signer}, not by the node", r.task_id)),
                        Ok(None) => Err(format!("unsigned reply for {} from a node with a key", r.task_id)),
                        Err(e) => Err(format!("reply for {}: {e}", r.task_id)),
                    },
                    _ => Ok(r),
                }
            });
            match decoded {
                Ok(r) if r.session == id && r.round == round => match pending.remove(&r.task_id) {
                    Some(node) if node == r.node => {
                        replies.insert(node, r);
                    }
                    Some(node) => {
                        tracing::warn!(task = %r.task_id, "reply claims node {} but the task went to {node}; ignored", r.node);
                        pending.insert(r.task_id.clone(), node);
                    }
                    None => tracing::info!(task = %r.task_id, "duplicate or unexpected reply ignored"),
                },
                Ok(r) => {
                    tracing::info!(task = %r.task_id, session = %r.session, "reply for another round or session ignored")
                }
                Err(e) => tracing::warn!("refused a message on {reply_to}: {e}"),
            }
            if let Err(e) = d.ack().await {
                tracing::debug!("ack of a reply failed: {e}");
            }
        }
        Ok(Replies { replies, gone })
    }

    async fn collect(&self, reply: &TaskReply) -> Result<Update, String> {
        let (outputs, seconds) = match &reply.outcome {
            TaskOutcome::Ok { outputs, seconds } => (outputs, *seconds),
            TaskOutcome::Failed { error } => return Err(error.clone()),
        };
        let get = |name: &str| outputs.iter().find(|o| o.name == name).map(|o| o.digest);
        let model = get("model").ok_or("no `model` output")?;
        let metrics = get("metrics").ok_or("no `metrics` output")?;
        let model = self
            .retry("reading an update", || self.backend.blobs.get(&model))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the `model` blob is missing")?;
        let metrics = self
            .retry("reading metrics", || self.backend.blobs.get(&metrics))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the `metrics` blob is missing")?;
        let tensors = Tensors::decode(&model, TensorLimits::default()).map_err(|e| e.to_string())?;
        let metrics: WorkerMetrics = serde_json::from_slice(&metrics).map_err(|e| format!("metrics: {e}"))?;
        if metrics.num_examples == 0 {
            return Err("the update is based on zero examples".into());
        }
        Ok(Update { node: reply.node.clone(), tensors, metrics, seconds })
    }

    async fn round(
        &self,
        state: &SessionState,
        record: &PackageRecord,
        round: u32,
        observer: &dyn Observer,
    ) -> Result<RoundReport, SessionError> {
        let cfg = &state.config;
        let id = state.id.as_str();
        let started = Instant::now();
        // Nodes may come and go between rounds.
        let available: Vec<String> = self.eligible(cfg, record).await?.into_iter().map(|n| n.id).collect();
        let selected = select_participants(
            &available,
            cfg.participant_ratio,
            cfg.min_participants,
            cfg.seed ^ u64::from(round).wrapping_mul(0x9E37_79B9),
        )
        .map_err(|e| SessionError::Participants(format!("round {round}: {e}")))?;
        observer.round_started(round, &selected);

        let global = self
            .retry("reading the global model", || self.backend.blobs.get(&state.model))
            .await?
            .ok_or_else(|| SessionError::Aggregate("the global model is missing".into()))?;
        let global_ref = BlobRef { name: "model".into(), digest: state.model, size: global.len() as u64 };
        let seed_base = cfg.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(round) * 1009);
        let replies = self
            .dispatch(
                id,
                round,
                &selected,
                record,
                |i| Self::worker_config(cfg, "train", seed_base + i as u64),
                std::slice::from_ref(&global_ref),
                Duration::from_secs_f64(cfg.round_timeout_secs),
            )
            .await?;

        let mut updates = Vec::new();
        let mut failures = Vec::new();
        for node in &selected {
            match replies.replies.get(node) {
                None if replies.gone.contains(node) => {
                    failures.push(Failure { node: node.clone(), error: "the node left (its heartbeat stopped)".into() })
                }
                None => failures.push(Failure {
                    node: node.clone(),
                    error: format!("no reply within {}s", cfg.round_timeout_secs),
                }),
                Some(r) => match self.collect(r).await {
                    Ok(u) => updates.push(u),
                    Err(error) => failures.push(Failure { node: node.clone(), error }),
                },
            }
        }
        let base =
            Tensors::decode(&global, TensorLimits::default()).map_err(|e| SessionError::Aggregate(e.to_string()))?;
        let mut usable = Vec::new();
        for u in updates {
            match base.check_same_layout(&u.tensors) {
                Ok(()) => usable.push(u),
                Err(e) => failures.push(Failure { node: u.node.clone(), error: format!("update refused: {e}") }),
            }
        }
        if usable.len() < cfg.min_participants {
            return Err(SessionError::RoundFailed {
                round,
                got: usable.len(),
                min: cfg.min_participants,
                failures: failures.iter().map(|f| format!("{}: {}", f.node, f.error)).collect::<Vec<_>>().join("; "),
            });
        }
        let weighted: Vec<(&Tensors, u64)> = usable.iter().map(|u| (&u.tensors, u.metrics.num_examples)).collect();
        let aggregate = fedavg(&weighted, self.threads).map_err(|e| SessionError::Aggregate(e.to_string()))?;
        let examples: u64 = usable.iter().map(|u| u.metrics.num_examples).sum();
        let train_loss =
            usable.iter().map(|u| u.metrics.loss * u.metrics.num_examples as f64).sum::<f64>() / examples as f64;
        let model_bytes = Bytes::from(aggregate.encode());
        let model = self.retry("storing the global model", || self.backend.blobs.put(model_bytes.clone())).await?;

        let compute_seconds = usable.iter().map(|u| u.seconds).fold(0.0, f64::max);
        let eval_started = Instant::now();
        let metrics = self.evaluate(id, cfg, record, model_bytes, round).await?;
        let eval_seconds = eval_started.elapsed().as_secs_f64();
        Ok(RoundReport {
            round,
            selected,
            contributed: usable.iter().map(|u| u.node.clone()).collect(),
            failures,
            examples,
            train_loss,
            eval_loss: metrics.as_ref().map(|m| m.loss),
            eval_accuracy: metrics.as_ref().and_then(|m| m.accuracy),
            eval_examples: metrics.as_ref().map(|m| m.num_examples),
            model,
            seconds: started.elapsed().as_secs_f64(),
            compute_seconds,
            eval_seconds,
        })
    }

    async fn evaluate(
        &self,
        id: &str,
        cfg: &SessionConfig,
        record: &PackageRecord,
        model: Bytes,
        round: u32,
    ) -> Result<Option<WorkerMetrics>, SessionError> {
        let (Some(local), Some(dataset)) = (&self.local, &cfg.eval_dataset) else {
            return Ok(None);
        };
        let mut config = Self::worker_config(cfg, "evaluate", cfg.seed);
        deep_merge(&mut config, &json!({"dataset": dataset}));
        let out = local
            .run(&record.digest, &config, vec![("model".into(), model)], id, &format!("{id}.r{round}.eval"))
            .await?;
        let metrics = out
            .into_iter()
            .find(|(n, _)| n == "metrics")
            .ok_or_else(|| SessionError::Aggregate("evaluation gave no `metrics` output".into()))?;
        serde_json::from_slice(&metrics.1)
            .map(Some)
            .map_err(|e| SessionError::Aggregate(format!("evaluation metrics: {e}")))
    }
}

/// The queue a session's replies come back on.
pub fn reply_queue(id: &str) -> String {
    format!("tessera.session.{id}.replies")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let ok = SessionConfig::new("fl.softmax.worker@0.1.0");
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.rounds = 0;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.participant_ratio = 0.0;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.strategy = "magic".into();
        assert!(c.validate().unwrap_err().to_string().contains("magic"));
        let mut c = ok.clone();
        c.module = "Not A Module".into();
        assert!(c.validate().is_err());
        let mut c = ok;
        c.round_timeout_secs = f64::NAN;
        assert!(c.validate().is_err());
    }

    #[test]
    fn swarm_files() {
        let c = SessionConfig::from_yaml(
            "module: fl.softmax.worker@0.1.0\nrounds: 3\nmin_participants: 2\nparticipant_ratio: 0.5\nround_timeout_secs: 30\nconfig:\n  lr: 0.5\npublish_as: digits.softmax\n",
        )
        .unwrap();
        assert_eq!(c.rounds, 3);
        assert_eq!(c.config["lr"], 0.5);
        assert_eq!(c.publish_as.as_deref(), Some("digits.softmax"));
        for (bad, word) in [
            ("module: x\nrounds: many\n", "line 2"),
            ("module: x\nround: 3\n", "round"),
            ("rounds: 3\n", "module"),
            ("module: x\nmodule: y\n", "duplicate"),
            ("module: x\npublish_as: Not A Name\n", "publish_as"),
            ("module: x\nparticipant_ratio: 2\n", "participant_ratio"),
            ("[1, 2", ""),
        ] {
            let e = SessionConfig::from_yaml(bad).unwrap_err().to_string();
            assert!(e.to_lowercase().contains(word), "{bad:?}: {e}");
        }
    }

    #[test]
    fn session_ids_are_idents() {
        let a = new_session_id();
        assert!(check_ident("session", &a).is_ok());
        assert_ne!(a, new_session_id());
    }
}
