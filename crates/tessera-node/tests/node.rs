//! A node agent serving tasks over the bus: limits, bad input, redelivery, verification.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;
use tessera_core::registry::PackageRecord;
use tessera_core::wire::{self, SCHEMA_VERSION, TaskMessage, TaskOutcome, TaskReply};
use tessera_core::{Digest, PackageRef};
use tessera_hub::{HubStore, LocalHub};
use tessera_nats::NatsOptions;
use tessera_nats::testing::NatsServer;
use tessera_node::{BuiltinRuntime, Node, NodeConfig, NodeError, NodePorts, list_nodes};
use tessera_package::{Limits, pack_dir};
use tessera_ports::{Backend, PackageSource, Runtime, SourceError};
use tessera_wasm::{WasmLimits, WasmRuntime};

const PROGRAMS: &str = "name: test.programs\nversion: 0.1.0\nkind: task\nruntime: wasm\nentry: module.wasm\n";

/// Which backend a test runs on.
enum On {
    Memory,
    Nats,
}

struct Setup {
    _dir: tempfile::TempDir,
    _nats: Option<NatsServer>,
    backend: Backend,
    hub: Arc<HubStore>,
    programs: Digest,
    dataset: std::path::PathBuf,
}

async fn setup(on: On) -> Setup {
    setup_with(on, NatsOptions::default()).await
}

async fn setup_with(on: On, options: NatsOptions) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let hub = Arc::new(HubStore::open(dir.path().join("hub")).unwrap());
    let m = dir.path().join("programs");
    tessera_modules::write_module_dir(&m, PROGRAMS, tessera_modules::TEST_PROGRAMS_WASM).unwrap();
    let packed = pack_dir(&m, &Limits::default()).unwrap();
    hub.publish(&packed.bytes, None, None).unwrap();
    let dataset = dir.path().join("data.bin");
    std::fs::write(&dataset, b"local data").unwrap();
    let (nats, backend) = match on {
        On::Memory => (None, Backend::in_process(Duration::from_secs(10))),
        On::Nats => {
            let server = NatsServer::start();
            let backend = tessera_nats::backend(&server.url(), &options).await.unwrap();
            (Some(server), backend)
        }
    };
    Setup { backend, hub, programs: packed.digest, dataset, _nats: nats, _dir: dir }
}

/// Runs a test body once on each backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_process() {
                super::$name(super::On::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nats() {
                super::$name(super::On::Nats).await
            }
        }
    )*};
}

on_both_backends!(
    breaching_limits_fails_the_task_and_the_node_runs_the_next_one,
    a_slow_task_does_not_hold_up_the_next,
    small_outputs_travel_in_the_reply,
    bad_messages_are_dropped_and_the_node_carries_on,
    a_task_delivered_twice_runs_once,
    a_task_redelivered_after_a_crash_is_applied_once,
    a_task_sent_again_is_answered_from_the_record_unless_fresh,
    registration_and_refusals,
    one_name_is_one_actor_across_nodes,
);

async fn one_name_is_one_actor_across_nodes(on: On) {
    use tessera_node::{ActorError, ActorSpec, Actors};
    let s = setup(on).await;
    let (na, nb) = (s.node("na"), s.node("nb"));
    na.register().await.unwrap();
    nb.register().await.unwrap();
    let (aa, ab) = (Actors::new(na.clone(), None), Actors::new(nb.clone(), None));
    let spec = || ActorSpec { module: s.programs, tag: Some("x".into()), replicas: 1, config: json!({}), priority: 0 };
    let (ra, rb) = tokio::join!(aa.launch(spec()), ab.launch(spec()));
    let (won, lost, winner, loser) = match (ra, rb) {
        (Ok(i), Err(e)) => (i, e, &aa, &ab),
        (Err(e), Ok(i)) => (i, e, &ab, &aa),
        (a, b) => panic!("exactly one launch must win: {a:?} / {b:?}"),
    };
    assert_eq!(won.name, "test.programs-x");
    match &lost {
        ActorError::Elsewhere { name, placement } => {
            assert_eq!(name, "test.programs-x");
            assert_eq!(placement.node, won.node);
            assert_eq!(placement.digest, s.programs);
        }
        other => panic!("the loser must be told where the actor runs: {other}"),
    }
    assert_eq!(loser.list().await.len(), 0, "the loser started nothing");
    assert_eq!(loser.locate("test.programs-x").await.unwrap().unwrap().node, won.node);
    assert!(loser.locate("test.programs-nobody").await.unwrap().is_none());
    // Killed: the name is free, and the other node may take it.
    winner.kill("test.programs-x").await.unwrap();
    assert!(loser.locate("test.programs-x").await.unwrap().is_none());
    let again = loser.launch(spec()).await.unwrap();
    assert_ne!(again.node, won.node);
    // Its node leaves the membership (a crash): the name is taken over.
    let holder = if again.node == "na" { &na } else { &nb };
    holder.deregister().await.unwrap();
    let taken = winner.launch(spec()).await.unwrap();
    assert_eq!(taken.node, won.node);
}

