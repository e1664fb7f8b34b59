import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

import _path

from tessera.swarm import Module, Swarm, SwarmError, Task, load
from tessera.task import Inputs


class Manta(Swarm):
    def __init__(self, base):
        super().__init__()
        self.worker = Task(Module(os.path.join(base, "worker"), datasets=["digits"]), method="all", maximum=-1)
        self.aggregator = Task(Module("fl.fedavg@^1.0"), method="any", maximum=1)
        self.scheduler = Task(Module("fl.stop@1.0.0", config={"patience": 2}), method="any", maximum=1)
        self.iterations = 30
        self.set_global("target_accuracy", 0.9)

    def execute(self):
        results = self.worker()
        aggregated = self.aggregator(results)
        return self.scheduler(aggregated)


class SwarmSpecTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        os.makedirs(os.path.join(self.dir, "worker"))
        with open(os.path.join(self.dir, "worker", "module.yaml"), "w") as f:
            f.write("name: w\n")

    def test_the_manta_shape_gives_the_yaml_spec(self):
        spec = Manta(self.dir).spec(self.dir)
        self.assertEqual(spec["flow"], ["worker -> aggregator", "aggregator -> scheduler"])
        self.assertEqual(spec["scheduler"], "scheduler")
        self.assertEqual(spec["iterations"], 30)
        self.assertEqual(spec["globals"], {"target_accuracy": 0.9})
        worker = spec["tasks"]["worker"]
        self.assertEqual(worker["module"], os.path.join(self.dir, "worker"))
        self.assertEqual((worker["method"], worker["maximum"], worker["datasets"]), ("all", -1, ["digits"]))
        self.assertEqual(spec["tasks"]["aggregator"]["module"], "fl.fedavg@^1.0")
        self.assertEqual(spec["tasks"]["scheduler"]["config"], {"patience": 2})
        # Errors in the Rust reader name these lines of this file.
        self.assertEqual(spec["source"]["file"], "test_swarm.py")
        self.assertEqual(set(spec["source"]["lines"]), {"tasks.worker", "tasks.aggregator", "tasks.scheduler"})
        json.dumps(spec)

    def test_bad_declarations_name_what_is_wrong(self):
        with self.assertRaisesRegex(SwarmError, "method 'everywhere'"):
            Task(Module("m@1.0.0"), method="everywhere")
        with self.assertRaisesRegex(SwarmError, "fraction"):
            Task(Module("m@1.0.0"), maximum=1.5)
        with self.assertRaisesRegex(SwarmError, "maximum 0"):
            Task(Module("m@1.0.0"), maximum=0)
        with self.assertRaisesRegex(SwarmError, "has no module.yaml"):
            Module("./nowhere").reference(self.dir)

        class Forgot(Swarm):
            def __init__(self):
                super().__init__()
                self.a = Task(Module("m@1.0.0"))
                self.b = Task(Module("m@1.0.0"))

            def execute(self):
                self.a()

        with self.assertRaisesRegex(SwarmError, "task b is declared but execute"):
            Forgot().spec(self.dir)
        with self.assertRaisesRegex(SwarmError, "only inside Swarm.execute"):
            Task(Module("m@1.0.0"))()

        class Unrelated(Swarm):
            def __init__(self):
                super().__init__()
                self.a = Task(Module("m@1.0.0"))
                self.b = Task(Module("m@1.0.0"))

            def execute(self):
                self.a()
                self.b()

        with self.assertRaisesRegex(SwarmError, "without passing one's result"):
            Unrelated().spec(self.dir)

    def test_maximum_is_written_only_when_given(self):
        self.assertNotIn("maximum", Task(Module("m@1.0.0"), method="any").spec(self.dir))
        self.assertEqual(Task(Module("m@1.0.0"), maximum=0.5).spec(self.dir)["maximum"], 0.5)

    def test_a_swarm_file_prints_its_spec(self):
        path = os.path.join(self.dir, "swarm.py")
        with open(path, "w") as f:
            f.write(textwrap.dedent("""\
                from tessera.swarm import Module, Swarm, Task

                class Analytics(Swarm):
                    def __init__(self):
                        super().__init__()
                        self.stats = Task(Module("./worker", datasets=["digits"]))
                        self.combine = Task(Module("./worker"), method="any", maximum=1)

                    def execute(self):
                        self.combine(self.stats())
                """))
        self.assertIsInstance(load(path), Swarm)
        env = dict(os.environ, PYTHONPATH=_path.SDK)
        out = subprocess.run([sys.executable, "-m", "tessera.swarm", path], capture_output=True, text=True, env=env)
        self.assertEqual(out.returncode, 0, out.stderr)
        spec = json.loads(out.stdout)
        self.assertEqual(spec["flow"], ["stats -> combine"])
        self.assertEqual(spec["source"]["lines"]["tasks.stats"], 6)
        self.assertNotIn("scheduler", spec)


class InputsTest(unittest.TestCase):
    def test_outputs_of_earlier_stages_arrive_by_node(self):
        inputs = Inputs([("model@node-1", b"\x01"), ("count@node-1", b"3"), ("count@node-0", b"5"), ("plain", 7)])
        self.assertEqual(inputs.select("count"), [("node-0", 5), ("node-1", 3)])
        # One node's output is also there under its plain name.
        self.assertEqual(inputs["model"], b"\x01")
        self.assertNotIn("count", inputs)
        self.assertEqual(inputs.select("plain"), [(None, 7)])
        self.assertEqual(inputs.select("missing"), [])


if __name__ == "__main__":
    unittest.main()
