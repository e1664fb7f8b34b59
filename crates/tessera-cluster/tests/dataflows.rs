//! Dataflows on the engine, on both backends: DFFML's calculator with its operations on
//! the nodes that offer them, and a node killed while it runs an operation.
//!
//! Needs a Python (the operations are a Python module): `scripts/test` exports
//! `TESSERA_PYTHON`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tessera_cluster::{Cluster, ClusterConfig, NodeSpec};
use tessera_dataflow::DataFlow;
use tessera_wasm::WasmLimits;

use common::{On, python, repo};

/// Nodes `(id, operations)`, running Python modules.
async fn cluster(on: &On, home: &Path, nodes: &[(&str, &[&str])]) -> Cluster {
    let backend = on.backend().await;
    let config = ClusterConfig {
        home: home.to_owned(),
        nodes: nodes
            .iter()
            .map(|(id, ops)| NodeSpec {
                id: (*id).to_owned(),
                datasets: BTreeMap::new(),
                wasm_wrapper: None,
                world_wrapper: None,
                operations: ops.iter().map(|o| (*o).to_owned()).collect(),
            })
            .collect(),
        coordinator_datasets: BTreeMap::new(),
        wasm_limits: WasmLimits::default(),
        python: Some(python()),
    };
    Cluster::start_on(config, backend).await.unwrap()
}

fn calc() -> DataFlow {
    DataFlow::from_yaml(&std::fs::read_to_string(repo().join("examples/dataflows/calc.yaml")).unwrap()).unwrap()
}

async fn the_calculator_runs_its_operations_on_the_nodes_that_offer_them(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&on, home.path(), &[("node-0", &["parse", "add"]), ("node-1", &["mult"])]).await;
    cluster.publish_dir(&repo().join("examples/dataflows/calc-ops")).unwrap();
    let flow = calc();
    let c = cluster.coordinator();
    let t = Duration::from_secs(60);
    let add = c.run_flow("calc-1", &flow, vec![("calc_string".into(), json!("add 40 and 2"))], t).await.unwrap();
    assert_eq!(add.single["result"], json!(42));
    let mult = c.run_flow("calc-2", &flow, vec![("calc_string".into(), json!("multiply 42 and 10"))], t).await.unwrap();
    assert_eq!(mult.single["result"], json!(420));
    assert_eq!(mult.runs, BTreeMap::from([("mult".to_string(), 1), ("parse".to_string(), 1)]));
    // An operation no node offers is named.
    let mut times = flow.clone();
    let op = times.operations.remove("mult").unwrap();
    times.operations.insert("times".into(), op);
    let e = c.run_flow("calc-3", &times, vec![("calc_string".into(), json!("multiply 2 and 3"))], t).await.unwrap_err();
    assert!(e.to_string().contains("no node offers operation `times`"), "{e}");
    cluster.stop().await;
}

async fn a_node_killed_while_it_runs_an_operation_has_it_run_elsewhere_once(on: On) {
    let home = tempfile::tempdir().unwrap();
    // A slow `mult`: it logs, waits past a log flush, logs again, then answers.
    let slow = home.path().join("slow-ops");
    std::fs::create_dir_all(&slow).unwrap();
    std::fs::write(
        slow.join("module.yaml"),
        "name: calc.ops\nversion: 0.2.0\nkind: task\nruntime: python\nentry: ops.py\n",
    )
    .unwrap();
    let ops = std::fs::read_to_string(repo().join("examples/dataflows/calc-ops/ops.py")).unwrap().replace(
        "    def mult(self, numbers):\n",
        "    def mult(self, numbers):\n        import time\n        self.log.info('multiplying')\n        time.sleep(1.5)\n        self.log.info('still multiplying')\n        time.sleep(2)\n",
    );
    std::fs::write(slow.join("ops.py"), ops).unwrap();
    let mut cluster =
        cluster(&on, home.path(), &[("node-0", &["parse"]), ("node-1", &["mult"]), ("node-2", &["mult"])]).await;
    cluster.publish_dir(&slow).unwrap();
    let mut flow = calc();
    for op in flow.operations.values_mut() {
        op.module = "calc.ops@0.2.0".into();
    }
    flow.output.get_multi = vec!["result".into()];
    let c = cluster.coordinator();
    let run = tokio::spawn(async move {
        c.run_flow("kill-1", &flow, vec![("calc_string".into(), json!("multiply 42 and 10"))], Duration::from_secs(60))
            .await
    });
    // The second parameter set of the run (mult's) goes to the second node offering it,
    // node-2: kill it once its log shows it is multiplying. (Task ids are
    // `<context>-<nonce>-p<set>-<attempt>.<node>`.)
    let log_of = |keys: &[String], set_attempt_node: &str| {
        keys.iter().any(|k| k.contains("/logs/") && k.ends_with(set_attempt_node))
    };
    let mut waited = 0;
    while !log_of(&cluster.backend.world.keys("runs/kill-1-").await.unwrap(), "-p1-1.node-2") {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
        assert!(waited < 600, "node-2 never started multiplying");
    }
    assert!(cluster.kill_node("node-2"));
    let result = run.await.unwrap().unwrap();
    assert_eq!(result.multi["result"], vec![json!(420)], "420, once");
    assert_eq!(result.runs["mult"], 1);
    // The parameter set ran again on node-1.
    assert!(log_of(&cluster.backend.world.keys("runs/kill-1-").await.unwrap(), "-p1-2.node-1"));
    cluster.stop().await;
}

on_both_backends!(
    the_calculator_runs_its_operations_on_the_nodes_that_offer_them,
    a_node_killed_while_it_runs_an_operation_has_it_run_elsewhere_once,
);
