//! The orchestrator, with DFFML's semantics: in a context, every parameter set that can be
//! formed from the values present (one value per input, from the origins wired to it) runs
//! its operation once; the outputs become new values, which form new parameter sets, until
//! none is left. Conditions skip a parameter set unless all its condition values are
//! `true`; a value of a `lock` definition is used by one operation at a time; a value of a
//! definition with `validate` goes through that operation before it is used. Contexts are
//! independent: each starts from the seed and its own inputs.
//!
//! Operations run through an [`OperationNetwork`] (DFFML's operation implementation
//! network): in one process, or on the nodes that offer them.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::Value;

use crate::spec::{DataFlow, Definition, Operation, Origin, Schema};

/// Most parameter sets one operation may form in one context (a guard against fan-out
/// that would never end).
pub const MAX_PARAMETER_SETS: usize = 100_000;

/// Most operations running at once in one context; further parameter sets wait.
pub const MAX_IN_FLIGHT: usize = 64;

/// Most values one context may hold (its seed and inputs, every output, and those of the
/// subflows it runs are counted in their own contexts).
pub const MAX_ITEMS: usize = 1_000_000;

/// Most bytes of values (as JSON) one context may hold.
pub const MAX_CONTEXT_BYTES: usize = 512 * 1024 * 1024;

/// Runs operations.
#[async_trait]
pub trait OperationNetwork: Send + Sync {
    /// Runs `op` (named `name`) on one parameter set: parameter name -> value. Gives
    /// output name -> value, or why it failed.
    ///
    /// `definitions` are those of the flow `op` is in: values of `tensor` and `blob`
    /// definitions are blob digests (`b3:<hex>`) a network may hand over as blobs.
    async fn run(
        &self,
        name: &str,
        op: &Operation,
        definitions: &BTreeMap<String, Definition>,
        inputs: BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>, String>;

    /// What identifies the code `op` runs, for caching its results: the digest of its
    /// module. `None` (the default) when the network cannot say, and nothing is cached.
    fn implementation(&self, _name: &str, _op: &Operation) -> Option<String> {
        None
    }

    /// The start of the blob a `tensor` value names (`b3:<hex>`), at least its
    /// safetensors header ([`crate::spec::tensor_header_len`]), to check the value is one
    /// tensor of its definition's dtype and shape. The default holds no blobs.
    async fn tensor_header(&self, digest: &str) -> Result<Vec<u8>, String> {
        Err(format!("no blob store to read {digest} from"))
    }
}

/// Where results of operations marked `cache: true` are kept, by a key naming the code
/// (module digest and function) and the inputs ([`cache_key`]).
#[async_trait]
pub trait ResultCache: Send + Sync {
    /// The outputs kept under `key`, if any.
    async fn get(&self, key: &str) -> Option<BTreeMap<String, Value>>;
    /// Keeps `outputs` under `key` (failures to keep are the cache's to log: a result not
    /// kept is computed again).
    async fn put(&self, key: &str, outputs: &BTreeMap<String, Value>);
}

/// The length of a value as compact JSON, counted without writing it anywhere.
fn json_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, v);
    count.0
}

/// The cache key of a parameter set: BLAKE3 (hex) of the implementation, the function and
/// the inputs as canonical JSON (keys sorted).
pub fn cache_key(implementation: &str, function: &str, inputs: &BTreeMap<String, Value>) -> String {
    let mut bytes = Vec::with_capacity(128);
    for part in [implementation.as_bytes(), function.as_bytes()] {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part);
    }
    // serde_json's maps are sorted by key: the same inputs give the same bytes.
    bytes.extend_from_slice(&serde_json::to_vec(inputs).unwrap_or_default());
    tessera_core::Digest::of(&bytes).hex()
}

/// Why a context failed.
#[derive(Debug, thiserror::Error)]
pub enum DataflowError {
    /// An operation failed.
    #[error("operation {operation} failed: {error}")]
    Operation {
        /// The operation.
        operation: String,
        /// Its error.
        error: String,
    },
    /// A value does not fit its definition (a caller's input or an operation's output).
    #[error("{0}")]
    Value(String),
    /// A context holds too many values or bytes.
    #[error("the context holds more than {0}")]
    TooBig(String),
    /// Too many parameter sets.
    #[error("operation {operation} would run on {count} parameter sets (at most {MAX_PARAMETER_SETS})")]
    FanOut {
        /// The operation.
        operation: String,
        /// How many sets it would form.
        count: usize,
    },
}

