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
    assert_eq!(used, ["fl.softmax.worker@0.1.2", "fl.softmax.numpy@0.1.0"]);
    // The Python workers really ran: a model trained only by them moves too.
    let mut only_py = cfg.clone();
    only_py.module = format!("{}@{}", py.name, py.version);
    only_py.node_modules.clear();
    only_py.rounds = 2;
    let r = cluster.coordinator().run("python-only", &only_py, &Quiet).await.unwrap();
    assert!(r.reports.last().unwrap().eval_accuracy.unwrap() >= 0.85);
    cluster.stop().await;
}

/// A half-precision model with an int64 counter (as PyTorch's BatchNorm keeps) trains
/// through a session: aggregated in f32, written back as F16, the counter taken from the
/// participant with the most examples; the same hierarchically, under secure aggregation
/// and under differential privacy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_precision_model_with_a_counter_trains() {
    use tessera_coordinator::Region;
    use tessera_core::tensor::{Dtype, FloatType, Model, TensorLimits};
    let home = tempfile::tempdir().unwrap();
    let data = digits::prepare(&home.path().join("data"), 4, 0.2, 7).unwrap();
    let mut config = ClusterConfig::digits(home.path(), &data, WasmLimits::default());
    config.python = Some(python());
    let cluster = Cluster::start(config).await.unwrap();
    let py_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/fl-python-worker");
    let py = cluster.publish_dir(&py_dir).unwrap();
    let mut cfg = SessionConfig::new(format!("{}@{}", py.name, py.version));
    cfg.rounds = 3;
    cfg.eval_dataset = Some("digits-test".into());
    cfg.config = serde_json::json!({"lr": 0.5, "dtype": "float16", "count_batches": true});
    let r = cluster.coordinator().run("half", &cfg, &Quiet).await.unwrap();
    assert!(r.reports.iter().all(|r| r.contributed.len() == 4), "{:?}", r.reports.last());
    assert!(r.final_metrics.unwrap().accuracy.unwrap() >= 0.85);
    let model = Model::decode(&r.model, TensorLimits::default()).unwrap();
    assert_eq!((model.float_type("w"), model.float_type("b")), (FloatType::F16, FloatType::F16));
    let counter = &model.fixed["num_batches_tracked"];
    assert_eq!((counter.dtype, counter.shape.len()), (Dtype::I64, 0));
    // Each round the counter is the largest shard's: the round's start plus its batches.
    let (shards, _) = digits::split(4, 0.2, 7);
    let largest = shards.iter().map(|s| s.len()).max().unwrap();
    let batches = i64::from_le_bytes(counter.bytes.as_slice().try_into().unwrap());
    assert_eq!(batches, 3 * largest.div_ceil(32) as i64);

    // Hierarchically: region aggregators sum the F16 updates (their partial sums travel as
    // F32), and the counter still comes from the largest shard's participant.
    let agg = home.path().join("aggregator");
    std::fs::create_dir_all(&agg).unwrap();
    let manifest =
        "name: tessera.fedavg-partial\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: fedavg-partial\n";
    std::fs::write(agg.join("module.yaml"), manifest).unwrap();
    cluster.publish_dir(&agg).unwrap();
    let mut tree = cfg.clone();
    tree.hierarchy = Some(tessera_coordinator::Hierarchy {
        module: "tessera.fedavg-partial@0.1.0".into(),
        regions: BTreeMap::from([
            ("eu".to_string(), Region { aggregator: "node-0".into(), nodes: vec!["node-0".into(), "node-1".into()] }),
            ("us".to_string(), Region { aggregator: "node-2".into(), nodes: vec!["node-2".into(), "node-3".into()] }),
        ]),
    });
    let t = cluster.coordinator().run("half-tree", &tree, &Quiet).await.unwrap();
    assert!(t.reports.iter().all(|r| r.contributed.len() == 4), "{:?}", t.reports.last());
    assert!(t.final_metrics.unwrap().accuracy.unwrap() >= 0.85);
    let tree_model = Model::decode(&t.model, TensorLimits::default()).unwrap();
    assert_eq!((tree_model.float_type("w"), tree_model.float_type("b")), (FloatType::F16, FloatType::F16));
    assert_eq!(tree_model.fixed["num_batches_tracked"].bytes, counter.bytes);

    // Under secure aggregation: the F16 updates are masked and summed as f32, and the
    // counter, one participant's own value, is released by no one.
    let mut secure = cfg.clone();
    secure.secure_aggregation =
        Some(tessera_coordinator::SecAggSettings { clip: 8.0, scale_bits: 16, threshold: None, weight_scale: 1000.0 });
    let s = cluster.coordinator().run("half-secure", &secure, &Quiet).await.unwrap();
    assert!(s.reports.iter().all(|r| r.contributed.len() == 4), "{:?}", s.reports.last());
    assert!(s.final_metrics.unwrap().accuracy.unwrap() >= 0.85);
    let secure_model = Model::decode(&s.model, TensorLimits::default()).unwrap();
    assert_eq!((secure_model.float_type("w"), secure_model.float_type("b")), (FloatType::F16, FloatType::F16));
    assert_eq!(secure_model.fixed["num_batches_tracked"].bytes, 0i64.to_le_bytes(), "the initial model's counter");

    // Clipped on the nodes, then rounded to F16: the coordinator takes the rounding for
    // what it is, and under differential privacy the counter is released by no one.
    let mut dp = cfg.clone();
    dp.differential_privacy = Some(tessera_coordinator::DpConfig {
        noise_multiplier: 1e-6,
        clipping_norm: 0.01,
        side: tessera_coordinator::DpSide::Client,
        delta: 1e-5,
    });
    let r = cluster.coordinator().run("half-dp", &dp, &Quiet).await.unwrap();
    assert!(r.reports.iter().all(|r| r.contributed.len() == 4 && r.failures.is_empty()), "{:?}", r.reports);
    let model = Model::decode(&r.model, TensorLimits::default()).unwrap();
    assert_eq!(model.fixed["num_batches_tracked"].bytes, 0i64.to_le_bytes(), "the initial model's counter");
    cluster.stop().await;
}

