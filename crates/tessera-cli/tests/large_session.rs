//! A federated session of a large model on real processes: a nats-server, a hub, four
//! nodes and a coordinator, each a `tessera` (or `nats-server`) process, the worker a
//! Python process under each node (`examples/fl-large-worker`). Every process's peak
//! memory (`VmHWM`) is sampled throughout and must stay under 2.5 times the model: the
//! coordinator sums updates as they stream in, the nodes hold the model once on the way in
//! and once on the way out, and the worker trains in the input's own memory. The
//! nats-server runs with Go's soft memory limit (`GOMEMLIMIT`) at the model's size, under
//! which nats-server 2.12 and newer free the file blocks they cache.
//!
//! The model has `TESSERA_FL_MODEL_MB` decimal megabytes of float32 values (256 by
//! default; `bench/large-session` runs 400 on a release build, and docs/benchmarks.md has
//! its figures). Each process starts at 30 to 90 MB, which a model this size dwarfs. Needs a
//! Python with numpy: `scripts/test` makes one and exports `TESSERA_PYTHON`.

#[path = "support/hub.rs"]
mod hub_process;
use hub_process::spawn_hub;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_core::tensor::{FixedTensor, Model, Tensor};
use tessera_nats::testing::NatsServer;

fn python() -> String {
    let py = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py).args(["-c", "import numpy"]).status().is_ok_and(|s| s.success());
    assert!(ok, "{py} lacks numpy: run scripts/test (it makes target/venv) or set TESSERA_PYTHON");
    py
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[path = "support/peak.rs"]
mod peak;
use peak::peak_rss;

/// The processes a process started, and theirs.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            out.push(c);
            out.extend(descendants(c));
        }
    }
    out
}