impl Setup {
    fn node_with(&self, id: &str, source: Arc<dyn PackageSource>, runtimes: Vec<Arc<dyn Runtime>>) -> Arc<Node> {
        self.node_configured(id, source, runtimes, |_| {})
    }
    fn node_configured(
        &self,
        id: &str,
        source: Arc<dyn PackageSource>,
        runtimes: Vec<Arc<dyn Runtime>>,
        configure: impl FnOnce(&mut NodeConfig),
    ) -> Arc<Node> {
        let mut cfg = NodeConfig::new(id, self._dir.path().join(id)).dataset("local", &self.dataset);
        configure(&mut cfg);
        let ports = NodePorts { backend: self.backend.clone(), source };
        Arc::new(Node::new(cfg, ports, runtimes).unwrap())
    }
    fn node(&self, id: &str) -> Arc<Node> {
        self.node_running(id, 2)
    }
    /// A node that runs up to `max_tasks` tasks at once.
    fn node_running(&self, id: &str, max_tasks: usize) -> Arc<Node> {
        let wasm = WasmRuntime::new(WasmLimits {
            max_memory: 128 << 20,
            max_time: Duration::from_millis(1000),
            max_output_bytes: 1 << 20,
        })
        .unwrap();
        self.node_configured(
            id,
            Arc::new(LocalHub(self.hub.clone())),
            vec![Arc::new(wasm), Arc::new(BuiltinRuntime::new())],
            |c| c.max_tasks = max_tasks,
        )
    }
    fn task(&self, id: &str, node: &str, config: serde_json::Value) -> TaskMessage {
        TaskMessage {
            schema: SCHEMA_VERSION,
            task_id: id.into(),
            session: "s1".into(),
            round: 1,
            module: self.programs,
            config,
            inputs: vec![],
            reply_to: "test.replies".into(),
            dispatch: "d1".into(),
            world: None,
            auth: None,
            inline_outputs: 0,
            fresh: false,
            trace: None,
            component: None,
        }
        .with_node(node)
    }
    async fn send(&self, node: &Node, task: &TaskMessage) {
        self.backend.bus.put(&node.task_queue(), Bytes::from(wire::encode(task))).await.unwrap();
    }
    async fn reply(&self) -> TaskReply {
        let d = self.backend.bus.get("test.replies", Duration::from_secs(60)).await.unwrap().expect("a reply");
        let r = wire::decode(&d.payload).unwrap();
        d.ack().await.unwrap();
        r
    }
}

trait WithNode {
    fn with_node(self, node: &str) -> Self;
}
impl WithNode for TaskMessage {
    fn with_node(mut self, node: &str) -> Self {
        self.task_id = format!("{}.{node}", self.task_id);
        self
    }
}

fn serve(node: &Arc<Node>) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<Result<(), NodeError>>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    (tx, tokio::spawn(node.clone().serve(rx)))
}

fn failed(r: &TaskReply) -> &str {
    match &r.outcome {
        TaskOutcome::Failed { error } => error,
        TaskOutcome::Ok { .. } => panic!("task {} succeeded", r.task_id),
    }
}

