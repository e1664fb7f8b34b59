//! The in-process implementations pass the shared behaviour suite.

use tessera_ports::{
    BlobError, BlobStore, FsBlobStore, MemoryBlobStore, MemoryBus, MemoryMembership, MemoryWorld, conformance,
};

#[tokio::test]
async fn memory_bus() {
    conformance::bus_behaviour(&MemoryBus::new()).await;
}

#[tokio::test]
async fn memory_bus_batches() {
    conformance::bus_batches(std::sync::Arc::new(MemoryBus::new())).await;
}

#[tokio::test]
async fn memory_bus_requeues_dropped_deliveries() {
    use std::time::Duration;
    use tessera_ports::Bus;
    let bus = MemoryBus::new();
    bus.put("q", bytes::Bytes::from_static(b"x")).await.unwrap();
    drop(bus.get("q", Duration::from_secs(1)).await.unwrap().unwrap());
    let d = bus.get("q", Duration::from_secs(1)).await.unwrap().expect("dropped delivery comes back");
    assert_eq!(d.attempt, 2);
    d.ack().await.unwrap();
    assert_eq!(bus.len("q").await.unwrap(), 0);
}

#[tokio::test]
async fn memory_world() {
    conformance::world_behaviour(&MemoryWorld::new()).await;
}

#[tokio::test]
async fn memory_blobs() {
    conformance::blob_behaviour(&MemoryBlobStore::new()).await;
}

#[tokio::test]
async fn file_blobs() {
    let dir = tempfile::tempdir().unwrap();
    conformance::blob_behaviour(&FsBlobStore::open(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn file_blobs_detect_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let d = store.put(bytes::Bytes::from_static(b"precious")).await.unwrap();
    std::fs::write(store.path_of(&d), b"tampered").unwrap();
    assert!(matches!(store.get(&d).await, Err(BlobError::Corrupt(x)) if x == d));
    // Read as a stream, the bytes pass, and the end is refused.
    let mut reader = store.reader(&d).await.unwrap().unwrap();
    let mut read = Vec::new();
    let e = tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut read).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(e.to_string().contains(&d.to_string()), "{e}");
    // Read again after the refusal: still refused, never a clean end.
    let again = tokio::io::AsyncReadExt::read(&mut reader, &mut [0u8; 8]).await.unwrap_err();
    assert_eq!(again.kind(), std::io::ErrorKind::InvalidData);
}

#[tokio::test]
async fn file_blobs_refuse_a_stream_that_is_not_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    let d = tessera_core::Digest::of(b"what was promised");
    let stream = Box::pin(std::io::Cursor::new(b"something else".to_vec()));
    assert!(matches!(store.put_stream(&d, 14, stream).await, Err(BlobError::Corrupt(x)) if x == d));
    assert!(!store.contains(&d).await.unwrap());
    // Nothing is left behind in the store's directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn memory_membership() {
    conformance::membership_behaviour(&MemoryMembership::new(std::time::Duration::from_secs(1))).await;
}
