//! `tessera launch|actors|kill|call`, `tessera queue put|get|len` and `tessera pipeline run`:
//! live modules through a node's gateway.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use serde_json::{Value, json};
use tessera_client::gateway::{DEFAULT_ENDPOINT, GatewayClient};
use tessera_core::config::{apply_overrides, parse_value};
use tessera_core::wire::{CallRequest, LaunchRequest};

/// The node gateway from `--endpoint` or `TESSERA_ENDPOINT`.
#[derive(clap::Args, Clone)]
pub struct EndpointArg {
    /// The node's gateway (`tessera node run --listen`).
    #[arg(long, env = "TESSERA_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    endpoint: String,
    /// Sign requests with this key (`tessera key list`), as nodes with a policy require.
    #[arg(long = "sign", env = "TESSERA_SIGN", value_name = "KEY")]
    sign: Option<String>,
}

impl EndpointArg {
    fn client(&self) -> anyhow::Result<GatewayClient> {
        let c = GatewayClient::new(&self.endpoint)?;
        Ok(match &self.sign {
            Some(k) => c.with_signer(crate::key::load(k)?),
            None => c,
        })
    }
}

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// The module: `path[@version|@alias]`, a digest, or a module folder (development:
    /// packed as `<version>-dev.<digest>`, published to --hub, then launched).
    module: String,
    /// The actor is named `path-tag`.
    #[arg(long)]
    tag: Option<String>,
    /// Replicas in the pool (calls go to the least busy).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// A config override, `key.path=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Higher stays longer when the node is full (default: first in, first out).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i32,
    /// The node to run it on (default: the node behind --endpoint).
    #[arg(long)]
    node: Option<String>,
    /// When an actor of that name runs another package, stop it and launch this one (its
    /// saved state, if it has state hooks, carries over).
    #[arg(long)]
    replace: bool,
    #[command(flatten)]
    endpoint: EndpointArg,
    #[command(flatten)]
    hub: crate::HubArg,
}

#[derive(clap::Args)]
pub struct CallArgs {
    /// The actor (`path` or `path-tag`), or a module (`path@version`), launched by the call
    /// when it is not running and the node allows it.
    name: String,
    /// The function.
    function: String,
    /// Positional arguments (JSON, or plain text for a string).
    #[arg(allow_negative_numbers = true)]
    args: Vec<String>,
    /// A keyword argument, `name=value` (repeatable).
    #[arg(long = "kw", value_name = "NAME=VALUE")]
    kwargs: Vec<String>,
    /// A binary input from a file, `name=FILE` (repeatable; tensors as safetensors).
    #[arg(long = "input", value_name = "NAME=FILE")]
    inputs: Vec<String>,
    /// Seconds before the call is stopped.
    #[arg(long, value_parser = tessera_core::time::parse_seconds)]
    timeout: Option<Duration>,
    /// An id to cancel the call by (`tessera cancel ID`).
    #[arg(long)]
    id: Option<String>,
    /// Write every output to this directory, one file per output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Make the call this many times and print latency figures (p50, p99, calls per second).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Calls in flight at once with --repeat.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    #[command(flatten)]
    endpoint: EndpointArg,
}

#[derive(clap::Subcommand)]
pub enum QueueCommand {
    /// Put a JSON message on a queue (refused while the queue is at its bound).
    Put {
        /// The queue (`<actor>.in`, `<actor>.out`, or any name).
        queue: String,
        /// The message (JSON, or plain text for a string).
        message: String,
        #[command(flatten)]
        endpoint: EndpointArg,
    },
    /// Take the next message of a queue (prints nothing when it stays empty).
    Get {
        /// The queue.
        queue: String,
        /// Seconds to wait for a message.
        #[arg(long, default_value = "0", value_parser = tessera_core::time::parse_wait)]
        wait: Duration,
        #[command(flatten)]
        endpoint: EndpointArg,
    },
    /// Messages waiting in a queue.
    Len {
        /// The queue.
        queue: String,
        #[command(flatten)]
        out: crate::output::JsonArg,
        #[command(flatten)]
        endpoint: EndpointArg,
    },
}

#[derive(clap::Subcommand)]
pub enum PipelineCommand {
    /// Run a pipeline file: launch its actors, feed the sources' items through the queues,
    /// and print the results of the final stages.
    Run {
        /// The pipeline file (YAML).
        file: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value = "600", value_parser = tessera_core::time::parse_seconds)]
        timeout: Duration,
        /// Write the results as JSON lines (`{"stage", "item", "value"}`) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Leave the actors the pipeline launched running (by default they are stopped when
        /// it ends).
        #[arg(long)]
        keep: bool,
        #[command(flatten)]
        endpoint: EndpointArg,
    },
    /// Check a pipeline file and print its stages in run order.
    Check {
        /// The pipeline file (YAML).
        file: PathBuf,
    },
}

