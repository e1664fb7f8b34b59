"""Dataflows written in Python, in DFFML's vocabulary.

Definitions are typed kinds of values; operations are module functions whose inputs and
outputs are bound to definitions; a flow wires them by definition (DFFML's
`DataFlow.auto`)::

    from tessera.dataflow import DataFlow, Definition, GetSingle, Operation

    calc_string = Definition("calc_string", "str")
    is_add = Definition("is_add", "bool")
    numbers = Definition("numbers", "json")
    result = Definition("result", "int")

    parse = Operation("parse", module="calc.ops@0.1.0", function="parse",
                      inputs={"line": calc_string}, outputs={"add": is_add, "numbers": numbers})
    add = Operation("add", module="calc.ops@0.1.0", function="add",
                    inputs={"numbers": numbers}, outputs={"sum": result}, conditions=[is_add])

    flow = DataFlow(parse, add, inputs=[calc_string], output=GetSingle(result))

`tessera flow check|graph|run flow.py` reads the flow a Python file declares (a
module-level `flow`, or the one DataFlow in it) through `python -m tessera.dataflow FILE`,
which prints the same spec a YAML flow file gives; the checks (types, wiring, cycles,
reachability) are the same and name the line of the Python file's operation.

A subflow is a flow file (`Operation("model", subflow="model.yaml", ...)`), relative to
the Python file's folder.
"""

import json
import os
import sys

from ._declare import caller_line, run_file

__all__ = ["DataFlow", "DataflowError", "Definition", "GetMulti", "GetSingle", "Operation"]

TYPES = ("int", "float", "str", "bool", "json", "tensor", "blob")


class DataflowError(Exception):
    """A flow declaration is wrong (the message names the operation or definition)."""


class Definition:
    """A kind of value: `name`, `type` (one of int, float, str, bool, json, tensor, blob),
    `lock` (a value used by one operation at a time), `validate` (an Operation, or its
    name, every new value goes through), `schema` (a JSON Schema, for json), `dtype` and
    `shape` (for tensor: a safetensors dtype such as "F32", and a list of sizes with None
    for any)."""

    def __init__(self, name, type, lock=False, validate=None, schema=None, dtype=None, shape=None):
        if not isinstance(name, str) or not name:
            raise DataflowError("Definition: a name is a non-empty string")
        if type not in TYPES:
            raise DataflowError("definition %s: type %r is not one of %s" % (name, type, ", ".join(TYPES)))
        self.name = name
        self.type = type
        self.lock = bool(lock)
        self.validate = validate
        self.schema = schema
        self.dtype = dtype
        self.shape = None if shape is None else list(shape)
        self._line, self._file = caller_line()

    def spec(self):
        out = {"type": self.type}
        if self.lock:
            out["lock"] = True
        if self.validate is not None:
            out["validate"] = self.validate.name if isinstance(self.validate, Operation) else str(self.validate)
        if self.schema is not None:
            out["schema"] = self.schema
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.shape is not None:
            out["shape"] = self.shape
        return out

    def __repr__(self):
        return "Definition(%r, %r)" % (self.name, self.type)


def _definitions(what, mapping, op):
    out = {}
    for k, d in (mapping or {}).items():
        if not isinstance(d, Definition):
            raise DataflowError("operation %s: %s %r is not a Definition" % (op, what, k))
        out[k] = d
    return out


class Operation:
    """A module function (`module`: a hub reference such as `calc.ops@0.1.0`; `function`)
    or a subflow (`subflow`: a flow file), its `inputs` and `outputs` ({name: Definition}),
    the boolean Definitions that must hold for it to run (`conditions`), and `cache`:
    answer a parameter set seen before from the kept result."""

    def __init__(self, name, module=None, function=None, inputs=None, outputs=None, conditions=None,
                 subflow=None, cache=False):
        if not isinstance(name, str) or not name:
            raise DataflowError("Operation: a name is a non-empty string")
        a_function = module is not None and function is not None and subflow is None
        a_subflow = subflow is not None and module is None and function is None
        if not (a_function or a_subflow):
            raise DataflowError("operation %s: give `module` and `function`, or `subflow`" % name)
        self.name = name
        self.module = module
        self.function = function
        self.subflow = subflow
        self.cache = bool(cache)
        self.inputs = _definitions("input", inputs, name)
        self.outputs = _definitions("output", outputs, name)
        self.conditions = list(conditions or [])
        for c in self.conditions:
            if not isinstance(c, Definition):
                raise DataflowError("operation %s: condition %r is not a Definition" % (name, c))
        self._line, self._file = caller_line()

    def definitions(self):
        return list(self.inputs.values()) + list(self.outputs.values()) + self.conditions

    def spec(self):
        out = {}
        if self.subflow is not None:
            out["subflow"] = str(self.subflow)
        else:
            out["module"] = self.module
            out["function"] = self.function
        if self.cache:
            out["cache"] = True
        out["inputs"] = {k: d.name for k, d in self.inputs.items()}
        out["outputs"] = {k: d.name for k, d in self.outputs.items()}
        if self.conditions:
            out["conditions"] = [c.name for c in self.conditions]
        return out


