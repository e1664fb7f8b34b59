//! Asynchronous federated learning: FedBuff (Nguyen et al., "Federated Learning with
//! Buffered Asynchronous Aggregation", AISTATS 2022), the buffered asynchronous aggregation
//! NVIDIA FLARE ships. There are no rounds: `concurrency` participants train at once, each
//! on the latest global model when it was sent its task; as soon as one answers, its update
//! goes into the buffer ([`FedBuffBuffer`], staleness-weighted) and it is sent the current
//! model again (or, when the population is larger, a participant drawn at random from
//! those idle). Every `buffer_size` updates the coordinator takes a server step: a new
//! global model, evaluated and saved like a synchronous round's, and reported as one
//! (`round` is the step; `staleness` says how old each update was).
//!
//! Bounds: an update based on a model more than `max_staleness` steps old is refused, and a
//! task whose model falls that far behind is given up at the step (its participant is
//! asked again once it answered, or after `round_timeout_secs`); a task unanswered after
//! `round_timeout_secs` is given up (its participant may be asked again); a node whose
//! announcement lapses has its tasks given up at once; a participant whose answer failed
//! is not asked again in the same step; nothing is sent while fewer than
//! `min_participants` can be asked; a step that accepts no update for
//! `round_timeout_secs` fails the session (resume it). Stop rules:
//! the session's `rounds` (steps), `max_updates` accepted, `target_accuracy` at the
//! coordinator's evaluation, or `max_seconds` of session time.
//!
//! A server step is saved like a round, and a resumed session goes on from its last step:
//! updates buffered but not yet stepped when the coordinator died, and the answers to the
//! tasks it had out, are lost (the resumed coordinator sends new tasks; answers to the old
//! ones are dropped as strays). Unlike synchronous rounds, the model depends on the order
//! updates arrive in, so two runs do not give the same digest.
//!
//! Integer tensors (counters) come from the update with the most examples in the step, as
//! in synchronous rounds. Federated evaluation (`fraction_evaluate`) runs after each step
//! on its own reply queue. Differential privacy, secure and hierarchical aggregation and
//! strategies other than `fedavg` are refused with this mode.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tessera_core::Digest;
use tessera_core::config::deep_merge;
use tessera_core::strategy::{FedBuffBuffer, Strategy};
use tessera_core::tensor::{FixedTensor, Model, TensorLimits};
use tessera_core::wire::{BlobRef, Failure, RoundTimings, TaskReply};
use tessera_identity::PublicKey;

use crate::dispatch::{INLINE_OUTPUTS, Outgoing, ack_all, keys_of, model_input, participant_node, reply_queue};
use crate::engine::{Coordinator, Observer, Program};
use crate::fl::{Aggregated, RoundCtx, in_round, participants_of, partition_config, too_few};
use crate::fold::Update;
use crate::placement::{Workers, eligible_of};
use crate::retention::Leftovers;
use crate::state::Ending;
use crate::{SessionConfig, SessionError, SessionState};

/// The `fedbuff` settings of a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FedBuffConfig {
    /// K: updates per server step.
    #[serde(default = "default_buffer_size")]
    pub buffer_size: usize,
    /// Participants training at once (default: as many as a synchronous round would ask,
    /// `participant_ratio` of the eligible ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Most server steps an update's base model may be behind the current one.
    #[serde(default = "default_max_staleness")]
    pub max_staleness: u32,
    /// a in the staleness weight `(1 + τ)^(-a)`; 0 weighs all updates alike.
    #[serde(default = "default_exponent")]
    pub staleness_exponent: f64,
    /// η_g: the server step's scale on the buffered mean difference.
    #[serde(default = "default_server_lr")]
    pub server_learning_rate: f64,
    /// Stop once this many updates were accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_updates: Option<u64>,
    /// Stop once the coordinator's evaluation reaches this accuracy (needs `eval_dataset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_accuracy: Option<f64>,
    /// Stop once the steps took this many seconds in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seconds: Option<f64>,
}

