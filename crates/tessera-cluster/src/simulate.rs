//! Simulated device heterogeneity, for benchmarks and tests of stragglers and asynchronous
//! FL: a node whose runtime is wrapped by [`slowed`] takes `FACTOR` times as long for
//! every run, and one wrapped by [`delayed`] `MS` milliseconds longer (the wrapped run
//! happens, then the node waits before answering, as a slower device would).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tessera_core::RuntimeKind;
use tessera_ports::{Instance, Invocation, ModuleImage, Outputs, Runtime, RuntimeError, TaskContext};

/// A runtime that answers late.
struct Slowed {
    inner: Arc<dyn Runtime>,
    factor: u32,
    extra: Duration,
}

#[async_trait]
impl Runtime for Slowed {
    fn kind(&self) -> RuntimeKind {
        self.inner.kind()
    }

    async fn run(
        &self,
        module: &ModuleImage,
        invocation: Invocation,
        ctx: Arc<dyn TaskContext>,
    ) -> Result<Outputs, RuntimeError> {
        let started = Instant::now();
        let out = self.inner.run(module, invocation, ctx).await;
        let took = started.elapsed();
        tokio::time::sleep(took * self.factor.saturating_sub(1) + self.extra).await;
        out
    }

    async fn start(
        &self,
        module: &ModuleImage,
        ctx: Arc<dyn TaskContext>,
    ) -> Result<Option<Box<dyn Instance>>, RuntimeError> {
        self.inner.start(module, ctx).await
    }

    fn libraries(&self) -> Vec<String> {
        self.inner.libraries()
    }

    fn installs_libraries(&self) -> bool {
        self.inner.installs_libraries()
    }
}

/// Wraps a node's runtime so that every run takes `FACTOR` times as long (a
/// [`RuntimeWrapper`](crate::RuntimeWrapper): `wasm_wrapper: Some(slowed::<5>)`).
pub fn slowed<const FACTOR: u32>(inner: Arc<dyn Runtime>) -> Arc<dyn Runtime> {
    Arc::new(Slowed { inner, factor: FACTOR, extra: Duration::ZERO })
}

/// Wraps a node's runtime so that every run answers `MS` milliseconds later.
pub fn delayed<const MS: u64>(inner: Arc<dyn Runtime>) -> Arc<dyn Runtime> {
    Arc::new(Slowed { inner, factor: 1, extra: Duration::from_millis(MS) })
}
