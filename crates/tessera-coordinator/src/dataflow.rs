//! Dataflows on the engine, as DFFML's distributed orchestrator proposed: the
//! orchestrator (`tessera_dataflow`) forms parameter sets; each goes as a task to a node
//! that offers its operation (`tessera node run --ops parse,add`), calling the operation's
//! module function with the parameter set's values as keyword arguments (`config.kwargs`;
//! so operations are module functions of the `python` and `process` runtimes); the node
//! answers with the function's result. A node offering an operation is used only if it
//! also runs its module (the runtime and `needs`, as placement checks them). Delivery is
//! the engine's (at least once, answered once per task id); a node that leaves or does not
//! answer has the parameter set run on another node that offers the operation. The first
//! answer is the one used, so each parameter set is applied once, though a node that was
//! only slow may still run it. A function that fails is not run again elsewhere (as Ray
//! retries tasks whose worker died, not those that raised): its error fails the context.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use tessera_core::name::check_ident;
use tessera_core::registry::PackageRecord;
use tessera_core::wire::{BlobRef, NodeRecord, TaskOutcome};
use tessera_core::{Digest, PackageRef};
use tessera_dataflow::{
    ContextResult, DataFlow, Definition, Operation, OperationNetwork, Orchestrator, Primitive, ResultCache,
};

use crate::SessionError;
use crate::dispatch::Outgoing;
use crate::engine::Coordinator;
use crate::placement::facts;
use tessera_swarm::TaskSpec;
use tessera_swarm::placement;

/// Runs operations on the nodes that offer them.
struct FlowNetwork<'a> {
    c: &'a Coordinator,
    run: String,
    /// The package of each module reference.
    modules: BTreeMap<String, PackageRecord>,
    next: AtomicU64,
    timeout: Duration,
}

impl Coordinator {
    /// Runs one context of `flow` (its seed and `inputs`, definition and value) with its
    /// operations on the nodes that offer them (a subflow's operations too); `timeout`
    /// bounds each operation's run. An operation's module reference is resolved once,
    /// before anything runs. With `cache`, operations marked `cache: true` are answered
    /// from results kept in world state when their module digest, function and inputs
    /// were seen before.
    pub async fn run_flow(
        &self,
        run: &str,
        flow: &DataFlow,
        inputs: Vec<(String, Value)>,
        timeout: Duration,
        cache: bool,
    ) -> Result<ContextResult, SessionError> {
        check_ident("run id", run).map_err(|e| SessionError::Config(e.to_string()))?;
        flow.check().map_err(|(field, m)| SessionError::Config(format!("{field}: {m}")))?;
        let mut modules = BTreeMap::new();
        self.resolve_operations(flow, "", &mut modules).await?;
        // Task ids are unique to this run of the context, so a node never answers a task of
        // an earlier run with the same context id from its memory of answered tasks.
        let nonce = crate::new_session_id();
        let nonce = nonce.trim_start_matches("s-");
        let net = FlowNetwork { c: self, run: format!("{run}-{nonce}"), modules, next: AtomicU64::new(0), timeout };
        let world = WorldCache(self);
        let mut orchestrator = Orchestrator::new(flow, &net);
        if cache {
            orchestrator = orchestrator.with_cache(&world);
        }
        Ok(orchestrator.run_context(inputs).await?)
    }

    /// Resolves every operation's module (those of subflows too) to its package digest,
    /// once, before anything runs.
    async fn resolve_operations(
        &self,
        flow: &DataFlow,
        at: &str,
        modules: &mut BTreeMap<String, PackageRecord>,
    ) -> Result<(), SessionError> {
        for (name, op) in &flow.operations {
            if let Some(sub) = &op.subflow {
                Box::pin(self.resolve_operations(sub, &format!("{at}{name}."), modules)).await?;
                continue;
            }
            if modules.contains_key(&op.module) {
                continue;
            }
            let r: PackageRef =
                op.module.parse().map_err(|e| SessionError::Config(format!("operation {at}{name}: module: {e}")))?;
            let rec = self
                .source
                .resolve(&r)
                .await
                .map_err(|e| SessionError::Config(format!("operation {at}{name}: module {r}: {e}")))?;
            modules.insert(op.module.clone(), rec);
        }
        Ok(())
    }
}

