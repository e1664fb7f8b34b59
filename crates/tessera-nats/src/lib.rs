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
//! The tests run nats-server 2.15; it also works with the nats-server of Debian 12 (2.9),
//! for which the KV streams are created by hand because the client's `create_key_value`
//! does not understand 2.9's account-info reply.
//! This is the only crate that knows NATS.

mod blobs;
mod bus;
mod members;
mod objects;
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
    /// Copies the server keeps of every stream, bucket and object store this backend
    /// creates (JetStream's `num_replicas`, 1 to 5). `None`: 1 on a single server, 3 on a
    /// cluster of three or more (fewer on a smaller one), from what the server says of
    /// its cluster when connecting. With 3, the backend keeps working when one server is
    /// lost. Streams that exist already keep the count they were made with.
    pub replicas: Option<usize>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            member_ttl: Duration::from_secs(15),
            consumer_inactive: Duration::from_secs(3600),
            replicas: None,
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
    /// Copies kept of what it creates (see [`NatsOptions::replicas`]).
    pub replicas: usize,
}

/// How long the first connection may take before [`connect`] gives up.
pub const FIRST_CONNECT: Duration = Duration::from_secs(10);

/// Connects to NATS: waits up to [`FIRST_CONNECT`] for a server to answer, then
/// reconnects forever when the connection is lost. `url` names one server or several,
/// comma-separated (`nats://a:4222,nats://b:4222`): the servers of a cluster, any of
/// which will do; the client also learns the cluster's other servers from the one it
/// reaches. What it creates keeps one copy per server, up to three (see
/// [`NatsOptions::replicas`]).
pub async fn connect(url: &str) -> Result<Nats, NatsError> {
    let servers = server_list(url)?;
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
        .connect(servers)
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
                    "nothing answered within {} s (is nats-server running there? start one with `nats-server -js`)",
                    FIRST_CONNECT.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(10));
    let replicas = default_replicas(&client.server_info());
    Ok(Nats { client, js, replicas })
}

/// The servers of a comma-separated list, each checked.
fn server_list(url: &str) -> Result<Vec<async_nats::ServerAddr>, NatsError> {
    let bad = |message: String| NatsError::Connect { url: url.to_owned(), message };
    let servers: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<async_nats::ServerAddr>().map_err(|e| bad(format!("{s:?} is not a server address: {e}"))))
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err(bad("no server named".into()));
    }
    if servers.len() > MAX_SERVERS {
        return Err(bad(format!("{} servers named; at most {MAX_SERVERS}", servers.len())));
    }
    Ok(servers)
}

/// Most servers one `--nats` list may name.
const MAX_SERVERS: usize = 64;

/// 1 on a single server; on a cluster, one copy per server it knows of, up to 3.
fn default_replicas(info: &async_nats::ServerInfo) -> usize {
    if info.cluster.is_none() {
        return 1;
    }
    let mut known: std::collections::BTreeSet<&str> = info.connect_urls.iter().map(String::as_str).collect();
    let me = format!("{}:{}", info.host, info.port);
    known.insert(&me);
    known.len().clamp(1, 3)
}

/// How long opening the backend retries while JetStream is not ready (a cluster electing
/// its leaders just after it started, or after losing a server). A three-server cluster
/// started together was seen to need over 30 s to place a replicated stream on a loaded
/// 2-core machine.
const SETUP_PATIENCE: Duration = Duration::from_secs(60);

/// Runs `open` until it succeeds or [`SETUP_PATIENCE`] has passed.
async fn patiently<T, F, Fut>(open: F) -> Result<T, NatsError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, NatsError>>,
{
    let deadline = tokio::time::Instant::now() + SETUP_PATIENCE;
    loop {
        match open().await {
            Ok(t) => return Ok(t),
            Err(e @ NatsError::Setup { .. }) if tokio::time::Instant::now() < deadline => {
                tracing::debug!("{e}; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects and opens every port: the distributed backend.
///
/// # Errors
/// [`NatsError::Connect`] when no server answers or `url` is malformed;
/// [`NatsError::Setup`] when a stream, bucket or object store cannot be made within 60 s,
/// or `options.replicas` is not 1 to 5.
pub async fn backend(url: &str, options: &NatsOptions) -> Result<Backend, NatsError> {
    let mut nats = connect(url).await?;
    if let Some(r) = options.replicas {
        if !(1..=5).contains(&r) {
            return Err(NatsError::Setup {
                what: "streams".into(),
                message: format!("{r} replicas: JetStream keeps 1 to 5"),
            });
        }
        nats.replicas = r;
    }
    tracing::debug!(replicas = nats.replicas, "opening the NATS backend");
    Ok(Backend {
        bus: std::sync::Arc::new(patiently(|| NatsBus::open(&nats, options)).await?),
        world: std::sync::Arc::new(patiently(|| NatsWorld::open(&nats)).await?),
        blobs: std::sync::Arc::new(patiently(|| NatsBlobs::open(&nats)).await?),
        members: std::sync::Arc::new(patiently(|| NatsMembership::open(&nats, options.member_ttl)).await?),
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
        num_replicas: nats.replicas,
        ..Default::default()
    };
    nats.js.get_or_create_stream(config).await.map_err(|e| setup(e.to_string()))?;
    nats.js.get_key_value(bucket).await.map_err(|e| setup(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_are_checked() {
        assert_eq!(server_list("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert_eq!(server_list("nats://a:4222, nats://b:4222,nats://c:4222,").unwrap().len(), 3);
        for bad in ["", " , ", "nats://a:4222,http://[::1", "nats://a:99999999"] {
            let e = server_list(bad).unwrap_err().to_string();
            assert!(e.contains("server"), "{bad:?}: {e}");
        }
        let many = vec!["nats://a:4222"; MAX_SERVERS + 1].join(",");
        assert!(server_list(&many).unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn replicas_follow_the_cluster_the_server_reports() {
        let mut info = async_nats::ServerInfo { host: "127.0.0.1".into(), port: 4222, ..Default::default() };
        assert_eq!(default_replicas(&info), 1, "a single server");
        info.cluster = Some("c".into());
        info.connect_urls = vec!["127.0.0.1:4222".into(), "127.0.0.1:4223".into()];
        assert_eq!(default_replicas(&info), 2, "a cluster of two keeps two copies");
        info.connect_urls.extend(["127.0.0.1:4224".into(), "127.0.0.1:4225".into()]);
        assert_eq!(default_replicas(&info), 3, "never more than three");
    }
}
