//! Behaviour every implementation of a port must show. Each backend's test suite calls
//! these functions with a fresh instance; the in-process ones run them in this crate, the
//! distributed ones in theirs.

#![allow(clippy::missing_panics_doc)]

use std::time::Duration;

use bytes::Bytes;
use tessera_core::Digest;

use crate::{BlobStore, Bus, BusError, Membership, WorldError, WorldState};

/// Queues are FIFO, `get` waits and times out, names are checked, and an unacknowledged
/// delivery comes back with a higher attempt count.
pub async fn bus_behaviour(bus: &dyn Bus) {
    assert_eq!(bus.len("conf.q").await.unwrap(), 0);
    for i in 0..3u8 {
        bus.put("conf.q", Bytes::from(vec![i])).await.unwrap();
    }
    assert_eq!(bus.len("conf.q").await.unwrap(), 3);
    let d = bus.get("conf.q", Duration::from_secs(1)).await.unwrap().unwrap();
    assert_eq!(&d.payload[..], &[0]);
    assert_eq!(d.attempt, 1);
    d.ack().await.unwrap();

    // A nack gives the message back, marked as a redelivery (not necessarily ahead of
    // later messages).
    let d = bus.get("conf.q", Duration::from_secs(1)).await.unwrap().unwrap();
    assert_eq!(&d.payload[..], &[1]);
    d.nack().await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let d = bus.get("conf.q", Duration::from_secs(5)).await.unwrap().expect("the nacked message and the next");
        seen.push((d.payload[0], d.attempt));
        d.ack().await.unwrap();
    }
    seen.sort();
    assert_eq!(seen[0].0, 1);
    assert!(seen[0].1 >= 2, "redelivery is marked: {seen:?}");
    assert_eq!(seen[1], (2, 1));

    // Empty: get waits, then says nothing.
    let t = std::time::Instant::now();
    assert!(bus.get("conf.q", Duration::from_millis(100)).await.unwrap().is_none());
    assert!(t.elapsed() >= Duration::from_millis(90));

    // A waiting get wakes when a message arrives.
    let waiter = bus.get("conf.wake", Duration::from_secs(10));
    let (got, ()) = tokio::join!(waiter, async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        bus.put("conf.wake", Bytes::from_static(b"hi")).await.unwrap();
    });
    let d = got.unwrap().expect("woken by the put");
    assert_eq!(&d.payload[..], b"hi");
    d.ack().await.unwrap();

    // Queues are separate.
    bus.put("conf.a", Bytes::from_static(b"a")).await.unwrap();
    assert!(bus.get("conf.b", Duration::from_millis(10)).await.unwrap().is_none());
    bus.get("conf.a", Duration::from_secs(1)).await.unwrap().unwrap().ack().await.unwrap();

    // A put retried with the same id stores one message.
    bus.put_once("conf.once", "id-1", Bytes::from_static(b"x")).await.unwrap();
    bus.put_once("conf.once", "id-1", Bytes::from_static(b"x")).await.unwrap();
    bus.put_once("conf.once", "id-2", Bytes::from_static(b"y")).await.unwrap();
    assert_eq!(bus.len("conf.once").await.unwrap(), 2);
    for expected in [&b"x"[..], b"y"] {
        let d = bus.get("conf.once", Duration::from_secs(1)).await.unwrap().unwrap();
        assert_eq!(&d.payload[..], expected);
        d.progress().await.unwrap();
        d.ack().await.unwrap();
    }

    // A bounded queue refuses a put when full, and takes one again once a message left.
    let two = crate::QueueBound::new(2, 1 << 20);
    for i in 0..2u8 {
        bus.put_bounded("conf.bounded", Bytes::from(vec![i]), two).await.unwrap();
    }
    assert!(matches!(
        bus.put_bounded("conf.bounded", Bytes::from_static(b"x"), two).await,
        Err(BusError::Full(q)) if q == "conf.bounded"
    ));
    assert_eq!(bus.len("conf.bounded").await.unwrap(), 2, "a refused put stores nothing");
    bus.get("conf.bounded", Duration::from_secs(1)).await.unwrap().unwrap().ack().await.unwrap();
    bus.put_bounded("conf.bounded", Bytes::from_static(b"z"), two).await.unwrap();
    assert_eq!(bus.len("conf.bounded").await.unwrap(), 2);

    // Bounded in bytes too: 100 bytes hold two 40-byte messages, not a third, and a
    // message larger than the whole bound is too large; taking one (acknowledged) frees
    // its bytes.
    let small = crate::QueueBound::new(100, 100);
    let forty = Bytes::from(vec![7u8; 40]);
    bus.put_bounded("conf.bytes", forty.clone(), small).await.unwrap();
    bus.put_bounded("conf.bytes", forty.clone(), small).await.unwrap();
    assert!(matches!(
        bus.put_bounded("conf.bytes", forty.clone(), small).await,
        Err(BusError::FullBytes { held: 80, size: 40, bound: 100, .. })
    ));
    assert!(matches!(
        bus.put_bounded("conf.bytes2", Bytes::from(vec![0u8; 101]), small).await,
        Err(BusError::TooLarge { .. })
    ));
    assert_eq!(bus.len("conf.bytes").await.unwrap(), 2);
    let d = bus.get("conf.bytes", Duration::from_secs(1)).await.unwrap().unwrap();
    assert!(
        matches!(bus.put_bounded("conf.bytes", forty.clone(), small).await, Err(BusError::FullBytes { .. })),
        "a taken, unacknowledged message still holds its bytes"
    );
    d.ack().await.unwrap();
    bus.put_bounded("conf.bytes", forty.clone(), small).await.unwrap();
    for _ in 0..2 {
        bus.get("conf.bytes", Duration::from_secs(1)).await.unwrap().unwrap().ack().await.unwrap();
    }

    // Bad names are refused.
    for bad in ["", "a b", "a..b", "a*", "a>", ".a"] {
        assert!(matches!(bus.put(bad, Bytes::new()).await, Err(BusError::Name(_))), "{bad:?}");
    }
}

