"""DFFML's own orchestrator (MemoryOrchestrator, dffml from PyPI) on the calculator flow of
examples/dataflows/calc.yaml: `parse` turns "add 40 and 2" into numbers and flags, `add`
or `mult` runs on its flag. One context per line, all given to one `run`, as DFFML runs
them; the operations are in-process async Python functions.

Prints one JSON line: contexts, operations, seconds, ops_per_s.
    usage: python dffml_calc.py [CONTEXTS]
"""

import asyncio
import json
import sys
import time

from dffml import DataFlow, Definition, GetSingle, Input, op, run

calc_string = Definition(name="calc_string", primitive="str")
is_add = Definition(name="is_add", primitive="bool")
is_mult = Definition(name="is_mult", primitive="bool")
numbers = Definition(name="numbers", primitive="List[int]")
result = Definition(name="result", primitive="int")


@op(inputs={"line": calc_string}, outputs={"add": is_add, "mult": is_mult, "numbers": numbers})
async def parse(line):
    words = line.split()
    return {
        "add": "add" in words,
        "mult": "multiply" in words or "mult" in words,
        "numbers": [int(w) for w in words if w.lstrip("-").isdigit()],
    }


@op(inputs={"numbers": numbers}, outputs={"sum": result}, conditions=[is_add])
async def add(numbers):
    return {"sum": sum(numbers)}


@op(inputs={"numbers": numbers}, outputs={"product": result}, conditions=[is_mult])
async def mult(numbers):
    product = 1
    for n in numbers:
        product *= n
    return {"product": product}


def lines(n):
    return ["add %d and %d" % (i, i + 2) if i % 2 == 0 else "multiply %d and 10" % i for i in range(n)]


def expected(line):
    a, b = [int(w) for w in line.split() if w.isdigit()]
    return a + b if line.startswith("add") else a * b


async def main(n):
    dataflow = DataFlow.auto(parse, add, mult, GetSingle)
    dataflow.seed.append(Input(value=[result.name], definition=GetSingle.op.inputs["spec"]))
    contexts = {line: [Input(value=line, definition=calc_string)] for line in lines(n)}
    start = time.perf_counter()
    got = {}
    async for ctx, results in run(dataflow, contexts):
        got[(await ctx.handle()).as_string()] = results[result.name]
    seconds = time.perf_counter() - start
    wrong = [line for line in contexts if got.get(line) != expected(line)]
    if wrong:
        raise SystemExit("wrong results for %d lines, e.g. %r -> %r" % (len(wrong), wrong[0], got.get(wrong[0])))
    ops = 2 * n  # parse, then add or mult
    print(json.dumps({"contexts": n, "operations": ops, "seconds": seconds, "ops_per_s": ops / seconds}))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
