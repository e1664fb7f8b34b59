//! Placement: the nodes a run can use. Every kind of run places through
//! `tessera_swarm::placement`: datasets, runtime, labels, GPU and the module's `needs`
//! against what each node announces. The coordinator's own node is never a participant.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tessera_core::PackageRef;
use tessera_core::registry::PackageRecord;
use tessera_core::wire::{ModuleUse, NodeRecord};
use tessera_node::list_nodes;
use tessera_swarm::TaskSpec;
use tessera_swarm::placement::{self, ModuleFacts};

use crate::engine::Coordinator;
use crate::{SessionConfig, SessionError};

/// The worker packages of a session: one for every node, and overrides for some.
#[derive(Clone, Debug)]
pub(crate) struct Workers {
    pub(crate) default: PackageRecord,
    pub(crate) nodes: BTreeMap<String, PackageRecord>,
}

impl Workers {
    pub(crate) fn for_node(&self, node: &str) -> &PackageRecord {
        self.nodes.get(node).unwrap_or(&self.default)
    }

    pub(crate) fn uses(&self) -> BTreeMap<String, ModuleUse> {
        self.nodes.iter().map(|(n, r)| (n.clone(), module_use(r, "worker"))).collect()
    }
}

/// How a run records a package it uses in `role`.
pub(crate) fn module_use(r: &PackageRecord, role: &str) -> ModuleUse {
    ModuleUse {
        module: format!("{}@{}", r.name, r.version),
        digest: r.digest,
        role: role.to_owned(),
        component: r.component.clone(),
    }
}

/// Those of `nodes` that can take part in a federated session (see [`Coordinator::eligible`]).
pub(crate) fn eligible_of(cfg: &SessionConfig, workers: &Workers, nodes: Vec<NodeRecord>) -> Vec<NodeRecord> {
    let task = TaskSpec::on_all(cfg.module.clone(), vec![cfg.dataset.clone()]);
    nodes.into_iter().filter(|n| placement::fits(&task, &[facts(workers.for_node(&n.id))], n).is_ok()).collect()
}

/// What placement needs to know of a package (named by the Component Repository entry it
/// was resolved through, when it was).
pub(crate) fn facts(r: &PackageRecord) -> ModuleFacts {
    let name = match &r.component {
        Some(entry) => format!("{entry} ({}@{})", r.name, r.version),
        None => format!("{}@{}", r.name, r.version),
    };
    ModuleFacts { name, runtime: r.runtime, needs: r.manifest.needs.clone() }
}

/// How old a listing of the announced nodes a dispatch takes for the nodes' keys (see
/// [`Coordinator::announced`]): the round's own listing, taken just before.
pub(crate) const LISTING_REUSE: Duration = Duration::from_millis(200);

impl Coordinator {
    /// Every node announced, from a listing taken at most `max_age` ago. A listing costs
    /// the backend a read of every announcement; a round lists the nodes to pick its
    /// participants, and its dispatch reuses that listing for the keys its tasks are
    /// signed for rather than reading it again.
    pub(crate) async fn announced(&self, max_age: Duration) -> Result<Vec<NodeRecord>, SessionError> {
        if let Some((at, nodes)) = &*self.listing.lock().unwrap_or_else(|p| p.into_inner())
            && !max_age.is_zero()
            && at.elapsed() <= max_age
        {
            return Ok(nodes.clone());
        }
        let nodes = self.retry("listing nodes", || list_nodes(self.backend.members.as_ref())).await?;
        self.remember_listing(&nodes);
        Ok(nodes)
    }