/// Four nodes with digits shards whose Python ($TESSERA_PYTHON) has torch, in a fresh home.
async fn torch_cluster() -> (tempfile::TempDir, Cluster) {
    let py = python();
    let ok = std::process::Command::new(&py).args(["-c", "import torch"]).status().is_ok_and(|s| s.success());
    assert!(ok, "{} cannot import torch", py.display());
    let home = tempfile::tempdir().unwrap();
    let data = digits::prepare(&home.path().join("data"), 4, 0.2, 7).unwrap();
    let mut config = ClusterConfig::digits(home.path(), &data, WasmLimits::default());
    config.python = Some(py);
    (home, Cluster::start(config).await.unwrap())
}

/// PyTorch workers join a session with WebAssembly workers. Ignored by default: it needs a
/// Python with torch (several GiB from PyPI), which `scripts/test` does not install. Run:
/// `TESSERA_PYTHON=/path/to/python-with-torch cargo test -p tessera-cluster --test python_workers -- --ignored`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Python with torch in TESSERA_PYTHON"]
async fn pytorch_and_webassembly_workers_train_one_model() {
    let (home, cluster) = torch_cluster().await;
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
    assert_eq!(used, ["fl.softmax.worker@0.1.2", "fl.softmax.torch@0.1.0"]);
    cluster.stop().await;
}

/// A PyTorch network with batch normalisation trains through a session: its whole
/// `state_dict` travels, running statistics averaged with the weights, and BatchNorm's
/// int64 `num_batches_tracked` counter taken from the participant with the most examples.
/// Ignored by default, as above: `TESSERA_PYTHON=/path/to/python-with-torch cargo test -p
/// tessera-cluster --test python_workers -- --ignored`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Python with torch in TESSERA_PYTHON"]
async fn a_pytorch_network_with_batch_normalisation_trains() {
    use tessera_core::tensor::{Dtype, FloatType, Model, TensorLimits};
    let (_home, cluster) = torch_cluster().await;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/fl-torch-bn-worker");
    let bn = cluster.publish_dir(&dir).unwrap();
    let rounds = 4;
    let mut cfg = SessionConfig::new(format!("{}@{}", bn.name, bn.version));
    cfg.rounds = rounds;
    cfg.eval_dataset = Some("digits-test".into());
    let result = cluster.coordinator().run("batchnorm", &cfg, &Quiet).await.unwrap();
    let last = result.reports.last().unwrap();
    assert!(result.reports.iter().all(|r| r.contributed.len() == 4 && r.failures.is_empty()), "{:?}", result.reports);
    assert!(last.eval_accuracy.unwrap() >= 0.9, "accuracy {:?}", last.eval_accuracy);

    let model = Model::decode(&result.model, TensorLimits::default()).unwrap();
    for name in ["0.weight", "1.running_mean", "1.running_var", "3.bias"] {
        assert_eq!(model.float_type(name), FloatType::F32, "{name}");
    }
    // The running variance is an average of the participants' (each started at 1 and
    // moved towards its batches' variances): positive and no longer all ones.
    let var = &model.floats.0["1.running_var"].data;
    assert!(var.iter().all(|v| *v > 0.0) && var.iter().any(|v| (v - 1.0).abs() > 1e-3), "{var:?}");
    let counter = &model.fixed["1.num_batches_tracked"];
    assert_eq!((counter.dtype, counter.shape.len()), (Dtype::I64, 0));
    // Each round the counter is the largest shard's: the round's start plus its batches
    // (a last batch of one example is skipped: BatchNorm cannot train on it).
    let (shards, _) = digits::split(4, 0.2, 7);
    let largest = shards.iter().map(|s| s.len()).max().unwrap();
    let batches = largest / 32 + usize::from(largest % 32 >= 2);
    let tracked = i64::from_le_bytes(counter.bytes.as_slice().try_into().unwrap());
    assert_eq!(tracked, i64::from(rounds) * batches as i64);
    cluster.stop().await;
}
