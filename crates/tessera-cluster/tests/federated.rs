//! A federated session end to end, in one process: real hub, real packages, real
//! WebAssembly worker, real digits data.

use std::time::Duration;

use serde_json::json;
use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Quiet, SessionConfig};
use tessera_core::tensor::{TensorLimits, Tensors};
use tessera_wasm::WasmLimits;

async fn cluster(home: &std::path::Path, nodes: usize) -> Cluster {
    let prepared = digits::prepare(&home.join("data"), nodes, 0.2, 42).unwrap();
    let limits = WasmLimits { max_time: Duration::from_secs(60), ..WasmLimits::default() };
    let cluster = Cluster::start(ClusterConfig::digits(home, &prepared, limits)).await.unwrap();
    let dir = home.join("modules").join("fl.softmax.worker");
    tessera_modules::write_softmax_worker(&dir).unwrap();
    cluster.publish_dir(&dir).unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_session_learns_digits() {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(home.path(), 4).await;
    let mut cfg = SessionConfig::new("fl.softmax.worker@0.1.0");
    cfg.rounds = 10;
    cfg.eval_dataset = Some("digits-test".into());
    cfg.config = json!({"lr": 0.5, "epochs": 1, "batch_size": 32});
    let result = cluster.coordinator().run("s-test", &cfg, &Quiet).await.unwrap();

    assert_eq!(result.reports.len(), 10);
    let acc = result.final_metrics.as_ref().unwrap().accuracy.unwrap();
    assert!(acc >= 0.90, "test accuracy {acc}");
    // Accuracy improves from the first round to the last.
    assert!(result.reports[0].eval_accuracy.unwrap() < acc);
    for r in &result.reports {
        assert_eq!(r.contributed.len(), 4, "round {}: {:?}", r.round, r.failures);
        assert_eq!(r.examples, 1438);
    }
    // The model is the last round's, and decodes.
    assert_eq!(result.model_digest, result.reports[9].model);
    let t = Tensors::decode(&result.model, TensorLimits::default()).unwrap();
    assert_eq!(t.0["w"].shape, vec![10, 64]);
    // Lineage names everything that took part.
    assert_eq!(result.lineage.rounds, 10);
    assert_eq!(result.lineage.nodes, vec!["node-0", "node-1", "node-2", "node-3"]);
    assert_eq!(result.lineage.modules[0].module, "fl.softmax.worker@0.1.0");
    // The session's state is in world state.
    let state = cluster.coordinator().state("s-test").await.unwrap().unwrap();
    assert_eq!(state.completed_rounds, 10);
    assert_eq!(state.model, result.model_digest);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_ratio_picks_fewer_nodes_and_sessions_check_their_nodes() {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(home.path(), 4).await;
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 2;
    cfg.participant_ratio = 0.5;
    let result = cluster.coordinator().run("s-half", &cfg, &Quiet).await.unwrap();
    for r in &result.reports {
        assert_eq!(r.selected.len(), 2);
        assert_eq!(r.contributed, r.selected);
    }
    assert!(result.final_metrics.is_none(), "no eval dataset, no evaluation");

    // A dataset no node holds: refused before anything runs.
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.dataset = "cifar".into();
    let e = cluster.coordinator().run("s-none", &cfg, &Quiet).await.unwrap_err();
    assert!(e.to_string().contains("cifar"), "{e}");
    // An unknown module.
    let e = cluster.coordinator().run("s-none", &SessionConfig::new("no.such.module"), &Quiet).await.unwrap_err();
    assert!(e.to_string().contains("no.such.module"), "{e}");
    cluster.stop().await;
}

/// Registers a node that never answers (its record is there, nobody serves its queue).
async fn register_silent_node(cluster: &Cluster, id: &str) {
    let record = tessera_core::wire::NodeRecord {
        schema: tessera_core::wire::SCHEMA_VERSION,
        id: id.into(),
        datasets: vec!["digits".into()],
        runtimes: vec![tessera_core::RuntimeKind::Wasm],
        resources: Default::default(),
        task_queue: tessera_node::task_queue(id),
    };
    cluster.backend.members.announce(id, bytes::Bytes::from(tessera_core::wire::encode(&record))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_times_out_on_a_silent_node_and_completes_with_the_others() {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(home.path(), 3).await;
    register_silent_node(&cluster, "node-gone").await;
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 2;
    cfg.min_participants = 2;
    cfg.round_timeout_secs = 1.0;
    let result = cluster.coordinator().run("s-timeout", &cfg, &Quiet).await.unwrap();
    for r in &result.reports {
        assert_eq!(r.selected.len(), 4);
        assert_eq!(r.contributed, vec!["node-0", "node-1", "node-2"]);
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].node, "node-gone");
        assert!(r.failures[0].error.contains("no reply"), "{:?}", r.failures);
    }
    assert!(!result.lineage.nodes.contains(&"node-gone".to_string()));

    // With a minimum the answering nodes cannot meet, the round fails and says why.
    cfg.min_participants = 4;
    let e = cluster.coordinator().run("s-timeout2", &cfg, &Quiet).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("round 1") && msg.contains("minimum is 4") && msg.contains("node-gone"), "{msg}");
    cluster.stop().await;
}
