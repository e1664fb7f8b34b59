//! Tracing across processes' parts: one task followed from the coordinator to its node
//! and back by the W3C ids it carries (`tessera_core::trace`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Quiet, SessionConfig};
use tessera_ports::Backend;
use tessera_wasm::WasmLimits;

/// One task followed across the coordinator and its node: the coordinator's "task sent"
/// and "reply accepted" and the node's "task done" carry the same W3C trace and span ids
/// (the round's trace, the task's span).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_followed_from_the_coordinator_to_its_node_and_back() {
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("tessera_coordinator=debug,tessera_node=debug")
        .finish();
    // The process's own subscriber (this file holds one test): a thread-local one would
    // miss the nodes' tasks, and race other tests for the callsites' interest.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let home = tempfile::tempdir().unwrap();
    let prepared = digits::prepare(&home.path().join("data"), 2, 0.2, 42).unwrap();
    let limits = WasmLimits { max_time: Duration::from_secs(60), ..WasmLimits::default() };
    let config = ClusterConfig::digits(home.path(), &prepared, limits);
    let cluster = Cluster::start_on(config, Backend::in_process(Duration::from_secs(30))).await.unwrap();
    let dir = home.path().join("modules").join("fl.softmax.worker");
    tessera_modules::write_softmax_worker(&dir).unwrap();
    cluster.publish_dir(&dir).unwrap();
    let mut cfg = SessionConfig::new("fl.softmax.worker@0.1.2");
    cfg.rounds = 1;
    cluster.coordinator().run("s-traced", &cfg, &Quiet).await.unwrap();
    cluster.stop().await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let sent = text.lines().find(|l| l.contains("task sent") && l.contains("node=node-1") && l.contains("round=1"));
    let sent = sent.unwrap_or_else(|| panic!("no task sent to node-1:\n{text}"));
    let field = |line: &str, name: &str| -> String {
        let at = line.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name} in {line}"));
        line[at + name.len() + 1..].split_whitespace().next().unwrap().trim_end_matches([':', '}']).to_owned()
    };
    let (trace, span, task) = (field(sent, "trace_id"), field(sent, "span_id"), field(sent, "task_id"));
    assert_eq!(trace.len(), 32, "{sent}");
    let expected = tessera_core::trace::TraceParent::for_task("s-traced", 1, &task);
    assert_eq!(
        (trace.as_str(), span.as_str()),
        (expected.trace_hex().as_str(), expected.span_hex().as_str()),
        "{sent}"
    );
    let on_node = text.lines().find(|l| l.contains("task done") && l.contains(&format!("task_id={task}")));
    let on_node = on_node.unwrap_or_else(|| panic!("the node did not log task {task}:\n{text}"));
    assert_eq!((field(on_node, "trace_id"), field(on_node, "parent_span")), (trace.clone(), span.clone()), "{on_node}");
    let back = text.lines().find(|l| l.contains("reply accepted") && l.contains(&format!("task_id={task}")));
    let back = back.unwrap_or_else(|| panic!("no reply accepted for {task}:\n{text}"));
    assert_eq!((field(back, "trace_id"), field(back, "span_id")), (trace, span), "{back}");
}