class GetSingle:
    """Give back the last value of each definition (DFFML's GetSingle)."""

    def __init__(self, *definitions):
        self.definitions = list(definitions)


class GetMulti:
    """Give back every value of each definition, in order (DFFML's GetMulti)."""

    def __init__(self, *definitions):
        self.definitions = list(definitions)


class DataFlow:
    """Operations wired by definition. `inputs`: the Definitions a caller gives values of;
    `output`: GetSingle and GetMulti selections (one, or a list); `seed(definition,
    value)`: a value every context starts with; `wire(operation, parameter, origins)`:
    where an input comes from when wiring by definition is ambiguous (`"seed"` or
    `"<operation>.<output>"`)."""

    def __init__(self, *operations, inputs=None, output=None):
        self.operations = {}
        for op in operations:
            if not isinstance(op, Operation):
                raise DataflowError("DataFlow: %r is not an Operation" % (op,))
            if op.name in self.operations:
                raise DataflowError("DataFlow: two operations are named %s" % op.name)
            self.operations[op.name] = op
        self.inputs = list(inputs or [])
        outputs = output if isinstance(output, (list, tuple)) else [output] if output is not None else []
        self.output = outputs
        self._seed = []
        self._flow = {}

    def seed(self, definition, value):
        json.dumps(value)
        self._seed.append((definition, value))
        return self

    def wire(self, operation, parameter, origins):
        if isinstance(origins, str):
            origins = [origins]
        self._flow.setdefault(operation, {})[parameter] = list(origins)
        return self

    def definitions(self):
        """Every Definition the flow names, by name; two different ones with one name are
        refused."""
        found = {}
        extra = list(self.inputs) + [d for d, _ in self._seed]
        for o in self.output:
            extra += o.definitions
        for d in [d for op in self.operations.values() for d in op.definitions()] + extra:
            if not isinstance(d, Definition):
                raise DataflowError("%r is not a Definition" % (d,))
            seen = found.get(d.name)
            if seen is not None and seen.spec() != d.spec():
                raise DataflowError("two definitions are named %s: %r and %r" % (d.name, seen.spec(), d.spec()))
            found[d.name] = d
        return found

    def spec(self):
        """The flow as the JSON a flow file holds."""
        out = {
            "definitions": {name: d.spec() for name, d in sorted(self.definitions().items())},
            "operations": {name: op.spec() for name, op in self.operations.items()},
        }
        if self._flow:
            out["flow"] = self._flow
        if self.inputs:
            out["inputs"] = [d.name for d in self.inputs]
        if self._seed:
            out["seed"] = [{d.name: v} for d, v in self._seed]
        selection = {}
        for o in self.output:
            key = "get_single" if isinstance(o, GetSingle) else "get_multi" if isinstance(o, GetMulti) else None
            if key is None:
                raise DataflowError("output: %r is not GetSingle or GetMulti" % (o,))
            selection.setdefault(key, []).extend(d.name for d in o.definitions)
        out["output"] = selection
        # Where each part was declared, so errors name lines of the Python file.
        lines, source = {}, None
        parts = [("definitions", d) for d in self.definitions().values()]
        parts += [("operations", op) for op in self.operations.values()]
        for kind, part in parts:
            if part._line is not None:
                lines["%s.%s" % (kind, part.name)] = part._line
                source = source or part._file
        if source:
            out["source"] = {"file": os.path.basename(source), "lines": lines}
        return out


def load(path):
    """The flow a Python file declares: a module-level `flow`, else its one DataFlow."""
    module = run_file(path, "_tessera_flow_file", DataflowError)
    flow = getattr(module, "flow", None)
    if isinstance(flow, DataFlow):
        return flow
    flows = [v for v in vars(module).values() if isinstance(v, DataFlow)]
    if len(flows) != 1:
        raise DataflowError("%s declares %d DataFlows; declare one, or a module-level `flow = ...`"
                            % (os.path.basename(path), len(flows)))
    return flows[0]


def main(argv=None):
    """`python -m tessera.dataflow flow.py`: prints the flow's spec as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tessera.dataflow FLOW.py", file=sys.stderr)
        return 2
    try:
        print(json.dumps(load(argv[0]).spec(), indent=1))
    except DataflowError as e:
        print("%s: %s" % (argv[0], e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from tessera.dataflow import main as _main

    sys.exit(_main())
