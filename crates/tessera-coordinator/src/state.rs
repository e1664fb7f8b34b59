//! What a run leaves in world state (`sessions/<id>`), so that it can be listed, shown,
//! stopped and resumed by another coordinator: federated sessions and swarms of tasks
//! alike.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tessera_core::Digest;
use tessera_core::wire::{Lineage, ModuleUse, RoundReport, WorkerMetrics};

use crate::engine::Coordinator;
use crate::swarm::SwarmState;
use crate::{SessionConfig, SessionError};

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// It ran every iteration (round) it allows.
    Limit,
    /// Its scheduler said no further iteration should run.
    Scheduler,
    /// Someone asked it to stop (`tessera swarm stop`).
    Stopped,
    /// It stopped on an error (a stage with too few successes, a backend that stayed
    /// away); `resume` tries again from the last completed iteration.
    Failed,
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ending::Limit => "finished",
            Ending::Scheduler => "finished (its scheduler stopped it)",
            Ending::Stopped => "stopped",
            Ending::Failed => "failed",
        })
    }
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
    /// Reports of completed rounds: every one in memory; in the stored state only those
    /// after `report_blocks`.
    pub reports: Vec<RoundReport>,
    /// The blobs holding the first reports, [`REPORT_BLOCK`] each (a JSON array of
    /// [`RoundReport`]), in order: a round's save writes its state and the reports not yet
    /// in a block, never every report again. Read back into `reports` by
    /// [`Coordinator::record`]; pinned with the state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub report_blocks: Vec<Digest>,
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
    /// How the session ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ending: Option<Ending>,
}

impl SessionState {
    /// True once every round is done, or the session was stopped.
    pub fn finished(&self) -> bool {
        self.completed_rounds >= self.config.rounds || self.ending.is_some()
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
    /// How it ended.
    pub ending: Ending,
}

/// A fresh session id: `s-` and 12 hex digits.
pub fn new_session_id() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let seed = format!("{t}-{}-{:?}", std::process::id(), std::thread::current().id());
    format!("s-{}", &Digest::of(seed.as_bytes()).hex()[..12])
}

/// A run's state larger than this is kept in the blob store, world state holding a
/// [`StoredIn`] pointer (a world-state value is at most 1 MiB).
const STATE_INLINE: usize = 256 << 10;

/// Reports per stored block of a session's reports (see [`SessionState::report_blocks`]).
pub const REPORT_BLOCK: usize = 32;

/// The largest block of reports read back (a block of 32 reports of rounds of 10,000
/// participants, each naming them all, is about 5 MiB).
pub const MAX_REPORT_BLOCK_BYTES: u64 = 64 << 20;

/// Where a large run state is: the world-state value of its key.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredIn {
    stored_in: Digest,
}

/// The world-state prefix of every run's pins.
pub(crate) const PINS: &str = "pins/";

/// The world-state prefix of run `id`'s pins.
pub(crate) fn pins_prefix(id: &str) -> String {
    format!("{PINS}{id}/")
}

/// The world key of a session's state.
pub fn state_key(id: &str) -> String {
    format!("sessions/{id}")
}

/// The world key that asks a run to stop.
pub fn stop_key(id: &str) -> String {
    format!("runs/{id}/stop")
}

/// A run in one line (`tessera swarm list --json` prints these; docs/json.md names the
/// stable fields).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunSummary {
    /// The run id.
    pub id: String,
    /// `session` (federated) or `swarm` (of tasks).
    pub kind: &'static str,
    /// How it ended, or `stopped or running`.
    pub state: String,
    /// True once it ended.
    pub finished: bool,
    /// `done/total` rounds or iterations.
    pub progress: String,
    /// Rounds or iterations done.
    pub done: u32,
    /// Rounds or iterations asked for (a swarm's at most).
    pub total: u32,
    /// What it runs: the worker module, or the swarm's name or stages.
    pub runs: String,
    /// When it was last saved (`YYYY-MM-DDTHH:MM:SSZ`).
    pub updated: String,
    /// When it was last saved (milliseconds since the Unix epoch).
    pub updated_ms: u64,
    /// The last round's held-out accuracy (sessions evaluated at the coordinator).
    pub test_accuracy: Option<f64>,
}

