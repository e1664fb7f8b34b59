//! TLS to PostgreSQL, with libpq's connection parameters.
//!
//! `sslmode` takes libpq's values and, with the differences below, means what it means
//! there (PostgreSQL manual, "SSL Support", table "SSL Mode Descriptions"):
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | no |
//! | `prefer` (the default) | when the server offers TLS | only with `sslrootcert` (as `verify-ca`) |
//! | `require` | yes | only with `sslrootcert` (as `verify-ca`) |
//! | `verify-ca` | yes | signed by a CA of `sslrootcert` |
//! | `verify-full` | yes | as `verify-ca`, and issued for the host connected to |
//!
//! `sslrootcert` names a PEM file of CA certificates; `verify-ca` and `verify-full` need it
//! (libpq's fallback, `~/.postgresql/root.crt`, is not read). TLS is rustls with the ring
//! provider, and certificates are checked as browsers check them (webpki), which libpq
//! does not all do: under `verify-full` the host must be among the certificate's subject
//! alternative names (a common name alone is not taken); a self-signed certificate that
//! is its own CA cannot be its own `sslrootcert` (sign the server's certificate with a CA
//! made for it). Not supported: `sslmode=allow`, `sslrootcert=system`, client
//! certificates (`sslcert`, `sslkey`). With `prefer`, a server whose TLS rustls cannot speak
//! is an error, not a fallback to plain text.
//!
//! Connection strings come as URLs (`postgres://user:password@host:port/db?sslmode=…`) or
//! as libpq's `key=value` words; the TLS parameters are taken out of either, and the rest
//! is handed on untouched. No error here repeats the connection string (it may hold a
//! password).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A connection string split into what the PostgreSQL client reads and the TLS settings
/// it does not. (Not `Debug`: the string may hold a password.)
pub(crate) struct TlsSettings {
    /// The connection string without `sslrootcert`, `sslmode` as the client knows it.
    pub url: String,
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
}

/// Splits a connection string, URL or `key=value` words.
///
/// # Errors
/// A message naming an `sslmode` that is not libpq's, a `verify-*` mode without
/// `sslrootcert`, client certificate parameters, or a `sslrootcert` that cannot be read
/// as a path.
pub(crate) fn settings(conn: &str) -> Result<TlsSettings, String> {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        url_settings(conn)
    } else {
        words_settings(conn)
    }
}

/// What one TLS parameter says.
#[derive(Default)]
struct Taken {
    mode: Option<SslMode>,
    root_cert: Option<PathBuf>,
}

impl Taken {
    /// Takes `key` if it is a TLS parameter (true), its `value` already unescaped.
    fn take(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "sslmode" => {
                self.mode = Some(match value {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
                        ));
                    }
                });
                Ok(true)
            }
            "sslrootcert" => {
                self.root_cert = Some(PathBuf::from(value));
                Ok(true)
            }
            "sslcert" | "sslkey" | "sslpassword" => {
                Err(format!("{key}: client certificates are not supported; the hub authenticates by password"))
            }
            _ => Ok(false),
        }
    }

    /// The settings, with the client's `sslmode` for `rest` (`sslmode=…` to add to it).
    fn finish(self) -> Result<(SslMode, Option<PathBuf>, &'static str), String> {
        let mode = self.mode.unwrap_or(SslMode::Prefer);
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && self.root_cert.is_none() {
            return Err("sslmode=verify-ca and verify-full need sslrootcert=FILE (the CA certificates, PEM)".into());
        }
        // The client knows disable, prefer and require: the checks beyond are this module's.
        let client = match mode {
            SslMode::Disable => "sslmode=disable",
            SslMode::Prefer => "sslmode=prefer",
            _ => "sslmode=require",
        };
        Ok((mode, self.root_cert, client))
    }
}