async fn breaching_limits_fails_the_task_and_the_node_runs_the_next_one(on: On) {
    let s = setup(on).await;
    let node = s.node("n1");
    let (stop, handle) = serve(&node);

    s.send(&node, &s.task("spin", "n1", json!({"mode": "spin"}))).await;
    s.send(&node, &s.task("after-spin", "n1", json!({"mode": "echo"}))).await;
    s.send(&node, &s.task("alloc", "n1", json!({"mode": "alloc", "bytes": 4u64 << 30}))).await;
    s.send(&node, &s.task("after-alloc", "n1", json!({"mode": "echo"}))).await;

    // Tasks run side by side, so replies come in any order.
    let mut replies = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let r = s.reply().await;
        replies.insert(r.task_id.clone(), r);
    }
    assert!(failed(&replies["spin.n1"]).contains("time limit"), "{replies:?}");
    assert!(failed(&replies["alloc.n1"]).contains("memory limit"), "{replies:?}");
    for ok in ["after-spin.n1", "after-alloc.n1"] {
        assert!(matches!(replies[ok].outcome, TaskOutcome::Ok { .. }), "{replies:?}");
    }
    stop.send(true).unwrap();
    handle.await.unwrap().unwrap();
}

/// A node runs up to `max_tasks` tasks at once: a task that spins to its time limit does
/// not hold up the one behind it, unless the node runs one task at a time.
async fn a_slow_task_does_not_hold_up_the_next(on: On) {
    let s = setup(on).await;
    for (id, max_tasks, first) in [("wide", 2, "quick.wide"), ("narrow", 1, "spin.narrow")] {
        let node = s.node_running(id, max_tasks);
        // Fetched and compiled before the timed part, so both tasks start together.
        s.send(&node, &s.task("warm", id, json!({"mode": "echo"}))).await;
        let (stop, handle) = serve(&node);
        assert_eq!(s.reply().await.task_id, format!("warm.{id}"));
        s.send(&node, &s.task("spin", id, json!({"mode": "spin"}))).await;
        s.send(&node, &s.task("quick", id, json!({"mode": "echo"}))).await;
        let order = [s.reply().await.task_id, s.reply().await.task_id];
        assert_eq!(order[0], first, "max_tasks {max_tasks}: {order:?}");
        stop.send(true).unwrap();
        handle.await.unwrap().unwrap();
    }
}

async fn bad_messages_are_dropped_and_the_node_carries_on(on: On) {
    let s = setup(on).await;
    let node = s.node("n1");
    let (stop, handle) = serve(&node);
    let q = node.task_queue();
    s.backend.bus.put(&q, Bytes::from_static(b"not json")).await.unwrap();
    s.backend.bus.put(&q, Bytes::from_static(b"{\"schema\": 99}")).await.unwrap();
    // Oversized: the in-process bus carries it and the node refuses it; NATS refuses it
    // at the door.
    match s.backend.bus.put(&q, Bytes::from(vec![b'x'; 2 << 20])).await {
        Ok(()) | Err(tessera_ports::BusError::TooLarge { .. }) => {}
        Err(e) => panic!("{e}"),
    }
    // A task of another schema version.
    let mut other = serde_json::to_value(s.task("future", "n1", json!({"mode": "echo"}))).unwrap();
    other["schema"] = json!(99);
    s.backend.bus.put(&q, Bytes::from(other.to_string())).await.unwrap();
    let mut bad_reply = s.task("bad-reply", "n1", json!({"mode": "echo"}));
    bad_reply.reply_to = "no spaces allowed".into();
    s.send(&node, &bad_reply).await;
    s.send(&node, &s.task("good", "n1", json!({"mode": "echo"}))).await;
    let r = s.reply().await;
    assert_eq!(r.task_id, "good.n1");
    assert!(matches!(r.outcome, TaskOutcome::Ok { .. }));
    assert_eq!(s.backend.bus.len(&q).await.unwrap(), 0, "bad messages are not redelivered forever");
    stop.send(true).unwrap();
    handle.await.unwrap().unwrap();
}