/// A stored run: a federated session or a swarm of tasks.
#[derive(Clone, Debug, PartialEq)]
pub enum RunRecord {
    /// A federated session.
    Session(SessionState),
    /// A swarm of tasks.
    Swarm(SwarmState),
}

impl RunRecord {
    /// The run's id.
    pub fn id(&self) -> &str {
        match self {
            RunRecord::Session(s) => &s.id,
            RunRecord::Swarm(s) => &s.id,
        }
    }
    /// When it was last saved (milliseconds since the Unix epoch).
    pub fn updated_ms(&self) -> u64 {
        match self {
            RunRecord::Session(s) => s.updated_ms,
            RunRecord::Swarm(s) => s.updated_ms,
        }
    }
    /// True once it ended.
    pub fn finished(&self) -> bool {
        match self {
            RunRecord::Session(s) => s.finished(),
            RunRecord::Swarm(s) => s.ending.is_some(),
        }
    }
    /// How it ended, once it has.
    pub fn ending(&self) -> Option<Ending> {
        match self {
            RunRecord::Session(s) => s.ending.or(s.finished().then_some(Ending::Limit)),
            RunRecord::Swarm(s) => s.ending,
        }
    }

    /// One line's worth of the run, as `tessera swarm list` and the dashboard show it.
    pub fn summary(&self) -> RunSummary {
        let state = match self.ending() {
            Some(e) => e.to_string(),
            None => "stopped or running".into(),
        };
        let (kind, done, total, runs, test_accuracy) = match self {
            RunRecord::Session(s) => (
                "session",
                s.completed_rounds,
                s.config.rounds,
                s.module.module.clone(),
                // The last round's, when the last report stored is that round's.
                s.reports.last().filter(|r| r.round == s.completed_rounds).and_then(|r| r.eval_accuracy),
            ),
            RunRecord::Swarm(s) => (
                "swarm",
                s.completed_iterations,
                s.spec.iterations,
                s.spec.name.clone().unwrap_or_else(|| s.spec.stages().join("->")),
                None,
            ),
        };
        RunSummary {
            id: self.id().to_owned(),
            kind,
            state,
            finished: self.finished(),
            progress: format!("{done}/{total}"),
            done,
            total,
            runs,
            updated: tessera_core::time::format_rfc3339(self.updated_ms() / 1000),
            updated_ms: self.updated_ms(),
            test_accuracy,
        }
    }

    fn parse(bytes: &[u8]) -> Result<RunRecord, SessionError> {
        #[derive(Deserialize)]
        struct Kind {
            #[serde(default)]
            kind: Option<String>,
        }
        let kind: Kind =
            serde_json::from_slice(bytes).map_err(|e| SessionError::Config(format!("stored run state: {e}")))?;
        match kind.kind.as_deref() {
            Some("swarm") => serde_json::from_slice(bytes)
                .map(RunRecord::Swarm)
                .map_err(|e| SessionError::Config(format!("stored swarm state: {e}"))),
            _ => serde_json::from_slice(bytes)
                .map(RunRecord::Session)
                .map_err(|e| SessionError::Config(format!("stored session state: {e}"))),
        }
    }
}

