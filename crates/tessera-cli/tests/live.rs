//! Live modules as the README runs them, on real processes: a hub, an embedded node with its
//! gateway, the scikit-learn actor (launch, calls, bad calls, its process killed from
//! outside, the Python client with numpy tensors), queues, and the ensemble pipeline.
//!
//! Needs a Python with numpy and scikit-learn: `scripts/test` makes one and exports
//! `TESSERA_PYTHON`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

#[path = "support/json_doc.rs"]
mod json_doc;

fn python() -> String {
    let py = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py).args(["-c", "import numpy, sklearn"]).status().is_ok_and(|s| s.success());
    assert!(ok, "{py} lacks numpy or scikit-learn: run scripts/test (it makes target/venv) or set TESSERA_PYTHON");
    py
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Env {
    dir: tempfile::TempDir,
    hub: String,
    endpoint: String,
    python: String,
    procs: Vec<Child>,
    node_pid: u32,
}

impl Drop for Env {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// Starts a process and returns it with the first word after `prefix` on its stderr.
fn spawn_announcing(mut cmd: Command, prefix: &str, log: PathBuf) -> (Child, String) {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let url = loop {
        let line = lines.next().unwrap_or_else(|| panic!("no {prefix:?} line in:\n{seen}")).unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line.strip_prefix(prefix) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(log).unwrap();
        for l in lines.map_while(Result::ok) {
            let _ = writeln!(f, "{l}");
        }
    });
    (child, url)
}

impl Env {
    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
        c.env_remove("RUST_LOG")
            .env("TESSERA_HUB", &self.hub)
            .env("TESSERA_ENDPOINT", &self.endpoint)
            .env("TESSERA_HOME", self.dir.path().join("home"))
            .env("TESSERA_PYTHON", &self.python)
            .current_dir(repo());
        c
    }

    fn start() -> Env {
        let python = python();
        let dir = tempfile::tempdir().unwrap();
        let mut env = Env { dir, hub: String::new(), endpoint: String::new(), python, procs: Vec::new(), node_pid: 0 };
        let mut hub = env.cmd();
        hub.args(["hub", "serve", "--listen", "127.0.0.1:0", "--data"]).arg(env.dir.path().join("hub"));
        let (child, url) = spawn_announcing(hub, "hub: ", env.dir.path().join("hub.log"));
        env.procs.push(child);
        env.hub = url;
        let mut node = env.cmd();
        node.env("TESSERA_HUB", &env.hub).args([
            "node",
            "run",
            "--embedded",
            "--open",
            "--id",
            "n1",
            "--listen",
            "127.0.0.1:0",
            // One Python process per actor: the one the test kills from outside is the
            // actor's (prestarting is tested in tessera-process).
            "--no-prestart",
        ]);
        let (child, url) = spawn_announcing(node, "gateway: ", env.dir.path().join("node.log"));
        env.node_pid = child.id();
        env.procs.push(child);
        env.endpoint = url;
        env
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd().args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tessera {args:?}: {}\nnode log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "tessera {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(self.ok(args).trim()).unwrap()
    }

    /// The node's module processes (its children running Python).
    fn python_children(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // pid (comm) state ppid ...
            let Some(after) = stat.rsplit_once(") ") else { continue };
            let ppid: u32 = after.1.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
            if ppid == self.node_pid && stat.contains("python") {
                out.push(pid);
            }
        }
        out
    }
}

