//! Federated sessions on the engine: the worker stage is the strategy's participants
//! training the global model, the aggregator is the built-in strategy machinery
//! (FedAvg and the others, differential privacy; secure and hierarchical rounds in their
//! own files), the scheduler is the round limit. The initial model, the coordinator's
//! evaluation and federated evaluation are here too.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tessera_core::PackageRef;
use tessera_core::config::deep_merge;
use tessera_core::name::check_ident;
use tessera_core::privacy;
use tessera_core::strategy::Strategy;
use tessera_core::tensor::{Model, TensorLimits};
use tessera_core::wire::{
    BlobRef, Failure, Lineage, NodeRecord, RoundReport, RoundTimings, SCHEMA_VERSION, TaskOutcome, TaskReply,
    WorkerMetrics,
};
use tessera_ports::read_ref;

use crate::dispatch::{model_input, participant_node};
use crate::engine::{Coordinator, Observer, Program};
use crate::evaluation::Finished;
use crate::fold::{Fold, Update, collect_window};
use crate::placement::{Workers, eligible_of, module_use};
use crate::retention::Leftovers;
use crate::state::Ending;
use crate::{DpSide, SessionConfig, SessionError, SessionResult, SessionState};

/// An error's message said of `round`: prefixed with `round N: ` unless it already is
/// (strategies' errors name their round themselves).
pub(crate) fn in_round(round: u32, e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    let prefix = format!("round {round}: ");
    if text.starts_with(&prefix) { text } else { format!("{prefix}{text}") }
}

/// The part of a round's task ids that names the model its tasks start from
/// (`.m<16 hex digits of its digest>`): a node answers a task id it answered before from
/// its record, and a round run again from another model (a resumed session's round
/// whose model before was never saved, its server-side noise drawn afresh) must not be
/// given answers computed from the first.
pub(crate) fn base_attempt(model: &tessera_core::Digest) -> String {
    format!(".m{}", &model.hex()[..16])
}

/// The participants of a round drawn from `nodes`: the nodes, or their virtual clients.
pub(crate) fn participants_of(cfg: &SessionConfig, nodes: Vec<String>) -> Vec<String> {
    match cfg.clients_per_node {
        None => nodes,
        Some(k) => nodes.iter().flat_map(|n| (0..k).map(move |j| format!("{n}.c{j}"))).collect(),
    }
}

/// The worker config a participant adds: its share of the node's data when simulating.
pub(crate) fn partition_config(cfg: &SessionConfig, participant: &str) -> Value {
    match (cfg.clients_per_node, participant.rsplit_once(".c")) {
        (Some(k), Some((_, j))) => json!({"partition": j.parse::<usize>().unwrap_or(0), "partitions": k}),
        _ => json!({}),
    }
}

/// A federated session as the engine's program: one round per iteration. A round's
/// coordinator evaluation runs beside the next round's training ([`Pending`]); the round
/// is recorded (saved, its leftovers removed, the observer told) once both are done, so
/// the saved state is always that of a whole round, evaluation included. A round without
/// one, or of a streamed model, is recorded at once.
struct FlRun<'a> {
    state: SessionState,
    workers: &'a Workers,
    strategy: Box<dyn Strategy>,
    accountant: privacy::RdpAccountant,
    observer: &'a dyn Observer,
    pending: Option<Pending>,
}

/// What a round's end leaves to do: its evaluation to run beside the next round, or its
/// report to record now.
enum Next {
    Beside(Finished),
    Now(RoundReport),
}

/// A round whose model is stored and whose evaluation still runs: what it left behind is
/// kept apart from the next round's until it is recorded.
struct Pending {
    finished: Finished,
    leftovers: Leftovers,
}

