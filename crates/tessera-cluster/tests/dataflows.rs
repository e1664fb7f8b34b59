//! Dataflows on the engine, on both backends: DFFML's calculator with its operations on
//! the nodes that offer them, and a node killed while it runs an operation.
//!
//! Needs a Python (the operations are a Python module): `scripts/test` exports
//! `TESSERA_PYTHON`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tessera_cluster::{Cluster, ClusterConfig, NodeSpec};
use tessera_dataflow::DataFlow;
use tessera_wasm::WasmLimits;

use common::{On, python, repo};

/// Nodes `(id, operations)`, running Python modules.
async fn cluster(on: &On, home: &Path, nodes: &[(&str, &[&str])]) -> Cluster {
    cluster_with(on, home, nodes, BTreeMap::new()).await
}

/// Nodes `(id, operations)` with datasets (node -> name -> file), running Python modules.
async fn cluster_with(
    on: &On,
    home: &Path,
    nodes: &[(&str, &[&str])],
    mut datasets: BTreeMap<&str, BTreeMap<String, PathBuf>>,
) -> Cluster {
    let backend = on.backend().await;
    let config = ClusterConfig {
        home: home.to_owned(),
        nodes: nodes
            .iter()
            .map(|(id, ops)| NodeSpec {
                id: (*id).to_owned(),
                datasets: datasets.remove(id).unwrap_or_default(),
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
    let add = c.run_flow("calc-1", &flow, vec![("calc_string".into(), json!("add 40 and 2"))], t, true).await.unwrap();
    assert_eq!(add.single["result"], json!(42));
    let mult =
        c.run_flow("calc-2", &flow, vec![("calc_string".into(), json!("multiply 42 and 10"))], t, true).await.unwrap();
    assert_eq!(mult.single["result"], json!(420));
    assert_eq!(mult.runs, BTreeMap::from([("mult".to_string(), 1), ("parse".to_string(), 1)]));
    // An operation no node offers is named.
    let mut times = flow.clone();
    let op = times.operations.remove("mult").unwrap();
    times.operations.insert("times".into(), op);
    let e = c
        .run_flow("calc-3", &times, vec![("calc_string".into(), json!("multiply 2 and 3"))], t, true)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no node offers operation `times`"), "{e}");
    // Nodes offering an operation whose module needs more than they have are passed over,
    // and the error says what they lack.
    let big = home.path().join("big-ops");
    std::fs::create_dir_all(&big).unwrap();
    let ops = repo().join("examples/dataflows/calc-ops");
    std::fs::copy(ops.join("ops.py"), big.join("ops.py")).unwrap();
    let manifest = std::fs::read_to_string(ops.join("module.yaml")).unwrap();
    std::fs::write(
        big.join("module.yaml"),
        manifest.replace("version: 0.1.0", "version: 0.3.0").replace("memory: 32MiB", "memory: 100TiB"),
    )
    .unwrap();
    cluster.publish_dir(&big).unwrap();
    let mut huge = flow.clone();
    huge.operations.get_mut("parse").unwrap().module = "calc.ops@0.3.0".into();
    let e = c.run_flow("calc-4", &huge, vec![("calc_string".into(), json!("add 1 and 2"))], t, true).await.unwrap_err();
    assert!(e.to_string().contains("cannot run calc.ops@0.3.0") && e.to_string().contains("memory"), "{e}");
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
        c.run_flow(
            "kill-1",
            &flow,
            vec![("calc_string".into(), json!("multiply 42 and 10"))],
            Duration::from_secs(60),
            true,
        )
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

/// The ML example: node-0 holds the digits split and prepares it, node-1 runs the model
/// subflow; the accuracy it reports is the share of held-out predictions that are right.
/// Run again, the standardized features come from the cache.
async fn the_ml_flow_scales_its_data_and_runs_the_model_as_a_subflow(on: On) {
    let home = tempfile::tempdir().unwrap();
    let data = tessera_cluster::digits::prepare(&home.path().join("data"), 1, 0.2, 42).unwrap();
    let (_, test) = tessera_cluster::digits::split(1, 0.2, 42);
    let datasets = BTreeMap::from([("node-0", BTreeMap::from([("digits".to_string(), data.test.clone())]))]);
    let cluster = cluster_with(
        &on,
        home.path(),
        &[("node-0", &["read_features", "read_labels", "scale"]), ("node-1", &["fit", "predict", "score"])],
        datasets,
    )
    .await;
    let ml = repo().join("examples/dataflows/ml");
    cluster.publish_dir(&ml.join("prep")).unwrap();
    cluster.publish_dir(&ml.join("centroid")).unwrap();
    let flow = DataFlow::from_file(&ml.join("flow.yaml")).unwrap();
    let c = cluster.coordinator();
    let t = Duration::from_secs(120);
    let r = c.run_flow("ml-1", &flow, vec![("dataset".into(), json!("digits"))], t, true).await.unwrap();
    let want = |pairs: &[(&str, usize)]| pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect::<BTreeMap<_, _>>();
    assert_eq!(
        r.runs,
        want(&[
            ("model", 1),
            ("model.fit", 1),
            ("model.predict", 1),
            ("model.score", 1),
            ("read_features", 1),
            ("read_labels", 1),
            ("scale", 1)
        ])
    );
    // The features travelled as tensor blobs: the standardized ones are F64 [rows, 64].
    let scaled = r.items.iter().find(|i| i.definition == "scaled").unwrap();
    let digest: tessera_core::Digest = scaled.value.as_str().unwrap().parse().unwrap();
    let bytes = cluster.backend.blobs.get(&digest).await.unwrap().unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info = meta.tensors().into_values().next().unwrap();
    assert_eq!((format!("{:?}", info.dtype), info.shape.clone()), ("F64".to_string(), vec![test.len(), 64]));
    let predictions: Vec<i64> = serde_json::from_value(r.single["predictions"].clone()).unwrap();
    assert_eq!(predictions.len(), test.len());
    let k = (test.len() as f64 * 0.7) as usize;
    let right = predictions[k..].iter().zip(&test.y[k..]).filter(|(p, y)| p == y).count();
    let accuracy = r.single["accuracy"].as_f64().unwrap();
    assert!((accuracy - right as f64 / (test.len() - k) as f64).abs() < 1e-12, "{accuracy}");
    assert!(accuracy > 0.85, "a nearest-centroid model on standardized digits: {accuracy}");
    // The same data again: `scale` (cache: true) is answered from world state.
    let again = c.run_flow("ml-2", &flow, vec![("dataset".into(), json!("digits"))], t, true).await.unwrap();
    assert_eq!((again.cached.get("scale"), again.runs.get("scale")), (Some(&1), None));
    assert_eq!(again.single, r.single);
    // Without the cache it runs.
    let plain = c.run_flow("ml-3", &flow, vec![("dataset".into(), json!("digits"))], t, false).await.unwrap();
    assert_eq!((plain.cached.get("scale"), plain.runs.get("scale")), (None, Some(&1)));
    cluster.stop().await;
}

on_both_backends!(
    the_ml_flow_scales_its_data_and_runs_the_model_as_a_subflow,
    the_calculator_runs_its_operations_on_the_nodes_that_offer_them,
    a_node_killed_while_it_runs_an_operation_has_it_run_elsewhere_once,
);