async fn a_task_delivered_twice_runs_once(on: On) {
    let s = setup(on).await;
    let node = s.node("n1");
    let (stop, handle) = serve(&node);
    let task = s.task("ctx", "n1", json!({"mode": "context", "dataset": "local"}));
    s.send(&node, &task).await;
    s.send(&node, &task).await;
    let a = s.reply().await;
    // The second delivery is answered from memory, under the same reply id: the bus keeps
    // one reply.
    while s.backend.bus.len(&node.task_queue()).await.unwrap() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.backend.bus.get("test.replies", Duration::from_millis(500)).await.unwrap().is_none());
    // Asked directly, the node gives the same answer without running the task again.
    assert_eq!(node.execute(&task).await, a);
    assert_eq!(node.stats().tasks_run.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(node.stats().answered_again.load(std::sync::atomic::Ordering::Relaxed), 2);
    // The module adds one result per run: one run.
    let seen = s.backend.world.select_results("runs/s1/results/seen", None).await.unwrap();
    assert_eq!(seen.len(), 1);
    // And it read the node's dataset, not anything else.
    let TaskOutcome::Ok { outputs, .. } = &a.outcome else { panic!("{a:?}") };
    let report = s.backend.blobs.get(&outputs[0].digest).await.unwrap().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&report).unwrap();
    assert_eq!(report["head"], "loca");
    assert_eq!(report["datasets"], json!(["local"]));
    stop.send(true).unwrap();
    handle.await.unwrap().unwrap();
}

/// A source that answers every fetch with the bytes of another package.
struct Swapping(LocalHub, Digest);

#[async_trait]
impl PackageSource for Swapping {
    async fn resolve(&self, r: &PackageRef) -> Result<PackageRecord, SourceError> {
        self.0.resolve(r).await
    }
    async fn fetch(&self, _digest: &Digest) -> Result<Bytes, SourceError> {
        self.0.fetch(&self.1).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_that_do_not_match_their_digest_never_run() {
    let s = setup(On::Memory).await;
    // A second, harmless package; the source hands it out whatever is asked for.
    let m = s._dir.path().join("other");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("module.yaml"),
        "name: other.echo\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: echo\n",
    )
    .unwrap();
    let other = pack_dir(&m, &Limits::default()).unwrap();
    s.hub.publish(&other.bytes, None, None).unwrap();
    let source = Arc::new(Swapping(LocalHub(s.hub.clone()), other.digest));
    let node = s.node_with("n2", source, vec![Arc::new(BuiltinRuntime::new())]);
    let reply = node.execute(&s.task("t", "n2", json!({"mode": "echo"}))).await;
    assert!(failed(&reply).contains("digest mismatch"), "{reply:?}");
    assert!(!s._dir.path().join("n2").join(s.programs.hex()).exists(), "nothing entered the cache");
}

/// Small outputs come back in the reply when the task asks for that, large ones through
/// the blob store; inline inputs are read like stored ones, and inline bytes that are not
/// those their digest names fail the task.
async fn small_outputs_travel_in_the_reply(on: On) {
    let s = setup(on).await;
    let m = s._dir.path().join("echo");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("module.yaml"),
        "name: test.echo\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: echo\n",
    )
    .unwrap();
    let echo = pack_dir(&m, &Limits::default()).unwrap();
    s.hub.publish(&echo.bytes, None, None).unwrap();
    let node = s.node("n1");
    let large = bytes::Bytes::from(vec![7u8; 100 << 10]);
    let stored = s.backend.blobs.put(large.clone()).await.unwrap();
    let mut task = s.task("inline", "n1", json!({}));
    task.module = echo.digest;
    task.inline_outputs = 1 << 10;
    task.inputs =
        vec![wire::BlobRef::inline("small", b"tiny"), wire::BlobRef::stored("large", stored, large.len() as u64)];
    let reply = node.execute(&task).await;
    let TaskOutcome::Ok { outputs, .. } = &reply.outcome else { panic!("{reply:?}") };
    assert_eq!(outputs[0].inline.as_deref(), Some(&b"tiny"[..]), "a small output in the reply");
    assert!(!s.backend.blobs.contains(&outputs[0].digest).await.unwrap(), "and not in the blob store");
    assert_eq!(outputs[1].inline, None, "a large one through the store");
    assert_eq!(s.backend.blobs.get(&outputs[1].digest).await.unwrap().unwrap(), large);
    // Inline bytes that are not those the digest names.
    let mut forged = task.clone().with_node("forged");
    forged.inputs[0].inline = Some(b"other".to_vec());
    forged.inputs[0].size = 5;
    let reply = node.execute(&forged).await;
    assert!(failed(&reply).contains("corrupt"), "{reply:?}");
    // Without the ask, every output goes to the store.
    let mut plain = task.clone().with_node("plain");
    plain.inline_outputs = 0;
    let reply = node.execute(&plain).await;
    let TaskOutcome::Ok { outputs, .. } = &reply.outcome else { panic!("{reply:?}") };
    assert!(outputs.iter().all(|o| o.inline.is_none()));
    assert_eq!(&s.backend.blobs.get(&outputs[0].digest).await.unwrap().unwrap()[..], b"tiny");
}

