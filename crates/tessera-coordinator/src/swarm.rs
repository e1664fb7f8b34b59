//! Swarms of user-written tasks on the engine. Each iteration runs the flow's stages in
//! order: a stage places its task (method, maximum, labels, datasets, `needs`, version
//! split), sends it to each chosen node with the outputs of the stages feeding it as
//! inputs, and waits for the replies; then the scheduler's answer decides whether another
//! iteration runs. Tasks share the iteration's world state: globals (which start as those
//! the previous iteration left) and results (`add` by every node, `select` by any).
//!
//! Faults: what a task writes to globals and results is staged under its task id and
//! merged into the iteration's only when the task succeeded, so a task that fails, times
//! out or is retried elsewhere changes nothing. A node that leaves or does not answer is
//! left out of the rest of the iteration; a stage with fewer successes than its task's
//! `min_nodes` is tried again on other eligible nodes (`retries`, for `any` and `random`
//! tasks), else the run stops, recorded as failed. An iteration interrupted by a coordinator that died is started again by
//! `resume` in a fresh world scope from the last completed iteration's globals, with new
//! task ids, so nothing it did before is counted twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tessera_core::config::deep_merge;
use tessera_core::name::check_ident;
use tessera_core::registry::PackageRecord;
use tessera_core::wire::{BlobRef, Failure, Lineage, ModuleUse, NodeRecord, SCHEMA_VERSION, TaskOutcome, WorldScope};
use tessera_core::{Digest, PackageRef};
use tessera_swarm::placement::{self, ModuleFacts};
use tessera_swarm::{Inputs, Method, SwarmSpec};

use crate::SessionError;
use crate::dispatch::Outgoing;
use crate::engine::{Coordinator, Observer, Program};
use crate::placement::{facts, module_use};
use crate::state::Ending;

/// What a swarm run has done so far, stored at `sessions/<id>` when an iteration starts
/// and after it completes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwarmState {
    /// Always the wire schema version.
    pub schema: u32,
    /// Always `swarm` (federated sessions have no kind).
    pub kind: String,
    /// The run id.
    pub id: String,
    /// The swarm.
    pub spec: SwarmSpec,
    /// The packages of each task: one, or one per version of its split (in the split's
    /// order).
    pub modules: BTreeMap<String, Vec<ModuleUse>>,
    /// Iterations completed.
    pub completed_iterations: u32,
    /// Attempts at the next iteration started so far: each has a world scope of its own
    /// (`i<iteration>.a<attempt>`).
    #[serde(default)]
    pub attempt: u32,
    /// The world scope of the last completed iteration, whose globals are the run's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The scheduler's outputs in the last completed iteration, by node, for the tasks an
    /// edge out of the scheduler feeds in the next.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub carried: BTreeMap<String, Vec<BlobRef>>,
    /// Reports of the last [`KEPT_REPORTS`] completed iterations (older ones are dropped so
    /// the state stays well within a world-state value).
    pub reports: Vec<IterationReport>,
    /// Which node ran which package for each task: node -> task -> `name@version`.
    #[serde(default)]
    pub placements: BTreeMap<String, BTreeMap<String, String>>,
    /// How the run ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ending: Option<Ending>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the state was last saved (milliseconds since the Unix epoch).
    #[serde(default)]
    pub updated_ms: u64,
}

/// One iteration, as reported after it completes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IterationReport {
    /// 1-based.
    pub iteration: u32,
    /// Its stages in the order they ran.
    pub stages: Vec<StageReport>,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The scheduler's answer: `false` ended the run (none without a scheduler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proceed: Option<bool>,
}

/// One stage of an iteration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    /// The task.
    pub task: String,
    /// Nodes whose task succeeded, sorted.
    pub succeeded: Vec<String>,
    /// Nodes whose task failed or never answered, and why.
    pub failures: Vec<Failure>,
    /// The package each node ran (`name@version`).
    pub versions: BTreeMap<String, String>,
    /// How many times the stage was sent (1 unless retried on other nodes).
    pub tries: u32,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// What a finished swarm gives back.