#[test]
fn sklearn_actor_queues_and_the_ensemble_pipeline() {
    let env = Env::start();
    for m in ["examples/sklearn-actor", "examples/pipeline/digits-data", "examples/pipeline/scale"] {
        env.ok(&["module", "publish", m]);
    }
    for m in ["examples/pipeline/digits-model", "examples/pipeline/vote"] {
        env.ok(&["module", "publish", m]);
    }

    // Two launches at once make one actor.
    let a = env.cmd().args(["launch", "demo.digits-sklearn"]).output().unwrap();
    let b = env.cmd().args(["launch", "demo.digits-sklearn"]).output().unwrap();
    assert!(a.status.success() && b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let actors = env.json(&["actors", "--json"]);
    assert_eq!(actors.as_array().unwrap().len(), 1, "{actors}");
    assert_eq!(actors[0]["name"], "demo.digits-sklearn");
    assert_eq!(actors[0]["reserved"]["memory"], 256 << 20);
    json_doc::check("tessera actors", &actors.to_string());

    // Calls.
    let score: f64 = env.ok(&["call", "demo.digits-sklearn", "score"]).trim().parse().unwrap();
    assert!(score >= 0.9, "held-out accuracy {score}");
    let sample = env.json(&["call", "demo.digits-sklearn", "sample", "5"]);
    let x = sample["x"].to_string();
    let labels = env.json(&["call", "demo.digits-sklearn", "predict", &x]);
    let right = labels.as_array().unwrap().iter().zip(sample["y"].as_array().unwrap()).filter(|(a, b)| a == b).count();
    assert!(right >= 4, "{labels} vs {}", sample["y"]);

    // Bad calls: clear errors, and the actor stays up.
    let e = env.fails(&["call", "demo.digits-sklearn", "predict", "[[1, 2]]"]);
    assert!(e.contains("ValueError") && e.contains("64 pixel values"), "{e}");
    let e = env.fails(&["call", "demo.digits-sklearn", "fit_everything"]);
    assert!(e.contains("fit_everything") && e.contains("predict"), "{e}");
    let e = env.fails(&["call", "demo.digits-sklearn", "score", "1", "2"]);
    assert!(e.contains("bad arguments") || e.contains("argument"), "{e}");
    let e = env.fails(&["call", "demo.nothing-here", "f"]);
    assert!(e.contains("demo.nothing-here") && e.contains("not_found"), "{e}");
    assert_eq!(env.json(&["call", "demo.digits-sklearn", "calls"]), 2, "one predict call and one that failed");

    // Its process killed from outside: noticed, and the next call restarts it with its state.
    let children = env.python_children();
    assert_eq!(children.len(), 1, "one Python process for the actor: {children:?}");
    Command::new("kill").args(["-9", &children[0].to_string()]).status().unwrap();
    // Dead once it is a zombie (waiting for the node to notice) or gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_to_string(format!("/proc/{}/stat", children[0]))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    {
        assert!(std::time::Instant::now() < deadline, "the process did not die");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(env.json(&["call", "demo.digits-sklearn", "calls"]), 2, "state restored after the kill");
    let now = env.python_children();
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], children[0], "a new process");

    // The Python client: a handle with methods, numpy arrays in and out.
    let script = format!(
        r#"
import numpy as np, tessera
m = tessera.connect("demo.digits-sklearn", endpoint="{ep}")
s = m.sample(4)
x = np.array(s["x"], dtype=np.float32)
labels = m.predict(x=x)
proba = m.predict_proba(x=x)
assert isinstance(proba, np.ndarray) and proba.shape == (4, 10), proba
assert list(np.argmax(proba, axis=1)) == labels, (proba, labels)
try:
    m.no_such_function()
    raise SystemExit("no error")
except tessera.CallError as e:
    assert "no_such_function" in str(e), e
q = tessera.Client("{ep}").queue("demo.inbox")
q.put({{"n": 1}})
assert len(q) == 1
assert q.get(wait=1) == {{"n": 1}}
assert q.get(wait=0.1) is None
print(sum(int(a == b) for a, b in zip(labels, s["y"])))
"#,
        ep = env.endpoint
    );
    let out = Command::new(&env.python).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "python client: {}", String::from_utf8_lossy(&out.stderr));
    let right: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(right >= 3);

    // Queues from the command line; bounded.
    env.ok(&["queue", "put", "demo.cli", r#"{"a": 1}"#]);
    assert_eq!(env.ok(&["queue", "len", "demo.cli"]).trim(), "1");
    let len = env.ok(&["queue", "len", "demo.cli", "--json"]);
    json_doc::check("tessera queue len", &len);
    assert_eq!(serde_json::from_str::<Value>(&len).unwrap()["len"], 1);
    // The gateway's metrics: calls and their latency by actor, queue depths.
    let metrics = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { reqwest::get(format!("{}/metrics", env.endpoint)).await.unwrap().text().await.unwrap() });
    let sample = |prefix: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in the gateway's /metrics:\n{metrics}"))
    };
    assert_eq!(sample("tessera_queue_depth{queue=\"demo.cli\"}"), 1.0);
    assert!(sample("tessera_calls_total{actor=\"demo.digits-sklearn\",outcome=\"ok\"}") >= 2.0);
    assert!(sample("tessera_call_seconds_count{actor=\"demo.digits-sklearn\"}") >= 2.0);
    assert!(sample("tessera_gateway_requests_total{method=\"POST\",route=\"/api/v1/call\",status=\"200\"}") >= 2.0);
    assert_eq!(env.ok(&["queue", "get", "demo.cli"]).trim(), r#"{"a":1}"#);
    assert_eq!(env.ok(&["queue", "get", "demo.cli", "--wait", "0.1"]).trim(), "");

    // The ensemble pipeline, on 40 + 40 digits.
    let text = std::fs::read_to_string(repo().join("examples/pipeline/digits-ensemble.yaml"))
        .unwrap()
        .replace("parts: 2}", "parts: 2, limit: 40}");
    let file = env.dir.path().join("pipeline.yaml");
    std::fs::write(&file, text).unwrap();
    let out = env.dir.path().join("results.jsonl");
    let res = env.cmd().args(["pipeline", "run"]).arg(&file).arg("--out").arg(&out).output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    // The summary says how well the ensemble and each model did, and the actors it launched
    // are stopped.
    let stdout = String::from_utf8_lossy(&res.stdout);
    let summary =
        stdout.lines().find(|l| l.starts_with("demo.vote: 80 result(s)")).unwrap_or_else(|| panic!("{stdout}"));
    let ensemble: f64 = summary
        .split("ensemble accuracy ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(ensemble >= 0.9, "{summary}");
    assert!(summary.contains("knn ") && summary.contains("logreg ") && summary.contains("tree "), "{summary}");
    assert!(stderr.contains("stopped the 7 actor(s)"), "{stderr}");
    let rows: Vec<Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 80);
    let mut items: Vec<&str> = rows.iter().map(|r| r["item"].as_str().unwrap()).collect();
    items.dedup();
    assert_eq!(items.len(), 80, "each item once");
    let right = rows.iter().filter(|r| r["value"]["label"] == r["value"]["y"]).count();
    assert!(right as f64 / 80.0 >= 0.9, "ensemble accuracy {right}/80");
    for r in &rows {
        assert_eq!(r["value"]["votes"].as_object().unwrap().len(), 3, "three models voted: {r}");
    }
    let actors = env.json(&["actors", "--json"]);
    assert_eq!(actors.as_array().unwrap().len(), 1, "only the actor launched before: {actors}");
    // With --keep they stay.
    let res = env.cmd().args(["pipeline", "run", "--keep"]).arg(&file).arg("--out").arg(&out).output().unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let actors = env.json(&["actors", "--json"]);
    assert_eq!(actors.as_array().unwrap().len(), 8, "{actors}");
    // Kill.
    env.ok(&["kill", "demo.vote"]);
    let e = env.fails(&["kill", "demo.vote"]);
    assert!(e.contains("demo.vote"), "{e}");
}

