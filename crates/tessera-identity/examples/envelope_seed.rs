//! Prints a valid signature envelope (a seed for the fuzzer's corpus).
fn main() {
    let k = tessera_identity::KeyPair::generate(tessera_identity::KeyType::Ed25519);
    let s = tessera_identity::KeyPair::generate(tessera_identity::KeyType::Secp256k1);
    let e = tessera_identity::Envelope::sign(&k, s.public(), "POST", "/api/v1/packages", b"body", 1_763_761_200_000);
    println!("{}", e.to_header());
}