/// One value in a context.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// Unique in its context, in order of arrival.
    pub id: usize,
    /// Its definition.
    pub definition: String,
    /// The value.
    pub value: Value,
    /// Where it came from.
    pub origin: Origin,
}

/// What a context gave.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContextResult {
    /// `get_single` definitions: their last value (absent when none came).
    pub single: BTreeMap<String, Value>,
    /// `get_multi` definitions: every value, in order.
    pub multi: BTreeMap<String, Vec<Value>>,
    /// How many times each operation ran (those of a subflow as `<operation>.<its
    /// operation>`).
    pub runs: BTreeMap<String, usize>,
    /// How many parameter sets were answered from the cache, by operation (those of a
    /// subflow as `<operation>.<its operation>`).
    pub cached: BTreeMap<String, usize>,
    /// Every value the context saw.
    pub items: Vec<Item>,
}

/// Runs contexts of a flow.
pub struct Orchestrator<'a> {
    flow: &'a DataFlow,
    network: &'a dyn OperationNetwork,
    cache: Option<&'a dyn ResultCache>,
    /// The definitions' schemas, compiled when first needed.
    schemas: std::sync::OnceLock<BTreeMap<String, Result<Schema, String>>>,
}

/// What finished in a context: a parameter set's run, or a new value's validation.
enum Done {
    Ran { name: String, locked: Vec<usize>, ran: Ran },
    Admitted { definition: String, origin: Origin, value: Result<Value, DataflowError> },
}

/// Work in flight in a context.
type Work<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send + 'a>>;

/// What running one parameter set gave: outputs, and the runs of a subflow's operations.
struct Ran {
    outputs: Result<BTreeMap<String, Value>, String>,
    /// Runs of a subflow's operations, as `<operation>.<its operation>`.
    inner: BTreeMap<String, usize>,
    /// A subflow's parameter sets answered from the cache, named the same way.
    inner_cached: BTreeMap<String, usize>,
    cached: bool,
}

/// A parameter set: the item ids of its inputs (by parameter) and of its conditions.
type ParameterSet = (BTreeMap<String, usize>, Vec<usize>);

impl<'a> Orchestrator<'a> {
    /// An orchestrator of `flow` running operations on `network`.
    pub fn new(flow: &'a DataFlow, network: &'a dyn OperationNetwork) -> Self {
        Orchestrator { flow, network, cache: None, schemas: std::sync::OnceLock::new() }
    }