#[derive(Clone, Debug)]
pub struct SwarmResult {
    /// The run id.
    pub run: String,
    /// How it ended.
    pub ending: Ending,
    /// Iterations completed.
    pub iterations: u32,
    /// The world's globals after the last completed iteration.
    pub globals: BTreeMap<String, Bytes>,
    /// The digest of the `model` global (stored in the blob store), when there is one.
    pub model: Option<Digest>,
    /// What ran where.
    pub lineage: Lineage,
    /// One report per completed iteration.
    pub reports: Vec<IterationReport>,
}

/// Iteration reports kept in a run's state.
pub const KEPT_REPORTS: usize = 32;

/// The resolved packages of each task.
type Packages = BTreeMap<String, Vec<PackageRecord>>;

/// The world key prefix of a scope's globals.
fn globals_prefix(run: &str, scope: &str) -> String {
    format!("runs/{run}/{scope}/globals/")
}

impl Coordinator {
    /// Runs a new swarm to its end: resolves every task's module, refuses the run before
    /// anything starts when a task cannot be placed (naming the task, the field and why),
    /// then iterates. An id that already has a run is refused (use
    /// [`Coordinator::resume_swarm`]).
    pub async fn run_swarm(
        &self,
        id: &str,
        spec: &SwarmSpec,
        observer: &dyn Observer,
    ) -> Result<SwarmResult, SessionError> {
        check_ident("run id", id).map_err(|e| SessionError::Config(e.to_string()))?;
        spec.validate()?;
        if self.record(id).await?.is_some() {
            return Err(SessionError::Config(format!("run {id} exists already; resume it or pick another id")));
        }
        let packages = self.resolve_tasks(spec).await?;
        let nodes = self.nodes().await?;
        for (name, task) in &spec.tasks {
            placement::eligible(name, task, &task_facts(&packages[name]), &nodes)?;
        }
        let state = SwarmState {
            schema: SCHEMA_VERSION,
            kind: "swarm".into(),
            id: id.to_owned(),
            spec: spec.clone(),
            modules: packages
                .iter()
                .map(|(t, rs)| (t.clone(), rs.iter().map(|r| module_use(r, t)).collect()))
                .collect(),
            completed_iterations: 0,
            attempt: 0,
            scope: None,
            carried: BTreeMap::new(),
            reports: Vec::new(),
            placements: BTreeMap::new(),
            ending: None,
            error: None,
            updated_ms: 0,
        };
        self.save_swarm(&state).await?;
        // Saved: a later `run_swarm` of this id is refused, so no task of it went out before.
        self.mark_started(id);
        let result = self.drive_swarm(state, packages, observer).await;
        self.forget_started(id);
        result
    }

    /// Continues a swarm whose coordinator stopped, from its last completed iteration (an
    /// interrupted iteration starts again, in a fresh world scope). The packages are the
    /// exact ones the run started with (by digest). A finished run gives its result again.
    pub async fn resume_swarm(&self, id: &str, observer: &dyn Observer) -> Result<SwarmResult, SessionError> {
        check_ident("run id", id).map_err(|e| SessionError::Config(e.to_string()))?;
        self.forget_started(id);
        let mut state = match self.record(id).await? {
            None => return Err(SessionError::Unknown(id.to_owned())),
            Some(crate::RunRecord::Swarm(s)) => s,
            Some(crate::RunRecord::Session(_)) => {
                return Err(SessionError::Config(format!("{id} is a federated session; resume it as one")));
            }
        };
        // What is stored is outside input too: a spec that does not check, or packages
        // that do not match its tasks, are refused rather than run.
        state.spec.validate()?;
        for (task, t) in &state.spec.tasks {
            let want = if t.versions.is_empty() { 1 } else { t.versions.len() };
            if state.modules.get(task).map(Vec::len) != Some(want) {
                return Err(SessionError::Config(format!("run {id}: the stored packages of task {task} are damaged")));
            }
        }
        if state.modules.len() != state.spec.tasks.len() {
            return Err(SessionError::Config(format!("run {id}: the stored packages do not match its tasks")));
        }
        if state.ending == Some(Ending::Failed) {
            state.ending = None;
            state.error = None;
        }
        // Its scheduler had ended it, and the coordinator died before recording that.
        if state.ending.is_none() && state.reports.last().is_some_and(|r| r.proceed == Some(false)) {
            state.ending = Some(Ending::Scheduler);
        }
        let mut packages = Packages::new();
        for (task, uses) in &state.modules {
            let mut records = Vec::new();
            for u in uses {
                records.push(self.resolve_used(u, PackageRef::Digest(u.digest)).await.map_err(|e| {
                    SessionError::Config(format!("task {task}: package {} ({}): {e}", u.module, u.digest))
                })?);
            }
            packages.insert(task.clone(), records);
        }
        tracing::info!(run = id, done = state.completed_iterations, "resuming");
        self.drive_swarm(state, packages, observer).await
    }

