//! Federated sessions: configuration, the round loop, and what a session leaves behind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tessera_core::config::deep_merge;
use tessera_core::name::check_ident;
use tessera_core::privacy;
use tessera_core::registry::PackageRecord;
use tessera_core::strategy::{self, FitFailure, FitResult, Participation, Strategy, StrategyError};
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
    /// Fewest eligible nodes a round needs before it starts (default: `min_participants`).
    #[serde(default)]
    pub min_available_nodes: Option<usize>,
    /// Fraction of eligible nodes asked to evaluate each new model on their own data
    /// (federated evaluation); 0 (the default) evaluates only at the coordinator.
    #[serde(default)]
    pub fraction_evaluate: f64,
    /// Fewest nodes asked to evaluate when federated evaluation is on.
    #[serde(default = "default_min_evaluate")]
    pub min_evaluate: usize,
    /// Whether a round with failed or missing participants is aggregated at all.
    #[serde(default = "default_true")]
    pub accept_failures: bool,
    /// Largest share of a round's participants that may fail for it to be aggregated.
    #[serde(default = "default_max_failure_ratio")]
    pub max_failure_ratio: f64,
    /// Aggregation strategy: a name (`fedavg`, `fedavgm`, `fedprox`, `fedadagrad`, `fedadam`,
    /// `fedyogi`, `fedmedian`, `fedtrimmedavg`, `krum`, `bulyan`), or a mapping with `name`
    /// and the strategy's parameters (`{name: fedadam, eta: 0.01}`).
    #[serde(default)]
    pub strategy: StrategySpec,
    /// Hierarchical aggregation: region aggregators (nodes running `module`, the
    /// `fedavg-partial` builtin) sum their region's updates, and the coordinator combines
    /// their partial sums, so it never downloads a region's individual updates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hierarchy: Option<Hierarchy>,
    /// Secure aggregation: participants mask their updates so the coordinator learns only
    /// their sum (FedAvg), even when some drop out mid-round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecAggSettings>,
    /// Simulation: each eligible node hosts this many participants (`<node>.c<j>`), each
    /// training on its share of the node's dataset (rows `i % clients_per_node == j`; the
    /// worker gets `partition` and `partitions` in its config). Strategies sample from all
    /// of them, so a few nodes simulate a thousand participants per round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_per_node: Option<usize>,
    /// Differential privacy: updates clipped to an L2 norm and Gaussian noise added to the
    /// aggregate, with the privacy spent reported every round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differential_privacy: Option<DpConfig>,
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
    /// Worker packages for some nodes instead of `module` (`node-id: name@version`): a
    /// Python worker and WebAssembly workers in one session. They must speak the same
    /// worker protocol and give models of the same layout.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_modules: BTreeMap<String, String>,
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
fn default_min_evaluate() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_max_failure_ratio() -> f64 {
    1.0
}

/// Differential privacy for a session (DP-FedAvg with fixed clipping, as Flower's
/// `DifferentialPrivacy{Server,Client}SideFixedClipping`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// z: the noise's standard deviation is `z · clipping_norm / participants` per coordinate.
    pub noise_multiplier: f64,
    /// C: the largest L2 norm of one participant's update (its difference to the global
    /// model).
    pub clipping_norm: f64,
    /// Who clips: `server` (the coordinator clips what arrives) or `client` (each node
    /// clips its own update before it leaves; the coordinator refuses an unclipped one).
    #[serde(default)]
    pub side: DpSide,
    /// δ of the (ε, δ) reported.
    #[serde(default = "default_delta")]
    pub delta: f64,
}

/// Where updates are clipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpSide {
    /// At the coordinator.
    #[default]
    Server,
    /// On each node, before the update leaves it.
    Client,
}

fn default_delta() -> f64 {
    1e-5
}

/// Regions and their aggregators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hierarchy {
    /// The aggregator package (`runtime: builtin`, `entry: fedavg-partial`).
    pub module: String,
    /// Regions by name.
    pub regions: BTreeMap<String, Region>,
}

/// One region: its aggregator node and its participant nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// The node that sums the region's updates.
    pub aggregator: String,
    /// The region's participant nodes (participants elsewhere are summed by the
    /// coordinator itself).
    pub nodes: Vec<String>,
}

/// Secure aggregation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggSettings {
    /// Weighted update values are clipped to `[-clip, clip]` before quantization.
    #[serde(default = "default_secagg_clip")]
    pub clip: f32,
    /// Quantization bits per value.
    #[serde(default = "default_scale_bits")]
    pub scale_bits: u32,
    /// Survivors needed to finish a round (default: a strict majority of the participants).
    #[serde(default)]
    pub threshold: Option<u16>,
    /// Example counts are divided by this before weighting, to keep values in range.
    #[serde(default = "default_weight_scale")]
    pub weight_scale: f64,
}

fn default_secagg_clip() -> f32 {
    8.0
}
fn default_scale_bits() -> u32 {
    16
}
fn default_weight_scale() -> f64 {
    1000.0
}

/// A strategy and its parameters, written as a name or as `{name: ..., <params>}`.
#[derive(Clone, Debug, PartialEq)]
pub struct StrategySpec {
    /// The strategy's name.
    pub name: String,
    /// Its parameters (a mapping; empty for the defaults).
    pub params: serde_json::Map<String, Value>,
}

impl Default for StrategySpec {
    fn default() -> Self {
        StrategySpec { name: "fedavg".into(), params: serde_json::Map::new() }
    }
}

impl StrategySpec {
    /// A strategy with its default parameters.
    pub fn named(name: &str) -> Self {
        StrategySpec { name: name.into(), params: serde_json::Map::new() }
    }
}

