# Shared by the scripts: install what the build and the tests need when it is missing.

ensure_wasm_target() {
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
        echo "installing the wasm32-wasip2 Rust target" >&2
        rustup target add wasm32-wasip2
    fi
}

# nats-server (JetStream) for the distributed mode's tests and benchmarks, from Debian.
ensure_nats_server() {
    if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
        return
    fi
    echo "installing nats-server (apt-get install nats-server)" >&2
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get install -y nats-server >/dev/null || {
        $sudo apt-get update >/dev/null && $sudo apt-get install -y nats-server >/dev/null
    }
    if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
        echo "error: nats-server is required and could not be installed" >&2
        exit 1
    fi
}

# A free TCP port on loopback.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
