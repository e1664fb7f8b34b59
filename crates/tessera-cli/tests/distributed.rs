//! Real processes on a real nats-server: a hub, nodes and a coordinator started the way the
//! README says, and the faults they must survive.
//!
//! The tests here share the machine's two cores with heavy processes, so they run one at
//! a time.

#[path = "support/hub.rs"]
mod hub_process;
use hub_process::spawn_hub;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use tessera_client::HubClient;
use tessera_core::wire::Lineage;
use tessera_nats::testing::NatsServer;

#[path = "support/json_doc.rs"]
mod json_doc;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn tessera(env: &Env) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.env_remove("RUST_LOG")
        .env("TESSERA_NATS", env.nats.url())
        .env("TESSERA_HUB", &env.hub_url)
        .env("TESSERA_HOME", env.dir.path().join("home"))
        .env("TESSERA_MEMBER_TTL", "2")
        .current_dir(env.dir.path());
    c
}

struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Env {
    nats: NatsServer,
    hub_url: String,
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
}

impl Env {
    /// A nats-server, a hub with the worker published, and the digits shards on disk.
    fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let nats = NatsServer::start();
        let mut env = Env { nats, hub_url: String::new(), dir, procs: Vec::new() };
        let mut serve = tessera(&env);
        serve.args(["hub", "serve", "--listen", "127.0.0.1:0", "--data", "hub"]);
        let (hub, url) = spawn_hub(serve);
        env.hub_url = url;
        env.procs.push(Proc { child: hub, name: "hub".into() });
        let worker = env.dir.path().join("worker");
        tessera_modules::write_softmax_worker(&worker).unwrap();
        env.ok(&["module", "publish", worker.to_str().unwrap()]);
        env.ok(&["dataset", "digits", "--out", "data", "--shards", "4"]);
        env
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        tessera(self).args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = tessera(self).args(args).output().unwrap();
        assert!(out.status.success(), "tessera {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_str().unwrap().to_owned()
    }

    /// Starts `tessera node run` for shard `k`; its log goes to node-<k>.log.
    fn node(&mut self, k: usize) {
        let log = std::fs::File::create(self.dir.path().join(format!("node-{k}.log"))).unwrap();
        let child = tessera(self)
            .args(["node", "run", "--open", "--id", &format!("node-{k}"), "--dataset"])
            .arg(format!("digits={}", self.path(&format!("data/node-{k}/digits.safetensors"))))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.push(Proc { child, name: format!("node-{k}") });
    }

    fn kill(&mut self, name: &str) {
        let i = self.procs.iter().position(|p| p.name == name).unwrap();
        let mut p = self.procs.remove(i);
        p.child.kill().unwrap(); // SIGKILL
        p.child.wait().unwrap();
    }

