//! Tessera's ports on NATS JetStream, for running across processes and machines.
//!
//! - [`NatsBus`]: each queue is a subject `tq.<queue>` of one work-queue stream
//!   (`TESSERA_QUEUES`, file storage) with a durable pull consumer per queue: explicit
//!   acks, `ack_wait`, progress acks, `max_deliver`, and the stream's duplicate window for
//!   [`Bus::put_once`](tessera_ports::Bus::put_once) (`Nats-Msg-Id`).
//! - [`NatsWorld`]: globals in the KV bucket `tessera_world` (revision compare-and-set);
//!   results in `tessera_results`, one key per added result.
//! - [`NatsMembership`]: the KV bucket `tessera_members`, whose entries expire after the
//!   time-to-live unless refreshed (server time, so no clock skew between machines).
//! - [`NatsBlobs`]: the Object Store `tessera_blobs`, chunked, so blobs may be far larger
//!   than the 1 MB message limit.
//!
//! It works with the nats-server of Debian 12 (2.9): the KV streams are created by hand
//! because the client's `create_key_value` does not understand 2.9's account-info reply.
//! This is the only crate that knows NATS.

mod blobs;
mod bus;
mod members;
#[cfg(feature = "testing")]
pub mod testing;
mod world;

use std::time::Duration;

pub use blobs::NatsBlobs;
pub use bus::NatsBus;
pub use members::NatsMembership;
pub use world::NatsWorld;

use async_nats::jetstream::{self, stream};
use tessera_ports::Backend;

/// Why connecting or setting up failed.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server could not be reached.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// Where.
        url: String,
        /// Why.
        message: String,
    },
    /// A stream, bucket or consumer could not be created or opened.
    #[error("cannot set up {what} on NATS: {message} (is JetStream enabled? start nats-server with -js)")]
    Setup {
        /// Which.
        what: String,
        /// Why.
        message: String,
    },
}

/// How the NATS backend behaves.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// How long a taken message may go unacknowledged before it is delivered again.
    pub ack_wait: Duration,
    /// Deliveries of one message before the bus gives up on it.
    pub max_deliver: i64,
    /// How long a member's announcement lasts.
    pub member_ttl: Duration,
    /// How long a queue's durable consumer may go unread before the server removes it
    /// (JetStream's `inactive_threshold`). Its messages stay in the stream, and the next
    /// reader of the queue gets them; so queues used once (a round's or a parameter set's
    /// replies) do not leave consumers behind for ever.
    pub consumer_inactive: Duration,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            member_ttl: Duration::from_secs(15),
            consumer_inactive: Duration::from_secs(3600),
        }
    }
}

/// A connection and the JetStream context on it.
#[derive(Clone)]
pub struct Nats {
    /// The client.
    pub client: async_nats::Client,
    /// Its JetStream context.
    pub js: jetstream::Context,
}

/// How long the first connection may take before [`connect`] gives up.
pub const FIRST_CONNECT: Duration = Duration::from_secs(10);

/// Connects to NATS: waits up to [`FIRST_CONNECT`] for the server to answer, then
/// reconnects forever when the connection is lost.
pub async fn connect(url: &str) -> Result<Nats, NatsError> {
    let client = async_nats::ConnectOptions::new()
        .name("tessera")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                other => tracing::debug!("NATS: {other}"),
            }
        })
        .connect(url)
        .await
        .map_err(|e| NatsError::Connect { url: url.to_owned(), message: e.to_string() })?;
    // The first connection is retried in the background; wait for it a little, so a server
    // that is not there is named as such, not as a JetStream failure later.
    let deadline = tokio::time::Instant::now() + FIRST_CONNECT;
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() >= deadline {
            return Err(NatsError::Connect {
                url: url.to_owned(),
                message: format!(
                    "nothing answered within {} s (is nats-server running there? start one with `nats-server -js`, or point --nats / TESSERA_NATS at one)",
                    FIRST_CONNECT.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(10));
    Ok(Nats { client, js })
}

/// Connects and opens every port: the distributed backend.
pub async fn backend(url: &str, options: &NatsOptions) -> Result<Backend, NatsError> {
    let nats = connect(url).await?;
    Ok(Backend {
        bus: std::sync::Arc::new(NatsBus::open(&nats, options).await?),
        world: std::sync::Arc::new(NatsWorld::open(&nats).await?),
        blobs: std::sync::Arc::new(NatsBlobs::open(&nats).await?),
        members: std::sync::Arc::new(NatsMembership::open(&nats, options.member_ttl).await?),
    })
}

/// How many entries a listing reads from the server at once.
const LISTING_READS: usize = 16;

/// The live entries (not deleted or purged) of a KV bucket whose keys start with `prefix`,
/// sorted by key. Every listing of a bucket in this crate goes through here.
///
/// The keys come from the stream's own state in one request (JetStream's stream info with
/// a subjects filter), then each key's last message by direct get. A KV watcher
/// (`Store::keys`, a `LastPerSubject` consumer) is not used: on nats-server 2.9 its listing
/// ends early when keys are written while it runs (about one listing in four while four
/// members announce themselves every 5 ms), and it can wait for ever when keys expire
/// (nats-io/nats-server#3481). A key written or expiring during the listing is listed with
/// its value at the time it is read, or left out if it is gone by then.
pub(crate) async fn list_entries(
    kv: &async_nats::jetstream::kv::Store,
    prefix: &str,
) -> Result<Vec<async_nats::jetstream::kv::Entry>, tessera_ports::WorldError> {
    use futures::{StreamExt, TryStreamExt};
    let backend = |e: &dyn std::fmt::Display| tessera_ports::WorldError::Backend(format!("listing keys: {e}"));
    let subjects = kv.stream.info_with_subjects(format!("{}>", kv.prefix)).await.map_err(|e| backend(&e))?;
    let subjects: Vec<(String, usize)> = subjects.try_collect().await.map_err(|e| backend(&e))?;
    let mut keys: Vec<String> = subjects
        .into_iter()
        .filter_map(|(subject, _)| subject.strip_prefix(kv.prefix.as_str()).map(str::to_owned))
        .filter(|key| key.starts_with(prefix))
        .collect();
    keys.sort();
    keys.dedup();
    let entries: Vec<_> = futures::stream::iter(keys)
        .map(|key| async move { kv.entry(key).await })
        .buffered(LISTING_READS)
        .try_collect()
        .await
        .map_err(|e| backend(&e))?;
    Ok(entries.into_iter().flatten().filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put).collect())
}

/// Creates (or opens) a KV bucket through its stream, which works on nats-server 2.9.
pub(crate) async fn kv_bucket(
    nats: &Nats,
    bucket: &str,
    max_age: Option<Duration>,
) -> Result<jetstream::kv::Store, NatsError> {
    let setup = |e: String| NatsError::Setup { what: format!("KV bucket {bucket}"), message: e };
    let max_age = max_age.unwrap_or_default();
    let duplicate_window =
        if max_age.is_zero() { Duration::from_secs(120) } else { max_age.min(Duration::from_secs(120)) };
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        duplicate_window,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    };
    nats.js.get_or_create_stream(config).await.map_err(|e| setup(e.to_string()))?;
    nats.js.get_key_value(bucket).await.map_err(|e| setup(e.to_string()))
}
