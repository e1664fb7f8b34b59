"""Swarms written in Python, as Manta users write them.

A swarm declares its tasks (a module and where it runs) and how they follow each other in
one iteration::

    from tessera.swarm import Module, Swarm, Task

    class FederatedLearningSwarm(Swarm):
        def __init__(self):
            super().__init__()
            self.worker = Task(Module("worker", datasets=["digits"]), method="all", maximum=-1)
            self.aggregator = Task(Module("aggregator"), method="any", maximum=1)
            self.scheduler = Task(Module("scheduler"), method="any", maximum=1)
            self.iterations = 30
            self.set_global("target_accuracy", 0.9)

        def execute(self):
            results = self.worker()
            aggregated = self.aggregator(results)
            return self.scheduler(aggregated)

`tessera swarm run swarm.py` (or `swarm.run()`) turns it into the same spec a YAML swarm
file gives (`spec()`), publishes the modules given as folders, and runs it. `execute()`
is called once, to read the flow: calling a task records that the tasks passed to it feed
it; nothing runs in this process.

The task assigned to the `scheduler` attribute (or named with `self.scheduler_task`)
decides after each iteration whether another one runs: its `continue` output, or the
`continue` global, being `false` ends the run.
"""

import inspect
import json
import os
import subprocess
import sys
import tempfile

from ._declare import caller_line, run_file

__all__ = ["Module", "Swarm", "SwarmError", "Task"]

METHODS = ("all", "any", "random")


class SwarmError(Exception):
    """A swarm declaration is wrong (the message names the task and the field)."""


class Module:
    """A module a task runs: a folder with a module.yaml (published when the swarm runs)
    or a hub reference (`name@version`, `name@^1.2`, `name@alias`, `b3:<digest>`).

    `datasets`: the datasets it reads (the task runs only on nodes holding them).
    `config`: overrides of the module's default config.
    `versions`: a canary split of a hub module, {version: share}, shares summing to 1.
    `image`: accepted for Manta's signature; a Tessera module states its runtime and the
    libraries it needs in its module.yaml, so it is not used.
    """

    def __init__(self, python_program, image=None, datasets=None, name=None, config=None, versions=None):
        if not isinstance(python_program, str) or not python_program:
            raise SwarmError("Module: give a folder or a hub reference, e.g. Module('worker')")
        self.program = python_program
        self.image = image
        self.datasets = list(datasets or [])
        self.name = name
        self.config = dict(config or {})
        self.versions = dict(versions or {})
        self._line, self._file = caller_line()

    def reference(self, base_dir):
        """What goes in the spec's `module`: an absolute folder, or the reference as given."""
        candidate = self.program
        if not os.path.isabs(candidate):
            candidate = os.path.join(base_dir, candidate)
        if os.path.isfile(os.path.join(candidate, "module.yaml")):
            return os.path.abspath(candidate)
        if self.program.startswith(("./", "../", "/")):
            raise SwarmError("Module(%r): %s has no module.yaml" % (self.program, candidate))
        return self.program

    def __repr__(self):
        return "Module(%r)" % self.program


class _Stage:
    """What calling a task gives inside execute(): the task, to pass to the next one."""

    def __init__(self, task):
        self.task = task


