//! Grants: who may read a private package's ciphertext.

use super::db::params;
use tessera_core::registry::PackageRecord;
use tessera_core::time::format_rfc3339;
use tessera_identity::PublicKey;

use super::{HubError, HubStore, namespace_of, parse_name};

/// A grant: the right to read a private package's ciphertext.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct GrantRecord {
    /// The package name (all its versions).
    pub name: String,
    /// Who may read it.
    pub grantee: String,
    /// When the grant ends (milliseconds since the Unix epoch), if ever.
    pub expires_ms: Option<u64>,
    /// When the grant ends (`YYYY-MM-DDTHH:MM:SSZ`, UTC), if ever.
    #[serde(default)]
    pub expires: Option<String>,
    /// True once revoked.
    pub revoked: bool,
}

impl GrantRecord {
    fn new(name: &str, grantee: String, expires_ms: Option<u64>, revoked: bool) -> Self {
        GrantRecord {
            name: name.to_owned(),
            grantee,
            expires_ms,
            expires: expires_ms.map(|ms| format_rfc3339(ms / 1000)),
            revoked,
        }
    }
}

impl HubStore {
    /// The grants of a package.
    pub fn grants(&self, name: &str) -> Result<Vec<GrantRecord>, HubError> {
        parse_name(name)?;
        let db = self.db();
        let mut stmt =
            db.prepare("SELECT grantee, expires_ms, revoked FROM grants WHERE name = ?1 ORDER BY grantee")?;
        let rows = stmt
            .query_map(params![name], |r| {
                Ok(GrantRecord::new(
                    name,
                    r.get(0)?,
                    r.get::<_, Option<i64>>(1)?.map(|v| u64::try_from(v).unwrap_or(0)),
                    r.get::<_, i64>(2)? != 0,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Grants (or renews) `grantee` the right to read the private package `name`, until
    /// `expires_ms` if given, on behalf of `actor` (an owner). Refused, changing nothing,
    /// when `name` has no live private version, when no live version was sealed for
    /// `grantee` (it could not open what it downloads), or when `expires_ms` is not after
    /// `now_ms`.
    pub fn set_grant(
        &self,
        name: &str,
        grantee: &PublicKey,
        expires_ms: Option<u64>,
        now_ms: u64,
        actor: Option<&PublicKey>,
    ) -> Result<GrantRecord, HubError> {
        parse_name(name)?;
        self.check_owner_signed(name, actor)?;
        if let Some(e) = expires_ms
            && e <= now_ms
        {
            return Err(HubError::BadRequest(format!(
                "the grant would expire at {}, which is not in the future",
                format_rfc3339(e / 1000)
            )));
        }
        let recipients = self.recipients(name)?;
        if recipients.is_empty() {
            return Err(HubError::NotFound(format!("{name} has no live private version to grant")));
        }
        if !recipients.contains(grantee) {
            return Err(HubError::BadRequest(format!(
                "no version of {name} is sealed for {grantee}, so it could not open the package; publish a version sealed for it (tessera module publish DIR --private --to {grantee} ...) and grant it then"
            )));
        }
        self.write(name, actor, |tx| {
            tx.execute(
                "INSERT INTO grants (name, grantee, expires_ms, revoked) VALUES (?1, ?2, ?3, 0)
                 ON CONFLICT(name, grantee) DO UPDATE SET expires_ms = excluded.expires_ms, revoked = 0",
                params![name, grantee.to_string(), expires_ms.map(|v| i64::try_from(v).unwrap_or(i64::MAX))],
            )?;
            Ok(GrantRecord::new(name, grantee.to_string(), expires_ms, false))
        })
    }

    /// Revokes a grant on behalf of `actor` (an owner).
    pub fn revoke(&self, name: &str, grantee: &PublicKey, actor: Option<&PublicKey>) -> Result<GrantRecord, HubError> {
        parse_name(name)?;
        self.check_owner_signed(name, actor)?;
        self.write(name, actor, |tx| {
            let n = tx.execute(
                "UPDATE grants SET revoked = 1 WHERE name = ?1 AND grantee = ?2",
                params![name, grantee.to_string()],
            )?;
            if n == 0 {
                return Err(HubError::NotFound(format!("no grant of {name} to {grantee}")));
            }
            Ok(GrantRecord::new(name, grantee.to_string(), None, true))
        })
    }

    /// Grants belong to owned namespaces (a private package always claims its namespace):
    /// refuses unsigned requests and keys that own nothing here, without claiming anything.
    fn check_owner_signed(&self, name: &str, actor: Option<&PublicKey>) -> Result<(), HubError> {
        let actor = actor.ok_or_else(|| {
            HubError::Unauthorized("grants are changed by the namespace's owners: sign the request".into())
        })?;
        self.check_owner(name, actor)
    }

    /// Checks that `reader` may download a package's bytes: anyone for a public package;
    /// for a private one, an owner of its namespace or a holder of a live grant.
    pub fn check_read(&self, record: &PackageRecord, reader: Option<&PublicKey>, now_ms: u64) -> Result<(), HubError> {
        if !record.private {
            return Ok(());
        }
        let Some(reader) = reader else {
            return Err(HubError::Unauthorized(format!(
                "{} is private: sign the request with a key it was granted to",
                record.name
            )));
        };
        if self.owners(namespace_of(&record.name))?.is_some_and(|o| o.contains(reader)) {
            return Ok(());
        }
        let grant = self.grants(&record.name)?.into_iter().find(|g| g.grantee == reader.to_string());
        match grant {
            Some(g) if g.revoked => {
                Err(HubError::Forbidden(format!("the grant of {} to {reader} was revoked", record.name)))
            }
            Some(g) if g.expires_ms.is_some_and(|e| e <= now_ms) => {
                Err(HubError::Forbidden(format!("the grant of {} to {reader} has expired", record.name)))
            }
            Some(_) => Ok(()),
            None => Err(HubError::Forbidden(format!("{reader} has no grant to read {}", record.name))),
        }
    }
}
