//! Swarms of user-written Python tasks end to end, on both backends: the examples
//! (federated analytics, the Manta-style federated learning swarm), a node killed during a
//! stage, a coordinator killed between iterations and resumed, a canary version split,
//! placement refusals, stop, and task logs.
//!
//! Needs a Python with numpy: `scripts/test` makes one and exports `TESSERA_PYTHON`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use tessera_cluster::{Cluster, ClusterConfig, digits};
use tessera_coordinator::{Ending, Quiet, SessionError};
use tessera_nats::testing::NatsServer;
use tessera_swarm::SwarmSpec;
use tessera_wasm::WasmLimits;

use common::counting::{Iterations, counting_modules, counting_spec, global_json, rows_of};
use common::{On, python, repo};

/// A cluster of `nodes` nodes, each holding a digits shard, running Python modules.
async fn cluster(on: &On, home: &Path, nodes: usize) -> Cluster {
    let backend = on.backend().await;
    let data = digits::prepare(&home.join("data"), nodes, 0.2, 42).unwrap();
    let mut config = ClusterConfig::digits(home, &data, WasmLimits::default());
    config.python = Some(python());
    Cluster::start_on(config, backend).await.unwrap()
}

/// A swarm file's spec with its folder modules published to the cluster's hub.
fn publish_folders(cluster: &Cluster, mut spec: SwarmSpec, base: &Path) -> SwarmSpec {
    for task in spec.tasks.values_mut() {
        if let Some(p) = task.local_path() {
            task.module = cluster.publish_dir(&base.join(p)).unwrap().digest.to_string();
        }
    }
    spec
}

