//! Federated sessions end to end, in one process, on both backends: real hub, real
//! packages, real WebAssembly worker, real digits data; the in-process backend and a real
//! nats-server.

use std::time::Duration;

use serde_json::json;
use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Quiet, SessionConfig};
use tessera_core::tensor::{TensorLimits, Tensors};
use tessera_nats::testing::NatsServer;
use tessera_ports::Backend;
use tessera_wasm::WasmLimits;

/// Which backend a test runs on.
enum On {
    Memory,
    Nats(NatsServer),
}

async fn cluster(on: &On, home: &std::path::Path, nodes: usize) -> Cluster {
    let backend = match on {
        On::Memory => Backend::in_process(Duration::from_secs(30)),
        On::Nats(server) => tessera_nats::backend(&server.url(), &tessera_nats::NatsOptions::default()).await.unwrap(),
    };
    let prepared = digits::prepare(&home.join("data"), nodes, 0.2, 42).unwrap();
    let limits = WasmLimits { max_time: Duration::from_secs(60), ..WasmLimits::default() };
    let cluster = Cluster::start_on(ClusterConfig::digits(home, &prepared, limits), backend).await.unwrap();
    let dir = home.join("modules").join("fl.softmax.worker");
    tessera_modules::write_softmax_worker(&dir).unwrap();
    cluster.publish_dir(&dir).unwrap();
    cluster
}

/// Runs a test body once on each backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_process() {
                super::$name(super::On::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nats() {
                super::$name(super::On::Nats(tessera_nats::testing::NatsServer::start())).await
            }
        }
    )*};
}

on_both_backends!(
    a_short_session_learns_digits,
    a_partial_ratio_picks_fewer_nodes_and_sessions_check_their_nodes,
    a_round_times_out_on_a_silent_node_and_completes_with_the_others,
    a_session_whose_coordinator_stopped_resumes_from_its_last_round,
    a_round_waits_for_a_node_whose_announcement_lapsed,
    a_stop_request_ends_a_round_waiting_for_nodes,
    a_stopped_session_records_the_round_whose_evaluation_ran_beside,
    a_long_session_saves_each_report_once,
    a_failing_evaluation_or_round_leaves_the_rounds_before_it_recorded,
    finished_rounds_leave_their_updates_and_records_behind_only_when_asked,
);

async fn a_short_session_learns_digits(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&on, home.path(), 4).await;
    let mut cfg = SessionConfig::new("fl.softmax.worker@0.1.2");
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
        // Where the time went: each part measured, the nodes' work inside the wait, and
        // the parts within the round.
        let t = &r.timings;
        assert!(t.dispatch > 0.0 && t.transfer > 0.0 && t.aggregation > 0.0, "{t:?}");
        // A node starts once its task is being placed and answers before the wait ends.
        assert!(t.dispatch + t.waiting >= r.compute_seconds, "{t:?} against {} s of work", r.compute_seconds);
        assert!(t.dispatch + t.waiting + t.transfer + t.aggregation + r.eval_seconds <= r.seconds, "{t:?} in {r:?}");
        // Every round is recorded with its evaluation; each but the last was evaluated
        // beside the next round, outside its own time, and the last within it.
        assert!(r.eval_examples.is_some_and(|n| n > 0) && r.eval_loss.is_some(), "round {}", r.round);
        let last = r.round == 10;
        assert_eq!(t.evaluation_beside > 0.0, !last, "round {}: {t:?}", r.round);
        assert_eq!(r.eval_seconds > 0.0, last, "round {}: {} s", r.round, r.eval_seconds);
    }
    // The model is the last round's, and decodes.
    assert_eq!(result.model_digest, result.reports[9].model);
    let t = Tensors::decode(&result.model, TensorLimits::default()).unwrap();
    assert_eq!(t.0["w"].shape, vec![10, 64]);
    // Lineage names everything that took part.
    assert_eq!(result.lineage.rounds, 10);
    assert_eq!(result.lineage.nodes, vec!["node-0", "node-1", "node-2", "node-3"]);
    assert_eq!(result.lineage.modules[0].module, "fl.softmax.worker@0.1.2");
    // The session's state is in world state.
    let state = cluster.coordinator().state("s-test").await.unwrap().unwrap();
    assert_eq!(state.completed_rounds, 10);
    assert_eq!(state.model, result.model_digest);
    cluster.stop().await;
}

async fn a_partial_ratio_picks_fewer_nodes_and_sessions_check_their_nodes(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&on, home.path(), 4).await;
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