/// The Python developer loop: a new module from the template, its own tests, a run, then
/// launched from its folder, changed and relaunched with --replace; launching another
/// package under a running name without --replace is refused and says how.
#[test]
fn a_python_module_from_new_to_a_replaced_actor() {
    let env = Env::start();
    let dir = env.dir.path().join("greeter");
    let d = dir.to_str().unwrap();
    env.ok(&["module", "new", d, "--runtime", "python", "--name", "demo.greeter"]);
    // The template's tests pass without a node.
    let t = Command::new(&env.python).args(["-m", "unittest", "-q"]).current_dir(&dir).output().unwrap();
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let out = env.ok(&["module", "run", d, "--set", "greeting=hi", "--input", &format!("data={d}/module.py")]);
    assert!(out.contains("message: \"hi: "), "{out}");

    env.ok(&["launch", d]);
    assert_eq!(env.ok(&["call", "demo.greeter", "greet", "Ada"]).trim(), "\"hello, Ada!\"");
    // A change: launching without --replace is refused, and the answer says how.
    let code = std::fs::read_to_string(dir.join("module.py")).unwrap().replace("{who}!", "{who}, again!");
    std::fs::write(dir.join("module.py"), code).unwrap();
    let err = env.fails(&["launch", d]);
    assert!(err.contains("kill it first") && err.contains("--tag"), "{err}");
    env.ok(&["launch", d, "--replace"]);
    assert_eq!(env.ok(&["call", "demo.greeter", "greet", "Ada"]).trim(), "\"hello, Ada, again!\"");
    let shown: Value = serde_json::from_str(&env.ok(&["module", "list", "--all", "--json"])).unwrap();
    let builds: Vec<&str> = shown.as_array().unwrap().iter().filter_map(|r| r["version"].as_str()).collect();
    assert_eq!(builds.len(), 2, "two dev builds: {builds:?}");
    assert!(builds.iter().all(|v| v.starts_with("0.1.0-dev.")), "{builds:?}");
    // The test file stayed out of the package (.tesseraignore).
    let pulled = env.dir.path().join("pulled");
    env.ok(&["module", "pull", &format!("demo.greeter@{}", builds[1]), "--out", pulled.to_str().unwrap()]);
    assert!(pulled.join("module.py").exists() && !pulled.join("test_module.py").exists());
    env.ok(&["kill", "demo.greeter"]);
}
