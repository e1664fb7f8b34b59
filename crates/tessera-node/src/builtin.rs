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

impl BuiltinRuntime {
    /// The standard builtins (`echo`).
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