/// Accuracy of a stage's results, when they are scored: each a mapping with the true label
/// `y` and the predicted `label`, and optionally `votes` (a label per model).
fn scores(values: &[&Value]) -> String {
    let scored: Vec<(&Value, &Value)> = values
        .iter()
        .filter_map(|v| Some((v.get("label")?, v.get("y")?)))
        .filter(|(l, y)| l.is_number() && y.is_number())
        .collect();
    if scored.is_empty() || scored.len() != values.len() {
        return String::new();
    }
    let n = scored.len() as f64;
    let acc = scored.iter().filter(|(l, y)| l == y).count() as f64 / n;
    let mut per_model: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for v in values {
        if let (Some(votes), Some(y)) = (v.get("votes").and_then(Value::as_object), v.get("y")) {
            for (model, label) in votes {
                *per_model.entry(model.clone()).or_default() += usize::from(label == y);
            }
        }
    }
    let models: Vec<String> = per_model.iter().map(|(m, ok)| format!("{m} {:.3}", *ok as f64 / n)).collect();
    if models.is_empty() {
        format!("  (accuracy {acc:.3})")
    } else {
        format!("  (ensemble accuracy {acc:.3}; {})", models.join(", "))
    }
}

pub async fn launch(a: LaunchArgs) -> anyhow::Result<()> {
    let mut config = json!({});
    apply_overrides(&mut config, a.set.iter().map(String::as_str))?;
    let folder = std::path::Path::new(&a.module);
    let module = if folder.join(tessera_core::manifest::MANIFEST_FILE).is_file() {
        // The development loop: this folder, as it is now, as a dev build.
        let packed = tessera_package::pack_dir_dev(folder, &tessera_package::Limits::default())?;
        let m = &packed.info.manifest;
        let (name, version) = (m.name.to_string(), m.version.to_string());
        let (rec, created) = a
            .hub
            .signed_client()?
            .publish_declared(packed.bytes, Some((&name, &version)))
            .await
            .with_context(|| format!("publishing {} as {name}@{version}", folder.display()))?;
        eprintln!("{} {name}@{version} ({})", if created { "published" } else { "unchanged:" }, rec.digest);
        rec.digest.to_string()
    } else {
        a.module.clone()
    };
    let client = a.endpoint.client()?;
    let req = LaunchRequest { module, tag: a.tag, replicas: a.replicas, config, priority: a.priority, node: a.node };
    let info = match client.launch(&req).await {
        Err(e) if a.replace && e.kind() == Some("conflict") => {
            let name = running_name(&e).context("the conflict names no actor")?;
            let old = client.kill(&name).await?;
            eprintln!("stopped {} ({}) to replace it", old.name, old.module);
            client.launch(&req).await?
        }
        other => other?,
    };
    println!("{} on node {} ({}, {} replica(s))", info.name, info.node, info.module, info.replicas);
    Ok(())
}

/// The actor a launch conflicted with (the message starts with its name).
fn running_name(e: &tessera_client::gateway::GatewayError) -> Option<String> {
    let tessera_client::gateway::GatewayError::Api { message, .. } = e else { return None };
    message.split_whitespace().next().map(str::to_owned)
}

pub async fn list(endpoint: EndpointArg, json_out: bool) -> anyhow::Result<()> {
    let actors = endpoint.client()?.actors().await?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&actors)?);
        return Ok(());
    }
    if actors.is_empty() {
        println!("no actors");
        return Ok(());
    }
    println!(
        "{:<32} {:<12} {:<28} {:>4} {:>8} {:>5} {:>9} {:>6}",
        "NAME", "NODE", "MODULE", "REPL", "CALLS", "BUSY", "MEMORY", "CPU"
    );
    let degraded = actors.iter().any(|a| a.degraded);
    for a in actors {
        println!(
            "{:<32} {:<12} {:<28} {:>4} {:>8} {:>5} {:>9} {:>6}",
            a.name,
            if a.degraded { format!("{}*", a.node) } else { a.node },
            a.module,
            a.replicas,
            a.calls,
            a.busy,
            a.reserved.memory.to_string(),
            a.reserved.cpu
        );
    }
    if degraded {
        println!("* a degraded node: it runs without a sandbox protection its policy requires");
    }
    Ok(())
}

pub async fn kill(name: String, endpoint: EndpointArg) -> anyhow::Result<()> {
    let info = endpoint.client()?.kill(&name).await?;
    println!("stopped {} on node {} after {} call(s)", info.name, info.node, info.calls);
    Ok(())
}

