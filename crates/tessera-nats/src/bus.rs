//! Queues on a JetStream work-queue stream.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::{AckKind, Message};
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tessera_ports::bus::{Acker, check_queue};
use tessera_ports::{Bus, BusError, Delivery, Put, QueueBound};
use tokio::sync::Mutex;

use crate::{Nats, NatsError, NatsOptions};

const STREAM: &str = "TESSERA_QUEUES";

/// The header a bounded put writes: the bytes put to the queue so far, this message
/// included. The bytes a queue holds are the last message's total minus what was put before
/// its first stored message (taken but unacknowledged messages are still stored).
const PUT_TOTAL: &str = "Tessera-Put-Total";

/// Most publishes of one batch whose acknowledgements are awaited together: well under
/// the client's bound on acknowledgements in flight (5,000 by default, past which a
/// publisher waits).
const PUBLISH_WINDOW: usize = 1024;

/// Most messages one pull request asks for.
const MAX_FETCH: usize = 1024;

/// Most consumer handles a bus keeps at hand.
const MAX_CONSUMER_HANDLES: usize = 4096;

/// Queues on JetStream.
pub struct NatsBus {
    js: jetstream::Context,
    stream: stream::Stream,
    consumers: Mutex<HashMap<String, PullConsumer>>,
    /// Per queue, the last stream sequence that may have been delivered by a consumer
    /// this process never saw (see [`NatsBus::consumer`]): deliveries at or below it count
    /// as attempt 2 at least.
    floors: std::sync::Mutex<HashMap<String, u64>>,
    options: NatsOptions,
    max_payload: usize,
}

fn backend(e: impl std::fmt::Display) -> BusError {
    BusError::Backend(e.to_string())
}

fn subject(queue: &str) -> String {
    format!("tq.{queue}")
}

/// Consumer names cannot hold dots; a digest of the queue name keeps them distinct.
fn consumer_name(queue: &str) -> String {
    format!("q-{}", &tessera_core::Digest::of(queue.as_bytes()).hex()[..24])
}

impl NatsBus {
    /// Opens (creating if needed) the queue stream.
    pub async fn open(nats: &Nats, options: &NatsOptions) -> Result<Self, NatsError> {
        let config = stream::Config {
            name: STREAM.into(),
            subjects: vec!["tq.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            num_replicas: nats.replicas,
            ..Default::default()
        };
        let stream = nats
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| NatsError::Setup { what: format!("stream {STREAM}"), message: e.to_string() })?;
        let max_payload = nats.client.server_info().max_payload;
        Ok(NatsBus {
            js: nats.js.clone(),
            stream,
            consumers: Mutex::new(HashMap::new()),
            floors: std::sync::Mutex::new(HashMap::new()),
            options: options.clone(),
            max_payload: if max_payload == 0 { 1 << 20 } else { max_payload },
        })
    }

    async fn consumer(&self, queue: &str) -> Result<PullConsumer, BusError> {
        let mut g = self.consumers.lock().await;
        if let Some(c) = g.get(queue) {
            return Ok(c.clone());
        }
        // Handles of queues used once would pile up: past the bound, start afresh (a
        // handle is fetched again from the server when next needed).
        if g.len() >= MAX_CONSUMER_HANDLES {
            g.clear();
        }
        let name = consumer_name(queue);
        let config = pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: subject(queue),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.options.ack_wait,
            max_deliver: self.options.max_deliver,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: 10_000,
            inactive_threshold: self.options.consumer_inactive,
            ..Default::default()
        };
        let c = self.stream.get_or_create_consumer(&name, config).await.map_err(backend)?;
        // JetStream counts deliveries per consumer. One that has delivered nothing yet
        // (just created, or its predecessor removed for inactivity) would count 1 for a
        // message an earlier consumer delivered and nobody acknowledged: such messages,
        // stored before now, are marked as possible redeliveries.
        if c.cached_info().delivered.consumer_sequence == 0
            && let Some((_, last)) = self.ends(queue).await?
        {
            let mut floors = self.floors.lock().unwrap_or_else(|p| p.into_inner());
            let floor = floors.entry(queue.to_owned()).or_default();
            *floor = (*floor).max(last.sequence);
        }
        g.insert(queue.to_owned(), c.clone());
        Ok(c)
    }

    /// A delivery of `msg` from `queue`, its attempt as JetStream counts it, raised to 2
    /// when the message may have been delivered by a consumer before this one.
    fn delivery(&self, queue: &str, msg: Message) -> Delivery {
        let info = msg.info().ok().map(|i| (i.delivered.max(1) as u32, i.stream_sequence));
        let (mut attempt, sequence) = info.unwrap_or((1, u64::MAX));
        let floor = self.floors.lock().unwrap_or_else(|p| p.into_inner()).get(queue).copied().unwrap_or(0);
        if sequence <= floor {
            attempt = attempt.max(2);
        }
        let payload = msg.payload.clone();
        Delivery::new(payload, attempt, Box::new(NatsAcker(msg)))
    }

    /// Drops a cached consumer handle after a failure, so the next call opens it again
    /// (or re-creates it, should the server have lost it).
    async fn forget(&self, queue: &str) {
        self.consumers.lock().await.remove(queue);
    }

    fn check(&self, queue: &str, payload: &Bytes) -> Result<(), BusError> {
        check_queue(queue)?;
        // Leave room for headers.
        let limit = self.max_payload.saturating_sub(1024);
        if payload.len() > limit {
            return Err(BusError::TooLarge { size: payload.len(), limit });
        }
        Ok(())
    }
}

