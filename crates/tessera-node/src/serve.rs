//! The serve loop: tasks taken from the node's queue, run concurrently within the node's
//! task slots, answered and acknowledged; the heartbeat that keeps the node announced.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tessera_core::wire::{self, TaskMessage};
use tessera_identity::{Envelope, messages, now_ms};
use tessera_ports::Delivery;
use tessera_ports::bus::check_queue;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::node::{Node, NodeError};

impl Node {
    /// Takes tasks from the node's queue until `shutdown` turns true, announcing the node
    /// every third of the membership's time-to-live. Runs up to `max_tasks` tasks at once
    /// (see [`crate::slots`]): it takes as many deliveries as it has free slots in one
    /// request. Malformed messages are logged and dropped; backend failures are retried;
    /// neither stops the node. On shutdown it takes no more tasks and finishes those
    /// running; dropping the returned future (a killed node) drops them unanswered.
    pub async fn serve(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<(), NodeError> {
        let queue = self.task_queue();
        self.register().await?;
        tracing::info!(node = %self.id, %queue, max_tasks = self.max_tasks, "node serving");
        // Dropped with this future: a node whose serving was dropped (killed) stops
        // announcing itself, and its announcement expires; its running tasks end with it.
        let heartbeat = AbortOnDrop(tokio::spawn(self.clone().heartbeat(shutdown.clone())));
        let free = Arc::new(Semaphore::new(self.max_tasks));
        let mut running = JoinSet::new();
        loop {
            while running.try_join_next().is_some() {}
            if *shutdown.borrow() {
                break;
            }
            let first = tokio::select! {
                _ = shutdown.changed() => break,
                p = free.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let mut permits = vec![first];
            while let Ok(p) = free.clone().try_acquire_owned() {
                permits.push(p);
            }
            let deliveries = tokio::select! {
                _ = shutdown.changed() => break,
                d = self.backend.bus.get_batch(&queue, permits.len(), Duration::from_secs(1)) => d,
            };
            let deliveries = match deliveries {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(node = %self.id, "bus: {e}; retrying");
                    drop(permits);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            for (delivery, permit) in deliveries.into_iter().zip(permits) {
                let node = self.clone();
                let queue = queue.clone();
                let mut shutdown = shutdown.clone();
                running.spawn(async move {
                    node.handle(delivery, &queue, &mut shutdown).await;
                    drop(permit);
                });
            }
        }
        while running.join_next().await.is_some() {}
        drop(heartbeat);
        if let Err(e) = self.deregister().await {
            tracing::warn!(node = %self.id, "could not withdraw the node's announcement: {e}");
        }
        tracing::info!(node = %self.id, "node stopped");
        Ok(())
    }

    async fn heartbeat(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let every = (self.backend.members.ttl() / 3).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.register().await {
                tracing::warn!(node = %self.id, "heartbeat: {e}");
            }
        }
    }

    /// Handles one delivery: decode, run (with progress acks while it runs), reply, ack.
    async fn handle(&self, delivery: Delivery, queue: &str, shutdown: &mut tokio::sync::watch::Receiver<bool>) {
        let task: TaskMessage = match wire::decode(&delivery.payload) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(node = %self.id, "refused a message on {queue}: {e}");
                let _ = delivery.ack().await;
                return;
            }
        };
        if let Err(e) = check_queue(&task.reply_to) {
            tracing::warn!(node = %self.id, task = %task.task_id, "refused a task with a bad reply queue: {e}");
            let _ = delivery.ack().await;
            return;
        }
        if delivery.attempt > 1 {
            tracing::info!(node = %self.id, task = %task.task_id, attempt = delivery.attempt, "task redelivered");
        }
        let run = self.answer(&task, delivery.attempt == 1);
        tokio::pin!(run);
        let (reply, record) = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = tokio::time::sleep(PROGRESS_EVERY) => {
                    if let Err(e) = delivery.progress().await {
                        tracing::debug!(node = %self.id, "progress ack: {e}");
                    }
                }
            }
        };
        let mut reply = reply;
        // Sign the reply for the task's signer, when both sides have keys.
        let signed = if let (Some(key), Some(auth)) = (&self.identity, &task.auth)
            && let Ok(env) = Envelope::parse(auth)
        {
            messages::sign_reply(&mut reply, key, &env.key, &task.reply_to, now_ms());
            true
        } else {
            false
        };
        // An unsigned reply is the answer's record itself: encoded once for both.
        let bytes = match &record {
            Some((_, kept)) if !signed => kept.clone(),
            _ => Bytes::from(wire::encode(&reply)),
        };
        let id = format!("reply.{}.{}.{}", task.task_id, task.dispatch, self.id);
        // The answer's record and the reply go out together; the ack only once both are
        // done, so a task is never acknowledged before its answer is kept.
        let recording = async {
            if let Some((key, value)) = record {
                self.keep_answer(&key, value, &task.task_id).await;
            }
        };
        let replying = async {
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.backend.bus.put_once(&task.reply_to, &id, bytes.clone()).await {
                    Ok(()) => return true,
                    Err(e) => {
                        tracing::warn!(node = %self.id, task = %task.task_id, "cannot send the reply: {e}; retrying");
                        tokio::select! {
                            _ = shutdown.changed() => return false,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        };
        let ((), sent) = tokio::join!(recording, replying);
        if !sent {
            // Give the task back: the next attempt answers from memory.
            let _ = delivery.nack().await;
            return;
        }
        if let Err(e) = delivery.ack().await {
            tracing::warn!(node = %self.id, task = %task.task_id, "ack failed ({e}); a redelivery will be answered from memory");
        }
    }
}

/// How often a node tells the bus a long task is still running.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
