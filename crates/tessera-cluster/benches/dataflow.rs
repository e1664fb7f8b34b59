//! Operations per second of DFFML's calculator flow (`examples/dataflows/calc.yaml`):
//! `parse` turns "add 40 and 2" into numbers and flags, then `add` or `mult` runs, so two
//! operations per context. In one run:
//!
//! - the orchestrator alone, its operations in-process Rust functions (what DFFML's
//!   MemoryOrchestrator does with in-process Python functions; `bench/dataflow/run` runs
//!   DFFML from PyPI on the same flow beside this);
//! - the engine with the in-process backend, and over a private nats-server: two nodes
//!   offering `parse`, `add` and `mult`, the operations the Python module
//!   `examples/dataflows/calc-ops`, each parameter set a task on the bus.
//!
//! Contexts run at most 64 at once for the orchestrator alone and 8 at once on the engine;
//! one context warms the engine up (packages fetched) before timing starts.
//!
//! `cargo bench -p tessera-cluster --bench dataflow [-- ORCHESTRATOR_CONTEXTS ENGINE_CONTEXTS]`
//! (defaults 2000 and 40; needs `TESSERA_PYTHON`; `scripts/test` makes target/venv).
//! Prints one JSON line per setting: contexts, operations, seconds, ops_per_s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::{Value, json};
use tessera_cluster::{Cluster, ClusterConfig, NodeSpec};
use tessera_dataflow::{DataFlow, Operation, OperationNetwork, Orchestrator};
use tessera_nats::testing::NatsServer;
use tessera_ports::Backend;
use tessera_wasm::WasmLimits;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    PathBuf::from(std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into()))
}

fn lines(n: usize) -> Vec<String> {
    (0..n).map(|i| if i % 2 == 0 { format!("add {i} and {}", i + 2) } else { format!("multiply {i} and 10") }).collect()
}

fn expected(line: &str) -> i64 {
    let ns: Vec<i64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    if line.starts_with("add") { ns[0] + ns[1] } else { ns[0] * ns[1] }
}

fn report(setting: &str, contexts: usize, seconds: f64) {
    let ops = 2 * contexts;
    println!(
        "{}",
        json!({"setting": setting, "contexts": contexts, "operations": ops, "seconds": seconds, "ops_per_s": ops as f64 / seconds})
    );
}

/// The calculator's functions in this process, as DFFML's in-process operations.
struct Calc;

#[async_trait]
impl OperationNetwork for Calc {
    async fn run(
        &self,
        _: &str,
        op: &Operation,
        _: &BTreeMap<String, tessera_dataflow::Definition>,
        inputs: BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>, String> {
        Ok(match op.function.as_str() {
            "parse" => {
                let line = inputs["line"].as_str().unwrap_or_default();
                let words: Vec<&str> = line.split_whitespace().collect();
                let numbers: Vec<i64> = words.iter().filter_map(|w| w.parse().ok()).collect();
                BTreeMap::from([
                    ("add".into(), json!(words.contains(&"add"))),
                    ("mult".into(), json!(words.contains(&"multiply") || words.contains(&"mult"))),
                    ("numbers".into(), json!(numbers)),
                ])
            }
            f => {
                let ns: Vec<i64> =
                    inputs["numbers"].as_array().ok_or("no numbers")?.iter().filter_map(Value::as_i64).collect();
                let v = if f == "add" { ns.iter().sum::<i64>() } else { ns.iter().product() };
                BTreeMap::from([((if f == "add" { "sum" } else { "product" }).into(), json!(v))])
            }
        })
    }
}

async fn orchestrator_alone(flow: &DataFlow, n: usize) -> f64 {
    let o = Orchestrator::new(flow, &Calc);
    let started = Instant::now();
    let results: Vec<(String, Value)> = futures::stream::iter(lines(n))
        .map(|l| {
            let o = &o;
            async move {
                let r = o.run_context(vec![("calc_string".into(), json!(l))]).await.unwrap();
                (l, r.single["result"].clone())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    assert!(results.iter().all(|(l, v)| *v == json!(expected(l))));
    seconds
}

async fn engine(backend: Backend, home: &Path, flow: &DataFlow, n: usize) -> f64 {
    let ops: Vec<String> = ["parse", "add", "mult"].iter().map(|s| s.to_string()).collect();
    let config = ClusterConfig {
        home: home.to_owned(),
        nodes: (0..2)
            .map(|k| NodeSpec {
                id: format!("node-{k}"),
                datasets: BTreeMap::new(),
                wasm_wrapper: None,
                world_wrapper: None,
                operations: ops.clone(),
            })
            .collect(),
        coordinator_datasets: BTreeMap::new(),
        wasm_limits: WasmLimits::default(),
        python: Some(python()),
    };
    let cluster = Cluster::start_on(config, backend).await.unwrap();
    cluster.publish_dir(&repo().join("examples/dataflows/calc-ops")).unwrap();
    let c = cluster.coordinator();
    let t = Duration::from_secs(120);
    c.run_flow("warm-up", flow, vec![("calc_string".into(), json!("add 1 and 2"))], t, false).await.unwrap();
    let started = Instant::now();
    let results: Vec<(String, Value)> = futures::stream::iter(lines(n).into_iter().enumerate())
        .map(|(i, l)| {
            let c = &c;
            async move {
                let r = c
                    .run_flow(&format!("ctx-{i}"), flow, vec![("calc_string".into(), json!(l))], t, false)
                    .await
                    .unwrap();
                (l, r.single["result"].clone())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    assert!(results.iter().all(|(l, v)| *v == json!(expected(l))));
    cluster.stop().await;
    seconds
}

fn main() {
    let numbers: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let alone = numbers.first().copied().unwrap_or(2000);
    let on_engine = numbers.get(1).copied().unwrap_or(40);
    let flow = DataFlow::from_file(&repo().join("examples/dataflows/calc.yaml")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        report("tessera orchestrator, in-process functions", alone, orchestrator_alone(&flow, alone).await);
        let dir = tempfile::tempdir().unwrap();
        let s =
            engine(Backend::in_process(Duration::from_secs(30)), &dir.path().join("memory"), &flow, on_engine).await;
        report("tessera engine, in-process backend, Python operations on 2 nodes", on_engine, s);
        let server = NatsServer::start();
        let nats = tessera_nats::backend(&server.url(), &tessera_nats::NatsOptions::default()).await.unwrap();
        let s = engine(nats, &dir.path().join("nats"), &flow, on_engine).await;
        report("tessera engine, NATS JetStream, Python operations on 2 nodes", on_engine, s);
    });
}