    /// Waits until `n` nodes are registered.
    fn wait_for_nodes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let url = self.nats.url();
        loop {
            let count = rt.block_on(async {
                let options = tessera_nats::NatsOptions { member_ttl: Duration::from_secs(2), ..Default::default() };
                let b = tessera_nats::backend(&url, &options).await.unwrap();
                tessera_node::list_nodes(b.members.as_ref()).await.unwrap().len()
            });
            if count >= n {
                return;
            }
            assert!(Instant::now() < deadline, "only {count} of {n} nodes registered");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn swarm_file(&self, rounds: u32, min: usize, timeout: f64) -> String {
        let text = format!(
            "module: fl.softmax.worker@0.1.2\nrounds: {rounds}\nmin_participants: {min}\nround_timeout_secs: {timeout}\n\
             dataset: digits\neval_dataset: digits-test\nconfig: {{lr: 0.5}}\nseed: 42\npublish_as: digits.softmax\n"
        );
        let p = self.dir.path().join("fl.yaml");
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    }

    /// Starts a coordinator command with the coordinator's held-out dataset; its stdout
    /// lines arrive on the returned channel.
    fn coordinator(&mut self, args: &[&str]) -> Receiver<String> {
        let data = format!("digits-test={}", self.path("data/coordinator/digits-test.safetensors"));
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--dataset", &data]);
        self.coordinator_bare(&all)
    }

    /// Starts a coordinator command as given.
    fn coordinator_bare(&mut self, args: &[&str]) -> Receiver<String> {
        let log = std::fs::File::create(self.dir.path().join("coordinator.log")).unwrap();
        let mut child = tessera(self).args(args).stdout(Stdio::piped()).stderr(log).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.procs.push(Proc { child, name: "coordinator".into() });
        rx
    }

    /// Reads coordinator lines until one starts with `prefix`; returns every line read.
    fn until(&self, rx: &Receiver<String>, prefix: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(240)) {
                Ok(l) => {
                    let done = l.starts_with(prefix);
                    lines.push(l);
                    if done {
                        return lines;
                    }
                }
                Err(_) => panic!(
                    "no line starting with {prefix:?}; got:\n{}\nlogs:\n{}",
                    lines.join("\n"),
                    logs(self.dir.path())
                ),
            }
        }
    }

    fn wait_coordinator(&mut self) -> bool {
        let i = self.procs.iter().position(|p| p.name == "coordinator").unwrap();
        let mut p = self.procs.remove(i);
        p.child.wait().unwrap().success()
    }

    /// The published model's lineage.
    fn lineage(&self, version: &str) -> (Lineage, f64) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = HubClient::new(&self.hub_url).unwrap();
        let m = rt.block_on(client.model("digits.softmax", version)).unwrap();
        (m.lineage.unwrap(), m.metadata["test_accuracy"].as_f64().unwrap())
    }

    fn session_id(lines: &[String]) -> String {
        lines.iter().find_map(|l| l.strip_prefix("session ")).unwrap().split(':').next().unwrap().to_owned()
    }
}

/// Rows in each node's shard (the same split `tessera dataset digits` writes).
fn shard_rows() -> Vec<u64> {
    tessera_cluster::digits::split(4, 0.2, 42).0.iter().map(|r| r.len() as u64).collect()
}

/// Every round once, in order; each contribution counted once, its examples those of the
/// nodes that contributed.
fn check_rounds(lineage: &Lineage, rounds: u32) {
    let numbers: Vec<u32> = lineage.metrics.iter().map(|r| r.round).collect();
    assert_eq!(numbers, (1..=rounds).collect::<Vec<_>>(), "no round lost or repeated");
    let rows = shard_rows();
    for r in &lineage.metrics {
        let mut c = r.contributed.clone();
        c.dedup();
        assert_eq!(c, r.contributed, "round {}: a node counted twice", r.round);
        let expected: u64 =
            r.contributed.iter().map(|n| rows[n.strip_prefix("node-").unwrap().parse::<usize>().unwrap()]).sum();
        assert_eq!(r.examples, expected, "round {}: examples do not match the contributors", r.round);
    }
}

fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let p: PathBuf = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            out.push_str(&format!("--- {}\n{}\n", p.display(), std::fs::read_to_string(&p).unwrap_or_default()));
        }
    }
    out
}

#[test]
fn four_node_processes_finish_the_digits_session() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut env = Env::start();
    for k in 0..4 {
        env.node(k);
    }
    env.wait_for_nodes(4);
    let file = env.swarm_file(20, 4, 120.0);
    let rx = env.coordinator(&["swarm", "run", &file]);
    let lines = env.until(&rx, "time:");
    assert!(env.wait_coordinator(), "{}", logs(env.dir.path()));
    let text = lines.join("\n");
    let acc: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("final test accuracy: "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(acc >= 0.90, "{text}");
    assert!(text.contains("model: digits.softmax@0.1.0 b3:"), "{text}");
    let (lineage, recorded) = env.lineage("0.1.0");
    assert!((recorded - acc).abs() < 1e-3);
    assert_eq!(lineage.nodes, vec!["node-0", "node-1", "node-2", "node-3"]);
    check_rounds(&lineage, 20);
    for r in &lineage.metrics {
        assert_eq!(r.contributed.len(), 4, "round {}: {:?}", r.round, r.failures);
    }
}

