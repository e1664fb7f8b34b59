//! Named queues: put, get with a wait, explicit acknowledgement.
//!
//! Delivery is at least once: a message taken with [`Bus::get`] and not acknowledged
//! ([`Delivery::nack`]ed, dropped, or left past the backend's ack wait) is delivered again
//! with its attempt count raised, not necessarily before later messages. Handlers must
//! therefore be idempotent. The in-process bus puts a returned message back at the front
//! of its queue at once.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::name::check_key;
use tokio::sync::Notify;

/// Why a bus operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The queue name is not valid.
    #[error("invalid queue name: {0}")]
    Name(String),
    /// The message is over the bus's size limit.
    #[error("message of {size} bytes is over the bus limit of {limit}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The queue is full (bounded queues refuse rather than grow).
    #[error("queue {0} is full")]
    Full(String),
    /// The queue holds too many bytes for this message (bounded queues refuse rather than
    /// grow).
    #[error("queue {queue} holds {held} bytes; {size} more is over its bound of {bound} bytes")]
    FullBytes {
        /// The queue.
        queue: String,
        /// Bytes waiting in it.
        held: u64,
        /// The message's size.
        size: u64,
        /// The bound.
        bound: u64,
    },
    /// The backend failed (connection lost, server error).
    #[error("bus backend: {0}")]
    Backend(String),
}

/// Acknowledges a delivery. Implemented by each backend.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message was handled: never deliver it again.
    async fn ack(self: Box<Self>) -> Result<(), BusError>;
    /// The message was not handled: deliver it again.
    async fn nack(self: Box<Self>) -> Result<(), BusError>;
    /// Work on the message goes on: do not redeliver it yet (extends the ack deadline).
    async fn progress(&self) -> Result<(), BusError> {
        Ok(())
    }
}

/// A message taken from a queue. Acknowledge it once handled; dropping it unacknowledged
/// puts it back.
pub struct Delivery {
    /// The message body.
    pub payload: Bytes,
    /// 1 for the first delivery, more for redeliveries. A bus that cannot tell (JetStream
    /// counts per consumer, and a consumer removed for inactivity forgets) says 2 or more
    /// for a message that may have been delivered before: 1 means certainly the first.
    pub attempt: u32,
    acker: Option<Box<dyn Acker>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery").field("len", &self.payload.len()).field("attempt", &self.attempt).finish()
    }
}

impl Delivery {
    /// A delivery acknowledged through `acker` (for backend implementations).
    pub fn new(payload: Bytes, attempt: u32, acker: Box<dyn Acker>) -> Self {
        Delivery { payload, attempt, acker: Some(acker) }
    }
    /// Marks the message handled.
    pub async fn ack(mut self) -> Result<(), BusError> {
        match self.acker.take() {
            Some(a) => a.ack().await,
            None => Ok(()),
        }
    }
    /// Says work on the message goes on, so it is not redelivered meanwhile. Long
    /// handlers call this well within the bus's ack wait.
    pub async fn progress(&self) -> Result<(), BusError> {
        match &self.acker {
            Some(a) => a.progress().await,
            None => Ok(()),
        }
    }
    /// Gives the message back for redelivery.
    pub async fn nack(mut self) -> Result<(), BusError> {
        match self.acker.take() {
            Some(a) => a.nack().await,
            None => Ok(()),
        }
    }
}

/// Named queues.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Appends a message to `queue`.
    async fn put(&self, queue: &str, payload: Bytes) -> Result<(), BusError>;
    /// Appends a message identified by `id`: putting the same id again within the bus's
    /// duplicate window (at least two minutes) stores nothing more, so a put retried after
    /// a lost acknowledgement does not make a second message.
    async fn put_once(&self, queue: &str, id: &str, payload: Bytes) -> Result<(), BusError>;
    /// Takes the next message from `queue`, waiting up to `wait` for one.
    async fn get(&self, queue: &str, wait: Duration) -> Result<Option<Delivery>, BusError>;
    /// Messages waiting in `queue` (not counting those taken and not yet acknowledged).
    async fn len(&self, queue: &str) -> Result<u64, BusError>;
    /// Appends a message unless `queue` already holds `bound.messages` waiting messages
    /// ([`BusError::Full`]) or the message would take its bytes past `bound.bytes`
    /// ([`BusError::FullBytes`]): a bounded queue, so producers feel backpressure. The
    /// in-process bus checks and appends at once; a distributed bus checks, then appends,
    /// so concurrent producers may overshoot the bound by at most their number of
    /// messages. A message larger than `bound.bytes` is refused as [`BusError::TooLarge`].
    async fn put_bounded(&self, queue: &str, payload: Bytes, bound: QueueBound) -> Result<(), BusError>;
    /// Appends every message of `puts` (to one queue or several), their acknowledgements
    /// awaited together rather than one by one: one call costs about one round trip to a
    /// distributed bus, not one per message. Messages to one queue keep their order. Every
    /// message is checked (queue name, size) before any is appended, so a bad one stores
    /// nothing; a backend failure part way may leave some appended, and a retry of the
    /// same batch stores again only those without a [`Put::id`].
    async fn put_batch(&self, puts: Vec<Put>) -> Result<(), BusError>;
    /// Takes up to `max` messages from `queue`: those already waiting, else waits up to
    /// `wait` for the first (a distributed bus hands that one over alone, at once; the
    /// next call takes what came meanwhile). Empty when nothing came within `wait`. Each
    /// delivery is acknowledged on its own. `max` of 0 takes nothing.
    async fn get_batch(&self, queue: &str, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError>;
}