async fn a_round_times_out_on_a_silent_node_and_completes_with_the_others(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&on, home.path(), 3).await;
    cluster.announce_silent_node("node-gone", "digits").await.unwrap();
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 2;
    cfg.min_participants = 2;
    // Long enough for a loaded 2-core machine to train (the first round also fetches and
    // compiles the module); the silent node never answers whatever the bound.
    cfg.round_timeout_secs = 8.0;
    let result = cluster.coordinator().run("s-timeout", &cfg, &Quiet).await.unwrap();
    for r in &result.reports {
        assert_eq!(r.selected.len(), 4);
        assert_eq!(r.contributed, vec!["node-0", "node-1", "node-2"]);
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].node, "node-gone");
        // Silent past the round's bound, or (in a later round, once its announcement's
        // time-to-live ran out) gone: either way the round closed without it.
        let why = &r.failures[0].error;
        assert!(why.contains("no reply") || why.contains("the node left"), "{:?}", r.failures);
    }
    assert!(!result.lineage.nodes.contains(&"node-gone".to_string()));

    // With a minimum the answering nodes cannot meet, the round fails and says why (the
    // silent node announced again: its first announcement may have lapsed by now).
    cluster.announce_silent_node("node-gone", "digits").await.unwrap();
    cfg.min_participants = 4;
    let e = cluster.coordinator().run("s-timeout2", &cfg, &Quiet).await.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("round 1") && msg.contains("minimum is 4") && msg.contains("node-gone"), "{msg}");
    cluster.stop().await;
}

/// Tells a channel when a round finishes.
struct Rounds(tokio::sync::mpsc::UnboundedSender<u32>);
impl tessera_coordinator::Observer for Rounds {
    fn round_finished(&self, r: &tessera_core::wire::RoundReport) {
        let _ = self.0.send(r.round);
    }
}

async fn a_session_whose_coordinator_stopped_resumes_from_its_last_round(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = std::sync::Arc::new(cluster(&on, home.path(), 3).await);
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 5;
    cfg.eval_dataset = Some("digits-test".into());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c = cluster.clone();
    let cfg2 = cfg.clone();
    let run = tokio::spawn(async move { c.coordinator().run("s-resume", &cfg2, &Rounds(tx)).await });
    // Stop the coordinator once round 2 is done.
    while rx.recv().await != Some(2) {}
    run.abort();
    let _ = run.await;
    let state = cluster.coordinator().state("s-resume").await.unwrap().unwrap();
    assert!((2..5).contains(&state.completed_rounds), "{}", state.completed_rounds);

    // The same id cannot start again; resume finishes it.
    assert!(cluster.coordinator().run("s-resume", &cfg, &Quiet).await.is_err());
    let result = cluster.coordinator().resume("s-resume", &Quiet).await.unwrap();
    let rounds: Vec<u32> = result.reports.iter().map(|r| r.round).collect();
    assert_eq!(rounds, vec![1, 2, 3, 4, 5], "no round lost or repeated");
    assert!(result.final_metrics.unwrap().accuracy.unwrap() > 0.85);
    // Resuming a finished session runs nothing and gives the same model.
    let again = cluster.coordinator().resume("s-resume", &Quiet).await.unwrap();
    assert_eq!(again.model_digest, result.model_digest);
    assert!(matches!(
        cluster.coordinator().resume("s-nothing", &Quiet).await,
        Err(tessera_coordinator::SessionError::Unknown(_))
    ));
}

/// A session whose updates are summed as they stream in from the blob store (as a large
/// model's are) gives every round the bits of one whose updates are held whole, and a
/// streamed session stopped after its first round and resumed ends with the same model.
/// Order-statistic strategies reading a large model's updates a window at a time give the
/// bits of the same strategies holding them.
async fn streamed_rounds_give_the_bits_of_held_ones_and_resume(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = std::sync::Arc::new(cluster(&on, home.path(), 3).await);
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 3;
    cfg.eval_dataset = Some("digits-test".into());
    cfg.config = json!({"lr": 0.5});
    let held = cluster.coordinator().run("s-held", &cfg, &Quiet).await.unwrap();
    let streamed = cluster.coordinator().with_streaming_from(0).run("s-streamed", &cfg, &Quiet).await.unwrap();
    let digests = |r: &tessera_coordinator::SessionResult| r.reports.iter().map(|r| r.model).collect::<Vec<_>>();
    assert_eq!(digests(&streamed), digests(&held));
    for (s, h) in streamed.reports.iter().zip(&held.reports) {
        assert_eq!((&s.contributed, s.examples, s.eval_accuracy), (&h.contributed, h.examples, h.eval_accuracy));
    }

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (c, cfg2) = (cluster.clone(), cfg.clone());
    let run =
        tokio::spawn(async move { c.coordinator().with_streaming_from(0).run("s-cut", &cfg2, &Rounds(tx)).await });
    while rx.recv().await != Some(1) {}
    run.abort();
    let _ = run.await;
    let resumed = cluster.coordinator().with_streaming_from(0).resume("s-cut", &Quiet).await.unwrap();
    assert_eq!(
        resumed.model_digest, held.model_digest,
        "a resumed streamed session ends where an uninterrupted one does"
    );

    // Order-statistic strategies read a large model's updates a window at a time where
    // they are stored (over NATS, from a local copy of each): the same bits again.
    cfg.rounds = 2;
    for (i, strategy) in [
        json!("fedmedian"),
        json!({"name": "fedtrimmedavg", "beta": 0.34}),
        json!({"name": "krum", "num_clients_to_keep": 2}),
        json!("bulyan"),
    ]
    .into_iter()
    .enumerate()
    {
        cfg.strategy = serde_json::from_value(strategy.clone()).unwrap();
        let held = cluster.coordinator().run(&format!("s-held-{i}"), &cfg, &Quiet).await.unwrap();
        let windowed =
            cluster.coordinator().with_streaming_from(0).run(&format!("s-windowed-{i}"), &cfg, &Quiet).await.unwrap();
        assert_eq!(digests(&windowed), digests(&held), "{strategy}");
        assert_eq!(windowed.reports[1].contributed.len(), 3, "{strategy}");
        assert_ne!(windowed.reports[0].model, windowed.reports[1].model, "{strategy}: the model moves");
    }
}

