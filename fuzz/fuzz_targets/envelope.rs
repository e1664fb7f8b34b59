//! The signature-envelope parser and verifier on arbitrary input: they must never panic,
//! and whatever parses must print back to something that parses to the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_identity::{Envelope, KeyPair, KeyType, Verifier};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(env) = Envelope::parse(text) {
        let again = Envelope::parse(&env.to_header()).expect("a printed envelope parses");
        assert_eq!(again, env);
        // Verification of a parsed envelope must refuse or accept, never panic.
        let server = KeyPair::from_secret(KeyType::Ed25519, &[7u8; 32]).unwrap();
        let v = Verifier::new(server.public().clone());
        let _ = v.verify_envelope(&env, "POST", "/api/v1/packages", &env.body, env.ts_ms);
        // Any clock, the extremes too: timestamps are compared without overflow.
        for now in [0, u64::MAX, env.ts_ms.wrapping_add(1), env.ts_ms.wrapping_sub(60_001)] {
            let _ = v.verify_envelope(&env, "POST", "/api/v1/packages", &env.body, now);
        }
    }
    let _ = tessera_identity::PackageSignature::parse(text);
    let _ = text.parse::<tessera_identity::PublicKey>();
});
