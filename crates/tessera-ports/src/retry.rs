//! Retrying what a backend may get back from: a lost connection, a restarting server, a
//! cluster electing a new leader after losing a server. Bad names, oversized values and
//! missing things are not retried.

use std::time::Duration;

use tokio::time::Instant;

use crate::{BlobError, BusError, WorldError};

/// An error that may pass if the operation is tried again.
pub trait Transient {
    /// True when trying again may succeed.
    fn transient(&self) -> bool;
}

impl Transient for BusError {
    fn transient(&self) -> bool {
        matches!(self, BusError::Backend(_))
    }
}

impl Transient for WorldError {
    fn transient(&self) -> bool {
        matches!(self, WorldError::Backend(_))
    }
}

impl Transient for BlobError {
    fn transient(&self) -> bool {
        matches!(self, BlobError::Backend(_) | BlobError::Io { .. })
    }
}

/// Runs `f` until it succeeds, fails for good, or `patience` has passed, waiting 100 ms
/// after the first transient failure and twice as long after each next, up to 5 s. Each
/// retried failure is logged with `what`.
///
/// # Errors
/// The first error that is not [`Transient`], or the last one once `patience` has passed.
pub async fn retry_transient<T, E, F, Fut>(what: &str, patience: Duration, mut f: F) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + patience;
    let mut backoff = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.transient() && Instant::now() < deadline => {
                tracing::warn!("{what}: {e}; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn transient_failures_are_retried_and_others_are_not() {
        let calls = AtomicU32::new(0);
        let got = retry_transient("test", Duration::from_secs(10), || async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                0 | 1 => Err(BusError::Backend("server gone".into())),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(got, Ok(2));
        let calls = AtomicU32::new(0);
        let got: Result<(), _> = retry_transient("test", Duration::from_secs(10), || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(BusError::Name("a..b".into()))
        })
        .await;
        assert!(matches!(got, Err(BusError::Name(_))));
        assert_eq!(calls.load(Ordering::Relaxed), 1, "a bad name is not retried");
        let got: Result<(), _> =
            retry_transient("test", Duration::ZERO, || async { Err(WorldError::Backend("down".into())) }).await;
        assert!(matches!(got, Err(WorldError::Backend(_))), "patience spent: the last error");
    }
}
