//! A module whose behaviour the config picks: `echo`, `spin`, `alloc`, `panic`, `fail`,
//! `context` (uses every import), `big-output`, `work` (busy for `ms`, then adds a result),
//! and for actors `count` (a counter kept in memory) with `save_state` / `restore_state`;
//! escape attempts `read-file`, `list-dir`, `write-file` (`path`), `connect` (`port`) and
//! `print` (`bytes` to stdout); and a federated worker of a generated model for measuring
//! the platform (memory, large models) rather than learning anything: `init` makes
//! `params` f32 zeros (one safetensors tensor `p`), `train` adds `0.001 * (1 + seed % 7)`
//! to every value of its `model` input and reports `1 + seed % 3` examples, `evaluate`
//! reports a loss; each fails on a model whose first value is past `train_fails_above` or
//! `evaluate_fails_above`.

wit_bindgen::generate!({ path: "../../wit", world: "module" });

use tessera::module::log::{Level, log};
use tessera::module::{local, world_state};

struct Programs;

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(serde::Deserialize)]
struct Config {
    /// What to do; actors' calls name it `function`.
    #[serde(default)]
    mode: String,
    #[serde(default)]
    function: Option<String>,
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    dataset: String,
    #[serde(default)]
    ms: u64,
    /// An actor launched with `stateless: true` has no state hooks.
    #[serde(default)]
    stateless: bool,
    /// A call's positional arguments.
    #[serde(default)]
    args: Vec<serde_json::Value>,
    /// A file or folder to try (`read-file`, `list-dir`, `write-file`).
    #[serde(default)]
    path: String,
    /// A TCP port on 127.0.0.1 to try (`connect`).
    #[serde(default)]
    port: u16,
    /// Parameters of the generated model (`init`).
    #[serde(default)]
    params: u64,
    /// The participant's seed (`train`).
    #[serde(default)]
    seed: u64,
    /// `train` fails on a model whose first value is past this.
    #[serde(default)]
    train_fails_above: Option<f32>,
    /// `evaluate` fails on a model whose first value is past this.
    #[serde(default)]
    evaluate_fails_above: Option<f32>,
}

/// Fails when the first value of `model` is past `limit`.
fn check_limit(what: &str, model: &[u8], limit: Option<f32>) -> Result<(), String> {
    match (limit, values_of(model)?.next()) {
        (Some(limit), Some(v)) if v > limit => Err(format!("{what}: the model's first value {v} is past {limit}")),
        _ => Ok(()),
    }
}

/// `n` f32 values as a safetensors file with one tensor `p` of shape `[n]`.
fn safetensors_of(values: impl ExactSizeIterator<Item = f32>) -> Vec<u8> {
    let n = values.len();
    let mut header = format!("{{\"p\":{{\"dtype\":\"F32\",\"shape\":[{n}],\"data_offsets\":[0,{}]}}}}", n * 4);
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + n * 4);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    values.for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

/// The values of a file [`safetensors_of`] wrote.
fn values_of(bytes: &[u8]) -> Result<impl ExactSizeIterator<Item = f32> + '_, String> {
    let len = bytes.get(..8).ok_or("model: too short")?;
    let len = u64::from_le_bytes(len.try_into().map_err(|_| "model: too short")?) as usize;
    let data = bytes.get(8usize.saturating_add(len)..).ok_or("model: truncated header")?;
    if data.len() % 4 != 0 {
        return Err("model: data is not f32".into());
    }
    Ok(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
}

/// A JSON `result` output, the only one.
fn result(value: impl serde::Serialize) -> Vec<Blob> {
    vec![Blob { name: "result".into(), data: serde_json::to_vec(&value).unwrap_or_default() }]
}

