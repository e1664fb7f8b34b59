//! Actors on a node: get-or-create, state across calls and restarts, pools, bad calls,
//! eviction by age and by priority.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tessera_core::wire::Resources;
use tessera_core::{ByteSize, Digest};
use tessera_hub::{HubStore, LocalHub};
use tessera_node::{ActorError, ActorSpec, Actors, BuiltinRuntime, Node, NodeConfig, NodePorts};
use tessera_package::{Limits, pack_dir};
use tessera_ports::{Backend, Runtime, RuntimeError};
use tessera_wasm::{WasmLimits, WasmRuntime};

struct World {
    _dir: tempfile::TempDir,
    hub: Arc<HubStore>,
    node: Arc<Node>,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let hub = Arc::new(HubStore::open(dir.path().join("hub")).unwrap());
    let wasm = WasmRuntime::new(WasmLimits {
        max_memory: 256 << 20,
        max_time: Duration::from_secs(30),
        max_output_bytes: 1 << 20,
    })
    .unwrap();
    let runtimes: Vec<Arc<dyn Runtime>> = vec![Arc::new(wasm), Arc::new(BuiltinRuntime::new())];
    let ports =
        NodePorts { backend: Backend::in_process(Duration::from_secs(30)), source: Arc::new(LocalHub(hub.clone())) };
    let node = Arc::new(Node::new(NodeConfig::new("n1", dir.path().join("cache")), ports, runtimes).unwrap());
    World { _dir: dir, hub, node }
}

impl World {
    /// Publishes the test programs as `name`, needing `memory_mib` per replica.
    fn module(&self, name: &str, memory_mib: u64) -> Digest {
        let m = self._dir.path().join(name);
        let manifest = format!(
            "name: {name}\nversion: 0.1.0\nkind: model\nruntime: wasm\nentry: module.wasm\nneeds:\n  memory: {memory_mib}MiB\n"
        );
        tessera_modules::write_module_dir(&m, &manifest, tessera_modules::TEST_PROGRAMS_WASM).unwrap();
        let bytes = pack_dir(&m, &Limits::default()).unwrap().bytes;
        self.hub.publish(&bytes, None, None).unwrap().record.digest
    }

    fn actors(&self, memory_mib: u64) -> Actors {
        Actors::new(
            self.node.clone(),
            Some(Resources { cpu: 8.0, memory: ByteSize(memory_mib << 20), gpu: 0, disk: ByteSize(1 << 30) }),
        )
    }
}

fn spec(module: Digest, tag: Option<&str>, priority: i32) -> ActorSpec {
    ActorSpec { module, tag: tag.map(str::to_owned), replicas: 1, config: json!({}), priority }
}

