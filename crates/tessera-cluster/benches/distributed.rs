//! Queue and dispatch throughput on both backends, with raw JetStream as the yardstick,
//! in one run on a private nats-server.
//!
//! `cargo bench -p tessera-cluster --bench distributed`
//!
//! - queue put: messages appended per second, one by one (each put waits for its
//!   acknowledgement) and batched (`put_batch`, acknowledgements awaited together); raw
//!   async-nats on the same server the same two ways (`publish(..).await?.await?`, and
//!   1,024 publishes in flight);
//! - queue get: messages taken and acknowledged per second, one by one and batched
//!   (`get_batch` of 500); raw async-nats pull fetches of 500, each message acknowledged;
//! - no-op tasks: tasks (the builtin `echo`) dispatched to two nodes (each running up to 64
//!   at once) and answered, per second, end to end (task out, run, answer recorded, output
//!   stored, reply back, acks), 256 in flight, sent and collected in batches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_core::wire::{self, SCHEMA_VERSION, TaskMessage, TaskReply};
use tessera_hub::{HubStore, LocalHub};
use tessera_nats::testing::NatsServer;
use tessera_node::{BuiltinRuntime, Node, NodeConfig, NodePorts, task_queue};
use tessera_package::{Limits, pack_dir};
use tessera_ports::{Backend, Runtime};

const MESSAGES: usize = 5_000;
/// Messages for the batched forms (which are fast enough to need more to time).
const BATCHED: usize = 100_000;
/// Publishes in flight / messages per fetch, for the batched forms and raw JetStream.
const IN_FLIGHT: usize = 1024;
const FETCH: usize = 500;
const TASKS: usize = 10_000;
/// Tasks a bench node runs at once.
const NODE_TASKS: usize = 64;
const PAYLOAD: usize = 256;

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn put_rate(backend: &Backend, queue: &str) -> f64 {
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    let t = Instant::now();
    for _ in 0..MESSAGES {
        backend.bus.put(queue, payload.clone()).await.unwrap();
    }
    rate(MESSAGES, t.elapsed())
}

async fn get_rate(backend: &Backend, queue: &str) -> f64 {
    let t = Instant::now();
    for _ in 0..MESSAGES {
        let d = backend.bus.get(queue, Duration::from_secs(5)).await.unwrap().expect("a message");
        d.ack().await.unwrap();
    }
    rate(MESSAGES, t.elapsed())
}

async fn put_batch_rate(backend: &Backend, queue: &str) -> f64 {
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    let t = Instant::now();
    for _ in 0..BATCHED / IN_FLIGHT {
        let puts = (0..IN_FLIGHT).map(|_| tessera_ports::Put::new(queue, payload.clone())).collect();
        backend.bus.put_batch(puts).await.unwrap();
    }
    rate(BATCHED / IN_FLIGHT * IN_FLIGHT, t.elapsed())
}

async fn get_batch_rate(backend: &Backend, queue: &str) -> f64 {
    let want = BATCHED / IN_FLIGHT * IN_FLIGHT;
    let t = Instant::now();
    let mut got = 0;
    while got < want {
        let batch = backend.bus.get_batch(queue, FETCH, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "messages left after {got}");
        got += batch.len();
        for d in batch {
            d.ack().await.unwrap();
        }
    }
    rate(got, t.elapsed())
}

