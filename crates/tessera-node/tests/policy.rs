//! A node's policy: signed packages from trusted publishers, signed tasks from accounts
//! with grants, datasets limited to the grant, quotas. Every refusal runs nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::json;
use tessera_core::Digest;
use tessera_core::wire::{SCHEMA_VERSION, TaskMessage, TaskOutcome, TaskReply};
use tessera_hub::{HubStore, LocalHub};
use tessera_identity::{KeyPair, KeyType, PackageSignature, Verifier, messages, now_ms};
use tessera_node::{Node, NodeConfig, NodePolicy, NodePorts};
use tessera_package::{Limits, pack_dir};
use tessera_ports::{Backend, Runtime};
use tessera_wasm::{WasmLimits, WasmRuntime};

struct World {
    dir: tempfile::TempDir,
    hub: Arc<HubStore>,
    backend: Backend,
    alice: KeyPair,
    bob: KeyPair,
    node_key: Arc<KeyPair>,
}

/// A package of the test programs named `name`, its manifest ending with `more` (YAML
/// lines).
fn module(dir: &std::path::Path, name: &str, more: &str) -> Vec<u8> {
    let m = dir.join(name);
    let manifest = format!("name: {name}\nversion: 0.1.0\nkind: task\nruntime: wasm\nentry: module.wasm\n{more}");
    tessera_modules::write_module_dir(&m, &manifest, tessera_modules::TEST_PROGRAMS_WASM).unwrap();
    pack_dir(&m, &Limits::default()).unwrap().bytes
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let hub = Arc::new(HubStore::open(dir.path().join("hub")).unwrap());
        std::fs::write(dir.path().join("local.bin"), b"local data").unwrap();
        std::fs::write(dir.path().join("private.bin"), b"never for bob").unwrap();
        World {
            hub,
            backend: Backend::in_process(Duration::from_secs(30)),
            alice: KeyPair::generate(KeyType::Ed25519),
            bob: KeyPair::generate(KeyType::Ed25519),
            node_key: Arc::new(KeyPair::generate(KeyType::Ed25519)),
            dir,
        }
    }

    /// Publishes a module signed by `by` (or unsigned); returns its digest.
    fn publish(&self, name: &str, by: Option<&KeyPair>) -> Digest {
        self.publish_with(name, by, "")
    }

    /// Publishes a module whose manifest ends with `more`.
    fn publish_with(&self, name: &str, by: Option<&KeyPair>, more: &str) -> Digest {
        let bytes = module(self.dir.path(), name, more);
        let d = Digest::of(&bytes);
        let sig = by.map(|k| PackageSignature::sign(k, &d));
        self.hub.publish(&bytes, None, sig.as_ref()).unwrap();
        d
    }

    fn node(&self, policy: &str) -> Node {
        let cache =
            self.dir.path().join(format!("cache-{}", &Digest::of(self.node_key.public().as_bytes()).hex()[..8]));
        let mut cfg = NodeConfig::new("guarded", cache)
            .dataset("local", self.dir.path().join("local.bin"))
            .dataset("private", self.dir.path().join("private.bin"));
        cfg.policy = NodePolicy::from_yaml(policy).unwrap();
        cfg.identity = Some(self.node_key.clone());
        let wasm = WasmRuntime::new(WasmLimits { max_time: Duration::from_secs(30), ..WasmLimits::default() }).unwrap();
        let runtimes: Vec<Arc<dyn Runtime>> = vec![Arc::new(wasm)];
        let ports = NodePorts { backend: self.backend.clone(), source: Arc::new(LocalHub(self.hub.clone())) };
        Node::new(cfg, ports, runtimes).unwrap()
    }

    fn policy(&self, extra: &str) -> String {
        format!(
            "require_signed_packages: true\ntrusted_publishers:\n  test: [{alice}]\nrequire_signed_tasks: true\ngrants:\n  - to: {bob}\n    modules: [test]\n    datasets: [local]\n{extra}",
            alice = self.alice.public(),
            bob = self.bob.public()
        )
    }
}

