//! `tessera swarm`: federated sessions and swarms of user-written tasks, across processes
//! and machines over NATS, or in this process (`--embedded`). Listing, showing, logs and
//! stopping are in [`crate::runs`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use serde_json::{Value, json};
use tessera_client::HubClient;
use tessera_cluster::{Cluster, ClusterConfig, NodeSpec};
use tessera_coordinator::{
    Coordinator, RunRecord, SessionConfig, SessionError, SessionResult, SwarmFile, SwarmResult, new_session_id,
};
use tessera_core::PackageRef;
use tessera_core::config::apply_override;
use tessera_node::NodePorts;
use tessera_ports::PackageSource;
use tessera_swarm::SwarmSpec;
use tessera_wasm::WasmLimits;

use crate::progress::Progress;
use crate::{HubArg, NatsArg};

#[derive(Subcommand)]
pub enum Command {
    /// Run a swarm file with the nodes registered on NATS (or, with --embedded, with
    /// nodes in this process).
    ///
    /// A file with `tasks` and `flow` (YAML or JSON), or a Python file declaring a
    /// `tessera.swarm.Swarm`, is a swarm of tasks: modules given as folders are packed and
    /// published first. Any other YAML file is a federated session: module (name@version),
    /// rounds, min_participants, participant_ratio, round_timeout_secs, strategy, dataset,
    /// eval_dataset, config, seed, publish_as (and optionally differential_privacy,
    /// secure_aggregation, hierarchy, fedbuff for asynchronous FL, clients_per_node...).
    Run {
        /// The swarm file (`.yaml`, `.json` or `.py`).
        file: PathBuf,
        /// Run id (default: a new one).
        #[arg(long)]
        id: Option<String>,
        /// A config override: `key.path=value` for a federated session's workers,
        /// `TASK.key.path=value` for a task, `globals.KEY=value` for an initial global
        /// (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Run in this process: a hub, the bus, world state and the nodes given with
        /// --node (NATS and --hub are then only used to fetch modules that are neither
        /// folders nor shipped with tessera).
        #[arg(long)]
        embedded: bool,
        /// With --embedded, a node and one of its datasets, `ID:NAME=FILE` (repeatable; a
        /// node with no dataset is `ID`).
        #[arg(long = "node", value_name = "ID:NAME=FILE", requires = "embedded")]
        node: Vec<String>,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Continue a run whose coordinator stopped, from its last completed round or
    /// iteration. A federated session's coordinator datasets recorded with it are declared
    /// again (--dataset adds to or replaces them).
    Resume {
        /// The run id.
        id: String,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// List the runs stored on NATS (newest first), with their state, so a crashed
    /// coordinator's run can be found and resumed.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        nats: NatsArg,
    },
    /// Show a run's stored state.
    Status {
        /// The run id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        nats: NatsArg,
    },
    /// Print what a run's tasks wrote with `self.log` (or the WebAssembly log), per
    /// iteration, task and node.
    Logs {
        /// The run id.
        id: String,
        /// Keep printing new lines until the run ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only this node's tasks.
        #[arg(long)]
        node: Option<String>,
        /// Only this iteration (round).
        #[arg(long)]
        iteration: Option<u32>,
        /// Only this task (`worker`, `aggregator`...; `round` for federated rounds).
        #[arg(long)]
        task: Option<String>,
        /// Print one JSON object per line (JSON Lines; fields: docs/json.md).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        nats: NatsArg,
    },
    /// Ask a run to stop: its coordinator ends it cleanly at its next check and records
    /// it as stopped; what it had is kept.
    Stop {
        /// The run id.
        id: String,
        #[command(flatten)]
        nats: NatsArg,
    },
}

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    /// A dataset of the coordinator's own node, `name=FILE` (its held-out evaluation data).
    #[arg(long = "dataset", value_name = "NAME=FILE")]
    dataset: Vec<String>,
    /// Where the coordinator's node caches packages (default: $TESSERA_HOME/coordinator/cache).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Largest output of one run on the coordinator's own node (all outputs together: the
    /// initial model it creates, an evaluation's metrics), as `tessera node run
    /// --max-output`.
    #[arg(long, default_value = "256MiB")]
    max_output: tessera_core::ByteSize,
    /// Serve the coordinator's Prometheus metrics (rounds, round durations, tasks) at
    /// `http://ADDR/metrics` while it runs.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub(crate) nats: NatsArg,
    #[command(flatten)]
    hub: HubArg,
}