/// The batched forms: a batched put stores every message in order per queue (once per
/// id), or none when one is bad; a batched get takes at most what it asks for, in order,
/// waits for the first and no longer; a subscription hands out every message in order.
pub async fn bus_batches(bus: std::sync::Arc<dyn Bus>) {
    use crate::{Put, Subscription};
    let n = 3000usize;
    let mut puts: Vec<Put> = (0..n)
        .map(|i| {
            let q = if i % 3 == 0 { "batch.b" } else { "batch.a" };
            Put::once(q, format!("m{i}"), Bytes::from((i as u32).to_be_bytes().to_vec()))
        })
        .collect();
    // Repeated ids (a retried batch) store nothing more.
    puts.extend((0..10).map(|i| Put::once("batch.a", format!("m{}", 3 * i + 1), Bytes::from_static(b"dup"))));
    bus.put_batch(puts).await.unwrap();
    assert_eq!(bus.len("batch.a").await.unwrap(), 2000);
    assert_eq!(bus.len("batch.b").await.unwrap(), 1000);

    // One bad message refuses the whole batch before anything is stored.
    let bad = vec![Put::new("batch.c", Bytes::from_static(b"ok")), Put::new("batch..c", Bytes::from_static(b"x"))];
    assert!(matches!(bus.put_batch(bad).await, Err(BusError::Name(_))));
    assert_eq!(bus.len("batch.c").await.unwrap(), 0, "a refused batch stores nothing");
    bus.put_batch(Vec::new()).await.unwrap();

    // At most `max`, in put order.
    let value = |d: &crate::Delivery| u32::from_be_bytes(d.payload[..4].try_into().expect("4 bytes")) as usize;
    let first = bus.get_batch("batch.a", 500, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.len(), 500);
    let expected: Vec<usize> = (0..n).filter(|i| i % 3 != 0).take(500).collect();
    assert_eq!(first.iter().map(value).collect::<Vec<_>>(), expected);
    for d in first {
        d.ack().await.unwrap();
    }
    assert_eq!(bus.len("batch.a").await.unwrap(), 1500);
    assert!(bus.get_batch("batch.a", 0, Duration::from_secs(1)).await.unwrap().is_empty());

    // The rest through a prefetching subscription, in order.
    let mut sub = Subscription::new(bus.clone(), "batch.a", 128).unwrap();
    let mut rest = Vec::new();
    while rest.len() < 1500 {
        let d = sub.next(Duration::from_secs(5)).await.unwrap().expect("a waiting message");
        assert!(sub.buffered() < 128);
        rest.push(value(&d));
        d.ack().await.unwrap();
    }
    assert_eq!(rest, (0..n).filter(|i| i % 3 != 0).skip(500).collect::<Vec<_>>());
    assert!(sub.next(Duration::from_millis(50)).await.unwrap().is_none());
    assert!(matches!(Subscription::new(bus.clone(), "a..b", 4), Err(BusError::Name(_))));

    // A batch asked of a queue holding fewer gives what is there, at once.
    let t = std::time::Instant::now();
    let all = bus.get_batch("batch.b", 5000, Duration::from_secs(10)).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "took what was waiting without waiting for more");
    let mut got: Vec<usize> = all.iter().map(value).collect();
    // Deliveries given back come again, marked as redeliveries.
    let (back, keep): (Vec<_>, Vec<_>) = all.into_iter().partition(|d| value(d) % 2 == 0);
    for d in keep {
        d.ack().await.unwrap();
    }
    let returned = back.len();
    for d in back {
        d.nack().await.unwrap();
    }
    let mut again = Vec::new();
    while again.len() < returned {
        for d in bus.get_batch("batch.b", 1000, Duration::from_secs(5)).await.unwrap() {
            assert!(d.attempt >= 2, "a redelivery is marked");
            again.push(value(&d));
            d.ack().await.unwrap();
        }
    }
    got.sort_unstable();
    assert_eq!(got, (0..n).filter(|i| i % 3 == 0).collect::<Vec<_>>());
    again.sort_unstable();
    assert_eq!(again, (0..n).filter(|i| i % 3 == 0 && i % 2 == 0).collect::<Vec<_>>());

    // Empty: waits, then gives nothing; a put during the wait is taken.
    let t = std::time::Instant::now();
    assert!(bus.get_batch("batch.b", 10, Duration::from_millis(100)).await.unwrap().is_empty());
    assert!(t.elapsed() >= Duration::from_millis(90));
    let waiter = bus.get_batch("batch.wake", 10, Duration::from_secs(10));
    let (got, ()) = tokio::join!(waiter, async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        bus.put_batch(vec![Put::new("batch.wake", Bytes::from_static(b"hi"))]).await.unwrap();
    });
    let got = got.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"hi");
    for d in got {
        d.ack().await.unwrap();
    }
}