fn default_buffer_size() -> usize {
    10
}
fn default_max_staleness() -> u32 {
    20
}
fn default_exponent() -> f64 {
    0.5
}
fn default_server_lr() -> f64 {
    1.0
}

impl Default for FedBuffConfig {
    fn default() -> Self {
        FedBuffConfig {
            buffer_size: default_buffer_size(),
            concurrency: None,
            max_staleness: default_max_staleness(),
            staleness_exponent: default_exponent(),
            server_learning_rate: default_server_lr(),
            max_updates: None,
            target_accuracy: None,
            max_seconds: None,
        }
    }
}

impl FedBuffConfig {
    /// Checks the values and what the session combines them with.
    pub(crate) fn check(&self, cfg: &SessionConfig) -> Result<(), String> {
        if !(1..=100_000).contains(&self.buffer_size) {
            return Err(format!("fedbuff.buffer_size {} must be between 1 and 100000", self.buffer_size));
        }
        if let Some(c) = self.concurrency
            && !(1..=100_000).contains(&c)
        {
            return Err(format!("fedbuff.concurrency {c} must be between 1 and 100000"));
        }
        if !(self.staleness_exponent.is_finite() && (0.0..=16.0).contains(&self.staleness_exponent)) {
            return Err(format!("fedbuff.staleness_exponent {} must be in [0, 16]", self.staleness_exponent));
        }
        if !(self.server_learning_rate.is_finite()
            && self.server_learning_rate > 0.0
            && self.server_learning_rate <= 1e3)
        {
            return Err(format!("fedbuff.server_learning_rate {} must be in (0, 1000]", self.server_learning_rate));
        }
        if self.max_updates == Some(0) {
            return Err("fedbuff.max_updates must be at least 1".into());
        }
        if let Some(a) = self.target_accuracy {
            if !(a > 0.0 && a <= 1.0) {
                return Err(format!("fedbuff.target_accuracy {a} must be in (0, 1]"));
            }
            if cfg.eval_dataset.is_none() {
                return Err("fedbuff.target_accuracy needs eval_dataset: the coordinator's evaluation".into());
            }
        }
        if let Some(s) = self.max_seconds
            && !(s.is_finite() && s > 0.0)
        {
            return Err(format!("fedbuff.max_seconds {s} must be a positive number"));
        }
        let other = if cfg.strategy.name != "fedavg" {
            Some(format!("strategy {}", cfg.strategy.name))
        } else if cfg.secure_aggregation.is_some() {
            Some("secure aggregation".into())
        } else if cfg.hierarchy.is_some() {
            Some("hierarchical aggregation".into())
        } else if cfg.differential_privacy.is_some() {
            Some("differential privacy".into())
        } else {
            None
        };
        match other {
            Some(what) => Err(format!("fedbuff takes its own server steps: it cannot be combined with {what}")),
            None => Ok(()),
        }
    }
}

/// A task out.
struct Inflight {
    participant: String,
    /// The global model version (server steps taken) it trains from.
    version: u32,
    /// When it was sent.
    sent: Instant,
    /// When it is given up if unanswered.
    deadline: Instant,
    /// Its model fell more than `max_staleness` steps behind: its answer will be dropped,
    /// but its participant is not asked again until it comes or the deadline passes.
    given_up: bool,
}

impl AsRef<str> for Inflight {
    fn as_ref(&self) -> &str {
        &self.participant
    }
}

/// A global model that tasks train from.
struct Base {
    model: Arc<Model>,
    input: BlobRef,
    digest: Digest,
}

/// The most a FedBuff session's end waits for the answers of tasks still out, to remove
/// what they stored (it waits twice the longest a task of the run took, at least 200 ms).
pub(crate) const LATE_ANSWERS: Duration = Duration::from_secs(10);

/// The least a FedBuff session's end waits for them.
const LATE_ANSWERS_AT_LEAST: Duration = Duration::from_millis(200);

