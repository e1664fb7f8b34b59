//! What tasks wrote with `self.log` (or the WebAssembly log), read back per node and
//! iteration (`tessera swarm logs`). Nodes keep each task's log in world state under
//! `runs/<run>/logs/<task id>`.

use tessera_node::context::LogLine;

use crate::SessionError;
use crate::engine::Coordinator;

/// The log of one task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskLog {
    /// The task id.
    pub task_id: String,
    /// The iteration (round) it belonged to, when the id says.
    pub iteration: Option<u32>,
    /// The task (`worker`, `aggregator`...; `round` for federated rounds).
    pub task: String,
    /// The node (or simulated participant) that ran it.
    pub node: String,
    /// Its lines, oldest first.
    pub lines: Vec<LogLine>,
}

/// Reads a task id: `<run>.i<iteration>.a<attempt>.<task>.<node>[.t<try>]` for swarm
/// stages, `<run>.r<round>[.m<model>|.<dispatch>].<participant>` for federated rounds
/// (training and region tasks name the model they start from, evaluation tasks the
/// coordinator that sent them).
pub fn parse_task_id(run: &str, task_id: &str) -> Option<(Option<u32>, String, String)> {
    let rest = task_id.strip_prefix(run)?.strip_prefix('.')?;
    let parts: Vec<&str> = rest.split('.').collect();
    let number = |p: &str, prefix: char| p.strip_prefix(prefix).and_then(|n| n.parse::<u32>().ok());
    match parts.as_slice() {
        [i, a, task, node, ..] if number(i, 'i').is_some() && number(a, 'a').is_some() => {
            Some((number(i, 'i'), (*task).to_owned(), (*node).to_owned()))
        }
        [r, .., participant] if number(r, 'r').is_some() => {
            let round = number(r, 'r')?;
            let (round, task) = if round >= 1 << 30 {
                (round - (1 << 30), "evaluate")
            } else if round >= 1 << 29 {
                (round - (1 << 29), "region")
            } else {
                (round, "round")
            };
            Some((Some(round), task.to_owned(), (*participant).to_owned()))
        }
        _ => None,
    }
}

impl Coordinator {
    /// Every task log a run has, in iteration, task and node order.
    pub async fn logs(&self, run: &str) -> Result<Vec<TaskLog>, SessionError> {
        tessera_core::name::check_ident("run id", run).map_err(|e| SessionError::Config(e.to_string()))?;
        let prefix = format!("runs/{run}/logs/");
        let keys = self.retry("listing task logs", || self.backend.world.keys(&prefix)).await?;
        let mut out = Vec::new();
        for key in keys {
            let task_id = key[prefix.len()..].to_owned();
            let Some(entry) = self.retry("reading a task log", || self.backend.world.get(&key)).await? else {
                continue;
            };
            let lines = String::from_utf8_lossy(&entry.value)
                .lines()
                .filter_map(|l| serde_json::from_str::<LogLine>(l).ok())
                .collect();
            let (iteration, task, node) =
                parse_task_id(run, &task_id).unwrap_or((None, "task".into(), task_id.clone()));
            out.push(TaskLog { task_id, iteration, task, node, lines });
        }
        out.sort_by(|a, b| {
            (a.iteration, &a.task, &a.node, &a.task_id).cmp(&(b.iteration, &b.task, &b.node, &b.task_id))
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_say_iteration_task_and_node() {
        assert_eq!(parse_task_id("s-1", "s-1.i3.a0.worker.node-2"), Some((Some(3), "worker".into(), "node-2".into())));
        assert_eq!(
            parse_task_id("s-1", "s-1.i3.a1.aggregator.node-0.t2"),
            Some((Some(3), "aggregator".into(), "node-0".into()))
        );
        assert_eq!(parse_task_id("s-1", "s-1.r2.node-1"), Some((Some(2), "round".into(), "node-1".into())));
        assert_eq!(
            parse_task_id("s-1", "s-1.r2.m0123456789abcdef.node-1"),
            Some((Some(2), "round".into(), "node-1".into()))
        );
        assert_eq!(parse_task_id("s-1", "s-1.r1073741825.node-1"), Some((Some(1), "evaluate".into(), "node-1".into())));
        assert_eq!(parse_task_id("s-1", "s-2.r2.node-1"), None);
    }
}