on_both_backends!(streamed_rounds_give_the_bits_of_held_ones_and_resume);

/// Withdraws a node's announcement when round 1 finishes, before round 2 picks its nodes
/// (the observer runs on the coordinator's task).
struct LapseAfterRound1 {
    backend: tessera_ports::Backend,
    node: &'static str,
    rounds: tokio::sync::mpsc::UnboundedSender<u32>,
}
impl tessera_coordinator::Observer for LapseAfterRound1 {
    fn round_finished(&self, r: &tessera_core::wire::RoundReport) {
        if r.round == 1 {
            let members = self.backend.members.clone();
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(members.withdraw(self.node)).unwrap();
            });
        }
        let _ = self.rounds.send(r.round);
    }
}

/// A node whose announcement lapses between rounds (a restart, a heartbeat late under
/// load) is waited for, as Flower's `ClientManager.wait_for` does, instead of the round
/// failing for want of `min_available` nodes.
async fn a_round_waits_for_a_node_whose_announcement_lapsed(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = std::sync::Arc::new(cluster(&on, home.path(), 3).await);
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 3;
    cfg.min_participants = 3;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let observer = LapseAfterRound1 { backend: cluster.backend.clone(), node: "node-2", rounds: tx };
    let c = cluster.clone();
    let run = tokio::spawn(async move { c.coordinator().run("s-lapse", &cfg, &observer).await });
    while rx.recv().await != Some(1) {}
    // Round 2 now finds two nodes; node-2 comes back a moment later.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!run.is_finished(), "round 2 did not wait: {:?}", run.await.unwrap().map(|r| r.reports.len()));
    cluster.nodes[2].register().await.unwrap();
    let result = run.await.unwrap().unwrap();
    assert_eq!(result.reports.len(), 3);
    for r in &result.reports {
        assert_eq!(r.contributed, vec!["node-0", "node-1", "node-2"], "round {}", r.round);
    }
}

/// A round waiting for a node that never comes back ends on a stop request, not after its
/// (long) time-out.
async fn a_stop_request_ends_a_round_waiting_for_nodes(on: On) {
    let home = tempfile::tempdir().unwrap();
    let mut cluster = cluster(&on, home.path(), 3).await;
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 3;
    cfg.min_participants = 3;
    cfg.round_timeout_secs = 600.0;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let observer = LapseAfterRound1 { backend: cluster.backend.clone(), node: "node-2", rounds: tx };
    let c = cluster.coordinator();
    let run = tokio::spawn(async move { c.run("s-lapse-stop", &cfg, &observer).await });
    while rx.recv().await != Some(1) {}
    // node-2 is gone for good: no heartbeat, no announcement.
    assert!(cluster.kill_node("node-2"));
    cluster.backend.members.withdraw("node-2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!run.is_finished(), "round 2 did not wait");
    cluster.coordinator().request_stop("s-lapse-stop").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the wait ignored the stop request");
    // A stopped run ends cleanly with the rounds it completed.
    let result = ended.unwrap().unwrap();
    assert_eq!(result.reports.len(), 1);
}

/// Asks for its run to stop once round 2 is recorded.
struct StopAfterRound2(tessera_coordinator::Coordinator);
impl tessera_coordinator::Observer for StopAfterRound2 {
    fn round_finished(&self, r: &tessera_core::wire::RoundReport) {
        if r.round == 2 {
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(self.0.request_stop("s-stop-beside")).unwrap();
            });
        }
    }
}

/// Round 2 is recorded once its evaluation, run beside round 3, is done, and so after
/// round 3 trained: a stop asked for then ends the session before round 4 with round 3
/// recorded too, evaluation and all, and the saved state names round 3's model.
async fn a_stopped_session_records_the_round_whose_evaluation_ran_beside(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&on, home.path(), 3).await;
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 6;
    cfg.eval_dataset = Some("digits-test".into());
    let result =
        cluster.coordinator().run("s-stop-beside", &cfg, &StopAfterRound2(cluster.coordinator())).await.unwrap();
    assert_eq!(result.ending, tessera_coordinator::Ending::Stopped);
    let rounds: Vec<u32> = result.reports.iter().map(|r| r.round).collect();
    assert_eq!(rounds, vec![1, 2, 3]);
    assert!(result.reports.iter().all(|r| r.eval_accuracy.is_some()), "{:?}", result.reports);
    // Round 3 had nothing to run beside: its evaluation is within its time.
    assert_eq!(result.reports[2].timings.evaluation_beside, 0.0);
    assert!(result.reports[2].eval_seconds > 0.0);
    let state = cluster.coordinator().state("s-stop-beside").await.unwrap().unwrap();
    assert_eq!(state.completed_rounds, 3);
    assert_eq!(state.model, result.reports[2].model);
    assert_eq!(result.model_digest, result.reports[2].model);
}

