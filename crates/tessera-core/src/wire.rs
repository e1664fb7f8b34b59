//! What crosses the wire between coordinators and nodes: tasks, replies, node records,
//! round reports and lineage. Small messages are JSON; big numbers travel as blobs named
//! by digest.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use serde_json::Value;

use crate::manifest::RuntimeKind;
use crate::{ByteSize, Digest};

/// The schema version of every message here. A message with another version is refused.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest JSON message accepted from the wire (blobs travel separately).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Over the size limit.
    #[error("message of {0} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not valid JSON for the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Another schema version.
    #[error("message has schema version {found}; this program speaks {SCHEMA_VERSION}")]
    Schema {
        /// The version found.
        found: u32,
    },
}

#[derive(Deserialize)]
struct SchemaOnly {
    schema: u32,
}

/// Decodes a message: size first, then schema version, then the full type.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let head: SchemaOnly = serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if head.schema != SCHEMA_VERSION {
        return Err(WireError::Schema { found: head.schema });
    }
    serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Encodes a message as JSON.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("wire types always serialise")
}

/// The world-state key under which node `node` keeps its answer to task `task_id`
/// (`done/<node>/<task>`): written by the node beside its reply, removed by the
/// coordinator once the task's round is saved.
pub fn answer_key(node: &str, task_id: &str) -> String {
    format!("done/{node}/{task_id}")
}

/// A blob named by its digest, as an input or output of a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// The port name (`model`, `metrics`).
    pub name: String,
    /// The blob's digest in the blob store.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// The bytes themselves, when small enough to travel in the message (base64 on the
    /// wire) rather than through the blob store; they must match `digest` and `size`
    /// ([`BlobRef::inline_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "inline_bytes")]
    pub inline: Option<Vec<u8>>,
}

/// A blob's bytes that do not match the digest or size that names them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the bytes given for {name:?} do not match {digest} ({size} bytes)")]
pub struct InlineMismatch {
    /// The port name.
    pub name: String,
    /// The digest they should have.
    pub digest: Digest,
    /// The size they should have.
    pub size: u64,
}

impl BlobRef {
    /// A reference to a blob in the blob store.
    pub fn stored(name: impl Into<String>, digest: Digest, size: u64) -> Self {
        BlobRef { name: name.into(), digest, size, inline: None }
    }

    /// A reference carrying `bytes` inline.
    pub fn inline(name: impl Into<String>, bytes: &[u8]) -> Self {
        BlobRef { name: name.into(), digest: Digest::of(bytes), size: bytes.len() as u64, inline: Some(bytes.to_vec()) }
    }

    /// The inline bytes, checked against the digest and size (`Ok(None)` when the blob is
    /// in the blob store).
    ///
    /// # Errors
    /// [`InlineMismatch`] when the bytes are not those the digest names.
    pub fn inline_bytes(&self) -> Result<Option<&[u8]>, InlineMismatch> {
        match &self.inline {
            None => Ok(None),
            Some(b) if b.len() as u64 == self.size && Digest::of(b) == self.digest => Ok(Some(b)),
            Some(_) => Err(InlineMismatch { name: self.name.clone(), digest: self.digest, size: self.size }),
        }
    }
}

/// Base64 (standard alphabet, padded) for inline bytes in JSON messages.
mod inline_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    #[allow(clippy::ref_option)]
    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| STANDARD.decode(t.as_bytes()).map_err(serde::de::Error::custom)).transpose()
    }
}