impl Coordinator {
    /// Writes a run's state (`value`, JSON) under `sessions/<id>`, with the blobs it names pinned
    /// (`pins/<id>/<digest hex>`): blobs are content-addressed and shared, and what a saved
    /// run names is never removed by another run's retention (see `retention.rs`). New pins
    /// are written before the state, stale ones removed after it.
    pub(crate) async fn save_record(
        &self,
        id: &str,
        value: Vec<u8>,
        names: &BTreeSet<Digest>,
    ) -> Result<(), SessionError> {
        let mut bytes = Bytes::from(value);
        let key = state_key(id);
        let mut names = names.clone();
        // A large state (a round of 10,000 participants names them all) goes to the blob
        // store; world state keeps a pointer to it.
        let previous = match self.retry("reading the run's state", || self.backend.world.get(&key)).await? {
            Some(e) => serde_json::from_slice::<StoredIn>(&e.value).ok().map(|p| p.stored_in),
            None => None,
        };
        let mut stored = None;
        if bytes.len() > STATE_INLINE {
            let d = self.retry("storing the run's state", || self.backend.blobs.put(bytes.clone())).await?;
            names.insert(d);
            stored = Some(d);
            bytes = Bytes::from(serde_json::to_vec(&StoredIn { stored_in: d }).expect("a digest serialises"));
        }
        let names = &names;
        let prefix = pins_prefix(id);
        let pinned: BTreeSet<String> = self
            .retry("listing the run's pins", || self.backend.world.keys(&prefix))
            .await?
            .into_iter()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        for d in names.iter().filter(|d| !pinned.contains(&d.hex())) {
            let key = format!("{prefix}{}", d.hex());
            self.retry("pinning a blob", || self.backend.world.put(&key, Bytes::new())).await?;
        }
        self.retry("saving the run's state", || self.backend.world.put(&key, bytes.clone())).await?;
        let named: BTreeSet<String> = names.iter().map(Digest::hex).collect();
        for hex in pinned.difference(&named) {
            let key = format!("{prefix}{hex}");
            self.retry("unpinning a blob", || self.backend.world.delete(&key)).await?;
        }
        // The state it replaced (its bytes name this run, so no other run holds them).
        if let Some(old) = previous.filter(|d| Some(*d) != stored)
            && let Err(e) = self.backend.blobs.delete(&old).await
        {
            tracing::warn!(run = %id, blob = %old, error = %e, "could not remove the run's previous state");
        }
        Ok(())
    }

    /// Saves a session's state: first each whole [`REPORT_BLOCK`] of its reports not yet
    /// in a block (`report_blocks` grows), then the state with the reports after the
    /// blocks, so a round's save costs the same in its first round and its thousandth.
    /// `also`: blobs pinned with it beyond those it names.
    pub(crate) async fn save(&self, state: &mut SessionState, also: &[Digest]) -> Result<(), SessionError> {
        state.updated_ms = tessera_identity::now_ms();
        while (state.report_blocks.len() + 1) * REPORT_BLOCK <= state.reports.len() {
            let at = state.report_blocks.len() * REPORT_BLOCK;
            let block = Bytes::from(
                serde_json::to_vec(&state.reports[at..at + REPORT_BLOCK])
                    .map_err(|e| SessionError::Aggregate(e.to_string()))?,
            );
            let d = self.retry("storing the run's reports", || self.backend.blobs.put(block.clone())).await?;
            state.report_blocks.push(d);
        }
        let names: BTreeSet<Digest> = [Some(state.model), state.strategy_state]
            .into_iter()
            .flatten()
            .chain(state.report_blocks.iter().copied())
            .chain(also.iter().copied())
            .collect();
        // Serialised without the reports in blocks (put back before anything awaits).
        let all = std::mem::take(&mut state.reports);
        state.reports = all.get(state.report_blocks.len() * REPORT_BLOCK..).unwrap_or_default().to_vec();
        let bytes = serde_json::to_vec(&*state).map_err(|e| SessionError::Aggregate(e.to_string()));
        state.reports = all;
        self.save_record(&state.id, bytes?, &names).await
    }

    /// Every blob a saved run names (its pins).
    pub(crate) async fn pinned(&self) -> Result<BTreeSet<Digest>, SessionError> {
        let keys = self.retry("listing pinned blobs", || self.backend.world.keys(PINS)).await?;
        Ok(keys.iter().filter_map(|k| Digest::from_hex(k.rsplit('/').next()?).ok()).collect())
    }

