"""The mutation runner's own operators (tests/mutation): each mutant changes exactly one thing."""

from __future__ import annotations

import ast

from tests.mutation.__main__ import ROOT, mutants, mutate
from tests.mutation.faults import FAULTS

SOURCE = '''
"""Docstring: never mutated."""
import os, logging
log = logging.getLogger("x")


def f(a: int, fd: int) -> bool:
    log.info("not mutated")
    os.fsync(fd)
    if not a and a + 1 >= 2:
        return True
    return a in (1, 2)
'''


def test_operators_and_sources() -> None:
    found = [(m.line, m.description) for m in mutants(SOURCE)]
    assert sorted(found) == sorted([
        (9, "call statement deleted"), (10, "And -> Or"), (10, "not x -> x"), (10, "GtE -> Lt"),
        (10, "Add -> Sub"), (10, "1 -> 2"), (10, "2 -> 3"), (11, "return x -> return None"),
        (11, "True -> False"), (12, "return x -> return None"), (12, "In -> NotIn"), (12, "1 -> 2"),
        (12, "2 -> 3"),
    ])
    original = ast.dump(ast.parse(SOURCE))
    texts = [mutate(SOURCE, m.index) for m in mutants(SOURCE)]
    assert len(set(texts)) == len(texts) and all(ast.dump(ast.parse(t)) != original for t in texts)
    deleted = mutate(SOURCE, next(m.index for m in mutants(SOURCE) if m.description == "call statement deleted"))
    assert "os.fsync" not in deleted and "log.info" in deleted


def test_every_fault_names_tests_and_changes_something() -> None:
    names = [fault.name for fault in FAULTS]
    assert len(names) == len(set(names))
    for fault in FAULTS:
        assert fault.old != fault.new and fault.tests, fault.name
        with open(ROOT / fault.path, encoding="utf-8") as f:
            assert f.read().count(fault.old) == 1, f"{fault.name}: the text to replace is not in {fault.path}"