impl CoordinatorArgs {
    /// Starts serving `/metrics` when `--metrics` was given.
    async fn serve_metrics(&self) -> anyhow::Result<()> {
        let Some(addr) = self.metrics else { return Ok(()) };
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--metrics {addr}"))?;
        eprintln!("metrics: http://{}/metrics", listener.local_addr()?);
        let app = axum::Router::new().route("/metrics", axum::routing::get(tessera_ports::metrics::http::metrics_page));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!("the metrics listener stopped: {e}");
            }
        });
        Ok(())
    }

    /// A coordinator whose node holds `recorded` datasets, and those given with --dataset.
    async fn coordinator_with(&self, recorded: BTreeMap<String, PathBuf>) -> anyhow::Result<(Coordinator, HubClient)> {
        let backend = self.nats.backend().await?;
        let key = crate::key::load(&self.hub.key)?;
        let client = self.hub.signed_client()?;
        let ports = NodePorts { backend: backend.clone(), source: Arc::new(client.clone()) };
        let cache = self.cache.clone().unwrap_or_else(|| crate::tessera_home().join("coordinator").join("cache"));
        let mut cfg = tessera_node::NodeConfig::new("coordinator", cache);
        cfg.datasets = recorded;
        cfg.datasets.extend(crate::node::datasets(&self.dataset)?);
        // Private packages sealed for your key open on the coordinator's node.
        cfg.identity = Some(key.clone());
        // Your own machine, running what you submit: contained as far as it can be.
        let local = crate::node::build_node(
            cfg,
            ports,
            WasmLimits { max_output_bytes: self.max_output.0, ..WasmLimits::default() },
            crate::node::NodeOptions { degraded: true, prestart: None },
        )?;
        let coordinator = Coordinator::new(backend, Arc::new(client.clone()), Some(Arc::new(local))).with_identity(key);
        Ok((coordinator, client))
    }
}

/// Where a run's packages go and its models are published.
enum Place {
    /// A hub over HTTP; the nodes on NATS.
    Hub(HubClient),
    /// The in-process cluster's hub, filled from `remote` for what is not local.
    Embedded { cluster: Cluster, remote: HubClient },
}

impl Place {
    /// Publishes a module folder (as it is now); gives its digest reference.
    async fn publish_folder(&self, dir: &Path) -> anyhow::Result<String> {
        match self {
            Place::Hub(client) => {
                let packed = tessera_package::pack_dir_dev(dir, &tessera_package::Limits::default())
                    .with_context(|| format!("packing {}", dir.display()))?;
                let m = &packed.info.manifest;
                let (name, version) = (m.name.to_string(), m.version.to_string());
                let (rec, created) = client
                    .publish_declared(packed.bytes, Some((&name, &version)))
                    .await
                    .with_context(|| format!("publishing {} as {name}@{version}", dir.display()))?;
                eprintln!("{} {name}@{version} ({})", if created { "published" } else { "unchanged:" }, rec.digest);
                Ok(rec.digest.to_string())
            }
            Place::Embedded { cluster, .. } => {
                let rec = cluster.publish_dir(dir).with_context(|| format!("publishing {}", dir.display()))?;
                eprintln!("published {}@{} ({})", rec.name, rec.version, rec.digest);
                Ok(rec.digest.to_string())
            }
        }
    }

