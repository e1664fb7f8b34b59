//! Per-iteration cost of a user-written three-stage swarm against the built-in federated
//! session on the same job, on both backends, in one run on a private nats-server.
//!
//! `cargo bench -p tessera-cluster --bench swarm` (needs `TESSERA_PYTHON` with numpy;
//! `scripts/test` makes one in target/venv)
//!
//! The job: softmax regression on the digits data set, four nodes, FedAvg, one local epoch,
//! with Python numpy workers in both. The built-in session runs `examples/fl-python-worker`
//! and aggregates in the coordinator; the swarm runs `examples/swarms/manta-fl` (worker,
//! aggregator and scheduler are Python modules talking through world state), its target
//! accuracy set out of reach so both run every iteration. Neither evaluates centrally.
//! Reported: the mean wall time of the steady iterations (all but the first, which also
//! fetches the packages), and for the swarm each stage's share.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Quiet, SessionConfig};
use tessera_nats::testing::NatsServer;
use tessera_ports::Backend;
use tessera_swarm::SwarmSpec;
use tessera_wasm::WasmLimits;

const ITERATIONS: u32 = 11;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    PathBuf::from(std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into()))
}

async fn cluster(backend: Backend, home: &Path) -> Cluster {
    let data = digits::prepare(&home.join("data"), 4, 0.2, 42).unwrap();
    let mut config = ClusterConfig::digits(home, &data, WasmLimits::default());
    config.python = Some(python());
    Cluster::start_on(config, backend).await.unwrap()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// (session ms per round, swarm ms per iteration, swarm ms per stage by task)
async fn measure(backend: Backend, home: &Path) -> (f64, f64, Vec<(String, f64)>) {
    let cluster = cluster(backend, home).await;
    let worker = cluster.publish_dir(&repo().join("examples/fl-python-worker")).unwrap();
    let mut cfg = SessionConfig::new(format!("{}@{}", worker.name, worker.version));
    cfg.rounds = ITERATIONS;
    cfg.min_participants = 4;
    cfg.seed = 42;
    let session = cluster.coordinator().run("bench-fl", &cfg, &Quiet).await.unwrap();
    let per_round = mean(&session.reports[1..].iter().map(|r| r.seconds).collect::<Vec<_>>());

    let dir = repo().join("examples/swarms/manta-fl");
    let out = std::process::Command::new(python())
        .args(["-m", "tessera.swarm"])
        .arg(dir.join("swarm.py"))
        .env("PYTHONPATH", repo().join("sdk/python"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut spec = SwarmSpec::from_yaml(std::str::from_utf8(&out.stdout).unwrap()).unwrap();
    for task in spec.tasks.values_mut() {
        if let Some(p) = task.local_path() {
            task.module = cluster.publish_dir(Path::new(p)).unwrap().digest.to_string();
        }
    }
    spec.iterations = ITERATIONS;
    spec.globals.insert("target_accuracy".into(), serde_json::json!(2.0));
    let swarm = cluster.coordinator().run_swarm("bench-swarm", &spec, &Quiet).await.unwrap();
    let steady = &swarm.reports[1..];
    let per_iteration = mean(&steady.iter().map(|r| r.seconds).collect::<Vec<_>>());
    let stages = spec
        .stages()
        .into_iter()
        .map(|t| {
            let s: Vec<f64> =
                steady.iter().flat_map(|r| r.stages.iter().filter(|s| s.task == t).map(|s| s.seconds)).collect();
            (t, mean(&s) * 1e3)
        })
        .collect();
    cluster.stop().await;
    (per_round * 1e3, per_iteration * 1e3, stages)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let server = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let memory = measure(Backend::in_process(Duration::from_secs(30)), &dir.path().join("memory")).await;
        let nats = tessera_nats::backend(&server.url(), &tessera_nats::NatsOptions::default()).await.unwrap();
        let nats = measure(nats, &dir.path().join("nats")).await;

        println!("digits, 4 nodes, Python numpy workers, FedAvg; mean of iterations 2..{ITERATIONS}");
        println!("| ms per iteration | in-process | NATS JetStream |");
        println!("|---|---|---|");
        println!(
            "| built-in federated session (1 stage + aggregation in the coordinator) | {:.0} | {:.0} |",
            memory.0, nats.0
        );
        println!("| user-written swarm (worker -> aggregator -> scheduler) | {:.0} | {:.0} |", memory.1, nats.1);
        for ((task, m), (_, n)) in memory.2.iter().zip(&nats.2) {
            println!("| - of which the {task} stage | {m:.0} | {n:.0} |");
        }
        println!("| swarm overhead over the session | {:.0} | {:.0} |", memory.1 - memory.0, nats.1 - nats.0);
    });
}
