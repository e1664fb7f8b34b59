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
/// models (safetensors, floating-point tensors of any type; integer tensors are left out of
/// the sum) and, as `global`, the round's global model, whose layout (names, shapes and
/// types) every model must have (without it, the first model's); its config's `weights`
/// gives each model's weight (examples). It answers `partial`, the weighted sum of the
/// models' floating-point tensors (F32), and `weight`, the sum of the weights (JSON): the
/// global aggregator divides the sum of the partials by the sum of the weights. A model
/// laid out otherwise, or holding NaN or an infinity, fails the task, naming it.
fn fedavg_partial(inv: Invocation, ctx: &dyn TaskContext) -> Result<Outputs, String> {
    let (partial, models, total) = partial_sum(&inv)?;
    ctx.log(LogLevel::Info, &format!("partial FedAvg of {models} models, weight {total}"));
    Ok(vec![("partial".into(), Bytes::from(partial.encode())), ("weight".into(), Bytes::from(total.to_string()))])
}

/// `fedavg-partial`'s sum: the weighted sum, the models summed and the sum of their
/// weights.
fn partial_sum(inv: &Invocation) -> Result<(tessera_core::tensor::Tensors, usize, f64), String> {
    use tessera_core::tensor::{Model, TensorLimits};
    let weights = inv.config.get("weights").and_then(|w| w.as_object()).ok_or("config.weights is missing")?;
    let decode = |name: &str, bytes: &[u8]| {
        Model::decode(bytes, TensorLimits::default()).map_err(|e| format!("input {name:?}: {e}"))
    };
    let mut reference = match inv.inputs.iter().find(|(n, _)| n == "global") {
        Some((n, b)) => Some(decode(n, b)?),
        None => None,
    };
    let mut models = Vec::with_capacity(inv.inputs.len());
    let mut ws = Vec::with_capacity(inv.inputs.len());
    for (name, bytes) in inv.inputs.iter().filter(|(n, _)| n != "global") {
        let w = weights.get(name).and_then(|w| w.as_f64()).ok_or_else(|| format!("no weight for input {name:?}"))?;
        if !(w.is_finite() && w >= 0.0 && w <= f64::from(f32::MAX)) {
            return Err(format!("the weight of {name:?} must be a non-negative number"));
        }
        let m = decode(name, bytes)?;
        let layout = reference.get_or_insert_with(|| m.clone());
        layout.check_same_layout(&m).map_err(|e| format!("input {name:?}: {e}"))?;
        for (t, v) in &m.floats.0 {
            if let Some(x) = v.data.iter().find(|x| !x.is_finite()) {
                return Err(format!("input {name:?}: tensor {t:?} holds {x}"));
            }
        }
        models.push(m.floats);
        ws.push(w as f32);
    }
    if models.is_empty() {
        return Err("no models to aggregate".into());
    }
    let mut out = models[0].clone();
    for (name, t) in out.0.iter_mut() {
        let inputs: Vec<&[f32]> = models.iter().map(|m| m.0[name].data.as_slice()).collect();
        tessera_core::aggregate::weighted_sum_into(&mut t.data, &inputs, &ws, 1);
    }
    if let Some((t, _)) = out.0.iter().find(|(_, t)| t.data.iter().any(|x| !x.is_finite())) {
        return Err(format!("the partial sum's tensor {t:?} is past the f32 range"));
    }
    let total: f64 = ws.iter().map(|w| f64::from(*w)).sum();
    Ok((out, models.len(), total))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_core::tensor::{FloatType, Model, Tensor, Tensors};

    fn model(v: Vec<f32>, ty: FloatType) -> Bytes {
        let t = Tensors([("w".to_string(), Tensor { shape: vec![v.len()], data: v })].into());
        let mut m: Model = t.into();
        if ty != FloatType::F32 {
            m.types.insert("w".into(), ty);
        }
        Bytes::from(m.encode())
    }

    fn call(inputs: Vec<(&str, Bytes)>, weights: serde_json::Value) -> Invocation {
        Invocation {
            config: json!({ "weights": weights }),
            inputs: inputs.into_iter().map(|(n, b)| (n.to_string(), b)).collect(),
            timeout: None,
        }
    }

    #[test]
    fn the_partial_sum_weighs_models_of_the_global_model_s_type() {
        let global = model(vec![0.0, 0.0], FloatType::F16);
        let inv = call(
            vec![
                ("global", global),
                ("u0", model(vec![1.0, 2.0], FloatType::F16)),
                ("u1", model(vec![3.0, 4.0], FloatType::F16)),
            ],
            json!({"u0": 1, "u1": 3}),
        );
        let (sum, n, total) = partial_sum(&inv).unwrap();
        assert_eq!((n, total), (2, 4.0));
        assert_eq!(sum.0["w"].data, vec![10.0, 14.0]);
    }

    #[test]
    fn updates_unlike_the_global_model_or_not_finite_are_refused_naming_them() {
        let global = || model(vec![0.0, 0.0], FloatType::F16);
        for (update, word) in [
            (model(vec![1.0, 2.0], FloatType::F32), "u1"),
            (model(vec![1.0], FloatType::F16), "u1"),
            (model(vec![1.0, f32::NAN], FloatType::F16), "holds NaN"),
            (Bytes::from_static(b"not safetensors"), "u1"),
        ] {
            let inv = call(
                vec![("global", global()), ("u0", model(vec![1.0, 2.0], FloatType::F16)), ("u1", update)],
                json!({"u0": 1, "u1": 1}),
            );
            let e = partial_sum(&inv).unwrap_err();
            assert!(e.contains(word), "{e}");
        }
        // Weights: missing, negative, past f32; a sum past f32.
        for w in [json!({"u0": 1}), json!({"u0": 1, "u1": -1}), json!({"u0": 1, "u1": 1e300})] {
            let inv = call(vec![("u0", global()), ("u1", global())], w.clone());
            assert!(partial_sum(&inv).unwrap_err().contains("u1"), "{w}");
        }
        let big = || model(vec![3e38, 0.0], FloatType::F32);
        let inv = call(vec![("u0", big()), ("u1", big())], json!({"u0": 1, "u1": 1}));
        assert!(partial_sum(&inv).unwrap_err().contains("f32 range"));
        assert!(partial_sum(&call(vec![("global", global())], json!({}))).unwrap_err().contains("no models"));
    }
}
