//! Operating runs: `tessera swarm list|status|logs|stop`, for federated sessions and
//! swarms of tasks alike.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use serde_json::json;
use tessera_coordinator::{Coordinator, RunRecord, RunSummary};

use crate::NatsArg;

/// A coordinator that only reads and writes run state (it sends no tasks).
async fn reader(nats: &NatsArg) -> anyhow::Result<Coordinator> {
    let backend = nats.backend().await?;
    Ok(Coordinator::new(backend, Arc::new(tessera_client::HubClient::new(tessera_client::DEFAULT_HUB)?), None))
}

/// `tessera swarm list`.
pub async fn list(nats: &NatsArg, as_json: bool) -> anyhow::Result<()> {
    let runs: Vec<RunSummary> = reader(nats).await?.summaries().await?;
    crate::output::show(as_json, &runs, |runs| {
        if runs.is_empty() {
            eprintln!("no runs on {}", nats.nats);
            return Ok(());
        }
        println!("{:<16} {:<8} {:<36} {:<9} {:<28} {:<21} ACCURACY", "RUN", "KIND", "STATE", "DONE", "RUNS", "UPDATED");
        for r in runs {
            let acc = r.test_accuracy.map_or("-".into(), |a| format!("{a:.4}"));
            println!(
                "{:<16} {:<8} {:<36} {:<9} {:<28} {:<21} {acc}",
                r.id, r.kind, r.state, r.progress, r.runs, r.updated
            );
        }
        Ok(())
    })
}

/// `tessera swarm status`.
pub async fn status(nats: &NatsArg, id: &str, as_json: bool) -> anyhow::Result<()> {
    let c = reader(nats).await?;
    let record = c.record(id).await?.ok_or_else(|| anyhow!("no run {id} on {}", nats.nats))?;
    match record {
        RunRecord::Session(state) => {
            if as_json {
                println!("{}", serde_json::to_string_pretty(&state)?);
                return Ok(());
            }
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
        RunRecord::Swarm(state) => {
            if as_json {
                println!("{}", serde_json::to_string_pretty(&state)?);
                return Ok(());
            }
            let ending = state.ending.map_or("stopped or running".to_owned(), |e| e.to_string());
            println!(
                "swarm {}: {ending}, {} of at most {} iterations done",
                state.id, state.completed_iterations, state.spec.iterations
            );
            if let Some(e) = &state.error {
                println!("  error: {e}");
            }
            for (task, uses) in &state.modules {
                let method = state.spec.tasks.get(task).map_or("?".to_owned(), |t| format!("{:?}", t.method));
                let modules: Vec<String> = uses.iter().map(|u| format!("{} {}", u.module, u.digest)).collect();
                println!("  {task:<12} {method}  {}", modules.join(", "));
            }
            if let Some(r) = state.reports.last() {
                for s in &r.stages {
                    let failed = s.failures.iter().map(|f| format!("{} ({})", f.node, f.error)).collect::<Vec<_>>();
                    println!(
                        "  iteration {}: {} ran on {}{}",
                        r.iteration,
                        s.task,
                        s.succeeded.join(", "),
                        if failed.is_empty() { String::new() } else { format!("; failed: {}", failed.join(", ")) }
                    );
                }
            }
        }
    }
    Ok(())
}

/// Which task logs `tessera swarm logs` prints.
pub struct LogFilter {
    /// Print JSON Lines instead of text.
    pub json: bool,
    pub node: Option<String>,
    pub iteration: Option<u32>,
    pub task: Option<String>,
}

impl LogFilter {
    fn keeps(&self, l: &tessera_coordinator::logs::TaskLog) -> bool {
        self.node.as_ref().is_none_or(|n| &l.node == n)
            && self.iteration.is_none_or(|i| l.iteration == Some(i))
            && self.task.as_ref().is_none_or(|t| &l.task == t)
    }
}

/// `tessera swarm logs`: prints each task's lines as `[i<iteration> <task> <node>] <time>
/// <LEVEL> <message>` (or as JSON Lines); with `follow`, polls every second until the run has ended.
pub async fn logs(nats: &NatsArg, id: &str, follow: bool, filter: LogFilter) -> anyhow::Result<()> {
    let c = reader(nats).await?;
    if c.record(id).await?.is_none() {
        anyhow::bail!("no run {id} on {} (tessera swarm list shows the runs there)", nats.nats);
    }
    let mut printed: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        // Read whether the run had ended before reading the logs: the last lines are then
        // certainly in.
        let ended = c.record(id).await?.is_some_and(|r| r.finished());
        for log in c.logs(id).await? {
            if !filter.keeps(&log) {
                continue;
            }
            let seen = printed.entry(log.task_id.clone()).or_default();
            let it = log.iteration.map_or("-".into(), |i| format!("i{i}"));
            for line in log.lines.iter().skip(*seen) {
                if filter.json {
                    println!(
                        "{}",
                        json!({
                            "iteration": log.iteration,
                            "task": log.task,
                            "task_id": log.task_id,
                            "node": log.node,
                            "t": line.t,
                            "level": line.level,
                            "msg": line.msg,
                        })
                    );
                    continue;
                }
                println!(
                    "[{it} {} {}] {} {:<5} {}",
                    log.task,
                    log.node,
                    tessera_core::time::format_rfc3339(line.t / 1000),
                    line.level.to_uppercase(),
                    line.msg
                );
            }
            *seen = (*seen).max(log.lines.len());
        }
        if !follow || ended {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `tessera swarm stop`.
pub async fn stop(nats: &NatsArg, id: &str) -> anyhow::Result<()> {
    reader(nats).await?.request_stop(id).await?;
    println!(
        "asked run {id} to stop; its coordinator ends it before its next stage (the iteration under way is not counted)"
    );
    Ok(())
}
