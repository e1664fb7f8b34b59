//! What a federated round leaves behind and its removal once the round is saved: the
//! output blobs its tasks stored (updates, partial sums, metrics too large to travel
//! inline), the nodes' answer records (`done/<node>/<task>`), the global model and strategy
//! state the round replaced. A session keeps its current (in the end, final) model, its
//! strategy state, reports and lineage, so blob store and world state stay flat across
//! rounds; `retain_updates: true` keeps everything for audit.
//!
//! Blobs are content-addressed and shared: a leftover any saved run names (its pins,
//! `pins/<run>/<digest>`, written with its state) is kept, so a re-run of a session with
//! the same seed, whose models are the same bytes, never removes the earlier run's. What a
//! run stores but has not yet saved (the same bytes produced by two identical runs at the
//! same moment) is not told apart.
//!
//! Answer records of signed tasks stay until the tasks' signature window has passed
//! (`DEFER`): the record is what stops a captured task from running twice, and a node
//! accepts a signed task for that long.
//!
//! Removal is best effort and happens once: a coordinator that dies between saving a
//! round and removing its leftovers, a round that fails or is stopped, and replies that
//! came after their round closed leave theirs. On NATS a removed blob leaves a small
//! delete marker in its stream.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tessera_core::Digest;
use tessera_core::wire::{TaskOutcome, TaskReply, answer_key};

use crate::dispatch::Replies;
use crate::engine::Coordinator;

/// Deletions in flight at once.
const CONCURRENCY: usize = 32;

/// How long the answer records of signed tasks are kept: a node's default signed-task
/// window (`task_window_secs`).
const DEFER: Duration = Duration::from_secs(3600);

/// Blobs and world keys a run no longer needs once its current round is saved.
#[derive(Debug, Default)]
pub(crate) struct Leftovers {
    blobs: BTreeSet<Digest>,
    records: BTreeSet<String>,
}

impl Leftovers {
    /// What `replies` stored: output blobs not carried inline, and each answering node's
    /// record of its answer.
    pub(crate) fn of(replies: &Replies) -> Leftovers {
        let mut l = Leftovers::default();
        for r in replies.replies.values() {
            l.take(r);
        }
        l
    }

    /// What one reply stored.
    pub(crate) fn of_reply(r: &TaskReply) -> Leftovers {
        let mut l = Leftovers::default();
        l.take(r);
        l
    }

    fn take(&mut self, r: &TaskReply) {
        self.records.insert(answer_key(&r.node, &r.task_id));
        if let TaskOutcome::Ok { outputs, .. } = &r.outcome {
            self.blobs.extend(outputs.iter().filter(|o| o.inline.is_none()).map(|o| o.digest));
        }
    }

    pub(crate) fn extend(&mut self, other: Leftovers) {
        self.blobs.extend(other.blobs);
        self.records.extend(other.records);
    }
}

/// Leftovers by run id, kept until the run's round is saved, and answer records waiting
/// for their signature window to pass.
#[derive(Default)]
pub(crate) struct Retention {
    by_run: HashMap<String, Leftovers>,
    deferred: VecDeque<(Instant, String)>,
}

/// A coordinator's [`Retention`].
pub(crate) type LeftoversByRun = std::sync::Mutex<Retention>;

impl Coordinator {
    /// Remembers what run `id` left behind.
    pub(crate) fn note_leftovers(&self, id: &str, leftovers: Leftovers) {
        let mut g = self.leftovers.lock().unwrap_or_else(|p| p.into_inner());
        g.by_run.entry(id.to_owned()).or_default().extend(leftovers);
    }

    /// Remembers a blob run `id` no longer needs (a replaced model or strategy state).
    pub(crate) fn note_replaced(&self, id: &str, digest: Digest) {
        let mut g = self.leftovers.lock().unwrap_or_else(|p| p.into_inner());
        g.by_run.entry(id.to_owned()).or_default().blobs.insert(digest);
    }

    /// Keeps `digests` out of run `id`'s leftovers (blobs it still needs).
    pub(crate) fn spare_leftovers(&self, id: &str, digests: impl IntoIterator<Item = Digest>) {
        let mut g = self.leftovers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = g.by_run.get_mut(id) {
            for d in digests {
                l.blobs.remove(&d);
            }
        }
    }

    /// Forgets run `id`'s leftovers without removing them.
    pub(crate) fn forget_leftovers(&self, id: &str) {
        self.leftovers.lock().unwrap_or_else(|p| p.into_inner()).by_run.remove(id);
    }

    /// Takes what run `id` noted it left behind so far (to be removed later with
    /// [`Coordinator::discard`], or kept).
    pub(crate) fn take_leftovers(&self, id: &str) -> Leftovers {
        self.leftovers.lock().unwrap_or_else(|p| p.into_inner()).by_run.remove(id).unwrap_or_default()
    }

    /// Removes what run `id` left behind, except the blobs a saved run names. Failures are
    /// logged, never returned: the run's state is saved already.
    pub(crate) async fn discard_leftovers(&self, id: &str) {
        let l = self.take_leftovers(id);
        self.discard(id, l).await;
    }

    /// Removes `l`, what run `id` left behind, except the blobs a saved run names (see
    /// [`Coordinator::discard_leftovers`]).
    pub(crate) async fn discard(&self, id: &str, mut l: Leftovers) {
        if l.blobs.is_empty() && l.records.is_empty() {
            return;
        }
        let now = Instant::now();
        let due = {
            let mut g = self.leftovers.lock().unwrap_or_else(|p| p.into_inner());
            if self.identity.is_some() {
                // Signed tasks: their records go once the signature window has passed.
                let records = std::mem::take(&mut l.records);
                g.deferred.extend(records.into_iter().map(|k| (now + DEFER, k)));
            }
            let mut due = Vec::new();
            while g.deferred.front().is_some_and(|(at, _)| *at <= now) {
                due.extend(g.deferred.pop_front().map(|(_, k)| k));
            }
            due
        };
        let pinned = match self.pinned().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(run = %id, error = %e, "cannot list pinned blobs; the round's blobs are kept");
                return;
            }
        };
        let blobs: Vec<Digest> = l.blobs.into_iter().filter(|d| !pinned.contains(d)).collect();
        let records: Vec<String> = l.records.into_iter().chain(due).collect();
        let (nb, nr) = (blobs.len(), records.len());
        let backend = &self.backend;
        futures::stream::iter(blobs)
            .for_each_concurrent(CONCURRENCY, |d| async move {
                if let Err(e) = backend.blobs.delete(&d).await {
                    tracing::warn!(run = %id, blob = %d, error = %e, "could not remove a round's blob");
                }
            })
            .await;
        futures::stream::iter(records)
            .for_each_concurrent(CONCURRENCY, |k| async move {
                if let Err(e) = backend.world.delete(&k).await {
                    tracing::warn!(run = %id, key = %k, error = %e, "could not remove an answer record");
                }
            })
            .await;
        tracing::debug!(run = %id, blobs = nb, records = nr, "removed a round's leftovers");
    }
}