    /// In the embedded hub, makes `reference` resolvable: the shipped softmax worker is
    /// published from the binary, anything else is copied from the remote hub.
    async fn localize(&self, reference: &str) -> anyhow::Result<()> {
        let Place::Embedded { cluster, remote } = self else { return Ok(()) };
        let r: PackageRef = reference.parse()?;
        let local = tessera_hub::LocalHub(cluster.hub.clone());
        if local.resolve(&r).await.is_ok() {
            return Ok(());
        }
        let shipped = tessera_core::Manifest::parse(tessera_modules::FL_SOFTMAX_WORKER_MANIFEST).ok();
        if let (Some(m), PackageRef::Named { name, .. }) = (shipped, &r)
            && *name == m.name
        {
            let dir = tempfile::tempdir()?;
            tessera_modules::write_softmax_worker(dir.path())?;
            cluster.publish_dir(dir.path())?;
            if local.resolve(&r).await.is_ok() {
                return Ok(());
            }
        }
        let (rec, bytes) = remote.download(&r).await.with_context(|| {
            format!("{reference} is not a folder or shipped module; fetching it from {}", remote.base())
        })?;
        if let PackageRef::Component { collection, id } = &r {
            // The entry comes along with its object, so its needs are judged here too.
            let doc = remote.component_document(*collection, id).await?;
            let c = tessera_hub::Collection::from(*collection);
            match cluster.hub.create_component(c, id, &doc, None) {
                Err(tessera_hub::HubError::Conflict(_)) => cluster.hub.update_component(c, id, doc, None).map(drop)?,
                other => other.map(drop)?,
            }
            cluster.hub.put_component_bytes(c, id, &bytes, None)?;
            return Ok(());
        }
        cluster.hub.publish(&bytes, Some(rec.digest), None)?;
        Ok(())
    }
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Run { file, id, set, embedded, node, coordinator } => {
            let id = id.unwrap_or_else(new_session_id);
            // Checked first: the id names a folder in --embedded mode.
            tessera_core::name::check_ident("run id", &id).context("--id")?;
            let swarm_file = read_swarm_file(&file)?;
            coordinator.serve_metrics().await?;
            let (place, c) = if embedded {
                let remote = coordinator.hub.signed_client()?;
                let cluster = start_embedded(&id, &node, &coordinator).await?;
                let c = cluster.coordinator();
                (Place::Embedded { cluster, remote }, c)
            } else {
                let (c, client) = coordinator.coordinator_with(BTreeMap::new()).await?;
                (Place::Hub(client), c)
            };
            let result = async {
                match swarm_file {
                    SwarmFile::Federated(mut cfg) => {
                        for s in &set {
                            apply_override(&mut cfg.config, s)?;
                        }
                        place.localize(&cfg.module).await?;
                        // Refused before the session is announced: what the coordinator itself needs.
                        c.check_local_datasets(&cfg)?;
                        announce(&id, &place, &coordinator);
                        let progress = Progress::new(cfg.rounds);
                        let started = Instant::now();
                        let result = c.run(&id, &cfg, &progress).await;
                        progress.finish();
                        finish_session(result?, &cfg, &place, started, progress.apart()).await
                    }
                    SwarmFile::Tasks(mut spec) => {
                        apply_task_overrides(&mut spec, &set)?;
                        publish_folders(&mut spec, &file, &place).await?;
                        announce(&id, &place, &coordinator);
                        let progress = Progress::new(spec.iterations);
                        let started = Instant::now();
                        let result = c.run_swarm(&id, &spec, &progress).await.map_err(|e| in_file(e, &file));
                        progress.finish();
                        finish_swarm(result?, spec.publish_as.as_deref(), &place, started).await
                    }
                }
            }
            .await;
            if let Place::Embedded { cluster, .. } = place {
                cluster.stop().await;
            }
            result
        }
        Command::Resume { id, coordinator } => {
            coordinator.serve_metrics().await?;
            let (c, _) = coordinator.coordinator_with(BTreeMap::new()).await?;
            let record = c.record(&id).await?.ok_or_else(|| {
                anyhow!("no run {id} on {} (tessera swarm list shows the runs there)", coordinator.nats.nats)
            })?;
            match record {
                RunRecord::Session(state) => {
                    let (c, client) = coordinator.coordinator_with(state.coordinator_datasets.clone()).await?;
                    c.check_local_datasets(&state.config)?;
                    let progress = Progress::new(state.config.rounds);
                    let started = Instant::now();
                    let result = c.resume(&id, &progress).await;
                    progress.finish();
                    finish_session(result?, &state.config, &Place::Hub(client), started, progress.apart()).await
                }
                RunRecord::Swarm(state) => {
                    let progress = Progress::new(state.spec.iterations);
                    let started = Instant::now();
                    let result = c.resume_swarm(&id, &progress).await;
                    progress.finish();
                    let client = coordinator.hub.signed_client()?;
                    finish_swarm(result?, state.spec.publish_as.as_deref(), &Place::Hub(client), started).await
                }
            }
        }
        Command::List { json, nats } => crate::runs::list(&nats, json).await,
        Command::Status { id, json, nats } => crate::runs::status(&nats, &id, json).await,
        Command::Logs { id, follow, node, iteration, task, json, nats } => {
            crate::runs::logs(&nats, &id, follow, crate::runs::LogFilter { json, node, iteration, task }).await
        }
        Command::Stop { id, nats } => crate::runs::stop(&nats, &id).await,
    }
}