    /// Each task's packages, resolved through the package source; a task whose module is a
    /// folder or does not resolve is refused, naming the task.
    async fn resolve_tasks(&self, spec: &SwarmSpec) -> Result<Packages, SessionError> {
        let mut out = Packages::new();
        for (name, task) in &spec.tasks {
            let field = format!("tasks.{name}.module");
            if let Some(path) = task.local_path() {
                return Err(SessionError::Spec(spec.error_at(
                    &field,
                    format!("task {name}: {path} is a folder; publish it first (tessera swarm run does it for you)"),
                )));
            }
            let refs = task
                .references()
                .map_err(|e| SessionError::Spec(spec.error_at(&field, format!("task {name}: {e}"))))?;
            let mut records = Vec::new();
            for r in refs {
                let rec = self
                    .source
                    .resolve(&r)
                    .await
                    .map_err(|e| SessionError::Spec(spec.error_at(&field, format!("task {name}: {r}: {e}"))))?;
                records.push(rec);
            }
            out.insert(name.clone(), records);
        }
        Ok(out)
    }

    async fn save_swarm(&self, state: &SwarmState) -> Result<(), SessionError> {
        let mut state = state.clone();
        state.updated_ms = tessera_identity::now_ms();
        let names: BTreeSet<Digest> =
            state.carried.values().flatten().filter(|r| r.inline.is_none()).map(|r| r.digest).collect();
        let bytes = serde_json::to_vec(&state).map_err(|e| SessionError::Aggregate(e.to_string()))?;
        self.save_record(&state.id, bytes, &names).await
    }

    async fn drive_swarm(
        &self,
        state: SwarmState,
        packages: Packages,
        observer: &dyn Observer,
    ) -> Result<SwarmResult, SessionError> {
        observer.swarm_started(&state.id, &state.spec, state.completed_iterations);
        let ending = match state.ending {
            Some(e) => e,
            None => {
                let mut program = SwarmRun { state, packages: &packages, observer };
                let ended = self.iterate(&mut program).await;
                let mut state = program.state;
                match ended {
                    Ok(ending) => state.ending = Some(ending),
                    Err(e) => {
                        // Recorded, so the run is not listed as running for ever.
                        state.ending = Some(Ending::Failed);
                        state.error = Some(e.to_string());
                        if let Err(save) = self.save_swarm(&state).await {
                            tracing::warn!(run = %state.id, "recording the failure: {save}");
                        }
                        return Err(e);
                    }
                }
                self.save_swarm(&state).await?;
                return self.swarm_result(state).await;
            }
        };
        let mut state = state;
        state.ending = Some(ending);
        self.swarm_result(state).await
    }