/// A round's save writes the reports not yet in a block, not every report again: the
/// stored state of a session past one block of rounds holds only the rounds after it, and
/// reading it back (status, resume) gives every report.
async fn a_long_session_saves_each_report_once(on: On) {
    use tessera_coordinator::REPORT_BLOCK;
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&on, home.path(), 2).await;
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    let rounds = 2 * REPORT_BLOCK + 3;
    cfg.rounds = rounds as u32;
    cfg.eval_dataset = Some("digits-test".into());
    let result = cluster.coordinator().run("s-long", &cfg, &Quiet).await.unwrap();
    assert_eq!(result.reports.len(), rounds);
    let stored = cluster.backend.world.get(&tessera_coordinator::state_key("s-long")).await.unwrap().unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&stored.value).unwrap();
    let inline: Vec<u64> = stored["reports"].as_array().unwrap().iter().map(|r| r["round"].as_u64().unwrap()).collect();
    assert_eq!(inline, (2 * REPORT_BLOCK as u64 + 1..=rounds as u64).collect::<Vec<_>>());
    assert_eq!(stored["report_blocks"].as_array().unwrap().len(), 2);

    let state = cluster.coordinator().state("s-long").await.unwrap().unwrap();
    assert_eq!(state.reports, result.reports);
    let again = cluster.coordinator().resume("s-long", &Quiet).await.unwrap();
    assert_eq!(again.reports, result.reports);
    assert_eq!(again.model_digest, result.model_digest);

    // Listing shows the last round's accuracy from the state's own reports...
    let last_accuracy = |round: usize| result.reports[round - 1].eval_accuracy;
    let listed = |summaries: Vec<tessera_coordinator::RunSummary>| {
        summaries.into_iter().find(|s| s.id == "s-long").map(|s| (s.done, s.test_accuracy))
    };
    let summaries = cluster.coordinator().summaries().await.unwrap();
    assert_eq!(listed(summaries), Some((rounds as u32, last_accuracy(rounds))));

    // A stored state whose blocks do not add up to its rounds, or hold them out of order,
    // is refused with what is wrong, not read as a shorter or shuffled history.
    let key = tessera_coordinator::state_key("s-long");
    let tampered = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = stored.clone();
        f(&mut v);
        bytes::Bytes::from(serde_json::to_vec(&v).unwrap())
    };
    let world = &cluster.backend.world;
    let extra = tessera_core::Digest::of(b"not a block").to_string();
    world
        .put(&key, tampered(&|v| v["report_blocks"].as_array_mut().unwrap().push(extra.clone().into())))
        .await
        .unwrap();
    let e = cluster.coordinator().state("s-long").await.unwrap_err().to_string();
    assert!(e.contains("3 blocks and 3 more reports for 67 rounds"), "{e}");
    world.put(&key, tampered(&|v| v["report_blocks"].as_array_mut().unwrap().reverse())).await.unwrap();
    let e = cluster.coordinator().state("s-long").await.unwrap_err().to_string();
    assert!(e.contains("report 1 is of round 33"), "{e}");

    // ...and from its last block alone when every report is in a block: a state of 64
    // rounds whose first block is gone still lists (its status refuses it).
    let blocks_only = tampered(&|v| {
        v["completed_rounds"] = (2 * REPORT_BLOCK).into();
        v["reports"] = json!([]);
        v["report_blocks"][0] = extra.clone().into();
    });
    world.put(&key, blocks_only).await.unwrap();
    let e = cluster.coordinator().state("s-long").await.unwrap_err().to_string();
    assert!(e.contains("is missing"), "{e}");
    let summaries = cluster.coordinator().summaries().await.unwrap();
    assert!(last_accuracy(2 * REPORT_BLOCK).is_some());
    assert_eq!(listed(summaries), Some((2 * REPORT_BLOCK as u32, last_accuracy(2 * REPORT_BLOCK))));

    // A last block that holds other rounds (the blocks swapped) lists no accuracy rather
    // than another round's; a last block that cannot be read lists the run without one.
    let swapped = tampered(&|v| {
        v["completed_rounds"] = (2 * REPORT_BLOCK).into();
        v["reports"] = json!([]);
        v["report_blocks"].as_array_mut().unwrap().reverse();
    });
    world.put(&key, swapped).await.unwrap();
    let summaries = cluster.coordinator().summaries().await.unwrap();
    assert_eq!(listed(summaries), Some((2 * REPORT_BLOCK as u32, None)));
    let unreadable = tampered(&|v| {
        v["completed_rounds"] = (2 * REPORT_BLOCK).into();
        v["reports"] = json!([]);
        v["report_blocks"][1] = extra.clone().into();
    });
    world.put(&key, unreadable).await.unwrap();
    let summaries = cluster.coordinator().summaries().await.unwrap();
    assert_eq!(listed(summaries), Some((2 * REPORT_BLOCK as u32, None)));
}

