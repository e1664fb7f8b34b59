//! The NATS implementations pass the same behaviour suite as the in-process ones, on a
//! real nats-server.

use std::time::Duration;

use tessera_nats::testing::NatsServer;
use tessera_nats::{NatsBlobs, NatsBus, NatsMembership, NatsOptions, NatsWorld, connect};
use tessera_ports::conformance;

#[tokio::test]
async fn nats_bus() {
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    let bus = NatsBus::open(&nats, &NatsOptions::default()).await.unwrap();
    conformance::bus_behaviour(&bus).await;
}

#[tokio::test]
async fn nats_bus_batches() {
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    let bus = NatsBus::open(&nats, &NatsOptions::default()).await.unwrap();
    conformance::bus_batches(std::sync::Arc::new(bus)).await;
}

#[tokio::test]
async fn nats_world() {
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    conformance::world_behaviour(&NatsWorld::open(&nats).await.unwrap()).await;
}

#[tokio::test]
async fn nats_blobs() {
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    conformance::blob_behaviour(&NatsBlobs::open(&nats).await.unwrap()).await;
}

#[tokio::test]
async fn nats_membership() {
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    conformance::membership_behaviour(&NatsMembership::open(&nats, Duration::from_secs(2)).await.unwrap()).await;
}

#[tokio::test]
async fn unacknowledged_messages_come_back_after_the_ack_wait_and_progress_holds_them() {
    use bytes::Bytes;
    use tessera_ports::{Bus, BusError};
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    let options = NatsOptions { ack_wait: Duration::from_secs(1), ..NatsOptions::default() };
    let bus = NatsBus::open(&nats, &options).await.unwrap();
    bus.put("q", Bytes::from_static(b"task")).await.unwrap();

    // Taken and kept busy with progress acks past the ack wait: not redelivered.
    let d = bus.get("q", Duration::from_secs(1)).await.unwrap().unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        d.progress().await.unwrap();
    }
    assert!(bus.get("q", Duration::from_millis(300)).await.unwrap().is_none(), "held by progress acks");
    // Then dropped without an ack (a crashed handler): delivered again.
    drop(d);
    let again = bus.get("q", Duration::from_secs(5)).await.unwrap().expect("redelivered after the ack wait");
    assert_eq!(again.attempt, 2);
    again.ack().await.unwrap();
    assert!(bus.get("q", Duration::from_millis(1500)).await.unwrap().is_none(), "acked: gone");

    // Over the server's message limit (1 MB): refused with the reason.
    let big = Bytes::from(vec![0u8; 2 << 20]);
    assert!(matches!(bus.put("q", big).await, Err(BusError::TooLarge { .. })));
}

#[tokio::test]
async fn a_queue_nobody_reads_loses_its_consumer_but_not_its_messages() {
    use bytes::Bytes;
    use tessera_ports::Bus;
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    let options = NatsOptions { consumer_inactive: Duration::from_secs(1), ..NatsOptions::default() };
    let bus = NatsBus::open(&nats, &options).await.unwrap();
    let consumers = || async {
        let mut stream = nats.js.get_stream("TESSERA_QUEUES").await.unwrap();
        stream.info().await.unwrap().state.consumer_count
    };
    for k in 0..5 {
        assert!(bus.get(&format!("replies-{k}"), Duration::from_millis(10)).await.unwrap().is_none());
    }
    assert_eq!(consumers().await, 5);
    bus.put("replies-0", Bytes::from_static(b"late")).await.unwrap();
    // Unread for longer than the threshold: the server removes the consumers.
    let mut waited = 0;
    while consumers().await > 0 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        waited += 1;
        assert!(waited < 40, "consumers still there: {}", consumers().await);
    }
    // The message put meanwhile is still delivered: a handle of the removed consumer is
    // dropped after one empty wait, and the consumer made again.
    let mut tries = 0;
    let d = loop {
        if let Some(d) = bus.get("replies-0", Duration::from_millis(500)).await.unwrap() {
            break d;
        }
        tries += 1;
        assert!(tries < 3, "the message kept in the stream never came");
    };
    assert_eq!(&d.payload[..], b"late");
    d.ack().await.unwrap();
}