/// A task for a node: run this package with this config and these inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    /// Always [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Unique per attempt target: `<session>.r<round>.<node>`.
    pub task_id: String,
    /// The session (swarm run) it belongs to.
    pub session: String,
    /// The round.
    pub round: u32,
    /// The package to run, by digest.
    pub module: Digest,
    /// The config, already merged with overrides.
    pub config: Value,
    /// Named inputs.
    pub inputs: Vec<BlobRef>,
    /// Where to send the reply.
    pub reply_to: String,
    /// Identifies this sending of the task: a coordinator that resumes a session sends its
    /// tasks again under a new one, so they are not taken for retries of the old sending
    /// (which the bus would drop as duplicates).
    #[serde(default)]
    pub dispatch: String,
    /// The swarm iteration's world state the task sees, for tasks of user-written swarms
    /// (none for federated rounds and calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world: Option<WorldScope>,
    /// The sender's signature envelope over this message without this field (method
    /// `TASK`, path the node's task queue, audience the node's key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// Outputs of at most this many bytes travel inline in the reply
    /// ([`BlobRef::inline`]) instead of through the blob store: for a coordinator that
    /// reads the outputs itself. 0 (the default): every output goes to the blob store.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inline_outputs: u64,
    /// The sender never sent this task id before (a run it started, not one it resumed):
    /// a first delivery of it cannot have been answered, so the node runs it without
    /// looking for an earlier answer in world state. `false` (the default): the node
    /// looks first. Only unsigned tasks carry it: a node always looks up a signed task,
    /// which could be a replay of a genuine one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
    /// W3C `traceparent` of the round that sent it ([`crate::trace::TraceParent`]): the
    /// node's span for the task carries the same trace id. Ignored when malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// The Component Repository entry the module was named by (`transformation/<id>`),
    /// when it was: the node resolves the entry through its own hub, checks that it holds
    /// [`TaskMessage::module`], and runs the package under the entry's `needs` joined with
    /// its own (what placement judged by). The sender names the entry; the needs come from
    /// the hub, never from the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The part of a run's world state one swarm task sees: the globals and results of one
/// attempt at one iteration, `runs/<session>/<scope>/globals/<key>` and
/// `runs/<session>/<scope>/results/<key>`. The coordinator copies the globals of the last
/// completed iteration into a new scope before the iteration's first stage, so a task reads
/// what the previous iteration left, and an iteration started again after a crash starts
/// from the same globals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldScope {
    /// The scope: `i<iteration>.a<attempt>`.
    pub scope: String,
    /// When given, the only nodes whose results `select` returns; every node's when absent
    /// (the coordinator merges results only from tasks that succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<String>>,
}

/// What a node answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskReply {
    /// Always [`SCHEMA_VERSION`].
    pub schema: u32,
    /// The task answered.
    pub task_id: String,
    /// Its session.
    pub session: String,
    /// Its round.
    pub round: u32,
    /// The node that ran it.
    pub node: String,
    /// What happened.
    pub outcome: TaskOutcome,
    /// The node's signature envelope over this message without this field (method
    /// `REPLY`, path the reply queue, audience the task's signer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}

/// The result of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum TaskOutcome {
    /// It ran: its outputs are in the blob store.
    Ok {
        /// Named outputs.
        outputs: Vec<BlobRef>,
        /// How long it ran, in seconds.
        seconds: f64,
    },
    /// It failed, and why.
    Failed {
        /// The error, for people.
        error: String,
    },
}

/// Resources of a node, detected or configured.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU cores.
    pub cpu: f64,
    /// Memory.
    pub memory: ByteSize,
    /// GPUs.
    pub gpu: u32,
    /// Free disk.
    pub disk: ByteSize,
}

/// What a node tells the world about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Always [`SCHEMA_VERSION`].
    pub schema: u32,
    /// The node id.
    pub id: String,
    /// Names of the datasets it holds (never their contents).
    pub datasets: Vec<String>,
    /// The runtimes it offers.
    pub runtimes: Vec<RuntimeKind>,
    /// Its resources.
    pub resources: Resources,
    /// The queue it takes tasks from.
    pub task_queue: String,
    /// The node's public key (`ed25519:…`), the audience of tasks signed for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Where its HTTP gateway listens (`http://host:port`), when it has one: calls to its
    /// actors are forwarded there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Labels its operator gave it (`zone: eu`), which swarm tasks select nodes by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The libraries its runtimes offer, `name==version` (Python distributions for the
    /// `python` runtime), which modules' `needs.libraries` are matched against.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub libraries: Vec<String>,
    /// The dataflow operations it runs (`tessera node run --ops parse,add`): parameter sets
    /// of these go to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<String>,
    /// The sandbox protections its module processes run under (`filesystem`, `network`,
    /// `memory`, `processes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protections: Vec<String>,
    /// True when the node installs the Python libraries a module needs that it does not
    /// offer (an environment per module): placed whatever `needs.libraries` says.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub installs_libraries: bool,
    /// True when the node runs without a protection its policy requires (`--degraded`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub degraded: bool,
}