#[async_trait]
impl Program for FlRun<'_> {
    fn run_id(&self) -> &str {
        &self.state.id
    }
    fn completed(&self) -> u32 {
        self.state.completed_rounds
    }
    fn limit(&self) -> u32 {
        self.state.config.rounds
    }
    async fn iteration(&mut self, c: &Coordinator, round: u32) -> Result<bool, SessionError> {
        // The round before is recorded once both its evaluation and this round's training
        // are done. Its evaluation failing ends the session with the rounds recorded before
        // it; this round failing, with it recorded.
        let before = self.pending.take();
        let (finished, settled) = tokio::join!(
            c.round(&self.state, self.workers, self.strategy.as_mut(), &mut self.accountant, round, self.observer),
            async move {
                match before {
                    Some(p) => Some((p.finished.settle(true).await, p.leftovers)),
                    None => None,
                }
            },
        );
        let before = match settled {
            Some((report, leftovers)) => Some((report?, leftovers)),
            None => None,
        };
        let finished = match finished {
            Ok(f) => f,
            Err(e) => {
                if let Some((report, leftovers)) = before {
                    c.commit_round(&mut self.state, report, self.observer, Some(leftovers), &[]).await?;
                }
                return Err(e);
            }
        };
        // A round whose evaluation cannot run beside the next (none, or a streamed model
        // the next round should not hold a copy of meanwhile) is settled now.
        let next =
            if finished.runs_beside() { Next::Beside(finished) } else { Next::Now(finished.settle(false).await?) };
        let model = match &next {
            Next::Beside(f) => f.model(),
            Next::Now(r) => r.model,
        };
        let saved = Bytes::from(self.strategy.state());
        let strategy_state = c.retry("saving the strategy's state", || c.backend.blobs.put(saved.clone())).await?;
        if let Some((report, leftovers)) = before {
            // Saved with this round's model and strategy state pinned: the next round's,
            // not yet in a saved state, and kept from any run's retention meanwhile.
            c.commit_round(&mut self.state, report, self.observer, Some(leftovers), &[model, strategy_state]).await?;
        }
        // The state saved is still the last recorded round's; this round's model and
        // strategy state replace its own when this round is recorded (and the replaced
        // ones are removed only then).
        let id = self.state.id.clone();
        if let Some(old) = self.state.strategy_state {
            c.note_replaced(&id, old);
        }
        c.note_replaced(&id, self.state.model);
        self.state.strategy_state = Some(strategy_state);
        self.state.model = model;
        let leftovers = c.take_leftovers(&id);
        match next {
            Next::Beside(finished) => self.pending = Some(Pending { finished, leftovers }),
            Next::Now(report) => c.commit_round(&mut self.state, report, self.observer, Some(leftovers), &[]).await?,
        }
        // The round limit is the scheduler: the engine stops at it.
        Ok(false)
    }

    async fn settle(&mut self, c: &Coordinator) -> Result<(), SessionError> {
        if let Some(p) = self.pending.take() {
            let report = p.finished.settle(false).await?;
            c.commit_round(&mut self.state, report, self.observer, Some(p.leftovers), &[]).await?;
        }
        Ok(())
    }
}

impl Coordinator {
    /// Records a finished round (or server step) in `state` (its model, contributors and
    /// report; the round limit as the ending when reached and no other ending is set),
    /// saves the state, removes what the round left behind (unless `retain_updates`) and
    /// tells the observer. What the round left behind is `leftovers`, or when `None`
    /// everything the run noted so far; `also` are blobs pinned with the state beside
    /// those it names (the next round's model and strategy state, stored already).
    pub(crate) async fn commit_round(
        &self,
        state: &mut SessionState,
        report: RoundReport,
        observer: &dyn Observer,
        leftovers: Option<Leftovers>,
        also: &[tessera_core::Digest],
    ) -> Result<(), SessionError> {
        state.completed_rounds = report.round;
        state.model = report.model;
        state.contributors.extend(report.contributed.iter().map(|p| participant_node(p).to_owned()));
        if report.round >= state.config.rounds && state.ending.is_none() {
            state.ending = Some(Ending::Limit);
        }
        let (seconds, ok, failed) = (report.seconds, report.contributed.len(), report.failures.len());
        state.reports.push(report);
        self.save(state, also).await?;
        // Counted once saved: a round whose save failed is run again after a resume.
        {
            use tessera_ports::metrics as m;
            let strategy =
                if state.config.fedbuff.is_some() { "fedbuff".to_owned() } else { state.config.strategy.name.clone() };
            metrics::counter!(m::ROUNDS, "strategy" => strategy.clone()).increment(1);
            metrics::histogram!(m::ROUND_SECONDS, "strategy" => strategy).record(seconds);
            metrics::gauge!(m::ROUND_PARTICIPANTS).set(ok as f64);
            metrics::counter!(m::TASKS, "outcome" => "ok").increment(ok as u64);
            metrics::counter!(m::TASKS, "outcome" => "failed").increment(failed as u64);
        }
        let leftovers = leftovers.unwrap_or_else(|| self.take_leftovers(&state.id));
        if !state.config.retain_updates {
            self.discard(&state.id, leftovers).await;
        }
        if let Some(r) = state.reports.last() {
            observer.round_finished(r);
        }
        Ok(())
    }
}