/// One message of [`Bus::put_batch`].
#[derive(Clone, Debug)]
pub struct Put {
    /// The queue it goes to.
    pub queue: String,
    /// When set, the message is put once, as [`Bus::put_once`] does.
    pub id: Option<String>,
    /// The message body.
    pub payload: Bytes,
}

impl Put {
    /// A message for `queue`.
    pub fn new(queue: impl Into<String>, payload: Bytes) -> Self {
        Put { queue: queue.into(), id: None, payload }
    }
    /// A message for `queue` stored once under `id` (see [`Bus::put_once`]).
    pub fn once(queue: impl Into<String>, id: impl Into<String>, payload: Bytes) -> Self {
        Put { queue: queue.into(), id: Some(id.into()), payload }
    }
}

/// Deliveries of one queue taken in batches: [`Bus::get_batch`] fills a local buffer of up
/// to `prefetch` messages, handed out one by one. Messages in the buffer count as taken
/// (their ack wait runs); dropping the subscription drops them unacknowledged, so they come
/// back. Keep `prefetch` to what is handled well within the bus's ack wait.
pub struct Subscription {
    bus: Arc<dyn Bus>,
    queue: String,
    prefetch: usize,
    buffer: VecDeque<Delivery>,
}

impl Subscription {
    /// Reads `queue` of `bus`, `prefetch` messages (at least 1) per request.
    ///
    /// # Errors
    /// [`BusError::Name`] for a bad queue name.
    pub fn new(bus: Arc<dyn Bus>, queue: &str, prefetch: usize) -> Result<Self, BusError> {
        check_queue(queue)?;
        Ok(Subscription { bus, queue: queue.to_owned(), prefetch: prefetch.max(1), buffer: VecDeque::new() })
    }

    /// The next delivery: from the buffer, or from one batched request that waits up to
    /// `wait` for the first message.
    ///
    /// # Errors
    /// The bus's, from the request.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<Delivery>, BusError> {
        if self.buffer.is_empty() {
            self.buffer.extend(self.bus.get_batch(&self.queue, self.prefetch, wait).await?);
        }
        Ok(self.buffer.pop_front())
    }

    /// Deliveries taken from the bus and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

/// The bound of a queue: waiting messages and the bytes they hold (taken but
/// unacknowledged messages count too, since they may come back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueBound {
    /// Most messages.
    pub messages: u64,
    /// Most bytes of payload.
    pub bytes: u64,
}

impl QueueBound {
    /// A bound of `messages` messages and `bytes` bytes.
    pub fn new(messages: u64, bytes: u64) -> Self {
        QueueBound { messages, bytes }
    }

    /// Refuses a message larger than the whole bound.
    pub fn check_size(&self, payload: &Bytes) -> Result<(), BusError> {
        let size = payload.len() as u64;
        if size > self.bytes {
            return Err(BusError::TooLarge {
                size: payload.len(),
                limit: usize::try_from(self.bytes).unwrap_or(usize::MAX),
            });
        }
        Ok(())
    }
}

/// Checks a queue name (the portable subset both backends accept).
pub fn check_queue(name: &str) -> Result<(), BusError> {
    check_key("queue name", name).map_err(|e| BusError::Name(e.to_string()))?;
    if name.contains('/') || name.contains('=') {
        return Err(BusError::Name(format!("{name:?}: queue names use letters, digits, '_', '-' and '.'")));
    }
    Ok(())
}

struct Message {
    payload: Bytes,
    attempt: u32,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Message>,
    notify: Arc<Notify>,
    /// Bytes of the messages in `items` and of those taken but not yet acknowledged.
    bytes: u64,
}

type Queues = Arc<Mutex<HashMap<String, Queue>>>;

/// How many message ids the in-process bus remembers for [`Bus::put_once`].
const REMEMBERED_IDS: usize = 100_000;

type Seen = Arc<Mutex<(std::collections::HashSet<String>, VecDeque<String>)>>;

/// The in-process bus: queues in memory, for one process (the embedded default).
#[derive(Clone)]
pub struct MemoryBus {
    queues: Queues,
    max_message: usize,
    seen: Seen,
}

impl Default for MemoryBus {
    fn default() -> Self {
        MemoryBus { queues: Queues::default(), max_message: 64 << 20, seen: Seen::default() }
    }
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Remembers `id` for `queue`; false when it was put before.
    fn first_time(&self, queue: &str, id: &str) -> bool {
        let key = format!("{queue}\n{id}");
        let mut g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (set, order) = &mut *g;
        if !set.insert(key.clone()) {
            return false;
        }
        order.push_back(key);
        if order.len() > REMEMBERED_IDS
            && let Some(old) = order.pop_front()
        {
            set.remove(&old);
        }
        true
    }
}

