//! The hub's model bodies (create a model, set its metadata) on arbitrary bytes: refused or
//! accepted, never a panic; what is accepted has an object for metadata.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_hub::{CreateModel, ModelMeta};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = CreateModel::parse(data) {
        assert!(m.metadata.is_object());
        assert!(m.name.parse::<tessera_core::ModulePath>().is_ok());
    }
    if let Ok(m) = ModelMeta::parse(data) {
        assert!(m.metadata.is_object());
    }
});
