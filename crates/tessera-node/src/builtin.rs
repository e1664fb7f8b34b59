//! The `builtin` runtime: modules whose code is compiled into tessera, named by `entry`.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tessera_core::RuntimeKind;
use tessera_ports::{Invocation, LogLevel, ModuleImage, Outputs, Runtime, RuntimeError, TaskContext};

/// A builtin's code.
pub type BuiltinFn = Arc<dyn Fn(Invocation, &dyn TaskContext) -> Result<Outputs, String> + Send + Sync>;

/// Runs builtins by name.
#[derive(Clone)]
pub struct BuiltinRuntime {
    builtins: BTreeMap<String, BuiltinFn>,
}

impl Default for BuiltinRuntime {
    fn default() -> Self {
        let mut r = BuiltinRuntime { builtins: BTreeMap::new() };
        r.register("echo", Arc::new(echo));
        r.register("fedavg-partial", Arc::new(fedavg_partial));
        r
    }
}

/// `echo`: returns its inputs, or its config as `config` when it has none. Called as an
/// actor (the config names a `function`), it answers with its first argument as `result`
/// (JSON), plus its inputs.
fn echo(inv: Invocation, ctx: &dyn TaskContext) -> Result<Outputs, String> {
    if let Some(f) = inv.config.get("function").and_then(|f| f.as_str()) {
        if !matches!(f, "echo" | "run") {
            return Err(format!("unknown function {f:?} (echo has: echo)"));
        }
        let first = inv.config.get("args").and_then(|a| a.get(0)).cloned().unwrap_or(serde_json::Value::Null);
        let mut out = vec![("result".to_owned(), Bytes::from(first.to_string()))];
        out.extend(inv.inputs);
        return Ok(out);
    }
    ctx.log(LogLevel::Info, &format!("echo on {}", ctx.node()));
    if inv.inputs.is_empty() {
        return Ok(vec![("config".into(), Bytes::from(inv.config.to_string()))]);
    }
    Ok(inv.inputs)
}

/// `fedavg-partial`: a region aggregator's part of hierarchical FedAvg. Its inputs are
/// models (safetensors, floating-point tensors of any type; integer tensors are left out);
/// its config's `weights` gives each input's weight (examples). It answers `partial`, the
/// weighted sum of the models' floating-point tensors (F32), and `weight`, the sum of the
/// weights (JSON): the global aggregator divides the sum of the partials by the sum of the
/// weights.
fn fedavg_partial(inv: Invocation, ctx: &dyn TaskContext) -> Result<Outputs, String> {
    use tessera_core::tensor::{Model, TensorLimits};
    let weights = inv.config.get("weights").and_then(|w| w.as_object()).ok_or("config.weights is missing")?;
    if inv.inputs.is_empty() {
        return Err("no models to aggregate".into());
    }
    let mut models = Vec::with_capacity(inv.inputs.len());
    let mut ws = Vec::with_capacity(inv.inputs.len());
    for (name, bytes) in &inv.inputs {
        let w = weights.get(name).and_then(|w| w.as_f64()).ok_or_else(|| format!("no weight for input {name:?}"))?;
        if !(w.is_finite() && w >= 0.0) {
            return Err(format!("the weight of {name:?} must be a non-negative number"));
        }
        models.push(Model::decode(bytes, TensorLimits::default()).map_err(|e| format!("input {name:?}: {e}"))?.floats);
        ws.push(w as f32);
    }
    for m in &models[1..] {
        models[0].check_same_layout(m).map_err(|e| e.to_string())?;
    }
    let mut out = models[0].clone();
    for (name, t) in out.0.iter_mut() {
        let inputs: Vec<&[f32]> = models.iter().map(|m| m.0[name].data.as_slice()).collect();
        tessera_core::aggregate::weighted_sum_into(&mut t.data, &inputs, &ws, 1);
    }
    let total: f64 = ws.iter().map(|w| f64::from(*w)).sum();
    ctx.log(LogLevel::Info, &format!("partial FedAvg of {} models, weight {total}", models.len()));
    Ok(vec![("partial".into(), Bytes::from(out.encode())), ("weight".into(), Bytes::from(total.to_string()))])
}

impl BuiltinRuntime {
    /// The standard builtins (`echo`, `fedavg-partial`).
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds (or replaces) a builtin.
    pub fn register(&mut self, name: &str, f: BuiltinFn) {
        self.builtins.insert(name.to_owned(), f);
    }
    /// Names of the builtins.
    pub fn names(&self) -> Vec<String> {
        self.builtins.keys().cloned().collect()
    }
}

#[async_trait]
impl Runtime for BuiltinRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Builtin
    }
    async fn run(
        &self,
        module: &ModuleImage,
        invocation: Invocation,
        ctx: Arc<dyn TaskContext>,
    ) -> Result<Outputs, RuntimeError> {
        let f = self.builtins.get(&module.manifest.entry).cloned().ok_or_else(|| {
            RuntimeError::Load(format!(
                "no builtin named {:?} (known: {})",
                module.manifest.entry,
                self.names().join(", ")
            ))
        })?;
        tokio::task::spawn_blocking(move || f(invocation, ctx.as_ref()))
            .await
            .map_err(|e| RuntimeError::Trap(e.to_string()))?
            .map_err(RuntimeError::Module)
    }
}
