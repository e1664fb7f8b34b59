//! The hub's clock, as RFC 3339.

use std::time::{SystemTime, UNIX_EPOCH};

pub use tessera_core::time::format_rfc3339;

/// Now, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_rfc3339() -> String {
    format_rfc3339(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}