/// The metrics a worker reports in its `metrics` output.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerMetrics {
    /// Examples the update was computed from (FedAvg's weight).
    pub num_examples: u64,
    /// Mean loss.
    #[serde(default)]
    pub loss: f64,
    /// Accuracy, when the worker computes it.
    #[serde(default)]
    pub accuracy: Option<f64>,
}

/// One round, as reported after it completes.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// 1-based round number.
    pub round: u32,
    /// Nodes asked.
    pub selected: Vec<String>,
    /// Nodes whose update was aggregated.
    pub contributed: Vec<String>,
    /// Nodes that failed or timed out, with why.
    pub failures: Vec<Failure>,
    /// Examples behind the aggregate.
    pub examples: u64,
    /// Weighted mean training loss reported by participants.
    pub train_loss: f64,
    /// Loss of the new global model on held-out data, when evaluated.
    pub eval_loss: Option<f64>,
    /// Accuracy of the new global model on held-out data, when evaluated.
    pub eval_accuracy: Option<f64>,
    /// Held-out rows the evaluation used.
    #[serde(default)]
    pub eval_examples: Option<u64>,
    /// Digest of the new global model.
    pub model: Digest,
    /// Wall time of the round in seconds. When the coordinator's evaluation ran beside the
    /// next round (`timings.evaluation_beside`), up to the round's model stored and its
    /// federated evaluation done.
    pub seconds: f64,
    /// The longest run time a node reported for its task (the round's critical path of
    /// work), in seconds.
    #[serde(default)]
    pub compute_seconds: f64,
    /// Time spent evaluating the new model within the round's `seconds`, in seconds.
    #[serde(default)]
    pub eval_seconds: f64,
    /// Example-weighted loss of the federated evaluation (participants evaluating the new
    /// model on their own data), when the round had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fed_eval_loss: Option<f64>,
    /// Example-weighted accuracy of the federated evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fed_eval_accuracy: Option<f64>,
    /// Nodes that evaluated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fed_evaluated: Vec<String>,
    /// With differential privacy: ε spent by the session up to this round (at the session's
    /// δ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_epsilon: Option<f64>,
    /// With differential privacy: the fraction of eligible nodes sampled this round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_sample_rate: Option<f64>,
    /// Where the round's time went at the coordinator (zeros in reports written before
    /// it was measured).
    #[serde(default)]
    pub timings: RoundTimings,
    /// Asynchronous (FedBuff) sessions: how many server steps old the model each update of
    /// `contributed` trained from was, in the same order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub staleness: Vec<u32>,
}

/// Where a round's time went at the coordinator, in seconds. With the nodes' work
/// (`compute_seconds`) and the evaluation (`eval_seconds`) they show what a round costs
/// beyond the work: `waiting` less `compute_seconds` is the way to the nodes and back.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundTimings {
    /// Placing the round's tasks on the nodes' queues, signing included.
    #[serde(default)]
    pub dispatch: f64,
    /// From the tasks being placed to the last reply taken (the nodes' work, the replies'
    /// way back, and any wait for nodes that do not answer).
    #[serde(default)]
    pub waiting: f64,
    /// Reading the updates from the blob store and storing the new global model.
    #[serde(default)]
    pub transfer: f64,
    /// The strategy's aggregation (with clipping and noise when differential privacy is on).
    #[serde(default)]
    pub aggregation: f64,
    /// The coordinator's evaluation of the round's model when it ran beside the next round
    /// (a synchronous session's rounds but its last): part of neither the round's `seconds`
    /// nor its `eval_seconds`. Zero when the round waited for it.
    #[serde(default)]
    pub evaluation_beside: f64,
}

impl RoundReport {
    /// What the round spent on anything but work: dispatch, transfer, waiting,
    /// aggregation, bookkeeping.
    pub fn overhead_seconds(&self) -> f64 {
        (self.seconds - self.compute_seconds - self.eval_seconds).max(0.0)
    }
}