impl Coordinator {
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
        let module_use = module_use(&record, "worker");
        let mut nodes = BTreeMap::new();
        for (node, m) in &cfg.node_modules {
            let r: PackageRef = m.parse().map_err(|e| SessionError::Config(format!("node_modules.{node}: {e}")))?;
            nodes.insert(node.clone(), self.source.resolve(&r).await?);
        }
        let workers = Workers { default: record.clone(), nodes };
        let eligible = self.eligible(cfg, &workers).await?;
        let participants = eligible.len() * cfg.clients_per_node.unwrap_or(1);
        if participants < cfg.min_participants {
            if eligible.is_empty()
                && let Some(why) = self.why_not_placed(cfg, &workers).await
            {
                return Err(SessionError::Participants(why));
            }
            return Err(SessionError::Participants(format!(
                "{} node(s) hold dataset {:?} and run {} modules; the session needs at least {}",
                eligible.len(),
                cfg.dataset,
                record.runtime,
                cfg.min_participants
            )));
        }
        observer.started(id, &record, &eligible, cfg.rounds, 0);
        let model = {
            // Its bytes are dropped once stored: rounds read the model from the store.
            let bytes = self.initial_model(id, cfg, &workers, &eligible).await?;
            self.retry("storing the initial model", || self.backend.blobs.put(bytes.clone())).await?
        };
        let mut state = SessionState {
            schema: SCHEMA_VERSION,
            id: id.to_owned(),
            config: cfg.clone(),
            module: module_use,
            completed_rounds: 0,
            model,
            contributors: BTreeSet::new(),
            reports: Vec::new(),
            report_blocks: Vec::new(),
            node_modules: workers.uses(),
            strategy_state: None,
            coordinator_datasets: self.local.as_ref().map(|n| (*n.datasets()).clone()).unwrap_or_default(),
            updated_ms: 0,
            ending: None,
        };
        self.save(&mut state, &[]).await?;
        // Saved: a later `run` of this id is refused, so no task of it went out before.
        // (The initial model's task, sent before the save, is not fresh.)
        self.mark_started(id);
        let result = self.drive(state, &workers, observer).await;
        self.forget_started(id);
        self.forget_leftovers(id);
        result
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

    /// Continues a session from its last completed round (after its coordinator died).
    /// A finished session gives its result again without running anything.
    pub async fn resume(&self, id: &str, observer: &dyn Observer) -> Result<SessionResult, SessionError> {
        check_ident("session id", id).map_err(|e| SessionError::Config(e.to_string()))?;
        self.forget_started(id);
        let state = self.state(id).await?.ok_or_else(|| SessionError::Unknown(id.to_owned()))?;
        let stored = |used: &tessera_core::wire::ModuleUse| {
            used.module.parse::<PackageRef>().map_err(|e| SessionError::Config(format!("stored module reference: {e}")))
        };
        let record = self.resolve_used(&state.module, stored(&state.module)?).await?;
        let mut nodes = BTreeMap::new();
        for (node, used) in &state.node_modules {
            let rec = self
                .resolve_used(used, stored(used)?)
                .await
                .map_err(|e| SessionError::Config(format!("the worker of node {node}: {e}")))?;
            nodes.insert(node.clone(), rec);
        }
        let workers = Workers { default: record.clone(), nodes };
        let eligible = self.eligible(&state.config, &workers).await?;
        observer.started(id, &record, &eligible, state.config.rounds, state.completed_rounds);
        tracing::info!(session = id, done = state.completed_rounds, "resuming");
        let result = self.drive(state, &workers, observer).await;
        self.forget_leftovers(id);
        result
    }

    async fn drive(
        &self,
        state: SessionState,
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
        let (mut state, ending) = if state.ending == Some(Ending::Scheduler) {
            // A stop rule ended it (FedBuff's): resuming runs nothing more.
            (state, Ending::Scheduler)
        } else if cfg.fedbuff.is_some() {
            let mut program = crate::fedbuff::FedBuffRun::new(state, workers, strategy, observer);
            let ending = self.iterate(&mut program).await;
            let state = program.release(self).await;
            (state, ending?)
        } else {
            let mut program = FlRun { state, workers, strategy, accountant, observer, pending: None };
            let ending = self.iterate(&mut program).await?;
            (program.state, ending)
        };
        if ending == Ending::Stopped || state.ending.is_none() {
            state.ending = Some(ending);
            self.save(&mut state, &[]).await?;
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
            strategy: if cfg.fedbuff.is_some() { "fedbuff".into() } else { cfg.strategy.name.clone() },
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
            metrics: Lineage::metrics_of(&state.reports),
            placements: BTreeMap::new(),
            datasets: vec![cfg.dataset.clone()],
            base_model: None,
        };
        Ok(SessionResult {
            session: state.id,
            model_digest: state.model,
            model,
            reports: state.reports,
            lineage,
            final_metrics,
            ending: state.ending.unwrap_or(Ending::Limit),
        })
    }

