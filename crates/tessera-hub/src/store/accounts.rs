//! Metering: signed requests and bytes per account.

use super::db::{OptionalExtension, params};
use tessera_identity::PublicKey;

use super::{HubError, HubStore};

/// What an account has used on a hub.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UsageRecord {
    /// The account (a public key).
    pub account: String,
    /// Signed requests.
    pub requests: u64,
    /// Bytes uploaded.
    pub bytes_in: u64,
    /// Bytes downloaded.
    pub bytes_out: u64,
}

fn to_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl HubStore {
    /// Counts requests and bytes for an account (saturating at `i64::MAX`, the largest
    /// integer SQLite holds).
    pub fn meter(&self, account: &PublicKey, requests: u64, bytes_in: u64, bytes_out: u64) -> Result<(), HubError> {
        self.db().execute(
            "INSERT INTO usage (account, requests, bytes_in, bytes_out) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(account) DO UPDATE SET
               requests = CASE WHEN usage.requests > 9223372036854775807 - ?2 THEN 9223372036854775807 ELSE usage.requests + ?2 END,
               bytes_in = CASE WHEN usage.bytes_in > 9223372036854775807 - ?3 THEN 9223372036854775807 ELSE usage.bytes_in + ?3 END,
               bytes_out = CASE WHEN usage.bytes_out > 9223372036854775807 - ?4 THEN 9223372036854775807 ELSE usage.bytes_out + ?4 END",
            params![account.to_string(), to_sql(requests), to_sql(bytes_in), to_sql(bytes_out)],
        )?;
        Ok(())
    }

    /// What an account has used.
    pub fn usage(&self, account: &PublicKey) -> Result<UsageRecord, HubError> {
        let row = self
            .db()
            .query_row(
                "SELECT requests, bytes_in, bytes_out FROM usage WHERE account = ?1",
                params![account.to_string()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)),
            )
            .optional()?;
        let (requests, bytes_in, bytes_out) = row.unwrap_or_default();
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(UsageRecord {
            account: account.to_string(),
            requests: n(requests),
            bytes_in: n(bytes_in),
            bytes_out: n(bytes_out),
        })
    }
}