/// A FedBuff session as the engine's program: one server step per iteration.
pub(crate) struct FedBuffRun<'a> {
    pub(crate) state: SessionState,
    workers: &'a Workers,
    strategy: Box<dyn Strategy>,
    observer: &'a dyn Observer,
    fb: FedBuffConfig,
    /// Tasks out, by task id.
    inflight: BTreeMap<String, Inflight>,
    /// Answers taken from the reply queue after the buffer filled: the next step's first.
    carried: VecDeque<(Inflight, TaskReply)>,
    /// Models by version: the current one and those tasks out train from.
    bases: BTreeMap<u32, Base>,
    /// What answers read so far stored, by the version they trained from: removed once no
    /// task out trains from that version any more, because blobs are shared by content
    /// and an answer still to come from the same model may be the very same bytes.
    held: BTreeMap<u32, Leftovers>,
    /// Tasks sent by this coordinator for the session (names them).
    seq: u64,
    /// Participants that can be asked, as last listed.
    available: Vec<String>,
    /// When the last step ended: the next one's time counts from it, so steps' `seconds`
    /// add up to the session's time (for `max_seconds`).
    clock: Option<Instant>,
    /// Participants that failed in this step: not asked again until the next, so one
    /// that fails at once is not sent task after task.
    resting: BTreeSet<String>,
    node_keys: BTreeMap<String, PublicKey>,
    /// The longest a task of this run took from sending to its answer.
    slowest: Duration,
}

impl<'a> FedBuffRun<'a> {
    pub(crate) fn new(
        state: SessionState,
        workers: &'a Workers,
        strategy: Box<dyn Strategy>,
        observer: &'a dyn Observer,
    ) -> Self {
        let fb = state.config.fedbuff.clone().unwrap_or_default();
        FedBuffRun {
            state,
            workers,
            strategy,
            observer,
            fb,
            inflight: BTreeMap::new(),
            carried: VecDeque::new(),
            bases: BTreeMap::new(),
            held: BTreeMap::new(),
            seq: 0,
            available: Vec::new(),
            resting: BTreeSet::new(),
            clock: None,
            node_keys: BTreeMap::new(),
            slowest: Duration::ZERO,
        }
    }

    fn version(&self) -> u32 {
        self.state.completed_rounds
    }