/// Globals keep revisions; compare-and-set only wins against the revision it saw; results
/// are kept per node in arrival order.
pub async fn world_behaviour(world: &dyn WorldState) {
    assert!(world.get("conf/g").await.unwrap().is_none());
    let r1 = world.compare_and_set("conf/g", Bytes::from_static(b"1"), None).await.unwrap();
    // Create-only fails once it exists, and changes nothing.
    let e = world.compare_and_set("conf/g", Bytes::from_static(b"x"), None).await.unwrap_err();
    assert!(matches!(e, WorldError::Conflict { found: Some(r), .. } if r == r1));
    let r2 = world.compare_and_set("conf/g", Bytes::from_static(b"2"), Some(r1)).await.unwrap();
    assert!(r2 > r1);
    // A stale revision loses.
    assert!(matches!(
        world.compare_and_set("conf/g", Bytes::from_static(b"3"), Some(r1)).await,
        Err(WorldError::Conflict { .. })
    ));
    let e = world.get("conf/g").await.unwrap().unwrap();
    assert_eq!(&e.value[..], b"2");
    assert_eq!(e.revision, r2);
    let r3 = world.put("conf/g", Bytes::from_static(b"4")).await.unwrap();
    assert!(r3 > r2);
    world.put("conf/h", Bytes::from_static(b"5")).await.unwrap();
    world.put("other/x", Bytes::from_static(b"6")).await.unwrap();
    assert_eq!(world.keys("conf/").await.unwrap(), vec!["conf/g".to_string(), "conf/h".to_string()]);
    world.delete("conf/h").await.unwrap();
    world.delete("conf/never").await.unwrap();
    assert!(world.get("conf/h").await.unwrap().is_none());

    world.add_result("conf/metrics", "node-a", Bytes::from_static(b"a1")).await.unwrap();
    world.add_result("conf/metrics", "node-b", Bytes::from_static(b"b1")).await.unwrap();
    world.add_result("conf/metrics", "node-a", Bytes::from_static(b"a2")).await.unwrap();
    let all = world.select_results("conf/metrics", None).await.unwrap();
    let vals: Vec<&[u8]> = all.iter().map(|r| &r.value[..]).collect();
    assert_eq!(vals, vec![&b"a1"[..], b"b1", b"a2"]);
    let a = world.select_results("conf/metrics", Some("node-a")).await.unwrap();
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|r| r.node == "node-a"));
    assert!(world.select_results("conf/none", None).await.unwrap().is_empty());
    world.add_result("conf/metricsx", "node-a", Bytes::from_static(b"x")).await.unwrap();
    world.add_result("conf/other", "node-a", Bytes::from_static(b"o")).await.unwrap();
    assert_eq!(world.clear_results("conf/metrics").await.unwrap(), 4);
    assert!(world.select_results("conf/metrics", None).await.unwrap().is_empty());
    assert!(world.select_results("conf/metricsx", None).await.unwrap().is_empty());
    assert_eq!(world.select_results("conf/other", None).await.unwrap().len(), 1, "other prefixes stay");
    assert_eq!(world.clear_results("conf/metrics").await.unwrap(), 0);

    for bad in ["", "a b", "/a", "a/", "a..b", "a*"] {
        assert!(matches!(world.put(bad, Bytes::new()).await, Err(WorldError::Key(_))), "{bad:?}");
    }
    assert!(matches!(world.add_result("conf/m", "bad node", Bytes::new()).await, Err(WorldError::Key(_))));
    let big = Bytes::from(vec![0u8; crate::world::MAX_VALUE_BYTES + 1]);
    assert!(matches!(world.put("conf/big", big).await, Err(WorldError::TooLarge { .. })));
    assert!(world.get("conf/big").await.unwrap().is_none());
}

