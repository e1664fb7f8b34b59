//! Asynchronous against synchronous FL with stragglers, in one run, on the in-process
//! backend and on a private nats-server.
//!
//! `cargo bench -p tessera-cluster --bench fedbuff`
//!
//! Ten digits nodes, two of them 5x slower (every run of theirs takes five times as long:
//! `tessera_cluster::simulate::slowed`). Synchronous FedAvg runs 10 rounds of all ten
//! nodes (100 updates; every round waits for the slow ones); FedBuff with a buffer of 5
//! runs 20 server steps (the same 100 accepted updates) with all ten training at once.
//! Each worker task runs 20 local epochs, so a task is work, not overhead. Reported: wall
//! time of each session from its first task to its last model (the worker's compilation
//! warmed up beforehand), the final accuracy on the held-out split, and the updates the
//! slow nodes gave.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tessera_cluster::simulate::slowed;
use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{FedBuffConfig, Quiet, SessionConfig, SessionResult};
use tessera_nats::testing::NatsServer;
use tessera_ports::Backend;
use tessera_wasm::WasmLimits;

struct Run {
    seconds: f64,
    accuracy: f64,
    from_slow: usize,
    updates: usize,
}

fn summary(r: &SessionResult, seconds: f64) -> Run {
    let contributed = r.reports.iter().flat_map(|x| &x.contributed);
    Run {
        seconds,
        accuracy: r.final_metrics.as_ref().and_then(|m| m.accuracy).unwrap_or(0.0),
        from_slow: contributed.clone().filter(|p| *p == "node-8" || *p == "node-9").count(),
        updates: contributed.count(),
    }
}

async fn both(backend: Backend, home: &Path) -> (Run, Run) {
    let data = digits::prepare(&home.join("data"), 10, 0.2, 42).unwrap();
    let mut config = ClusterConfig::digits(home, &data, WasmLimits::default());
    config.nodes[8].wasm_wrapper = Some(slowed::<5>);
    config.nodes[9].wasm_wrapper = Some(slowed::<5>);
    let cluster = Cluster::start_on(config, backend).await.unwrap();
    let dir = home.join("modules").join("fl.softmax.worker");
    tessera_modules::write_softmax_worker(&dir).unwrap();
    cluster.publish_dir(&dir).unwrap();
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.eval_dataset = Some("digits-test".into());
    cfg.config = json!({"lr": 0.1, "epochs": 20, "batch_size": 16});
    cfg.round_timeout_secs = 600.0;
    // Warm-up: every node fetches and compiles the worker.
    cfg.rounds = 1;
    cluster.coordinator().run("warm-up", &cfg, &Quiet).await.unwrap();

    cfg.rounds = 10;
    let t = Instant::now();
    let sync = cluster.coordinator().run("fedavg", &cfg, &Quiet).await.unwrap();
    let sync = summary(&sync, t.elapsed().as_secs_f64());

    cfg.rounds = 20;
    cfg.fedbuff = Some(FedBuffConfig { buffer_size: 5, ..FedBuffConfig::default() });
    let t = Instant::now();
    let fedbuff = cluster.coordinator().run("fedbuff", &cfg, &Quiet).await.unwrap();
    let fedbuff = summary(&fedbuff, t.elapsed().as_secs_f64());
    cluster.stop().await;
    (sync, fedbuff)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let memory = both(Backend::in_process(Duration::from_secs(30)), &dir.path().join("memory")).await;
        let server = NatsServer::start();
        let nats = tessera_nats::backend(&server.url(), &tessera_nats::NatsOptions::default()).await.unwrap();
        let over_nats = both(nats, &dir.path().join("nats")).await;
        println!("10 digits nodes, 2 of them 5x slower; 100 accepted updates each");
        println!("| backend | mode | wall time | accuracy | updates from the slow nodes |");
        println!("|---|---|---|---|---|");
        for (backend, (sync, fedbuff)) in [("in-process", &memory), ("NATS JetStream", &over_nats)] {
            for (mode, r) in [("FedAvg, 10 rounds", sync), ("FedBuff K=5, 20 steps", fedbuff)] {
                assert_eq!(r.updates, 100, "{mode} on {backend}");
                println!("| {backend} | {mode} | {:.2} s | {:.3} | {} |", r.seconds, r.accuracy, r.from_slow);
            }
            println!("| {backend} | FedAvg / FedBuff | {:.2}x | | |", sync.seconds / fedbuff.seconds);
        }
    });
}
