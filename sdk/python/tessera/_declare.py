"""What declarations written in Python (swarms, dataflows) share: where a part was
declared, and running the file that declares them."""

import importlib.util
import inspect
import os
import sys


def caller_line(depth=2):
    """(line, file) of the code `depth` frames up: where a part was declared, so errors
    about it name that line. (None, None) when the frames are not there."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back
        return frame.f_lineno, frame.f_code.co_filename
    except AttributeError:
        return None, None
    finally:
        del frame


def run_file(path, name, error):
    """Runs the Python file at `path` as module `name`, its folder first on sys.path
    while it runs (so it imports its neighbours); returns the module. Raises `error`
    when the path is not a Python file."""
    path = os.path.abspath(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise error("%s is not a Python file" % path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module
