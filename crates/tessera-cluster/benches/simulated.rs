//! A thousand simulated participants per round, on both backends, in one run on a private
//! nats-server.
//!
//! `cargo bench -p tessera-cluster --bench simulated`
//!
//! Four nodes host 250 participants each (`clients_per_node`) and every round asks all
//! 1,000: each trains the softmax worker (WebAssembly) on its ~1.4 rows of the digits
//! training split. Nodes and coordinator share this process; on NATS every task, reply,
//! model and update goes through the server. Reported: the mean wall time of the steady
//! rounds (all but the first, which also fetches and compiles the worker), with where the
//! coordinator's time went.

use std::path::Path;
use std::time::Duration;

use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Quiet, SessionConfig};
use tessera_core::wire::RoundReport;
use tessera_nats::testing::NatsServer;
use tessera_ports::Backend;
use tessera_wasm::WasmLimits;

const ROUNDS: u32 = 6;

async fn per_round(backend: Backend, home: &Path) -> Vec<RoundReport> {
    let data = digits::prepare(&home.join("data"), 4, 0.2, 42).unwrap();
    let cluster = Cluster::start_on(ClusterConfig::digits(home, &data, WasmLimits::default()), backend).await.unwrap();
    let dir = home.join("modules").join("fl.softmax.worker");
    tessera_modules::write_softmax_worker(&dir).unwrap();
    cluster.publish_dir(&dir).unwrap();
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = ROUNDS;
    cfg.clients_per_node = Some(250);
    cfg.min_participants = 1000;
    cfg.round_timeout_secs = 600.0;
    let r = cluster.coordinator().run("sim-1000", &cfg, &Quiet).await.unwrap();
    cluster.stop().await;
    r.reports
}

fn line(name: &str, reports: &[RoundReport]) -> (String, f64) {
    let steady = &reports[1..];
    let n = steady.len() as f64;
    let mean = |f: &dyn Fn(&RoundReport) -> f64| steady.iter().map(f).sum::<f64>() / n * 1e3;
    let round = mean(&|r| r.seconds);
    (
        format!(
            "| {name} | {round:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
            mean(&|r| r.compute_seconds),
            mean(&|r| r.timings.dispatch),
            mean(&|r| r.timings.waiting),
            mean(&|r| r.timings.transfer),
            mean(&|r| r.timings.aggregation),
        ),
        round,
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let memory = per_round(Backend::in_process(Duration::from_secs(30)), &dir.path().join("memory")).await;
        let server = NatsServer::start();
        let nats = tessera_nats::backend(&server.url(), &tessera_nats::NatsOptions::default()).await.unwrap();
        let over_nats = per_round(nats, &dir.path().join("nats")).await;
        for r in memory.iter().chain(&over_nats) {
            assert_eq!(r.contributed.len(), 1000, "{:?}", r.failures.first());
        }
        println!("1,000 participants per round, rounds 2 to {ROUNDS}, means");
        println!("| backend | round | longest task | dispatch | waiting | transfer | aggregation |");
        println!("|---|---|---|---|---|---|---|");
        let (m, mr) = line("in-process", &memory);
        let (n, nr) = line("NATS JetStream", &over_nats);
        println!("{m}\n{n}");
        println!("NATS / in-process: {:.2}x", nr / mr);
    });
}
