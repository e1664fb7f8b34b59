//! The safetensors corpus shared with the Python SDK's tests
//! (`tests/fixtures/safetensors/corpus.json`): every valid file, whichever side wrote it,
//! decodes to the values the corpus lists; every invalid file is refused; and the files the
//! Rust side writes are exactly what its writers give today. The Python side checks the
//! same corpus (`sdk/python/tests/test_safetensors.py`).
//!
//! `TESSERA_WRITE_FIXTURES=1 cargo test -p tessera-core --test safetensors_corpus` rewrites
//! the Rust-written files (`python sdk/python/tests/safetensors_corpus.py` the others).

use std::collections::BTreeMap;
use std::path::PathBuf;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;
use tessera_core::tensor::{Tensor, TensorLimits, Tensors};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/safetensors")
}

fn corpus() -> Value {
    serde_json::from_str(&std::fs::read_to_string(corpus_dir().join("corpus.json")).unwrap()).unwrap()
}

fn dtype(code: &str) -> Dtype {
    match code {
        "F64" => Dtype::F64,
        "F32" => Dtype::F32,
        "F16" => Dtype::F16,
        "I64" => Dtype::I64,
        "I32" => Dtype::I32,
        "U8" => Dtype::U8,
        "BOOL" => Dtype::BOOL,
        other => panic!("the corpus uses dtype {other}"),
    }
}

/// The little-endian bytes of `values` in `code`.
fn bytes_of(code: &str, values: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        match code {
            "F64" => out.extend(v.as_f64().unwrap().to_le_bytes()),
            "F32" => out.extend((v.as_f64().unwrap() as f32).to_le_bytes()),
            "F16" => out.extend(f16_bits(v.as_f64().unwrap() as f32).to_le_bytes()),
            "I64" => out.extend(v.as_i64().unwrap().to_le_bytes()),
            "I32" => out.extend((v.as_i64().unwrap() as i32).to_le_bytes()),
            "U8" => out.push(v.as_u64().unwrap() as u8),
            "BOOL" => out.push(u8::from(v.as_bool().unwrap())),
            other => panic!("dtype {other}"),
        }
    }
    out
}

/// IEEE half-precision bits of an f32 that a half holds exactly (the corpus uses such).
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    if x == 0.0 {
        return sign;
    }
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let mant = ((b >> 13) & 0x3ff) as u16;
    assert!((1..31).contains(&exp) && b & 0x1fff == 0, "{x} is not exact in f16");
    sign | ((exp as u16) << 10) | mant
}

/// What the Rust side writes for a corpus entry: `Tensors::encode` for an all-F32 entry
/// without metadata (how model parameters travel), else the `safetensors` crate.
fn rust_write(spec: &Value) -> Vec<u8> {
    let tensors = spec["tensors"].as_object().unwrap();
    let meta = spec["metadata"].as_object().unwrap();
    if meta.is_empty() && tensors.values().all(|t| t["dtype"] == "F32") {
        let mut out = BTreeMap::new();
        for (n, t) in tensors {
            let shape: Vec<usize> =
                t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let data = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            out.insert(n.clone(), Tensor { shape, data });
        }
        return Tensors(out).encode();
    }
    let data: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let code = t["dtype"].as_str().unwrap();
            let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (n.clone(), shape, dtype(code), bytes_of(code, t["values"].as_array().unwrap()))
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> =
        data.iter().map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let meta: std::collections::HashMap<String, String> =
        meta.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect();
    safetensors::serialize(views, if meta.is_empty() { None } else { Some(meta) }).unwrap()
}

#[test]
fn the_shared_corpus() {
    let corpus = corpus();
    let valid = corpus["valid"].as_object().unwrap();
    if std::env::var_os("TESSERA_WRITE_FIXTURES").is_some() {
        for (name, spec) in valid.iter().filter(|(_, s)| s["writer"] == "rust") {
            std::fs::write(corpus_dir().join(name), rust_write(spec)).unwrap();
        }
    }
    for (name, spec) in valid {
        let bytes = std::fs::read(corpus_dir().join(name)).unwrap();
        if spec["writer"] == "rust" {
            assert_eq!(rust_write(spec), bytes, "{name}: the Rust writer no longer writes these bytes");
        }
        let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let tensors = spec["tensors"].as_object().unwrap();
        assert_eq!(st.len(), tensors.len(), "{name}");
        for (t, want) in tensors {
            let view = st.tensor(t).unwrap_or_else(|e| panic!("{name}/{t}: {e}"));
            let code = want["dtype"].as_str().unwrap();
            assert_eq!(view.dtype(), dtype(code), "{name}/{t}");
            let shape: Vec<usize> =
                want["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            assert_eq!(view.shape(), &shape[..], "{name}/{t}");
            assert_eq!(view.data(), &bytes_of(code, want["values"].as_array().unwrap())[..], "{name}/{t}");
        }
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
        let want: BTreeMap<String, String> = spec["metadata"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(meta, want, "{name}");
        // How model parameters are read: all-F32 files decode, others name the dtype.
        let decoded = Tensors::decode(&bytes, TensorLimits::default());
        if tensors.values().all(|t| t["dtype"] == "F32") {
            assert_eq!(decoded.unwrap().0.len(), tensors.len(), "{name}");
        } else {
            assert!(decoded.is_err(), "{name}");
        }
    }
    for (name, why) in corpus["invalid"].as_object().unwrap() {
        let bytes = std::fs::read(corpus_dir().join(name)).unwrap();
        assert!(SafeTensors::deserialize(&bytes).is_err(), "{name} ({why}) was accepted");
        assert!(Tensors::decode(&bytes, TensorLimits::default()).is_err(), "{name} ({why}) was accepted");
    }
}