    pub(crate) fn worker_config(cfg: &SessionConfig, mode: &str, seed: u64) -> Value {
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
                && let Some(b) =
                    self.retry("reading the initial model", || read_ref(self.backend.blobs.as_ref(), m)).await?
            {
                return Ok(b);
            }
        }
        Err(SessionError::Aggregate("no node produced an initial model".into()))
    }

    /// Fetches and decodes a participant's update; `max_bytes` bounds the model blob it may
    /// name (an update is the global model's size, give or take its header).
    pub(crate) async fn collect(&self, participant: &str, reply: &TaskReply, max_bytes: u64) -> Result<Update, String> {
        let (outputs, seconds) = match &reply.outcome {
            TaskOutcome::Ok { outputs, seconds } => (outputs, *seconds),
            TaskOutcome::Failed { error } => return Err(error.clone()),
        };
        let get = |name: &str| outputs.iter().find(|o| o.name == name);
        let model = get("model").ok_or("no `model` output")?;
        let metrics = get("metrics").ok_or("no `metrics` output")?;
        if model.size > max_bytes {
            return Err(format!("the update is {} bytes, the model {max_bytes} at most", model.size));
        }
        let (model, metrics) = futures::future::join(
            self.retry("reading an update", || read_ref(self.backend.blobs.as_ref(), model)),
            self.retry("reading metrics", || read_ref(self.backend.blobs.as_ref(), metrics)),
        )
        .await;
        let model = model.map_err(|e| e.to_string())?.ok_or("the `model` blob is missing")?;
        let metrics = metrics.map_err(|e| e.to_string())?.ok_or("the `metrics` blob is missing")?;
        let model = Model::decode(&model, TensorLimits::default()).map_err(|e| e.to_string())?;
        let metrics: WorkerMetrics = serde_json::from_slice(&metrics).map_err(|e| format!("metrics: {e}"))?;
        if metrics.num_examples == 0 {
            return Err("the update is based on zero examples".into());
        }
        Ok(Update { node: participant.to_owned(), model, metrics, seconds })
    }

    pub(crate) async fn round(
        &self,
        state: &SessionState,
        workers: &Workers,
        strategy: &mut dyn Strategy,
        accountant: &mut privacy::RdpAccountant,
        round: u32,
        observer: &dyn Observer,
    ) -> Result<Finished, SessionError> {
        let cfg = &state.config;
        let id = state.id.as_str();
        let started = Instant::now();
        // Nodes may come and go between rounds; a round short of them waits (up to its
        // time-out) for them to come back.
        let seed = cfg.seed ^ u64::from(round).wrapping_mul(0x9E37_79B9);
        let (available, plan) = self
            .wait_for_nodes(id, Duration::from_secs_f64(cfg.round_timeout_secs), |nodes| {
                let available =
                    participants_of(cfg, eligible_of(cfg, workers, nodes).into_iter().map(|n| n.id).collect());
                strategy.configure_fit(round, &available, seed).map(|plan| (available, plan))
            })
            .await?
            .map_err(|e| SessionError::Participants(in_round(round, &e)))?;
        let selected = plan.participants;
        observer.round_started(round, &selected);

        let loaded = self.global_model(&state.model, crate::streamed::may_stream(cfg, strategy)).await?;
        let global_ref = match &loaded.bytes {
            Some(b) => model_input(b, state.model),
            None => BlobRef::stored("model", state.model, loaded.size()),
        };
        let global = loaded.bytes.clone().unwrap_or_default();
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
                &base_attempt(&state.model),
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

        let mut timings = RoundTimings {
            dispatch: replies.dispatch_seconds,
            waiting: replies.wait_seconds,
            ..RoundTimings::default()
        };
        let fetching = Instant::now();
        // Updates are taken in participant order, so the aggregate does not depend on
        // which came first.
        let mut order = selected.clone();
        order.sort();
        let missing = |node: &str| {
            if replies.gone.contains(node) {
                "the node left (its heartbeat stopped)".to_owned()
            } else {
                format!("no reply within {}s", cfg.round_timeout_secs)
            }
        };
        let dp = cfg.differential_privacy.as_ref();
        let (mut aggregate, usable, failures, folding) = if loaded.bytes.is_none() {
            let outcomes = order
                .iter()
                .map(|node| (node.clone(), replies.replies.get(node).ok_or_else(|| missing(node))))
                .collect();
            if strategy.per_coordinate() {
                self.fold_windowed(round, &loaded.layout, strategy, outcomes, cfg.min_participants).await?
            } else {
                self.fold_streamed(round, &loaded.layout, strategy, outcomes, cfg.min_participants).await?
            }
        } else {
            let base =
                Model::decode(&global, TensorLimits::default()).map_err(|e| SessionError::Aggregate(e.to_string()))?;
            let mut fold = Fold::new(round, &base, dp, strategy, self.threads);
            // Updates are fetched side by side (bounded in count and bytes) and taken in
            // order as they come, each dropped once folded in.
            let (replies_ref, missing) = (&replies, &missing);
            let max_update = (global.len() as u64).saturating_mul(2).saturating_add(1 << 20);
            let mut collected = futures::stream::iter(order)
                .map(|node: String| async move {
                    let fail = |error: String| Failure { node: node.clone(), error };
                    match replies_ref.replies.get(&node) {
                        None => Err(fail(missing(&node))),
                        Some(r) => self.collect(&node, r, max_update).await.map_err(fail),
                    }
                })
                .buffered(collect_window(global.len()));
            while let Some(outcome) = collected.next().await {
                fold.take(outcome)?;
            }
            drop(collected);
            if fold.usable.len() < cfg.min_participants {
                return Err(too_few(round, fold.usable.len(), cfg.min_participants, &fold.failures));
            }
            let aggregate = fold.aggregate(strategy)?;
            (aggregate, fold.usable, fold.failures, fold.folding)
        };
        timings.transfer = fetching.elapsed().saturating_sub(folding).as_secs_f64();
        let aggregating = Instant::now();
        let mut dp_epsilon = None;
        let mut dp_sample_rate = None;
        if let Some(dp) = dp {
            let sigma = dp.noise_multiplier * dp.clipping_norm / usable.len() as f64;
            let mut rng = privacy::BoxMuller::new(|| {
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).expect("the operating system's random source works");
                u64::from_le_bytes(b)
            });
            for t in aggregate.floats.0.values_mut() {
                privacy::add_gaussian_noise(&mut t.data, sigma, &mut rng)
                    .map_err(|e| SessionError::Aggregate(in_round(round, &e)))?;
            }
            let q = (selected.len() as f64 / available.len().max(1) as f64).min(1.0);
            accountant.step(dp.noise_multiplier, q, 1).map_err(|e| SessionError::Aggregate(e.to_string()))?;
            dp_epsilon = Some(accountant.epsilon(dp.delta).map_err(|e| SessionError::Aggregate(e.to_string()))?.0);
            dp_sample_rate = Some(q);
        }
        let aggregation = folding + aggregating.elapsed();
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
            timings: RoundTimings { aggregation: aggregation.as_secs_f64(), ..timings },
        };
        let ctx =
            RoundCtx { state, workers, round, started, selected: Vec::new(), available, global, global_ref, seed_base };
        self.finish_round(&ctx, &*strategy, done).await
    }
}