/// Mean round time, compute, evaluation and overhead of some rounds, in seconds.
pub fn round_summary(reports: &[RoundReport]) -> Option<(f64, f64, f64, f64)> {
    if reports.is_empty() {
        return None;
    }
    let n = reports.len() as f64;
    let mean = |f: &dyn Fn(&RoundReport) -> f64| reports.iter().map(f).sum::<f64>() / n;
    Some((
        mean(&|r| r.seconds),
        mean(&|r| r.compute_seconds),
        mean(&|r| r.eval_seconds),
        mean(&|r| r.overhead_seconds()),
    ))
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
/// A participant that did not contribute to a round, and why.
pub struct Failure {
    /// The node.
    pub node: String,
    /// What happened.
    pub error: String,
}

/// Where a model came from: recorded with it in the hub.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// The session that produced it.
    pub session: String,
    /// The strategy that aggregated it.
    pub strategy: String,
    /// Packages that ran, as `name@version` and digest.
    pub modules: Vec<ModuleUse>,
    /// Nodes that contributed to at least one round.
    pub nodes: Vec<String>,
    /// Rounds completed.
    pub rounds: u32,
    /// Per-round metrics: every round's report, or for a run whose reports would pass
    /// [`LINEAGE_METRICS_BYTES`], evenly spaced rounds' and the last's (see
    /// [`Lineage::metrics_of`]; each report names its round, and the run's state keeps
    /// every one).
    pub metrics: Vec<RoundReport>,
    /// Which node ran which module version for each task of a swarm: node -> task ->
    /// `name@version` (empty for federated sessions, whose `modules` say it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub placements: BTreeMap<String, BTreeMap<String, String>>,
    /// The data sets the run read (by name, as nodes announce them; the data never left
    /// its node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<String>,
    /// The model the run started from, as `name@version`, when it started from a hub model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
}

/// The most bytes of per-round reports (as JSON) a [`Lineage`] carries: the hub takes a
/// model's lineage up to 1 MiB, and a session of thousands of rounds has more.
pub const LINEAGE_METRICS_BYTES: usize = 512 << 10;

impl Lineage {
    /// The reports a lineage carries of a run's `reports` (in round order): all of them
    /// when their JSON fits in [`LINEAGE_METRICS_BYTES`]; otherwise every `k`-th round's
    /// (rounds `k`, `2k`, ...) and the last's, for the smallest `k` that fits counting up
    /// from the total over the bound; only the last's when a single report is that large,
    /// none when even it does not fit.
    pub fn metrics_of(reports: &[RoundReport]) -> Vec<RoundReport> {
        let sizes: Vec<usize> =
            reports.iter().map(|r| serde_json::to_vec(r).map_or(usize::MAX, |b| b.len() + 1)).collect();
        let fits = |keep: &dyn Fn(usize) -> bool| {
            sizes
                .iter()
                .enumerate()
                .filter(|(i, _)| keep(*i))
                .fold(0usize, |sum, (_, s)| sum.saturating_add(*s))
                // The array's brackets.
                .saturating_add(1)
                <= LINEAGE_METRICS_BYTES
        };
        let last = reports.len().saturating_sub(1);
        // Keeping every k-th of them keeps about 1/k of the bytes: start there.
        let total = sizes.iter().fold(0usize, |sum, s| sum.saturating_add(*s));
        for k in total.div_ceil(LINEAGE_METRICS_BYTES).max(1)..=reports.len() {
            let keep = |i: usize| (i + 1).is_multiple_of(k) || i == last;
            if fits(&keep) {
                return reports.iter().enumerate().filter(|(i, _)| keep(*i)).map(|(_, r)| r.clone()).collect();
            }
        }
        Vec::new()
    }
}

/// A package used by a run.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleUse {
    /// `name@version`.
    pub module: String,
    /// Its digest.
    pub digest: Digest,
    /// Its role (`worker`, `evaluator`).
    pub role: String,
    /// The Component Repository entry it was named by (`transformation/custom.scale`),
    /// when it was: a resumed run resolves that entry again (for its `needs`) and checks it
    /// still holds these bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
}

/// An actor, as listed by a node (`GET /api/v1/actors`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActorInfo {
    /// `path` or `path-tag`.
    pub name: String,
    /// The node it runs on.
    #[serde(default)]
    pub node: String,
    /// True when that node runs without a sandbox protection its policy requires
    /// (`tessera node run --degraded`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub degraded: bool,
    /// `name@version` of its module.
    pub module: String,
    /// The package digest.
    pub digest: Digest,
    /// Replicas in the pool.
    pub replicas: usize,
    /// Its priority.
    pub priority: i32,
    /// What it reserves, in all.
    pub reserved: Resources,
    /// Calls answered.
    pub calls: u64,
    /// Calls running now.
    pub busy: usize,
    /// True when its module has state hooks.
    pub stateful: bool,
}

