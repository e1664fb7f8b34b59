//! `tessera swarm`: federated sessions across processes and machines, over NATS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use clap::Subcommand;
use serde_json::json;
use tessera_client::HubClient;
use tessera_coordinator::{Coordinator, SessionConfig, SessionResult, new_session_id};
use tessera_core::config::apply_override;
use tessera_node::NodePorts;
use tessera_wasm::WasmLimits;

use crate::progress::Progress;
use crate::{HubArg, NatsArg};

#[derive(Subcommand)]
pub enum Command {
    /// Run a federated session described in a YAML file, with the nodes registered on NATS.
    ///
    /// The file holds: module (name@version), rounds, min_participants, participant_ratio,
    /// round_timeout_secs, strategy (fedavg), dataset (what participants train on),
    /// eval_dataset (what the coordinator evaluates on), config (worker overrides), seed,
    /// publish_as (model name for the final model).
    Run {
        /// The swarm file.
        file: PathBuf,
        /// Session id (default: a new one).
        #[arg(long)]
        id: Option<String>,
        /// Worker config override, `key.path=value` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// Continue a session whose coordinator stopped, from its last completed round. The
    /// coordinator's datasets recorded with the session are declared again (--dataset
    /// adds to or replaces them).
    Resume {
        /// The session id.
        id: String,
        #[command(flatten)]
        coordinator: CoordinatorArgs,
    },
    /// List the sessions stored on NATS (newest first), with their state, so a crashed
    /// coordinator's session can be found and resumed.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        nats: NatsArg,
    },
    /// Show a session's stored state.
    Status {
        /// The session id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
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
    #[command(flatten)]
    nats: NatsArg,
    #[command(flatten)]
    hub: HubArg,
}

impl CoordinatorArgs {
    async fn coordinator(&self) -> anyhow::Result<(Coordinator, HubClient)> {
        self.coordinator_with(std::collections::BTreeMap::new()).await
    }

    /// A coordinator whose node holds `recorded` datasets, and those given with --dataset.
    async fn coordinator_with(
        &self,
        recorded: std::collections::BTreeMap<String, PathBuf>,
    ) -> anyhow::Result<(Coordinator, HubClient)> {
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
        let local = crate::node::build_node(cfg, ports, WasmLimits::default())?;
        let coordinator = Coordinator::new(backend, Arc::new(client.clone()), Some(Arc::new(local))).with_identity(key);
        Ok((coordinator, client))
    }
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Run { file, id, set, coordinator } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let mut cfg = SessionConfig::from_yaml(&text).with_context(|| format!("{}", file.display()))?;
            for s in &set {
                apply_override(&mut cfg.config, s)?;
            }
            let id = id.unwrap_or_else(new_session_id);
            let (c, client) = coordinator.coordinator().await?;
            // Refused before the session is announced: what the coordinator itself needs.
            c.check_local_datasets(&cfg)?;
            println!(
                "session {id}: coordinator {} on {}, hub {}",
                client.signer().map(|k| k.public().to_string()).unwrap_or_default(),
                coordinator.nats.nats,
                client.base()
            );
            let progress = Progress::new(cfg.rounds);
            let started = Instant::now();
            let result = c.run(&id, &cfg, &progress).await;
            progress.finish();
            finish(result?, &cfg, &client, started).await
        }
        Command::Resume { id, coordinator } => {
            let (c, _) = coordinator.coordinator().await?;
            let state = c.state(&id).await?.ok_or_else(|| {
                anyhow!("no session {id} on {} (tessera swarm list shows the sessions there)", coordinator.nats.nats)
            })?;
            let (c, client) = coordinator.coordinator_with(state.coordinator_datasets.clone()).await?;
            c.check_local_datasets(&state.config)?;
            let progress = Progress::new(state.config.rounds);
            let started = Instant::now();
            let result = c.resume(&id, &progress).await;
            progress.finish();
            finish(result?, &state.config, &client, started).await
        }
        Command::List { json, nats } => {
            let backend = nats.backend().await?;
            let c =
                Coordinator::new(backend, Arc::new(tessera_client::HubClient::new(tessera_client::DEFAULT_HUB)?), None);
            let sessions = c.sessions().await?;
            if json {
                let rows: Vec<serde_json::Value> = sessions
                    .iter()
                    .map(|s| {
                        json!({
                            "id": s.id,
                            "state": if s.finished() { "finished" } else { "stopped or running" },
                            "completed_rounds": s.completed_rounds,
                            "rounds": s.config.rounds,
                            "module": s.module.module,
                            "updated": tessera_core::time::format_rfc3339(s.updated_ms / 1000),
                            "test_accuracy": s.reports.last().and_then(|r| r.eval_accuracy),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if sessions.is_empty() {
                eprintln!("no sessions on {}", nats.nats);
            } else {
                println!(
                    "{:<16} {:<20} {:<9} {:<28} {:<21} ACCURACY",
                    "SESSION", "STATE", "ROUNDS", "WORKER", "UPDATED"
                );
                for s in &sessions {
                    let state = if s.finished() { "finished" } else { "stopped or running" };
                    let acc = s.reports.last().and_then(|r| r.eval_accuracy).map_or("-".into(), |a| format!("{a:.4}"));
                    println!(
                        "{:<16} {:<20} {:<9} {:<28} {:<21} {acc}",
                        s.id,
                        state,
                        format!("{}/{}", s.completed_rounds, s.config.rounds),
                        s.module.module,
                        tessera_core::time::format_rfc3339(s.updated_ms / 1000)
                    );
                }
            }
            Ok(())
        }
        Command::Status { id, json, nats } => {
            let backend = nats.backend().await?;
            let key = tessera_coordinator::state_key(&id);
            let entry = backend.world.get(&key).await?.ok_or_else(|| anyhow!("no session {id} on {}", nats.nats))?;
            let state: tessera_coordinator::SessionState = serde_json::from_slice(&entry.value)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                println!("session {}: {} of {} rounds done", state.id, state.completed_rounds, state.config.rounds);
                println!("  worker:       {} {}", state.module.module, state.module.digest);
                println!("  model:        {}", state.model);
                println!("  contributors: {}", state.contributors.iter().cloned().collect::<Vec<_>>().join(", "));
                if let Some(r) = state.reports.last() {
                    let acc = r.eval_accuracy.map_or("-".into(), |a| format!("{a:.4}"));
                    println!(
                        "  last round:   {}, test accuracy {acc}",
                        crate::progress::count(r.contributed.len() as u64, "participant")
                    );
                }
            }
            Ok(())
        }
    }
}

async fn finish(
    result: SessionResult,
    cfg: &SessionConfig,
    client: &HubClient,
    started: Instant,
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
        // The hub picks the next version in the write's transaction, so sessions publishing
        // one name at once get distinct versions; the signed upload claims the namespace.
        let meta = tessera_client::UploadMeta { metadata, lineage: Some(result.lineage.clone()) };
        let rec = client
            .publish_model(name, tessera_client::ModelSource::Bytes(result.model.clone()), Some(&meta))
            .await
            .with_context(|| format!("publishing the model as {name}"))?;
        println!("model: {name}@{} {}", rec.version, rec.digest.map(|d| d.to_string()).unwrap_or_default());
    }
    println!(
        "lineage: session {}, {} rounds of {}, nodes {}",
        result.lineage.session,
        result.lineage.rounds,
        result.lineage.strategy,
        result.lineage.nodes.join(", ")
    );
    if let Some(line) = crate::progress::round_summary_line(&result.reports) {
        println!("{line}");
    }
    println!("time: {:.2}s", started.elapsed().as_secs_f64());
    Ok(())
}