fn call_request(a: &CallArgs) -> anyhow::Result<CallRequest> {
    let args = a.args.iter().map(|s| parse_value(s)).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
    let mut req = CallRequest::new(&a.name, &a.function, args);
    let mut kwargs = serde_json::Map::new();
    for kv in &a.kwargs {
        let (k, v) = kv.split_once('=').with_context(|| format!("--kw {kv:?}: expected NAME=VALUE"))?;
        kwargs.insert(k.to_owned(), parse_value(v).map_err(anyhow::Error::msg)?);
    }
    req.kwargs = Value::Object(kwargs);
    for (name, path) in crate::name_file_pairs(&a.inputs, "input")? {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        req.inputs.insert(name, base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    req.timeout = a.timeout.map(|t| t.as_secs_f64());
    req.id = a.id.clone();
    Ok(req)
}

pub async fn call(a: CallArgs) -> anyhow::Result<()> {
    let client = a.endpoint.client()?;
    let req = call_request(&a)?;
    if a.repeat > 1 {
        return repeat(&client, &req, a.repeat, a.concurrency.max(1)).await;
    }
    let resp = client.call(&req).await?;
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, out) in &resp.outputs {
            let path = dir.join(name);
            std::fs::write(&path, client.output(out).await?).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("{name}: {} bytes ({}) -> {}", out.size, out.kind, path.display());
        }
    }
    match resp.outputs.get("result") {
        Some(out) if out.kind == "json" => {
            let value: Value = if resp.result.is_null() && out.inline.is_none() {
                serde_json::from_slice(&client.output(out).await?)?
            } else {
                resp.result.clone()
            };
            println!("{value}");
        }
        _ => {
            if a.out.is_none() {
                for (name, out) in &resp.outputs {
                    eprintln!("{name}: {} bytes ({}); --out DIR writes it", out.size, out.kind);
                }
            }
        }
    }
    Ok(())
}

/// Makes `n` calls, `concurrency` at a time, and prints latency percentiles and throughput.
async fn repeat(client: &GatewayClient, req: &CallRequest, n: u32, concurrency: u32) -> anyhow::Result<()> {
    // One call first: launches the actor if needed and warms the connection.
    client.call(req).await?;
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, req, next) = (client.clone(), req.clone(), next.clone());
        tasks.spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let t = Instant::now();
                client.call(&req).await?;
                lat.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(n as usize);
    while let Some(r) = tasks.join_next().await {
        lat.extend(r??);
    }
    let wall = started.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1].as_secs_f64() * 1e6;
    println!(
        "{{\"calls\": {n}, \"concurrency\": {concurrency}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"calls_per_s\": {:.0}}}",
        pct(0.50),
        pct(0.99),
        n as f64 / wall
    );
    Ok(())
}

pub async fn cancel(id: String, endpoint: EndpointArg) -> anyhow::Result<()> {
    endpoint.client()?.cancel(&id).await?;
    println!("cancelled {id}");
    Ok(())
}

pub async fn queue(c: QueueCommand) -> anyhow::Result<()> {
    match c {
        QueueCommand::Put { queue, message, endpoint } => {
            let value = parse_value(&message).map_err(anyhow::Error::msg)?;
            endpoint.client()?.queue_put(&queue, &value).await?;
        }
        QueueCommand::Get { queue, wait, endpoint } => {
            if let Some(v) = endpoint.client()?.queue_get(&queue, wait).await? {
                println!("{v}");
            }
        }
        QueueCommand::Len { queue, out, endpoint } => {
            let len = endpoint.client()?.queue_len(&queue).await?;
            if out.json {
                crate::output::print_json(&serde_json::json!({ "queue": queue, "len": len }))?;
            } else {
                println!("{len}");
            }
        }
    }
    Ok(())
}

fn read_pipeline(file: &std::path::Path) -> anyhow::Result<tessera_core::pipeline::Pipeline> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    tessera_core::pipeline::Pipeline::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

pub async fn pipeline(c: PipelineCommand) -> anyhow::Result<()> {
    match c {
        PipelineCommand::Check { file } => {
            let p = read_pipeline(&file)?;
            for s in &p.stages {
                let from = if s.is_source() { "source".to_owned() } else { format!("from {}", s.from.join(", ")) };
                println!("{} .{}  ({from}{})", s.actor, s.function, if s.join { ", join" } else { "" });
            }
            Ok(())
        }
        PipelineCommand::Run { file, timeout, out, keep, endpoint } => {
            let p = read_pipeline(&file)?;
            let client = endpoint.client()?;
            let report = tessera_client::pipeline::run(&client, &p, timeout).await;
            // The actors the pipeline launched stop with it, unless asked to stay (or the
            // run failed half-way: then they stay, to be looked at).
            let launched: Vec<&str> =
                p.stages.iter().filter(|s| s.module.is_some()).map(|s| s.actor.as_str()).collect();
            let report = report?;
            let mut lines = String::new();
            for (stage, items) in &report.results {
                let values: Vec<&Value> = items.iter().map(|(_, v)| v).collect();
                println!("{stage}: {} result(s) in {:.1} s{}", items.len(), report.seconds, scores(&values));
                for (item, value) in items {
                    lines.push_str(&json!({"stage": stage, "item": item, "value": value}).to_string());
                    lines.push('\n');
                }
            }
            match out {
                Some(path) => std::fs::write(&path, lines).with_context(|| format!("writing {}", path.display()))?,
                None => print!("{lines}"),
            }
            if keep {
                eprintln!("{} actor(s) left running (tessera actors lists them)", launched.len());
            } else {
                for a in &launched {
                    if let Err(e) = client.kill(a).await
                        && e.kind() != Some("not_found")
                    {
                        eprintln!("could not stop {a}: {e}");
                    }
                }
                eprintln!("stopped the {} actor(s) the pipeline launched (--keep leaves them running)", launched.len());
            }
            Ok(())
        }
    }
}