/// Results of cached operations, in world state under `flows/cache/<key>` (JSON of the
/// outputs), shared by every coordinator on the backend.
struct WorldCache<'a>(&'a Coordinator);

impl WorldCache<'_> {
    fn key(key: &str) -> String {
        format!("flows/cache/{key}")
    }
}

#[async_trait]
impl ResultCache for WorldCache<'_> {
    async fn get(&self, key: &str) -> Option<BTreeMap<String, Value>> {
        let entry = self.0.backend.world.get(&Self::key(key)).await.ok()??;
        serde_json::from_slice(&entry.value).ok()
    }

    async fn put(&self, key: &str, outputs: &BTreeMap<String, Value>) {
        let bytes = match serde_json::to_vec(outputs) {
            Ok(b) => b,
            Err(e) => return tracing::warn!("not caching a result: {e}"),
        };
        if let Err(e) = self.0.backend.world.put(&Self::key(key), bytes.into()).await {
            tracing::warn!("not caching a result: {e}");
        }
    }
}

#[async_trait]
impl OperationNetwork for FlowNetwork<'_> {
    async fn run(
        &self,
        name: &str,
        op: &Operation,
        definitions: &BTreeMap<String, Definition>,
        inputs: BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>, String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // Values of tensor and blob definitions go as the task's input blobs (a Python
        // function gets a tensor as a numpy array), the others as keyword arguments.
        let is_blob = |d: Option<&String>| {
            d.and_then(|d| definitions.get(d))
                .is_some_and(|d| matches!(d.primitive, Primitive::Tensor | Primitive::Blob))
        };
        let mut kwargs = serde_json::Map::new();
        let mut blobs = Vec::new();
        for (param, value) in inputs {
            if is_blob(op.inputs.get(&param)) {
                let digest: Digest = value
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("{param}: {value} is not a blob digest"))?;
                blobs.push(BlobRef::stored(param, digest, 0));
            } else {
                kwargs.insert(param, value);
            }
        }
        let blob_outputs: Vec<&String> = op.outputs.iter().filter(|(_, d)| is_blob(Some(d))).map(|(o, _)| o).collect();
        if !blob_outputs.is_empty() && op.outputs.len() > 1 {
            return Err(format!(
                "{name}: a tensor or blob output is its operation's only output (the function's result), \
                 but it has {}",
                op.outputs.len()
            ));
        }
        let record = self.modules.get(&op.module).ok_or_else(|| format!("no package for operation {name}"))?;
        let (module, component) = (record.digest, record.component.clone());
        // A node offering the operation must also run its module: its runtime and `needs`.
        let task = TaskSpec::on_all(op.module.clone(), Vec::new());
        let module_facts = [facts(record)];
        let config = json!({"function": op.function, "kwargs": kwargs});
        let mut tried: BTreeSet<String> = BTreeSet::new();
        loop {
            let nodes = self.c.nodes().await.map_err(|e| e.to_string())?;
            let announcing: Vec<&NodeRecord> =
                nodes.iter().filter(|r| r.operations.iter().any(|o| o == name)).collect();
            if announcing.is_empty() {
                return Err(format!(
                    "no node offers operation `{name}` (start one with `tessera node run --ops {name}`)"
                ));
            }
            let mut unfit = Vec::new();
            let mut offering = Vec::new();
            for r in announcing {
                match placement::fits(&task, &module_facts, r) {
                    Ok(()) => offering.push(r.id.clone()),
                    Err(lacks) => unfit.push(format!("{}: {}", r.id, lacks.join("; "))),
                }
            }
            if offering.is_empty() {
                return Err(format!(
                    "the nodes offering `{name}` cannot run {}@{}: {}",
                    record.name,
                    record.version,
                    unfit.join(" | ")
                ));
            }
            let fresh: Vec<&String> = offering.iter().filter(|id| !tried.contains(*id)).collect();
            let Some(node) = fresh.get(n as usize % fresh.len().max(1)).map(|s| (*s).clone()) else {
                return Err(format!(
                    "every node offering `{name}` left or did not answer: {}",
                    tried.into_iter().collect::<Vec<_>>().join(", ")
                ));
            };
            tried.insert(node.clone());
            // One reply queue per attempt: parameter sets in flight do not share one.
            let id = format!("{}-p{n}-{}", self.run, tried.len());
            let task = Outgoing {
                participant: node.clone(),
                task_id: format!("{id}.{node}"),
                module,
                config: config.clone(),
                inputs: blobs.clone(),
                world: None,
                inline_outputs: 0,
                // The run id carries a nonce: no task of it was sent before.
                fresh: true,
                component: component.clone(),
            };
            let replies = self.c.send_and_collect(&id, 0, vec![task], self.timeout).await.map_err(|e| e.to_string())?;
            match replies.replies.get(&node).map(|r| &r.outcome) {
                Some(TaskOutcome::Ok { outputs, .. }) if !blob_outputs.is_empty() => {
                    // The result blob is the value: its digest.
                    let r =
                        outputs.iter().find(|r| r.name == "result").ok_or_else(|| format!("{name} gave no result"))?;
                    return Ok(BTreeMap::from([(blob_outputs[0].clone(), Value::String(r.digest.to_string()))]));
                }
                Some(TaskOutcome::Ok { outputs, .. }) => return self.outputs(name, op, outputs).await,
                Some(TaskOutcome::Failed { error }) => return Err(error.clone()),
                None => {
                    let why = if replies.gone.contains(&node) { "left" } else { "did not answer in time" };
                    tracing::warn!(operation = name, node, "{why}; running the parameter set on another node");
                }
            }
        }
    }

    fn implementation(&self, _name: &str, op: &Operation) -> Option<String> {
        self.digest(op).map(|d| d.to_string())
    }

    async fn tensor_header(&self, digest: &str) -> Result<Vec<u8>, String> {
        let d: Digest = digest.parse().map_err(|_| format!("{digest:?} is not a blob digest"))?;
        let bytes = self
            .c
            .retry("reading a tensor", || self.c.backend.blobs.get(&d))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("blob {digest} is not in the blob store"))?;
        // Only the header is kept: the data may be large.
        let end = tessera_dataflow::spec::tensor_header_len(&bytes).unwrap_or(8).min(bytes.len());
        Ok(bytes[..end].to_vec())
    }
}