/// Raw JetStream: pipelined publishes (`IN_FLIGHT` acknowledgements awaited together),
/// then pull fetches of `FETCH`, each message acknowledged.
async fn raw_batched_rates(url: &str) -> (f64, f64) {
    use futures::StreamExt;
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "RAWB".into(),
            subjects: vec!["rawb.>".into()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    let want = BATCHED / IN_FLIGHT * IN_FLIGHT;
    let t = Instant::now();
    for _ in 0..BATCHED / IN_FLIGHT {
        let mut acks = Vec::with_capacity(IN_FLIGHT);
        for _ in 0..IN_FLIGHT {
            acks.push(js.publish("rawb.q", payload.clone()).await.unwrap().into_future());
        }
        futures::future::try_join_all(acks).await.unwrap();
    }
    let publish = rate(want, t.elapsed());
    let consumer = stream
        .get_or_create_consumer(
            "rawb",
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some("rawb".into()),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let t = Instant::now();
    let mut got = 0;
    while got < want {
        let mut batch = consumer.fetch().max_messages(FETCH).messages().await.unwrap();
        while let Some(m) = batch.next().await {
            m.unwrap().ack().await.unwrap();
            got += 1;
        }
    }
    (publish, rate(got, t.elapsed()))
}

async fn raw_publish_rate(url: &str) -> f64 {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "RAW".into(),
        subjects: vec!["raw.>".into()],
        retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    let t = Instant::now();
    for _ in 0..MESSAGES {
        js.publish("raw.q", payload.clone()).await.unwrap().await.unwrap();
    }
    rate(MESSAGES, t.elapsed())
}

/// Two nodes serving the builtin echo; `TASKS` tasks sent round-robin, all replies awaited.
async fn dispatch_rate(backend: Backend, dir: &std::path::Path) -> f64 {
    let hub = Arc::new(HubStore::open(dir.join("hub")).unwrap());
    let m = dir.join("echo");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("module.yaml"),
        "name: bench.echo\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: echo\n",
    )
    .unwrap();
    let packed = pack_dir(&m, &Limits::default()).unwrap();
    hub.publish(&packed.bytes, None, None).unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut serving = Vec::new();
    for id in ["bench-a", "bench-b"] {
        let ports = NodePorts { backend: backend.clone(), source: Arc::new(LocalHub(hub.clone())) };
        let runtimes: Vec<Arc<dyn Runtime>> = vec![Arc::new(BuiltinRuntime::new())];
        let mut config = NodeConfig::new(id, dir.join(id));
        // No-op tasks wait on the server, not on a core.
        config.max_tasks = NODE_TASKS;
        let node = Arc::new(Node::new(config, ports, runtimes).unwrap());
        serving.push(tokio::spawn(node.serve(rx.clone())));
    }
    let reply_to = "bench.replies";
    let dispatch = format!("{}", std::process::id());
    let t = Instant::now();
    let mut sent = 0;
    let mut got = BTreeMap::new();
    // Keep a window of tasks in flight, as a coordinator does for a round: tasks out in one
    // batched put, replies taken in batches.
    const WINDOW: usize = 256;
    while got.len() < TASKS {
        let mut puts = Vec::new();
        while sent + puts.len() < TASKS && sent + puts.len() - got.len() < WINDOW {
            let sent = sent + puts.len();
            let node = if sent % 2 == 0 { "bench-a" } else { "bench-b" };
            let task = TaskMessage {
                schema: SCHEMA_VERSION,
                task_id: format!("bench.t{sent}"),
                session: "bench".into(),
                round: 1,
                module: packed.digest,
                config: serde_json::json!({"n": sent}),
                inputs: vec![],
                reply_to: reply_to.into(),
                dispatch: dispatch.clone(),
                world: None,
                auth: None,
                inline_outputs: 1 << 10,
                fresh: true,
                trace: None,
                component: None,
            };
            puts.push(tessera_ports::Put::new(task_queue(node), Bytes::from(wire::encode(&task))));
        }
        sent += puts.len();
        backend.bus.put_batch(puts).await.unwrap();
        let batch = backend.bus.get_batch(reply_to, WINDOW, Duration::from_secs(30)).await.unwrap();
        assert!(!batch.is_empty(), "a reply within 30 s");
        for d in batch {
            let r: TaskReply = wire::decode(&d.payload).unwrap();
            got.insert(r.task_id, ());
            d.ack().await.unwrap();
        }
    }
    let r = rate(TASKS, t.elapsed());
    let _ = tx.send(true);
    for h in serving {
        let _ = h.await;
    }
    r
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let server = NatsServer::start();
        let nats = tessera_nats::backend(&server.url(), &tessera_nats::NatsOptions::default()).await.unwrap();
        let memory = Backend::in_process(Duration::from_secs(30));

        let raw = raw_publish_rate(&server.url()).await;
        let nats_put = put_rate(&nats, "bench.q").await;
        let nats_get = get_rate(&nats, "bench.q").await;
        let mem_put = put_rate(&memory, "bench.q").await;
        let mem_get = get_rate(&memory, "bench.q").await;
        let (raw_pipelined, raw_fetch) = raw_batched_rates(&server.url()).await;
        let nats_put_batch = put_batch_rate(&nats, "bench.b").await;
        let nats_get_batch = get_batch_rate(&nats, "bench.b").await;
        let mem_put_batch = put_batch_rate(&memory, "bench.b").await;
        let mem_get_batch = get_batch_rate(&memory, "bench.b").await;

        let dir = tempfile::tempdir().unwrap();
        let mem_tasks = dispatch_rate(memory, &dir.path().join("memory")).await;
        let nats_tasks = dispatch_rate(nats, &dir.path().join("nats")).await;

        println!("{MESSAGES} messages of {PAYLOAD} bytes; {TASKS} no-op tasks on 2 nodes");
        println!("| measure | in-process | NATS JetStream |");
        println!("|---|---|---|");
        println!("| raw async-nats publish, acked (msg/s) | | {raw:.0} |");
        println!("| queue put (msg/s) | {mem_put:.0} | {nats_put:.0} ({:.0}% of raw) |", 100.0 * nats_put / raw);
        println!("| queue get + ack (msg/s) | {mem_get:.0} | {nats_get:.0} |");
        println!("| raw async-nats publish, {IN_FLIGHT} acks in flight (msg/s) | | {raw_pipelined:.0} |");
        println!(
            "| queue put_batch of {IN_FLIGHT} (msg/s) | {mem_put_batch:.0} | {nats_put_batch:.0} ({:.0}% of raw) |",
            100.0 * nats_put_batch / raw_pipelined
        );
        println!("| raw async-nats fetch of {FETCH} + acks (msg/s) | | {raw_fetch:.0} |");
        println!(
            "| queue get_batch of {FETCH} + acks (msg/s) | {mem_get_batch:.0} | {nats_get_batch:.0} ({:.0}% of raw) |",
            100.0 * nats_get_batch / raw_fetch
        );
        println!("| no-op tasks dispatched and answered (tasks/s) | {mem_tasks:.0} | {nats_tasks:.0} |");
    });
}