/// A round's evaluation runs beside the next round's training: when it fails, the session
/// ends with the rounds before it recorded (not that round); when the next round fails
/// instead, the round whose evaluation ran beside it is recorded first.
/// Publishes the test module as `fl.generated`, the federated worker of a generated model
/// (see `modules/test-programs`).
fn publish_generated(cluster: &Cluster, home: &std::path::Path) {
    let dir = home.join("modules").join("generated");
    let manifest = "name: fl.generated\nversion: 0.1.0\nkind: task\nruntime: wasm\nentry: module.wasm\n";
    tessera_modules::write_module_dir(&dir, manifest, tessera_modules::TEST_PROGRAMS_WASM).unwrap();
    cluster.publish_dir(&dir).unwrap();
}

async fn a_failing_evaluation_or_round_leaves_the_rounds_before_it_recorded(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&on, home.path(), 2).await;
    publish_generated(&cluster, home.path());
    let session = |config: serde_json::Value| {
        let mut cfg = SessionConfig::new("fl.generated");
        cfg.rounds = 5;
        cfg.eval_dataset = Some("digits-test".into());
        cfg.config = config;
        cfg
    };
    // The models' first values, from a session that fails nowhere (and keeps them).
    let mut cfg = session(json!({"params": 4}));
    cfg.retain_updates = true;
    let reference = cluster.coordinator().run("s-reference", &cfg, &Quiet).await.unwrap();
    let mut first = Vec::new();
    for r in &reference.reports {
        let bytes = cluster.backend.blobs.get(&r.model).await.unwrap().unwrap();
        first.push(Tensors::decode(&bytes, TensorLimits::default()).unwrap().0["p"].data[0]);
    }
    assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");
    // A training task's id names the model it starts from: a round run again from another
    // model (after a resume) is never answered from these records.
    let done = cluster.backend.world.keys("done/").await.unwrap();
    for pair in reference.reports.windows(2) {
        let tag = format!("s-reference.r{}.m{}.", pair[1].round, &pair[0].model.hex()[..16]);
        assert_eq!(done.iter().filter(|k| k.contains(&tag)).count(), 2, "{tag} in {done:?}");
    }
    let between_2_and_3 = (first[1] + first[2]) / 2.0;

    // Round 3's model fails its evaluation, which ran beside round 4: rounds 1 and 2 are
    // recorded. Round 4 trains from round 3's model and fails: round 3, evaluated beside
    // it, is recorded.
    for (id, knob, recorded) in [("s-eval-fails", "evaluate", 2usize), ("s-round-fails", "train", 3)] {
        let config = json!({"params": 4, format!("{knob}_fails_above"): between_2_and_3});
        let failed = cluster.coordinator().run(id, &session(config), &Quiet).await.unwrap_err().to_string();
        assert!(failed.contains(&format!("{knob}: the model's first value")), "{id}: {failed}");
        let state = cluster.coordinator().state(id).await.unwrap().unwrap();
        assert_eq!(state.completed_rounds as usize, recorded, "{id}");
        assert_eq!(state.model, reference.reports[recorded - 1].model, "{id}");
        assert!(state.reports.iter().all(|r| r.eval_loss.is_some()), "{id}");
    }
}

async fn bad_replies_never_stop_a_session(on: On) {
    use bytes::Bytes;
    use tessera_core::wire::{self, SCHEMA_VERSION, TaskOutcome, TaskReply};
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&on, home.path(), 2).await;
    let id = "s-hostile";
    let queue = tessera_coordinator::reply_queue(id);
    let bus = &cluster.backend.bus;
    let forged = |session: &str, round: u32, node: &str| TaskReply {
        schema: SCHEMA_VERSION,
        task_id: format!("{session}.r{round}.{node}"),
        session: session.into(),
        round,
        node: node.into(),
        outcome: TaskOutcome::Failed { error: "forged".into() },
        auth: None,
    };
    bus.put(&queue, Bytes::from_static(b"\x00\x01 not json")).await.unwrap();
    bus.put(&queue, Bytes::from_static(b"{\"schema\": 7, \"task_id\": \"x\"}")).await.unwrap();
    // For another session, and for this session from a node that was not asked.
    bus.put(&queue, Bytes::from(wire::encode(&forged("s-other", 1, "node-0")))).await.unwrap();
    let mut liar = forged(id, 1, "node-0");
    liar.node = "node-9".into();
    bus.put(&queue, Bytes::from(wire::encode(&liar))).await.unwrap();

    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 2;
    cfg.eval_dataset = Some("digits-test".into());
    let result = cluster.coordinator().run(id, &cfg, &Quiet).await.unwrap();
    for r in &result.reports {
        assert_eq!(r.contributed, vec!["node-0", "node-1"], "round {}: {:?}", r.round, r.failures);
        assert!(r.failures.is_empty());
    }
    cluster.stop().await;
}

on_both_backends!(bad_replies_never_stop_a_session);