/// A URL's query starts at the first `?` after its host: after the last `@` before the
/// path (a password may hold an unescaped `?` or `@`; a query value may hold `@`). Only the
/// TLS parameters' values are unescaped; the others are handed on as written.
fn url_settings(url: &str) -> Result<TlsSettings, String> {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority..];
    // The user part ends at the last `@` before the first `/` that follows it (or before
    // the first `?` when there is no path).
    let mut host = authority;
    let mut from = 0;
    while let Some(at) = rest[from..].find('@').map(|i| from + i) {
        let ends = rest[..at].find('/').or_else(|| rest[..at].find('?').filter(|_| !rest[at..].contains('/')));
        if ends.is_some() {
            break;
        }
        host = authority + at + 1;
        from = at + 1;
    }
    let (base, query) = match url[host..].find('?') {
        Some(i) => (&url[..host + i], &url[host + i + 1..]),
        None => (url, ""),
    };
    let mut taken = Taken::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let tls = matches!(key, "sslmode" | "sslrootcert" | "sslcert" | "sslkey" | "sslpassword");
        if !tls || !taken.take(key, &percent_decode(value)?)? {
            kept.push(pair);
        }
    }
    let (mode, root_cert, client) = taken.finish()?;
    kept.push(client);
    Ok(TlsSettings { url: format!("{base}?{}", kept.join("&")), mode, root_cert })
}

/// libpq's `key = value` words: a value is a run of non-blanks or single-quoted, a
/// backslash taking the next character as it is in either; the words that are not TLS
/// parameters are kept as written.
fn words_settings(conn: &str) -> Result<TlsSettings, String> {
    let mut taken = Taken::default();
    let mut kept: Vec<&str> = Vec::new();
    let mut rest = conn.trim_start();
    while !rest.is_empty() {
        let eq = rest.find('=').ok_or("a word of the connection string has no `=`")?;
        let key = rest[..eq].trim_end();
        let after = rest[eq + 1..].trim_start();
        let (value, len) = if let Some(quoted) = after.strip_prefix('\'') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '\'')) => break i,
                    Some((_, '\\')) => value.push(chars.next().ok_or("an escape ends the connection string")?.1),
                    Some((_, c)) => value.push(c),
                    None => return Err("a quoted value of the connection string is not closed".into()),
                }
            };
            (value, 1 + end + 1)
        } else {
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, c)) if c.is_whitespace() => break i,
                    Some((_, '\\')) => value.push(chars.next().ok_or("an escape ends the connection string")?.1),
                    Some((_, c)) => value.push(c),
                    None => break after.len(),
                }
            };
            (value, end)
        };
        let word_end = rest.len() - after.len() + len;
        if !taken.take(key, &value)? {
            kept.push(&rest[..word_end]);
        }
        rest = rest[word_end..].trim_start();
    }
    let (mode, root_cert, client) = taken.finish()?;
    kept.push(client);
    Ok(TlsSettings { url: kept.join(" "), mode, root_cert })
}

/// `%XX` escapes of a URL query value (a path may hold spaces or `&`).
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| format!("{s:?}: a % escape is cut short"))?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{s:?}: %{hex} is not an escape"));
            }
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("{s:?}: %{hex} is not an escape"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once unescaped"))
}

/// The rustls connector for `settings` (not called for `disable`).
///
/// # Errors
/// A message naming an unreadable or empty `sslrootcert` file.
pub(crate) fn connector(settings: &TlsSettings) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = match &settings.root_cert {
        None => None,
        Some(path) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(path)?), provider.clone())
                .build()
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?,
        ),
    };
    let verifier = Arc::new(Checks {
        chain,
        name: settings.mode == SslMode::VerifyFull,
        signatures: provider.signature_verification_algorithms,
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The CA certificates of a PEM file.
fn roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let what = |e: &dyn std::fmt::Display| format!("sslrootcert {}: {e}", path.display());
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| what(&e))? {
        store.add(cert.map_err(|e| what(&e))?).map_err(|e| what(&e))?;
    }
    if store.is_empty() {
        return Err(what(&"no certificate in the file"));
    }
    Ok(store)
}