/// What a round has when its participants are chosen.
pub(crate) struct RoundCtx<'a> {
    pub(crate) state: &'a SessionState,
    pub(crate) workers: &'a Workers,
    pub(crate) round: u32,
    pub(crate) started: Instant,
    pub(crate) selected: Vec<String>,
    pub(crate) available: Vec<String>,
    pub(crate) global: Bytes,
    pub(crate) global_ref: BlobRef,
    pub(crate) seed_base: u64,
}

/// A round that ended with fewer usable updates than the session needs.
pub(crate) fn too_few(round: u32, got: usize, min: usize, failures: &[Failure]) -> SessionError {
    SessionError::RoundFailed {
        round,
        got,
        min,
        failures: failures.iter().map(|f| format!("{}: {}", f.node, f.error)).collect::<Vec<_>>().join("; "),
    }
}

/// What a round aggregated, before the new model is stored and evaluated.
pub(crate) struct Aggregated {
    pub(crate) selected: Vec<String>,
    pub(crate) contributed: Vec<String>,
    pub(crate) failures: Vec<Failure>,
    pub(crate) examples: u64,
    pub(crate) train_loss: f64,
    pub(crate) compute_seconds: f64,
    pub(crate) model: Model,
    pub(crate) dp_epsilon: Option<f64>,
    pub(crate) dp_sample_rate: Option<f64>,
    /// Where the round's time went so far (storing the model is added when it is stored).
    pub(crate) timings: RoundTimings,
}

/// Region aggregation tasks of round `r` are numbered `AGG_ROUND_BASE + r`.
pub(crate) const AGG_ROUND_BASE: u32 = 1 << 29;

/// Evaluation tasks of round `r` are numbered `EVAL_ROUND_BASE + r`.
pub(crate) const EVAL_ROUND_BASE: u32 = 1 << 30;