fn announce(id: &str, place: &Place, args: &CoordinatorArgs) {
    match place {
        Place::Hub(client) => println!(
            "run {id}: coordinator {} on {}, hub {}",
            client.signer().map(|k| k.public().to_string()).unwrap_or_default(),
            args.nats.nats,
            client.base()
        ),
        Place::Embedded { cluster, .. } => {
            println!("run {id}: in this process, with {}", crate::progress::count(cluster.nodes.len() as u64, "node"))
        }
    }
}

/// Reads a swarm file: YAML or JSON, or the spec a Python file's `Swarm` gives
/// (`python -m tessera.swarm FILE`, with the SDK this binary ships).
pub fn read_swarm_file(file: &Path) -> anyhow::Result<SwarmFile> {
    let name = file.display().to_string();
    if file.extension().is_some_and(|e| e == "py") {
        let text = python_spec(file, "tessera.swarm")?;
        return SwarmFile::from_yaml(&text).map_err(|e| anyhow!("{name}: {e}"));
    }
    let text = read_bounded(std::fs::File::open(file).with_context(|| format!("reading {name}"))?)
        .with_context(|| format!("reading {name}"))?;
    SwarmFile::from_yaml(&text).map_err(|e| in_file(e, file))
}

/// At most [`tessera_swarm::spec::MAX_SPEC_BYTES`] of UTF-8 text; more is an error.
fn read_bounded(from: impl std::io::Read) -> anyhow::Result<String> {
    use std::io::Read;
    let limit = tessera_swarm::spec::MAX_SPEC_BYTES;
    let mut bytes = Vec::new();
    from.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        bail!("a swarm file is at most {limit} bytes");
    }
    String::from_utf8(bytes).context("a swarm file is UTF-8 text")
}

/// An error about a swarm file, naming the file (and the line, when known).
fn in_file(e: SessionError, file: &Path) -> anyhow::Error {
    match e {
        SessionError::Spec(mut e) => {
            if e.file.is_none() {
                e.file = Some(file.display().to_string());
            }
            anyhow!("{e}")
        }
        SessionError::Config(m) => anyhow!("{}: {m}", file.display()),
        other => anyhow!(other),
    }
}

/// The JSON spec a Python swarm or flow file declares (`python -m MODULE FILE`, with the
/// SDK this binary ships: `tessera.swarm` or `tessera.dataflow`).
pub(crate) fn python_spec(file: &Path, module: &str) -> anyhow::Result<String> {
    let sdk = tessera_process::cached_sdk(&crate::tessera_home()).context("writing the Python SDK")?;
    let python = tessera_process::default_interpreter();
    let mut path = std::ffi::OsString::from(&sdk);
    if let Some(old) = std::env::var_os("PYTHONPATH") {
        path.push(":");
        path.push(old);
    }
    let mut child = std::process::Command::new(&python)
        .arg("-m")
        .arg(module)
        .arg(file)
        .env("PYTHONPATH", path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} (set TESSERA_PYTHON to choose the interpreter)", python.display()))?;
    let stderr = child.stderr.take().map(|e| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::Read::take(e, 64 * 1024), &mut text);
            text
        })
    });
    let spec = child.stdout.take().map(read_bounded);
    if spec.as_ref().is_some_and(Result::is_err) {
        // It printed too much: it may be blocked writing the rest.
        let _ = child.kill();
    }
    let status = child.wait()?;
    let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    let spec = spec.unwrap_or_else(|| Ok(String::new())).context("the spec the swarm file printed")?;
    if !status.success() {
        bail!("{}", stderr.trim());
    }
    Ok(spec)
}