#[test]
fn a_node_killed_mid_round_does_not_stop_the_session() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut env = Env::start();
    for k in 0..4 {
        env.node(k);
    }
    env.wait_for_nodes(4);
    // A long round time-out: the coordinator notices the dead node by its missing
    // heartbeat (2 s here), not by waiting the time-out out.
    let file = env.swarm_file(8, 2, 120.0);
    let started = Instant::now();
    let rx = env.coordinator(&["swarm", "run", &file]);
    env.until(&rx, "round  2");
    env.kill("node-1");
    env.until(&rx, "time:");
    assert!(env.wait_coordinator(), "{}", logs(env.dir.path()));
    let (lineage, acc) = env.lineage("0.1.0");
    check_rounds(&lineage, 8);
    assert!(acc >= 0.85, "accuracy {acc}");
    // node-1 took part before it was killed, and never after the round it died in.
    assert!(lineage.metrics[0].contributed.contains(&"node-1".to_string()));
    let late = &lineage.metrics[4..];
    assert!(late.iter().all(|r| !r.contributed.contains(&"node-1".to_string())), "{late:?}");
    assert!(late.iter().all(|r| r.contributed.len() == 3), "{late:?}");
    let left = lineage.metrics.iter().flat_map(|r| &r.failures).find(|f| f.node == "node-1");
    if let Some(f) = left {
        assert!(f.error.contains("left"), "{f:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(100), "the round did not wait for its time-out");
}

#[test]
fn a_coordinator_killed_mid_session_is_resumed() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut env = Env::start();
    for k in 0..3 {
        env.node(k);
    }
    env.wait_for_nodes(3);
    let file = env.swarm_file(10, 3, 30.0);
    // Without the coordinator's held-out data, the session is refused before it starts.
    let out = env.run(&["swarm", "run", &file]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("digits-test") && err.contains("--dataset"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("session"), "announced before it was refused");
    assert!(!env.ok(&["swarm", "list"]).contains("s-"), "nothing stored");

    let rx = env.coordinator(&["swarm", "run", &file]);
    let lines = env.until(&rx, "round  3");
    let id = Env::session_id(&lines);
    env.kill("coordinator");
    let status = env.ok(&["swarm", "status", &id]);
    assert!(status.contains("of 10 rounds done"), "{status}");
    // The dead coordinator's session is listed, so its id can be found again.
    let list = env.ok(&["swarm", "list"]);
    assert!(list.lines().any(|l| l.starts_with(&id) && l.contains("stopped or running")), "{list}");

    // Resumed with no flags beyond the id: the coordinator's datasets were recorded.
    let rx = env.coordinator_bare(&["swarm", "resume", &id]);
    let lines = env.until(&rx, "time:");
    assert!(env.wait_coordinator(), "{}", logs(env.dir.path()));
    assert!(lines.iter().any(|l| l.contains("resumed after round")), "{lines:?}");
    let (lineage, acc) = env.lineage("0.1.0");
    assert_eq!(lineage.session, id);
    check_rounds(&lineage, 10);
    assert!(acc >= 0.88, "accuracy {acc}");
}

#[test]
fn the_session_survives_a_nats_server_restart() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut env = Env::start();
    for k in 0..3 {
        env.node(k);
    }
    env.wait_for_nodes(3);
    let file = env.swarm_file(6, 3, 60.0);
    let rx = env.coordinator(&["swarm", "run", &file]);
    env.until(&rx, "round  2");
    env.nats.restart();
    env.until(&rx, "time:");
    assert!(env.wait_coordinator(), "{}\n{}", logs(env.dir.path()), env.nats.log());
    let (lineage, _) = env.lineage("0.1.0");
    check_rounds(&lineage, 6);
}

/// `tessera` as one person: their own TESSERA_HOME (their keys), the shared hub and NATS.
fn as_person(env: &Env, who: &str) -> Command {
    let mut c = tessera(env);
    c.env("TESSERA_HOME", env.dir.path().join(who));
    c
}