    /// Lists the nodes: the participants that can be asked, and the tasks of nodes that
    /// left given up (as failures). A listing that fails (past the retries) keeps the last.
    async fn refresh(&mut self, c: &Coordinator, failures: &mut Vec<Failure>) {
        let nodes = match c.nodes().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(session = %self.state.id, "listing nodes: {e}; keeping the last listing");
                return;
            }
        };
        let alive: BTreeSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        self.inflight.retain(|task, f| {
            let keep = alive.contains(participant_node(&f.participant));
            if !keep {
                tracing::warn!(%task, participant = %f.participant, "node left with a task out");
                if !f.given_up {
                    failures.push(Failure {
                        node: f.participant.clone(),
                        error: "the node left (its heartbeat stopped)".into(),
                    });
                }
            }
            keep
        });
        self.node_keys = if c.identity.is_some() { keys_of(&nodes) } else { BTreeMap::new() };
        let cfg = &self.state.config;
        self.available =
            participants_of(cfg, eligible_of(cfg, self.workers, nodes).into_iter().map(|n| n.id).collect());
    }

    /// Gives up tasks past their deadline (failures unless given up before); their
    /// participants may be asked again.
    fn expire(&mut self, failures: &mut Vec<Failure>) {
        let now = Instant::now();
        let timeout = self.state.config.round_timeout_secs;
        self.inflight.retain(|task, f| {
            let keep = f.deadline > now;
            if !keep && !f.given_up {
                tracing::warn!(%task, participant = %f.participant, "no reply in time");
                failures.push(Failure { node: f.participant.clone(), error: format!("no reply within {timeout}s") });
            }
            keep
        });
    }

    /// How many tasks are kept out.
    fn concurrency(&self) -> usize {
        let cfg = &self.state.config;
        self.fb
            .concurrency
            .unwrap_or_else(|| (cfg.participant_ratio * self.available.len() as f64).ceil() as usize)
            .max(1)
    }

    /// Sends tasks to idle participants, drawn at random, until `concurrency` are out
    /// (tasks given up do not count). Sends nothing while fewer than `min_participants`
    /// can be asked.
    async fn top_up(&mut self, c: &Coordinator, sent: &mut Vec<String>) -> Result<(), SessionError> {
        let cfg = &self.state.config;
        let out = self.inflight.values().filter(|f| !f.given_up).count();
        let want = self.concurrency().saturating_sub(out);
        if want == 0 || self.available.len() < cfg.min_participants {
            return Ok(());
        }
        let busy: BTreeSet<&str> = self.inflight.values().map(|f| f.participant.as_str()).collect();
        let mut idle: Vec<String> = self
            .available
            .iter()
            .filter(|p| !busy.contains(p.as_str()) && !self.resting.contains(*p))
            .cloned()
            .collect();
        if idle.is_empty() {
            return Ok(());
        }
        let id = self.state.id.clone();
        let version = self.version();
        let base = &self.bases[&version];
        let mut tasks = Vec::new();
        for _ in 0..want.min(idle.len()) {
            let seq = self.seq;
            self.seq += 1;
            let draw = splitmix(cfg.seed ^ (u64::from(version) << 40) ^ seq);
            let participant = idle.swap_remove((draw % idle.len() as u64) as usize);
            let mut config = Coordinator::worker_config(cfg, "train", splitmix(draw));
            deep_merge(&mut config, &partition_config(cfg, &participant));
            tasks.push(Outgoing {
                participant: participant.clone(),
                task_id: format!("{id}.b{version}.{seq}.{participant}"),
                module: self.workers.for_node(participant_node(&participant)).digest,
                component: self.workers.for_node(participant_node(&participant)).component.clone(),
                config,
                inputs: vec![base.input.clone()],
                world: None,
                inline_outputs: INLINE_OUTPUTS,
                fresh: c.started_here(&id),
            });
        }
        let placed = c.send_tasks(&id, version + 1, tasks, &self.node_keys).await?;
        let now = Instant::now();
        let deadline = now + Duration::from_secs_f64(cfg.round_timeout_secs);
        for (task_id, participant) in placed {
            sent.push(participant.clone());
            self.inflight.insert(task_id, Inflight { participant, version, sent: now, deadline, given_up: false });
        }
        Ok(())
    }

    /// When the run ends: what it still held back (answers read, models tasks still out
    /// trained from) is removed, unless `retain_updates`. When it ended for good (its limit
    /// or a stop rule), so are the answers taken for a next step that will not come, and
    /// the answers of tasks still out, waited for (twice the slowest answer of the run,
    /// from 200 ms to [`LATE_ANSWERS`] and at most the session's `round_timeout_secs`) and
    /// removed as they come; one later than that, or of a task given up at its deadline or
    /// whose node left, leaves its blob behind. Gives the state.
    pub(crate) async fn release(mut self, c: &Coordinator) -> SessionState {
        let id = self.state.id.clone();
        for (_, l) in std::mem::take(&mut self.held) {
            c.note_leftovers(&id, l);
        }
        // A run that ended (its limit or a stop rule) is not resumed: the answers it took
        // for a next step and those still to come are removed. A stopped or failed run may
        // be resumed, and its tasks sent again under the same ids, which a node answers
        // from what it stored: those stay.
        let ended = matches!(self.state.ending, Some(Ending::Limit | Ending::Scheduler));
        if ended {
            for (_, reply) in std::mem::take(&mut self.carried) {
                c.note_leftovers(&id, Leftovers::of_reply(&reply));
            }
        }
        for b in self.bases.values().filter(|b| b.digest != self.state.model) {
            c.note_replaced(&id, b.digest);
        }
        if self.state.config.retain_updates {
            c.forget_leftovers(&id);
        } else {
            if ended {
                self.late_answers(c).await;
            }
            c.discard_leftovers(&id).await;
        }
        self.state
    }

    /// Checks a message on the run's reply queue ([`Coordinator::accept_reply`]): the
    /// answer of a task out, taken off `inflight`, its time counted in `slowest`.
    fn accept(
        &mut self,
        c: &Coordinator,
        reply_to: &str,
        verifier: Option<&tessera_identity::Verifier>,
        payload: &[u8],
    ) -> Option<(Inflight, TaskReply)> {
        let id = self.state.id.clone();
        let accepted = c.accept_reply(&id, None, reply_to, payload, &self.node_keys, verifier, &mut self.inflight);
        if let Some((task, _)) = &accepted {
            self.slowest = self.slowest.max(task.sent.elapsed());
        }
        accepted
    }

    /// Takes the answers of tasks still out as they come, for removal (see [`Self::release`]
    /// for how long).
    async fn late_answers(&mut self, c: &Coordinator) {
        let id = self.state.id.clone();
        let reply_to = reply_queue(&id);
        let verifier = c.reply_verifier();
        // Twice the slowest answer so far: a node that is silent holds the end up little.
        let bound = (self.slowest * 2)
            .max(LATE_ANSWERS_AT_LEAST)
            .min(LATE_ANSWERS)
            .min(Duration::from_secs_f64(self.state.config.round_timeout_secs));
        let until = Instant::now() + bound;
        while !self.inflight.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::debug!(session = %id, tasks = self.inflight.len(), "answers still out at the end are left");
                break;
            }
            let batch = match c.backend.bus.get_batch(&reply_to, REPLY_BATCH, left).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(session = %id, "waiting for the answers still out: {e}; they are left");
                    break;
                }
            };
            for d in &batch {
                if let Some((_, reply)) = self.accept(c, &reply_to, verifier.as_ref(), &d.payload) {
                    c.note_leftovers(&id, Leftovers::of_reply(&reply));
                }
            }
            ack_all(batch).await;
        }
    }

    /// Loads the current global model when the run (re)starts.
    async fn load_current(&mut self, c: &Coordinator) -> Result<(), SessionError> {
        let version = self.version();
        if self.bases.contains_key(&version) {
            return Ok(());
        }
        let digest = self.state.model;
        let bytes = c
            .retry("reading the global model", || c.backend.blobs.get(&digest))
            .await?
            .ok_or_else(|| SessionError::Aggregate("the global model is missing".into()))?;
        let model =
            Model::decode(&bytes, TensorLimits::default()).map_err(|e| SessionError::Aggregate(e.to_string()))?;
        self.bases.insert(version, Base { input: model_input(&bytes, digest), model: Arc::new(model), digest });
        Ok(())
    }

    /// After step `step`: tasks whose model is now more than `max_staleness` steps old
    /// are given up (their answers would be refused), and models no task out or carried
    /// answer trains from are let go (removed from the blob store with the step's
    /// leftovers); those still used are spared.
    fn after_step(&mut self, c: &Coordinator, step: u32, failures: &mut Vec<Failure>) {
        let max = self.fb.max_staleness;
        for f in self.inflight.values_mut() {
            let staleness = step.saturating_sub(f.version);
            if !f.given_up && staleness > max {
                f.given_up = true;
                failures.push(Failure {
                    node: f.participant.clone(),
                    error: format!(
                        "given up: it trains from the model of step {}, now {staleness} steps old (max_staleness {max})",
                        f.version
                    ),
                });
            }
        }
        let used: BTreeSet<u32> = self
            .inflight
            .values()
            .filter(|f| !f.given_up)
            .chain(self.carried.iter().map(|(f, _)| f))
            .map(|f| f.version)
            .chain([step])
            .collect();
        let id = self.state.id.clone();
        self.bases.retain(|v, b| {
            let keep = used.contains(v);
            if !keep {
                c.note_replaced(&id, b.digest);
            }
            keep
        });
        let done: Vec<u32> = self.held.keys().filter(|v| !used.contains(v)).copied().collect();
        for v in done {
            c.note_leftovers(&id, self.held.remove(&v).unwrap_or_default());
        }
        // A model still trained from may be the very bytes of something let go.
        c.spare_leftovers(&id, self.bases.values().map(|b| b.digest));
        self.resting.clear();
    }
}