/// `--set TASK.key=value` and `--set globals.KEY=value`.
fn apply_task_overrides(spec: &mut SwarmSpec, set: &[String]) -> anyhow::Result<()> {
    for s in set {
        let (path, value) = s.split_once('=').ok_or_else(|| anyhow!("--set {s:?}: expected KEY=VALUE"))?;
        let (head, rest) = path
            .split_once('.')
            .ok_or_else(|| anyhow!("--set {s:?}: name a task (`worker.lr=0.1`) or a global (`globals.target=0.9`)"))?;
        if head == "globals" {
            let mut globals = Value::Object(std::mem::take(&mut spec.globals));
            apply_override(&mut globals, &format!("{rest}={value}"))?;
            if let Value::Object(m) = globals {
                spec.globals = m;
            }
            continue;
        }
        let names = spec.tasks.keys().cloned().collect::<Vec<_>>().join(", ");
        let task = spec.tasks.get_mut(head).ok_or_else(|| anyhow!("--set {s:?}: no task {head} (tasks: {names})"))?;
        apply_override(&mut task.config, &format!("{rest}={value}"))?;
    }
    Ok(())
}

/// Publishes the tasks' modules given as folders (relative to the swarm file) and puts
/// their digests in their place; makes every other module resolvable where the run is.
async fn publish_folders(spec: &mut SwarmSpec, file: &Path, place: &Place) -> anyhow::Result<()> {
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut done: BTreeMap<PathBuf, String> = BTreeMap::new();
    let names: Vec<String> = spec.tasks.keys().cloned().collect();
    for name in names {
        let field = format!("tasks.{name}.module");
        let task = &spec.tasks[&name];
        if let Some(path) = task.local_path() {
            let dir = base.join(path);
            let Ok(dir) = dir.canonicalize() else {
                let e = spec.error_at(&field, format!("task {name}: no module folder {}", dir.display()));
                return Err(in_file(SessionError::Spec(e), file));
            };
            let digest = match done.get(&dir) {
                Some(d) => d.clone(),
                None => {
                    let d = place.publish_folder(&dir).await.with_context(|| format!("task {name}"))?;
                    done.insert(dir, d.clone());
                    d
                }
            };
            if let Some(t) = spec.tasks.get_mut(&name) {
                t.module = digest;
            }
        } else {
            let refs = task
                .references()
                .map_err(|e| in_file(SessionError::Spec(spec.error_at(&field, format!("task {name}: {e}"))), file))?;
            for r in refs {
                if let Err(e) = place.localize(&r.to_string()).await {
                    let e = spec.error_at(&field, format!("task {name}: {r}: {e:#}"));
                    return Err(in_file(SessionError::Spec(e), file));
                }
            }
        }
    }
    Ok(())
}

/// The in-process cluster of `--embedded`: the nodes of `--node`, Python modules run with
/// `TESSERA_PYTHON` (else python3), kept under $TESSERA_HOME/embedded/<run>.
async fn start_embedded(id: &str, nodes: &[String], args: &CoordinatorArgs) -> anyhow::Result<Cluster> {
    if nodes.is_empty() {
        bail!("--embedded needs nodes: --node ID:NAME=FILE (repeatable), e.g. --node node-0:digits=shard0.safetensors");
    }
    let mut specs: Vec<NodeSpec> = Vec::new();
    for item in nodes {
        let (node, dataset) = match item.split_once(':') {
            Some((n, d)) => (n, Some(d)),
            None => (item.as_str(), None),
        };
        tessera_core::name::check_ident("node id", node).with_context(|| format!("--node {item:?}"))?;
        if node == "coordinator" {
            bail!("--node {item:?}: `coordinator` is the embedded coordinator's own node; pick another id");
        }
        let idx = match specs.iter().position(|s| s.id == node) {
            Some(i) => i,
            None => {
                specs.push(NodeSpec {
                    id: node.to_owned(),
                    datasets: BTreeMap::new(),
                    wasm_wrapper: None,
                    world_wrapper: None,
                    operations: Vec::new(),
                });
                specs.len() - 1
            }
        };
        if let Some(d) = dataset {
            let (name, file) = d.split_once('=').ok_or_else(|| anyhow!("--node {item:?}: expected ID:NAME=FILE"))?;
            specs[idx].datasets.insert(name.to_owned(), PathBuf::from(file));
        }
    }
    let home = crate::tessera_home().join("embedded").join(id);
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let config = ClusterConfig {
        home,
        nodes: specs,
        coordinator_datasets: crate::node::datasets(&args.dataset)?,
        wasm_limits: WasmLimits::default(),
        python: Some(tessera_process::default_interpreter()),
    };
    Ok(Cluster::start(config).await?)
}