    /// Keeps `nodes`, just listed, for [`Coordinator::announced`].
    pub(crate) fn remember_listing(&self, nodes: &[NodeRecord]) {
        *self.listing.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), nodes.to_vec()));
    }

    /// The record of a package a run used, for resuming it: through the Component
    /// Repository entry it was named by, when it was (so placement judges the entry's
    /// `needs` again), which must still hold the same bytes; otherwise through `fallback`.
    pub(crate) async fn resolve_used(
        &self,
        used: &ModuleUse,
        fallback: PackageRef,
    ) -> Result<PackageRecord, SessionError> {
        let reference = match &used.component {
            Some(c) => c.parse().map_err(|e| SessionError::Config(format!("stored module reference {c:?}: {e}")))?,
            None => fallback,
        };
        let record = self.source.resolve(&reference).await?;
        if record.digest != used.digest {
            return Err(SessionError::Config(format!(
                "{reference} is now {}, but the run used {}",
                record.digest, used.digest
            )));
        }
        Ok(record)
    }

    /// The nodes announced now, but the coordinator's own.
    pub(crate) async fn nodes(&self) -> Result<Vec<NodeRecord>, SessionError> {
        let nodes = self.announced(Duration::ZERO).await?;
        let local = self.local.as_ref().map(|n| n.id().to_owned());
        Ok(nodes.into_iter().filter(|n| Some(&n.id) != local.as_ref()).collect())
    }

    /// Lists the nodes until `fits` accepts them or `wait` has passed, listing again every
    /// third of the membership's time-to-live (100 ms to 1 s). Like Flower's
    /// `ClientManager.wait_for`, a round or iteration short of nodes waits for them: a node
    /// restarting, or one whose announcement lapsed under load, comes back. Returns what
    /// `fits` gave last (its refusal when the wait ran out), or [`SessionError::Stopped`]
    /// when the run is asked to stop meanwhile.
    pub(crate) async fn wait_for_nodes<T, E: std::fmt::Display>(
        &self,
        run: &str,
        wait: Duration,
        mut fits: impl FnMut(Vec<NodeRecord>) -> Result<T, E>,
    ) -> Result<Result<T, E>, SessionError> {
        let deadline = Instant::now() + wait;
        let poll = (self.backend.members.ttl() / 3).clamp(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            match fits(self.nodes().await?) {
                Err(e) if Instant::now() + poll < deadline => {
                    tracing::info!(run, "{e}; waiting for nodes");
                    if self.stop_requested(run).await {
                        return Err(SessionError::Stopped);
                    }
                    tokio::time::sleep(poll).await;
                }
                other => return Ok(other),
            }
        }
    }

    /// The nodes that can take part in a federated session: they hold its dataset and can
    /// run their worker package (its runtime and `needs`).
    pub(crate) async fn eligible(
        &self,
        cfg: &SessionConfig,
        workers: &Workers,
    ) -> Result<Vec<NodeRecord>, SessionError> {
        Ok(eligible_of(cfg, workers, self.nodes().await?))
    }

    /// Why no node can take part in a federated session, when none can: the placement
    /// refusal naming the field (`datasets`, `runtime`, `needs.memory`...).
    pub(crate) async fn why_not_placed(&self, cfg: &SessionConfig, workers: &Workers) -> Option<String> {
        let task = TaskSpec::on_all(cfg.module.clone(), vec![cfg.dataset.clone()]);
        let nodes = self.nodes().await.ok()?;
        placement::eligible("worker", &task, &[facts(&workers.default)], &nodes).err().map(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;
    use tessera_core::wire::{self, TaskMessage};
    use tessera_ports::Backend;

    use super::*;

    /// Tasks of a module resolved through a Component Repository entry name the entry;
    /// tasks of a package named as itself name none.
    #[tokio::test]
    async fn tasks_of_an_entry_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Arc::new(tessera_hub::HubStore::open(dir.path().join("hub")).unwrap());
        let m = dir.path().join("echo");
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(
            m.join("module.yaml"),
            "name: test.echo\nversion: 0.1.0\nkind: task\nruntime: builtin\nentry: echo\n",
        )
        .unwrap();
        let packed = tessera_package::pack_dir(&m, &tessera_package::Limits::default()).unwrap();
        let own = hub.publish(&packed.bytes, None, None).unwrap().record;
        let backend = Backend::in_process(Duration::from_secs(5));
        let c = Coordinator::new(backend.clone(), Arc::new(tessera_hub::LocalHub(hub)), None);
        let mut entry = own.clone();
        entry.component = Some("transformation/custom.echo".into());
        for (run, record, want) in [("s-own", &own, None), ("s-entry", &entry, entry.component.clone())] {
            let workers = Workers { default: record.clone(), nodes: BTreeMap::new() };
            let nodes = ["node-a".to_string()];
            let wait = Duration::from_millis(20);
            c.dispatch(run, 1, &nodes, "", &workers, |_, _| json!({}), |_, _| Vec::new(), wait).await.unwrap();
            let queue = tessera_node::task_queue("node-a");
            let d = backend.bus.get(&queue, Duration::from_secs(5)).await.unwrap().expect("the task was sent");
            let task: TaskMessage = wire::decode(&d.payload).unwrap();
            d.ack().await.unwrap();
            assert_eq!(task.component, want);
        }
    }
}
