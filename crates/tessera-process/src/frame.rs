//! The frame format spoken over a child's stdin and stdout (see `docs/protocol.md`).
//!
//! A frame is a 4-byte big-endian length `H`, `H` bytes of UTF-8 JSON (the header: an
//! object with a string `"type"`), then, for each entry of the header's optional `"blobs"`
//! array (`{"name", "len", "kind"}`), exactly `len` raw bytes, in order.
//!
//! Reading is split in two steps, [`read_header`] then [`read_blobs`] (or [`skip_blobs`]),
//! so a reader can look at the declared sizes before it reads (or refuses) the bytes.
//! Every length is checked against a limit before anything is allocated for it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest header JSON read, whatever the frame limit (which bounds the blobs).
pub const MAX_HEADER_TEXT: u64 = 16 << 20;

/// The protocol version this crate speaks (the `protocol` field of `hello`).
pub const PROTOCOL_VERSION: u64 = 1;

/// What a blob holds. Informative: the bytes are the same whatever the kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    /// A UTF-8 JSON document.
    Json,
    /// A safetensors file.
    Tensor,
    /// Opaque bytes.
    Bytes,
}

impl BlobKind {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            BlobKind::Json => "json",
            BlobKind::Tensor => "tensor",
            BlobKind::Bytes => "bytes",
        }
    }

    /// `Tensor` when the bytes parse as a safetensors file, else `Bytes`.
    pub fn sniff(bytes: &[u8]) -> BlobKind {
        if !bytes.is_empty() && safetensors::SafeTensors::deserialize(bytes).is_ok() {
            BlobKind::Tensor
        } else {
            BlobKind::Bytes
        }
    }
}

/// One entry of a header's `"blobs"` array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobSpec {
    /// The blob's name (an input, output or context field name).
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// What it holds.
    pub kind: BlobKind,
}

/// A decoded frame header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// The message type (`hello`, `call`, `result`, ...).
    pub ty: String,
    /// The whole header object, `type` and `blobs` included.
    pub fields: Map<String, Value>,
    /// The blobs that follow the header, in order.
    pub blobs: Vec<BlobSpec>,
}

impl Header {
    /// A field of the header.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    /// The `id` field, when it is an unsigned integer.
    pub fn id(&self) -> Option<u64> {
        self.get("id").and_then(Value::as_u64)
    }

    /// A string field.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// The total length of the blobs that follow (saturating).
    pub fn blobs_len(&self) -> u64 {
        self.blobs.iter().fold(0u64, |acc, b| acc.saturating_add(b.len))
    }
}

/// A header and its blobs.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// The blobs' bytes, in the order of `header.blobs`.
    pub blobs: Vec<Bytes>,
}

