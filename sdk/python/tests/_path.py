"""Puts this checkout's SDK first on sys.path (the tests test these sources, not an installed copy)."""

import os
import sys

# Keep the source tree free of __pycache__ folders.
sys.dont_write_bytecode = True

SDK = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if sys.path[0] != SDK:
    sys.path.insert(0, SDK)


def require_numpy():
    """numpy, or a clear failure (never a silent skip)."""
    try:
        import numpy
    except ImportError:
        raise AssertionError(
            "numpy is missing for %s: run scripts/test, or `source scripts/lib.sh && ensure_python_venv` "
            "and use $TESSERA_PYTHON" % sys.executable
        )
    return numpy