/// SplitMix64's output function (Steele, Lea and Flood, 2014): participant draws and seeds.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What one server step gathered.
struct Step {
    /// When an update was last taken (or the step started).
    progress: Instant,
    contributed: Vec<String>,
    staleness: Vec<u32>,
    failures: Vec<Failure>,
    loss_sum: f64,
    compute_seconds: f64,
    fixed: Option<(u64, BTreeMap<String, FixedTensor>)>,
}

#[async_trait]
impl Program for FedBuffRun<'_> {
    fn run_id(&self) -> &str {
        &self.state.id
    }
    fn completed(&self) -> u32 {
        self.state.completed_rounds
    }
    fn limit(&self) -> u32 {
        self.state.config.rounds
    }

    async fn iteration(&mut self, c: &Coordinator, step: u32) -> Result<bool, SessionError> {
        let started = self.clock.unwrap_or_else(Instant::now);
        let id = self.state.id.clone();
        let cfg = self.state.config.clone();
        let timeout = Duration::from_secs_f64(cfg.round_timeout_secs);
        self.load_current(c).await?;
        let version = self.version();
        let current = self.bases[&version].model.clone();
        let max_update = self.bases[&version].input.size.saturating_mul(2).saturating_add(1 << 20);
        let mut buffer = FedBuffBuffer::new(step, &current.floats, self.fb.staleness_exponent, c.threads);
        let mut got = Step {
            progress: Instant::now(),
            contributed: Vec::new(),
            staleness: Vec::new(),
            failures: Vec::new(),
            loss_sum: 0.0,
            compute_seconds: 0.0,
            fixed: None,
        };
        let mut sent = Vec::new();
        let reply_to = reply_queue(&id);
        let verifier = c.reply_verifier();
        let check_every = (c.backend.members.ttl() / 2).max(Duration::from_millis(200));
        let mut last_check: Option<Instant> = None;
        let mut timings = RoundTimings::default();
        let mut told = false;
        while buffer.len() < self.fb.buffer_size {
            if let Some((task, reply)) = self.carried.pop_front() {
                self.fold_in(c, step, task, &reply, max_update, &mut buffer, &mut got, &mut timings).await;
                continue;
            }
            if last_check.is_none_or(|t| t.elapsed() >= check_every) {
                last_check = Some(Instant::now());
                if c.stop_requested(&id).await {
                    return Err(SessionError::Stopped);
                }
                self.refresh(c, &mut got.failures).await;
            }
            if got.progress.elapsed() >= timeout {
                return Err(too_few(step, buffer.len(), self.fb.buffer_size, &got.failures));
            }
            let placing = Instant::now();
            self.top_up(c, &mut sent).await?;
            timings.dispatch += placing.elapsed().as_secs_f64();
            if !told && !self.inflight.is_empty() {
                told = true;
                let training: Vec<String> = self.inflight.values().map(|f| f.participant.clone()).collect();
                self.observer.round_started(step, &training);
            }
            let left = timeout.saturating_sub(got.progress.elapsed()).min(check_every);
            if self.inflight.is_empty() {
                // Nobody to ask: wait for nodes to come (the step's bound still holds).
                tokio::time::sleep(left.min(Duration::from_millis(200))).await;
                last_check = None;
                continue;
            }
            let waiting = Instant::now();
            let batch = match c.backend.bus.get_batch(&reply_to, REPLY_BATCH, left).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("waiting for replies: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200).min(left)).await;
                    continue;
                }
            };
            timings.waiting += waiting.elapsed().as_secs_f64();
            for d in &batch {
                match self.accept(c, &reply_to, verifier.as_ref(), &d.payload) {
                    // Its model fell behind: dropped (it was counted a failure then).
                    // (No answer still to come trains from its model.)
                    Some((task, reply)) if task.given_up => c.note_leftovers(&id, Leftovers::of_reply(&reply)),
                    // Full: the step is taken with exactly K; the rest open the next.
                    Some((task, reply)) if buffer.len() >= self.fb.buffer_size => self.carried.push_back((task, reply)),
                    Some((task, reply)) => {
                        self.fold_in(c, step, task, &reply, max_update, &mut buffer, &mut got, &mut timings).await
                    }
                    None => {}
                }
            }
            ack_all(batch).await;
            // Deadlines after the replies: an answer that came while the coordinator was
            // busy is taken, not given up.
            self.expire(&mut got.failures);
        }
        if !told {
            self.observer.round_started(step, &got.contributed);
        }

        // The server step.
        let aggregating = Instant::now();
        let examples = buffer.examples();
        let floats = buffer
            .apply(&current.floats, self.fb.server_learning_rate)
            .map_err(|e| SessionError::Aggregate(in_round(step, &e)))?;
        let mut model = current.with_floats(floats);
        if let Some((_, fixed)) = got.fixed.take() {
            model.fixed = fixed;
        }
        timings.aggregation += aggregating.elapsed().as_secs_f64();
        let new_model = Arc::new(model.clone());
        let done = Aggregated {
            selected: sent,
            contributed: got.contributed,
            failures: got.failures,
            examples,
            train_loss: got.loss_sum / examples.max(1) as f64,
            compute_seconds: got.compute_seconds,
            model,
            dp_epsilon: None,
            dp_sample_rate: None,
            timings,
        };
        let ctx = RoundCtx {
            state: &self.state,
            workers: self.workers,
            round: step,
            started,
            selected: Vec::new(),
            available: self.available.clone(),
            global: Bytes::new(),
            global_ref: self.bases[&version].input.clone(),
            seed_base: 0,
        };
        // Its stop rule may read the evaluation: the step waits for it.
        let mut report = c.finish_round(&ctx, self.strategy.as_ref(), done).await?.settle(false).await?;
        report.staleness = got.staleness;
        let bytes = new_model.encode();
        self.bases
            .insert(step, Base { input: model_input(&bytes, report.model), model: new_model, digest: report.model });
        self.after_step(c, step, &mut report.failures);

        let accepted: u64 = self.state.reports.iter().chain([&report]).map(|r| r.contributed.len() as u64).sum();
        let seconds: f64 = self.state.reports.iter().chain([&report]).map(|r| r.seconds).sum();
        let stop = self.fb.max_updates.is_some_and(|m| accepted >= m)
            || self.fb.target_accuracy.is_some_and(|a| report.eval_accuracy.is_some_and(|x| x >= a))
            || self.fb.max_seconds.is_some_and(|m| seconds >= m);
        if stop {
            self.state.ending = Some(Ending::Scheduler);
        }
        c.commit_round(&mut self.state, report, self.observer, None, &[]).await?;
        self.clock = Some(Instant::now());
        Ok(stop)
    }
}