/// The spec of a Python swarm file, as `tessera swarm run swarm.py` reads it.
fn python_spec(file: &Path) -> SwarmSpec {
    let out = std::process::Command::new(python())
        .args(["-m", "tessera.swarm"])
        .arg(file)
        .env("PYTHONPATH", repo().join("sdk/python"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    SwarmSpec::from_yaml(std::str::from_utf8(&out.stdout).unwrap()).unwrap()
}

async fn federated_analytics_gives_the_exact_label_histogram(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&on, home.path(), 4).await;
    let dir = repo().join("examples/swarms/analytics");
    let spec = SwarmSpec::from_yaml(&std::fs::read_to_string(dir.join("swarm.yaml")).unwrap()).unwrap();
    let spec = publish_folders(&cluster, spec, &dir);
    let result = cluster.coordinator().run_swarm("fa-1", &spec, &Quiet).await.unwrap();

    // Computed centrally, from the same shards.
    let (shards, _) = digits::split(4, 0.2, 42);
    let mut histogram = vec![0u64; 10];
    let mut sums = vec![0f64; digits::FEATURES];
    let mut rows = 0usize;
    for s in &shards {
        for (i, y) in s.y.iter().enumerate() {
            histogram[*y as usize] += 1;
            for (f, sum) in sums.iter_mut().enumerate() {
                *sum += f64::from(s.x[i * digits::FEATURES + f]);
            }
        }
        rows += s.len();
    }
    assert_eq!(global_json(&result, "histogram"), serde_json::json!(histogram));
    assert_eq!(global_json(&result, "rows"), serde_json::json!(rows));
    assert_eq!(global_json(&result, "nodes"), serde_json::json!(["node-0", "node-1", "node-2", "node-3"]));
    let mean: Vec<f64> = serde_json::from_value(global_json(&result, "feature_mean")).unwrap();
    for (m, s) in mean.iter().zip(&sums) {
        assert!((m - s / rows as f64).abs() < 1e-9, "{m} vs {}", s / rows as f64);
    }
    assert_eq!(result.ending, Ending::Limit);
    assert_eq!(result.lineage.placements.len(), 4, "{:?}", result.lineage.placements);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manta_swarm_learns_digits_stops_early_and_gives_one_model_on_both_backends() {
    let spec = python_spec(&repo().join("examples/swarms/manta-fl/swarm.py"));
    assert_eq!(spec.stages(), ["worker", "aggregator", "scheduler"]);
    let (_, test) = digits::split(4, 0.2, 42);
    let mut digests = Vec::new();
    for on in [On::Memory, On::Nats(NatsServer::start())] {
        let home = tempfile::tempdir().unwrap();
        let cluster = cluster(&on, home.path(), 4).await;
        let spec = publish_folders(&cluster, spec.clone(), Path::new("/"));
        let result = cluster.coordinator().run_swarm("manta-1", &spec, &Quiet).await.unwrap();
        assert_eq!(result.ending, Ending::Scheduler, "the scheduler stops it on the target accuracy");
        assert!(result.iterations < spec.iterations, "{} iterations", result.iterations);
        let acc = digits::accuracy(&result.globals["model"], &test).unwrap();
        assert!(acc >= 0.90, "test accuracy {acc}");
        digests.push(result.model.unwrap());
        cluster.stop().await;
    }
    assert_eq!(digests[0], digests[1], "the same swarm gives the same model on both backends");
}

async fn a_node_killed_during_a_worker_stage_is_left_out_and_nothing_is_counted_twice(on: On) {
    let home = tempfile::tempdir().unwrap();
    let mut cluster = cluster(&on, home.path(), 4).await;
    let mut spec = counting_spec(&cluster, home.path(), 3);
    spec.tasks.get_mut("count").unwrap().config = serde_json::json!({"slow": {"node": "node-3", "iteration": 2}});
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c = cluster.coordinator();
    let run = tokio::spawn(async move { c.run_swarm("kill-1", &spec, &Iterations(tx)).await });
    while rx.recv().await != Some(1) {}
    // node-3 is now sleeping in iteration 2's count stage: kill it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(cluster.kill_node("node-3"));
    let result = run.await.unwrap().unwrap();

    assert_eq!(result.iterations, 3);
    let stage = &result.reports[1].stages[0];
    assert_eq!(stage.succeeded, ["node-0", "node-1", "node-2"]);
    assert_eq!(stage.failures.len(), 1);
    assert_eq!(stage.failures[0].node, "node-3");
    // Iteration 3 no longer places anything on the dead node.
    assert!(result.reports[2].stages.iter().all(|s| !s.succeeded.contains(&"node-3".to_string())));
    let counted: Vec<Vec<String>> = serde_json::from_value(global_json(&result, "counted")).unwrap();
    assert_eq!(counted[0].len(), 4);
    assert_eq!(counted[1], ["node-0", "node-1", "node-2"]);
    assert_eq!(counted[2], ["node-0", "node-1", "node-2"]);
    let want = rows_of(&[0, 1, 2, 3]) + 2 * rows_of(&[0, 1, 2]);
    assert_eq!(global_json(&result, "total"), serde_json::json!(want));
    cluster.stop().await;
}

async fn a_swarm_whose_coordinator_was_killed_resumes_without_counting_twice(on: On) {
    let home = tempfile::tempdir().unwrap();
    let cluster = std::sync::Arc::new(cluster(&on, home.path(), 4).await);
    let spec = counting_spec(&cluster, home.path(), 4);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c = cluster.coordinator();
    let spec2 = spec.clone();
    let run = tokio::spawn(async move { c.run_swarm("resume-1", &spec2, &Iterations(tx)).await });
    while rx.recv().await != Some(2) {}
    run.abort();
    let _ = run.await;
    // What the dead coordinator had already handed to its connection still lands, as it
    // would from a killed process; resume after that, as an operator would.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done = match cluster.coordinator().record("resume-1").await.unwrap().unwrap() {
        tessera_coordinator::RunRecord::Swarm(s) => s.completed_iterations,
        other => panic!("{other:?}"),
    };
    assert!((2..4).contains(&done), "{done}");

    // The same id cannot start again; resume finishes it.
    assert!(cluster.coordinator().run_swarm("resume-1", &spec, &Quiet).await.is_err());
    let result = cluster.coordinator().resume_swarm("resume-1", &Quiet).await.unwrap();
    let iterations: Vec<u32> = result.reports.iter().map(|r| r.iteration).collect();
    assert_eq!(iterations, [1, 2, 3, 4], "no iteration lost or repeated");
    assert_eq!(global_json(&result, "total"), serde_json::json!(4 * rows_of(&[0, 1, 2, 3])));
    let counted: Vec<Vec<String>> = serde_json::from_value(global_json(&result, "counted")).unwrap();
    assert_eq!(counted.len(), 4, "{counted:?}");
    // Resuming a finished run runs nothing and gives the same globals.
    let again = cluster.coordinator().resume_swarm("resume-1", &Quiet).await.unwrap();
    assert_eq!(again.globals, result.globals);
    assert!(matches!(cluster.coordinator().resume_swarm("nothing", &Quiet).await, Err(SessionError::Unknown(_))));
    std::sync::Arc::try_unwrap(cluster).ok().unwrap().stop().await;
}

async fn a_task_retried_elsewhere_changes_the_globals_once(on: On) {
    let home = tempfile::tempdir().unwrap();
    let mut cluster = cluster(&on, home.path(), 4).await;
    let mut spec = counting_spec(&cluster, home.path(), 1);
    let total = spec.tasks.get_mut("total").unwrap();
    // `any` picks node-0 first; it sets the total, then sleeps past the time-out.
    total.config = serde_json::json!({"slow": {"node": "node-0"}});
    total.timeout_secs = Some(4.0);
    let result = cluster.coordinator().run_swarm("retry-1", &spec, &Quiet).await.unwrap();
    let stage = &result.reports[0].stages[1];
    assert_eq!(stage.tries, 2, "{stage:?}");
    assert_eq!(stage.failures[0].node, "node-0");
    assert_eq!(stage.succeeded.len(), 1);
    assert_eq!(global_json(&result, "total"), serde_json::json!(rows_of(&[0, 1, 2, 3])), "counted once");
    cluster.kill_node("node-0");
    cluster.stop().await;
}

on_both_backends!(
    a_task_retried_elsewhere_changes_the_globals_once,
    federated_analytics_gives_the_exact_label_histogram,
    a_node_killed_during_a_worker_stage_is_left_out_and_nothing_is_counted_twice,
    a_swarm_whose_coordinator_was_killed_resumes_without_counting_twice,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_split_puts_eight_and_two_of_ten_nodes_and_the_lineage_says_which() {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&On::Memory, home.path(), 10).await;
    let (old, total) = counting_modules(home.path(), "1.0.0");
    let (new, _) = counting_modules(home.path(), "1.1.0");
    for dir in [&old, &new, &total] {
        cluster.publish_dir(dir).unwrap();
    }
    let spec = SwarmSpec::from_yaml(
        "tasks:\n  count:\n    module: test.count\n    versions: {1.0.0: 0.8, 1.1.0: 0.2}\n    datasets: [digits]\n  total: {module: test.total@^1, method: any, maximum: 1}\nflow: [count -> total]\nseed: 7\n",
    )
    .unwrap();
    let result = cluster.coordinator().run_swarm("canary-1", &spec, &Quiet).await.unwrap();
    let mut by_version: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (node, tasks) in &result.lineage.placements {
        if let Some(m) = tasks.get("count") {
            by_version.entry(m.clone()).or_default().push(node.clone());
        }
    }
    assert_eq!(by_version["test.count@1.0.0"].len(), 8, "{by_version:?}");
    assert_eq!(by_version["test.count@1.1.0"].len(), 2, "{by_version:?}");
    assert_eq!(result.lineage.modules.iter().filter(|m| m.role == "count").count(), 2);
    // The same seed places the same nodes again.
    let again = cluster.coordinator().run_swarm("canary-2", &spec, &Quiet).await.unwrap();
    assert_eq!(again.lineage.placements, result.lineage.placements);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_that_cannot_be_placed_is_refused_before_it_starts() {
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&On::Memory, home.path(), 2).await;
    let (count, total) = counting_modules(home.path(), "1.0.0");
    cluster.publish_dir(&count).unwrap();
    cluster.publish_dir(&total).unwrap();
    let greedy = home.path().join("greedy");
    std::fs::create_dir_all(&greedy).unwrap();
    std::fs::copy(count.join("count.py"), greedy.join("count.py")).unwrap();
    std::fs::write(
        greedy.join("module.yaml"),
        "name: test.greedy\nversion: 1.0.0\nkind: task\nruntime: python\nentry: count.py\nneeds:\n  memory: 100TiB\n",
    )
    .unwrap();
    cluster.publish_dir(&greedy).unwrap();
    let cases = [
        ("gpu", "count: {module: test.count, gpu: true}", "count", "gpu"),
        ("needs", "count: {module: test.greedy}", "count", "needs.memory"),
        ("dataset", "count: {module: test.count, datasets: [mri-scans]}", "count", "datasets"),
        ("module", "count: {module: test.nothing@1.0.0}", "count", "test.nothing"),
    ];
    for (id, task, name, field) in cases {
        let spec = SwarmSpec::from_yaml(&format!(
            "tasks:\n  {task}\n  total: {{module: test.total, method: any, maximum: 1}}\nflow: [count -> total]\n"
        ))
        .unwrap();
        let err = cluster.coordinator().run_swarm(id, &spec, &Quiet).await.unwrap_err().to_string();
        assert!(err.contains(&format!("task {name}")) && err.contains(field), "{id}: {err}");
        assert!(cluster.coordinator().record(id).await.unwrap().is_none(), "{id}: nothing was announced");
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_swarm_ends_cleanly_and_its_task_logs_are_kept() {
    let home = tempfile::tempdir().unwrap();
    let cluster = std::sync::Arc::new(cluster(&On::Memory, home.path(), 2).await);
    let spec = counting_spec(&cluster, home.path(), 1000);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let c = cluster.coordinator();
    let run = tokio::spawn(async move { c.run_swarm("stop-1", &spec, &Iterations(tx)).await });
    while rx.recv().await != Some(2) {}
    cluster.coordinator().request_stop("stop-1").await.unwrap();
    let result = run.await.unwrap().unwrap();
    assert_eq!(result.ending, Ending::Stopped);
    assert!(result.iterations >= 2 && result.iterations < 1000, "{}", result.iterations);
    let stored = cluster.coordinator().record("stop-1").await.unwrap().unwrap();
    assert_eq!(stored.ending(), Some(Ending::Stopped));
    assert!(cluster.coordinator().request_stop("stop-1").await.is_err(), "an ended run cannot be stopped again");

    let logs = cluster.coordinator().logs("stop-1").await.unwrap();
    let first: Vec<_> = logs.iter().filter(|l| l.iteration == Some(1) && l.task == "count").collect();
    assert_eq!(first.iter().map(|l| l.node.as_str()).collect::<Vec<_>>(), ["node-0", "node-1"]);
    for l in first {
        assert_eq!(l.lines.len(), 1, "{:?}", l.lines);
        assert_eq!(l.lines[0].level, "info");
        assert!(l.lines[0].msg.starts_with("iteration 1: "), "{:?}", l.lines[0]);
    }
    std::sync::Arc::try_unwrap(cluster).ok().unwrap().stop().await;
}

#[test]
fn the_python_and_yaml_forms_of_the_manta_swarm_give_the_same_spec() {
    let dir = repo().join("examples/swarms/manta-fl");
    let normalize = |mut spec: SwarmSpec| {
        spec.lines.clear();
        for task in spec.tasks.values_mut() {
            let path = dir.join(task.local_path().expect("folders"));
            task.module = path.canonicalize().unwrap().display().to_string();
        }
        spec
    };
    let python = normalize(python_spec(&dir.join("swarm.py")));
    let yaml = normalize(SwarmSpec::from_yaml(&std::fs::read_to_string(dir.join("swarm.yaml")).unwrap()).unwrap());
    assert_eq!(python, yaml);
}

/// A task names a Component Repository entry (`transformation/test.counter`) whose object
/// is a Tessera package never published as one: it runs that package, placement judges
/// the entry's `needs` joined with the package's and the nodes run it under them (an
/// entry's tiny memory kills the run), a resumed run checks the entry still
/// holds the bytes it ran, and an object that is no package is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_named_by_a_component_runs_its_package_under_the_entrys_needs() {
    use tessera_hub::Collection;
    let home = tempfile::tempdir().unwrap();
    let cluster = cluster(&On::Memory, home.path(), 4).await;
    let (count, total) = counting_modules(home.path(), "1.0.0");
    cluster.publish_dir(&total).unwrap();
    let packed = tessera_package::pack_dir(&count, &tessera_package::Limits::default()).unwrap();
    let doc = |ram: f64| serde_json::json!({"id": "test.counter", "description": "counts rows", "needs": {"storage": 0, "RAM": ram, "GPU": false}});
    let entry = |v: serde_json::Value| v.as_object().unwrap().clone();
    // 0.5 GB: the task carries it, and the node limits the run's memory by it.
    cluster.hub.create_component(Collection::Transformation, "test.counter", &entry(doc(0.5)), None).unwrap();
    cluster.hub.put_component_bytes(Collection::Transformation, "test.counter", &packed.bytes, None).unwrap();
    let spec = SwarmSpec::from_yaml(
        "tasks:\n  count: {module: transformation/test.counter, datasets: [digits]}\n  total: {module: test.total, method: any, maximum: 1}\nflow: [count -> total]\n",
    )
    .unwrap();
    let result = cluster.coordinator().run_swarm("component-1", &spec, &Quiet).await.unwrap();
    assert_eq!(global_json(&result, "total"), serde_json::json!(rows_of(&[0, 1, 2, 3])));
    let used = result.lineage.modules.iter().find(|m| m.role == "count").unwrap();
    assert_eq!((used.module.as_str(), used.digest), ("test.count@1.0.0", packed.digest));
    assert_eq!(used.component.as_deref(), Some("transformation/test.counter"));
    // Resuming the finished run resolves the entry again: it still holds those bytes.
    let again = cluster.coordinator().resume_swarm("component-1", &Quiet).await.unwrap();
    assert_eq!(again.globals, result.globals);

    // The entry says 1 MB: its tasks carry that, and each node limits the run by it.
    let mut less = serde_json::Map::new();
    less.insert("needs".into(), doc(0.001)["needs"].clone());
    cluster.hub.update_component(Collection::Transformation, "test.counter", less, None).unwrap();
    let err = cluster.coordinator().run_swarm("component-tiny", &spec, &Quiet).await.unwrap_err().to_string();
    // (The machines this runs on have cgroups: tessera-process's sandbox tests say so.)
    let limited = err.contains("memory limit") || err.contains("MemoryError");
    assert!(err.contains("count") && limited, "the entry's memory limits the run: {err}");

    // The entry now needs 100 TB of memory: no node can run its task.
    let mut more = serde_json::Map::new();
    more.insert("needs".into(), doc(100_000.0)["needs"].clone());
    cluster.hub.update_component(Collection::Transformation, "test.counter", more, None).unwrap();
    let err = cluster.coordinator().run_swarm("component-2", &spec, &Quiet).await.unwrap_err().to_string();
    assert!(err.contains("task count") && err.contains("needs.memory"), "{err}");
    assert!(cluster.coordinator().record("component-2").await.unwrap().is_none());

    // A new revision of its object: the first run, resumed, sees the entry no longer holds
    // what it ran.
    let (newer, _) = counting_modules(&home.path().join("newer"), "1.1.0");
    let newer = tessera_package::pack_dir(&newer, &tessera_package::Limits::default()).unwrap();
    cluster.hub.put_component_bytes(Collection::Transformation, "test.counter", &newer.bytes, None).unwrap();
    let err = cluster.coordinator().resume_swarm("component-1", &Quiet).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "transformation/test.counter is now {}, but the run used {}",
            newer.digest, packed.digest
        )),
        "{err}"
    );
    // Bytes that are no package: refused, naming the entry.
    cluster.hub.put_component_bytes(Collection::Transformation, "test.counter", b"a pickle", None).unwrap();
    let err = cluster.coordinator().run_swarm("component-3", &spec, &Quiet).await.unwrap_err().to_string();
    assert!(err.contains("transformation/test.counter") && err.contains("not a Tessera package"), "{err}");
    cluster.stop().await;
}