impl FlowNetwork<'_> {
    fn digest(&self, op: &Operation) -> Option<Digest> {
        self.modules.get(&op.module).map(|r| r.digest)
    }

    /// The operation's outputs from the function's result: its value when the operation
    /// has one output (or a mapping holding it), else a mapping of every output.
    async fn outputs(&self, name: &str, op: &Operation, refs: &[BlobRef]) -> Result<BTreeMap<String, Value>, String> {
        let r = refs.iter().find(|r| r.name == "result").ok_or_else(|| format!("{name} gave no result"))?;
        let bytes = self
            .c
            .retry("reading a result", || tessera_ports::read_ref(self.c.backend.blobs.as_ref(), r))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{name}'s result is not in the blob store"))?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{name}'s result is not JSON: {e}"))?;
        let mut out = BTreeMap::new();
        if op.outputs.len() == 1 {
            let key = op.outputs.keys().next().cloned().unwrap_or_default();
            let v = match value {
                Value::Object(mut m) if m.contains_key(&key) => m.remove(&key).unwrap_or(Value::Null),
                other => other,
            };
            out.insert(key, v);
            return Ok(out);
        }
        let Value::Object(mut m) = value else {
            return Err(format!("{name} has {} outputs; its function returns a mapping of them", op.outputs.len()));
        };
        for key in op.outputs.keys() {
            let v = m.remove(key).ok_or_else(|| format!("{name}'s result has no `{key}`"))?;
            out.insert(key.clone(), v);
        }
        Ok(out)
    }
}