/// A server-side optimiser's state (FedAdam's moments) is saved every round: a session
/// stopped after round 2 and resumed ends with exactly the model of an uninterrupted one.
/// Federated evaluation reports the participants' own metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategy_state_survives_a_resume_and_participants_evaluate() {
    let home = tempfile::tempdir().unwrap();
    let cluster = std::sync::Arc::new(cluster(&On::Memory, home.path(), 3).await);
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 4;
    cfg.seed = 3;
    cfg.fraction_evaluate = 1.0;
    cfg.eval_dataset = Some("digits-test".into());
    cfg.strategy = serde_json::from_value(json!({"name": "fedadam", "eta": 0.05, "tau": 0.001})).unwrap();
    let straight = cluster.coordinator().run("s-straight", &cfg, &Quiet).await.unwrap();
    let last = straight.reports.last().unwrap();
    assert_eq!(last.fed_evaluated.len(), 3, "{last:?}");
    assert!(last.fed_eval_accuracy.unwrap() > 0.8, "{last:?}");
    assert!(last.fed_eval_loss.unwrap() > 0.0);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (c, cfg2) = (cluster.clone(), cfg.clone());
    let run = tokio::spawn(async move { c.coordinator().run("s-crash", &cfg2, &Rounds(tx)).await });
    while rx.recv().await != Some(2) {}
    run.abort();
    let _ = run.await;
    let resumed = cluster.coordinator().resume("s-crash", &Quiet).await.unwrap();
    assert_eq!(resumed.model_digest, straight.model_digest, "the optimiser's moments were restored");
    // FedAdam really differs from FedAvg here.
    let mut avg = cfg.clone();
    avg.strategy = tessera_coordinator::StrategySpec::named("fedavg");
    let plain = cluster.coordinator().run("s-avg", &avg, &Quiet).await.unwrap();
    assert_ne!(plain.model_digest, straight.model_digest);
}

/// Differential privacy: updates are clipped (by the coordinator, or by each node before the
/// update leaves it), Gaussian noise is added to the aggregate, and the privacy spent is
/// reported after every round, growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_privacy_clips_noises_and_accounts() {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&On::Memory, home.path(), 3).await;
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 4;
    cfg.eval_dataset = Some("digits-test".into());
    let plain = cluster.coordinator().run("dp-none", &cfg, &Quiet).await.unwrap();
    assert!(plain.reports.iter().all(|r| r.dp_epsilon.is_none()));
    for (session, side) in
        [("dp-server", tessera_coordinator::DpSide::Server), ("dp-client", tessera_coordinator::DpSide::Client)]
    {
        let mut dp = cfg.clone();
        dp.differential_privacy =
            Some(tessera_coordinator::DpConfig { noise_multiplier: 0.05, clipping_norm: 2.0, side, delta: 1e-5 });
        let r = cluster.coordinator().run(session, &dp, &Quiet).await.unwrap();
        let eps: Vec<f64> = r.reports.iter().map(|r| r.dp_epsilon.unwrap()).collect();
        assert!(eps.windows(2).all(|w| w[1] > w[0] && w[1].is_finite()), "{session}: ε grows: {eps:?}");
        assert!(r.reports.iter().all(|r| r.dp_sample_rate == Some(1.0) && r.contributed.len() == 3));
        assert_ne!(r.model_digest, plain.model_digest, "{session}: noise was added");
        let acc = r.final_metrics.unwrap().accuracy.unwrap();
        assert!(acc > 0.8, "{session}: small noise keeps the model useful: {acc}");
    }
    // Strong noise costs accuracy: the noise is real.
    let mut loud = cfg.clone();
    loud.differential_privacy = Some(tessera_coordinator::DpConfig {
        noise_multiplier: 50.0,
        clipping_norm: 2.0,
        side: Default::default(),
        delta: 1e-5,
    });
    let r = cluster.coordinator().run("dp-loud", &loud, &Quiet).await.unwrap();
    assert!(r.final_metrics.unwrap().accuracy.unwrap() < 0.5);
    assert!(r.reports[0].dp_epsilon.unwrap() < 1.0, "much noise spends little privacy");
}