impl Guest for Programs {
    fn run(config: String, inputs: Vec<Blob>) -> Result<Vec<Blob>, String> {
        let cfg: Config = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let what = cfg.function.clone().unwrap_or_else(|| cfg.mode.clone());
        match what.as_str() {
            // State kept in the instance's memory between an actor's calls.
            "count" => {
                let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                Ok(vec![Blob { name: "result".into(), data: n.to_string().into_bytes() }])
            }
            "save_state" if cfg.stateless => Err("unknown function save_state (stateless)".into()),
            "save_state" => {
                let n = COUNTER.load(std::sync::atomic::Ordering::SeqCst);
                Ok(vec![Blob { name: "state".into(), data: n.to_le_bytes().to_vec() }])
            }
            "restore_state" => {
                let s = inputs.iter().find(|b| b.name == "state").ok_or("no state input")?;
                let n = u64::from_le_bytes(s.data.as_slice().try_into().map_err(|_| "bad state")?);
                COUNTER.store(n, std::sync::atomic::Ordering::SeqCst);
                Ok(vec![])
            }
            // Inputs back; called with no inputs, the first argument as the result.
            "echo" if inputs.is_empty() && !cfg.args.is_empty() => {
                Ok(vec![Blob { name: "result".into(), data: cfg.args[0].to_string().into_bytes() }])
            }
            "echo" => Ok(inputs),
            "spin" => {
                let mut x: u64 = 0;
                loop {
                    x = core::hint::black_box(x.wrapping_add(1));
                }
            }
            "alloc" => {
                // Grab memory in 64 MiB steps until `bytes` is held (or the host says no).
                let mut held: Vec<Vec<u8>> = Vec::new();
                let mut total = 0u64;
                while total < cfg.bytes {
                    let mut v = vec![0u8; 64 << 20];
                    v[0] = 1;
                    held.push(v);
                    total += 64 << 20;
                }
                Ok(vec![Blob { name: "held".into(), data: total.to_le_bytes().to_vec() }])
            }
            "work" => {
                // Busy for `ms` milliseconds, then leaves one result: a task that takes a while.
                let start = std::time::Instant::now();
                while start.elapsed().as_millis() < u128::from(cfg.ms) {
                    core::hint::black_box(0u64);
                }
                world_state::results_add("work", local::node().as_bytes())?;
                Ok(vec![Blob { name: "done".into(), data: cfg.ms.to_le_bytes().to_vec() }])
            }
            // Escape attempts: each answers what it got, the error's text included.
            "read-file" => {
                std::fs::read(&cfg.path).map(|d| result(d.len())).map_err(|e| format!("read {}: {e}", cfg.path))
            }
            "list-dir" => {
                std::fs::read_dir(&cfg.path).map(|d| result(d.count())).map_err(|e| format!("list {}: {e}", cfg.path))
            }
            "write-file" => {
                std::fs::write(&cfg.path, b"written").map_err(|e| format!("write {}: {e}", cfg.path))?;
                let back = std::fs::read(&cfg.path).map_err(|e| format!("read back {}: {e}", cfg.path))?;
                Ok(result(back.len()))
            }
            "connect" => std::net::TcpStream::connect(("127.0.0.1", cfg.port))
                .map(|_| result("connected"))
                .map_err(|e| format!("connect to port {}: {e}", cfg.port)),
            "print" => {
                // `bytes` to stdout, in 64 KiB lines.
                let line = "x".repeat(65535);
                for _ in 0..cfg.bytes / 65536 {
                    println!("{line}");
                }
                Ok(result("printed"))
            }
            "panic" => panic!("deliberate panic"),
            "fail" => Err("deliberate failure".into()),
            "big-output" => Ok(vec![Blob { name: "big".into(), data: vec![7u8; cfg.bytes as usize] }]),
            "context" => {
                log(Level::Info, "context test starting");
                let node = local::node();
                let datasets = local::datasets();
                let size = local::dataset_size(&cfg.dataset)?;
                let head = local::dataset_read(&cfg.dataset, 0, 4)?;
                let past_end = local::dataset_read(&cfg.dataset, size + 10, 4)?;
                // The last three bytes, asked with the largest length there is.
                let tail = local::dataset_read(&cfg.dataset, size.saturating_sub(3), u32::MAX)?;
                let missing = local::dataset_size("not-declared").err().unwrap_or_default();
                let res = local::resources();
                world_state::globals_set("greeting", b"hello")?;
                let g = world_state::globals_get("greeting")?.unwrap_or_default();
                world_state::results_add("seen", node.as_bytes())?;
                let results = world_state::results_select("seen")?;
                let bad_key = world_state::globals_set("bad key!", b"x").err().unwrap_or_default();
                let report = serde_json::json!({
                    "node": node,
                    "datasets": datasets,
                    "size": size,
                    "head": String::from_utf8_lossy(&head),
                    "past_end": past_end.len(),
                    "tail": String::from_utf8_lossy(&tail),
                    "missing": missing,
                    "cpu": res.cpu,
                    "greeting": String::from_utf8_lossy(&g),
                    "results": results.iter().map(|r| r.node.clone()).collect::<Vec<_>>(),
                    "bad_key": bad_key,
                });
                Ok(vec![Blob { name: "report".into(), data: report.to_string().into_bytes() }])
            }
            // A federated worker of a generated model (see the crate's documentation).
            "init" => {
                Ok(vec![Blob { name: "model".into(), data: safetensors_of((0..cfg.params as usize).map(|_| 0.0f32)) }])
            }
            "train" => {
                let model = inputs.iter().find(|b| b.name == "model").ok_or("input `model` is missing")?;
                check_limit("train", &model.data, cfg.train_fails_above)?;
                let step = 0.001 * (1 + cfg.seed % 7) as f32;
                let trained = safetensors_of(values_of(&model.data)?.map(|v| v + step));
                let metrics = serde_json::json!({"num_examples": 1 + cfg.seed % 3, "loss": 1.0});
                Ok(vec![
                    Blob { name: "model".into(), data: trained },
                    Blob { name: "metrics".into(), data: metrics.to_string().into_bytes() },
                ])
            }
            "evaluate" => {
                let model = inputs.iter().find(|b| b.name == "model").ok_or("input `model` is missing")?;
                check_limit("evaluate", &model.data, cfg.evaluate_fails_above)?;
                let metrics = serde_json::json!({"num_examples": 1, "loss": 1.0});
                Ok(vec![Blob { name: "metrics".into(), data: metrics.to_string().into_bytes() }])
            }
            other => Err(format!("unknown mode {other}")),
        }
    }
}

export!(Programs);
