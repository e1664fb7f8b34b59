# Shared by the scripts: install what the build needs when it is missing.

ensure_wasm_target() {
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
        echo "installing the wasm32-wasip2 Rust target" >&2
        rustup target add wasm32-wasip2
    fi
}
