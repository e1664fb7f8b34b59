//! Queue and dispatch throughput on both backends, with raw JetStream as the yardstick,
//! in one run on a private nats-server.
//!
//! `cargo bench -p tessera-cluster --bench distributed`
//!
//! - queue put: messages appended per second (each put waits for its acknowledgement);
//!   raw async-nats `publish(...).await?.await?` on the same server, the same way;
//! - queue get: messages taken and acknowledged per second;
//! - no-op tasks: tasks (the builtin `echo`) dispatched to two nodes and answered, per
//!   second, end to end (task out, run, reply back).

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
const TASKS: usize = 2_000;
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
        let node = Arc::new(Node::new(NodeConfig::new(id, dir.join(id)), ports, runtimes).unwrap());
        serving.push(tokio::spawn(node.serve(rx.clone())));
    }
    let reply_to = "bench.replies";
    let dispatch = format!("{}", std::process::id());
    let t = Instant::now();
    let mut sent = 0;
    let mut got = BTreeMap::new();
    // Keep a window of tasks in flight, as a coordinator does for a round.
    const WINDOW: usize = 64;
    while got.len() < TASKS {
        while sent < TASKS && sent - got.len() < WINDOW {
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
            };
            backend.bus.put(&task_queue(node), Bytes::from(wire::encode(&task))).await.unwrap();
            sent += 1;
        }
        let d = backend.bus.get(reply_to, Duration::from_secs(30)).await.unwrap().expect("a reply");
        let r: TaskReply = wire::decode(&d.payload).unwrap();
        got.insert(r.task_id, ());
        d.ack().await.unwrap();
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

        let dir = tempfile::tempdir().unwrap();
        let mem_tasks = dispatch_rate(memory, &dir.path().join("memory")).await;
        let nats_tasks = dispatch_rate(nats, &dir.path().join("nats")).await;

        println!("{MESSAGES} messages of {PAYLOAD} bytes; {TASKS} no-op tasks on 2 nodes");
        println!("| measure | in-process | NATS JetStream |");
        println!("|---|---|---|");
        println!("| raw async-nats publish, acked (msg/s) | | {raw:.0} |");
        println!("| queue put (msg/s) | {mem_put:.0} | {nats_put:.0} ({:.0}% of raw) |", 100.0 * nats_put / raw);
        println!("| queue get + ack (msg/s) | {mem_get:.0} | {nats_get:.0} |");
        println!("| no-op tasks dispatched and answered (tasks/s) | {mem_tasks:.0} | {nats_tasks:.0} |");
    });
}
