//! The signature replay cache in the hub's database, so that every hub process serving
//! one store refuses a nonce any of them accepted (a request captured on its way to one
//! process and replayed to another is refused like one replayed to the same process).
//!
//! Rows live until their timestamp leaves the signature window; expired rows are swept at
//! most every [`SWEEP_EVERY_MS`] by whichever process writes next. The table holds at most
//! [`MAX_NONCES`] live rows: past that, signed requests are refused as busy until the
//! window has moved on, so a flood of valid signatures cannot fill the disk.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::db::params;
use tessera_identity::{PublicKey, ReplayCache, VerifyError};

use super::HubStore;

/// Most live nonces remembered (as the in-memory cache).
const MAX_NONCES: i64 = 1_000_000;

/// How often expired nonces are swept, in ms.
const SWEEP_EVERY_MS: u64 = 10_000;

/// When this process last swept, Unix ms.
static LAST_SWEEP: AtomicU64 = AtomicU64::new(0);

/// Set by a sweep that found the table full; cleared by one that did not.
static FULL: AtomicBool = AtomicBool::new(false);

fn busy(e: impl std::fmt::Display) -> VerifyError {
    tracing::warn!(error = %e, "the replay cache's storage failed; refusing the signed request");
    VerifyError::Busy
}

fn to_sql(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

impl ReplayCache for HubStore {
    fn seen(&self, key: &PublicKey, nonce: &str, now_ms: u64) -> Result<bool, VerifyError> {
        self.db()
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM nonces WHERE signer = ?1 AND nonce = ?2 AND expires_ms >= ?3)",
                params![key.to_string(), nonce, to_sql(now_ms)],
                |r| r.get(0),
            )
            .map_err(busy)
    }

    fn remember(&self, key: &PublicKey, nonce: &str, expires_ms: u64, now_ms: u64) -> Result<(), VerifyError> {
        let last = LAST_SWEEP.load(Ordering::Relaxed);
        if now_ms >= last.saturating_add(SWEEP_EVERY_MS)
            && LAST_SWEEP.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            let tx = self.write_tx().map_err(busy)?;
            tx.execute("DELETE FROM nonces WHERE expires_ms < ?1", params![to_sql(now_ms)]).map_err(busy)?;
            let live: i64 = tx.query_row("SELECT COUNT(*) FROM nonces", [], |r| r.get(0)).map_err(busy)?;
            tx.commit().map_err(busy)?;
            FULL.store(live >= MAX_NONCES, Ordering::Relaxed);
        }
        if FULL.load(Ordering::Relaxed) {
            return Err(VerifyError::Busy);
        }
        // One statement: a new nonce is inserted, an expired one takes its new expiry, a live
        // one changes nothing (and the request is a replay).
        let changed = self
            .db()
            .execute(
                "INSERT INTO nonces (signer, nonce, expires_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(signer, nonce) DO UPDATE SET expires_ms = excluded.expires_ms
                 WHERE nonces.expires_ms < ?4",
                params![key.to_string(), nonce, to_sql(expires_ms), to_sql(now_ms)],
            )
            .map_err(busy)?;
        if changed == 0 {
            return Err(VerifyError::Replayed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tessera_identity::{KeyPair, KeyType};

    use super::*;

    #[test]
    fn a_nonce_is_taken_once_until_it_expires_and_per_signer() {
        let dir = tempfile::tempdir().unwrap();
        let store = HubStore::open(dir.path()).unwrap();
        // A second store over the same directory stands for another hub process.
        let other = HubStore::open(dir.path()).unwrap();
        let (a, b) = (KeyPair::generate(KeyType::Ed25519), KeyPair::generate(KeyType::Ed25519));
        let (a, b) = (a.public(), b.public());
        let now = 1_000_000;
        assert!(!store.seen(a, "n-0123456789abcdef", now).unwrap());
        store.remember(a, "n-0123456789abcdef", now + 60_000, now).unwrap();
        assert!(other.seen(a, "n-0123456789abcdef", now + 1).unwrap());
        assert_eq!(other.remember(a, "n-0123456789abcdef", now + 60_001, now + 1), Err(VerifyError::Replayed));
        // Another signer's nonce of the same text is its own.
        other.remember(b, "n-0123456789abcdef", now + 60_000, now).unwrap();
        // Past its expiry the nonce may be used again (its old request is stale by then).
        assert!(!store.seen(a, "n-0123456789abcdef", now + 60_001).unwrap());
        other.remember(a, "n-0123456789abcdef", now + 120_001, now + 60_001).unwrap();
        assert_eq!(store.remember(a, "n-0123456789abcdef", now + 120_002, now + 60_002), Err(VerifyError::Replayed));
        // Times past what SQLite's integers hold are clamped, not wrapped.
        store.remember(a, "n-fedcba9876543210", u64::MAX, u64::MAX - 1).unwrap();
        assert!(store.seen(a, "n-fedcba9876543210", u64::MAX - 1).unwrap());
    }
}