    /// Answers parameter sets of operations marked `cache: true` from `cache` when it
    /// holds them, and keeps new results there.
    pub fn with_cache(mut self, cache: &'a dyn ResultCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Runs one parameter set: a subflow in a context of its own, else through the cache
    /// (when the operation asks for it) or the network.
    async fn run_set(&self, name: &str, op: &Operation, args: BTreeMap<String, Value>) -> Ran {
        if let Some(sub) = &op.subflow {
            let inner = Orchestrator::new(sub, self.network);
            let inner = match self.cache {
                Some(c) => inner.with_cache(c),
                None => inner,
            };
            // A subflow runs in this task (`run_context` boxes the recursion).
            let result = inner.run_context(args.into_iter().collect()).await;
            return match result {
                Ok(r) => {
                    let mut outputs = BTreeMap::new();
                    let mut missing = None;
                    for o in op.outputs.keys() {
                        match r.single.get(o) {
                            Some(v) => {
                                outputs.insert(o.clone(), v.clone());
                            }
                            None => missing = Some(o.clone()),
                        }
                    }
                    let inner = r.runs.into_iter().map(|(k, n)| (format!("{name}.{k}"), n)).collect();
                    let inner_cached = r.cached.into_iter().map(|(k, n)| (format!("{name}.{k}"), n)).collect();
                    let outputs = match missing {
                        Some(o) => Err(format!("the subflow gave no `{o}`")),
                        None => Ok(outputs),
                    };
                    Ran { outputs, inner, inner_cached, cached: false }
                }
                Err(e) => Ran {
                    outputs: Err(format!("subflow: {e}")),
                    inner: BTreeMap::new(),
                    inner_cached: BTreeMap::new(),
                    cached: false,
                },
            };
        }
        let key = match (op.cache, self.cache) {
            (true, Some(_)) => self.network.implementation(name, op).map(|i| cache_key(&i, &op.function, &args)),
            _ => None,
        };
        // Only outputs of the operation's types are kept, and only such entries are used.
        let fits = |out: &BTreeMap<String, Value>| {
            op.outputs.iter().all(|(o, d)| {
                out.get(o).is_some_and(|v| self.flow.definitions.get(d).is_some_and(|d| d.primitive.admits(v)))
            })
        };
        if let (Some(k), Some(c)) = (&key, self.cache)
            && let Some(hit) = c.get(k).await
            && fits(&hit)
        {
            return Ran { outputs: Ok(hit), inner: BTreeMap::new(), inner_cached: BTreeMap::new(), cached: true };
        }
        let outputs = self.network.run(name, op, &self.flow.definitions, args).await;
        if let (Some(k), Some(c), Ok(out)) = (&key, self.cache, &outputs)
            && fits(out)
        {
            c.put(k, out).await;
        }
        Ran { outputs, inner: BTreeMap::new(), inner_cached: BTreeMap::new(), cached: false }
    }

    /// Runs one context from the flow's seed and `inputs` (definition, value) to its end.
    /// (A boxed future: a subflow runs a context inside a context.)
    pub fn run_context(
        &self,
        inputs: Vec<(String, Value)>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ContextResult, DataflowError>> + Send + '_>> {
        Box::pin(self.context(inputs))
    }

    async fn context(&self, inputs: Vec<(String, Value)>) -> Result<ContextResult, DataflowError> {
        let mut items: Vec<Item> = Vec::new();
        let mut bytes = 0usize;
        let mut hold = |items: &Vec<Item>, v: &Value| -> Result<(), DataflowError> {
            if items.len() >= MAX_ITEMS {
                return Err(DataflowError::TooBig(format!("{MAX_ITEMS} values")));
            }
            bytes = bytes.saturating_add(json_len(v));
            if bytes > MAX_CONTEXT_BYTES {
                return Err(DataflowError::TooBig(format!("{MAX_CONTEXT_BYTES} bytes of values")));
            }
            Ok(())
        };
        for (d, v) in self.flow.seed.iter().cloned().chain(inputs) {
            if !self.flow.seed.iter().any(|(s, _)| s == &d) && !self.flow.inputs.contains(&d) {
                return Err(DataflowError::Value(format!(
                    "`{d}` is not an input of this flow (inputs: {})",
                    self.flow.inputs.join(", ")
                )));
            }
            let value = self.admit(&d, v, &Origin::Seed).await?;
            hold(&items, &value)?;
            items.push(Item { id: items.len(), definition: d, value, origin: Origin::Seed });
        }
        let mut runs: BTreeMap<String, usize> = BTreeMap::new();
        let mut cached: BTreeMap<String, usize> = BTreeMap::new();
        // Parameter sets formed so far, per operation (bounded by MAX_PARAMETER_SETS).
        let mut formed: BTreeMap<String, usize> = BTreeMap::new();
        // Values of `lock` definitions used by a running operation.
        let mut held: BTreeSet<usize> = BTreeSet::new();
        // Sets formed but not started: their locked values were in use, or too many ran.
        let mut waiting: Vec<(String, ParameterSet)> = Vec::new();
        // Items before this one have been combined into parameter sets.
        let mut combined = 0;
        let mut running: FuturesUnordered<Work<'_>> = FuturesUnordered::new();
        loop {
            // Only sets with a value that arrived since the last pass are new: each set is
            // formed once.
            let mut ready = std::mem::take(&mut waiting);
            if combined < items.len() {
                for (name, op) in &self.flow.operations {
                    let sets = self.new_parameter_sets(name, op, &items, combined)?;
                    let total = formed.entry(name.clone()).or_default();
                    *total = total.saturating_add(sets.len());
                    if *total > MAX_PARAMETER_SETS {
                        return Err(DataflowError::FanOut { operation: name.clone(), count: *total });
                    }
                    ready.extend(sets.into_iter().map(|s| (name.clone(), s)));
                }
                combined = items.len();
            }
            for (name, set) in ready {
                if !set.1.iter().all(|id| items[*id].value == Value::Bool(true)) {
                    continue;
                }
                let locked: Vec<usize> = set
                    .0
                    .values()
                    .chain(&set.1)
                    .copied()
                    .filter(|id| self.flow.definitions[&items[*id].definition].lock)
                    .collect();
                if running.len() >= MAX_IN_FLIGHT || locked.iter().any(|id| held.contains(id)) {
                    waiting.push((name, set)); // started once the value is free
                    continue;
                }
                let op = &self.flow.operations[&name];
                held.extend(&locked);
                let args: BTreeMap<String, Value> =
                    set.0.iter().map(|(p, id)| (p.clone(), items[*id].value.clone())).collect();
                let work: Work<'_> = Box::pin(async move {
                    let ran = self.run_set(&name, op, args).await;
                    Done::Ran { name, locked, ran }
                });
                running.push(work);
            }
            let (name, locked, ran) = match running.next().await {
                None => break,
                // A value back from its validation operation (run beside the others).
                Some(Done::Admitted { definition, origin, value }) => {
                    let value = value?;
                    hold(&items, &value)?;
                    items.push(Item { id: items.len(), definition, value, origin });
                    continue;
                }
                Some(Done::Ran { name, locked, ran }) => (name, locked, ran),
            };
            for id in locked {
                held.remove(&id);
            }
            *(if ran.cached { &mut cached } else { &mut runs }).entry(name.clone()).or_default() += 1;
            for (k, n) in ran.inner {
                *runs.entry(k).or_default() += n;
            }
            for (k, n) in ran.inner_cached {
                *cached.entry(k).or_default() += n;
            }
            let out = ran.outputs.map_err(|error| DataflowError::Operation { operation: name.clone(), error })?;
            let op = &self.flow.operations[&name];
            for (output, d) in &op.outputs {
                let Some(v) = out.get(output) else {
                    return Err(DataflowError::Operation {
                        operation: name.clone(),
                        error: format!("it gave no output `{output}`"),
                    });
                };
                let origin = Origin::Output { operation: name.clone(), output: output.clone() };
                if self.flow.definitions[d].validate.is_some() {
                    let (definition, v) = (d.clone(), v.clone());
                    let work: Work<'_> = Box::pin(async move {
                        let value = self.admit(&definition, v, &origin).await;
                        Done::Admitted { definition, origin, value }
                    });
                    running.push(work);
                    continue;
                }
                let value = self.admit(d, v.clone(), &origin).await?;
                hold(&items, &value)?;
                items.push(Item { id: items.len(), definition: d.clone(), value, origin });
            }
        }
        let mut result = ContextResult { runs, cached, ..ContextResult::default() };
        for d in &self.flow.output.get_single {
            if let Some(last) = items.iter().rev().find(|i| &i.definition == d) {
                result.single.insert(d.clone(), last.value.clone());
            }
        }
        for d in &self.flow.output.get_multi {
            result
                .multi
                .insert(d.clone(), items.iter().filter(|i| &i.definition == d).map(|i| i.value.clone()).collect());
        }
        result.items = items;
        Ok(result)
    }

    /// A new value of `definition`: type-checked, through its validation operation, then
    /// checked against the definition's schema, or its tensor dtype and shape.
    async fn admit(&self, definition: &str, value: Value, origin: &Origin) -> Result<Value, DataflowError> {
        let d = &self.flow.definitions[definition];
        if !d.primitive.admits(&value) {
            return Err(DataflowError::Value(format!(
                "{value} from {origin} is not a {:?} value of `{definition}`",
                d.primitive
            )));
        }
        let Some(v) = &d.validate else {
            self.conforms(definition, d, &value, &origin.to_string()).await?;
            return Ok(value);
        };
        let op = &self.flow.operations[v];
        let (param, _) =
            op.inputs.iter().next().ok_or_else(|| DataflowError::Value(format!("`{v}` takes no input")))?;
        let (output, _) =
            op.outputs.iter().next().ok_or_else(|| DataflowError::Value(format!("`{v}` gives no output")))?;
        let out = self
            .network
            .run(v, op, &self.flow.definitions, BTreeMap::from([(param.clone(), value)]))
            .await
            .map_err(|error| DataflowError::Operation { operation: v.clone(), error })?;
        let valid = out.get(output).cloned().ok_or_else(|| DataflowError::Operation {
            operation: v.clone(),
            error: format!("it gave no output `{output}`"),
        })?;
        if !d.primitive.admits(&valid) {
            return Err(DataflowError::Value(format!(
                "{valid} from {v} is not a {:?} value of `{definition}`",
                d.primitive
            )));
        }
        self.conforms(definition, d, &valid, v).await?;
        Ok(valid)
    }

    /// A value meets its definition's schema (`json`), or dtype and shape (`tensor`: the
    /// blob is read through the network).
    async fn conforms(&self, definition: &str, d: &Definition, value: &Value, from: &str) -> Result<(), DataflowError> {
        let refuse = |why: String| DataflowError::Value(format!("the value of `{definition}` from {from}: {why}"));
        if d.schema.is_some() {
            let compiled = self.schemas.get_or_init(|| {
                self.flow
                    .definitions
                    .iter()
                    .filter_map(|(n, d)| Some((n.clone(), Schema::compile(d.schema.as_ref()?))))
                    .collect()
            });
            match compiled.get(definition) {
                Some(Ok(s)) => s.check(value).map_err(refuse)?,
                Some(Err(e)) => return Err(refuse(format!("its schema: {e}"))),
                None => {}
            }
        }
        if d.primitive == crate::spec::Primitive::Tensor {
            let digest = value.as_str().unwrap_or_default();
            let head = self.network.tensor_header(digest).await.map_err(refuse)?;
            d.check_tensor(&head).map_err(refuse)?;
        }
        Ok(())
    }

    /// The parameter sets of `op` with at least one item from `new_from` on: one item per
    /// input and per condition, each from an origin wired to it. For each slot j, the slots
    /// before it take older items, slot j a new one, the slots after it any: every set with
    /// a new item comes out exactly once. Operations that validate a definition run on
    /// values as they arrive instead.
    fn new_parameter_sets(
        &self,
        name: &str,
        op: &Operation,
        items: &[Item],
        new_from: usize,
    ) -> Result<Vec<ParameterSet>, DataflowError> {
        if self.flow.is_validator(name) {
            return Ok(Vec::new());
        }
        let candidates = |param: &str, d: &str| -> Vec<usize> {
            let origins = self.flow.origins(name, param, d);
            items.iter().filter(|i| i.definition == d && origins.contains(&i.origin)).map(|i| i.id).collect()
        };
        // Slots: the inputs, then the conditions.
        let params: Vec<&String> = op.inputs.keys().collect();
        let slots: Vec<Vec<usize>> = op
            .inputs
            .iter()
            .map(|(p, d)| candidates(p, d))
            .chain(op.conditions.iter().map(|c| candidates("conditions", c)))
            .collect();
        let mut out: Vec<ParameterSet> = Vec::new();
        for j in 0..slots.len() {
            let pick = |k: usize| -> Vec<usize> {
                slots[k]
                    .iter()
                    .copied()
                    .filter(|id| {
                        if k < j {
                            *id < new_from
                        } else if k == j {
                            *id >= new_from
                        } else {
                            true
                        }
                    })
                    .collect()
            };
            let choices: Vec<Vec<usize>> = (0..slots.len()).map(pick).collect();
            let count = choices.iter().try_fold(1usize, |acc, c| acc.checked_mul(c.len())).unwrap_or(usize::MAX);
            if count == 0 {
                continue;
            }
            if count > MAX_PARAMETER_SETS {
                return Err(DataflowError::FanOut { operation: name.to_owned(), count });
            }
            let mut sets: Vec<Vec<usize>> = vec![Vec::new()];
            for c in &choices {
                sets = sets
                    .into_iter()
                    .flat_map(|s| {
                        c.iter().map(move |id| {
                            let mut s = s.clone();
                            s.push(*id);
                            s
                        })
                    })
                    .collect();
            }
            for ids in sets {
                let inputs = params.iter().zip(&ids).map(|(p, id)| ((*p).clone(), *id)).collect();
                out.push((inputs, ids[params.len()..].to_vec()));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn json_len_counts_what_serialization_writes() {
        for v in [json!(null), json!("ä \"quoted\""), json!({"a": [1, 2.5, {"b": true}], "c": "x"}), json!(u64::MAX)] {
            assert_eq!(super::json_len(&v), serde_json::to_vec(&v).unwrap().len(), "{v}");
        }
    }
}
