//! Serving a blob's bytes. Every download route (packages, blobs by digest, models,
//! component objects) resolves its record and applies its own read rules (a private
//! package's grants), hands the [`Download`] to [`serve_download`] (one place answers
//! `HEAD`, ranges, `If-Range` and the headers, whether the bytes come from this process's
//! file or from the shared store), then meters a signed reader at [`sent_bytes`].

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tessera_core::Digest;

use super::{ApiError, ApiResult, blocking};
use crate::store::{Download, HubError};

/// Serves a [`Download`] to a `GET` or `HEAD` with `request`'s headers, the same way
/// whether the bytes come from this process's file (through tower-http's `ServeFile`) or
/// from the shared store as they are read: 200 with the whole; 206 with `Content-Range`
/// for one satisfiable range ([`requested_part`]), 200 with the whole for several of which
/// one is satisfiable; 416 with `Content-Range: bytes */LEN` for what cannot be served; a `HEAD` describes the whole (a range is defined for
/// `GET` alone, RFC 9110 §14.2) without reading the bytes.
pub(super) async fn serve_download(
    download: Download,
    digest: &Digest,
    filename: Option<String>,
    method: &Method,
    request: &HeaderMap,
) -> ApiResult<Response> {
    let len = match &download {
        Download::File(path) => {
            tokio::fs::metadata(path).await.map_err(|_| ApiError(HubError::NotFound(digest.to_string())))?.len()
        }
        Download::Shared(shared) => shared.size(),
    };
    let part = match requested_part(request, digest, len) {
        _ if method == Method::HEAD => None,
        Ok(part) => part,
        Err(why) => {
            let body = super::ErrorBody { error: why.to_owned() };
            let mut resp = (StatusCode::RANGE_NOT_SATISFIABLE, axum::Json(body)).into_response();
            let h = resp.headers_mut();
            blob_headers(h, digest, None);
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let shared = match download {
        Download::File(path) => return stream_file(path, digest, filename, part).await,
        Download::Shared(shared) => shared,
    };
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    blob_headers(h, digest, filename);
    if method == Method::HEAD {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        return Ok(resp);
    }
    let body = blocking(move || shared.stream(part)).await?;
    let chunks = futures::stream::unfold(body, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    *resp.body_mut() = Body::from_stream(chunks);
    match part {
        None => {
            resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        Some((first, last)) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(last - first + 1));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{last}/{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
    }
    Ok(resp)
}

/// The bytes an answer to `method` declares it carries (its `Content-Length` for a `GET`
/// answered with 200 or 206; none for a `HEAD` or a refusal): what a signed reader's
/// download is metered at when it starts, so a resumed download counts the part it asks
/// for (a client that goes away early is metered all the same).
pub(super) fn sent_bytes(method: &Method, resp: &Response) -> u64 {
    let sent = method == Method::GET && matches!(resp.status(), StatusCode::OK | StatusCode::PARTIAL_CONTENT);
    let len = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
    if sent { len.unwrap_or(0) } else { 0 }
}

/// True when a download's answer is the whole object to a GET (what download counters
/// count: not a HEAD, a part or a refusal).
pub(super) fn whole_download(method: &Method, resp: &Response) -> bool {
    method == Method::GET && resp.status() == StatusCode::OK
}

/// True when a `Range` header applies to the blob `digest`: there is no `If-Range`, or it
/// is the blob's entity tag (RFC 9110 §13.1.5: otherwise the part asked for may belong to
/// other bytes under the same name, and the whole is sent).
fn range_applies(request: &HeaderMap, digest: &Digest) -> bool {
    match request.get(header::IF_RANGE) {
        None => true,
        // The entity tag (the hex, quoted), or the digest as the hub writes it elsewhere.
        Some(v) => v.to_str().is_ok_and(|v| {
            let v = v.trim();
            v == format!("\"{}\"", digest.hex()) || v == format!("\"{digest}\"")
        }),
    }
}

/// The part of a blob of `len` bytes that `request` asks for, by RFC 9110 §14: `None` for
/// the whole (no `Range`; an `If-Range` that is not the blob's tag; a header that is not
/// text or counts another unit than bytes, which is ignored), the first and last byte
/// offsets of one range (a suffix longer than the blob is all of it; a suffix of an empty
/// blob is the whole), or why it cannot be served: malformed, beyond the blob, another
/// range of an empty blob. Several ranges get no multipart answer: the whole when one of
/// them is satisfiable (a server may ignore `Range`, §14.2, as Amazon S3 does with several
/// ranges), refused when none is (§15.5.17) or one is malformed. Parsed by
/// `http-range-header`, as tower-http's `ServeFile` does.
fn requested_part(request: &HeaderMap, digest: &Digest, len: u64) -> Result<Option<(u64, u64)>, &'static str> {
    if !range_applies(request, digest) {
        return Ok(None);
    }
    let Some(text) = request.get(header::RANGE).and_then(|v| v.to_str().ok()) else { return Ok(None) };
    let Some(set) = text.strip_prefix("bytes=") else { return Ok(None) };
    if !set.contains(',') {
        return one_range(set, len);
    }
    // A list's empty elements are no ranges (RFC 9110 §5.6.1).
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty()).peekable();
    if specs.peek().is_none() {
        return Err(MALFORMED);
    }
    let mut satisfiable = false;
    for spec in specs {
        match one_range(spec, len) {
            Ok(_) => satisfiable = true,
            Err(why) if why == MALFORMED => return Err(why),
            Err(_) => {}
        }
    }
    if satisfiable { Ok(None) } else { Err("none of the ranges is satisfiable") }
}

const MALFORMED: &str = "the range is malformed";

/// [`requested_part`] for one range, `spec` (what follows `bytes=`, no comma).
fn one_range(spec: &str, len: u64) -> Result<Option<(u64, u64)>, &'static str> {
    use http_range_header::RangeUnsatisfiableError as Unsatisfiable;
    let parsed = http_range_header::parse_range_header(&format!("bytes={spec}")).map_err(|_| MALFORMED)?;
    // A last position before the first makes the range invalid (RFC 9110 §14.1.1), which
    // the parser leaves to the validation, where it reads as beyond the blob.
    if let Some((first, last)) = spec.split_once('-')
        && let (Ok(first), Ok(last)) = (first.parse::<u64>(), last.parse::<u64>())
        && last < first
    {
        return Err(MALFORMED);
    }
    if len == 0 {
        // A suffix of an empty blob is all of it; any other range has no byte to serve
        // (RFC 9110 §14.1.1).
        return if spec.starts_with('-') { Ok(None) } else { Err("an empty blob has no byte to serve") };
    }
    match parsed.validate(len) {
        Ok(ranges) => match ranges.as_slice() {
            [one] => Ok(Some((*one.start(), *one.end()))),
            _ => Err(MALFORMED),
        },
        Err(Unsatisfiable::FileSuffixOutOfBounds) => Ok(Some((0, len - 1))),
        Err(_) => Err("the range is not satisfiable"),
    }
}

/// Streams a stored file, read 1 MiB at a time, through tower-http's `ServeFile`: the
/// whole, or `part` (first and last byte, inclusive, within the file) as 206. The object's
/// digest is its strong `ETag` (and in `x-tessera-digest`), so a client resuming a download
/// checks what it assembled. Conditional requests by date are not answered with 304: under
/// one name (`/model/x/y`), the bytes may change.
async fn stream_file(
    path: std::path::PathBuf,
    digest: &Digest,
    filename: Option<String>,
    part: Option<(u64, u64)>,
) -> ApiResult<Response> {
    let mut req = axum::http::Request::builder().method(Method::GET).uri("/");
    if let Some((first, last)) = part {
        req = req.header(header::RANGE, format!("bytes={first}-{last}"));
    }
    let req = req.body(Body::empty()).map_err(|e| HubError::Storage(e.to_string()))?;
    let served = tower_http::services::ServeFile::new(&path)
        .with_buf_chunk_size(1 << 20)
        .try_call(req)
        .await
        .map_err(|e| HubError::Storage(format!("serving {}: {e}", path.display())))?;
    if served.status() == StatusCode::NOT_FOUND {
        return Err(ApiError(HubError::NotFound(digest.to_string())));
    }
    let mut resp = served.map(Body::new);
    let h = resp.headers_mut();
    h.remove(header::LAST_MODIFIED);
    blob_headers(h, digest, filename);
    Ok(resp)
}

/// The headers of every blob download: its type, its entity tag and digest (the digest's
/// hex, quoted, and the digest), and a file name to save it under.
fn blob_headers(h: &mut HeaderMap, digest: &Digest, filename: Option<String>) {
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", digest.hex())) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert(super::DIGEST_HEADER, v);
    }
    if let Some(f) = filename
        && let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{f}\""))
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route module hands its bytes to `serve_download`: none serves a file or reads a
    /// blob's path itself (which would fetch a shared blob whole before the first byte, and
    /// answer ranges and `HEAD` its own way). A new module under `api/` must be listed.
    #[test]
    fn every_download_goes_through_serve_download() {
        let files = [
            ("auth.rs", include_str!("auth.rs")),
            ("body.rs", include_str!("body.rs")),
            ("collections.rs", include_str!("collections.rs")),
            ("mod.rs", include_str!("mod.rs")),
            ("models.rs", include_str!("models.rs")),
            ("namespaces.rs", include_str!("namespaces.rs")),
            ("packages.rs", include_str!("packages.rs")),
            ("uploads.rs", include_str!("uploads.rs")),
        ];
        let listed = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api")).unwrap().flatten();
        for n in listed.map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n != "download.rs") {
            assert!(files.iter().any(|(f, _)| *f == n), "{n} is not checked here: add it");
        }
        for (name, text) in files {
            for own in ["ServeFile", "blob_path(", "stream_file(", "blob_bytes("] {
                assert!(!text.contains(own), "{name} uses {own}; hand a HubStore::blob_download to serve_download");
            }
        }
    }

    /// The part asked for: one range within the blob, the whole without `Range` or with an
    /// `If-Range` that is not the blob's tag, and hostile or unservable headers refused.
    #[test]
    fn ranges_are_read_as_files_are() {
        let d = Digest::of(b"x");
        let ask = |pairs: &[(&'static str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(header::HeaderName::from_static(k), HeaderValue::from_str(v).unwrap());
            }
            requested_part(&h, &d, 1000)
        };
        assert_eq!(ask(&[]), Ok(None));
        assert_eq!(ask(&[("range", "bytes=0-9")]), Ok(Some((0, 9))));
        assert_eq!(ask(&[("range", "bytes=990-")]), Ok(Some((990, 999))));
        assert_eq!(ask(&[("range", "bytes=-10")]), Ok(Some((990, 999))));
        assert_eq!(ask(&[("range", "bytes=10-5000")]), Ok(Some((10, 999))));
        let tag = format!("\"{}\"", d.hex());
        assert_eq!(ask(&[("range", "bytes=0-9"), ("if-range", &tag)]), Ok(Some((0, 9))));
        assert_eq!(ask(&[("range", "bytes=0-9"), ("if-range", "\"b3\"")]), Ok(None));
        // Ignored: another unit, a header that is not text.
        assert_eq!(ask(&[("range", "items=0-1")]), Ok(None));
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_bytes(b"bytes=0-\xff").unwrap());
        assert_eq!(requested_part(&h, &d, 1000), Ok(None));
        // A suffix longer than the blob is all of it.
        assert_eq!(ask(&[("range", "bytes=-5000")]), Ok(Some((0, 999))));
        // Several ranges of which one is satisfiable: the whole, no multipart answer.
        assert_eq!(ask(&[("range", "bytes=0-1,3-4")]), Ok(None));
        assert_eq!(ask(&[("range", "bytes=-10, 0-1")]), Ok(None));
        assert_eq!(ask(&[("range", "bytes=5000-,990-")]), Ok(None));
        assert_eq!(ask(&[("range", &format!("bytes={}", ["0-0"; 2000].join(",")))]), Ok(None));
        // Empty elements of the list are skipped.
        assert_eq!(ask(&[("range", "bytes=0-1,")]), Ok(None));
        assert_eq!(ask(&[("range", "bytes=,0-1, ,2-3")]), Ok(None));
        for bad in [
            "bytes=1000-",
            "bytes=18446744073709551615-",
            "bytes=99999999999999999999999-",
            "bytes=5-1",
            "bytes=1000-1001,2000-",
            "bytes=0-1,abc",
            "bytes=5-1,0-9",
            "bytes=,",
            "bytes= , ",
            "bytes=",
            "bytes=-0",
            "bytes=--1",
            "bytes=abc",
        ] {
            assert!(ask(&[("range", bad)]).is_err(), "{bad}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=0-"));
        assert!(requested_part(&h, &d, 0).is_err(), "an empty blob has no byte from 0 on");
        h.insert(header::RANGE, HeaderValue::from_static("bytes=-5"));
        assert_eq!(requested_part(&h, &d, 0), Ok(None), "a suffix of an empty blob is the whole");
        h.insert(header::RANGE, HeaderValue::from_static("bytes=-5,0-1"));
        assert_eq!(requested_part(&h, &d, 0), Ok(None), "several ranges of an empty blob, a suffix among them");
        for bad in ["bytes=-abc", "bytes=0-1,2-", "bytes=-5,abc", "bytes=3-1"] {
            h.insert(header::RANGE, HeaderValue::from_static(bad));
            assert!(requested_part(&h, &d, 0).is_err(), "{bad} of an empty blob");
        }
    }
}