async fn registration_and_refusals(on: On) {
    let s = setup(on).await;
    let node = s.node("n1");
    node.register().await.unwrap();
    let nodes = list_nodes(s.backend.members.as_ref()).await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].datasets, vec!["local"]);
    assert!(nodes[0].resources.cpu >= 1.0);
    node.deregister().await.unwrap();
    assert!(list_nodes(s.backend.members.as_ref()).await.unwrap().is_empty());

    // A node without the wasm runtime says so.
    let builtin_only = s.node_with("n3", Arc::new(LocalHub(s.hub.clone())), vec![Arc::new(BuiltinRuntime::new())]);
    let r = builtin_only.execute(&s.task("t", "n3", json!({"mode": "echo"}))).await;
    assert!(failed(&r).contains("no wasm runtime"), "{r:?}");
    // An unknown package.
    let mut t = s.task("t2", "n1", json!({}));
    t.module = Digest::of(b"nothing");
    assert!(failed(&node.execute(&t).await).contains("not found"));
    // A missing input blob.
    let mut t = s.task("t3", "n1", json!({"mode": "echo"}));
    t.inputs.push(wire::BlobRef::stored("model", Digest::of(b"gone"), 4));
    assert!(failed(&node.execute(&t).await).contains("not in the blob store"));

    // Config errors.
    let ports = NodePorts { backend: s.backend.clone(), source: Arc::new(LocalHub(s.hub.clone())) };
    let e = Node::new(NodeConfig::new("bad id!", s._dir.path().join("x")), ports.clone(), vec![]).err().unwrap();
    assert!(e.to_string().contains("node id"));
    let cfg = NodeConfig::new("n4", s._dir.path().join("x")).dataset("digits", "/no/such/file");
    let e = Node::new(cfg, ports, vec![]).err().unwrap();
    assert!(e.to_string().contains("/no/such/file"));
}

