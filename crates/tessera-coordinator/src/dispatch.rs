//! Dispatch and collection: tasks out to the nodes' queues, replies back from the run's
//! reply queue, with the faults a distributed run meets: nodes that leave while a stage
//! waits for them, replies that never come, duplicates, strays from other rounds or runs,
//! and replies not signed by the node they claim. Every federated round, evaluation,
//! region aggregation and swarm stage goes through [`Coordinator::send_and_collect`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tessera_core::Digest;
use tessera_core::trace::TraceParent;
use tessera_core::wire::{self, BlobRef, NodeRecord, SCHEMA_VERSION, TaskMessage, TaskReply, WorldScope};
use tessera_identity::{PublicKey, Verifier, messages, now_ms};
use tessera_node::{list_nodes, task_queue};
use tessera_ports::Put;

use crate::SessionError;
use crate::engine::Coordinator;
use crate::placement::Workers;

/// What a round's wait collected.
pub(crate) struct Replies {
    /// Replies by participant.
    pub(crate) replies: BTreeMap<String, TaskReply>,
    /// Participants whose node left while the round waited for them.
    pub(crate) gone: BTreeSet<String>,
    /// Seconds spent placing the tasks on the queues.
    pub(crate) dispatch_seconds: f64,
    /// Seconds from the tasks being placed to the last reply taken.
    pub(crate) wait_seconds: f64,
}

/// A participant: a node, or (simulating) one of a node's virtual clients `<node>.c<j>`.
pub(crate) fn participant_node(participant: &str) -> &str {
    participant.rsplit_once(".c").filter(|(_, j)| j.parse::<usize>().is_ok()).map_or(participant, |(n, _)| n)
}

/// One task to send.
pub(crate) struct Outgoing {
    /// Who answers it (a node, or a simulated client of one); replies are keyed by it.
    pub participant: String,
    /// Unique per attempt and target.
    pub task_id: String,
    /// The package to run.
    pub module: Digest,
    /// Its config.
    pub config: Value,
    /// Its inputs.
    pub inputs: Vec<BlobRef>,
    /// The swarm iteration's world state it sees.
    pub world: Option<WorldScope>,
    /// Outputs up to this many bytes come back inline in the reply (0: none); for tasks
    /// whose outputs only the coordinator reads, through [`tessera_ports::read_ref`].
    pub inline_outputs: u64,
    /// No task of this id was sent before (see [`TaskMessage::fresh`]).
    pub fresh: bool,
    /// The Component Repository entry the module was named by (see
    /// [`TaskMessage::component`]).
    pub component: Option<String>,
}

/// Outputs of a federated round's tasks (updates, metrics, partial sums) up to this size
/// come back in the reply rather than through the blob store.
pub(crate) const INLINE_OUTPUTS: u64 = 64 << 10;

/// The keys `nodes` announced, by node (nodes without one, or with one that does not
/// parse, are left out).
pub(crate) fn keys_of(nodes: &[NodeRecord]) -> BTreeMap<String, PublicKey> {
    nodes.iter().filter_map(|n| Some((n.id.clone(), n.key.as_deref()?.parse().ok()?))).collect()
}

/// A global model as a task's `model` input: in the task when small, else by digest
/// through the blob store.
pub(crate) fn model_input(bytes: &[u8], digest: Digest) -> BlobRef {
    if bytes.len() as u64 <= INLINE_OUTPUTS {
        BlobRef::inline("model", bytes)
    } else {
        BlobRef::stored("model", digest, bytes.len() as u64)
    }
}

/// The queue the replies to a run's tasks of `round` come back on: [`reply_queue`], and
/// for federated evaluation a queue of its own, so that a run reading its training replies
/// all the time (FedBuff) never takes them, nor they its.
pub(crate) fn reply_queue_of(id: &str, round: u32) -> String {
    if round >= crate::fl::EVAL_ROUND_BASE { format!("{}.evaluation", reply_queue(id)) } else { reply_queue(id) }
}

/// The queue a session's replies come back on.
pub fn reply_queue(id: &str) -> String {
    format!("tessera.session.{id}.replies")
}