impl Serialize for StrategySpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.params.is_empty() {
            return s.serialize_str(&self.name);
        }
        let mut m = self.params.clone();
        m.insert("name".into(), Value::String(self.name.clone()));
        m.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StrategySpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(name) => Ok(StrategySpec { name, params: serde_json::Map::new() }),
            Value::Object(mut m) => match m.remove("name") {
                Some(Value::String(name)) => Ok(StrategySpec { name, params: m }),
                _ => Err(D::Error::custom("a strategy mapping needs `name`")),
            },
            other => Err(D::Error::custom(format!("a strategy is a name or a mapping with `name`, not {other}"))),
        }
    }
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
        let cfg: SessionConfig =
            serde_saphyr::from_str_with_options(text, tessera_core::yaml::options()).map_err(|e| {
                let msg = tessera_core::yaml::message(&e);
                match tessera_core::yaml::location(&e) {
                    Some((line, column)) => SessionError::Config(format!("line {line}, column {column}: {msg}")),
                    None => SessionError::Config(msg),
                }
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Who takes part in rounds, as the strategy sees it.
    pub fn participation(&self) -> Participation {
        Participation {
            fraction_fit: self.participant_ratio,
            min_fit: self.min_participants,
            min_available: self.min_available_nodes.unwrap_or(self.min_participants),
            fraction_evaluate: self.fraction_evaluate,
            min_evaluate: self.min_evaluate,
            accept_failures: self.accept_failures,
            max_failure_ratio: self.max_failure_ratio,
        }
    }

    /// The session's strategy, fresh.
    pub fn build_strategy(&self) -> Result<Box<dyn Strategy>, StrategyError> {
        strategy::from_config(&self.strategy.name, &Value::Object(self.strategy.params.clone()), self.participation())
    }

    /// A session of `module` with the defaults.
    pub fn new(module: impl Into<String>) -> Self {
        SessionConfig {
            module: module.into(),
            rounds: default_rounds(),
            min_participants: default_min(),
            participant_ratio: default_ratio(),
            round_timeout_secs: default_timeout(),
            min_available_nodes: None,
            fraction_evaluate: 0.0,
            min_evaluate: default_min_evaluate(),
            accept_failures: true,
            max_failure_ratio: default_max_failure_ratio(),
            strategy: StrategySpec::default(),
            differential_privacy: None,
            clients_per_node: None,
            secure_aggregation: None,
            hierarchy: None,
            dataset: default_dataset(),
            eval_dataset: None,
            config: empty(),
            seed: 0,
            publish_as: None,
            node_modules: BTreeMap::new(),
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
        self.build_strategy().map_err(|e| SessionError::Config(format!("strategy: {e}")))?;
        if let Some(h) = &self.hierarchy {
            if !matches!(self.strategy.name.as_str(), "fedavg" | "fedprox") {
                return bad(format!(
                    "hierarchical aggregation sums updates: it works with fedavg or fedprox, not {}",
                    self.strategy.name
                ));
            }
            if self.secure_aggregation.is_some() || self.differential_privacy.is_some() {
                return bad(
                    "hierarchical aggregation cannot be combined with secure aggregation or differential privacy yet"
                        .into(),
                );
            }
            h.module.parse::<PackageRef>().map_err(|e| SessionError::Config(format!("hierarchy.module: {e}")))?;
            let mut seen = BTreeSet::new();
            let mut aggregators = BTreeSet::new();
            for (name, r) in &h.regions {
                check_ident("region name", name).map_err(|e| SessionError::Config(e.to_string()))?;
                check_ident("aggregator node", &r.aggregator).map_err(|e| SessionError::Config(e.to_string()))?;
                if !aggregators.insert(&r.aggregator) {
                    return bad(format!("node {} aggregates two regions", r.aggregator));
                }
                for n in &r.nodes {
                    if !seen.insert(n) {
                        return bad(format!("node {n} is in two regions"));
                    }
                }
            }
        }
        if let Some(sa) = &self.secure_aggregation {
            if !matches!(self.strategy.name.as_str(), "fedavg" | "fedprox") {
                return bad(format!(
                    "secure aggregation gives the sum only: it works with fedavg or fedprox, not {}",
                    self.strategy.name
                ));
            }
            if self.differential_privacy.is_some() {
                return bad("secure aggregation and differential privacy cannot be combined yet".into());
            }
            if !(sa.clip.is_finite() && sa.clip > 0.0 && (1..=31).contains(&sa.scale_bits)) {
                return bad("secure_aggregation: clip must be positive and scale_bits in 1..=31".into());
            }
            if !(sa.weight_scale.is_finite() && sa.weight_scale > 0.0) {
                return bad("secure_aggregation.weight_scale must be positive".into());
            }
        }
        if let Some(c) = self.clients_per_node
            && !(1..=100_000).contains(&c)
        {
            return bad(format!("clients_per_node {c} must be between 1 and 100000"));
        }
        if let Some(dp) = &self.differential_privacy {
            if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier > 0.0) {
                return bad(format!("differential_privacy.noise_multiplier {} must be positive", dp.noise_multiplier));
            }
            if !(dp.clipping_norm.is_finite() && dp.clipping_norm > 0.0 && dp.clipping_norm < f64::from(f32::MAX)) {
                return bad(format!("differential_privacy.clipping_norm {} must be positive", dp.clipping_norm));
            }
            if !(dp.delta > 0.0 && dp.delta < 1.0) {
                return bad(format!("differential_privacy.delta {} must be in (0, 1)", dp.delta));
            }
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
        for (node, m) in &self.node_modules {
            check_ident("node_modules node id", node).map_err(|e| SessionError::Config(e.to_string()))?;
            m.parse::<PackageRef>().map_err(|e| SessionError::Config(format!("node_modules.{node}: {e}")))?;
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
    /// The worker packages of nodes with their own (`node_modules`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_modules: BTreeMap<String, ModuleUse>,
    /// The strategy's server-side state after the last completed round (momentum,
    /// moments), in the blob store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_state: Option<Digest>,
    /// The datasets the coordinator's own node held (name -> file), so a resumed
    /// coordinator declares the same ones without being told.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub coordinator_datasets: BTreeMap<String, std::path::PathBuf>,
    /// When the state was last saved (milliseconds since the Unix epoch).
    #[serde(default)]
    pub updated_ms: u64,
}

impl SessionState {
    /// True once every round is done.
    pub fn finished(&self) -> bool {
        self.completed_rounds >= self.config.rounds
    }
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

/// The worker packages of a session: one for every node, and overrides for some.
#[derive(Clone, Debug)]
struct Workers {
    default: PackageRecord,
    nodes: BTreeMap<String, PackageRecord>,
}

impl Workers {
    fn for_node(&self, node: &str) -> &PackageRecord {
        self.nodes.get(node).unwrap_or(&self.default)
    }

    fn uses(&self) -> BTreeMap<String, ModuleUse> {
        self.nodes.iter().map(|(n, r)| (n.clone(), module_use(r))).collect()
    }
}

fn module_use(r: &PackageRecord) -> ModuleUse {
    ModuleUse { module: format!("{}@{}", r.name, r.version), digest: r.digest, role: "worker".into() }
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

/// An error's message said of `round`: prefixed with `round N: ` unless it already is
/// (strategies' errors name their round themselves).
fn in_round(round: u32, e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    let prefix = format!("round {round}: ");
    if text.starts_with(&prefix) { text } else { format!("{prefix}{text}") }
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
    /// Replies by participant.
    replies: BTreeMap<String, TaskReply>,
    /// Participants whose node left while the round waited for them.
    gone: BTreeSet<String>,
}

/// A participant: a node, or (simulating) one of a node's virtual clients `<node>.c<j>`.
fn participant_node(participant: &str) -> &str {
    participant.rsplit_once(".c").filter(|(_, j)| j.parse::<usize>().is_ok()).map_or(participant, |(n, _)| n)
}

/// The participants of a round drawn from `nodes`: the nodes, or their virtual clients.
fn participants_of(cfg: &SessionConfig, nodes: Vec<String>) -> Vec<String> {
    match cfg.clients_per_node {
        None => nodes,
        Some(k) => nodes.iter().flat_map(|n| (0..k).map(move |j| format!("{n}.c{j}"))).collect(),
    }
}

/// The worker config a participant adds: its share of the node's data when simulating.
fn partition_config(cfg: &SessionConfig, participant: &str) -> Value {
    match (cfg.clients_per_node, participant.rsplit_once(".c")) {
        (Some(k), Some((_, j))) => json!({"partition": j.parse::<usize>().unwrap_or(0), "partitions": k}),
        _ => json!({}),
    }
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
        self.check_local_datasets(cfg)?;
        if self.state(id).await?.is_some() {
            return Err(SessionError::Config(format!("session {id} exists already; resume it or pick another id")));
        }
        let record = self.source.resolve(&module_ref).await?;
        let module_use = module_use(&record);
        let mut nodes = BTreeMap::new();
        for (node, m) in &cfg.node_modules {
            let r: PackageRef = m.parse().map_err(|e| SessionError::Config(format!("node_modules.{node}: {e}")))?;
            nodes.insert(node.clone(), self.source.resolve(&r).await?);
        }
        let workers = Workers { default: record.clone(), nodes };
        let eligible = self.eligible(cfg, &workers).await?;
        let participants = eligible.len() * cfg.clients_per_node.unwrap_or(1);
        if participants < cfg.min_participants {
            return Err(SessionError::Participants(format!(
                "{} node(s) hold dataset {:?} and run {} modules; the session needs at least {}",
                eligible.len(),
                cfg.dataset,
                record.runtime,
                cfg.min_participants
            )));
        }
        observer.started(id, &record, &eligible, cfg.rounds, 0);
        let model = self.initial_model(id, cfg, &workers, &eligible).await?;
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
            node_modules: workers.uses(),
            strategy_state: None,
            coordinator_datasets: self.local.as_ref().map(|n| (*n.datasets()).clone()).unwrap_or_default(),
            updated_ms: 0,
        };
        self.save(&state).await?;
        self.drive(state, &workers, observer).await
    }

    /// Refuses a session whose evaluation dataset the coordinator's own node does not hold,
    /// before anything is announced or stored.
    pub fn check_local_datasets(&self, cfg: &SessionConfig) -> Result<(), SessionError> {
        let Some(eval) = &cfg.eval_dataset else { return Ok(()) };
        let held: Vec<String> = self.local.as_ref().map(|n| n.datasets().keys().cloned().collect()).unwrap_or_default();
        if held.iter().any(|d| d == eval) {
            return Ok(());
        }
        let has = if held.is_empty() { "none".to_owned() } else { held.join(", ") };
        Err(SessionError::Config(format!(
            "the session evaluates on dataset {eval:?}, which the coordinator does not hold (it has: {has}); \
             give it with --dataset {eval}=FILE"
        )))
    }

    /// Every session stored in world state, newest first.
    pub async fn sessions(&self) -> Result<Vec<SessionState>, SessionError> {
        let keys = self.retry("listing sessions", || self.backend.world.keys("sessions/")).await?;
        let mut out = Vec::new();
        for key in keys {
            let Some(id) = key.strip_prefix("sessions/") else { continue };
            if id.contains('/') {
                continue;
            }
            match self.state(id).await {
                Ok(Some(s)) => out.push(s),
                Ok(None) => {}
                Err(e) => tracing::warn!(session = id, "unreadable session state: {e}"),
            }
        }
        out.sort_by(|a, b| b.updated_ms.cmp(&a.updated_ms).then(a.id.cmp(&b.id)));
        Ok(out)
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
        let mut nodes = BTreeMap::new();
        for (node, used) in &state.node_modules {
            let r: PackageRef =
                used.module.parse().map_err(|e| SessionError::Config(format!("stored module reference: {e}")))?;
            let rec = self.source.resolve(&r).await?;
            if rec.digest != used.digest {
                return Err(SessionError::Config(format!(
                    "{} is now {}, but node {node} ran {}",
                    used.module, rec.digest, used.digest
                )));
            }
            nodes.insert(node.clone(), rec);
        }
        let workers = Workers { default: record.clone(), nodes };
        let eligible = self.eligible(&state.config, &workers).await?;
        observer.started(id, &record, &eligible, state.config.rounds, state.completed_rounds);
        tracing::info!(session = id, done = state.completed_rounds, "resuming");
        self.drive(state, &workers, observer).await
    }

    async fn drive(
        &self,
        mut state: SessionState,
        workers: &Workers,
        observer: &dyn Observer,
    ) -> Result<SessionResult, SessionError> {
        let cfg = state.config.clone();
        let mut strategy = cfg.build_strategy().map_err(|e| SessionError::Config(format!("strategy: {e}")))?;
        strategy.set_threads(self.threads);
        if let Some(d) = state.strategy_state {
            let bytes = self
                .retry("reading the strategy's state", || self.backend.blobs.get(&d))
                .await?
                .ok_or_else(|| SessionError::Aggregate("the strategy's saved state is missing".into()))?;
            strategy.restore(&bytes).map_err(|e| SessionError::Aggregate(format!("strategy state: {e}")))?;
        }
        // The privacy spent so far, replayed from the rounds done.
        let mut accountant = privacy::RdpAccountant::new();
        if let Some(dp) = &cfg.differential_privacy {
            for r in &state.reports {
                if let Some(q) = r.dp_sample_rate {
                    accountant.step(dp.noise_multiplier, q, 1).map_err(|e| SessionError::Aggregate(e.to_string()))?;
                }
            }
        }
        for round in state.completed_rounds + 1..=cfg.rounds {
            let report = self.round(&state, workers, strategy.as_mut(), &mut accountant, round, observer).await?;
            let saved = Bytes::from(strategy.state());
            state.strategy_state =
                Some(self.retry("saving the strategy's state", || self.backend.blobs.put(saved.clone())).await?);
            state.completed_rounds = round;
            state.model = report.model;
            state.contributors.extend(report.contributed.iter().map(|p| participant_node(p).to_owned()));
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
            strategy: cfg.strategy.name.clone(),
            modules: {
                let mut seen = BTreeSet::new();
                std::iter::once(&state.module)
                    .chain(state.node_modules.values())
                    .filter(|m| seen.insert(m.digest))
                    .cloned()
                    .collect()
            },
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
        let mut state = state.clone();
        state.updated_ms = tessera_identity::now_ms();
        let bytes = Bytes::from(serde_json::to_vec(&state).map_err(|e| SessionError::Aggregate(e.to_string()))?);
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

    async fn eligible(&self, cfg: &SessionConfig, workers: &Workers) -> Result<Vec<NodeRecord>, SessionError> {
        let nodes = self.retry("listing nodes", || list_nodes(self.backend.members.as_ref())).await?;
        let local = self.local.as_ref().map(|n| n.id().to_owned());
        Ok(nodes
            .into_iter()
            .filter(|n| Some(&n.id) != local.as_ref())
            .filter(|n| n.datasets.contains(&cfg.dataset) && n.runtimes.contains(&workers.for_node(&n.id).runtime))
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
        workers: &Workers,
        eligible: &[NodeRecord],
    ) -> Result<Bytes, SessionError> {
        let config = Self::worker_config(cfg, "init", cfg.seed);
        if let Some(local) = &self.local {
            let out = local.run(&workers.default.digest, &config, Vec::new(), id, &format!("{id}.init")).await?;
            return out
                .into_iter()
                .find(|(n, _)| n == "model")
                .map(|(_, b)| b)
                .ok_or_else(|| SessionError::Aggregate("the worker's init gave no `model` output".into()));
        }
        // No local node: ask the first eligible node.
        let first = vec![eligible[0].id.clone()];
        let timeout = Duration::from_secs_f64(cfg.round_timeout_secs);
        let replies =
            self.dispatch(id, 0, &first, "", workers, |_, _| config.clone(), |_, _| Vec::new(), timeout).await?;
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
        participants: &[String],
        attempt: &str,
        workers: &Workers,
        config_for: impl Fn(usize, &str) -> Value,
        inputs_for: impl Fn(usize, &str) -> Vec<BlobRef>,
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
        for (i, participant) in participants.iter().enumerate() {
            let node = participant_node(participant);
            let task_id = format!("{id}.r{round}{attempt}.{participant}");
            let mut task = TaskMessage {
                schema: SCHEMA_VERSION,
                task_id: task_id.clone(),
                session: id.to_owned(),
                round,
                module: workers.for_node(node).digest,
                config: config_for(i, participant),
                inputs: inputs_for(i, participant),
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
            pending.insert(task_id, participant.clone());
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
                    pending.retain(|task, participant| {
                        let node = participant_node(participant);
                        let keep = alive.contains(node);
                        if !keep {
                            tracing::warn!(%task, %node, "node left during the round");
                            gone.insert(participant.clone());
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
                    Some(participant) if participant_node(&participant) == r.node => {
                        replies.insert(participant, r);
                    }
                    Some(participant) => {
                        tracing::warn!(task = %r.task_id, "reply claims node {} but the task went to {participant}; ignored", r.node);
                        pending.insert(r.task_id.clone(), participant);
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

    async fn collect(&self, participant: &str, reply: &TaskReply) -> Result<Update, String> {
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
        Ok(Update { node: participant.to_owned(), tensors, metrics, seconds })
    }

    async fn round(
        &self,
        state: &SessionState,
        workers: &Workers,
        strategy: &mut dyn Strategy,
        accountant: &mut privacy::RdpAccountant,
        round: u32,
        observer: &dyn Observer,
    ) -> Result<RoundReport, SessionError> {
        let cfg = &state.config;
        let id = state.id.as_str();
        let started = Instant::now();
        // Nodes may come and go between rounds.
        let nodes: Vec<String> = self.eligible(cfg, workers).await?.into_iter().map(|n| n.id).collect();
        let available = participants_of(cfg, nodes);
        let plan = strategy
            .configure_fit(round, &available, cfg.seed ^ u64::from(round).wrapping_mul(0x9E37_79B9))
            .map_err(|e| SessionError::Participants(in_round(round, &e)))?;
        let selected = plan.participants;
        observer.round_started(round, &selected);

        let global = self
            .retry("reading the global model", || self.backend.blobs.get(&state.model))
            .await?
            .ok_or_else(|| SessionError::Aggregate("the global model is missing".into()))?;
        let global_ref = BlobRef { name: "model".into(), digest: state.model, size: global.len() as u64 };
        let seed_base = cfg.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(round) * 1009);
        if let Some(sa) = &cfg.secure_aggregation {
            let ctx = RoundCtx { state, workers, round, started, selected, available, global, global_ref, seed_base };
            return self.secure_round(ctx, sa, &plan.config).await;
        }
        let replies = self
            .dispatch(
                id,
                round,
                &selected,
                "",
                workers,
                |i, participant| {
                    let mut c = Self::worker_config(cfg, "train", seed_base + i as u64);
                    deep_merge(&mut c, &plan.config);
                    deep_merge(&mut c, &partition_config(cfg, participant));
                    if let Some(dp) = cfg.differential_privacy.as_ref().filter(|d| d.side == DpSide::Client) {
                        // The node clips the update before it leaves (see tessera-node).
                        deep_merge(&mut c, &json!({ "dp_clipping_norm": dp.clipping_norm }));
                    }
                    c
                },
                |_, _| vec![global_ref.clone()],
                Duration::from_secs_f64(cfg.round_timeout_secs),
            )
            .await?;
        if let Some(h) = &cfg.hierarchy {
            let ctx = RoundCtx { state, workers, round, started, selected, available, global, global_ref, seed_base };
            return self.hierarchical_round(ctx, h, replies).await;
        }

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
                Some(r) => match self.collect(node, r).await {
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
            return Err(too_few(round, usable.len(), cfg.min_participants, &failures));
        }
        let results: Vec<FitResult> = usable
            .iter()
            .map(|u| FitResult {
                node: u.node.clone(),
                update: u.tensors.clone(),
                num_examples: u.metrics.num_examples,
            })
            .collect();
        let failed: Vec<FitFailure> =
            failures.iter().map(|f| FitFailure { node: f.node.clone(), error: f.error.clone() }).collect();
        let mut aggregate = strategy
            .aggregate_fit(round, &base, &results, &failed)
            .map_err(|e| SessionError::Aggregate(in_round(round, &e)))?;
        let mut dp_epsilon = None;
        let mut dp_sample_rate = None;
        if let Some(dp) = &cfg.differential_privacy {
            let sigma = dp.noise_multiplier * dp.clipping_norm / results.len() as f64;
            let mut rng = privacy::BoxMuller::new(|| {
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).expect("the operating system's random source works");
                u64::from_le_bytes(b)
            });
            for t in aggregate.0.values_mut() {
                privacy::add_gaussian_noise(&mut t.data, sigma, &mut rng)
                    .map_err(|e| SessionError::Aggregate(in_round(round, &e)))?;
            }
            let q = (selected.len() as f64 / available.len().max(1) as f64).min(1.0);
            accountant.step(dp.noise_multiplier, q, 1).map_err(|e| SessionError::Aggregate(e.to_string()))?;
            dp_epsilon = Some(accountant.epsilon(dp.delta).map_err(|e| SessionError::Aggregate(e.to_string()))?.0);
            dp_sample_rate = Some(q);
        }
        drop(results);
        let examples: u64 = usable.iter().map(|u| u.metrics.num_examples).sum();
        let train_loss =
            usable.iter().map(|u| u.metrics.loss * u.metrics.num_examples as f64).sum::<f64>() / examples as f64;
        let done = Aggregated {
            contributed: usable.iter().map(|u| u.node.clone()).collect(),
            compute_seconds: usable.iter().map(|u| u.seconds).fold(0.0, f64::max),
            selected,
            failures,
            examples,
            train_loss,
            model: aggregate,
            dp_epsilon,
            dp_sample_rate,
        };
        let ctx =
            RoundCtx { state, workers, round, started, selected: Vec::new(), available, global, global_ref, seed_base };
        self.finish_round(&ctx, &*strategy, done).await
    }

    /// The end of every round: stores the new global model, evaluates it (at the
    /// coordinator and, when asked, on participants) and writes the report.
    async fn finish_round(
        &self,
        ctx: &RoundCtx<'_>,
        strategy: &dyn Strategy,
        done: Aggregated,
    ) -> Result<RoundReport, SessionError> {
        let cfg = &ctx.state.config;
        let id = ctx.state.id.as_str();
        let model_bytes = Bytes::from(done.model.encode());
        let model = self.retry("storing the global model", || self.backend.blobs.put(model_bytes.clone())).await?;
        let eval_started = Instant::now();
        let (metrics, fed) = tokio::try_join!(
            self.evaluate(id, cfg, &ctx.workers.default, model_bytes, ctx.round),
            self.evaluate_federated(
                id,
                cfg,
                ctx.workers,
                strategy,
                &ctx.available,
                ctx.round,
                &model,
                ctx.global_ref.size
            ),
        )?;
        Ok(RoundReport {
            round: ctx.round,
            selected: done.selected,
            contributed: done.contributed,
            failures: done.failures,
            examples: done.examples,
            train_loss: done.train_loss,
            eval_loss: metrics.as_ref().map(|m| m.loss),
            eval_accuracy: metrics.as_ref().and_then(|m| m.accuracy),
            eval_examples: metrics.as_ref().map(|m| m.num_examples),
            model,
            seconds: ctx.started.elapsed().as_secs_f64(),
            compute_seconds: done.compute_seconds,
            eval_seconds: eval_started.elapsed().as_secs_f64(),
            fed_eval_loss: fed.as_ref().map(|f| f.0),
            fed_eval_accuracy: fed.as_ref().and_then(|f| f.1),
            fed_evaluated: fed.map(|f| f.2).unwrap_or_default(),
            dp_epsilon: done.dp_epsilon,
            dp_sample_rate: done.dp_sample_rate,
        })
    }

    /// The aggregation of a round with region aggregators: each region's aggregator node
    /// gets its participants' update blobs (by digest) and answers their weighted sum; the
    /// coordinator reads only metrics, the partial sums, and the updates of participants in
    /// no region.
    async fn hierarchical_round(
        &self,
        ctx: RoundCtx<'_>,
        h: &Hierarchy,
        replies: Replies,
    ) -> Result<RoundReport, SessionError> {
        let RoundCtx { state, workers, round, started, selected, available, global, global_ref, .. } = ctx;
        let cfg = &state.config;
        let id = state.id.as_str();
        let base =
            Tensors::decode(&global, TensorLimits::default()).map_err(|e| SessionError::Aggregate(e.to_string()))?;
        let mut failures = Vec::new();
        // participant -> (update blob, examples, loss, seconds)
        let mut done: BTreeMap<String, (BlobRef, u64, f64, f64)> = BTreeMap::new();
        for p in &selected {
            let outcome = match replies.replies.get(p) {
                None => {
                    failures.push(Failure {
                        node: p.clone(),
                        error: format!("no reply within {}s", cfg.round_timeout_secs),
                    });
                    continue;
                }
                Some(r) => &r.outcome,
            };
            let (outputs, seconds) = match outcome {
                TaskOutcome::Ok { outputs, seconds } => (outputs, *seconds),
                TaskOutcome::Failed { error } => {
                    failures.push(Failure { node: p.clone(), error: error.clone() });
                    continue;
                }
            };
            let model = outputs.iter().find(|o| o.name == "model").cloned();
            let metrics = match outputs.iter().find(|o| o.name == "metrics") {
                Some(o) => self.backend.blobs.get(&o.digest).await?,
                None => None,
            };
            match (model, metrics.and_then(|b| serde_json::from_slice::<WorkerMetrics>(&b).ok())) {
                (Some(m), Some(w)) if w.num_examples > 0 => {
                    done.insert(p.clone(), (m, w.num_examples, w.loss, seconds));
                }
                _ => failures.push(Failure { node: p.clone(), error: "no usable `model` and `metrics`".into() }),
            }
        }
        if done.len() < cfg.min_participants {
            return Err(too_few(round, done.len(), cfg.min_participants, &failures));
        }
        // Regions with updates this round, and the participants in none.
        let mut regions: Vec<(&Region, Vec<String>)> = Vec::new();
        let mut direct = Vec::new();
        for p in done.keys() {
            match h.regions.values().find(|r| r.nodes.iter().any(|n| n == participant_node(p))) {
                Some(r) => match regions.iter_mut().find(|(x, _)| std::ptr::eq(*x, r)) {
                    Some((_, v)) => v.push(p.clone()),
                    None => regions.push((r, vec![p.clone()])),
                },
                None => direct.push(p.clone()),
            }
        }
        let module: PackageRef =
            h.module.parse().map_err(|e| SessionError::Config(format!("hierarchy.module: {e}")))?;
        let agg_record = self.source.resolve(&module).await?;
        let agg_workers = Workers { default: agg_record, nodes: BTreeMap::new() };
        let aggregators: Vec<String> = regions.iter().map(|(r, _)| r.aggregator.clone()).collect();
        let partials = self
            .dispatch(
                id,
                AGG_ROUND_BASE + round,
                &aggregators,
                "",
                &agg_workers,
                |i, _| {
                    let weights: serde_json::Map<String, Value> =
                        regions[i].1.iter().enumerate().map(|(k, p)| (format!("u{k}"), json!(done[p].1))).collect();
                    json!({"weights": weights})
                },
                |i, _| {
                    regions[i]
                        .1
                        .iter()
                        .enumerate()
                        .map(|(k, p)| BlobRef { name: format!("u{k}"), ..done[p].0.clone() })
                        .collect()
                },
                Duration::from_secs_f64(cfg.round_timeout_secs),
            )
            .await?;
        let mut sum =
            Tensors(base.0.iter().map(|(k, t)| (k.clone(), tessera_core::tensor::Tensor::zeros(&t.shape))).collect());
        let mut weight = 0.0f64;
        let mut contributed = Vec::new();
        let add = |sum: &mut Tensors, t: &Tensors, w: f32| -> Result<(), SessionError> {
            base.check_same_layout(t).map_err(|e| SessionError::Aggregate(e.to_string()))?;
            for (k, acc) in sum.0.iter_mut() {
                for (a, v) in acc.data.iter_mut().zip(&t.0[k].data) {
                    *a += w * v;
                }
            }
            Ok(())
        };
        for (i, (region, members)) in regions.iter().enumerate() {
            let reply = partials.replies.get(&aggregators[i]).map(|r| &r.outcome);
            let Some(TaskOutcome::Ok { outputs, .. }) = reply else {
                for p in members {
                    failures.push(Failure {
                        node: p.clone(),
                        error: format!("its region's aggregator {} did not answer", region.aggregator),
                    });
                }
                continue;
            };
            let get = |name: &str| outputs.iter().find(|o| o.name == name).map(|o| o.digest);
            let (Some(pd), Some(wd)) = (get("partial"), get("weight")) else {
                return Err(SessionError::Aggregate(format!("aggregator {} gave no partial sum", region.aggregator)));
            };
            let partial = self
                .backend
                .blobs
                .get(&pd)
                .await?
                .ok_or_else(|| SessionError::Aggregate("a partial sum is missing".into()))?;
            let w: f64 = self
                .backend
                .blobs
                .get(&wd)
                .await?
                .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.trim().parse().ok()))
                .ok_or_else(|| SessionError::Aggregate("a partial weight is missing".into()))?;
            let t = Tensors::decode(&partial, TensorLimits::default())
                .map_err(|e| SessionError::Aggregate(e.to_string()))?;
            add(&mut sum, &t, 1.0)?;
            weight += w;
            contributed.extend(members.iter().cloned());
        }
        for p in &direct {
            let bytes = self
                .backend
                .blobs
                .get(&done[p].0.digest)
                .await?
                .ok_or_else(|| SessionError::Aggregate("an update is missing".into()))?;
            let t =
                Tensors::decode(&bytes, TensorLimits::default()).map_err(|e| SessionError::Aggregate(e.to_string()))?;
            add(&mut sum, &t, done[p].1 as f32)?;
            weight += done[p].1 as f64;
            contributed.push(p.clone());
        }
        if contributed.len() < cfg.min_participants || weight <= 0.0 {
            return Err(too_few(round, contributed.len(), cfg.min_participants, &failures));
        }
        for t in sum.0.values_mut() {
            for v in t.data.iter_mut() {
                *v = (f64::from(*v) / weight) as f32;
            }
        }
        contributed.sort();
        let examples: u64 = contributed.iter().map(|p| done[p].1).sum();
        let train_loss = contributed.iter().map(|p| done[p].2 * done[p].1 as f64).sum::<f64>() / examples as f64;
        let compute_seconds = contributed.iter().map(|p| done[p].3).fold(0.0, f64::max);
        let strategy = cfg.build_strategy().map_err(|e| SessionError::Config(e.to_string()))?;
        let result = Aggregated {
            selected,
            contributed,
            failures,
            examples,
            train_loss,
            compute_seconds,
            model: sum,
            dp_epsilon: None,
            dp_sample_rate: None,
        };
        let ctx = RoundCtx {
            state,
            workers,
            round,
            started,
            selected: Vec::new(),
            available,
            global,
            global_ref,
            seed_base: 0,
        };
        self.finish_round(&ctx, &*strategy, result).await
    }

    /// A round under secure aggregation: participants train, then mask their weighted
    /// updates in a secure-aggregation round driven here through world state; the
    /// coordinator learns the sum (FedAvg's numerator and denominator) and applies it.
    async fn secure_round(
        &self,
        ctx: RoundCtx<'_>,
        sa: &SecAggSettings,
        plan_config: &Value,
    ) -> Result<RoundReport, SessionError> {
        use tessera_identity::secagg::{
            self as sagg, AdvertiseKeys, MaskedInput, SecAggConfig, ShareBundle, UnmaskResponse,
        };
        let RoundCtx { state, workers, round, started, selected, available, global, global_ref, seed_base } = ctx;
        let cfg = &state.config;
        let id = state.id.as_str();
        let base =
            Tensors::decode(&global, TensorLimits::default()).map_err(|e| SessionError::Aggregate(e.to_string()))?;
        let params: usize = base.0.values().map(|t| t.data.len()).sum();
        let n = u16::try_from(selected.len()).map_err(|_| {
            SessionError::Participants(format!("round {round}: too many participants for secure aggregation"))
        })?;
        let sconfig = SecAggConfig {
            session: id.to_owned(),
            round,
            n,
            threshold: sa.threshold.unwrap_or(n / 2 + 1),
            vector_len: params + 1,
            clip: sa.clip,
            scale_bits: sa.scale_bits,
        };
        sconfig.validate().map_err(|e| SessionError::Config(format!("secure aggregation: {e}")))?;
        let prefix = format!("secagg/{id}/r{round}/{}", self.dispatch);
        let step = Duration::from_secs_f64(cfg.round_timeout_secs / 5.0);
        let attempt = format!(".{}", self.dispatch);
        let task = |i: usize| {
            json!({"secagg": {
                "config": sconfig,
                "id": i + 1,
                "prefix": prefix,
                "weight_scale": sa.weight_scale,
                "step_timeout_secs": step.as_secs_f64(),
            }})
        };
        let world = self.backend.world.clone();
        let blobs = self.backend.blobs.clone();
        let drive = async {
            let bad = |e: sagg::SecAggError| SessionError::Aggregate(format!("round {round}: secure aggregation: {e}"));
            let mut c = sagg::Coordinator::new(sconfig.clone()).map_err(bad)?;
            let post = |key: String, bytes: Vec<u8>| {
                let (world, blobs) = (world.clone(), blobs.clone());
                async move { tessera_node::secagg::post(world.as_ref(), blobs.as_ref(), &key, bytes).await }
            };
            for (_, b) in gather(world.as_ref(), blobs.as_ref(), &format!("{prefix}/keys"), n.into(), step).await? {
                if let Err(e) = AdvertiseKeys::from_bytes(&b).and_then(|m| c.receive_keys(m)) {
                    tracing::warn!("secure aggregation: keys refused: {e}");
                }
            }
            let dir = c.key_directory().map_err(bad)?;
            let u1 = dir.keys.len();
            post(format!("{prefix}/directory"), dir.to_bytes()).await?;
            for (_, b) in gather(world.as_ref(), blobs.as_ref(), &format!("{prefix}/shares"), u1, step).await? {
                if let Err(e) = ShareBundle::from_bytes(&b).and_then(|m| c.receive_shares(m)) {
                    tracing::warn!("secure aggregation: shares refused: {e}");
                }
            }
            let relayed = c.relay_shares().map_err(bad)?;
            let u2 = relayed.len();
            for r in relayed {
                post(format!("{prefix}/relay/{}", r.to), r.to_bytes()).await?;
            }
            for (_, b) in gather(world.as_ref(), blobs.as_ref(), &format!("{prefix}/masked"), u2, step).await? {
                if let Err(e) = MaskedInput::from_bytes(&b).and_then(|m| c.receive_masked(m)) {
                    tracing::warn!("secure aggregation: masked input refused: {e}");
                }
            }
            let req = c.unmask_request().map_err(bad)?;
            let u3 = req.survivors.len();
            post(format!("{prefix}/unmask"), req.to_bytes()).await?;
            for (_, b) in gather(world.as_ref(), blobs.as_ref(), &format!("{prefix}/unmasked"), u3, step).await? {
                if let Err(e) = UnmaskResponse::from_bytes(&b).and_then(|m| c.receive_unmask(m)) {
                    tracing::warn!("secure aggregation: unmask response refused: {e}");
                }
            }
            c.finish().map_err(bad)
        };
        let dispatch = self.dispatch(
            id,
            round,
            &selected,
            &attempt,
            workers,
            |i, participant| {
                let mut c = Self::worker_config(cfg, "train", seed_base + i as u64);
                deep_merge(&mut c, plan_config);
                deep_merge(&mut c, &partition_config(cfg, participant));
                deep_merge(&mut c, &task(i));
                c
            },
            |_, _| vec![global_ref.clone()],
            Duration::from_secs_f64(cfg.round_timeout_secs),
        );
        let (unmasked, replies) = tokio::join!(drive, dispatch);
        let replies = replies?;
        // The round's messages are no longer needed.
        if let Ok(keys) = self.backend.world.keys(&prefix).await {
            for k in keys {
                let _ = self.backend.world.delete(&k).await;
            }
        }
        let unmasked = unmasked?;
        let survivors: Vec<String> = unmasked.survivors.iter().map(|&i| selected[usize::from(i) - 1].clone()).collect();
        let mut failures = Vec::new();
        let mut examples = 0u64;
        let mut loss = 0.0f64;
        let mut compute_seconds = 0.0f64;
        for p in &selected {
            let in_sum = survivors.contains(p);
            match replies.replies.get(p).map(|r| &r.outcome) {
                Some(TaskOutcome::Ok { outputs, seconds }) if in_sum => {
                    let m = match outputs.iter().find(|o| o.name == "metrics") {
                        Some(o) => self.backend.blobs.get(&o.digest).await?,
                        None => None,
                    };
                    if let Some(m) = m.and_then(|b| serde_json::from_slice::<WorkerMetrics>(&b).ok()) {
                        examples += m.num_examples;
                        loss += m.loss * m.num_examples as f64;
                    }
                    compute_seconds = compute_seconds.max(*seconds);
                }
                Some(TaskOutcome::Failed { error }) => failures.push(Failure { node: p.clone(), error: error.clone() }),
                _ if in_sum => {}
                _ => failures.push(Failure { node: p.clone(), error: "dropped out of the secure aggregation".into() }),
            }
        }
        if survivors.len() < cfg.min_participants {
            return Err(too_few(round, survivors.len(), cfg.min_participants, &failures));
        }
        let sum = sconfig
            .dequantize_sum(&unmasked.sum, unmasked.survivors.len())
            .map_err(|e| SessionError::Aggregate(e.to_string()))?;
        let weight = f64::from(sum[params]);
        if !(weight.is_finite() && weight > 0.0) {
            return Err(SessionError::Aggregate(format!("round {round}: the summed weight is {weight}")));
        }
        let mut aggregate = base.clone();
        let mut at = 0;
        for t in aggregate.0.values_mut() {
            for v in t.data.iter_mut() {
                *v += (f64::from(sum[at]) / weight) as f32;
                at += 1;
            }
        }
        let strategy = cfg.build_strategy().map_err(|e| SessionError::Config(e.to_string()))?;
        let result = Aggregated {
            selected,
            contributed: survivors,
            failures,
            examples,
            train_loss: if examples > 0 { loss / examples as f64 } else { 0.0 },
            compute_seconds,
            model: aggregate,
            dp_epsilon: None,
            dp_sample_rate: None,
        };
        let ctx =
            RoundCtx { state, workers, round, started, selected: Vec::new(), available, global, global_ref, seed_base };
        self.finish_round(&ctx, &*strategy, result).await
    }

    /// Federated evaluation: the participants the strategy picks evaluate the new model on
    /// their own data; their metrics are averaged by example counts. Nodes that fail are
    /// left out.
    #[allow(clippy::too_many_arguments)]
    async fn evaluate_federated(
        &self,
        id: &str,
        cfg: &SessionConfig,
        workers: &Workers,
        strategy: &dyn Strategy,
        available: &[String],
        round: u32,
        model: &Digest,
        size: u64,
    ) -> Result<Option<(f64, Option<f64>, Vec<String>)>, SessionError> {
        if cfg.fraction_evaluate <= 0.0 {
            return Ok(None);
        }
        let nodes = strategy
            .configure_evaluate(round, available, cfg.seed ^ 0x5EED_E7A1 ^ u64::from(round))
            .map_err(|e| SessionError::Participants(format!("round {round} evaluation: {e}")))?;
        if nodes.is_empty() {
            return Ok(None);
        }
        let input = BlobRef { name: "model".into(), digest: *model, size };
        // Evaluation tasks are a round of their own on the reply queue (round numbers of
        // evaluation are offset so their replies never mix with training's).
        let replies = self
            .dispatch(
                id,
                EVAL_ROUND_BASE + round,
                &nodes,
                "",
                workers,
                |_, participant| {
                    let mut c = Self::worker_config(cfg, "evaluate", cfg.seed);
                    deep_merge(&mut c, &partition_config(cfg, participant));
                    c
                },
                |_, _| vec![input.clone()],
                Duration::from_secs_f64(cfg.round_timeout_secs),
            )
            .await?;
        let mut results = Vec::new();
        let mut evaluated = Vec::new();
        for (node, r) in &replies.replies {
            let TaskOutcome::Ok { outputs, .. } = &r.outcome else { continue };
            let Some(m) = outputs.iter().find(|o| o.name == "metrics") else { continue };
            let Ok(Some(bytes)) = self.backend.blobs.get(&m.digest).await else { continue };
            if let Ok(w) = serde_json::from_slice::<WorkerMetrics>(&bytes)
                && w.num_examples > 0
                && w.loss.is_finite()
            {
                results.push((w.num_examples, w.loss, w.accuracy));
                evaluated.push(node.clone());
            }
        }
        Ok(strategy.aggregate_evaluate(&results).map(|(l, a)| (l, a, evaluated)))
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

/// What a round has when its participants are chosen.
struct RoundCtx<'a> {
    state: &'a SessionState,
    workers: &'a Workers,
    round: u32,
    started: Instant,
    selected: Vec<String>,
    available: Vec<String>,
    global: Bytes,
    global_ref: BlobRef,
    seed_base: u64,
}

/// Waits until `expected` messages are under `dir` in world state or `timeout` passes, and
/// returns those there (by participant number).
async fn gather(
    world: &dyn tessera_ports::WorldState,
    blobs: &dyn tessera_ports::BlobStore,
    dir: &str,
    expected: usize,
    timeout: Duration,
) -> Result<BTreeMap<u16, Bytes>, SessionError> {
    let deadline = Instant::now() + timeout;
    loop {
        let keys = world.keys(dir).await?;
        if keys.len() >= expected || Instant::now() >= deadline {
            let mut out = BTreeMap::new();
            for k in keys {
                let Some(idx) = k.rsplit('/').next().and_then(|i| i.parse::<u16>().ok()) else { continue };
                if let Some(b) = tessera_node::secagg::fetch(world, blobs, &k).await? {
                    out.insert(idx, b);
                }
            }
            return Ok(out);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A round that ended with fewer usable updates than the session needs.
fn too_few(round: u32, got: usize, min: usize, failures: &[Failure]) -> SessionError {
    SessionError::RoundFailed {
        round,
        got,
        min,
        failures: failures.iter().map(|f| format!("{}: {}", f.node, f.error)).collect::<Vec<_>>().join("; "),
    }
}

/// What a round aggregated, before the new model is stored and evaluated.
struct Aggregated {
    selected: Vec<String>,
    contributed: Vec<String>,
    failures: Vec<Failure>,
    examples: u64,
    train_loss: f64,
    compute_seconds: f64,
    model: Tensors,
    dp_epsilon: Option<f64>,
    dp_sample_rate: Option<f64>,
}

/// Region aggregation tasks of round `r` are numbered `AGG_ROUND_BASE + r`.
const AGG_ROUND_BASE: u32 = 1 << 29;

/// Evaluation tasks of round `r` are numbered `EVAL_ROUND_BASE + r`.
const EVAL_ROUND_BASE: u32 = 1 << 30;

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
        c.strategy = StrategySpec::named("magic");
        assert!(c.validate().unwrap_err().to_string().contains("magic"));
        let mut c = ok.clone();
        c.strategy = serde_json::from_value(json!({"name": "fedadam", "eta": -1.0})).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("eta"), "parameters are checked");
        let mut c = ok.clone();
        c.strategy = serde_json::from_value(json!({"name": "krum", "colour": 1})).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("colour"));
        let mut c = ok.clone();
        c.max_failure_ratio = 2.0;
        assert!(c.validate().is_err());
        let sa = SecAggSettings { clip: 8.0, scale_bits: 16, threshold: None, weight_scale: 1000.0 };
        let mut c = ok.clone();
        c.secure_aggregation = Some(sa.clone());
        assert!(c.validate().is_ok());
        c.strategy = StrategySpec::named("krum");
        assert!(c.validate().unwrap_err().to_string().contains("fedavg"), "robust strategies need every update");
        let mut c = ok.clone();
        c.secure_aggregation = Some(SecAggSettings { scale_bits: 40, ..sa.clone() });
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.secure_aggregation = Some(sa);
        c.differential_privacy =
            Some(DpConfig { noise_multiplier: 1.0, clipping_norm: 1.0, side: DpSide::Server, delta: 1e-5 });
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.differential_privacy =
            Some(DpConfig { noise_multiplier: 0.0, clipping_norm: 1.0, side: DpSide::Server, delta: 1e-5 });
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.clients_per_node = Some(0);
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.module = "Not A Module".into();
        assert!(c.validate().is_err());
        let mut c = ok;
        c.round_timeout_secs = f64::NAN;
        assert!(c.validate().is_err());
    }

    #[test]
    fn strategies_in_swarm_files() {
        let c = SessionConfig::from_yaml("module: a.b@0.1.0\nstrategy: fedmedian\n").unwrap();
        assert_eq!(c.strategy, StrategySpec::named("fedmedian"));
        let c = SessionConfig::from_yaml(
            "module: a.b@0.1.0\nstrategy:\n  name: fedtrimmedavg\n  beta: 0.3\nfraction_evaluate: 0.5\n",
        )
        .unwrap();
        assert_eq!(c.strategy.name, "fedtrimmedavg");
        assert_eq!(c.strategy.params["beta"], 0.3);
        assert_eq!(c.participation().fraction_evaluate, 0.5);
        // Written back the same way.
        let again: SessionConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(again, c);
        for bad in ["strategy: [1]\n", "strategy: {beta: 0.3}\n", "strategy: {name: fedtrimmedavg, beta: 0.7}\n"] {
            let e = SessionConfig::from_yaml(&format!("module: a.b@0.1.0\n{bad}")).unwrap_err();
            assert!(e.to_string().contains("strateg") || e.to_string().contains("beta"), "{bad}: {e}");
        }
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
