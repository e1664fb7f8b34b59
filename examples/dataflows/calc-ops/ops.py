"""The calculator's operations. Each is a function the dataflow calls with its inputs as
keyword arguments; what it returns is its output (a mapping when it has several)."""

import tessera


class Calc(tessera.Task):
    def parse(self, line):
        """line: str -> {add: bool, mult: bool, numbers: [int]}"""
        words = line.split()
        return {
            "add": "add" in words,
            "mult": "multiply" in words or "mult" in words,
            "numbers": [int(w) for w in words if w.lstrip("-").isdigit()],
        }

    def add(self, numbers):
        """numbers: [int] -> their sum"""
        return sum(numbers)

    def mult(self, numbers):
        """numbers: [int] -> their product"""
        product = 1
        for n in numbers:
            product *= n
        return product