fn lock(q: &Queues) -> std::sync::MutexGuard<'_, HashMap<String, Queue>> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

struct MemoryAcker {
    queues: Queues,
    queue: String,
    message: Option<Message>,
}

impl MemoryAcker {
    fn requeue(&mut self) {
        if let Some(mut m) = self.message.take() {
            m.attempt = m.attempt.saturating_add(1);
            let mut qs = lock(&self.queues);
            let q = qs.entry(self.queue.clone()).or_default();
            q.items.push_front(m);
            q.notify.notify_one();
        }
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        self.requeue();
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        if let Some(m) = self.message.take() {
            let mut qs = lock(&self.queues);
            if let Some(q) = qs.get_mut(&self.queue) {
                q.bytes = q.bytes.saturating_sub(m.payload.len() as u64);
            }
        }
        Ok(())
    }
    async fn nack(mut self: Box<Self>) -> Result<(), BusError> {
        self.requeue();
        Ok(())
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn put(&self, queue: &str, payload: Bytes) -> Result<(), BusError> {
        self.put_batch(vec![Put::new(queue, payload)]).await
    }

    async fn put_once(&self, queue: &str, id: &str, payload: Bytes) -> Result<(), BusError> {
        self.put_batch(vec![Put::once(queue, id, payload)]).await
    }

    async fn put_batch(&self, puts: Vec<Put>) -> Result<(), BusError> {
        for p in &puts {
            check_queue(&p.queue)?;
            if p.payload.len() > self.max_message {
                return Err(BusError::TooLarge { size: p.payload.len(), limit: self.max_message });
            }
        }
        let puts: Vec<Put> =
            puts.into_iter().filter(|p| p.id.as_deref().is_none_or(|id| self.first_time(&p.queue, id))).collect();
        let mut qs = lock(&self.queues);
        for p in puts {
            let q = qs.entry(p.queue).or_default();
            q.bytes = q.bytes.saturating_add(p.payload.len() as u64);
            q.items.push_back(Message { payload: p.payload, attempt: 1 });
            q.notify.notify_one();
        }
        Ok(())
    }

    async fn get_batch(&self, queue: &str, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        check_queue(queue)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let Some(first) = self.get(queue, wait).await? else {
            return Ok(Vec::new());
        };
        let mut out = vec![first];
        let mut qs = lock(&self.queues);
        let q = qs.entry(queue.to_owned()).or_default();
        while out.len() < max {
            let Some(m) = q.items.pop_front() else { break };
            let (payload, attempt) = (m.payload.clone(), m.attempt);
            let acker = MemoryAcker { queues: self.queues.clone(), queue: queue.to_owned(), message: Some(m) };
            out.push(Delivery::new(payload, attempt, Box::new(acker)));
        }
        if !q.items.is_empty() {
            q.notify.notify_one();
        }
        Ok(out)
    }

    async fn get(&self, queue: &str, wait: Duration) -> Result<Option<Delivery>, BusError> {
        check_queue(queue)?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notify = {
                let mut qs = lock(&self.queues);
                let q = qs.entry(queue.to_owned()).or_default();
                if let Some(m) = q.items.pop_front() {
                    // Wake another waiter if more are queued.
                    if !q.items.is_empty() {
                        q.notify.notify_one();
                    }
                    let payload = m.payload.clone();
                    let attempt = m.attempt;
                    let acker = MemoryAcker { queues: self.queues.clone(), queue: queue.to_owned(), message: Some(m) };
                    return Ok(Some(Delivery::new(payload, attempt, Box::new(acker))));
                }
                q.notify.clone()
            };
            let notified = notify.notified();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    async fn len(&self, queue: &str) -> Result<u64, BusError> {
        check_queue(queue)?;
        Ok(lock(&self.queues).get(queue).map_or(0, |q| q.items.len() as u64))
    }

    async fn put_bounded(&self, queue: &str, payload: Bytes, bound: QueueBound) -> Result<(), BusError> {
        check_queue(queue)?;
        if payload.len() > self.max_message {
            return Err(BusError::TooLarge { size: payload.len(), limit: self.max_message });
        }
        bound.check_size(&payload)?;
        let mut qs = lock(&self.queues);
        let q = qs.entry(queue.to_owned()).or_default();
        if q.items.len() as u64 >= bound.messages {
            return Err(BusError::Full(queue.to_owned()));
        }
        let size = payload.len() as u64;
        if q.bytes.saturating_add(size) > bound.bytes {
            return Err(BusError::FullBytes { queue: queue.to_owned(), held: q.bytes, size, bound: bound.bytes });
        }
        q.bytes = q.bytes.saturating_add(size);
        q.items.push_back(Message { payload, attempt: 1 });
        q.notify.notify_one();
        Ok(())
    }
}
