//! The gateway's call request check on arbitrary bodies: it must refuse or accept, never
//! panic, and an accepted call's time-out is within the gateway's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_gateway::{GatewayConfig, check_call};

fuzz_target!(|data: &[u8]| {
    let config = GatewayConfig::default();
    if let Ok(call) = check_call(data, &config) {
        assert!(call.timeout > std::time::Duration::ZERO);
        assert!(call.timeout <= config.max_timeout);
        assert_eq!(call.inputs.len(), call.request.inputs.len());
    }
});
