//! The one authentication step every request passes, and upload accounting.
//!
//! A signed request's envelope is checked from its headers (window, audience, signature
//! over the body digest it claims, nonce) before its body is read; the body's digest is
//! compared with the claim once it has arrived, and only then is the nonce remembered.
//! Unsigned writes are refused from the headers when the hub requires signatures.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, Method, Uri};
use std::collections::HashMap;
use tessera_core::Digest;
use tessera_identity::envelope::HEADER as SIGNATURE_HEADER;
use tessera_identity::{Envelope, PublicKey, VerifyError, now_ms};

use super::{ApiError, ApiResult, AppState};
use crate::store::HubError;

fn unauthorized(e: impl std::fmt::Display) -> ApiError {
    ApiError(HubError::Unauthorized(e.to_string()))
}

/// A request whose headers were checked, waiting for its body.
pub(crate) struct HeaderAuth {
    envelope: Option<Envelope>,
    method: Method,
    path: String,
    /// When the headers were checked: the window is the request's start, however long its
    /// body takes to arrive.
    checked_at: u64,
}

impl HeaderAuth {
    /// The signer the envelope names (its signature already verified over the claimed
    /// body digest), if the request is signed.
    pub(crate) fn signer(&self) -> Option<&PublicKey> {
        self.envelope.as_ref().map(|e| &e.key)
    }

    /// The body digest the signer signed, if the request is signed.
    pub(crate) fn signed_body(&self) -> Option<&Digest> {
        self.envelope.as_ref().map(|e| &e.body)
    }

    /// Accepts the request once its body has arrived with digest `body`: returns the signer.
    pub(crate) fn finish(self, s: &AppState, body: &Digest) -> ApiResult<Option<PublicKey>> {
        let Some(env) = self.envelope else { return Ok(None) };
        let key = s
            .verifier
            .check_header(&env, self.method.as_str(), &self.path, self.checked_at)
            .and_then(|c| c.finish(body, now_ms()))
            .map_err(unauthorized)?;
        if let Err(e) = s.store.meter(&key, 1, 0, 0) {
            tracing::warn!("metering: {e}");
        }
        Ok(Some(key))
    }
}

/// Checks a request's headers before its body is read. `write`: the route changes
/// something, so an unsigned request is refused when the policy requires signatures (a
/// signed request is checked whatever the route).
pub(crate) fn check_headers(
    s: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    write: bool,
) -> ApiResult<HeaderAuth> {
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str()).to_owned();
    let checked_at = now_ms();
    let envelope = match headers.get(SIGNATURE_HEADER) {
        None if write && s.policy.require_signatures => return Err(unauthorized(VerifyError::Missing)),
        None => None,
        Some(h) => {
            let text = h.to_str().map_err(|_| unauthorized(format!("{SIGNATURE_HEADER} is not text")))?;
            let env = Envelope::parse(text).map_err(|e| unauthorized(VerifyError::Malformed(e)))?;
            // Everything but the body, now: a bad signature costs the hub no bytes.
            drop(s.verifier.check_header(&env, method.as_str(), &path, checked_at).map_err(unauthorized)?);
            Some(env)
        }
    };
    Ok(HeaderAuth { envelope, method: method.clone(), path, checked_at })
}

/// Authenticates a request whose (small) body is already read: the signer, if signed.
pub(crate) fn authenticate(
    s: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    write: bool,
) -> ApiResult<Option<PublicKey>> {
    check_headers(s, method, uri, headers, write)?.finish(s, &Digest::of(body))
}

/// The signer of a read request, if it is signed (unsigned reads are fine for public
/// things, whatever the policy).
pub(crate) fn read_signer(
    s: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> ApiResult<Option<PublicKey>> {
    authenticate(s, method, uri, headers, b"", false)
}

/// The signer of a request that must be signed, whatever the policy.
pub(crate) fn required(signer: Option<PublicKey>, what: &str) -> ApiResult<PublicKey> {
    signer.ok_or_else(|| unauthorized(format!("{what}: sign the request ({SIGNATURE_HEADER})")))
}

/// An upload in progress, counted against its account until dropped.
pub(crate) struct UploadSlot {
    uploads: Arc<Mutex<HashMap<String, usize>>>,
    account: String,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut g = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(&self.account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.remove(&self.account);
            }
        }
    }
}

/// Takes an upload slot for `signer` (unsigned uploads share one account), or refuses with
/// 429 when it has [`super::HubPolicy::max_uploads_per_account`] in progress.
pub(crate) fn upload_slot(s: &AppState, signer: Option<&PublicKey>) -> ApiResult<UploadSlot> {
    let account = signer.map(ToString::to_string).unwrap_or_default();
    let mut g = s.uploads.lock().unwrap_or_else(|p| p.into_inner());
    let n = g.entry(account.clone()).or_default();
    if *n >= s.policy.max_uploads_per_account {
        let who = if account.is_empty() { "unsigned clients".to_owned() } else { account };
        return Err(ApiError(HubError::Busy(format!(
            "{who} already has {} uploads in progress; wait for one to finish",
            s.policy.max_uploads_per_account
        ))));
    }
    *n += 1;
    Ok(UploadSlot { uploads: s.uploads.clone(), account })
}

/// Refuses an upload of `bytes_in` more bytes past the account's quota (before reading it,
/// when the size is announced; after, when it is not).
pub(crate) fn check_quota(s: &AppState, actor: Option<&PublicKey>, bytes_in: u64) -> ApiResult<()> {
    let (Some(actor), Some(quota)) = (actor, s.policy.upload_quota_bytes) else { return Ok(()) };
    let used = s.store.usage(actor)?.bytes_in;
    if used.saturating_add(bytes_in) > quota {
        return Err(ApiError(HubError::Quota(format!(
            "{actor} has uploaded {used} bytes; {bytes_in} more is over its quota of {quota}"
        ))));
    }
    Ok(())
}

/// Counts bytes moved for a signed account, and refuses uploads past its quota.
pub(crate) fn meter_bytes(s: &AppState, actor: Option<&PublicKey>, bytes_in: u64, bytes_out: u64) -> ApiResult<()> {
    let Some(actor) = actor else { return Ok(()) };
    if bytes_in == 0 && bytes_out == 0 {
        return Ok(());
    }
    if bytes_in > 0 {
        check_quota(s, Some(actor), bytes_in)?;
    }
    s.store.meter(actor, 0, bytes_in, bytes_out)?;
    Ok(())
}