impl FedBuffRun<'_> {
    /// Fetches an answer's update and takes it into the buffer (the step's progress), or
    /// records it as its participant's failure (who then rests until the next step). What
    /// the answer stored is held for removal (see `held`).
    #[allow(clippy::too_many_arguments)]
    async fn fold_in(
        &mut self,
        c: &Coordinator,
        step: u32,
        task: Inflight,
        reply: &TaskReply,
        max_update: u64,
        buffer: &mut FedBuffBuffer,
        got: &mut Step,
        timings: &mut RoundTimings,
    ) {
        let fetching = Instant::now();
        let outcome = c.collect(&task.participant, reply, max_update).await;
        self.held.entry(task.version).or_default().extend(Leftovers::of_reply(reply));
        timings.transfer += fetching.elapsed().as_secs_f64();
        let folding = Instant::now();
        let participant = task.participant.clone();
        match self.take(step, task, outcome, buffer, got) {
            Ok(()) => got.progress = Instant::now(),
            Err(f) => {
                got.failures.push(f);
                self.resting.insert(participant);
            }
        }
        timings.aggregation += folding.elapsed().as_secs_f64();
    }

    /// Takes one answer into the buffer: its update's difference to the model it trained
    /// from, staleness-weighted. A refused one is its participant's failure.
    fn take(
        &self,
        step: u32,
        task: Inflight,
        outcome: Result<Update, String>,
        buffer: &mut FedBuffBuffer,
        got: &mut Step,
    ) -> Result<(), Failure> {
        let fail = |error: String| Failure { node: task.participant.clone(), error };
        let update = outcome.map_err(fail)?;
        let staleness = self.version().saturating_sub(task.version);
        if staleness > self.fb.max_staleness {
            return Err(fail(format!(
                "update refused: it trained from the model of step {}, {staleness} steps old (max_staleness {})",
                task.version, self.fb.max_staleness
            )));
        }
        let base = &self.bases.get(&task.version).ok_or_else(|| fail("its base model was let go".into()))?.model;
        base.check_same_layout(&update.model).map_err(|e| fail(format!("update refused: {e}")))?;
        let n = update.metrics.num_examples;
        buffer
            .add(&task.participant, &update.model.floats, &base.floats, n, staleness)
            .map_err(|e| fail(format!("update refused: {}", in_round(step, &e))))?;
        if !update.model.fixed.is_empty() && got.fixed.as_ref().is_none_or(|(best, _)| n > *best) {
            got.fixed = Some((n, update.model.fixed));
        }
        got.loss_sum += update.metrics.loss * n as f64;
        got.compute_seconds = got.compute_seconds.max(update.seconds);
        got.contributed.push(task.participant);
        got.staleness.push(staleness);
        Ok(())
    }
}

