import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

import _path

from tessera.dataflow import DataFlow, DataflowError, Definition, GetMulti, GetSingle, Operation, load

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "dataflows", "calc.py")


class TestDataflow(unittest.TestCase):
    def test_the_calculator_gives_the_yaml_files_spec(self):
        spec = load(EXAMPLE).spec()
        self.assertEqual(spec["definitions"], {
            "calc_string": {"type": "str"}, "is_add": {"type": "bool"}, "is_mult": {"type": "bool"},
            "numbers": {"type": "json"}, "result": {"type": "int"},
        })
        self.assertEqual(spec["operations"]["add"], {
            "module": "calc.ops@0.1.0", "function": "add", "inputs": {"numbers": "numbers"},
            "outputs": {"sum": "result"}, "conditions": ["is_add"],
        })
        self.assertEqual(spec["inputs"], ["calc_string"])
        self.assertEqual(spec["output"], {"get_single": ["result"]})
        self.assertEqual(spec["source"]["file"], "calc.py")
        self.assertEqual(spec["source"]["lines"]["operations.parse"], 16)

    def test_seeds_wiring_locks_subflows_and_selections(self):
        n = Definition("n", "int", lock=True)
        clamp = Operation("clamp", module="t.ops@1.0.0", function="clamp", inputs={"n": n}, outputs={"n": n})
        v = Definition("v", "int", validate=clamp)
        text = Definition("text", "str")
        pair = Operation("pair", module="t.ops@1.0.0", function="pair", inputs={"a": n, "b": v},
                         outputs={"out": text}, cache=True)
        model = Operation("model", subflow="model.yaml", inputs={"text": text}, outputs={"text": text})
        flow = DataFlow(clamp, pair, model, inputs=[n], output=[GetSingle(text), GetMulti(n)])
        flow.seed(v, 3).wire("pair", "a", "seed")
        spec = flow.spec()
        self.assertEqual(spec["definitions"]["n"], {"type": "int", "lock": True})
        self.assertEqual(spec["definitions"]["v"], {"type": "int", "validate": "clamp"})
        x = Definition("x", "tensor", dtype="F32", shape=(None, 64))
        self.assertEqual(x.spec(), {"type": "tensor", "dtype": "F32", "shape": [None, 64]})
        self.assertEqual(Definition("j", "json", schema={"type": "array"}).spec(), {"type": "json", "schema": {"type": "array"}})
        self.assertEqual(spec["seed"], [{"v": 3}])
        self.assertEqual(spec["flow"], {"pair": {"a": ["seed"]}})
        self.assertTrue(spec["operations"]["pair"]["cache"])
        self.assertEqual(spec["operations"]["model"]["subflow"], "model.yaml")
        self.assertNotIn("module", spec["operations"]["model"])
        self.assertEqual(spec["output"], {"get_single": ["text"], "get_multi": ["n"]})
        json.dumps(spec)

    def test_wrong_declarations_are_refused_naming_the_part(self):
        a = Definition("a", "int")
        with self.assertRaisesRegex(DataflowError, "type 'integer'"):
            Definition("x", "integer")
        with self.assertRaisesRegex(DataflowError, "module` and `function`, or `subflow"):
            Operation("op", module="m@1.0.0", function="f", subflow="s.yaml", inputs={"a": a}, outputs={"a": a})
        with self.assertRaisesRegex(DataflowError, "module` and `function`, or `subflow"):
            Operation("op", module="m@1.0.0", inputs={"a": a}, outputs={"a": a})
        with self.assertRaisesRegex(DataflowError, "module` and `function`, or `subflow"):
            Operation("op", module="m@1.0.0", subflow="s.yaml", inputs={"a": a}, outputs={"a": a})
        with self.assertRaisesRegex(DataflowError, "input 'a' is not a Definition"):
            Operation("op", module="m@1.0.0", function="f", inputs={"a": "a"}, outputs={"a": a})
        op = Operation("op", module="m@1.0.0", function="f", inputs={"a": a}, outputs={"b": Definition("a", "str")})
        with self.assertRaisesRegex(DataflowError, "two definitions are named a"):
            DataFlow(op, inputs=[a]).spec()
        with self.assertRaisesRegex(DataflowError, "two operations are named op"):
            DataFlow(op, op)

    def test_the_command_prints_the_spec_and_names_files_with_no_flow(self):
        out = subprocess.run([sys.executable, "-m", "tessera.dataflow", EXAMPLE], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=_path.SDK))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(json.loads(out.stdout)["operations"]["mult"]["conditions"], ["is_mult"])
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "none.py")
            with open(path, "w") as f:
                f.write(textwrap.dedent("""\
                    from tessera.dataflow import DataFlow
                    x = 1
                """))
            out = subprocess.run([sys.executable, "-m", "tessera.dataflow", path], capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=_path.SDK))
            self.assertEqual(out.returncode, 1)
            self.assertIn("declares 0 DataFlows", out.stderr)


if __name__ == "__main__":
    unittest.main()
