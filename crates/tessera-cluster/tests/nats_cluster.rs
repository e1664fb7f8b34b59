//! A federated session and a swarm on a three-server JetStream cluster whose streams keep
//! three replicas: one server is killed mid-round and started again later, and each run
//! finishes with every round counted once and the result it gives without the fault.
//!
//! The swarm runs user-written Python tasks: `scripts/test` makes a Python with numpy and
//! exports `TESSERA_PYTHON`.

mod common;

use std::time::Duration;

use serde_json::json;
use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Observer, Quiet, SessionConfig, StageReport};
use tessera_core::wire::RoundReport;
use tessera_nats::testing::NatsCluster;
use tessera_ports::Backend;
use tessera_wasm::WasmLimits;

use common::counting::{counting_spec, global_json, rows_of};

const ROUNDS: u32 = 12;

async fn cluster(home: &std::path::Path, backend: Backend) -> Cluster {
    let prepared = digits::prepare(&home.join("data"), 4, 0.2, 42).unwrap();
    let limits = WasmLimits { max_time: Duration::from_secs(60), ..WasmLimits::default() };
    let cluster = Cluster::start_on(ClusterConfig::digits(home, &prepared, limits), backend).await.unwrap();
    let dir = home.join("modules").join("fl.softmax.worker");
    tessera_modules::write_softmax_worker(&dir).unwrap();
    cluster.publish_dir(&dir).unwrap();
    cluster
}

fn session() -> SessionConfig {
    let mut cfg = SessionConfig::new("fl.softmax.worker@0.1.2");
    cfg.rounds = ROUNDS;
    cfg.eval_dataset = Some("digits-test".into());
    cfg.config = json!({"lr": 0.5, "epochs": 1, "batch_size": 32});
    cfg
}

/// Tells the test when rounds start and finish.
struct Rounds(tokio::sync::mpsc::UnboundedSender<(bool, u32)>);

impl Observer for Rounds {
    fn round_started(&self, round: u32, _selected: &[String]) {
        let _ = self.0.send((false, round));
    }
    fn round_finished(&self, report: &RoundReport) {
        let _ = self.0.send((true, report.round));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_losing_one_of_three_servers() {
    // Without the fault, in one process: the model the session must give.
    let home = tempfile::tempdir().unwrap();
    let reference = cluster(&home.path().join("memory"), Backend::in_process(Duration::from_secs(30))).await;
    let expected = reference.coordinator().run("s-cluster", &session(), &Quiet).await.unwrap();
    reference.stop().await;

    let mut servers = NatsCluster::start(3);
    let options = tessera_nats::NatsOptions { replicas: Some(3), ..Default::default() };
    let backend = tessera_nats::backend(&servers.urls(), &options).await.unwrap();
    let cluster = cluster(&home.path().join("nats"), backend).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let coordinator = cluster.coordinator();
    let run = tokio::spawn(async move { coordinator.run("s-cluster", &session(), &Rounds(tx)).await });
    // Killed while round 4's tasks are out, started again once round 8 is done.
    let (mut killed, mut restarted) = (false, false);
    while let Some((finished, round)) = rx.recv().await {
        if !finished && round == 4 && !killed {
            servers.server(1).stop();
            killed = true;
        }
        if finished && round == 8 && !restarted {
            servers.server(1).restart();
            restarted = true;
        }
    }
    let result = match run.await.unwrap() {
        Ok(r) => r,
        Err(e) => panic!("the session failed: {e}\n{}", servers.logs()),
    };
    assert!(killed && restarted);
    assert_eq!(result.reports.len(), ROUNDS as usize);
    for (i, r) in result.reports.iter().enumerate() {
        assert_eq!(r.round, i as u32 + 1, "each round once, in order");
        assert_eq!(r.contributed.len(), 4, "round {}: {:?}", r.round, r.failures);
        assert_eq!(r.examples, 1438);
    }
    assert_eq!(result.model_digest, expected.model_digest, "the same model as without the fault");
    let state = cluster.coordinator().state("s-cluster").await.unwrap().unwrap();
    assert_eq!(state.completed_rounds, ROUNDS);
    cluster.stop().await;
}

/// Tells the test when a swarm's stages finish: (iteration, task).
struct Stages(tokio::sync::mpsc::UnboundedSender<(u32, String)>);

impl Observer for Stages {
    fn stage_finished(&self, iteration: u32, stage: &StageReport) {
        let _ = self.0.send((iteration, stage.task.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_outlives_losing_one_of_three_servers() {
    const ITERATIONS: u32 = 6;
    let home = tempfile::tempdir().unwrap();
    let mut servers = NatsCluster::start(3);
    let options = tessera_nats::NatsOptions { replicas: Some(3), ..Default::default() };
    let backend = tessera_nats::backend(&servers.urls(), &options).await.unwrap();
    let data = digits::prepare(&home.path().join("data"), 4, 0.2, 42).unwrap();
    let mut config = ClusterConfig::digits(home.path(), &data, WasmLimits::default());
    config.python = Some(common::python());
    let cluster = Cluster::start_on(config, backend).await.unwrap();
    let spec = counting_spec(&cluster, home.path(), ITERATIONS);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c = cluster.coordinator();
    let run = tokio::spawn(async move { c.run_swarm("swarm-cluster", &spec, &Stages(tx)).await });
    // Killed once iteration 3 has counted, as its `total` task goes out; started again
    // once iteration 4 is done.
    let (mut killed, mut restarted) = (false, false);
    while let Some((iteration, task)) = rx.recv().await {
        if iteration == 3 && task == "count" && !killed {
            servers.server(1).stop();
            killed = true;
        }
        if iteration == 4 && task == "total" && !restarted {
            servers.server(1).restart();
            restarted = true;
        }
    }
    let result = match run.await.unwrap() {
        Ok(r) => r,
        Err(e) => panic!("the swarm failed: {e}\n{}", servers.logs()),
    };
    assert!(killed && restarted);
    let iterations: Vec<u32> = result.reports.iter().map(|r| r.iteration).collect();
    assert_eq!(iterations, (1..=ITERATIONS).collect::<Vec<_>>(), "each iteration once, in order");
    let all = ["node-0", "node-1", "node-2", "node-3"];
    let counted: Vec<Vec<String>> = serde_json::from_value(global_json(&result, "counted")).unwrap();
    assert_eq!(counted, vec![all.to_vec(); ITERATIONS as usize], "every node counted once an iteration");
    let total = u64::from(ITERATIONS) * rows_of(&[0, 1, 2, 3]);
    assert_eq!(global_json(&result, "total"), json!(total), "the total it gives without the fault");
    cluster.stop().await;
}