/// JetStream counts deliveries per consumer: a message delivered (and never acknowledged)
/// by a consumer the server then removed for inactivity would count as a first delivery
/// again. Such a message reaches the next process as a redelivery; one put later, as a
/// first delivery.
#[tokio::test]
async fn a_message_an_earlier_consumer_delivered_counts_as_a_redelivery() {
    use bytes::Bytes;
    use tessera_ports::Bus;
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    // (newer servers, 2.15 here, keep a consumer with a delivery pending until its ack
    // wait has passed, and only then count its inactivity.)
    let options = NatsOptions {
        consumer_inactive: Duration::from_secs(1),
        ack_wait: Duration::from_secs(1),
        ..NatsOptions::default()
    };
    let first = NatsBus::open(&nats, &options).await.unwrap();
    first.put("tasks.n1", Bytes::from_static(b"x")).await.unwrap();
    // (Its own consumer had delivered nothing either: this counts as attempt 2 already.)
    let d = first.get("tasks.n1", Duration::from_secs(5)).await.unwrap().unwrap();
    drop(d); // the process dies before acknowledging it
    drop(first);
    let consumers = || async {
        let mut stream = nats.js.get_stream("TESSERA_QUEUES").await.unwrap();
        stream.info().await.unwrap().state.consumer_count
    };
    let mut waited = 0;
    while consumers().await > 0 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        waited += 1;
        assert!(waited < 80, "the consumer was never removed");
    }
    let next = NatsBus::open(&nats, &options).await.unwrap();
    let d = next.get("tasks.n1", Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(&d.payload[..], b"x");
    assert!(d.attempt >= 2, "delivered before, by a consumer now gone: attempt {}", d.attempt);
    d.ack().await.unwrap();
    next.put("tasks.n1", Bytes::from_static(b"y")).await.unwrap();
    let d = next.get("tasks.n1", Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!((&d.payload[..], d.attempt), (&b"y"[..], 1), "put after: a first delivery");
    d.ack().await.unwrap();
}

/// Every listing of a KV bucket goes through `list_entries`, which reads the stream's
/// subjects in one request: a KV watcher's listing (`.keys()`, `.watch*()`) ends early
/// when keys are written meanwhile and can block for ever when they expire
/// (nats-io/nats-server#3481).
#[test]
fn every_key_listing_reads_the_stream_state() {
    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    sources(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    let mut total = 0;
    for path in files {
        // Split over lines by rustfmt or not.
        let text: String = std::fs::read_to_string(&path).unwrap().split_whitespace().collect();
        for watcher in [".keys()", ".watch(", ".watch_all(", ".watch_with_history("] {
            assert_eq!(text.matches(watcher).count(), 0, "{}: list keys with crate::list_entries", path.display());
        }
        let listings = text.matches(".info_with_subjects(").count();
        total += listings;
        if !path.ends_with("lib.rs") {
            assert_eq!(listings, 0, "{}: list keys with crate::list_entries", path.display());
        }
    }
    assert_eq!(total, 1, "list_entries itself reads the subjects once");
}

/// A small blob's stored bytes that do not match its name are refused, not handed out.
#[tokio::test]
async fn a_tampered_small_blob_is_refused() {
    use tessera_ports::{BlobError, BlobStore};
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    let blobs = NatsBlobs::open(&nats).await.unwrap();
    let d = blobs.put(bytes::Bytes::from_static(b"the real bytes")).await.unwrap();
    let kv = nats.js.get_key_value("tessera_small_blobs").await.unwrap();
    kv.put(d.hex(), bytes::Bytes::from_static(b"other bytes")).await.unwrap();
    assert!(matches!(blobs.get(&d).await, Err(BlobError::Corrupt(c)) if c == d));
}

/// Bytes of `len` that repeat no 1 MiB chunk.
fn varied(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ (i >> 20) as u8).collect()
}

/// Objects are written in the Object Store's layout, in 1 MiB chunks: the library's own
/// reader gets them back (its SHA-256 digest checked), and objects the library wrote (128
/// KiB chunks) are read back here.
#[tokio::test]
async fn objects_keep_the_object_store_layout() {
    use tessera_ports::BlobStore;
    use tokio::io::AsyncReadExt;
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    let blobs = NatsBlobs::open(&nats).await.unwrap();
    let bytes = varied((5 << 19) + 17);
    let d = blobs.put(bytes::Bytes::from(bytes.clone())).await.unwrap();
    let store = nats.js.get_object_store("tessera_blobs").await.unwrap();
    let mut object = store.get(d.hex()).await.unwrap();
    assert_eq!(object.info.chunks, 3, "2.5 MiB and 17 bytes in chunks of 1 MiB");
    let mut back = Vec::new();
    object.read_to_end(&mut back).await.unwrap();
    assert!(back == bytes, "the library reads what was written");

    let other = varied((3 << 20) + 5).into_iter().map(|b| b.wrapping_add(1)).collect::<Vec<u8>>();
    let od = tessera_core::Digest::of(&other);
    store.put(od.hex().as_str(), &mut &other[..]).await.unwrap();
    assert!(blobs.get(&od).await.unwrap().unwrap() == other, "what the library wrote is read here");
    let dir = tempfile::tempdir().unwrap();
    assert!(blobs.get_file(&od, &dir.path().join("o")).await.unwrap());
    assert!(std::fs::read(dir.path().join("o")).unwrap() == other);
}

/// An object whose bytes are not its name's, however it came to be stored, is refused by
/// every read, and `get_file` leaves no file behind.
#[tokio::test]
async fn an_object_that_is_not_its_name_is_refused() {
    use tessera_ports::{BlobError, BlobStore};
    use tokio::io::AsyncReadExt;
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    let blobs = NatsBlobs::open(&nats).await.unwrap();
    let d = blobs.put(bytes::Bytes::from(varied(2 << 20))).await.unwrap();
    let store = nats.js.get_object_store("tessera_blobs").await.unwrap();
    let forged = varied(2 << 20).into_iter().rev().collect::<Vec<u8>>();
    store.put(d.hex().as_str(), &mut &forged[..]).await.unwrap();
    assert!(matches!(blobs.get(&d).await, Err(BlobError::Corrupt(c)) if c == d));
    let mut reader = blobs.reader(&d).await.unwrap().unwrap();
    assert!(reader.read_to_end(&mut Vec::new()).await.is_err(), "the reader's last read fails");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    assert!(matches!(blobs.get_file(&d, &path).await, Err(BlobError::Corrupt(_))));
    assert!(!path.exists());
}

/// A put whose source fails midway leaves no chunk in the Object Store.
#[tokio::test]
async fn a_put_that_fails_midway_leaves_no_chunks() {
    use tessera_ports::BlobStore;
    use tokio::io::AsyncReadExt;
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    let blobs = NatsBlobs::open(&nats).await.unwrap();
    let object_bytes = || async {
        let mut s = nats.js.get_stream("OBJ_tessera_blobs").await.unwrap();
        s.info().await.unwrap().state.bytes
    };
    let before = object_bytes().await;
    // 3 MiB of bytes, then a failing read.
    let failing = std::io::Cursor::new(varied(3 << 20)).chain(Failing);
    let d = tessera_core::Digest::of(b"whatever");
    assert!(blobs.put_stream(&d, 4 << 20, Box::pin(failing)).await.is_err());
    assert_eq!(object_bytes().await, before, "the chunks written are purged");
    assert!(!blobs.contains(&d).await.unwrap());
}

/// A reader whose every read fails.
struct Failing;
impl tokio::io::AsyncRead for Failing {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Err(std::io::Error::other("the source broke")))
    }
}

