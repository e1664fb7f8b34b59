//! Secure aggregation in a session: ten nodes mask their updates; two drop out after they
//! shared their secrets; the coordinator still gets the exact sum of the other eight, the
//! same model (to quantization) as plain FedAvg over those eight.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;
use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Quiet, SecAggSettings, SessionConfig};
use tessera_core::tensor::{TensorLimits, Tensors};
use tessera_ports::{Entry, ResultEntry, WorldError, WorldState};
use tessera_wasm::WasmLimits;

/// World state that refuses this node's masked input: it drops out after sharing.
struct DropsBeforeMasking(Arc<dyn WorldState>);

#[async_trait]
impl WorldState for DropsBeforeMasking {
    async fn get(&self, key: &str) -> Result<Option<Entry>, WorldError> {
        self.0.get(key).await
    }
    async fn put(&self, key: &str, value: Bytes) -> Result<u64, WorldError> {
        if key.contains("/masked/") {
            return Err(WorldError::Backend("dropped out".into()));
        }
        self.0.put(key, value).await
    }
    async fn compare_and_set(&self, key: &str, value: Bytes, expected: Option<u64>) -> Result<u64, WorldError> {
        self.0.compare_and_set(key, value, expected).await
    }
    async fn delete(&self, key: &str) -> Result<(), WorldError> {
        self.0.delete(key).await
    }
    async fn keys(&self, prefix: &str) -> Result<Vec<String>, WorldError> {
        self.0.keys(prefix).await
    }
    async fn add_result(&self, key: &str, node: &str, value: Bytes) -> Result<(), WorldError> {
        self.0.add_result(key, node, value).await
    }
    async fn select_results(&self, key: &str, node: Option<&str>) -> Result<Vec<ResultEntry>, WorldError> {
        self.0.select_results(key, node).await
    }
    async fn clear_results(&self, prefix: &str) -> Result<usize, WorldError> {
        self.0.clear_results(prefix).await
    }
}

fn drops(inner: Arc<dyn WorldState>) -> Arc<dyn WorldState> {
    Arc::new(DropsBeforeMasking(inner))
}

fn session(secure: bool) -> SessionConfig {
    let mut cfg = SessionConfig::new("fl.softmax.worker@0.1.2");
    cfg.rounds = 1;
    cfg.min_participants = 8;
    cfg.round_timeout_secs = 20.0;
    // One full-batch step: each node's update does not depend on its task's seed.
    cfg.config = json!({"lr": 0.5, "batch_size": 100000});
    if secure {
        cfg.secure_aggregation =
            Some(SecAggSettings { clip: 8.0, scale_bits: 16, threshold: None, weight_scale: 1000.0 });
    }
    cfg
}

async fn start(
    home: &std::path::Path,
    data: &digits::Prepared,
    nodes: std::ops::Range<usize>,
    dropping: usize,
) -> Cluster {
    let mut config = ClusterConfig::digits(home, data, WasmLimits::default());
    config.nodes = config.nodes[nodes].to_vec();
    for n in &mut config.nodes[..dropping] {
        n.world_wrapper = Some(drops);
    }
    let cluster = Cluster::start(config).await.unwrap();
    let dir = home.join("worker");
    tessera_modules::write_softmax_worker(&dir).unwrap();
    cluster.publish_dir(&dir).unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_ten_drop_out_and_the_sum_of_the_rest_is_exact() {
    let root = tempfile::tempdir().unwrap();
    let data = digits::prepare(&root.path().join("data"), 10, 0.2, 42).unwrap();
    let secure = start(&root.path().join("a"), &data, 0..10, 2).await;
    let r = secure.coordinator().run("secagg", &session(true), &Quiet).await.unwrap();
    let report = &r.reports[0];
    assert_eq!(report.selected.len(), 10);
    assert_eq!(report.contributed.len(), 8, "{:?}", report.failures);
    assert!(!report.contributed.contains(&"node-0".to_string()) && !report.contributed.contains(&"node-1".to_string()));
    assert_eq!(report.failures.len(), 2, "{:?}", report.failures);
    secure.stop().await;

    // Plain FedAvg over the eight that stayed.
    let plain = start(&root.path().join("b"), &data, 2..10, 0).await;
    let p = plain.coordinator().run("plain", &session(false), &Quiet).await.unwrap();
    plain.stop().await;
    let a = Tensors::decode(&r.model, TensorLimits::default()).unwrap();
    let b = Tensors::decode(&p.model, TensorLimits::default()).unwrap();
    let mut worst = 0f32;
    for (k, t) in &a.0 {
        for (x, y) in t.data.iter().zip(&b.0[k].data) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("largest difference from plain FedAvg: {worst}");
    // 16-bit quantization over [-8, 8]: at most half a step (1.2e-4) per participant.
    assert!(worst < 2e-3, "secure and plain FedAvg differ by {worst}");
    assert!(a.0.values().flat_map(|t| &t.data).any(|v| *v != 0.0), "the model moved");
}
