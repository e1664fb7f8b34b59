"""DFFML's calculator as a dataflow written in Python: the same flow as calc.yaml.

    tessera flow run examples/dataflows/calc.py --input calc_string="add 40 and 2"
"""

from tessera.dataflow import DataFlow, Definition, GetSingle, Operation

calc_string = Definition("calc_string", "str")
is_add = Definition("is_add", "bool")
is_mult = Definition("is_mult", "bool")
numbers = Definition("numbers", "json")
result = Definition("result", "int")

MODULE = "calc.ops@0.1.0"

parse = Operation("parse", module=MODULE, function="parse", inputs={"line": calc_string},
                  outputs={"add": is_add, "mult": is_mult, "numbers": numbers})
add = Operation("add", module=MODULE, function="add", inputs={"numbers": numbers},
                outputs={"sum": result}, conditions=[is_add])
mult = Operation("mult", module=MODULE, function="mult", inputs={"numbers": numbers},
                 outputs={"product": result}, conditions=[is_mult])

flow = DataFlow(parse, add, mult, inputs=[calc_string], output=GetSingle(result))
