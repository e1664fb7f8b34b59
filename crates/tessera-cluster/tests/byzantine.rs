//! Byzantine participants: 3 of 10 nodes send sign-flipped, scaled updates. FedAvg's
//! model collapses; the coordinate-wise median, the trimmed mean and Krum keep learning.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::json;
use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Quiet, SessionConfig};
use tessera_core::RuntimeKind;
use tessera_core::tensor::{TensorLimits, Tensors};
use tessera_ports::{Invocation, ModuleImage, Outputs, Runtime, RuntimeError, TaskContext};
use tessera_wasm::WasmLimits;

/// How hard attackers push: they send `global - SCALE * (local - global)`.
const SCALE: f32 = 10.0;

/// Runs the honest worker, then turns its model update around and scales it.
struct SignFlipper(Arc<dyn Runtime>);

#[async_trait]
impl Runtime for SignFlipper {
    fn kind(&self) -> RuntimeKind {
        self.0.kind()
    }

    async fn run(
        &self,
        module: &ModuleImage,
        invocation: Invocation,
        ctx: Arc<dyn TaskContext>,
    ) -> Result<Outputs, RuntimeError> {
        let training = invocation.config["mode"] == "train";
        let global = invocation.inputs.iter().find(|(n, _)| n == "model").map(|(_, b)| b.clone());
        let mut out = self.0.run(module, invocation, ctx).await?;
        if let (true, Some(global)) = (training, global) {
            let global = Tensors::decode(&global, TensorLimits::default()).unwrap();
            for (name, bytes) in out.iter_mut() {
                if name == "model" {
                    let mut local = Tensors::decode(bytes, TensorLimits::default()).unwrap();
                    for (k, t) in local.0.iter_mut() {
                        for (v, g) in t.data.iter_mut().zip(&global.0[k].data) {
                            *v = g - SCALE * (*v - g);
                        }
                    }
                    *bytes = Bytes::from(local.encode());
                }
            }
        }
        Ok(out)
    }
}

fn flip(inner: Arc<dyn Runtime>) -> Arc<dyn Runtime> {
    Arc::new(SignFlipper(inner))
}

async fn accuracy(cluster: &Cluster, session: &str, strategy: serde_json::Value) -> f64 {
    let mut cfg = SessionConfig::new("fl.softmax.worker@0.1.2");
    cfg.rounds = 10;
    cfg.min_participants = 10;
    cfg.eval_dataset = Some("digits-test".into());
    cfg.config = json!({"lr": 0.5});
    cfg.strategy = serde_json::from_value(strategy).unwrap();
    let result = cluster.coordinator().run(session, &cfg, &Quiet).await.unwrap();
    let last = result.reports.last().unwrap();
    assert_eq!(last.contributed.len(), 10, "every node's update reached the strategy");
    last.eval_accuracy.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn robust_strategies_survive_three_sign_flipping_participants_of_ten() {
    let home = tempfile::tempdir().unwrap();
    let data = digits::prepare(&home.path().join("data"), 10, 0.2, 42).unwrap();
    let mut config = ClusterConfig::digits(home.path(), &data, WasmLimits::default());
    for node in &mut config.nodes[..3] {
        node.wasm_wrapper = Some(flip);
    }
    let cluster = Cluster::start(config).await.unwrap();
    let dir = home.path().join("worker");
    tessera_modules::write_softmax_worker(&dir).unwrap();
    cluster.publish_dir(&dir).unwrap();

    let fedavg = accuracy(&cluster, "byz-fedavg", json!("fedavg")).await;
    eprintln!("fedavg: accuracy {fedavg}");
    assert!(fedavg < 0.5, "FedAvg should collapse under the attack, got {fedavg}");
    for (session, strategy) in [
        ("byz-median", json!("fedmedian")),
        ("byz-trimmed", json!({"name": "fedtrimmedavg", "beta": 0.3})),
        ("byz-krum", json!({"name": "krum", "num_malicious_clients": 3})),
        ("byz-multikrum", json!({"name": "krum", "num_malicious_clients": 3, "num_clients_to_keep": 5})),
    ] {
        let acc = accuracy(&cluster, session, strategy.clone()).await;
        eprintln!("{strategy}: accuracy {acc}");
        assert!(acc >= 0.85, "{strategy}: accuracy {acc} under the attack");
    }
    cluster.stop().await;
}