    /// Reads a stored run. Every way in by run id (status, logs, stop, resume) goes
    /// through here: an id that is not a plain name is refused.
    pub async fn record(&self, id: &str) -> Result<Option<RunRecord>, SessionError> {
        match self.saved(id).await? {
            Some(RunRecord::Session(mut state)) if !state.report_blocks.is_empty() => {
                state.reports = self.stored_reports(id, &mut state).await?;
                Ok(Some(RunRecord::Session(state)))
            }
            other => Ok(other),
        }
    }

    /// A stored run as saved: a session's reports past its blocks only (checked to add
    /// up with its blocks, when it has any, to its completed rounds), its blocks not read.
    async fn saved(&self, id: &str) -> Result<Option<RunRecord>, SessionError> {
        tessera_core::name::check_ident("run id", id).map_err(|e| SessionError::Config(e.to_string()))?;
        let key = state_key(id);
        // A save replaces the pointer, then removes the blob it pointed to: a reader that
        // finds the blob gone reads the pointer again.
        let mut tries = 0;
        let record = loop {
            let Some(e) = self.retry("reading the run's state", || self.backend.world.get(&key)).await? else {
                return Ok(None);
            };
            let Ok(p) = serde_json::from_slice::<StoredIn>(&e.value) else { break RunRecord::parse(&e.value)? };
            match self.retry("reading the run's state", || self.backend.blobs.get(&p.stored_in)).await? {
                Some(bytes) => break RunRecord::parse(&bytes)?,
                None if tries < 3 => tries += 1,
                None => {
                    return Err(SessionError::Config(format!("run {id}: its stored state {} is missing", p.stored_in)));
                }
            }
        };
        if record.id() != id {
            return Err(SessionError::Config(format!("sessions/{id} holds the state of run {}", record.id())));
        }
        if let RunRecord::Session(state) = &record
            && !state.report_blocks.is_empty()
        {
            let in_blocks = state.report_blocks.len().checked_mul(REPORT_BLOCK);
            if in_blocks.and_then(|n| n.checked_add(state.reports.len())) != Some(state.completed_rounds as usize) {
                return Err(SessionError::Config(format!(
                    "run {id}: its stored reports: {} blocks and {} more reports for {} rounds",
                    state.report_blocks.len(),
                    state.reports.len(),
                    state.completed_rounds
                )));
            }
        }
        Ok(Some(record))
    }

    /// Every report of a stored session whose first ones are in blocks (its inline ones
    /// moved after them): checked to be rounds 1 to `completed_rounds` in order.
    async fn stored_reports(&self, id: &str, state: &mut SessionState) -> Result<Vec<RoundReport>, SessionError> {
        let mut reports = Vec::new();
        for d in &state.report_blocks {
            reports.extend(self.report_block(id, d).await?);
        }
        reports.append(&mut state.reports);
        if let Some((i, r)) = reports.iter().enumerate().find(|(i, r)| r.round as usize != i + 1) {
            return Err(SessionError::Config(format!(
                "run {id}: its stored reports: report {} is of round {}",
                i + 1,
                r.round
            )));
        }
        Ok(reports)
    }

    /// One block of a stored session's reports: read only when it is at most
    /// [`MAX_REPORT_BLOCK_BYTES`], and checked to hold [`REPORT_BLOCK`] reports.
    async fn report_block(&self, id: &str, d: &Digest) -> Result<Vec<RoundReport>, SessionError> {
        let bad = |what: String| SessionError::Config(format!("run {id}: its stored reports: {what}"));
        // (A store that cannot tell a size without reading gives `None`.)
        let size = self.retry("reading the run's reports", || self.backend.blobs.size(d)).await?;
        if let Some(n) = size.filter(|n| *n > MAX_REPORT_BLOCK_BYTES) {
            return Err(bad(format!("block {d} is {n} bytes, past {MAX_REPORT_BLOCK_BYTES}")));
        }
        let bytes = self
            .retry("reading the run's reports", || self.backend.blobs.get(d))
            .await?
            .ok_or_else(|| bad(format!("block {d} is missing")))?;
        let block: Vec<RoundReport> = serde_json::from_slice(&bytes).map_err(|e| bad(format!("block {d}: {e}")))?;
        if block.len() != REPORT_BLOCK {
            return Err(bad(format!("block {d} holds {} reports, not {REPORT_BLOCK}", block.len())));
        }
        Ok(block)
    }