/// What a connection checks of the server's certificate, as its `sslmode` says: the chain
/// against the CAs of `sslrootcert` when there is one (without it, `prefer` and `require`
/// take any certificate, as libpq does: they guard against eavesdropping, not against an
/// impostor), the host name under `verify-full` only. The handshake's signatures are
/// always checked.
#[derive(Debug)]
struct Checks {
    chain: Option<Arc<WebPkiServerVerifier>>,
    name: bool,
    signatures: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Checks {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.signatures)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.signatures)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_take_libpq_s_modes_and_keep_the_rest() {
        let s =
            settings("postgres://u@h:5/db?connect_timeout=5&sslmode=verify-full&sslrootcert=/a%20b/ca.pem").unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/a b/ca.pem")));
        assert_eq!(s.url, "postgres://u@h:5/db?connect_timeout=5&sslmode=require");
        let s = settings("postgres://u@h/db").unwrap();
        assert_eq!((s.mode, s.url.as_str()), (SslMode::Prefer, "postgres://u@h/db?sslmode=prefer"));
        // A password holding `?`, `@` or `%` is left alone, and so is a query value with `@`.
        let s = settings("postgres://u:p?w@rd@h:5/db?sslmode=require").unwrap();
        assert_eq!((s.mode, s.url.as_str()), (SslMode::Require, "postgres://u:p?w@rd@h:5/db?sslmode=require"));
        let s = settings("postgres://u@h/db?application_name=me@there&sslmode=disable&password=a%z").unwrap();
        assert_eq!(s.mode, SslMode::Disable);
        assert_eq!(s.url, "postgres://u@h/db?application_name=me@there&password=a%z&sslmode=disable");
        let s = settings("postgres://u@h?sslmode=require").unwrap();
        assert_eq!((s.mode, s.url.as_str()), (SslMode::Require, "postgres://u@h?sslmode=require"));
        // libpq's words, a quoted password with blanks and escapes kept as written.
        let s = settings("host=h  password='a b\\' c' sslmode=verify-ca sslrootcert='/x y/ca.pem' dbname=d").unwrap();
        assert_eq!(s.mode, SslMode::VerifyCa);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/x y/ca.pem")));
        assert_eq!(s.url, "host=h password='a b\\' c' dbname=d sslmode=require");
        assert_eq!(settings("host=h dbname=d").unwrap().url, "host=h dbname=d sslmode=prefer");
        // An escaped blank belongs to its value: no TLS parameter hides in a password.
        let s = settings("password=x\\ sslmode=disable sslrootcert=/a\\ b/ca.pem sslmode=require").unwrap();
        assert_eq!(s.mode, SslMode::Require);
        assert_eq!(s.root_cert.as_deref(), Some(Path::new("/a b/ca.pem")));
        assert_eq!(s.url, "password=x\\ sslmode=disable sslmode=require");
        assert_eq!(settings("postgres://u@h/db?sslmode=disable").unwrap().mode, SslMode::Disable);
        for (bad, says) in [
            ("postgres://h/db?sslmode=allow-all", "sslmode=allow-all"),
            ("postgres://h/db?sslmode=verify-ca", "need sslrootcert"),
            ("postgres://h/db?sslcert=/c.pem", "client certificates"),
            ("postgres://h/db?sslrootcert=%zz", "not an escape"),
            ("postgres://h/db?sslrootcert=%2", "cut short"),
            ("postgres://h/db?sslrootcert=%ff", "UTF-8"),
            ("postgres://h/db?sslrootcert=%+1", "not an escape"),
            ("host=h password='open", "not closed"),
            ("host=h password='\\", "escape ends"),
            ("host=h dbname", "no `=`"),
            ("host=h sslmode=sometimes", "sslmode=sometimes"),
        ] {
            let e = settings(bad).err().unwrap();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_root_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let s = TlsSettings { url: String::new(), mode: SslMode::VerifyFull, root_cert: Some(empty) };
        assert!(connector(&s).err().unwrap().contains("no certificate"));
        let s = TlsSettings { url: String::new(), mode: SslMode::VerifyFull, root_cert: Some(dir.path().join("none")) };
        assert!(connector(&s).err().unwrap().contains("none"));
        // Hostile words never panic, whatever they hold.
        for junk in ["", "=", "'", "a='", "a=\\", "é=ü", "a = 'b\\", "= = =", "a=b c"] {
            let _ = settings(junk);
        }
    }
}