async fn finish_session(
    result: SessionResult,
    cfg: &SessionConfig,
    place: &Place,
    started: Instant,
    apart: Option<f64>,
) -> anyhow::Result<()> {
    println!();
    if let Some(m) = &result.final_metrics {
        println!("final test accuracy: {:.4} on {} held-out rows", m.accuracy.unwrap_or(0.0), m.num_examples);
    }
    println!("global model: {}", result.model_digest);
    if let Some(name) = &cfg.publish_as {
        let metadata = json!({
            "library": "tessera",
            "format": "safetensors",
            "test_accuracy": result.final_metrics.as_ref().and_then(|m| m.accuracy),
            "test_loss": result.final_metrics.as_ref().map(|m| m.loss),
        });
        publish_model(place, name, result.model.to_vec(), metadata, &result.lineage).await?;
    }
    println!(
        "lineage: session {}, {} rounds of {}, nodes {}",
        result.lineage.session,
        result.lineage.rounds,
        result.lineage.strategy,
        result.lineage.nodes.join(", ")
    );
    if let Some(line) = crate::progress::round_summary_line(&result.reports, apart) {
        println!("{line}");
    }
    println!("time: {:.2}s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn finish_swarm(
    result: SwarmResult,
    publish_as: Option<&str>,
    place: &Place,
    started: Instant,
) -> anyhow::Result<()> {
    println!();
    println!(
        "run {}: {} after {}",
        result.run,
        result.ending,
        crate::progress::count(result.iterations.into(), "iteration")
    );
    for (key, value) in &result.globals {
        if key == "model" {
            continue;
        }
        let shown = match std::str::from_utf8(value) {
            Ok(t) if t.len() <= 200 => t.to_owned(),
            _ => format!("({} bytes)", value.len()),
        };
        println!("global {key}: {shown}");
    }
    if let Some(d) = &result.model {
        println!("global model: {d}");
        if let Some(name) = publish_as {
            let bytes = result.globals.get("model").map(|b| b.to_vec()).unwrap_or_default();
            publish_model(place, name, bytes, json!({"library": "tessera", "format": "safetensors"}), &result.lineage)
                .await?;
        }
    }
    let mut versions: BTreeMap<&str, usize> = BTreeMap::new();
    for tasks in result.lineage.placements.values() {
        for m in tasks.values() {
            *versions.entry(m.as_str()).or_default() += 1;
        }
    }
    println!(
        "lineage: {} nodes ({}); {}",
        result.lineage.nodes.len(),
        result.lineage.nodes.join(", "),
        versions.iter().map(|(m, n)| format!("{m} on {n}")).collect::<Vec<_>>().join(", ")
    );
    println!("time: {:.2}s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn publish_model(
    place: &Place,
    name: &str,
    bytes: Vec<u8>,
    metadata: Value,
    lineage: &tessera_core::wire::Lineage,
) -> anyhow::Result<()> {
    let (version, digest) = match place {
        Place::Hub(client) => {
            // The hub picks the next version in the write's transaction, so runs publishing
            // one name at once get distinct versions; the signed upload claims the namespace.
            let meta = tessera_client::UploadMeta { metadata, lineage: Some(lineage.clone()), card: None };
            let rec = client
                .publish_model(name, tessera_client::ModelSource::Bytes(bytes.into()), Some(&meta))
                .await
                .with_context(|| format!("publishing the model as {name}"))?;
            (rec.version, rec.digest.map(|d| d.to_string()).unwrap_or_default())
        }
        Place::Embedded { cluster, .. } => {
            let rec = cluster
                .hub
                .publish_model(name, &bytes, metadata, Some(lineage.clone()), None)
                .with_context(|| format!("publishing the model as {name}"))?;
            (rec.version, rec.digest.map(|d| d.to_string()).unwrap_or_default())
        }
    };
    println!("model: {name}@{version} {digest}");
    Ok(())
}