impl Coordinator {
    /// Sends one task per participant of a federated round (task ids
    /// `<id>.r<round><attempt>.<participant>`) and collects the replies.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn dispatch(
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
        let tasks = participants
            .iter()
            .enumerate()
            .map(|(i, p)| Outgoing {
                participant: p.clone(),
                task_id: format!("{id}.r{round}{attempt}.{p}"),
                module: workers.for_node(participant_node(p)).digest,
                config: config_for(i, p),
                inputs: inputs_for(i, p),
                world: None,
                inline_outputs: INLINE_OUTPUTS,
                fresh: self.started_here(id),
                component: workers.for_node(participant_node(p)).component.clone(),
            })
            .collect();
        let replies = self.send_and_collect(id, round, tasks, timeout).await?;
        self.note_leftovers(id, crate::retention::Leftovers::of(&replies));
        Ok(replies)
    }

    /// The keys nodes announced (from a listing at most [`LISTING_REUSE`] old): tasks are
    /// signed for them, replies checked against them. Empty without an identity.
    ///
    /// [`LISTING_REUSE`]: crate::placement::LISTING_REUSE
    pub(crate) async fn node_keys(&self) -> Result<BTreeMap<String, PublicKey>, SessionError> {
        Ok(match &self.identity {
            None => BTreeMap::new(),
            Some(_) => keys_of(&self.announced(crate::placement::LISTING_REUSE).await?),
        })
    }

    /// What checks the signatures of replies for this coordinator (none without an
    /// identity).
    pub(crate) fn reply_verifier(&self) -> Option<Verifier> {
        self.identity
            .as_ref()
            .map(|k| Verifier::new(k.public().clone()).with_window_ms(3_600_000).without_replay_check())
    }

    /// Places `tasks` on their nodes' queues, signed for nodes in `node_keys`, all at once
    /// (acknowledgements awaited together: a slow queue does not hold up the others'
    /// tasks; the message ids make a retried batch store each task once). Gives each
    /// task's id and participant.
    pub(crate) async fn send_tasks(
        &self,
        id: &str,
        round: u32,
        tasks: Vec<Outgoing>,
        node_keys: &BTreeMap<String, PublicKey>,
    ) -> Result<Vec<(String, String)>, SessionError> {
        let reply_to = reply_queue_of(id, round);
        let mut sent = Vec::with_capacity(tasks.len());
        let mut puts = Vec::with_capacity(tasks.len());
        for t in tasks {
            let node = participant_node(&t.participant).to_owned();
            let mut task = TaskMessage {
                schema: SCHEMA_VERSION,
                task_id: t.task_id.clone(),
                session: id.to_owned(),
                round,
                module: t.module,
                config: t.config,
                inputs: t.inputs,
                reply_to: reply_to.clone(),
                dispatch: self.dispatch.clone(),
                world: t.world,
                auth: None,
                inline_outputs: t.inline_outputs,
                fresh: t.fresh,
                trace: Some(TraceParent::for_task(id, round, &t.task_id).to_string()),
                component: t.component,
            };
            let queue = task_queue(&node);
            if let (Some(key), Some(node_key)) = (&self.identity, node_keys.get(&node)) {
                // A node looks up every signed task's earlier answer (a replayed one must
                // not run twice): `fresh` would say nothing to it.
                task.fresh = false;
                messages::sign_task(&mut task, key, node_key, &queue, now_ms());
            }
            if let Some(tp) = task.trace.as_deref().and_then(TraceParent::parse) {
                tracing::debug!(
                    trace_id = %tp.trace_hex(),
                    span_id = %tp.span_hex(),
                    task_id = %t.task_id,
                    node = %node,
                    run = %id,
                    round,
                    "task sent"
                );
            }
            let msg_id = format!("{}.{}", t.task_id, self.dispatch);
            puts.push(Put::once(queue, msg_id, Bytes::from(wire::encode(&task))));
            sent.push((t.task_id, t.participant));
        }
        self.retry("sending tasks", || self.backend.bus.put_batch(puts.clone())).await?;
        Ok(sent)
    }

    /// Sends `tasks` and collects replies until all answered, `timeout` passed, or the
    /// nodes still pending left (their announcement lapsed). Replies are matched by task
    /// id: duplicates, strays from other rounds and malformed messages are logged and
    /// dropped. Ends with [`SessionError::Stopped`] when the run is asked to stop.
    pub(crate) async fn send_and_collect(
        &self,
        id: &str,
        round: u32,
        tasks: Vec<Outgoing>,
        timeout: Duration,
    ) -> Result<Replies, SessionError> {
        let started = Instant::now();
        let reply_to = reply_queue_of(id, round);
        let node_keys = self.node_keys().await?;
        let reply_verifier = self.reply_verifier();
        let mut pending: BTreeMap<String, String> =
            self.send_tasks(id, round, tasks, &node_keys).await?.into_iter().collect();
        let placed = Instant::now();
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
                if self.stop_requested(id).await {
                    return Err(SessionError::Stopped);
                }
                if let Ok(nodes) = list_nodes(self.backend.members.as_ref()).await {
                    self.remember_listing(&nodes);
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
            let batch = match self.backend.bus.get_batch(&reply_to, REPLY_BATCH, left.min(check_every)).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("waiting for replies: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200).min(left)).await;
                    continue;
                }
            };
            for d in &batch {
                if let Some((participant, r)) = self.accept_reply(
                    id,
                    Some(round),
                    &reply_to,
                    &d.payload,
                    &node_keys,
                    reply_verifier.as_ref(),
                    &mut pending,
                ) {
                    replies.insert(participant, r);
                }
            }
            ack_all(batch).await;
        }
        Ok(Replies {
            replies,
            gone,
            dispatch_seconds: placed.duration_since(started).as_secs_f64(),
            wait_seconds: placed.elapsed().as_secs_f64(),
        })
    }

    /// Checks one message on the reply queue: a reply of run `id` (and of `round`, when
    /// given) to a pending task, from the node it went to (`pending` maps task ids to what
    /// names their participant), signed by that node when it announced a key. Gives the
    /// pending entry and reply, and takes the task off `pending`; anything else is logged.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn accept_reply<P: AsRef<str>>(
        &self,
        id: &str,
        round: Option<u32>,
        reply_to: &str,
        payload: &[u8],
        node_keys: &BTreeMap<String, PublicKey>,
        reply_verifier: Option<&Verifier>,
        pending: &mut BTreeMap<String, P>,
    ) -> Option<(P, TaskReply)> {
        let decoded = wire::decode::<TaskReply>(payload).map_err(|e| e.to_string()).and_then(|r| {
            // A node that announced a key must sign its replies for this coordinator.
            match (node_keys.get(&r.node), reply_verifier) {
                (Some(expected), Some(v)) => match messages::verify_reply(&r, v, reply_to, now_ms()) {
                    Ok(Some(signer)) if &signer == expected => Ok(r),
                    Ok(Some(signer)) => Err(format!("reply for {} signed by {signer}, not by the node", r.task_id)),
                    Ok(None) => Err(format!("unsigned reply for {} from a node with a key", r.task_id)),
                    Err(e) => Err(format!("reply for {}: {e}", r.task_id)),
                },
                _ => Ok(r),
            }
        });
        match decoded {
            Ok(r) if r.session == id && round.is_none_or(|n| r.round == n) => match pending.remove(&r.task_id) {
                Some(p) if participant_node(p.as_ref()) == r.node => {
                    let tp = TraceParent::for_task(id, r.round, &r.task_id);
                    tracing::debug!(
                        trace_id = %tp.trace_hex(),
                        span_id = %tp.span_hex(),
                        task_id = %r.task_id,
                        node = %r.node,
                        "reply accepted"
                    );
                    return Some((p, r));
                }
                Some(p) => {
                    tracing::warn!(task = %r.task_id, "reply claims node {} but the task went to {}; ignored", r.node, p.as_ref());
                    pending.insert(r.task_id.clone(), p);
                }
                None => tracing::info!(task = %r.task_id, "duplicate or unexpected reply ignored"),
            },
            Ok(r) => {
                tracing::info!(task = %r.task_id, session = %r.session, "reply for another round or session ignored")
            }
            Err(e) => tracing::warn!("refused a message on {reply_to}: {e}"),
        }
        None
    }
}

/// Acknowledges a batch of replies, side by side (each waits for the server's
/// confirmation); failures are logged: the reply was taken, and a redelivery is dropped
/// as a duplicate.
pub(crate) async fn ack_all(batch: Vec<tessera_ports::Delivery>) {
    for r in futures::future::join_all(batch.into_iter().map(|d| d.ack())).await {
        if let Err(e) = r {
            tracing::debug!("ack of a reply failed: {e}");
        }
    }
}

/// Most replies taken from the reply queue in one request.
const REPLY_BATCH: usize = 256;