class Task:
    """Where a module runs: `method` all, any or random; `maximum` -1 (no limit), a count,
    or a fraction in (0, 1] of the eligible nodes (default: no limit for all, 1 for any
    and random); `gpu`; node `labels`; `min_nodes` that
    must succeed; `timeout` (seconds); `retries` on other nodes; `inputs` "all" (every
    output of the stages feeding it) or "own" (its node's only)."""

    def __init__(self, module, method="all", maximum=None, gpu=False, labels=None, min_nodes=1,
                 timeout=None, retries=None, inputs="all", config=None):
        if not isinstance(module, Module):
            raise SwarmError("Task: the first argument is a Module, not %r" % (module,))
        if method not in METHODS:
            raise SwarmError("Task: method %r is not one of %s" % (method, ", ".join(METHODS)))
        if maximum is not None and (isinstance(maximum, bool) or not isinstance(maximum, (int, float))):
            raise SwarmError("Task: maximum %r is not a number" % (maximum,))
        if isinstance(maximum, float) and not 0.0 < maximum <= 1.0:
            raise SwarmError("Task: maximum %r: a fraction of the eligible nodes is in (0, 1]" % maximum)
        if isinstance(maximum, int) and maximum != -1 and maximum < 1:
            raise SwarmError("Task: maximum %r: use -1 for no limit or a count of at least 1" % maximum)
        if inputs not in ("all", "own"):
            raise SwarmError("Task: inputs %r is not all or own" % (inputs,))
        self.module = module
        self.method = method
        self.maximum = maximum
        self.gpu = bool(gpu)
        self.labels = dict(labels or {})
        self.min_nodes = int(min_nodes)
        self.timeout = timeout
        self.retries = retries
        self.inputs = inputs
        self.config = dict(config or {})
        self.name = None
        self._line, self._file = caller_line()

    def __call__(self, *upstream):
        swarm = Swarm._tracing
        if swarm is None:
            raise SwarmError("a task is called only inside Swarm.execute(), to say what feeds it")
        for u in upstream:
            tasks = u if isinstance(u, (list, tuple)) else [u]
            for t in tasks:
                src = t.task if isinstance(t, _Stage) else t
                if not isinstance(src, Task):
                    raise SwarmError("task %s: %r is not a task's result" % (self.name, t))
                swarm._edges.append((src, self))
        swarm._called.append(self)
        return _Stage(self)

    def spec(self, base_dir):
        out = {"module": self.module.reference(base_dir), "method": self.method}
        if self.maximum is not None:
            out["maximum"] = self.maximum
        config = dict(self.module.config)
        config.update(self.config)
        if config:
            out["config"] = config
        if self.module.versions:
            out["versions"] = {str(k): float(v) for k, v in self.module.versions.items()}
        if self.module.datasets:
            out["datasets"] = self.module.datasets
        if self.gpu:
            out["gpu"] = True
        if self.labels:
            out["labels"] = self.labels
        if self.min_nodes != 1:
            out["min_nodes"] = self.min_nodes
        if self.timeout is not None:
            out["timeout_secs"] = float(self.timeout)
        if self.retries is not None:
            out["retries"] = int(self.retries)
        if self.inputs != "all":
            out["inputs"] = self.inputs
        return out