/// A stored message's running total of bytes put, and its size (a message put without the
/// header counts as if its queue started with it).
fn put_total(m: &async_nats::jetstream::message::StreamMessage) -> (u64, u64) {
    let size = m.payload.len() as u64;
    let total =
        m.headers.get(PUT_TOTAL).and_then(|v| v.as_str().parse::<u64>().ok()).filter(|t| *t >= size).unwrap_or(size);
    (total, size)
}

impl NatsBus {
    /// The first and last stored messages of a queue, if it holds any.
    async fn ends(
        &self,
        queue: &str,
    ) -> Result<
        Option<(async_nats::jetstream::message::StreamMessage, async_nats::jetstream::message::StreamMessage)>,
        BusError,
    > {
        use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
        let subject = subject(queue);
        let missing = |e: &async_nats::jetstream::stream::LastRawMessageError| {
            matches!(e.kind(), K::NoMessageFound)
                || matches!(e.kind(), K::JetStream(j) if j.error_code() == async_nats::jetstream::ErrorCode::NO_MESSAGE_FOUND)
        };
        let last = match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => m,
            Err(e) if missing(&e) => return Ok(None),
            Err(e) => return Err(backend(e)),
        };
        let first = match self.stream.get_first_raw_message_by_subject(&subject, 1).await {
            Ok(m) => m,
            Err(e) if missing(&e) => return Ok(None),
            Err(e) => return Err(backend(e)),
        };
        Ok(Some((first, last)))
    }
}

impl NatsBus {
    /// Messages already waiting in `queue`, up to `max`, in one pull request that does not
    /// wait (`no_wait`): it leaves no request behind on the server to take later messages.
    async fn fetch_waiting(&self, consumer: &PullConsumer, queue: &str, max: usize) -> Result<Vec<Delivery>, BusError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let mut batch = match consumer.fetch().max_messages(max.min(MAX_FETCH)).messages().await {
            Ok(b) => b,
            Err(e) => {
                self.forget(queue).await;
                return Err(backend(e));
            }
        };
        while let Some(m) = tokio::time::timeout(Duration::from_secs(15), batch.next()).await.ok().flatten() {
            match m {
                Ok(m) => out.push(self.delivery(queue, m)),
                Err(e) if out.is_empty() => {
                    self.forget(queue).await;
                    return Err(backend(e));
                }
                // What was taken is handed out; the rest stays for the next request.
                Err(_) => break,
            }
        }
        Ok(out)
    }
}