fn person_ok(env: &Env, who: &str, args: &[&str]) -> String {
    let out = as_person(env, who).args(args).output().unwrap();
    assert!(out.status.success(), "{who}: tessera {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn person_fails(env: &Env, who: &str, args: &[&str]) -> String {
    let out = as_person(env, who).args(args).output().unwrap();
    assert!(!out.status.success(), "{who}: tessera {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// docs/private-modules.md, step by step: Alice publishes a private module for Bob, Bob
/// runs it on his node, Carol is refused.
#[test]
fn two_accounts_private_module_walkthrough() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut env = Env::start();
    let alice = person_ok(&env, "alice", &["key", "new"]).trim().to_owned();
    let bob = person_ok(&env, "bob", &["key", "new"]).trim().to_owned();
    person_ok(&env, "carol", &["key", "new"]);
    let bob_node = person_ok(&env, "bob", &["node", "key", "--id", "bob-node"]).trim().to_owned();

    // Alice publishes her worker privately, for Bob's node and Bob.
    let worker = env.dir.path().join("alice-worker");
    tessera_modules::write_module_dir(
        &worker,
        &tessera_modules::FL_SOFTMAX_WORKER_MANIFEST.replace("fl.softmax.worker", "acme.digits.worker"),
        tessera_modules::FL_SOFTMAX_WORKER_WASM,
    )
    .unwrap();
    let worker = worker.to_str().unwrap().to_owned();
    person_ok(&env, "alice", &["module", "publish", &worker, "--private", "--to", &bob_node, "--to", &bob]);
    let show = person_ok(&env, "alice", &["module", "show", "acme.digits.worker"]);
    assert!(show.contains("private") && show.contains(&alice), "{show}");
    // Sealed for its publisher too: Alice reads back what she published.
    let mine = env.dir.path().join("alice-copy");
    person_ok(&env, "alice", &["module", "pull", "acme.digits.worker", "--out", mine.to_str().unwrap()]);
    assert!(mine.join("module.yaml").exists(), "the publisher's copy is unsealed");

    // Bob's node trusts Alice's packages and lets Bob compute on its digits.
    let policy = env.dir.path().join("bob-policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "require_signed_packages: true\ntrusted_publishers:\n  acme: [{alice}]\nrequire_signed_tasks: true\ngrants:\n  - to: {bob}\n    modules: [acme]\n    datasets: [digits]\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(env.dir.path().join("bob-node.log")).unwrap();
    let child = as_person(&env, "bob")
        .args(["node", "run", "--id", "bob-node", "--policy", policy.to_str().unwrap(), "--dataset"])
        .arg(format!("digits={}", env.path("data/node-0/digits.safetensors")))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    env.procs.push(Proc { child, name: "bob-node".into() });
    env.wait_for_nodes(1);

    // Bob runs it.
    let swarm = env.dir.path().join("acme.yaml");
    std::fs::write(
        &swarm,
        "module: acme.digits.worker@0.1.2\nrounds: 3\nmin_participants: 1\nround_timeout_secs: 60\ndataset: digits\neval_dataset: digits-test\npublish_as: bob.digits\n",
    )
    .unwrap();
    let test_set = format!("digits-test={}", env.path("data/coordinator/digits-test.safetensors"));
    let out = person_ok(&env, "bob", &["swarm", "run", swarm.to_str().unwrap(), "--dataset", &test_set]);
    assert!(out.contains("final test accuracy"), "{out}");

    // Carol cannot read it...
    let err = person_fails(&env, "carol", &["module", "pull", "acme.digits.worker", "--out", "carol-copy"]);
    assert!(err.contains("403") && err.contains("no grant"), "{err}");
    // ...nor run it on Bob's node.
    let err = person_fails(&env, "carol", &["swarm", "run", swarm.to_str().unwrap(), "--dataset", &test_set]);
    assert!(err.contains("no grant") || err.contains("403") || err.contains("not a recipient"), "{err}");
    // Revoked, Bob's node can no longer fetch new copies either.
    person_ok(&env, "alice", &["module", "revoke", "acme.digits.worker", &bob_node]);
    let grants = person_ok(&env, "alice", &["module", "grants", "acme.digits.worker"]);
    let line = grants.lines().find(|l| l.contains(&bob_node)).unwrap_or_default();
    assert!(line.contains("revoked"), "{grants}");
    // Usage was metered.
    let usage = person_ok(&env, "bob", &["usage", "--nats", &env.nats.url()]);
    assert!(usage.contains("node bob-node:") && usage.contains("tasks"), "{usage}");

    // Every listing and show command prints the fields docs/json.md documents (actors and
    // queues are checked with a live actor in tests/live.rs).
    let runs: serde_json::Value = serde_json::from_str(&person_ok(&env, "bob", &["swarm", "list", "--json"])).unwrap();
    let run = runs[0]["id"].as_str().unwrap().to_owned();
    let nats = env.nats.url();
    let commands: Vec<(&str, Vec<&str>)> = vec![
        ("tessera module list", vec!["module", "list"]),
        ("tessera module show", vec!["module", "show", "acme.digits.worker"]),
        ("tessera module card", vec!["module", "card", "fl.softmax.worker"]),
        ("tessera module grants", vec!["module", "grants", "acme.digits.worker"]),
        ("tessera model list", vec!["model", "list"]),
        ("tessera model show", vec!["model", "show", "bob.digits"]),
        ("tessera model card", vec!["model", "card", "bob.digits"]),
        ("tessera model lineage", vec!["model", "lineage", "bob.digits"]),
        ("tessera model tensors", vec!["model", "tensors", "bob.digits"]),
        ("tessera swarm list", vec!["swarm", "list"]),
        ("tessera swarm status", vec!["swarm", "status", &run]),
        ("tessera swarm logs", vec!["swarm", "logs", &run]),
        ("tessera node list", vec!["node", "list"]),
        ("tessera node doctor", vec!["node", "doctor"]),
        ("tessera node-info", vec!["node-info"]),
        ("tessera usage", vec!["usage", "--nats", &nats]),
        ("tessera namespace show", vec!["namespace", "show", "acme"]),
        ("tessera key list", vec!["key", "list"]),
        ("tessera key show", vec!["key", "show"]),
    ];
    for (path, args) in &commands {
        let mut args = args.clone();
        args.push("--json");
        let out = as_person(&env, "alice").args(&args).output().unwrap();
        // `node doctor` exits non-zero where the machine lacks a required protection; its
        // JSON says so.
        assert!(
            out.status.success() || *path == "tessera node doctor",
            "tessera {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_doc::check(path, &String::from_utf8(out.stdout).unwrap());
    }
    for (path, _, _) in json_doc::documented() {
        assert!(
            commands.iter().any(|(p, _)| *p == path) || json_doc::CHECKED_IN_LIVE.contains(&path.as_str()),
            "`{path} --json` is documented but not checked"
        );
    }
}

/// The value after `prefix` on the first line that has it.
fn after<'a>(lines: &'a [String], prefix: &str) -> &'a str {
    lines.iter().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in {lines:#?}"))
}

#[test]
fn the_python_manta_swarm_on_four_node_processes_matches_the_embedded_run() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut env = Env::start();
    for k in 0..4 {
        env.node(k);
    }
    env.wait_for_nodes(4);
    let swarm = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/swarms/manta-fl/swarm.py");
    let swarm = swarm.to_str().unwrap();
    let rx = env.coordinator_bare(&["swarm", "run", swarm]);
    let lines = env.until(&rx, "time:");
    assert!(env.wait_coordinator(), "{}", logs(env.dir.path()));
    let ended = lines.iter().find(|l| l.contains("finished (its scheduler stopped it) after")).unwrap_or_else(|| {
        panic!("the scheduler did not stop the run early: {lines:#?}");
    });
    let run = ended.strip_prefix("run ").unwrap().split(':').next().unwrap().to_owned();
    let iterations: u32 = ended.rsplit("after ").next().unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(iterations < 30, "{ended}");
    let model: tessera_core::Digest = after(&lines, "global model: ").parse().unwrap();
    let bytes = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let b = tessera_nats::backend(&env.nats.url(), &tessera_nats::NatsOptions::default()).await.unwrap();
        b.blobs.get(&model).await.unwrap().expect("the model is in the blob store")
    });
    let (_, held_out) = tessera_cluster::digits::split(4, 0.2, 42);
    let acc = tessera_cluster::digits::accuracy(&bytes, &held_out).unwrap();
    assert!(acc >= 0.90, "held-out accuracy {acc}");

    // Operating the run: listed with its state, shown, its task logs per node.
    let list = env.ok(&["swarm", "list"]);
    assert!(list.lines().any(|l| l.starts_with(&run) && l.contains("swarm") && l.contains("scheduler")), "{list}");
    let status = env.ok(&["swarm", "status", &run]);
    assert!(status.contains(&format!("{iterations} of at most 30 iterations done")), "{status}");
    let logs_out = env.ok(&["swarm", "logs", &run, "--iteration", "1", "--task", "worker"]);
    let nodes: Vec<&str> = logs_out.lines().map(|l| l.split_whitespace().nth(2).unwrap()).collect();
    assert_eq!(nodes, ["node-0]", "node-1]", "node-2]", "node-3]"], "{logs_out}");
    assert!(logs_out.lines().all(|l| l.contains("INFO") && l.contains("held-out rows")), "{logs_out}");
    let stop = env.run(&["swarm", "stop", &run]);
    assert!(!stop.status.success(), "an ended run cannot be stopped");
    let bad = env.run(&["swarm", "logs", "../../etc"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("run id"), "{}", String::from_utf8_lossy(&bad.stderr));

    // The same swarm in one process gives the same model.
    let mut args: Vec<String> = vec!["swarm".into(), "run".into(), swarm.into(), "--embedded".into()];
    for k in 0..4 {
        args.push("--node".into());
        args.push(format!("node-{k}:digits={}", env.path(&format!("data/node-{k}/digits.safetensors"))));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let embedded = env.ok(&args);
    let embedded: Vec<String> = embedded.lines().map(str::to_owned).collect();
    assert_eq!(after(&embedded, "global model: "), model.to_string(), "{embedded:#?}");
    assert!(embedded.iter().any(|l| l.contains(&format!("after {iterations} iterations"))), "{embedded:#?}");
}

#[test]
fn the_calculator_flow_runs_add_and_mult_on_two_node_processes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut env = Env::start();
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/dataflows");
    env.ok(&["module", "publish", examples.join("calc-ops").to_str().unwrap()]);
    for (id, ops) in [("node-add", "parse,add"), ("node-mult", "mult")] {
        let log = std::fs::File::create(env.dir.path().join(format!("{id}.log"))).unwrap();
        let child = tessera(&env)
            .args(["node", "run", "--open", "--id", id, "--ops", ops])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        env.procs.push(Proc { child, name: id.into() });
    }
    env.wait_for_nodes(2);
    let flow = examples.join("calc.yaml");
    let flow = flow.to_str().unwrap();
    for (line, want) in [("add 40 and 2", 42), ("multiply 42 and 10", 420)] {
        let out = env.ok(&["flow", "run", flow, "--input", &format!("calc_string={line}")]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["get_single"]["result"], want, "{out}");
    }
    // The same context id again is a new run, not the earlier run's answers.
    let again = env.ok(&["flow", "run", flow, "--context", "c-1", "--input", "calc_string=add 1 and 2"]);
    assert!(again.contains("\"result\": 3"), "{again}");
    let again = env.ok(&["flow", "run", flow, "--context", "c-1", "--input", "calc_string=multiply 3 and 4"]);
    assert!(again.contains("\"result\": 12"), "{again}");
    // One context per record, printed in the records' order.
    let records = env.dir.path().join("lines.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|i| {
            let line = if i % 2 == 0 { format!("add {i} and 2") } else { format!("multiply {i} and 10") };
            serde_json::json!({ "calc_string": line }).to_string()
        })
        .collect();
    std::fs::write(&records, lines.join("\n") + "\n\n").unwrap();
    let out = env.ok(&["flow", "run", flow, "--context", "batch", "--records", records.to_str().unwrap()]);
    let got: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), 20, "{out}");
    for (i, v) in got.iter().enumerate() {
        let want = if i % 2 == 0 { i + 2 } else { i * 10 };
        assert_eq!(v["context"], format!("batch-{}", i + 1));
        assert_eq!(v["get_single"]["result"], want, "{v}");
    }
    // A tensor given as a file: `add` gets it as a numpy array, [6, 7] -> 13.
    let tensor_flow = env.dir.path().join("tensor-add.yaml");
    std::fs::write(
        &tensor_flow,
        "definitions:\n  numbers: {type: tensor, dtype: F32, shape: [null]}\n  result: {type: float}\noperations:\n  \
         add: {module: calc.ops@0.1.0, function: add, inputs: {numbers: numbers}, outputs: {sum: result}}\n\
         inputs: [numbers]\noutput: {get_single: [result]}\n",
    )
    .unwrap();
    let mut header = br#"{"data":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(6f32.to_le_bytes());
    file.extend(7f32.to_le_bytes());
    let numbers = env.dir.path().join("numbers.safetensors");
    std::fs::write(&numbers, file).unwrap();
    let input = format!("numbers=@{}", numbers.display());
    let out = env.ok(&["flow", "run", tensor_flow.to_str().unwrap(), "--input", &input]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["get_single"]["result"], 13.0, "{out}");
    // A bad record is refused naming its line, before anything runs.
    std::fs::write(&records, format!("{}\n[1, 2]\n", lines[0])).unwrap();
    let out = tessera(&env).args(["flow", "run", flow, "--records", records.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lines.jsonl line 2"), "{err}");
}

impl Env {
    /// Starts `tessera node run --ops OPS` named `id`; its log goes to `<id>.log`.
    fn ops_node(&mut self, id: &str, ops: &str) {
        let log = std::fs::File::create(self.dir.path().join(format!("{id}.log"))).unwrap();
        let child = tessera(self)
            .args(["node", "run", "--open", "--id", id, "--ops", ops])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.push(Proc { child, name: id.into() });
    }
}

#[test]
fn the_node_process_running_mult_killed_mid_flow_still_gives_420_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut env = Env::start();
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/dataflows");
    // A slow `mult` (calc.ops@0.2.0): it says so in its log, then takes its time.
    let slow = env.dir.path().join("slow-ops");
    std::fs::create_dir_all(&slow).unwrap();
    let manifest = std::fs::read_to_string(examples.join("calc-ops/module.yaml")).unwrap();
    std::fs::write(slow.join("module.yaml"), manifest.replace("version: 0.1.0", "version: 0.2.0")).unwrap();
    let ops = std::fs::read_to_string(examples.join("calc-ops/ops.py")).unwrap().replace(
        "    def mult(self, numbers):\n",
        "    def mult(self, numbers):\n        import time\n        self.log.info('multiplying')\n        time.sleep(5)\n",
    );
    std::fs::write(slow.join("ops.py"), ops).unwrap();
    env.ok(&["module", "publish", slow.to_str().unwrap()]);
    let flow = std::fs::read_to_string(examples.join("calc.yaml"))
        .unwrap()
        .replace("calc.ops@0.1.0", "calc.ops@0.2.0")
        .replace("output: {get_single: [result]}", "output: {get_multi: [result]}");
    let flow_file = env.dir.path().join("slow-calc.yaml");
    std::fs::write(&flow_file, flow).unwrap();
    env.ops_node("node-parse", "parse,add");
    env.ops_node("node-m0", "mult");
    env.ops_node("node-m1", "mult");
    env.wait_for_nodes(3);
    let rx = env.coordinator_bare(&[
        "flow",
        "run",
        flow_file.to_str().unwrap(),
        "--input",
        "calc_string=multiply 42 and 10",
    ]);
    // Kill whichever mult node is multiplying.
    let started = Instant::now();
    let victim = loop {
        let found = ["node-m0", "node-m1"].into_iter().find(|id| {
            std::fs::read_to_string(env.dir.path().join(format!("{id}.log"))).is_ok_and(|l| l.contains("multiplying"))
        });
        if let Some(id) = found {
            break id;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no node started multiplying:\n{}", logs(env.dir.path()));
        std::thread::sleep(Duration::from_millis(100));
    };
    env.kill(victim);
    let out: Vec<String> = rx.iter().collect();
    assert!(env.wait_coordinator(), "{}", logs(env.dir.path()));
    let v: serde_json::Value = serde_json::from_str(&out.join("\n")).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(v["get_multi"]["result"], serde_json::json!([420]), "420, once: {v}");
    assert_eq!(v["runs"]["mult"], 1, "{v}");
    // The other mult node ran it.
    let other = if victim == "node-m0" { "node-m1" } else { "node-m0" };
    let log = std::fs::read_to_string(env.dir.path().join(format!("{other}.log"))).unwrap();
    assert!(log.contains("multiplying"), "{}", logs(env.dir.path()));
}