/// Most replies taken from the reply queue in one request.
const REPLY_BATCH: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    fn session(fedbuff: &str, more: &str) -> Result<SessionConfig, SessionError> {
        SessionConfig::from_yaml(&format!("module: a.b@0.1.0\neval_dataset: test\n{more}fedbuff:\n{fedbuff}"))
    }

    #[test]
    fn fedbuff_settings_are_read_and_written_back() {
        let c = session("  buffer_size: 5\n  max_updates: 100\n  target_accuracy: 0.9\n", "").unwrap();
        let fb = c.fedbuff.clone().unwrap();
        assert_eq!((fb.buffer_size, fb.max_updates, fb.max_staleness), (5, Some(100), 20));
        assert_eq!((fb.staleness_exponent, fb.server_learning_rate), (0.5, 1.0));
        let again: SessionConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(again, c);
        assert!(session("  {}\n", "").is_ok(), "every setting has a default");
    }

    #[test]
    fn bad_fedbuff_settings_are_refused_naming_them() {
        for (fedbuff, more, word) in [
            ("  buffer_size: 0\n", "", "buffer_size"),
            ("  buffer_size: 99999999999999999999\n", "", "line 4"),
            ("  concurrency: 1000000000\n", "", "concurrency"),
            ("  staleness_exponent: .nan\n", "", "staleness_exponent"),
            ("  staleness_exponent: -1\n", "", "staleness_exponent"),
            ("  server_learning_rate: 0\n", "", "server_learning_rate"),
            ("  server_learning_rate: 1e300\n", "", "server_learning_rate"),
            ("  max_staleness: -1\n", "", "line 4"),
            ("  max_updates: 0\n", "", "max_updates"),
            ("  target_accuracy: 2\n", "", "target_accuracy"),
            ("  max_seconds: .inf\n", "", "max_seconds"),
            ("  bufer_size: 3\n", "", "bufer_size"),
            ("  {}\n", "strategy: krum\n", "krum"),
            ("  {}\n", "differential_privacy: {noise_multiplier: 1, clipping_norm: 1}\n", "differential privacy"),
            ("  {}\n", "secure_aggregation: {}\n", "secure aggregation"),
        ] {
            let e = session(fedbuff, more).unwrap_err().to_string();
            assert!(e.contains(word), "{fedbuff}{more}: {e}");
        }
        let e = SessionConfig::from_yaml("module: a.b@0.1.0\nfedbuff:\n  target_accuracy: 0.9\n").unwrap_err();
        assert!(e.to_string().contains("eval_dataset"), "{e}");
    }
}
