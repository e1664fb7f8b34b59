//! The engine: one coordinator, one loop over iterations for every kind of run. A
//! federated round and an iteration of a user-written swarm are both a [`Program`]
//! iteration; placement, dispatch and reply collection, retries of transient backend
//! failures, stop requests and the stored state are the engine's, shared by both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tessera_core::registry::PackageRecord;
use tessera_core::wire::{NodeRecord, RoundReport};
use tessera_identity::KeyPair;
use tessera_node::Node;
use tessera_ports::{Backend, PackageSource};
use tessera_swarm::SwarmSpec;

use crate::state::Ending;
use crate::swarm::{IterationReport, StageReport};
use crate::{SessionError, new_session_id};

/// Runs federated sessions and swarms.
pub struct Coordinator {
    /// Signs tasks for nodes that have keys, and checks their replies.
    pub(crate) identity: Option<Arc<KeyPair>>,
    /// Unique to this coordinator instance: tasks it sends carry it (see
    /// [`TaskMessage::dispatch`]).
    pub(crate) dispatch: String,
    pub(crate) backend: Backend,
    pub(crate) source: Arc<dyn PackageSource>,
    pub(crate) local: Option<Arc<Node>>,
    pub(crate) threads: usize,
    pub(crate) retry_for: Duration,
    /// Rounds whose global model has at least this many bytes stream their updates
    /// (see [`crate::streamed`]).
    pub(crate) stream_from: u64,
    /// Bytes of participants' values a windowed round reads at once.
    pub(crate) window_budget: usize,
    /// The last listing of announced nodes and when it was taken (see
    /// [`Coordinator::announced`]).
    pub(crate) listing: std::sync::Mutex<Option<(Instant, Vec<NodeRecord>)>>,
    /// Runs this coordinator started (rather than resumed): none of their task ids was
    /// sent before, so their tasks go out [`TaskMessage::fresh`](tessera_core::wire::TaskMessage::fresh).
    started: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// What each federated run's rounds left behind, until the round is saved.
    pub(crate) leftovers: crate::retention::LeftoversByRun,
}

/// Watches a run's progress.
pub trait Observer: Send + Sync {
    /// The session resolved its module and found its nodes (`done` rounds already
    /// completed when it resumes).
    fn started(&self, _session: &str, _module: &PackageRecord, _eligible: &[NodeRecord], _rounds: u32, _done: u32) {}
    /// A round sent its tasks.
    fn round_started(&self, _round: u32, _selected: &[String]) {}
    /// A round finished and was saved. A round whose coordinator evaluation ran beside the
    /// next round is told after the next round's training (after its `round_started`).
    fn round_finished(&self, _report: &RoundReport) {}
    /// A swarm of tasks resolved its modules and placed its tasks (`done` iterations
    /// already completed when it resumes).
    fn swarm_started(&self, _run: &str, _spec: &SwarmSpec, _done: u32) {}
    /// A stage of a swarm iteration finished.
    fn stage_finished(&self, _iteration: u32, _stage: &StageReport) {}
    /// A swarm iteration finished.
    fn iteration_finished(&self, _report: &IterationReport) {}
}

/// Observes nothing.
pub struct Quiet;
impl Observer for Quiet {}

impl Coordinator {
    /// A coordinator over a backend and a package source. `local` is the coordinator's
    /// own node: it creates the initial model and evaluates each global model on its
    /// held-out data.
    pub fn new(backend: Backend, source: Arc<dyn PackageSource>, local: Option<Arc<Node>>) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let dispatch = new_session_id().replacen("s-", "d-", 1);
        Coordinator {
            identity: None,
            dispatch,
            backend,
            source,
            local,
            threads,
            retry_for: Duration::from_secs(60),
            stream_from: crate::streamed::STREAM_FROM,
            window_budget: crate::windowed::WINDOW_BUDGET,
            listing: std::sync::Mutex::new(None),
            started: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            leftovers: Default::default(),
        }
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

    /// Notes that this coordinator started run `id`: it found no record of it and saved
    /// one, so no task of the run was sent before.
    pub(crate) fn mark_started(&self, id: &str) {
        self.started.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned());
    }

    /// Forgets run `id` as one this coordinator started: it ended, or it is resumed (its
    /// tasks may have been sent before).
    pub(crate) fn forget_started(&self, id: &str) {
        self.started.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// Whether this coordinator started run `id`, so no task of it was sent before.
    pub(crate) fn started_here(&self, id: &str) -> bool {
        self.started.lock().unwrap_or_else(|p| p.into_inner()).contains(id)
    }

    /// Runs `f`, retrying transient backend failures for the coordinator's retry window.
    pub(crate) async fn retry<T, E, F, Fut>(&self, what: &str, f: F) -> Result<T, E>
    where
        E: tessera_ports::Transient + std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        tessera_ports::retry_transient(what, self.retry_for, f).await
    }

    /// Runs `program`'s iterations from the one after those it completed to its limit,
    /// until its scheduler ends it or someone asks the run to stop, then settles an
    /// iteration still finishing ([`Program::settle`]). Each iteration's state is saved
    /// once it is whole (a federated round's once its evaluation, run beside the next
    /// round, is done), so a coordinator that dies is resumed from the last one saved.
    pub(crate) async fn iterate(&self, program: &mut dyn Program) -> Result<Ending, SessionError> {
        let ending = self.iterations(program).await;
        // Whatever ended the loop, an iteration still finishing is recorded first.
        let settled = program.settle(self).await;
        let ending = ending?;
        settled.map(|()| ending)
    }

    async fn iterations(&self, program: &mut dyn Program) -> Result<Ending, SessionError> {
        for i in program.completed() + 1..=program.limit() {
            if self.stop_requested(program.run_id()).await {
                return Ok(Ending::Stopped);
            }
            match program.iteration(self, i).await {
                Ok(true) => return Ok(Ending::Scheduler),
                Ok(false) => {}
                Err(SessionError::Stopped) => return Ok(Ending::Stopped),
                Err(e) => return Err(e),
            }
        }
        Ok(Ending::Limit)
    }
}

/// What one iteration of a run does. The federated session's round (select participants,
/// train, aggregate with the strategy, evaluate) and a swarm's iteration (its stages in
/// flow order, then its scheduler's answer) are the two programs.
#[async_trait]
pub(crate) trait Program: Send {
    /// The run's id.
    fn run_id(&self) -> &str;
    /// Iterations completed (and saved) so far.
    fn completed(&self) -> u32;
    /// The most iterations the run may have.
    fn limit(&self) -> u32;
    /// Runs iteration `i` (1-based) and saves the state after it; `true` when the run's
    /// scheduler ends the run after it. An iteration may leave its end (a federated
    /// round's evaluation) to run beside the next one: it is saved by then, or by
    /// [`Program::settle`].
    async fn iteration(&mut self, c: &Coordinator, i: u32) -> Result<bool, SessionError>;
    /// Finishes and saves an iteration whose end still runs, when the run stops for any
    /// reason. Errors: the iteration's, or saving it.
    async fn settle(&mut self, _c: &Coordinator) -> Result<(), SessionError> {
        Ok(())
    }
}