async fn a_task_redelivered_after_a_crash_is_applied_once(on: On) {
    // A node takes a task, runs it, and dies before acknowledging it (here: the delivery
    // is dropped). The bus delivers it again to the node's next process, which answers
    // from the node's record of answered tasks without running it again.
    let options = NatsOptions { ack_wait: Duration::from_secs(1), ..NatsOptions::default() };
    let s = setup_with(on, options).await;
    let first = s.node("n1");
    let mut task = s.task("slow", "n1", json!({"mode": "work", "ms": 50}));
    // Fresh from its sender: a redelivery is looked up all the same.
    task.fresh = true;
    s.send(&first, &task).await;
    let d = s.backend.bus.get(&first.task_queue(), Duration::from_secs(5)).await.unwrap().unwrap();
    let answered = first.execute(&wire::decode(&d.payload).unwrap()).await;
    assert!(matches!(answered.outcome, TaskOutcome::Ok { .. }), "{answered:?}");
    drop(d); // the crash: no ack
    drop(first);

    let second = s.node("n1");
    let (stop, handle) = serve(&second);
    let r = s.reply().await;
    assert_eq!(r, answered, "the same answer");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(second.stats().tasks_run.load(Relaxed), 0, "not run again");
    assert_eq!(second.stats().answered_again.load(Relaxed), 1, "the bus did deliver it again");
    let runs = s.backend.world.select_results("runs/s1/results/work", None).await.unwrap();
    assert_eq!(runs.len(), 1, "applied once");
    stop.send(true).unwrap();
    handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_cache_directory_unpack_a_package_once() {
    let s = setup(On::Memory).await;
    let a = tessera_node::PackageCache::open(s._dir.path().join("shared"), Limits::default()).unwrap();
    let b = tessera_node::PackageCache::open(s._dir.path().join("shared"), Limits::default()).unwrap();
    let source = LocalHub(s.hub.clone());
    let (x, y) = tokio::join!(a.get(&s.programs, &source, None), b.get(&s.programs, &source, None));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.root, y.root);
    assert_eq!(std::fs::read(x.entry_path()).unwrap(), tessera_modules::TEST_PROGRAMS_WASM);
}

/// A source whose records claim every package is another module than it is.
struct Renaming(LocalHub);

#[async_trait]
impl PackageSource for Renaming {
    async fn resolve(&self, r: &PackageRef) -> Result<PackageRecord, SourceError> {
        let mut record = self.0.resolve(r).await?;
        record.name = "trusted.module".into();
        Ok(record)
    }
    async fn fetch(&self, digest: &Digest) -> Result<Bytes, SourceError> {
        self.0.fetch(digest).await
    }
}

/// With no policy at all, a package runs only when its own manifest is the module the
/// hub's record says it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_passed_off_as_another_module_never_runs() {
    let s = setup(On::Memory).await;
    let node = s.node_with("n4", Arc::new(Renaming(LocalHub(s.hub.clone()))), vec![Arc::new(BuiltinRuntime::new())]);
    let reply = node.execute(&s.task("t", "n4", json!({"mode": "echo"}))).await;
    let why = failed(&reply);
    assert!(why.contains("published as trusted.module") && why.contains("test.programs"), "{reply:?}");
}

async fn a_task_sent_again_is_answered_from_the_record_unless_fresh(on: On) {
    // A resumed coordinator sends a task again, as a new message, to a node that answered
    // it before restarting: the node answers from its record without running it. A task
    // its sender marks fresh (never sent before) is run without that look-up.
    let s = setup(on).await;
    let first = s.node("n1");
    let task = s.task("again", "n1", json!({"mode": "work", "ms": 10}));
    let answered = first.execute(&task).await;
    assert!(matches!(answered.outcome, TaskOutcome::Ok { .. }), "{answered:?}");
    drop(first);

    use std::sync::atomic::Ordering::Relaxed;
    let second = s.node("n1");
    let (stop, handle) = serve(&second);
    s.send(&second, &task).await;
    assert_eq!(s.reply().await, answered, "the same answer");
    assert_eq!(second.stats().tasks_run.load(Relaxed), 0, "not run again");
    assert_eq!(second.stats().answered_again.load(Relaxed), 1);
    stop.send(true).unwrap();
    handle.await.unwrap().unwrap();

    // The sender vouches it never sent this id: the node takes its word.
    let third = s.node("n1");
    let (stop, handle) = serve(&third);
    let mut fresh = task.clone();
    fresh.fresh = true;
    fresh.dispatch = "d-other".into();
    s.send(&third, &fresh).await;
    let r = s.reply().await;
    assert!(matches!(r.outcome, TaskOutcome::Ok { .. }), "{r:?}");
    assert_eq!(third.stats().tasks_run.load(Relaxed), 1, "run without looking for an earlier answer");
    assert_eq!(third.stats().answered_again.load(Relaxed), 0);
    stop.send(true).unwrap();
    handle.await.unwrap().unwrap();
}

/// A runtime that answers with the needs of the module it was handed.
struct NeedsSeen;