/// Samples the peak memory of named processes and of what they start (named
/// `<name> child`) until stopped.
struct Sampler {
    peaks: Arc<Mutex<BTreeMap<String, u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(watched: Arc<Mutex<Vec<(String, u32)>>>) -> Sampler {
        let peaks = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peaks.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let list = watched.lock().unwrap().clone();
                for (name, pid) in list {
                    let mut seen = vec![(name.clone(), pid)];
                    seen.extend(descendants(pid).into_iter().map(|c| (format!("{name} child"), c)));
                    for (n, pid) in seen {
                        if let Some(rss) = peak_rss(pid) {
                            let mut g = p.lock().unwrap();
                            let e = g.entry(n).or_insert(0);
                            *e = (*e).max(rss);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler { peaks, stop, thread: Some(thread) }
    }

    fn finish(mut self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.peaks.lock().unwrap().clone()
    }
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Node `k`'s dataset: its target `k` and `10 (k + 1)` examples.
fn write_targets(path: &Path, k: usize) {
    let mut m = Model::default();
    m.floats.0.insert("target".into(), Tensor { shape: vec![1], data: vec![k as f32] });
    let examples = (10 * (k as i64 + 1)).to_le_bytes().to_vec();
    m.fixed.insert(
        "examples".into(),
        FixedTensor { dtype: tessera_core::tensor::Dtype::I64, shape: vec![1], bytes: examples },
    );
    std::fs::write(path, m.encode()).unwrap();
}

fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            out.push_str(&format!("--- {}\n{}\n", p.display(), std::fs::read_to_string(&p).unwrap_or_default()));
        }
    }
    out
}

/// Waits until `n` nodes are registered.
fn wait_for_nodes(url: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let b = rt.block_on(tessera_nats::backend(url, &tessera_nats::NatsOptions::default())).unwrap();
    loop {
        let count = rt.block_on(tessera_node::list_nodes(b.members.as_ref())).unwrap().len();
        if count >= n {
            return;
        }
        assert!(Instant::now() < deadline, "only {count} of {n} nodes registered");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A loss a round line reports after `label`.
fn loss(line: &str, label: &str) -> f64 {
    let value = line.split(label).nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok());
    value.unwrap_or_else(|| panic!("no {label:?} in {line:?}"))
}

#[test]
fn a_large_model_session_stays_within_two_and_a_half_models_per_process() {
    let mb: u64 = std::env::var("TESSERA_FL_MODEL_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    // FedAvg by default; bench/large-session may ask for FedMedian, whose round reads the
    // updates a window at a time where they are stored.
    let strategy = std::env::var("TESSERA_FL_STRATEGY").unwrap_or_else(|_| "fedavg".into());
    let parameters = mb * 1_000_000 / 4;
    let model_bytes = parameters * 4;
    let python = python();
    // The binary under test; bench/large-session gives a release build.
    let binary = std::env::var("TESSERA_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tessera").into());
    let dir = tempfile::tempdir().unwrap();
    // Go's soft memory limit at the model's size: nats-server 2.12 and newer then free
    // the file store's cached blocks as the heap nears it (docs/benchmarks.md).
    let nats = NatsServer::start_with_memory_limit(model_bytes);
    let tessera = |args: &[&str]| {
        let mut c = Command::new(&binary);
        c.args(args)
            .env_remove("RUST_LOG")
            .env("TESSERA_NATS", nats.url())
            .env("TESSERA_HOME", dir.path().join("home"))
            .env("TESSERA_PYTHON", &python)
            .current_dir(dir.path());
        c
    };
    let watched = Arc::new(Mutex::new(vec![("nats-server".to_owned(), nats.pid().unwrap())]));
    let sampler = Sampler::start(watched.clone());
    let mut procs = Procs(Vec::new());

    let (hub, hub_url) = spawn_hub(tessera(&["hub", "serve", "--listen", "127.0.0.1:0", "--data", "hub"]));
    watched.lock().unwrap().push(("hub".into(), hub.id()));
    procs.0.push(hub);
    let with_hub = |args: &[&str]| {
        let mut c = tessera(args);
        c.env("TESSERA_HUB", &hub_url);
        c
    };
    let worker = repo().join("examples/fl-large-worker");
    let out = with_hub(&["module", "publish", worker.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    for k in 0..4 {
        let data = dir.path().join(format!("targets-{k}.safetensors"));
        write_targets(&data, k);
        let log = std::fs::File::create(dir.path().join(format!("node-{k}.log"))).unwrap();
        let node = with_hub(&["node", "run", "--open", "--no-prestart", "--id", &format!("node-{k}")])
            .args(["--max-output", "2GiB", "--dataset"])
            .arg(format!("targets={}", data.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        watched.lock().unwrap().push((format!("node-{k}"), node.id()));
        procs.0.push(node);
    }
    wait_for_nodes(&nats.url(), 4);
    let spec = dir.path().join("fl.yaml");
    std::fs::write(
        &spec,
        format!(
            "module: fl.large.numpy@0.1.0\nrounds: 2\nmin_participants: 4\nround_timeout_secs: 900\n\
             dataset: targets\neval_dataset: heldout\nconfig: {{parameters: {parameters}, lr: 0.5}}\nseed: 7\n\
             strategy: {strategy}\n"
        ),
    )
    .unwrap();
    let started = Instant::now();
    let log = std::fs::File::create(dir.path().join("coordinator.log")).unwrap();
    // The coordinator evaluates each stored model against the mean target, 2.
    let heldout = dir.path().join("heldout.safetensors");
    write_targets(&heldout, 2);
    let heldout = format!("heldout={}", heldout.display());
    let mut coordinator = with_hub(&["swarm", "run", spec.to_str().unwrap(), "--max-output", "2GiB"])
        .args(["--dataset", &heldout])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    watched.lock().unwrap().push(("coordinator".into(), coordinator.id()));
    let stdout = coordinator.stdout.take().unwrap();
    let printed: Vec<String> = BufReader::new(stdout).lines().map_while(Result::ok).collect();
    let ok = coordinator.wait().unwrap().success();
    let seconds = started.elapsed().as_secs_f64();
    let peaks = sampler.finish();
    let text = printed.join("\n");
    assert!(ok, "the session failed:\n{text}\n{}", logs(dir.path()));

    // The sums are right: node k pulls every value halfway to k, weighted by 10 (k + 1)
    // examples, so the model moves halfway to the mean target 2 each round. From values
    // drawn from N(0, 1), the loss before round 1 is 1 + Σ n_k k² / Σ n_k = 6, and before
    // round 2, 0.25 + Σ n_k (1 - k)² / Σ n_k = 2.25. The stored models, read back by the
    // coordinator's evaluation against 2: 0.5 w + 1 gives 0.25 + 1, then 0.25 w + 1.5 gives
    // 0.0625 + 0.25.
    // FedMedian takes, per value, the mean of the middle two of four: the model moves
    // halfway to 1.5, so 0.5 w + 0.75 gives 0.25 + 1.5625 against 2, and the losses before
    // round 2 are 0.25 + Σ n_k (0.75 - k)² / Σ n_k = 2.8125; then 0.25 w + 1.125 gives
    // 0.0625 + 0.765625.
    let expected = match strategy.as_str() {
        "fedavg" => [(6.0, 1.25), (2.25, 0.3125)],
        "fedmedian" => [(6.0, 1.8125), (2.8125, 0.828125)],
        other => panic!("TESSERA_FL_STRATEGY={other}: this test knows the losses of fedavg and fedmedian"),
    };
    let rounds: Vec<&str> =
        printed.iter().map(String::as_str).filter(|l| l.trim_start().starts_with("round ")).collect();
    assert_eq!(rounds.len(), 2, "{text}");
    for (line, (train, test)) in rounds.iter().zip(expected) {
        assert!(line.contains("(4 nodes"), "{line}");
        assert!((loss(line, "train loss ") - train).abs() < 0.01, "{line}: expected a train loss near {train}");
        assert!((loss(line, "test loss ") - test).abs() < 0.01, "{line}: expected a test loss near {test}");
    }

    let mut report = format!("model {model_bytes} bytes, {strategy}, the session in {seconds:.1} s\n");
    for line in &rounds {
        report.push_str(&format!("  {}\n", line.trim()));
    }
    report.push_str("peak memory:\n");
    for (name, peak) in &peaks {
        report.push_str(&format!(
            "  {name:<20} {:>6.0} MB  {:.2}x the model\n",
            *peak as f64 / 1e6,
            *peak as f64 / model_bytes as f64
        ));
    }
    eprintln!("{report}");
    for name in ["coordinator", "node-0", "node-0 child", "nats-server"] {
        assert!(peaks.contains_key(name), "{name} was not sampled:\n{report}");
    }
    // nats-server before 2.12 keeps every block read or written in the last 10 s in
    // memory whatever its limit (nats-io/nats-server#5740): it holds what a round moved.
    let bound = model_bytes * 5 / 2;
    for (name, peak) in &peaks {
        let hint = if name == "nats-server" {
            format!(" ({}; scripts/test installs 2.15.1, 2.12 or newer is needed)", NatsServer::version())
        } else {
            String::new()
        };
        assert!(*peak < bound, "{name} reached {peak} bytes, over 2.5 times the model{hint}:\n{report}");
    }
}