/// Blobs are named by their digest, stored once, and read back intact.
pub async fn blob_behaviour(store: &dyn BlobStore) {
    let bytes = Bytes::from(vec![42u8; 3 << 20]);
    let before = store.stored_bytes().await.unwrap();
    let d = store.put(bytes.clone()).await.unwrap();
    let with = store.stored_bytes().await.unwrap();
    assert!(with >= before + (3 << 20), "a 3 MiB blob counts: {before} then {with}");
    assert_eq!(d, Digest::of(&bytes));
    assert_eq!(store.put(bytes.clone()).await.unwrap(), d, "storing twice is a no-op");
    assert!(store.contains(&d).await.unwrap());
    assert_eq!(store.get(&d).await.unwrap().unwrap(), bytes);
    let missing = Digest::of(b"missing");
    assert!(store.get(&missing).await.unwrap().is_none());
    assert!(!store.contains(&missing).await.unwrap());
    assert!(store.delete(&d).await.unwrap());
    assert!(!store.delete(&d).await.unwrap());
    assert!(store.get(&d).await.unwrap().is_none());
    let after = store.stored_bytes().await.unwrap();
    assert!(after < with - (3 << 20) + (64 << 10), "deleting frees the space: {with} then {after}");
    let empty = store.put(Bytes::new()).await.unwrap();
    assert_eq!(store.get(&empty).await.unwrap().unwrap().len(), 0);
    // A view, where the store offers one, reads what is stored at any position and refuses
    // a range past the end however large its offset; once the blob is deleted it reads the
    // same bytes or fails (NotFound), never others; a missing blob has none.
    let bytes = Bytes::from((0..(300usize << 10)).map(|i| (i % 239) as u8).collect::<Vec<u8>>());
    let d = store.put(bytes.clone()).await.unwrap();
    if let Some(view) = store.view(&d).await.unwrap() {
        assert_eq!(view.size().unwrap(), bytes.len() as u64);
        let mut buf = vec![0u8; 1000];
        view.read_at(123_456, &mut buf).unwrap();
        assert_eq!(buf, bytes[123_456..124_456]);
        for offset in [bytes.len() as u64 - 999, bytes.len() as u64, u64::MAX - 10, u64::MAX] {
            let e = view.read_at(offset, &mut buf).unwrap_err();
            assert!(
                matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidInput),
                "{offset}: {e}"
            );
        }
        store.delete(&d).await.unwrap();
        match view.read_at(0, &mut buf) {
            Ok(()) => assert_eq!(buf, bytes[..1000]),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
        }
    } else {
        store.delete(&d).await.unwrap();
    }
    assert!(store.view(&missing).await.unwrap().is_none());
    // Every size a store may keep differently (one message, around a small-blob bound,
    // chunked) comes back whole, and goes once deleted.
    for size in [1usize, 1000, (64 << 10) - 1, 64 << 10, (64 << 10) + 1, 300 << 10] {
        let bytes = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let d = store.put(bytes.clone()).await.unwrap();
        assert_eq!(store.put(bytes.clone()).await.unwrap(), d);
        assert!(store.contains(&d).await.unwrap(), "{size} bytes");
        assert_eq!(store.get(&d).await.unwrap().unwrap(), bytes, "{size} bytes");
        assert!(store.delete(&d).await.unwrap(), "{size} bytes");
        assert!(!store.contains(&d).await.unwrap(), "{size} bytes");
        assert!(store.get(&d).await.unwrap().is_none(), "{size} bytes");
    }
    // The same bytes stored by several writers at once (two participants' identical
    // updates) are one blob: deleting it once frees all of its space.
    let bytes = Bytes::from((0..(300usize << 10)).map(|i| (i % 241) as u8).collect::<Vec<u8>>());
    let before = store.stored_bytes().await.unwrap();
    let puts = tokio::join!(
        store.put(bytes.clone()),
        store.put(bytes.clone()),
        store.put(bytes.clone()),
        store.put(bytes.clone())
    );
    let d = Digest::of(&bytes);
    for p in [puts.0, puts.1, puts.2, puts.3] {
        assert_eq!(p.unwrap(), d);
    }
    assert_eq!(store.get(&d).await.unwrap().unwrap(), bytes);
    assert!(store.delete(&d).await.unwrap());
    let after = store.stored_bytes().await.unwrap();
    assert!(after < before + (64 << 10), "concurrent puts leave nothing once deleted: {before} then {after}");

    // Files in and out, small and chunked: the same bytes as put and get.
    let dir = tempfile::tempdir().unwrap();
    for size in [10usize, 300 << 10] {
        let bytes: Vec<u8> = (0..size).map(|i| (i % 239) as u8).collect();
        let d = Digest::of(&bytes);
        let src = dir.path().join(format!("in-{size}"));
        std::fs::write(&src, &bytes).unwrap();
        store.put_file(&src, &d).await.unwrap();
        assert_eq!(store.get(&d).await.unwrap().unwrap(), bytes, "{size} bytes");
        let out = dir.path().join(format!("out-{size}"));
        assert!(store.get_file(&d, &out).await.unwrap());
        assert_eq!(std::fs::read(&out).unwrap(), bytes, "{size} bytes");
        // Read front to back, in small reads: the same bytes, and a clean end.
        let mut reader = store.reader(&d).await.unwrap().expect("the blob opens");
        let mut read = Vec::new();
        let mut buf = [0u8; 4093];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut reader, &mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            read.extend_from_slice(&buf[..n]);
        }
        assert!(read == bytes, "{size} bytes read as a stream");
        // Stored from a stream: the same blob (and again: a no-op).
        assert!(store.delete(&d).await.unwrap());
        for _ in 0..2 {
            let stream = Box::pin(std::io::Cursor::new(bytes.clone()));
            store.put_stream(&d, size as u64, stream).await.unwrap();
            assert_eq!(store.get(&d).await.unwrap().unwrap(), bytes, "{size} bytes put as a stream");
        }
        assert!(store.delete(&d).await.unwrap());
        assert!(store.reader(&d).await.unwrap().is_none(), "a missing blob does not open");
        let gone = dir.path().join(format!("gone-{size}"));
        assert!(!store.get_file(&d, &gone).await.unwrap());
        assert!(!gone.exists(), "a missing blob makes no file");
    }
}