#[async_trait]
impl Runtime for NeedsSeen {
    fn kind(&self) -> tessera_core::RuntimeKind {
        tessera_core::RuntimeKind::Python
    }
    async fn run(
        &self,
        module: &tessera_ports::ModuleImage,
        _invocation: tessera_ports::Invocation,
        _ctx: Arc<dyn tessera_ports::TaskContext>,
    ) -> Result<tessera_ports::Outputs, tessera_ports::RuntimeError> {
        Ok(vec![("needs".into(), Bytes::from(serde_json::to_vec(&module.manifest.needs).unwrap()))])
    }
}

/// A task of a module named by a Component Repository entry runs under the entry's needs,
/// which the node resolves through its own hub, joined with the package's: the larger
/// amounts, the libraries of both. The task names the entry, nothing more: an entry that
/// no longer holds the task's package, or a name that is no entry, is refused.
#[tokio::test]
async fn a_task_named_by_an_entry_runs_under_the_entry_s_needs() {
    use tessera_core::manifest::Needs;
    use tessera_hub::Collection;
    let s = setup(On::Memory).await;
    let m = s._dir.path().join("needy");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("module.yaml"),
        "name: test.needy\nversion: 0.1.0\nkind: task\nruntime: python\nentry: main.py\n\
         needs: {cpu: 1, memory: 64MiB, libraries: [scipy]}\n",
    )
    .unwrap();
    std::fs::write(m.join("main.py"), "").unwrap();
    let packed = pack_dir(&m, &Limits::default()).unwrap();
    let doc = json!({"id": "test.needy", "description": "needs more", "needs": {"storage": 0, "RAM": 1, "GPU": false,
        "preinstalled_libraries": {"numpy": "2.0.0"}, "available_models": {}}});
    s.hub.create_component(Collection::Transformation, "test.needy", doc.as_object().unwrap(), None).unwrap();
    s.hub.put_component_bytes(Collection::Transformation, "test.needy", &packed.bytes, None).unwrap();
    let node = s.node_with("n1", Arc::new(LocalHub(s.hub.clone())), vec![Arc::new(NeedsSeen)]);
    let seen = |reply: &TaskReply| -> Needs {
        let TaskOutcome::Ok { outputs, .. } = &reply.outcome else { panic!("{reply:?}") };
        serde_json::from_slice(outputs[0].inline.as_deref().unwrap()).unwrap()
    };
    let mut task = s.task("plain", "n1", json!({}));
    task.module = packed.digest;
    task.inline_outputs = 1 << 10;
    let own = seen(&node.execute(&task).await);
    assert_eq!((own.memory.0, own.libraries.clone()), (64 << 20, vec!["scipy".to_string()]));

    let mut named = task.clone().with_node("named");
    named.component = Some("transformation/test.needy".into());
    let joined = seen(&node.execute(&named).await);
    assert_eq!(joined.memory.0, 1_000_000_000, "the entry's RAM, 1 GB");
    assert_eq!(joined.libraries, ["scipy", "numpy==2.0.0"]);
    assert_eq!(joined.cpu, 1.0);
    assert!(!joined.network);

    for (name, entry, why) in [
        ("release", "test.needy@0.1.0", "not a Component Repository entry"),
        ("dots", "transformation/../x", "the id"),
        ("missing", "service/test.needy", "test.needy"),
    ] {
        let mut bad = task.clone().with_node(name);
        bad.component = Some(entry.into());
        let reply = node.execute(&bad).await;
        assert!(failed(&reply).contains(why), "{entry}: {reply:?}");
    }
    // The entry now holds other bytes: the task's package is not what it names.
    std::fs::write(m.join("main.py"), "# changed").unwrap();
    let newer = pack_dir(&m, &Limits::default()).unwrap();
    s.hub.put_component_bytes(Collection::Transformation, "test.needy", &newer.bytes, None).unwrap();
    let reply = node.execute(&named.clone().with_node("moved")).await;
    assert!(failed(&reply).contains("now holds"), "{reply:?}");
}