fn task(id: &str, module: Digest, config: serde_json::Value) -> TaskMessage {
    TaskMessage {
        schema: SCHEMA_VERSION,
        task_id: id.into(),
        session: "s1".into(),
        round: 1,
        module,
        config,
        inputs: vec![],
        reply_to: "replies".into(),
        dispatch: "d1".into(),
        world: None,
        auth: None,
        inline_outputs: 0,
        fresh: false,
        trace: None,
        component: None,
    }
}

fn signed(mut t: TaskMessage, by: &KeyPair, node: &Node, node_key: &KeyPair) -> TaskMessage {
    messages::sign_task(&mut t, by, node_key.public(), &node.task_queue(), now_ms());
    t
}

fn refused(r: &TaskReply) -> String {
    match &r.outcome {
        TaskOutcome::Failed { error } => error.clone(),
        TaskOutcome::Ok { .. } => panic!("{} ran", r.task_id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_consumer_computes_on_granted_data_only() {
    let w = World::new();
    let m = w.publish("test.programs", Some(&w.alice));
    let node = w.node(&w.policy(""));
    let t = signed(task("ok", m, json!({"mode": "context", "dataset": "local"})), &w.bob, &node, &w.node_key);
    let r = node.execute(&t).await;
    let TaskOutcome::Ok { outputs, .. } = &r.outcome else { panic!("{r:?}") };
    let report = tessera_ports::BlobStore::get(w.backend.blobs.as_ref(), &outputs[0].digest).await.unwrap().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&report).unwrap();
    assert_eq!(report["datasets"], json!(["local"]), "the ungranted dataset is invisible");
    // Asking for the other dataset fails inside the module: it does not exist for this task.
    let t = signed(task("peek", m, json!({"mode": "context", "dataset": "private"})), &w.bob, &node, &w.node_key);
    assert!(refused(&node.execute(&t).await).contains("private"));
    // Usage is metered per account.
    let used = node.usage_of(w.bob.public());
    assert_eq!(used.tasks, 2);
    assert!(used.compute_seconds > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_runs_nothing() {
    let w = World::new();
    let good = w.publish("test.programs", Some(&w.alice));
    let mallory = KeyPair::generate(KeyType::Ed25519);
    let by_stranger = w.publish("evil.stranger", Some(&mallory));
    let unsigned = w.publish("free.unsigned", None);
    let carol = KeyPair::generate(KeyType::Ed25519);
    let dave = KeyPair::generate(KeyType::Ed25519);
    let expired = format!(
        "  - to: {}\n    modules: [test]\n    datasets: [local]\n    expires: 2020-01-01T00:00:00Z\n",
        dave.public()
    );
    let node = w.node(&w.policy(&expired));
    let other_node = KeyPair::generate(KeyType::Ed25519);
    let work = json!({"mode": "work", "ms": 1});

    let mut altered = signed(task("altered", good, work.clone()), &w.bob, &node, &w.node_key);
    altered.config["ms"] = json!(2);
    let mut wrong_audience = task("aud", good, work.clone());
    messages::sign_task(&mut wrong_audience, &w.bob, other_node.public(), &node.task_queue(), now_ms());
    let mut stale = task("stale", good, work.clone());
    messages::sign_task(&mut stale, &w.bob, w.node_key.public(), &node.task_queue(), now_ms() - 2 * 3_600_000);
    let mut wrong_type = signed(task("type", good, work.clone()), &w.bob, &node, &w.node_key);
    wrong_type.auth = wrong_type.auth.map(|a| a.replacen("key=ed25519:", "key=secp256k1:", 1));

    let cases = vec![
        ("unsigned task", task("u", good, work.clone()), "unsigned task"),
        ("unknown key", signed(task("c", good, work.clone()), &carol, &node, &w.node_key), "no grant"),
        ("expired grant", signed(task("d", good, work.clone()), &dave, &node, &w.node_key), "expired"),
        (
            "untrusted publisher",
            signed(task("m", by_stranger, work.clone()), &w.bob, &node, &w.node_key),
            "unknown signer",
        ),
        ("unsigned package", signed(task("p", unsigned, work.clone()), &w.bob, &node, &w.node_key), "unsigned"),
        ("altered after signing", altered, "body does not match"),
        ("wrong audience", wrong_audience, "addressed to"),
        ("stale", stale, "ago"),
        ("wrong key type", wrong_type, "secp256k1"),
    ];
    for (what, t, word) in cases {
        let msg = refused(&node.execute(&t).await);
        assert!(msg.contains(word), "{what}: {msg}");
    }
    assert_eq!(node.stats().tasks_run.load(Relaxed), 0, "nothing ran");
    let results = w.backend.world.select_results("runs/s1/results/work", None).await.unwrap();
    assert!(results.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_work_past_the_limit() {
    let w = World::new();
    let m = w.publish("test.programs", Some(&w.alice));
    let node = w.node(&w.policy(&format!("quotas:\n  \"{}\": {{tasks: 2}}\n", w.bob.public())));
    for i in 0..2 {
        let t = signed(task(&format!("t{i}"), m, json!({"mode": "work", "ms": 1})), &w.bob, &node, &w.node_key);
        assert!(matches!(node.execute(&t).await.outcome, TaskOutcome::Ok { .. }));
    }
    let t = signed(task("t2", m, json!({"mode": "work", "ms": 1})), &w.bob, &node, &w.node_key);
    let msg = refused(&node.execute(&t).await);
    assert!(msg.contains("over its quota"), "{msg}");
    assert_eq!(node.usage_of(w.bob.public()).tasks, 2);
    // Usage is readable from world state too.
    let keys = w.backend.world.keys("usage/guarded/").await.unwrap();
    assert_eq!(keys.len(), 1);
    let v: serde_json::Value =
        serde_json::from_slice(&w.backend.world.get(&keys[0]).await.unwrap().unwrap().value).unwrap();
    assert_eq!(v["usage"]["tasks"], 2);
    assert_eq!(v["account"], w.bob.public().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_signed_for_the_task_signer() {
    let w = World::new();
    let m = w.publish("test.programs", Some(&w.alice));
    let node = Arc::new(w.node(&w.policy("")));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(node.clone().serve(rx));
    let t = signed(task("sig", m, json!({"mode": "echo"})), &w.bob, &node, &w.node_key);
    w.backend.bus.put(&node.task_queue(), bytes::Bytes::from(tessera_core::wire::encode(&t))).await.unwrap();
    let d = w.backend.bus.get("replies", Duration::from_secs(30)).await.unwrap().unwrap();
    let reply: TaskReply = tessera_core::wire::decode(&d.payload).unwrap();
    let v = Verifier::new(w.bob.public().clone()).without_replay_check();
    assert_eq!(messages::verify_reply(&reply, &v, "replies", now_ms()).unwrap(), Some(w.node_key.public().clone()));
    // The node's record announces its key.
    assert_eq!(node.record().key, Some(w.node_key.public().to_string()));
    tx.send(true).unwrap();
    serving.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_package_runs_only_where_it_can_be_opened() {
    let w = World::new();
    let plain = module(w.dir.path(), "test.private", "");
    let sealed = tessera_identity::seal::seal(&plain, &[w.node_key.public().clone()]).unwrap();
    let d = Digest::of(&sealed);
    let manifest = tessera_core::Manifest::parse(
        "name: test.private\nversion: 0.1.0\nkind: task\nruntime: wasm\nentry: module.wasm\n",
    )
    .unwrap();
    w.hub
        .publish_private(
            &{
                let tmp = w.hub.blobs().temp_path();
                std::fs::write(&tmp, &sealed).unwrap();
                tmp
            },
            d,
            sealed.len() as u64,
            &manifest,
            &PackageSignature::sign(&w.alice, &d),
            None,
        )
        .unwrap();

    // The recipient node opens and runs it.
    let node = w.node(&w.policy(""));
    let t = signed(task("p1", d, json!({"mode": "echo"})), &w.bob, &node, &w.node_key);
    let r = node.execute(&t).await;
    assert!(matches!(r.outcome, TaskOutcome::Ok { .. }), "{r:?}");

    // A node that is not a recipient cannot read it, let alone run it.
    let other = World { node_key: Arc::new(KeyPair::generate(KeyType::Ed25519)), ..w };
    let stranger = other.node(&other.policy(""));
    let t = signed(task("p2", d, json!({"mode": "echo"})), &other.bob, &stranger, &other.node_key);
    let msg = refused(&stranger.execute(&t).await);
    assert!(msg.contains("not a recipient"), "{msg}");
    assert_eq!(stranger.stats().tasks_run.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_decides_who_may_call_each_function() {
    let w = World::new();
    let carol = KeyPair::generate(KeyType::Ed25519);
    let m = w.dir.path().join("test.guarded");
    let manifest = format!(
        "name: test.guarded\nversion: 0.1.0\nkind: task\nruntime: wasm\nentry: module.wasm\naccess:\n  default: trusted\n  trusted: [{}]\n  functions:\n    echo: public\n    work: owner\n",
        w.bob.public()
    );
    tessera_modules::write_module_dir(&m, &manifest, tessera_modules::TEST_PROGRAMS_WASM).unwrap();
    let bytes = pack_dir(&m, &Limits::default()).unwrap().bytes;
    let d = Digest::of(&bytes);
    w.hub.publish(&bytes, None, Some(&PackageSignature::sign(&w.alice, &d))).unwrap();
    let grant = |k: &KeyPair| format!("  - to: {}\n    modules: [test]\n    datasets: [local]\n", k.public());
    let node = w.node(&w.policy(&(grant(&carol) + &grant(&w.alice))));
    let call = |id: &str, by: &KeyPair, mode: &str| {
        signed(task(id, d, json!({"mode": mode, "dataset": "local", "ms": 1})), by, &node, &w.node_key)
    };

    assert!(matches!(node.execute(&call("1", &w.bob, "context")).await.outcome, TaskOutcome::Ok { .. }), "trusted");
    let msg = refused(&node.execute(&call("2", &carol, "context")).await);
    assert!(msg.contains("trusted role"), "{msg}");
    assert!(matches!(node.execute(&call("3", &carol, "echo")).await.outcome, TaskOutcome::Ok { .. }), "public");
    let msg = refused(&node.execute(&call("4", &w.bob, "work")).await);
    assert!(msg.contains("owner role"), "{msg}");
    assert!(matches!(node.execute(&call("5", &w.alice, "work")).await.outcome, TaskOutcome::Ok { .. }), "the owner");

    // On an open node an unsigned task may call public functions only.
    let open = w.node("");
    let unsigned = |id: &str, mode: &str| task(id, d, json!({"mode": mode, "dataset": "local"}));
    assert!(matches!(open.execute(&unsigned("6", "echo")).await.outcome, TaskOutcome::Ok { .. }));
    let msg = refused(&open.execute(&unsigned("7", "context")).await);
    assert!(msg.contains("sign the task"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_signed_task_is_answered_from_the_record_even_when_marked_fresh() {
    // `fresh` is the sender's word that a task id was never sent before, but a copy of a
    // signed message says the same the second time: a signed task's earlier answer is
    // always looked up, and a replay to a restarted node (whose replay cache is empty)
    // runs nothing.
    let w = World::new();
    let m = w.publish("test.programs", Some(&w.alice));
    let first = Arc::new(w.node(&w.policy("")));
    let mut t = task("replayed", m, json!({"mode": "echo"}));
    t.fresh = true;
    let t = signed(t, &w.bob, &first, &w.node_key);
    let answered = first.execute(&t).await;
    assert!(matches!(answered.outcome, TaskOutcome::Ok { .. }), "{answered:?}");
    assert_eq!(first.stats().tasks_run.load(Relaxed), 1);
    drop(first);

    let second = Arc::new(w.node(&w.policy("")));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(second.clone().serve(rx));
    w.backend.bus.put(&second.task_queue(), bytes::Bytes::from(tessera_core::wire::encode(&t))).await.unwrap();
    let d = w.backend.bus.get("replies", Duration::from_secs(30)).await.unwrap().unwrap();
    let reply: TaskReply = tessera_core::wire::decode(&d.payload).unwrap();
    assert_eq!(reply.task_id, "replayed");
    assert_eq!(second.stats().tasks_run.load(Relaxed), 0, "a replay runs nothing");
    assert_eq!(second.stats().answered_again.load(Relaxed), 1, "answered from the record");
    tx.send(true).unwrap();
    serving.await.unwrap().unwrap();
}

/// What the test programs' in-memory counter read after the `count` task of `r`: 1 in a new
/// instance.
async fn counted(w: &World, r: &TaskReply) -> u64 {
    let TaskOutcome::Ok { outputs, .. } = &r.outcome else { panic!("{r:?}") };
    let n = tessera_ports::BlobStore::get(w.backend.blobs.as_ref(), &outputs[0].digest).await.unwrap().unwrap();
    std::str::from_utf8(&n).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_reused_between_tasks_serves_one_account_in_one_session() {
    let w = World::new();
    let m = w.publish_with("test.reused", Some(&w.alice), "reuse: session\n");
    let carol = KeyPair::generate(KeyType::Ed25519);
    let node = w.node(&w.policy(&format!("  - to: {}\n    modules: [test]\n    datasets: [local]\n", carol.public())));
    // What the module's in-memory counter reads after a `count` task: 1 in a new instance.
    let count = async |id: &str, session: &str, by: &KeyPair| -> u64 {
        let mut t = task(id, m, json!({"mode": "count"}));
        t.session = session.into();
        counted(&w, &node.execute(&signed(t, by, &node, &w.node_key)).await).await
    };
    assert_eq!(count("b1", "s1", &w.bob).await, 1);
    assert_eq!(count("b2", "s1", &w.bob).await, 2, "bob's next task in s1 runs in the instance his first left");
    // Carol names bob's session: she gets an instance of her own, and bob's state stays his.
    assert_eq!(count("c1", "s1", &carol).await, 1);
    assert_eq!(count("b3", "s2", &w.bob).await, 1, "another session of bob's: another instance");
    assert_eq!(count("b4", "s1", &w.bob).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_tasks_are_one_account_and_the_node_s_own_runs_another() {
    let w = World::new();
    let m = w.publish_with("test.reused", Some(&w.alice), "reuse: session\n");
    // A node that takes unsigned tasks (the embedded default).
    let node = w.node("");
    let count = async |id: &str, by: Option<&KeyPair>| -> u64 {
        let t = task(id, m, json!({"mode": "count"}));
        let t = match by {
            Some(k) => signed(t, k, &node, &w.node_key),
            None => t,
        };
        counted(&w, &node.execute(&t).await).await
    };
    assert_eq!(count("u1", None).await, 1);
    // Unsigned senders are one account (whoever reaches the queue: such a node already
    // gives any of them the session's world state and every dataset).
    assert_eq!(count("u2", None).await, 2);
    // A signed account naming the same session does not get their instance, nor they its.
    assert_eq!(count("b1", Some(&w.bob)).await, 1);
    assert_eq!(count("u3", None).await, 3);
    // The node's own callers (a coordinator's evaluation) are an account of their own.
    let out = node.run(&m, &json!({"mode": "count"}), Vec::new(), "s1", "eval").await.unwrap();
    assert_eq!(out[0].1.as_ref(), b"1");
    let out = node.run(&m, &json!({"mode": "count"}), Vec::new(), "s1", "eval-2").await.unwrap();
    assert_eq!(out[0].1.as_ref(), b"2");
}
