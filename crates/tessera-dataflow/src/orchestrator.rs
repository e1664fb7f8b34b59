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

use crate::spec::{DataFlow, Operation, Origin};

/// Most parameter sets one operation may form in one context (a guard against fan-out
/// that would never end).
pub const MAX_PARAMETER_SETS: usize = 100_000;

/// Runs operations.
#[async_trait]
pub trait OperationNetwork: Send + Sync {
    /// Runs `op` (named `name`) on one parameter set: parameter name -> value. Gives
    /// output name -> value, or why it failed.
    async fn run(
        &self,
        name: &str,
        op: &Operation,
        inputs: BTreeMap<String, Value>,
    ) -> Result<BTreeMap<String, Value>, String>;
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
    /// How many times each operation ran.
    pub runs: BTreeMap<String, usize>,
    /// Every value the context saw.
    pub items: Vec<Item>,
}

/// Runs contexts of a flow.
pub struct Orchestrator<'a> {
    flow: &'a DataFlow,
    network: &'a dyn OperationNetwork,
}

/// A parameter set: the item ids of its inputs (by parameter) and conditions.
type ParameterSet = (BTreeMap<String, usize>, Vec<usize>);

impl<'a> Orchestrator<'a> {
    /// An orchestrator of `flow` running operations on `network`.
    pub fn new(flow: &'a DataFlow, network: &'a dyn OperationNetwork) -> Self {
        Orchestrator { flow, network }
    }

    /// Runs one context from the flow's seed and `inputs` (definition, value) to its end.
    pub async fn run_context(&self, inputs: Vec<(String, Value)>) -> Result<ContextResult, DataflowError> {
        let mut items: Vec<Item> = Vec::new();
        for (d, v) in self.flow.seed.iter().cloned().chain(inputs) {
            if !self.flow.seed.iter().any(|(s, _)| s == &d) && !self.flow.inputs.contains(&d) {
                return Err(DataflowError::Value(format!(
                    "`{d}` is not an input of this flow (inputs: {})",
                    self.flow.inputs.join(", ")
                )));
            }
            let value = self.admit(&d, v, &Origin::Seed).await?;
            items.push(Item { id: items.len(), definition: d, value, origin: Origin::Seed });
        }
        let mut seen: BTreeSet<(String, ParameterSet)> = BTreeSet::new();
        let mut runs: BTreeMap<String, usize> = BTreeMap::new();
        // Values of `lock` definitions used by a running operation.
        let mut held: BTreeSet<usize> = BTreeSet::new();
        let mut running = FuturesUnordered::new();
        loop {
            for (name, op) in &self.flow.operations {
                for set in self.parameter_sets(name, op, &items)? {
                    let key = (name.clone(), set.clone());
                    if seen.contains(&key) {
                        continue;
                    }
                    let locked: Vec<usize> = set
                        .0
                        .values()
                        .chain(&set.1)
                        .copied()
                        .filter(|id| self.flow.definitions[&items[*id].definition].lock)
                        .collect();
                    if locked.iter().any(|id| held.contains(id)) {
                        continue; // formed again once the value is free
                    }
                    seen.insert(key);
                    if !set.1.iter().all(|id| items[*id].value == Value::Bool(true)) {
                        continue;
                    }
                    held.extend(&locked);
                    *runs.entry(name.clone()).or_default() += 1;
                    let args: BTreeMap<String, Value> =
                        set.0.iter().map(|(p, id)| (p.clone(), items[*id].value.clone())).collect();
                    let name = name.clone();
                    running.push(async move {
                        let out = self.network.run(&name, op, args).await;
                        (name, locked, out)
                    });
                }
            }
            let Some((name, locked, out)) = running.next().await else { break };
            for id in locked {
                held.remove(&id);
            }
            let out = out.map_err(|error| DataflowError::Operation { operation: name.clone(), error })?;
            let op = &self.flow.operations[&name];
            for (output, d) in &op.outputs {
                let Some(v) = out.get(output) else {
                    return Err(DataflowError::Operation {
                        operation: name.clone(),
                        error: format!("it gave no output `{output}`"),
                    });
                };
                let origin = Origin::Output { operation: name.clone(), output: output.clone() };
                let value = self.admit(d, v.clone(), &origin).await?;
                items.push(Item { id: items.len(), definition: d.clone(), value, origin });
            }
        }
        let mut result = ContextResult { runs, ..ContextResult::default() };
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

    /// A new value of `definition`: type-checked, then through its validation operation.
    async fn admit(&self, definition: &str, value: Value, origin: &Origin) -> Result<Value, DataflowError> {
        let d = &self.flow.definitions[definition];
        if !d.primitive.admits(&value) {
            return Err(DataflowError::Value(format!(
                "{value} from {origin} is not a {:?} value of `{definition}`",
                d.primitive
            )));
        }
        let Some(v) = &d.validate else { return Ok(value) };
        let op = &self.flow.operations[v];
        let (param, _) =
            op.inputs.iter().next().ok_or_else(|| DataflowError::Value(format!("`{v}` takes no input")))?;
        let (output, _) =
            op.outputs.iter().next().ok_or_else(|| DataflowError::Value(format!("`{v}` gives no output")))?;
        let out = self
            .network
            .run(v, op, BTreeMap::from([(param.clone(), value)]))
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
        Ok(valid)
    }

    /// Every parameter set of `op` the items allow: one item per input and per condition,
    /// each from an origin wired to it. Operations used as validators only run on values
    /// as they arrive.
    fn parameter_sets(&self, name: &str, op: &Operation, items: &[Item]) -> Result<Vec<ParameterSet>, DataflowError> {
        if self.flow.is_validator(name) {
            return Ok(Vec::new());
        }
        let candidates = |param: &str, d: &str| -> Vec<usize> {
            let origins = self.flow.origins(name, param, d);
            items.iter().filter(|i| i.definition == d && origins.contains(&i.origin)).map(|i| i.id).collect()
        };
        let params: Vec<(String, Vec<usize>)> = op.inputs.iter().map(|(p, d)| (p.clone(), candidates(p, d))).collect();
        let conditions: Vec<Vec<usize>> = op.conditions.iter().map(|c| candidates("conditions", c)).collect();
        let count = params
            .iter()
            .map(|(_, c)| c.len())
            .chain(conditions.iter().map(Vec::len))
            .try_fold(1usize, |acc, n| acc.checked_mul(n))
            .unwrap_or(usize::MAX);
        if count > MAX_PARAMETER_SETS {
            return Err(DataflowError::FanOut { operation: name.to_owned(), count });
        }
        if count == 0 || (op.inputs.is_empty() && op.conditions.is_empty()) {
            return Ok(Vec::new());
        }
        let mut sets: Vec<ParameterSet> = vec![(BTreeMap::new(), Vec::new())];
        for (p, ids) in &params {
            sets = sets
                .into_iter()
                .flat_map(|s| {
                    ids.iter().map(move |id| {
                        let mut s = s.clone();
                        s.0.insert(p.clone(), *id);
                        s
                    })
                })
                .collect();
        }
        for ids in &conditions {
            sets = sets
                .into_iter()
                .flat_map(|s| {
                    ids.iter().map(move |id| {
                        let mut s = s.clone();
                        s.1.push(*id);
                        s
                    })
                })
                .collect();
        }
        Ok(sets)
    }
}