/// A call of an actor's function (`POST /api/v1/call`).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    /// The actor's name (`path` or `path-tag`), or a module reference (`path@version`,
    /// a digest) to call, launching it when needed.
    pub module: String,
    /// The function.
    pub function: String,
    /// Positional arguments (a JSON list).
    #[serde(default = "empty_list")]
    pub args: Value,
    /// Keyword arguments (a JSON mapping).
    #[serde(default = "empty_map")]
    pub kwargs: Value,
    /// Named binary inputs, base64 (tensors as safetensors).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, String>,
    /// Seconds before the call is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
    /// An id under which the call can be cancelled (`POST /api/v1/calls/<id>/cancel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl CallRequest {
    /// A call of `function` on `module` with positional arguments.
    pub fn new(module: impl Into<String>, function: impl Into<String>, args: Vec<Value>) -> Self {
        CallRequest {
            module: module.into(),
            function: function.into(),
            args: Value::Array(args),
            kwargs: empty_map(),
            inputs: BTreeMap::new(),
            timeout: None,
            id: None,
        }
    }
}

fn empty_list() -> Value {
    Value::Array(Vec::new())
}
fn empty_map() -> Value {
    Value::Object(Default::default())
}

/// One output of a call.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallOutput {
    /// Bytes.
    pub size: u64,
    /// `json`, `tensor` (safetensors) or `bytes`.
    pub kind: String,
    /// The bytes, base64, when small.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// The blob holding them (`GET /api/v1/blobs/<digest>`), when large.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
}

/// The answer to a call.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallResponse {
    /// The actor that answered.
    pub actor: String,
    /// Its node.
    pub node: String,
    /// The `result` output when it is JSON and inline; null otherwise.
    pub result: Value,
    /// Every output by name.
    pub outputs: BTreeMap<String, CallOutput>,
}

/// A launch of an actor (`POST /api/v1/actors`): get-or-create by name.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    /// `path[@version|@alias]` or a digest.
    pub module: String,
    /// The actor is `path-tag`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Replicas in the pool.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Config merged over the module's default.
    #[serde(default)]
    pub config: Value,
    /// Higher stays longer when the node is full.
    #[serde(default)]
    pub priority: i32,
    /// The node to run it on (default: the one asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

