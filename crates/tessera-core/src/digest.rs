//! Content digests: BLAKE3 over bytes, written `b3:<64 lowercase hex digits>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The BLAKE3 digest of some bytes: the identity of a package, a model or any blob.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a digest string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The string does not start with `b3:`.
    #[error("digest {0:?} must start with \"b3:\"")]
    MissingPrefix(String),
    /// The hex part has the wrong length or characters.
    #[error("digest {0:?} must be \"b3:\" followed by 64 lowercase hex digits")]
    BadHex(String),
}

impl Digest {
    /// Digest of the given bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    /// The raw 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex digits without the `b3:` prefix (used for file names and keys).
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }

    /// Parses the 64 hex digits without prefix.
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        let bad = || DigestError::BadHex(hex.chars().take(80).collect());
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = nibble(pair[0]).ok_or_else(bad)?;
            let lo = nibble(pair[1]).ok_or_else(bad)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Digest(out))
    }

    /// A short form for humans (`b3:1a2b3c4d5e6f`), never for lookups.
    pub fn short(&self) -> String {
        format!("b3:{}", &self.hex()[..12])
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b3:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("b3:") {
            Some(hex) => Digest::from_hex(hex).map_err(|_| DigestError::BadHex(s.chars().take(80).collect())),
            None => Err(DigestError::MissingPrefix(s.chars().take(80).collect())),
        }
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Digest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .pattern(Some("^b3:[0-9a-f]{64}$"))
            .description(Some("BLAKE3 digest of the content"))
            .into()
    }
}
#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Digest {}

/// Incremental digest computation, for streamed uploads.
#[derive(Clone, Default)]
pub struct DigestWriter {
    hasher: blake3::Hasher,
    len: u64,
}

impl DigestWriter {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }
    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }
    /// Feeds bytes, hashed on every core (BLAKE3's tree lets parts of the input be hashed
    /// in parallel; worth it from about 128 KiB on).
    pub fn update_rayon(&mut self, bytes: &[u8]) {
        self.hasher.update_rayon(bytes);
        self.len += bytes.len() as u64;
    }
    /// Feeds a whole file: one thread reads it in blocks of 2 MiB while the blocks read
    /// before are hashed on every core (at most three blocks, 6 MiB, held at once).
    ///
    /// # Errors
    /// The I/O error of opening or reading it.
    pub fn update_file(&mut self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Read;
        const BLOCK: usize = 2 << 20;
        let mut file = std::fs::File::open(path)?;
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
        let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(3);
        for _ in 0..3 {
            let _ = empty_tx.send(vec![0u8; BLOCK]);
        }
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || -> std::io::Result<()> {
                for mut buf in empty_rx {
                    buf.resize(BLOCK, 0);
                    let mut n = 0;
                    while n < BLOCK {
                        match file.read(&mut buf[n..]) {
                            Ok(0) => break,
                            Ok(k) => n += k,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    buf.truncate(n);
                    if n == 0 || full_tx.send(buf).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            });
            for buf in full_rx {
                self.update_rayon(&buf);
                // The reader may have reached the end already (and blocks still queued are
                // hashed all the same).
                let _ = empty_tx.send(buf);
            }
            drop(empty_tx);
            reader.join().unwrap_or_else(|_| Err(std::io::Error::other("the reading thread panicked")))
        })
    }
    /// Number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True when nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The digest of everything fed.
    pub fn finish(&self) -> Digest {
        Digest(*self.hasher.finalize().as_bytes())
    }
}

impl std::io::Write for DigestWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let d = Digest::of(b"tessera");
        let s = d.to_string();
        assert_eq!(s.len(), 67);
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        assert_eq!(Digest::from_hex(&d.hex()).unwrap(), d);
    }

    #[test]
    fn one_byte_changes_the_digest() {
        assert_ne!(Digest::of(b"tessera"), Digest::of(b"tesserb"));
    }

    #[test]
    fn streaming_equals_one_shot() {
        let mut w = DigestWriter::new();
        w.update(b"tes");
        w.update(b"sera");
        assert_eq!(w.finish(), Digest::of(b"tessera"));
        assert_eq!(w.len(), 7);
    }

    #[test]
    fn a_file_hashes_as_its_bytes_whatever_its_length() {
        let dir = std::env::temp_dir().join(format!("tessera-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let block = 2usize << 20;
        // Empty, under a block, whole blocks (the last block read just before the end),
        // and a block and a bit.
        for len in [0, 1, 1000, block, 2 * block, 5 * block, 5 * block + 7, block + 1] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ (i >> 12) as u8).collect();
            let path = dir.join(format!("f{len}"));
            std::fs::write(&path, &bytes).unwrap();
            let mut w = DigestWriter::new();
            w.update_file(&path).unwrap();
            assert_eq!((w.finish(), w.len()), (Digest::of(&bytes), len as u64), "a file of {len} bytes");
        }
        let mut w = DigestWriter::new();
        assert!(w.update_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_malformed_digests() {
        for bad in [
            "",
            "b3:",
            "sha256:00",
            "b3:zz",
            &format!("b3:{}", "A".repeat(64)),
            &format!("b3:{}", "0".repeat(63)),
            &format!("b3:{}", "0".repeat(65)),
            &format!("b3:{}é", "0".repeat(62)),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} accepted");
        }
        assert!(matches!("00".parse::<Digest>(), Err(DigestError::MissingPrefix(_))));
    }
}