struct NatsAcker(Message);

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        // Confirmed by the server: once this returns, the message is gone from its queue
        // (a bounded queue counts its bytes free, and a lost connection cannot undo it).
        self.0.double_ack().await.map_err(backend)
    }
    async fn nack(self: Box<Self>) -> Result<(), BusError> {
        self.0.ack_with(AckKind::Nak(None)).await.map_err(backend)
    }
    async fn progress(&self) -> Result<(), BusError> {
        self.0.ack_with(AckKind::Progress).await.map_err(backend)
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn put(&self, queue: &str, payload: Bytes) -> Result<(), BusError> {
        self.put_batch(vec![Put::new(queue, payload)]).await
    }

    async fn put_once(&self, queue: &str, id: &str, payload: Bytes) -> Result<(), BusError> {
        self.put_batch(vec![Put::once(queue, id, payload)]).await
    }

    async fn get(&self, queue: &str, wait: Duration) -> Result<Option<Delivery>, BusError> {
        check_queue(queue)?;
        let consumer = self.consumer(queue).await?;
        let expires = wait.max(Duration::from_millis(10));
        let mut batch = match consumer.batch().max_messages(1).expires(expires).messages().await {
            Ok(b) => b,
            Err(e) => {
                self.forget(queue).await;
                return Err(backend(e));
            }
        };
        let msg = tokio::time::timeout(expires + Duration::from_secs(5), batch.next()).await;
        let msg = match msg {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                self.forget(queue).await;
                return Err(backend(e));
            }
            Ok(None) | Err(_) => {
                // Nothing came: the consumer may have been removed for inactivity, so the
                // next get fetches (or re-creates) it rather than waiting on a stale handle.
                self.forget(queue).await;
                return Ok(None);
            }
        };
        Ok(Some(self.delivery(queue, msg)))
    }

    async fn put_batch(&self, puts: Vec<Put>) -> Result<(), BusError> {
        for p in &puts {
            self.check(&p.queue, &p.payload)?;
        }
        // Publish a window, then await its acknowledgements together: the server sees the
        // publishes back to back, as a pipelined publisher's.
        let mut puts = puts.into_iter().peekable();
        while puts.peek().is_some() {
            let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
            for p in puts.by_ref().take(PUBLISH_WINDOW) {
                let ack = match &p.id {
                    None => self.js.publish(subject(&p.queue), p.payload).await,
                    Some(id) => {
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Nats-Msg-Id", id.as_str());
                        self.js.publish_with_headers(subject(&p.queue), headers, p.payload).await
                    }
                };
                acks.push(ack.map_err(backend)?);
            }
            futures::future::try_join_all(acks.into_iter().map(|a| a.into_future())).await.map_err(backend)?;
        }
        Ok(())
    }

    async fn get_batch(&self, queue: &str, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        check_queue(queue)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let consumer = self.consumer(queue).await?;
        // What is waiting now, in one request; otherwise wait for one message and hand it
        // over at once: asking for more would cost the caller another round trip before
        // it can start on it, and its next call takes what came meanwhile.
        let taken = self.fetch_waiting(&consumer, queue, max).await?;
        if !taken.is_empty() {
            return Ok(taken);
        }
        Ok(self.get(queue, wait).await?.into_iter().collect())
    }

    async fn put_bounded(&self, queue: &str, payload: Bytes, bound: QueueBound) -> Result<(), BusError> {
        self.check(queue, &payload)?;
        bound.check_size(&payload)?;
        if self.len(queue).await? >= bound.messages {
            return Err(BusError::Full(queue.to_owned()));
        }
        let size = payload.len() as u64;
        let (held, total) = match self.ends(queue).await? {
            None => (0, 0),
            Some((first, last)) => {
                let (first_total, first_size) = put_total(&first);
                let (last_total, _) = put_total(&last);
                let before_first = first_total - first_size;
                (last_total.saturating_sub(before_first), last_total)
            }
        };
        if held.saturating_add(size) > bound.bytes {
            return Err(BusError::FullBytes { queue: queue.to_owned(), held, size, bound: bound.bytes });
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(PUT_TOTAL, total.saturating_add(size).to_string().as_str());
        let ack = self.js.publish_with_headers(subject(queue), headers, payload).await.map_err(backend)?;
        ack.await.map_err(backend)?;
        Ok(())
    }

    async fn len(&self, queue: &str) -> Result<u64, BusError> {
        check_queue(queue)?;
        let consumer = self.consumer(queue).await?;
        match consumer.get_info().await {
            Ok(info) => Ok(info.num_pending),
            Err(e) => {
                self.forget(queue).await;
                Err(backend(e))
            }
        }
    }
}
