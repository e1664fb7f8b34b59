//! Python workers (the SDK, numpy) and WebAssembly workers in one federated session.
//!
//! Needs a Python with numpy: `scripts/test` makes one and exports `TESSERA_PYTHON`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Quiet, SessionConfig};
use tessera_wasm::WasmLimits;

fn python() -> PathBuf {
    let py = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&py).args(["-c", "import numpy"]).status().is_ok_and(|s| s.success());
    assert!(ok, "{py} lacks numpy: run scripts/test (it makes target/venv) or set TESSERA_PYTHON");
    PathBuf::from(py)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_webassembly_workers_train_one_model() {
    let home = tempfile::tempdir().unwrap();
    let data = digits::prepare(&home.path().join("data"), 4, 0.2, 7).unwrap();
    let mut config = ClusterConfig::digits(home.path(), &data, WasmLimits::default());
    config.python = Some(python());
    let cluster = Cluster::start(config).await.unwrap();
    let wasm_dir = home.path().join("wasm-worker");
    tessera_modules::write_softmax_worker(&wasm_dir).unwrap();
    let wasm = cluster.publish_dir(&wasm_dir).unwrap();
    let py_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/fl-python-worker");
    let py = cluster.publish_dir(&py_dir).unwrap();
    assert_eq!(py.runtime, tessera_core::RuntimeKind::Python);

    let mut cfg = SessionConfig::new(format!("{}@{}", wasm.name, wasm.version));
    cfg.rounds = 5;
    cfg.eval_dataset = Some("digits-test".into());
    cfg.config = serde_json::json!({"lr": 0.5});
    cfg.node_modules = BTreeMap::from([
        ("node-2".to_string(), format!("{}@{}", py.name, py.version)),
        ("node-3".to_string(), format!("{}@{}", py.name, py.version)),
    ]);
    let result = cluster.coordinator().run("mixed", &cfg, &Quiet).await.unwrap();
    let last = result.reports.last().unwrap();
    assert_eq!(last.contributed.len(), 4, "{last:?}");
    assert!(last.eval_accuracy.unwrap() >= 0.9, "accuracy {:?}", last.eval_accuracy);
    let used: Vec<&str> = result.lineage.modules.iter().map(|m| m.module.as_str()).collect();
    assert_eq!(used, ["fl.softmax.worker@0.1.0", "fl.softmax.numpy@0.1.0"]);
    // The Python workers really ran: a model trained only by them moves too.
    let mut only_py = cfg.clone();
    only_py.module = format!("{}@{}", py.name, py.version);
    only_py.node_modules.clear();
    only_py.rounds = 2;
    let r = cluster.coordinator().run("python-only", &only_py, &Quiet).await.unwrap();
    assert!(r.reports.last().unwrap().eval_accuracy.unwrap() >= 0.85);
    cluster.stop().await;
}

/// PyTorch workers join a session with WebAssembly workers. Ignored by default: it needs a
/// Python with torch (several GiB from PyPI), which `scripts/test` does not install. Run:
/// `TESSERA_PYTHON=/path/to/python-with-torch cargo test -p tessera-cluster --test python_workers -- --ignored`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Python with torch in TESSERA_PYTHON"]
async fn pytorch_and_webassembly_workers_train_one_model() {
    let py = python();
    let ok = std::process::Command::new(&py).args(["-c", "import torch"]).status().is_ok_and(|s| s.success());
    assert!(ok, "{} cannot import torch", py.display());
    let home = tempfile::tempdir().unwrap();
    let data = digits::prepare(&home.path().join("data"), 4, 0.2, 7).unwrap();
    let mut config = ClusterConfig::digits(home.path(), &data, WasmLimits::default());
    config.python = Some(py);
    let cluster = Cluster::start(config).await.unwrap();
    let wasm_dir = home.path().join("wasm-worker");
    tessera_modules::write_softmax_worker(&wasm_dir).unwrap();
    let wasm = cluster.publish_dir(&wasm_dir).unwrap();
    let torch_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/fl-torch-worker");
    let torch = cluster.publish_dir(&torch_dir).unwrap();
    let mut cfg = SessionConfig::new(format!("{}@{}", wasm.name, wasm.version));
    cfg.rounds = 5;
    cfg.eval_dataset = Some("digits-test".into());
    cfg.config = serde_json::json!({"lr": 0.5});
    cfg.node_modules = BTreeMap::from([
        ("node-2".to_string(), format!("{}@{}", torch.name, torch.version)),
        ("node-3".to_string(), format!("{}@{}", torch.name, torch.version)),
    ]);
    let result = cluster.coordinator().run("mixed-torch", &cfg, &Quiet).await.unwrap();
    let last = result.reports.last().unwrap();
    assert_eq!(last.contributed.len(), 4, "{last:?}");
    assert!(last.eval_accuracy.unwrap() >= 0.9, "accuracy {:?}", last.eval_accuracy);
    let used: Vec<&str> = result.lineage.modules.iter().map(|m| m.module.as_str()).collect();
    assert_eq!(used, ["fl.softmax.worker@0.1.0", "fl.softmax.torch@0.1.0"]);
    cluster.stop().await;
}