/// A saved round's update blobs, answer records and replaced models are removed, so the
/// stores stay flat across rounds: six rounds leave what two leave (the final model and
/// the strategy's state). `retain_updates: true` keeps them.
async fn finished_rounds_leave_their_updates_and_records_behind_only_when_asked(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&on, home.path(), 4).await;
    // Updates of 64 Ki f32 (256 KiB: stored as blobs, not inline), from the test module's
    // generated-model worker.
    publish_generated(&cluster, home.path());
    let session = |rounds: u32, retain: bool| {
        let mut cfg = SessionConfig::new("fl.generated");
        cfg.rounds = rounds;
        cfg.retain_updates = retain;
        cfg.config = json!({ "params": 64 * 1024 });
        cfg
    };
    let blobs = cluster.backend.blobs.clone();
    let world = cluster.backend.world.clone();
    let mut grew = Vec::new();
    let mut finals = Vec::new();
    // The third session is evaluated at the coordinator: each round's evaluation runs beside
    // the next round, whose leftovers are kept apart until it is recorded (another seed,
    // so its models are its own).
    for (id, rounds, evaluated) in [("two", 2, false), ("six", 6, false), ("six-evaluated", 6, true)] {
        let before = blobs.stored_bytes().await.unwrap();
        let mut cfg = session(rounds, false);
        if evaluated {
            cfg.eval_dataset = Some("digits-test".into());
            cfg.seed = 7;
        }
        let r = cluster.coordinator().run(id, &cfg, &Quiet).await.unwrap();
        assert!(r.reports.iter().all(|r| r.contributed.len() == 4), "{id}: {:?}", r.reports);
        assert_eq!(r.reports.iter().all(|r| r.eval_loss.is_some()), evaluated, "{id}");
        grew.push(blobs.stored_bytes().await.unwrap() - before);
        assert_eq!(world.keys("done/").await.unwrap(), Vec::<String>::new(), "{id}: answer records removed");
        finals.push(r);
    }
    assert!(grew[0] >= 256 << 10, "the final model stays: {grew:?}");
    assert!(grew[1] <= grew[0] + (64 << 10), "six rounds leave what two leave: {grew:?}");
    assert!(grew[2] >= 256 << 10 && grew[2] <= grew[0] + (64 << 10), "evaluated, the same: {grew:?}");
    // The same seed gives the same bytes: "six" replaced, in its third round, the very blob
    // that is "two"'s final model. Pinned by "two"'s saved state, it stays, and both
    // sessions still give their result.
    assert_eq!(finals[1].reports[1].model, finals[0].model_digest);
    for r in &finals {
        assert!(blobs.contains(&r.model_digest).await.unwrap(), "{}: final model kept", r.session);
        let again = cluster.coordinator().resume(&r.session, &Quiet).await.unwrap();
        assert_eq!(again.model_digest, r.model_digest);
    }

    let before = blobs.stored_bytes().await.unwrap();
    let r = cluster.coordinator().run("kept", &session(2, true), &Quiet).await.unwrap();
    let kept = blobs.stored_bytes().await.unwrap() - before;
    assert!(kept >= 8 * (256 << 10), "every update kept: {kept} bytes");
    assert_eq!(world.keys("done/").await.unwrap().len(), 8, "two rounds of four answers");
    let first = &r.reports[0].model;
    assert!(blobs.contains(first).await.unwrap(), "replaced models kept too");
}

/// A round of 12,000 participants names them all in its report, past what a world-state
/// value holds (1 MiB): the session's state goes to the blob store behind a pointer, and
/// the session resumes from it like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_past_a_world_value_is_kept_in_the_blob_store() {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&On::Memory, home.path(), 4).await;
    publish_generated(&cluster, home.path());
    let mut cfg = SessionConfig::new("fl.generated");
    cfg.rounds = 2;
    cfg.clients_per_node = Some(3000);
    cfg.min_participants = 12_000;
    cfg.round_timeout_secs = 600.0;
    cfg.config = json!({ "params": 4 });
    let r = cluster.coordinator().run("crowd", &cfg, &Quiet).await.unwrap();
    assert!(r.reports.iter().all(|r| r.contributed.len() == 12_000));
    let raw = cluster.backend.world.get("sessions/crowd").await.unwrap().unwrap();
    assert!(raw.value.len() < 200, "a pointer: {}", String::from_utf8_lossy(&raw.value));
    let state = cluster.coordinator().state("crowd").await.unwrap().unwrap();
    assert_eq!(state.reports.len(), 2);
    assert_eq!(state.reports[1].selected.len(), 12_000);
    let again = cluster.coordinator().resume("crowd", &Quiet).await.unwrap();
    assert_eq!(again.model_digest, r.model_digest);
    // Only the latest state is kept: the blob store holds one, pinned.
    let pins = cluster.backend.world.keys("pins/crowd/").await.unwrap();
    assert_eq!(pins.len(), 3, "model, strategy state and the state itself: {pins:?}");
}

/// Clipping bounds each round's step: with a clipping norm of 0.01 and next to no noise,
/// three rounds move the model (from zeros) by at most 0.03, at the coordinator or on the
/// nodes; unclipped, one round of SGD moves it by far more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipping_bounds_every_round_s_step() {
    use tessera_core::tensor::{Model, TensorLimits};
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&On::Memory, home.path(), 3).await;
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 3;
    let norm = |bytes: &[u8]| {
        let m = Model::decode(bytes, TensorLimits::default()).unwrap();
        m.floats.0.values().flat_map(|t| &t.data).map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt()
    };
    let free = cluster.coordinator().run("unclipped", &cfg, &Quiet).await.unwrap();
    assert!(norm(&free.model) > 1.0, "SGD moves the model: {}", norm(&free.model));
    for (session, side) in
        [("clip-server", tessera_coordinator::DpSide::Server), ("clip-client", tessera_coordinator::DpSide::Client)]
    {
        let mut dp = cfg.clone();
        dp.differential_privacy =
            Some(tessera_coordinator::DpConfig { noise_multiplier: 1e-6, clipping_norm: 0.01, side, delta: 1e-5 });
        let r = cluster.coordinator().run(session, &dp, &Quiet).await.unwrap();
        assert!(r.reports.iter().all(|r| r.contributed.len() == 3 && r.failures.is_empty()), "{session}");
        let n = norm(&r.model);
        assert!(n <= 0.03 * (1.0 + 1e-3) && n > 0.01, "{session}: moved {n}");
    }
}