impl Frame {
    /// The blob named `name`, if any (the first one when several share the name).
    pub fn blob(&self, name: &str) -> Option<&Bytes> {
        self.header.blobs.iter().position(|b| b.name == name).map(|i| &self.blobs[i])
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly, before the first byte of a frame.
    #[error("the stream ended")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame")]
    Truncated,
    /// The header length is over the limit.
    #[error("a frame header of {len} bytes exceeds the limit of {limit} bytes")]
    HeaderTooLarge {
        /// The declared length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A blob, or all of a frame's blobs together, is over the limit.
    #[error("blob {name:?} of {len} bytes exceeds the limit of {limit} bytes")]
    BlobTooLarge {
        /// The blob's name (`*` for the frame's blobs together).
        name: String,
        /// The declared length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The header is not valid UTF-8 JSON.
    #[error("invalid JSON in a frame header: {0}")]
    Json(String),
    /// The header is JSON but not a valid header (not an object, no type, bad blobs).
    #[error("invalid frame header: {0}")]
    Header(String),
    /// Reading or writing failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// True when the stream ended or the pipe broke (the peer is probably gone), as
    /// opposed to the peer sending something invalid.
    pub fn is_disconnect(&self) -> bool {
        match self {
            FrameError::Closed | FrameError::Truncated => true,
            FrameError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// Reads the next frame header. Refuses a header longer than `max_bytes` or declaring a
/// blob longer than `max_bytes`, before reading it. The blobs are left in the stream:
/// read them with [`read_blobs`] or [`skip_blobs`].
pub async fn read_header<R: AsyncRead + Unpin>(reader: &mut R, max_bytes: u64) -> Result<Header, FrameError> {
    let mut len = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        let n = reader.read(&mut len[filled..]).await?;
        if n == 0 {
            return Err(if filled == 0 { FrameError::Closed } else { FrameError::Truncated });
        }
        filled += n;
    }
    let len = u64::from(u32::from_be_bytes(len));
    // The JSON is parsed whole: however large the blobs may be, it stays small.
    let limit = max_bytes.min(MAX_HEADER_TEXT);
    if len > limit {
        return Err(FrameError::HeaderTooLarge { len, limit });
    }
    let text = read_exact_capped(reader, len).await?;
    parse_header(&text, max_bytes)
}

/// Parses a header's JSON text and checks it (object, string `type`, well-formed `blobs`,
/// each blob no longer than `max_bytes`).
pub fn parse_header(text: &[u8], max_bytes: u64) -> Result<Header, FrameError> {
    let value: Value = serde_json::from_slice(text).map_err(|e| FrameError::Json(e.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(FrameError::Header("the header is not a JSON object".into()));
    };
    let ty = match fields.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(_) => return Err(FrameError::Header("\"type\" is not a string".into())),
        None => return Err(FrameError::Header("the header has no \"type\"".into())),
    };
    let mut blobs = Vec::new();
    match fields.get("blobs") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let spec = parse_blob_spec(item).map_err(|why| FrameError::Header(format!("blobs[{i}]: {why}")))?;
                if spec.len > max_bytes {
                    return Err(FrameError::BlobTooLarge { name: spec.name, len: spec.len, limit: max_bytes });
                }
                blobs.push(spec);
            }
        }
        Some(_) => return Err(FrameError::Header("\"blobs\" is not an array".into())),
    }
    Ok(Header { ty, fields, blobs })
}

fn parse_blob_spec(item: &Value) -> Result<BlobSpec, String> {
    let obj = item.as_object().ok_or("not an object")?;
    let name = obj.get("name").and_then(Value::as_str).ok_or("\"name\" is missing or not a string")?;
    let len = obj.get("len").and_then(Value::as_u64).ok_or("\"len\" is missing or not an unsigned integer")?;
    let kind = match obj.get("kind") {
        None | Some(Value::Null) => BlobKind::Bytes,
        Some(Value::String(k)) => match k.as_str() {
            "json" => BlobKind::Json,
            "tensor" => BlobKind::Tensor,
            "bytes" => BlobKind::Bytes,
            other => return Err(format!("unknown kind {other:?} (json, tensor or bytes)")),
        },
        Some(_) => return Err("\"kind\" is not a string".into()),
    };
    Ok(BlobSpec { name: name.to_owned(), len, kind })
}

/// Reads the blobs announced by `header` (call after [`read_header`]).
pub async fn read_blobs<R: AsyncRead + Unpin>(reader: &mut R, header: &Header) -> Result<Vec<Bytes>, FrameError> {
    let mut out = Vec::with_capacity(header.blobs.len());
    for spec in &header.blobs {
        out.push(Bytes::from(read_exact_capped(reader, spec.len).await?));
    }
    Ok(out)
}

/// Reads and discards the blobs announced by `header`, keeping the stream in step.
pub async fn skip_blobs<R: AsyncRead + Unpin>(reader: &mut R, header: &Header) -> Result<(), FrameError> {
    let total = header.blobs_len();
    let copied = tokio::io::copy(&mut (&mut *reader).take(total), &mut tokio::io::sink()).await?;
    if copied < total {
        return Err(FrameError::Truncated);
    }
    Ok(())
}

/// Reads a whole frame, refusing a header, a blob, or all blobs together longer than
/// `max_bytes`.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max_bytes: u64) -> Result<Frame, FrameError> {
    let header = read_header(reader, max_bytes).await?;
    let total = header.blobs_len();
    if total > max_bytes {
        return Err(FrameError::BlobTooLarge { name: "*".into(), len: total, limit: max_bytes });
    }
    let blobs = read_blobs(reader, &header).await?;
    Ok(Frame { header, blobs })
}

/// Reads exactly `len` bytes; memory grows with the bytes that arrive, not with the
/// declared length.
async fn read_exact_capped<R: AsyncRead + Unpin>(reader: &mut R, len: u64) -> Result<Vec<u8>, FrameError> {
    const FIRST_CHUNK: u64 = 1 << 20;
    let mut buf = Vec::with_capacity(len.min(FIRST_CHUNK) as usize);
    let got = (&mut *reader).take(len).read_to_end(&mut buf).await?;
    if (got as u64) < len {
        return Err(FrameError::Truncated);
    }
    Ok(buf)
}

/// Encodes a header: `header` must be a JSON object with a `type`; its `blobs` entry is
/// replaced by the descriptions of `blobs`. Returns the length prefix and the JSON.
pub fn encode_header(header: &Value, blobs: &[(String, BlobKind, Bytes)]) -> Result<Vec<u8>, FrameError> {
    let Value::Object(fields) = header else {
        return Err(FrameError::Header("the header is not a JSON object".into()));
    };
    if !fields.get("type").is_some_and(Value::is_string) {
        return Err(FrameError::Header("the header has no \"type\"".into()));
    }
    let mut fields = fields.clone();
    if blobs.is_empty() {
        fields.remove("blobs");
    } else {
        let specs = blobs
            .iter()
            .map(|(name, kind, bytes)| serde_json::json!({"name": name, "len": bytes.len(), "kind": kind.as_str()}))
            .collect();
        fields.insert("blobs".into(), Value::Array(specs));
    }
    let text = serde_json::to_vec(&Value::Object(fields)).map_err(|e| FrameError::Json(e.to_string()))?;
    let len = u32::try_from(text.len())
        .map_err(|_| FrameError::HeaderTooLarge { len: text.len() as u64, limit: u64::from(u32::MAX) })?;
    let mut out = Vec::with_capacity(4 + text.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&text);
    Ok(out)
}

/// Writes a frame (see [`encode_header`]) and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    header: &Value,
    blobs: &[(String, BlobKind, Bytes)],
) -> Result<(), FrameError> {
    let head = encode_header(header, blobs)?;
    writer.write_all(&head).await?;
    for (_, _, bytes) in blobs {
        writer.write_all(bytes).await?;
    }
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAX: u64 = 1 << 20;

    fn raw(header: &str, tail: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(tail);
        v
    }

    async fn read(bytes: &[u8]) -> Result<Frame, FrameError> {
        let mut r = bytes;
        read_frame(&mut r, MAX).await
    }

    #[tokio::test]
    async fn a_header_is_small_whatever_the_frame_limit() {
        let big = MAX_HEADER_TEXT + 1;
        let mut r: &[u8] = &(big as u32).to_be_bytes();
        let e = read_header(&mut r, 4 << 30).await.unwrap_err();
        assert!(
            matches!(e, FrameError::HeaderTooLarge { len, limit } if len == big && limit == MAX_HEADER_TEXT),
            "{e}"
        );
    }

    #[tokio::test]
    async fn round_trip() {
        let blobs = vec![
            ("a".to_string(), BlobKind::Bytes, Bytes::from_static(b"hello")),
            ("b".to_string(), BlobKind::Json, Bytes::from_static(b"[1,2]")),
            ("empty".to_string(), BlobKind::Tensor, Bytes::new()),
        ];
        let mut buf = Vec::new();
        write_frame(&mut buf, &json!({"type": "call", "id": 7, "blobs": "ignored"}), &blobs).await.unwrap();
        write_frame(&mut buf, &json!({"type": "shutdown"}), &[]).await.unwrap();
        let mut r = buf.as_slice();
        let f = read_frame(&mut r, MAX).await.unwrap();
        assert_eq!(f.header.ty, "call");
        assert_eq!(f.header.id(), Some(7));
        assert_eq!(f.header.blobs.len(), 3);
        assert_eq!(f.header.blobs[1], BlobSpec { name: "b".into(), len: 5, kind: BlobKind::Json });
        assert_eq!(f.blobs, blobs.iter().map(|b| b.2.clone()).collect::<Vec<_>>());
        assert_eq!(f.blob("a").unwrap().as_ref(), b"hello");
        let g = read_frame(&mut r, MAX).await.unwrap();
        assert_eq!(g.header.ty, "shutdown");
        assert!(g.blobs.is_empty());
        assert!(matches!(read_frame(&mut r, MAX).await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn truncated_input_is_refused() {
        let good = raw(r#"{"type":"x","blobs":[{"name":"a","len":4}]}"#, b"abcd");
        assert!(read(&good).await.is_ok());
        for cut in 1..good.len() {
            let err = read(&good[..cut]).await.unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "cut at {cut}: {err}");
            assert!(err.is_disconnect());
        }
        assert!(matches!(read(&[]).await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn oversized_lengths_are_refused_before_reading() {
        // A huge header length with nothing behind it: refused at once.
        let err = read(&[0xff, 0xff, 0xff, 0xff]).await.unwrap_err();
        assert!(matches!(err, FrameError::HeaderTooLarge { len: 0xffff_ffff, limit: MAX }), "{err}");
        // A blob declared bigger than the limit.
        let huge = raw(r#"{"type":"result","blobs":[{"name":"x","len":18446744073709551615}]}"#, b"");
        let err = read(&huge).await.unwrap_err();
        assert!(matches!(err, FrameError::BlobTooLarge { ref name, .. } if name == "x"), "{err}");
        // Blobs each under the limit but together over it.
        let half = MAX / 2 + 1;
        let two = raw(
            &format!(r#"{{"type":"result","blobs":[{{"name":"a","len":{half}}},{{"name":"b","len":{half}}}]}}"#),
            b"",
        );
        let err = read(&two).await.unwrap_err();
        assert!(matches!(err, FrameError::BlobTooLarge { ref name, .. } if name == "*"), "{err}");
        assert!(!err.is_disconnect());
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "invalid JSON"),
            (b"\xff\xfe{}", "invalid JSON"),
            (b"[1,2]", "not a JSON object"),
            (b"{}", "no \"type\""),
            (br#"{"type":3}"#, "not a string"),
            (br#"{"type":"x","blobs":{}}"#, "not an array"),
            (br#"{"type":"x","blobs":[{"len":1}]}"#, "\"name\""),
            (br#"{"type":"x","blobs":[{"name":"a","len":-1}]}"#, "\"len\""),
            (br#"{"type":"x","blobs":[{"name":"a","len":1.5}]}"#, "\"len\""),
            (br#"{"type":"x","blobs":[{"name":"a","len":1,"kind":"pickle"}]}"#, "unknown kind"),
            (br#"{"type":"x","blobs":[3]}"#, "not an object"),
        ];
        for (text, want) in cases {
            let mut bytes = (text.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(text);
            let err = read(&bytes).await.unwrap_err();
            assert!(err.to_string().contains(want), "{:?}: {err}", String::from_utf8_lossy(text));
            assert!(!err.is_disconnect());
        }
    }

    #[tokio::test]
    async fn skipping_blobs_keeps_the_stream_in_step() {
        let mut bytes = raw(r#"{"type":"result","blobs":[{"name":"a","len":3},{"name":"b","len":2}]}"#, b"abcde");
        bytes.extend(raw(r#"{"type":"next"}"#, b""));
        let mut r = bytes.as_slice();
        let h = read_header(&mut r, MAX).await.unwrap();
        assert_eq!(h.blobs_len(), 5);
        skip_blobs(&mut r, &h).await.unwrap();
        assert_eq!(read_frame(&mut r, MAX).await.unwrap().header.ty, "next");
        let short = raw(r#"{"type":"result","blobs":[{"name":"a","len":3}]}"#, b"a");
        let mut r = short.as_slice();
        let h = read_header(&mut r, MAX).await.unwrap();
        assert!(matches!(skip_blobs(&mut r, &h).await, Err(FrameError::Truncated)));
    }

    #[test]
    fn encoding_checks_the_header() {
        assert!(encode_header(&json!([1]), &[]).is_err());
        assert!(encode_header(&json!({"id": 1}), &[]).is_err());
        let head = encode_header(&json!({"type": "hello"}), &[]).unwrap();
        assert_eq!(&head[..4], &(head.len() as u32 - 4).to_be_bytes());
        assert_eq!(&head[4..], br#"{"type":"hello"}"#);
    }

    #[test]
    fn sniffing_tensors() {
        let t = tessera_core::tensor::Tensors(
            [("w".to_string(), tessera_core::tensor::Tensor::zeros(&[2, 2]))].into_iter().collect(),
        );
        assert_eq!(BlobKind::sniff(&t.encode()), BlobKind::Tensor);
        assert_eq!(BlobKind::sniff(b"hello"), BlobKind::Bytes);
        assert_eq!(BlobKind::sniff(b""), BlobKind::Bytes);
        assert_eq!(BlobKind::sniff(&[0xff; 16]), BlobKind::Bytes);
    }
}