fn one() -> usize {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskMessage {
        TaskMessage {
            schema: SCHEMA_VERSION,
            task_id: "s1.r1.node-0".into(),
            session: "s1".into(),
            round: 1,
            module: Digest::of(b"m"),
            config: serde_json::json!({"lr": 0.1}),
            inputs: vec![BlobRef::stored("model", Digest::of(b"w"), 1), BlobRef::inline("metrics", b"{}")],
            reply_to: "tessera.session.s1.replies".into(),
            dispatch: "d1".into(),
            world: None,
            auth: None,
            inline_outputs: 0,
            fresh: false,
            trace: None,
            component: None,
        }
    }

    #[test]
    fn inline_bytes_travel_as_base64_and_are_checked() {
        let t = task();
        let text = String::from_utf8(encode(&t)).unwrap();
        assert!(text.contains("\"inline\":\"e30=\""), "{text}");
        let back: TaskMessage = decode(text.as_bytes()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.inputs[1].inline_bytes().unwrap(), Some(&b"{}"[..]));
        assert_eq!(back.inputs[0].inline_bytes().unwrap(), None);
        // Bytes that are not those the digest names are refused.
        let mut forged = back.inputs[1].clone();
        forged.inline = Some(b"[]".to_vec());
        assert!(forged.inline_bytes().is_err());
        forged.inline = Some(b"{} ".to_vec());
        assert!(forged.inline_bytes().is_err(), "size");
        // Not base64: a malformed message.
        let bad = text.replace("e30=", "!!");
        assert!(matches!(decode::<TaskMessage>(bad.as_bytes()), Err(WireError::Malformed(_))));
    }

    #[test]
    fn round_trips() {
        let t = task();
        assert_eq!(decode::<TaskMessage>(&encode(&t)).unwrap(), t);
        // The entry a module was named by travels with the task, and is absent unless given
        // (a message without it, from before it was carried, reads as none).
        assert!(!String::from_utf8(encode(&t)).unwrap().contains("component"));
        let mut named = task();
        named.component = Some("transformation/custom.scale".into());
        assert_eq!(decode::<TaskMessage>(&encode(&named)).unwrap(), named);
        let r = TaskReply {
            schema: SCHEMA_VERSION,
            task_id: t.task_id.clone(),
            session: "s1".into(),
            round: 1,
            node: "node-0".into(),
            outcome: TaskOutcome::Failed { error: "boom".into() },
            auth: None,
        };
        let json = String::from_utf8(encode(&r)).unwrap();
        assert!(json.contains("\"status\":\"failed\""), "{json}");
        assert_eq!(decode::<TaskReply>(json.as_bytes()).unwrap(), r);
    }

    #[test]
    fn refuses_bad_messages() {
        assert!(matches!(decode::<TaskMessage>(b"{"), Err(WireError::Malformed(_))));
        assert!(matches!(decode::<TaskMessage>(b"[]"), Err(WireError::Malformed(_))));
        assert!(matches!(decode::<TaskMessage>(b"{\"schema\":1}"), Err(WireError::Malformed(_))));
        let mut v = serde_json::to_value(task()).unwrap();
        v["schema"] = 2.into();
        assert_eq!(decode::<TaskMessage>(&serde_json::to_vec(&v).unwrap()), Err(WireError::Schema { found: 2 }));
        v["schema"] = 1.into();
        v["module"] = "b3:nothex".into();
        assert!(matches!(decode::<TaskMessage>(&serde_json::to_vec(&v).unwrap()), Err(WireError::Malformed(_))));
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(decode::<TaskMessage>(&big), Err(WireError::TooLarge(_))));
    }

    fn report(round: u32, nodes: usize) -> RoundReport {
        serde_json::from_value(serde_json::json!({
            "round": round, "selected": [], "contributed": (0..nodes).map(|i| format!("node-{i}")).collect::<Vec<_>>(),
            "failures": [], "examples": 10, "train_loss": 0.5, "eval_loss": 0.4, "eval_accuracy": 0.9,
            "model": Digest::of(b"m").to_string(), "seconds": 0.01
        }))
        .unwrap()
    }

    #[test]
    fn a_lineage_carries_every_report_that_fits_and_evenly_spaced_ones_past_that() {
        let few: Vec<RoundReport> = (1..=20).map(|r| report(r, 10)).collect();
        assert_eq!(Lineage::metrics_of(&few), few);
        assert!(Lineage::metrics_of(&[]).is_empty());

        let many: Vec<RoundReport> = (1..=5_001).map(|r| report(r, 10)).collect();
        let kept = Lineage::metrics_of(&many);
        assert!(serde_json::to_vec(&kept).unwrap().len() <= LINEAGE_METRICS_BYTES);
        let rounds: Vec<u32> = kept.iter().map(|r| r.round).collect();
        let k = rounds[0];
        assert!(k > 1 && rounds.len() > 100, "{} rounds kept, every {k}th", rounds.len());
        assert!(rounds[..rounds.len() - 1].iter().enumerate().all(|(i, r)| *r == k * (i as u32 + 1)));
        assert_eq!(rounds.last(), Some(&5_001), "the last round is kept");
        // The smallest spacing that fits: one closer would not.
        let closer: Vec<&RoundReport> = many.iter().filter(|r| r.round.is_multiple_of(k - 1)).collect();
        assert!(serde_json::to_vec(&closer).unwrap().len() > LINEAGE_METRICS_BYTES - 2 * 1024);

        // A single report past the bound: the last alone, or nothing when it cannot fit.
        let huge = vec![report(1, 10), report(2, 50_000)];
        assert!(Lineage::metrics_of(&huge).is_empty());
        let big = vec![report(1, 30_000), report(2, 30_000)];
        assert_eq!(Lineage::metrics_of(&big).iter().map(|r| r.round).collect::<Vec<_>>(), vec![2]);
    }
}