/// FedProx's Synthetic(0.5, 0.5), generated by each participant for its own device: 20
/// devices on four nodes (FedProx ran 30), every one trains each round, and the global
/// model's loss on their rows (federated evaluation, FedProx's "training loss") falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synthetic_population_learns() {
    let home = tempfile::tempdir().unwrap();
    let spec = json!({"alpha": 0.5, "beta": 0.5, "seed": 1, "max_samples": 200});
    let config = ClusterConfig::synthetic(home.path(), 4, &spec, WasmLimits::default()).unwrap();
    let cluster = Cluster::start(config).await.unwrap();
    let dir = home.path().join("modules").join("fl.softmax.worker");
    tessera_modules::write_softmax_worker(&dir).unwrap();
    cluster.publish_dir(&dir).unwrap();
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 10;
    cfg.dataset = "synthetic".into();
    cfg.clients_per_node = Some(5);
    cfg.min_participants = 20;
    cfg.fraction_evaluate = 1.0;
    cfg.min_evaluate = 20;
    cfg.config = json!({"features": 60, "classes": 10, "lr": 0.01, "epochs": 20, "batch_size": 10});
    let r = cluster.coordinator().run("synthetic", &cfg, &Quiet).await.unwrap();
    assert!(r.reports.iter().all(|r| r.contributed.len() == 20), "{:?}", r.reports.last());
    // Devices hold 50 to 200 rows each; every round the same 20.
    let examples: Vec<u64> = r.reports.iter().map(|r| r.examples).collect();
    assert!(examples.iter().all(|&e| e == examples[0] && (20 * 50..=20 * 200).contains(&e)), "{examples:?}");
    let loss: Vec<f64> = r.reports.iter().map(|r| r.fed_eval_loss.unwrap()).collect();
    eprintln!("federated evaluation loss by round: {loss:?}");
    let (first, last) = (loss[..2].iter().sum::<f64>(), loss[loss.len() - 2..].iter().sum::<f64>());
    assert!(last < 0.85 * first, "the loss falls: {loss:?}");
    cluster.stop().await;
}

/// Simulation: four nodes host 250 participants each, and every round asks all 1,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_simulated_participants_per_round() {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&On::Memory, home.path(), 4).await;
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 2;
    cfg.clients_per_node = Some(250);
    cfg.min_participants = 900;
    cfg.round_timeout_secs = 600.0;
    cfg.eval_dataset = Some("digits-test".into());
    let r = cluster.coordinator().run("sim-1000", &cfg, &Quiet).await.unwrap();
    for report in &r.reports {
        assert_eq!(report.selected.len(), 1000);
        assert_eq!(report.contributed.len(), 1000, "{:?}", report.failures.first());
        assert_eq!(report.examples, 1438, "the participants' shares cover every training row once");
    }
    assert!(r.reports[0].selected.iter().any(|p| p == "node-3.c249"));
    assert_eq!(r.lineage.nodes, ["node-0", "node-1", "node-2", "node-3"]);
    assert!(r.final_metrics.unwrap().accuracy.unwrap() > 0.5);
}

/// Hierarchical aggregation: two region aggregators sum their regions' updates (the
/// coordinator reads only their partial sums), one node is in no region; the model is
/// FedAvg's, to rounding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_aggregators_feed_the_global_sum() {
    use std::collections::BTreeMap;
    use tessera_coordinator::{Hierarchy, Region};
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&On::Memory, home.path(), 5).await;
    let agg = home.path().join("aggregator");
    std::fs::create_dir_all(&agg).unwrap();
    std::fs::write(
        agg.join("module.yaml"),
        "name: tessera.fedavg-partial\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: fedavg-partial\n",
    )
    .unwrap();
    cluster.publish_dir(&agg).unwrap();
    let mut cfg = SessionConfig::new("fl.softmax.worker");
    cfg.rounds = 3;
    cfg.eval_dataset = Some("digits-test".into());
    let flat = cluster.coordinator().run("flat", &cfg, &Quiet).await.unwrap();
    cfg.hierarchy = Some(Hierarchy {
        module: "tessera.fedavg-partial@0.1.0".into(),
        regions: BTreeMap::from([
            ("eu".to_string(), Region { aggregator: "node-0".into(), nodes: vec!["node-0".into(), "node-1".into()] }),
            ("us".to_string(), Region { aggregator: "node-2".into(), nodes: vec!["node-2".into(), "node-3".into()] }),
        ]),
    });
    let tree = cluster.coordinator().run("tree", &cfg, &Quiet).await.unwrap();
    for r in &tree.reports {
        assert_eq!(r.contributed.len(), 5, "{:?}", r.failures);
    }
    let (a, b) = (
        Tensors::decode(&flat.model, TensorLimits::default()).unwrap(),
        Tensors::decode(&tree.model, TensorLimits::default()).unwrap(),
    );
    let worst =
        a.0.iter().flat_map(|(k, t)| t.data.iter().zip(&b.0[k].data).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    assert!(worst < 1e-4, "hierarchical and flat FedAvg differ by {worst}");
    assert!(tree.final_metrics.unwrap().accuracy.unwrap() > 0.85);
    // Configurations that cannot work are refused.
    let mut bad = cfg.clone();
    bad.strategy = tessera_coordinator::StrategySpec::named("fedmedian");
    assert!(bad.validate().is_err());
}