/// Members appear when announced, carry their latest record, disappear when withdrawn or
/// when not refreshed within the time-to-live. Call with a short ttl (a few seconds).
pub async fn membership_behaviour(members: &dyn Membership) {
    let ttl = members.ttl();
    members.announce("node-a", Bytes::from_static(b"a1")).await.unwrap();
    members.announce("node-b", Bytes::from_static(b"b1")).await.unwrap();
    members.announce("node-a", Bytes::from_static(b"a2")).await.unwrap();
    let m = members.members().await.unwrap();
    assert_eq!(
        m,
        vec![("node-a".to_string(), Bytes::from_static(b"a2")), ("node-b".to_string(), Bytes::from_static(b"b1"))]
    );
    members.withdraw("node-b").await.unwrap();
    members.withdraw("node-never").await.unwrap();
    assert_eq!(members.members().await.unwrap().len(), 1);
    members.withdraw("node-a").await.unwrap();
    every_member_is_listed_while_all_announce(members).await;
    // Refreshing keeps a member; silence lets it go.
    members.announce("node-a", Bytes::from_static(b"a2")).await.unwrap();
    let half = ttl / 2;
    tokio::time::sleep(half).await;
    members.announce("node-a", Bytes::from_static(b"a3")).await.unwrap();
    tokio::time::sleep(half + ttl / 4).await;
    assert_eq!(members.members().await.unwrap().len(), 1, "refreshed within the ttl");
    tokio::time::sleep(ttl + ttl / 2).await;
    assert!(members.members().await.unwrap().is_empty(), "expired after the ttl");
    assert!(matches!(members.announce("bad id", Bytes::new()).await, Err(WorldError::Key(_))));
}

/// Members announcing themselves while the membership is listed are all listed, every
/// time: a listing must not end early when entries are rewritten under it.
async fn every_member_is_listed_while_all_announce(members: &dyn Membership) {
    let ids: Vec<String> = (0..4).map(|i| format!("busy-{i}")).collect();
    for id in &ids {
        members.announce(id, Bytes::from(vec![b'x'; 2000])).await.unwrap();
    }
    let done = std::sync::atomic::AtomicBool::new(false);
    let announce = async {
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            for id in &ids {
                members.announce(id, Bytes::from(vec![b'x'; 2000])).await.unwrap();
            }
            tokio::task::yield_now().await;
        }
    };
    let list = async {
        let mut short = Vec::new();
        for i in 0..200 {
            let listed = members.members().await.unwrap();
            if listed.len() != ids.len() {
                short.push((i, listed.into_iter().map(|(id, _)| id).collect::<Vec<_>>()));
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        short
    };
    let ((), short) = tokio::join!(announce, list);
    assert!(short.is_empty(), "listings missing members while they announced: {short:?}");
    for id in &ids {
        members.withdraw(id).await.unwrap();
    }
}