    /// Reads a federated session's stored state (`None` when there is no such session; an
    /// error when the id belongs to a swarm of tasks).
    pub async fn state(&self, id: &str) -> Result<Option<SessionState>, SessionError> {
        match self.record(id).await? {
            None => Ok(None),
            Some(RunRecord::Session(s)) => Ok(Some(s)),
            Some(RunRecord::Swarm(_)) => {
                Err(SessionError::Config(format!("{id} is a swarm of tasks, not a federated session")))
            }
        }
    }

    /// What `tessera swarm list` and the dashboard show of every run stored in world
    /// state, newest first. A session's blocks of reports are not read back, but for the
    /// last one when its state holds no report of its own (the summary shows the last
    /// round's accuracy): listing reads each run's state and at most one block, however
    /// many rounds it has. Runs whose state cannot be read are left out, with a warning; a
    /// session whose last block cannot be read is listed without an accuracy, with a
    /// warning.
    pub async fn summaries(&self) -> Result<Vec<RunSummary>, SessionError> {
        let mut out = Vec::new();
        for id in self.run_ids().await? {
            let record = match self.saved(&id).await {
                Ok(Some(RunRecord::Session(mut s))) if s.reports.is_empty() && !s.report_blocks.is_empty() => {
                    let last = *s.report_blocks.last().expect("not empty");
                    match self.report_block(&id, &last).await {
                        Ok(block) => s.reports = block,
                        Err(e) => tracing::warn!(session = id, "its last block of reports is unreadable: {e}"),
                    }
                    Ok(Some(RunRecord::Session(s)))
                }
                other => other,
            };
            match record {
                Ok(Some(r)) => out.push(r.summary()),
                Ok(None) => {}
                Err(e) => tracing::warn!(session = id, "unreadable run state: {e}"),
            }
        }
        out.sort_by(|a, b| b.updated_ms.cmp(&a.updated_ms).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The ids of the runs stored in world state.
    async fn run_ids(&self) -> Result<Vec<String>, SessionError> {
        let keys = self.retry("listing runs", || self.backend.world.keys("sessions/")).await?;
        Ok(keys
            .iter()
            .filter_map(|k| k.strip_prefix("sessions/"))
            .filter(|id| !id.contains('/'))
            .map(str::to_owned)
            .collect())
    }

    /// Asks a run to stop: its coordinator ends it cleanly at its next check (at the
    /// latest when the stage under way has waited a membership check interval), records it
    /// as stopped, and gives back what it had. Refused for unknown and finished runs.
    pub async fn request_stop(&self, id: &str) -> Result<(), SessionError> {
        tessera_core::name::check_ident("run id", id).map_err(|e| SessionError::Config(e.to_string()))?;
        let record = self.record(id).await?.ok_or_else(|| SessionError::Unknown(id.to_owned()))?;
        if record.finished() {
            return Err(SessionError::Config(format!("run {id} has already ended")));
        }
        let at = tessera_identity::now_ms().to_string();
        let key = stop_key(id);
        self.retry("asking the run to stop", || self.backend.world.put(&key, Bytes::from(at.clone()))).await?;
        Ok(())
    }

    /// True when someone asked the run to stop.
    pub(crate) async fn stop_requested(&self, id: &str) -> bool {
        matches!(self.backend.world.get(&stop_key(id)).await, Ok(Some(_)))
    }
}