class Swarm:
    """Base class of a swarm: assign Tasks to attributes in __init__, say the flow in
    execute(). Set `iterations` (the most), `seed`, `timeout` (seconds per stage),
    `name`, `publish_as` (publishes the final `model` global to the hub), and initial
    globals with `set_global(key, value)`."""

    _tracing = None

    def __init__(self):
        self.iterations = None
        self.seed = 0
        self.timeout = None
        self.name = None
        self.publish_as = None
        self.scheduler_task = None
        self._globals = {}
        self._edges = []
        self._called = []

    def set_global(self, key, value):
        """Sets a global the first iteration starts with (any JSON value)."""
        json.dumps(value)
        self._globals[str(key)] = value

    def execute(self):
        raise SwarmError("%s: define execute() to say how the tasks follow each other" % type(self).__name__)

    def _tasks(self):
        tasks = {}
        for name, value in vars(self).items():
            if isinstance(value, Task):
                if value.name not in (None, name):
                    raise SwarmError("task %s is also assigned to %s; give each task one name" % (value.name, name))
                value.name = name
                tasks[name] = value
        if not tasks:
            raise SwarmError("%s declares no tasks; assign Task(...) to attributes in __init__" % type(self).__name__)
        return tasks

    def spec(self, base_dir=None):
        """The swarm spec (what a YAML swarm file says), as a dict."""
        if base_dir is None:
            base_dir = os.path.dirname(os.path.abspath(inspect.getfile(type(self))))
        tasks = self._tasks()
        self._edges, self._called = [], []
        Swarm._tracing = self
        try:
            self.execute()
        finally:
            Swarm._tracing = None
        called = {t.name for t in self._called}
        missing = sorted(set(tasks) - called)
        if missing:
            raise SwarmError("task %s is declared but execute() never calls it" % ", ".join(missing))
        if not self._edges and len(tasks) > 1:
            raise SwarmError("execute() calls %s without passing one's result to another; say how they follow "
                             "each other, e.g. self.b(self.a())" % ", ".join(sorted(called)))
        flow = []
        for src, dst in self._edges:
            edge = "%s -> %s" % (src.name, dst.name)
            if edge not in flow:
                flow.append(edge)
        # Tasks that nothing feeds and that feed nothing still run.
        for t in self._called:
            if not any(t.name in e.split(" -> ") for e in flow) and t.name not in flow:
                flow.append(t.name)
        out = {"tasks": {name: t.spec(base_dir) for name, t in tasks.items()}, "flow": flow}
        scheduler = self.scheduler_task or ("scheduler" if "scheduler" in tasks else None)
        if scheduler is not None:
            if scheduler not in tasks:
                raise SwarmError("scheduler_task %r is not a task (tasks: %s)" % (scheduler, ", ".join(tasks)))
            out["scheduler"] = scheduler
        if self.iterations is not None:
            out["iterations"] = int(self.iterations)
        if self._globals:
            out["globals"] = self._globals
        if self.seed:
            out["seed"] = int(self.seed)
        if self.timeout is not None:
            out["timeout_secs"] = float(self.timeout)
        if self.name:
            out["name"] = str(self.name)
        if self.publish_as:
            out["publish_as"] = str(self.publish_as)
        lines = {}
        source = None
        for name, t in tasks.items():
            if t._line is not None:
                lines["tasks.%s" % name] = t._line
                source = source or t._file
        if source:
            out["source"] = {"file": os.path.basename(source), "lines": lines}
        return out

    def run(self, *args, tessera=None, check=True):
        """Runs the swarm with the tessera command (`tessera swarm run`), passing `args`
        (e.g. "--embedded", "--node", "node-0:digits=a.safetensors"); returns what it
        printed. `tessera`: the command (default: $TESSERA_BIN, else `tessera` on the
        PATH)."""
        command = tessera or os.environ.get("TESSERA_BIN") or "tessera"
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(self.spec(), f)
            path = f.name
        try:
            done = subprocess.run([command, "swarm", "run", path, *args], capture_output=True, text=True)
        finally:
            os.unlink(path)
        if check and done.returncode != 0:
            raise SwarmError("tessera swarm run failed:\n%s" % done.stderr.strip())
        return done.stdout


def load(path):
    """The swarm a Python file declares: a module-level `swarm` instance, else the one
    Swarm subclass defined in the file, instantiated."""
    module = run_file(path, "_tessera_swarm_file", SwarmError)
    instance = getattr(module, "swarm", None)
    if isinstance(instance, Swarm):
        return instance
    classes = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, Swarm) and c is not Swarm and c.__module__ == module.__name__]
    if len(classes) != 1:
        raise SwarmError("%s defines %d Swarm subclasses; define one, or a module-level `swarm = ...`"
                         % (os.path.basename(path), len(classes)))
    return classes[0]()


def main(argv=None):
    """`python -m tessera.swarm swarm.py`: prints the swarm's spec as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tessera.swarm SWARM.py", file=sys.stderr)
        return 2
    try:
        swarm = load(argv[0])
        base = os.path.dirname(os.path.abspath(argv[0]))
        print(json.dumps(swarm.spec(base), indent=1))
    except SwarmError as e:
        print("%s: %s" % (argv[0], e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as `python -m tessera.swarm`, this file is `__main__`: use the importable module,
    # whose Swarm class is the one swarm files subclass.
    from tessera.swarm import main as _main

    sys.exit(_main())