    async fn swarm_result(&self, state: SwarmState) -> Result<SwarmResult, SessionError> {
        let mut globals = BTreeMap::new();
        if let Some(scope) = &state.scope {
            let prefix = globals_prefix(&state.id, scope);
            for key in self.retry("listing the run's globals", || self.backend.world.keys(&prefix)).await? {
                if let Some(e) = self.retry("reading a global", || self.backend.world.get(&key)).await? {
                    globals.insert(key[prefix.len()..].to_owned(), e.value);
                }
            }
        }
        let model = match globals.get("model") {
            Some(b) => Some(self.retry("storing the model", || self.backend.blobs.put(b.clone())).await?),
            None => None,
        };
        let mut seen = BTreeSet::new();
        let modules: Vec<ModuleUse> =
            state.modules.values().flatten().filter(|m| seen.insert((m.digest, m.role.clone()))).cloned().collect();
        let nodes: BTreeSet<String> = state.placements.keys().cloned().collect();
        let lineage = Lineage {
            session: state.id.clone(),
            strategy: format!("swarm {}", state.spec.name.as_deref().unwrap_or("(unnamed)")),
            modules,
            nodes: nodes.into_iter().collect(),
            rounds: state.completed_iterations,
            metrics: Vec::new(),
            placements: state.placements.clone(),
            datasets: {
                let mut d: Vec<String> = state.spec.tasks.values().flat_map(|t| t.datasets.iter().cloned()).collect();
                d.sort();
                d.dedup();
                d
            },
            base_model: None,
        };
        Ok(SwarmResult {
            run: state.id,
            ending: state.ending.unwrap_or(Ending::Limit),
            iterations: state.completed_iterations,
            globals,
            model,
            lineage,
            reports: state.reports,
        })
    }

