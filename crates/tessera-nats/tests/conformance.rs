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