/// An object whose info names more chunks than the store holds (removed or cut short while
/// read) fails its read with an error saying so, never waits for the missing chunks.
#[tokio::test]
async fn an_object_cut_short_fails_its_read_instead_of_waiting() {
    use base64::Engine;
    use tessera_ports::{BlobError, BlobStore};
    use tokio::io::AsyncReadExt;
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    let blobs = NatsBlobs::open(&nats).await.unwrap();
    let d = blobs.put(bytes::Bytes::from(varied(3 << 20))).await.unwrap();
    // The info says two chunks more than were written.
    let store = nats.js.get_object_store("tessera_blobs").await.unwrap();
    let mut info = store.info(d.hex()).await.unwrap();
    info.chunks += 2;
    info.size += 2 << 20;
    let subject =
        format!("$O.tessera_blobs.M.{}", base64::engine::general_purpose::URL_SAFE.encode(d.hex().as_bytes()));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    nats.js
        .publish_with_headers(subject, headers, serde_json::to_vec(&info).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let bound = Duration::from_secs(20);
    let got = tokio::time::timeout(bound, blobs.get(&d)).await.expect("the read ends");
    assert!(matches!(&got, Err(BlobError::Backend(m)) if m.contains("3 of its 5 chunks")), "{got:?}");
    let mut reader = blobs.reader(&d).await.unwrap().unwrap();
    let read = tokio::time::timeout(bound, reader.read_to_end(&mut Vec::new())).await.expect("the read ends");
    assert!(read.is_err());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let got = tokio::time::timeout(bound, blobs.get_file(&d, &path)).await.expect("the read ends");
    assert!(got.is_err() && !path.exists());
}

/// A reader slower than the server keeps an idle consumer: one whose consumer the server
/// removed between two batches goes on from where it stopped, with every byte.
#[tokio::test]
async fn a_reader_whose_consumer_went_away_goes_on_where_it_stopped() {
    use futures::StreamExt;
    use tessera_ports::BlobStore;
    use tokio::io::AsyncReadExt;
    let server = NatsServer::start();
    let nats = connect(&server.url()).await.unwrap();
    let blobs = NatsBlobs::open(&nats).await.unwrap();
    let bytes = varied((12 << 20) + 3);
    let d = blobs.put(bytes::Bytes::from(bytes.clone())).await.unwrap();
    let mut reader = blobs.reader(&d).await.unwrap().unwrap();
    // The first batch (8 chunks of 1 MiB), then its consumer goes.
    let mut first = vec![0u8; 8 << 20];
    reader.read_exact(&mut first).await.unwrap();
    let stream = nats.js.get_stream("OBJ_tessera_blobs").await.unwrap();
    let names: Vec<String> = stream.consumer_names().map(|n| n.unwrap()).collect().await;
    assert_eq!(names.len(), 1);
    stream.delete_consumer(&names[0]).await.unwrap();
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).await.unwrap();
    first.extend_from_slice(&rest);
    assert!(first == bytes, "every byte, in order");
}