    /// Fills a new scope's globals: the initial ones for the first iteration, else a copy
    /// of those the last completed iteration left.
    async fn seed_globals(
        &self,
        run: &str,
        from: Option<&str>,
        initial: &serde_json::Map<String, Value>,
        to: &str,
    ) -> Result<(), SessionError> {
        let dst = globals_prefix(run, to);
        match from {
            None => {
                for (k, v) in initial {
                    let bytes = Bytes::from(serde_json::to_vec(v).map_err(|e| SessionError::Config(e.to_string()))?);
                    let key = format!("{dst}{k}");
                    self.retry("writing a global", || self.backend.world.put(&key, bytes.clone())).await?;
                }
            }
            Some(prev) => {
                let src = globals_prefix(run, prev);
                for key in self.retry("listing globals", || self.backend.world.keys(&src)).await? {
                    if let Some(e) = self.retry("reading a global", || self.backend.world.get(&key)).await? {
                        let to_key = format!("{dst}{}", &key[src.len()..]);
                        self.retry("writing a global", || self.backend.world.put(&to_key, e.value.clone())).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes what a scope no longer needed holds: its globals, staged writes and results.
    async fn drop_scope(&self, run: &str, scope: &str) {
        let prefix = format!("runs/{run}/{scope}/");
        if let Ok(keys) = self.backend.world.keys(&prefix).await {
            for k in keys {
                let _ = self.backend.world.delete(&k).await;
            }
        }
        if let Err(e) = self.backend.world.clear_results(&prefix).await {
            tracing::debug!(run, scope, "clearing old results: {e}");
        }
    }

    /// Merges what the tasks that succeeded in a stage wrote (staged under their task ids:
    /// globals, and results marked by a key in globals) into the iteration's globals and
    /// results, in node order; what failed tasks wrote is dropped with the scope.
    async fn merge_staged(&self, run: &str, scope: &str, task_ids: &[(String, String)]) -> Result<(), SessionError> {
        let globals = globals_prefix(run, scope);
        let results = format!("runs/{run}/{scope}/results/");
        for (node, task_id) in task_ids {
            let src = format!("runs/{run}/{scope}/staged/{task_id}/globals/");
            for key in self.retry("listing staged globals", || self.backend.world.keys(&src)).await? {
                if let Some(e) = self.retry("reading a staged global", || self.backend.world.get(&key)).await? {
                    let to_key = format!("{globals}{}", &key[src.len()..]);
                    self.retry("writing a global", || self.backend.world.put(&to_key, e.value.clone())).await?;
                }
            }
            let src = format!("runs/{run}/{scope}/staged/{task_id}/results/");
            for key in self.retry("listing staged results", || self.backend.world.keys(&src)).await? {
                let to_key = format!("{results}{}", &key[src.len()..]);
                let staged = self
                    .retry("reading staged results", || self.backend.world.select_results(&key, Some(node)))
                    .await?;
                for e in staged {
                    self.retry("adding a result", || self.backend.world.add_result(&to_key, node, e.value.clone()))
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// The scheduler's answer: its `continue` output (JSON `false`, or `{"continue":
    /// false}`), else the `continue` global of the iteration; going on when neither says
    /// otherwise.
    async fn decision(
        &self,
        run: &str,
        scope: &str,
        outputs: Option<&BTreeMap<String, Vec<BlobRef>>>,
    ) -> Result<bool, SessionError> {
        let read = |b: &[u8]| -> Option<bool> {
            match serde_json::from_slice::<Value>(b).ok()? {
                Value::Bool(v) => Some(v),
                Value::Object(m) => m.get("continue").and_then(Value::as_bool),
                _ => None,
            }
        };
        for refs in outputs.into_iter().flat_map(|o| o.values()) {
            if let Some(r) = refs.iter().find(|r| r.name == "continue")
                && let Some(b) = self
                    .retry("reading the scheduler's answer", || tessera_ports::read_ref(self.backend.blobs.as_ref(), r))
                    .await?
                && let Some(v) = read(&b)
            {
                return Ok(v);
            }
        }
        let key = format!("{}continue", globals_prefix(run, scope));
        Ok(match self.retry("reading the `continue` global", || self.backend.world.get(&key)).await? {
            Some(e) => read(&e.value).unwrap_or(true),
            None => true,
        })
    }
}

fn task_facts(records: &[PackageRecord]) -> Vec<ModuleFacts> {
    records.iter().map(facts).collect()
}

/// A swarm run as the engine's program.
struct SwarmRun<'a> {
    state: SwarmState,
    packages: &'a Packages,
    observer: &'a dyn Observer,
}

/// What the stages of an iteration share.
struct Iteration<'a> {
    i: u32,
    attempt: u32,
    scope: &'a str,
    nodes: &'a [NodeRecord],
    /// Outputs of the stages run so far: task -> node -> outputs.
    outputs: BTreeMap<String, BTreeMap<String, Vec<BlobRef>>>,
    /// Nodes that left or did not answer in this iteration: nothing more is placed on them.
    lost: BTreeSet<String>,
}

#[async_trait]
impl Program for SwarmRun<'_> {
    fn run_id(&self) -> &str {
        &self.state.id
    }
    fn completed(&self) -> u32 {
        self.state.completed_iterations
    }
    fn limit(&self) -> u32 {
        self.state.spec.iterations
    }
    async fn iteration(&mut self, c: &Coordinator, i: u32) -> Result<bool, SessionError> {
        let started = Instant::now();
        let id = self.state.id.clone();
        // The attempt is recorded before anything is sent: a coordinator that dies during
        // the iteration leaves a scope the next attempt never reuses.
        let attempt = self.state.attempt;
        self.state.attempt += 1;
        c.save_swarm(&self.state).await?;
        let scope = format!("i{i}.a{attempt}");
        c.seed_globals(&id, self.state.scope.as_deref(), &self.state.spec.globals, &scope).await?;
        // An iteration short of nodes for one of its stages waits for them (up to a
        // stage's time-out), then refuses naming the task and field.
        let spec = &self.state.spec;
        let packages = &self.packages;
        let nodes = c
            .wait_for_nodes(&id, Duration::from_secs_f64(spec.timeout_secs), |nodes| {
                for (name, task) in &spec.tasks {
                    placement::eligible(name, task, &task_facts(&packages[name]), &nodes)?;
                }
                Ok::<_, placement::PlacementError>(nodes)
            })
            .await??;
        let mut it =
            Iteration { i, attempt, scope: &scope, nodes: &nodes, outputs: BTreeMap::new(), lost: BTreeSet::new() };
        let mut stages = Vec::new();
        for task in self.state.spec.stages() {
            // A stop request ends the run between stages; this iteration is not counted.
            if c.stop_requested(&id).await {
                return Err(SessionError::Stopped);
            }
            let (report, outs, lost) = self.stage(c, &mut it, &task).await?;
            self.observer.stage_finished(i, &report);
            {
                use tessera_ports::metrics as m;
                metrics::counter!(m::TASKS, "outcome" => "ok").increment(report.succeeded.len() as u64);
                metrics::counter!(m::TASKS, "outcome" => "failed").increment(report.failures.len() as u64);
            }
            for (node, module) in &report.versions {
                self.state.placements.entry(node.clone()).or_default().insert(task.clone(), module.clone());
            }
            it.lost.extend(lost);
            it.outputs.insert(task, outs);
            stages.push(report);
        }
        let proceed = match &self.state.spec.scheduler {
            None => None,
            Some(s) => Some(c.decision(&id, &scope, it.outputs.get(s)).await?),
        };
        // Commit: this scope's globals are now the run's.
        let old = self.state.scope.replace(scope.clone());
        self.state.completed_iterations = i;
        self.state.attempt = 0;
        self.state.carried = match &self.state.spec.scheduler {
            Some(s) => it.outputs.remove(s).unwrap_or_default(),
            None => BTreeMap::new(),
        };
        let report = IterationReport { iteration: i, stages, seconds: started.elapsed().as_secs_f64(), proceed };
        self.state.reports.push(report.clone());
        if self.state.reports.len() > KEPT_REPORTS {
            let extra = self.state.reports.len() - KEPT_REPORTS;
            self.state.reports.drain(..extra);
        }
        c.save_swarm(&self.state).await?;
        if let Some(old) = old {
            c.drop_scope(&id, &old).await;
        }
        for a in 0..attempt {
            c.drop_scope(&id, &format!("i{i}.a{a}")).await;
        }
        self.observer.iteration_finished(&report);
        Ok(proceed == Some(false))
    }
}

impl SwarmRun<'_> {
    /// Runs one stage: places the task, sends it, collects the replies, and tries other
    /// nodes while too few succeeded and retries are left.
    async fn stage(
        &self,
        c: &Coordinator,
        it: &mut Iteration<'_>,
        task: &str,
    ) -> Result<(StageReport, BTreeMap<String, Vec<BlobRef>>, Vec<String>), SessionError> {
        let started = Instant::now();
        let spec = &self.state.spec;
        let t = &spec.tasks[task];
        let records = &self.packages[task];
        let eligible: Vec<String> = placement::eligible(task, t, &task_facts(records), it.nodes)?
            .into_iter()
            .map(|n| n.id.clone())
            .filter(|n| !it.lost.contains(n))
            .collect();
        let timeout = Duration::try_from_secs_f64(t.timeout_secs.unwrap_or(spec.timeout_secs))
            .map_err(|e| SessionError::Config(format!("task {task}: timeout_secs: {e}")))?;
        let mut chosen = placement::choose(task, t, &eligible, spec.seed, it.i);
        // The split is over the nodes the task runs on; nodes tried later get the version
        // with the largest share.
        let shares: Vec<f64> = if t.versions.is_empty() {
            Vec::new()
        } else {
            t.split().map_err(SessionError::Config)?.into_iter().map(|(_, s)| s).collect()
        };
        let split =
            if shares.is_empty() { BTreeMap::new() } else { placement::split(task, &shares, &chosen, spec.seed) };
        let largest = shares.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        let version_of = |node: &str| split.get(node).copied().unwrap_or(largest).min(records.len().saturating_sub(1));
        if records.is_empty() {
            return Err(SessionError::Config(format!("task {task} has no package")));
        }
        let mut succeeded: BTreeMap<String, Vec<BlobRef>> = BTreeMap::new();
        let mut failures: Vec<Failure> = Vec::new();
        let mut tried: BTreeSet<String> = BTreeSet::new();
        let mut versions = BTreeMap::new();
        let mut task_ids: BTreeMap<String, String> = BTreeMap::new();
        let mut lost: Vec<String> = Vec::new();
        let mut tries = 0u32;
        loop {
            tries += 1;
            // Results and globals are merged only from tasks that succeeded, so every task
            // may read all of them.
            let world = WorldScope { scope: it.scope.to_owned(), peers: None };
            let retry = if tries > 1 { format!(".t{tries}") } else { String::new() };
            let tasks: Vec<Outgoing> = chosen
                .iter()
                .map(|node| {
                    let rec = &records[version_of(node)];
                    versions.insert(node.clone(), format!("{}@{}", rec.name, rec.version));
                    let mut config = t.config.clone();
                    deep_merge(
                        &mut config,
                        &json!({"swarm": {
                            "run": self.state.id,
                            "task": task,
                            "iteration": it.i,
                            "node": node,
                            "nodes": chosen.len(),
                            "seed": spec.seed.wrapping_add(u64::from(it.i)),
                        }}),
                    );
                    let task_id = format!("{}.i{}.a{}.{task}.{node}{retry}", self.state.id, it.i, it.attempt);
                    task_ids.insert(node.clone(), task_id.clone());
                    Outgoing {
                        participant: node.clone(),
                        task_id,
                        module: rec.digest,
                        component: rec.component.clone(),
                        config,
                        inputs: self.inputs_for(it, task, node),
                        world: Some(world.clone()),
                        inline_outputs: 0,
                        fresh: c.started_here(&self.state.id),
                    }
                })
                .collect();
            tried.extend(chosen.iter().cloned());
            let replies = c.send_and_collect(&self.state.id, it.i, tasks, timeout).await?;
            for node in &chosen {
                match replies.replies.get(node).map(|r| &r.outcome) {
                    Some(TaskOutcome::Ok { outputs, .. }) => {
                        succeeded.insert(node.clone(), outputs.clone());
                    }
                    Some(TaskOutcome::Failed { error }) => {
                        failures.push(Failure { node: node.clone(), error: error.clone() })
                    }
                    None if replies.gone.contains(node) => {
                        lost.push(node.clone());
                        failures
                            .push(Failure { node: node.clone(), error: "the node left (its heartbeat stopped)".into() })
                    }
                    None => {
                        lost.push(node.clone());
                        failures.push(Failure {
                            node: node.clone(),
                            error: format!("no reply within {}s", timeout.as_secs_f64()),
                        })
                    }
                }
            }
            if succeeded.len() >= t.min_nodes {
                break;
            }
            let rest: Vec<String> = eligible.iter().filter(|n| !tried.contains(*n)).cloned().collect();
            if tries > t.retries || t.method == Method::All || rest.is_empty() {
                return Err(SessionError::StageFailed {
                    iteration: it.i,
                    task: task.to_owned(),
                    got: succeeded.len(),
                    min: t.min_nodes,
                    failures: failures
                        .iter()
                        .map(|f| format!("{}: {}", f.node, f.error))
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
            tracing::warn!(
                task,
                iteration = it.i,
                "{} of {} succeeded; trying other nodes",
                succeeded.len(),
                t.min_nodes
            );
            let mut next = placement::choose(task, t, &rest, spec.seed, it.i + tries);
            next.truncate(t.min_nodes - succeeded.len());
            chosen = next;
        }
        let committed: Vec<(String, String)> =
            succeeded.keys().filter_map(|n| Some((n.clone(), task_ids.get(n)?.clone()))).collect();
        c.merge_staged(&self.state.id, it.scope, &committed).await?;
        let report = StageReport {
            task: task.to_owned(),
            succeeded: succeeded.keys().cloned().collect(),
            failures,
            versions: versions.into_iter().filter(|(n, _)| succeeded.contains_key(n)).collect(),
            tries,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok((report, succeeded, lost))
    }

    /// The inputs of `task` on `node`: the outputs of the stages feeding it in this
    /// iteration and, through edges out of the scheduler, its outputs in the previous one;
    /// named `<output>@<node that produced it>`; only its own node's with `inputs: own`.
    fn inputs_for(&self, it: &Iteration<'_>, task: &str, node: &str) -> Vec<BlobRef> {
        let spec = &self.state.spec;
        let own = spec.tasks[task].inputs == Inputs::Own;
        let mut out = Vec::new();
        let mut add = |outs: &BTreeMap<String, Vec<BlobRef>>| {
            for (from, refs) in outs {
                if own && from != node {
                    continue;
                }
                for r in refs {
                    out.push(BlobRef { name: format!("{}@{from}", r.name), ..r.clone() });
                }
            }
        };
        for feeder in spec.feeds(task) {
            if let Some(outs) = it.outputs.get(feeder) {
                add(outs);
            }
        }
        if !spec.carried(task).is_empty() {
            add(&self.state.carried);
        }
        out
    }
}
