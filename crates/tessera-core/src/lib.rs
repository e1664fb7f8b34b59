//! The pure core of Tessera: module names, manifests, content digests, versions, config
//! overrides, tensors, wire types and the arithmetic of federated aggregation.
//!
//! This crate does no I/O. It has no async runtime, no clock, no randomness and no file
//! system: time and seeds are passed in, bytes are passed in. Everything here is therefore
//! fast to test and safe to reuse from any other crate (hub, node, coordinator, CLI).
//! It does not know about HTTP, SQLite, NATS or wasmtime.
//!
//! ```
//! use tessera_core::{Digest, ModulePath};
//!
//! let path: ModulePath = "fl.softmax.worker".parse().unwrap();
//! assert_eq!(path.segments().count(), 3);
//! let id = Digest::of(b"hello");
//! assert!(id.to_string().starts_with("b3:"));
//! ```

pub mod aggregate;
pub mod card;
pub mod config;
pub mod digest;
pub mod layout;
pub mod manager;
pub mod manifest;
pub mod name;
pub mod pipeline;
pub mod privacy;
pub mod registry;
pub mod requirement;
pub mod select;
pub mod size;
pub mod strategy;
pub mod tensor;
pub mod time;
pub mod trace;
pub mod version;
pub mod wire;
pub mod yaml;

pub use digest::{Digest, DigestWriter};
pub use manifest::{Access, Kind, Manifest, Reuse, Role, RuntimeKind};
pub use name::ModulePath;
pub use size::ByteSize;
pub use version::PackageRef;