async fn call(actors: &Actors, name: &str, function: &str) -> Result<String, ActorError> {
    let out = actors.call(name, function, &json!([]), &json!({}), vec![], Duration::from_secs(10)).await?;
    Ok(out
        .into_iter()
        .find(|(n, _)| n == "result")
        .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_launches_make_one_actor() {
    let w = world();
    let m = w.module("demo.counter", 10);
    let actors = Arc::new(w.actors(1000));
    let (a, b) = tokio::join!(actors.launch(spec(m, Some("1"), 0)), actors.launch(spec(m, Some("1"), 0)));
    assert_eq!(a.unwrap().name, "demo.counter-1");
    assert_eq!(b.unwrap().name, "demo.counter-1");
    assert_eq!(actors.list().await.len(), 1);
    assert_eq!(call(&actors, "demo.counter-1", "count").await.unwrap(), "1");
    assert_eq!(call(&actors, "demo.counter-1", "count").await.unwrap(), "2", "one actor, one counter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_lives_across_calls_failures_and_relaunches() {
    let w = world();
    let m = w.module("demo.counter", 10);
    let actors = w.actors(1000);
    let name = actors.launch(spec(m, None, 0)).await.unwrap().name;
    for expected in ["1", "2", "3"] {
        assert_eq!(call(&actors, &name, "count").await.unwrap(), expected);
    }
    // Bad calls answer with a clear error, and the actor stays up with its state.
    let e = call(&actors, &name, "no_such_function").await.unwrap_err();
    assert!(e.to_string().contains("no_such_function"), "{e}");
    let e = actors
        .call(&name, "count", &json!({"not": "a list"}), &json!({}), vec![], Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(e, ActorError::Invalid(_)), "{e}");
    let e = actors.call(&name, "bad name!", &json!([]), &json!({}), vec![], Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(e, ActorError::Invalid(_)), "{e}");
    let big = actors.call(&name, "big-output", &json!([]), &json!({}), vec![], Duration::from_secs(5)).await;
    assert!(big.is_ok(), "an empty big-output fits");
    assert_eq!(call(&actors, &name, "count").await.unwrap(), "4");
    // A call that outlives its time-out fails; the replica is replaced and its saved state
    // restored.
    let e = actors.call(&name, "spin", &json!([]), &json!({}), vec![], Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(e, ActorError::Timeout { .. }), "{e}");
    assert_eq!(call(&actors, &name, "count").await.unwrap(), "5");
    // A crash (a panic traps the instance) too.
    let e = call(&actors, &name, "panic").await.unwrap_err();
    assert!(matches!(e, ActorError::Runtime(RuntimeError::Trap(_))), "{e}");
    assert_eq!(call(&actors, &name, "count").await.unwrap(), "6");
    // Killed and launched again: it comes back with its state.
    let info = actors.kill(&name).await.unwrap();
    assert!(info.stateful);
    assert!(matches!(call(&actors, &name, "count").await, Err(ActorError::NotFound(_))));
    actors.launch(spec(m, None, 0)).await.unwrap();
    assert_eq!(call(&actors, &name, "count").await.unwrap(), "7");
    assert!(matches!(actors.kill("nobody").await, Err(ActorError::NotFound(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_to_the_least_busy_replica() {
    let w = world();
    let m = w.module("demo.pool", 10);
    let actors = Arc::new(w.actors(1000));
    let mut s = spec(m, None, 0);
    s.replicas = 2;
    s.config = json!({"ms": 800});
    let info = actors.launch(s).await.unwrap();
    assert_eq!(info.replicas, 2);
    let slow = {
        let a = actors.clone();
        tokio::spawn(async move {
            a.call("demo.pool", "work", &json!([]), &json!({}), vec![], Duration::from_secs(30))
                .await
                .map(|_| std::time::Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let quick = actors
        .call(
            "demo.pool",
            "echo",
            &json!([]),
            &json!({}),
            vec![("x".into(), Bytes::from_static(b"y"))],
            Duration::from_secs(30),
        )
        .await;
    let quick_done = std::time::Instant::now();
    assert_eq!(quick.unwrap(), vec![("x".to_string(), Bytes::from_static(b"y"))]);
    let slow_done = slow.await.unwrap().unwrap();
    assert!(quick_done < slow_done, "the second call did not wait for the first");
    let listed: Value = serde_json::to_value(actors.list().await).unwrap();
    assert_eq!(listed[0]["calls"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_evicts_the_oldest_or_the_least_important() {
    let w = world();
    let m = w.module("demo.big", 100);
    // Room for two.
    let actors = w.actors(200);
    actors.launch(spec(m, Some("a"), 0)).await.unwrap();
    actors.launch(spec(m, Some("b"), 0)).await.unwrap();
    actors.launch(spec(m, Some("c"), 0)).await.unwrap();
    let names: Vec<String> = actors.list().await.into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["demo.big-b", "demo.big-c"], "FIFO: the oldest left");

    let actors = w.actors(200);
    actors.launch(spec(m, Some("important"), 5)).await.unwrap();
    actors.launch(spec(m, Some("minor"), 1)).await.unwrap();
    actors.launch(spec(m, Some("new"), 5)).await.unwrap();
    let names: Vec<String> = actors.list().await.into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["demo.big-important", "demo.big-new"], "the lowest priority left");
    // Nothing of lower or equal priority to evict: refused with the reason.
    let e = actors.launch(spec(m, Some("low"), 0)).await.unwrap_err();
    assert!(matches!(&e, ActorError::NoRoom { .. }) && e.to_string().contains("memory"), "{e}");
    let huge = w.module("demo.huge", 300);
    let e = actors.launch(spec(huge, None, 9)).await.unwrap_err();
    assert!(e.to_string().contains("memory"), "{e}");
    assert_eq!(actors.list().await.len(), 2, "a refused launch changes nothing");
}
