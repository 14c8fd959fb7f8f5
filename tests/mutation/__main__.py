"""A small mutation runner: ``python -m tests.mutation``.

Why our own and not mutmut or cosmic-ray: the tests start the server as a
separate process (``python -m fastscp.cli``), so a mutant must be on disk where
those processes import from, not only in the test process; the compiled twins
(fastscp/_*_cext*.so) must stay beside the mutated module; a mutant that hangs
a server must not leave it running on a shared machine; and the server tests
are slow, so each module runs only the tests mapped to it, with ``-x``.

How: the project (fastscp/, tests/, config/, pyproject.toml, the built .so) is
copied once to a temporary overlay. For each mutant the module's file in the
overlay is replaced with the mutated source, the mapped tests run there
(``PYTHONPATH=<overlay>``, no bytecode written), and the original is put
back. A mutant is *killed* when the tests fail or exceed the timeout. Every
process a run starts carries a marker in its environment; whatever is left
with that marker after a mutant is killed by its PID.

Operators (AST): comparison flip (``==``/``!=``, ``<``/``>=``, ``in``/``not in``,
...), ``and``/``or`` swap, ``not`` removed, integer constant +1, ``True``/``False``
swap, ``+``/``-`` swap, a call statement deleted (``os.fsync(fd)``: logging
calls excepted), ``return x`` -> ``return None``. Docstrings, annotations and
``assert`` statements (internal invariants) are left alone.

Usage::

    python -m tests.mutation faults [--quick]                  # the hand-written faults (faults.py)
    python -m tests.mutation mutants fastscp/storage/layout.py [--max N] [--seed S]
    python -m tests.mutation mutants --all                     # every module in MODULES
    python -m tests.mutation quick                             # the CI subset

Reports (markdown) go to build/mutation/.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.mutation.faults import FAULTS

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ROOT / "build" / "mutation"
MARKER = "FASTSCP_MUTATION_RUN"

#: Module -> the tests that guard it (run with -x). The modules the issue names:
#: storage, layout, the association and DIMSE paths, access, config, reconcile.
MODULES: dict[str, tuple[str, ...]] = {
    "fastscp/net/access.py": (
        "tests/e2e/test_access.py",
    ),
    "fastscp/storage/layout.py": (
        "tests/unit/storage/test_layout.py",
    ),
    "fastscp/storage/area.py": (
        "tests/unit/storage/test_storage.py",
        "tests/unit/storage/test_storage_area.py",
        "tests/unit/storage/test_storage_modes.py",
        "tests/unit/net/test_storescp.py",
        "tests/unit/net/test_association.py",
        "tests/unit/net/test_association_phases.py::test_the_temp_file_for_the_next_store_is_made_ahead",
        "tests/e2e/test_duplicates.py",
        "tests/e2e/test_durability.py",
    ),
    "fastscp/config.py": (
        "tests/unit/test_config.py",
    ),
    "fastscp/net/dimse.py": (
        "tests/e2e/test_dimse.py",
        "tests/unit/net/test_protocol.py",
        "tests/e2e/test_protocol_paths.py",
    ),
    # The command set codec's pure-Python twin (MODULE_ENV: what runs where the compiled one is not loaded).
    "fastscp/net/_dimse_py.py": (
        "tests/twins/test_dimse.py",
        "tests/e2e/test_dimse.py",
        "tests/unit/net/test_protocol.py",
        "tests/e2e/test_protocol_paths.py",
    ),
    "fastscp/net/negotiation.py": (
        "tests/e2e/test_negotiation.py",
        "tests/unit/net/test_negotiation_remembered.py",
        "tests/unit/net/test_protocol.py",
        "tests/e2e/test_access.py",
        "tests/e2e/test_cfind.py::test_relational_queries_when_negotiated",
    ),
    # The association's parts over a socket pair first (seconds), then what only a server
    # shows: C-FIND and its C-CANCEL, C-GET and C-MOVE, storage commitment, TLS.
    "fastscp/net/pdu.py": (
        "tests/unit/net/test_pdu.py",
        "tests/unit/net/test_protocol.py",
        "tests/unit/net/test_association.py",
        "tests/unit/net/test_association_phases.py",
        # bytes_read tells a port probe (nothing read) from an association.
        "tests/unit/net/test_storescp.py::test_a_connection_closed_before_any_pdu_is_a_probe",
        # read() of the rest of a PDU the data path stopped in (both twins stop there).
        "tests/twins/test_datapath.py::test_the_rest_of_a_pdu_reads_as_a_pdu_of_its_own",
    ),
    "fastscp/net/association.py": (
        "tests/unit/net/test_association.py",
        "tests/unit/net/test_association_phases.py",
        "tests/unit/net/test_association_responses.py",
        "tests/unit/net/test_storescp.py",
        "tests/e2e/test_association_server.py::test_c_find_matches_fragmented_to_a_small_maximum_length_arrive_whole",
        "tests/e2e/test_protocol_paths.py::test_c_cancel_stops_a_c_find",
        "tests/e2e/test_commitment.py::test_commitment_on_the_same_association",
        "tests/e2e/test_retrieve.py::test_pynetdicom_get_series_and_image_levels_with_counts",
        "tests/e2e/test_retrieve.py::test_c_cancel_during_a_c_get_sub_operation_stops_it",
        "tests/e2e/test_retrieve.py::test_a_c_get_requester_that_does_not_answer_its_c_store_is_aborted",
        "tests/e2e/test_retrieve.py::test_movescu_to_storescp_at_study_series_and_image_levels",
        "tests/e2e/test_access.py::test_dicom_tls_with_client_certificates",
    ),
    "fastscp/net/storescp.py": (
        "tests/unit/net/test_storescp.py",
        "tests/unit/net/test_association.py",
    ),
    # The duplicate check's "no need to ask": a false "absent" would store a resend as new.
    "fastscp/index/uidfilter.py": (
        "tests/unit/index/test_uidfilter.py",
        "tests/e2e/test_locate.py",
    ),
    "fastscp/index/reindex.py": (
        "tests/unit/index/test_reindex.py",
        "tests/unit/index/test_index.py",
    ),
    # The data path's pure-Python twin: its [py] twin tests, then the association's unit tests,
    # which run it only under FASTSCP_NO_EXTENSIONS=1 (MODULE_ENV; the [cext] cases skip there).
    "fastscp/net/_datapath_py.py": (
        "tests/twins/test_datapath.py",
        "tests/unit/net/test_association.py",
        "tests/unit/net/test_association_phases.py",
        "tests/unit/net/test_association_responses.py",
        "tests/unit/net/test_storescp.py",
    ),
    "fastscp/storage/files.py": (
        "tests/unit/storage/test_files.py",
        "tests/unit/storage/test_storage_modes.py",
        "tests/unit/storage/test_storage_area.py::test_with_fsync_a_stored_files_pages_go_back_at_its_commit",
        "tests/unit/imaging/test_frames.py",
    ),
    # The records kept for a lagging post-store stage (issue 13: none dropped).
    "fastscp/poststore/client.py": (
        "tests/unit/poststore/test_client.py",
        "tests/unit/poststore/test_stage.py",
        "tests/e2e/test_poststore.py::test_a_stalled_post_store_stage_catches_up_without_losing_records",
        "tests/e2e/test_poststore.py::test_records_the_stage_had_not_taken_at_stop_get_thumbnails_at_the_next_start",
    ),
    # A worker's records for the indexer: batched, kept while it is down or lags (issue 13: never waited for).
    "fastscp/index/client.py": (
        "tests/unit/index/test_index.py::test_a_worker_client_never_waits_for_an_indexer_that_does_not_read",
        "tests/unit/index/test_index.py::test_a_worker_client_sends_what_waited_once_the_indexer_reads_again",
        "tests/unit/index/test_index.py::test_a_worker_client_keeps_records_in_files_while_the_indexer_is_down",
        "tests/unit/index/test_index.py::test_indexer_client_keeps_records_until_the_indexer_is_back",
        "tests/unit/index/test_index.py::test_long_attribute_maps_travel_in_messages_that_fit",
        "tests/unit/index/test_index.py::test_indexer_batches_records_and_answers_queries",
        "tests/unit/index/test_index.py::test_the_indexer_takes_kept_records_once_idle_and_all_of_them_at_stop",
        "tests/e2e/test_index_server.py::test_records_the_indexer_had_not_taken_are_indexed_before_it_exits",
    ),
    # Records handed to a lagging process (the indexer, the post-store stage, the forwarder): in order,
    # kept in files beyond a bound, held or dropped where no file can take them.
    "fastscp/process/sender.py": (
        "tests/unit/process/test_sender.py",
        "tests/unit/poststore/test_client.py",
        "tests/unit/index/test_index.py::test_a_worker_client_never_waits_for_an_indexer_that_does_not_read",
        "tests/unit/index/test_index.py::test_a_worker_client_sends_what_waited_once_the_indexer_reads_again",
        "tests/unit/index/test_index.py::test_a_worker_client_keeps_records_in_files_while_the_indexer_is_down",
        "tests/unit/index/test_index.py::test_indexer_client_keeps_records_until_the_indexer_is_back",
    ),
    # The files of kept records both lagging processes take (the post-store stage, the indexer).
    "fastscp/process/kept.py": (
        "tests/unit/process/test_kept.py",
        "tests/unit/poststore/test_stage.py",
        "tests/unit/poststore/test_client.py",
        "tests/unit/index/test_index.py::test_a_worker_client_never_waits_for_an_indexer_that_does_not_read",
        "tests/unit/index/test_index.py::test_the_indexer_takes_kept_records_once_idle_and_all_of_them_at_stop",
    ),
}

#: Module -> environment its tests run with: a twin is only what runs where the compiled one is not loaded.
MODULE_ENV: dict[str, dict[str, str]] = {
    "fastscp/net/_datapath_py.py": {"FASTSCP_NO_EXTENSIONS": "1"},
    "fastscp/net/_dimse_py.py": {"FASTSCP_NO_EXTENSIONS": "1"},
}

#: The CI subset: fast unit-level tests only, a fixed sample of mutants.
QUICK_MODULES: dict[str, tuple[str, ...]] = {
    "fastscp/storage/layout.py": (
        "tests/unit/storage/test_layout.py",
    ),
    "fastscp/net/access.py": (
        "tests/e2e/test_access.py::test_ipv4_mapped_peer_addresses_match_ipv4_networks",
        "tests/e2e/test_access.py::test_access_policy_edges",
        "tests/e2e/test_access.py::test_unresolvable_host_stops_start_up_naming_the_key",
    ),
}
QUICK_MAX = 15
#: The quick run fails below this share of its sample killed (tests/README.md: the known survivors).
QUICK_MIN_SCORE = 0.85

_LOG_NAMES = {"log", "action_log", "logging", "warnings", "print"}


# -- mutants -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mutant:
    index: int
    line: int
    description: str


_COMPARE_FLIP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
    ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}

_OP_SWAP: dict[type, type] = {ast.And: ast.Or, ast.Or: ast.And, ast.Add: ast.Sub, ast.Sub: ast.Add}


def _docstring_ids(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _is_log_call(call: ast.Call) -> bool:
    func = call.func
    while isinstance(func, ast.Attribute):
        func = func.value
    return isinstance(func, ast.Name) and func.id in _LOG_NAMES


def _sites(tree: ast.AST) -> Iterator[tuple[ast.AST, str, int]]:
    """(node, kind, line) of every place a mutant can be made, in a fixed order."""
    skip = _docstring_ids(tree)
    annotations = {id(n) for a in ast.walk(tree) if isinstance(a, (ast.AnnAssign, ast.arg)) and a.annotation
                   for n in ast.walk(a.annotation)}
    # Internal invariants (assert) are not behaviour: weakening one changes nothing a user sees.
    skip |= {id(n) for a in ast.walk(tree) if isinstance(a, ast.Assert) for n in ast.walk(a)}
    for node in ast.walk(tree):
        if id(node) in skip or id(node) in annotations:
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _COMPARE_FLIP:
                    yield node, f"compare:{i}", line
        elif isinstance(node, ast.BoolOp):
            yield node, "swap-op", line
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield node, "not", line
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            yield node, "bool", line
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            yield node, "int", line
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)) and not (
                isinstance(node.left, ast.Constant) and isinstance(node.left.value, str)):
            yield node, "swap-op", line
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and not _is_log_call(node.value):
            yield node, "delete-call", line
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            yield node, "return-none", line


def _apply(node: ast.AST, kind: str) -> str:
    """Mutate ``node`` in place; returns a description."""
    if kind.startswith("compare:"):
        assert isinstance(node, ast.Compare)
        i = int(kind.split(":")[1])
        old = node.ops[i]
        node.ops[i] = _COMPARE_FLIP[type(old)]()
        return f"{type(old).__name__} -> {type(node.ops[i]).__name__}"
    if kind == "swap-op":
        assert isinstance(node, (ast.BoolOp, ast.BinOp))
        old_op = type(node.op)
        node.op = _OP_SWAP[old_op]()
        return f"{old_op.__name__} -> {type(node.op).__name__}"
    if kind == "not":
        assert isinstance(node, ast.UnaryOp)
        node.op = ast.UAdd()  # replaced below: "not x" -> "x"
        return "not x -> x"
    if kind == "bool":
        assert isinstance(node, ast.Constant)
        node.value = not node.value
        return f"{not node.value} -> {node.value}"
    if kind == "int":
        assert isinstance(node, ast.Constant)
        node.value += 1
        return f"{node.value - 1} -> {node.value}"
    if kind == "delete-call":
        return "call statement deleted"
    if kind == "return-none":
        return "return x -> return None"
    raise AssertionError(kind)


class _Rewrite(ast.NodeTransformer):
    """Applies the structural part of 'not', 'delete-call' and 'return-none'."""

    def __init__(self, target: ast.AST, kind: str) -> None:
        self.target, self.kind = target, kind

    def visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            if self.kind == "not":
                return node.operand  # type: ignore[attr-defined]
            if self.kind == "delete-call":
                return ast.copy_location(ast.Pass(), node)
            if self.kind == "return-none":
                return ast.copy_location(ast.Return(value=ast.Constant(None)), node)
        return self.generic_visit(node)


def mutants(source: str) -> list[Mutant]:
    tree = ast.parse(source)
    out = []
    for index, (node, kind, line) in enumerate(_sites(tree)):
        out.append(Mutant(index, line, _apply(copy.deepcopy(node), kind)))
    return out


def mutate(source: str, index: int) -> str:
    tree = ast.parse(source)
    for i, (node, kind, _line) in enumerate(_sites(tree)):
        if i == index:
            _apply(node, kind)
            tree = _Rewrite(node, kind).visit(tree)
            return ast.unparse(ast.fix_missing_locations(tree))
    raise IndexError(index)


# -- running tests in an overlay ------------------------------------------------------------------

class Overlay:
    """A copy of the project whose modules can be swapped one at a time."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="fastscp-mutation-"))
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "artifacts", "mutation")
        for name in ("fastscp", "tests", "config"):
            shutil.copytree(ROOT / name, self.path / name, ignore=ignore)
        shutil.copytree(ROOT / "tests" / "mutation", self.path / "tests" / "mutation", ignore=ignore)
        shutil.copy2(ROOT / "pyproject.toml", self.path / "pyproject.toml")
        self.marker = uuid.uuid4().hex

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def run(self, tests: tuple[str, ...], timeout: float, extra_env: dict[str, str] | None = None) -> tuple[str, float]:
        """("passed" | "failed" | "timeout", seconds) of the tests in the overlay's current state."""
        env = dict(os.environ, PYTHONPATH=str(self.path), PYTHONDONTWRITEBYTECODE="1", **{MARKER: self.marker},
                   **(extra_env or {}))
        argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        started = time.monotonic()
        process = subprocess.Popen(argv, cwd=self.path, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            code = process.wait(timeout)
            outcome = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            outcome = "timeout"
            process.send_signal(signal.SIGINT)  # pytest tears its fixtures down (stops its servers)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        finally:
            self.reap()
        return outcome, time.monotonic() - started

    def reap(self) -> None:
        """Kill, by PID, any process this run started that is still there (a hung server)."""
        needle = f"{MARKER}={self.marker}".encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        os.kill(int(entry), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass


# -- commands ------------------------------------------------------------------------------------------

def _baseline(overlay: Overlay, tests: tuple[str, ...], extra_env: dict[str, str] | None) -> float:
    outcome, seconds = overlay.run(tests, timeout=1800, extra_env=extra_env)
    if outcome != "passed":
        sys.exit(f"the tests fail without any mutant: {' '.join(tests)}")
    return seconds


def run_faults(quick: bool, only: str | None) -> int:
    faults = [f for f in FAULTS if (f.quick or not quick) and (only is None or only in f.name)]
    overlay = Overlay()
    lines = ["# Hand-written faults (tests/mutation/faults.py)", "", "| fault | file | outcome | seconds |",
             "|---|---|---|---|"]
    survived = 0
    try:
        for fault in faults:
            target = overlay.path / fault.path
            original = target.read_text()
            if original.count(fault.old) != 1:
                sys.exit(f"fault {fault.name!r}: its text is not (exactly once) in {fault.path}; update faults.py")
            target.write_text(original.replace(fault.old, fault.new))
            try:
                outcome, seconds = overlay.run(fault.tests, timeout=600)
            finally:
                target.write_text(original)
            killed = outcome != "passed"
            survived += not killed
            lines.append(f"| {fault.name} | {fault.path} | {'killed' if killed else 'SURVIVED'} ({outcome}) "
                         f"| {seconds:.0f} |")
            print(f"{'killed  ' if killed else 'SURVIVED'} {fault.name} ({outcome}, {seconds:.0f} s)", flush=True)
    finally:
        overlay.close()
    lines += ["", f"{len(faults) - survived} of {len(faults)} killed."]
    _write_report("faults-quick.md" if quick else "faults.md", lines)
    return 1 if survived else 0


def run_mutants(modules: dict[str, tuple[str, ...]], max_mutants: int | None, seed: int, name: str,
                only: set[int] | None = None) -> float:
    """Runs the mutants (those numbered in ``only``, if given), writes the report; returns the share killed (0-1)."""
    overlay = Overlay()
    lines = [f"# Mutation report ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    totals = [0, 0]
    try:
        for module, tests in modules.items():
            target = overlay.path / module
            original = target.read_text()
            in_module = len(mutants(original))
            found = [m for m in mutants(original) if only is None or m.index in only]
            chosen = found if max_mutants is None or len(found) <= max_mutants else sorted(
                random.Random(seed).sample(found, max_mutants), key=lambda m: m.index)
            extra_env = MODULE_ENV.get(module)
            baseline = _baseline(overlay, tests, extra_env)
            timeout = 3 * baseline + 30
            print(f"{module}: {len(chosen)} of {in_module} mutants; tests {' '.join(tests)} "
                  f"({baseline:.0f} s unmutated)", flush=True)
            source_lines = original.splitlines()
            survivors = []
            killed = 0
            for mutant in chosen:
                target.write_text(mutate(original, mutant.index))
                try:
                    outcome, seconds = overlay.run(tests, timeout, extra_env)
                finally:
                    target.write_text(original)
                code = source_lines[mutant.line - 1].strip() if mutant.line else ""
                if outcome == "passed":
                    survivors.append(f"| {mutant.index} | {mutant.line} | {mutant.description} | `{code}` |")
                else:
                    killed += 1
                print(f"  #{mutant.index} L{mutant.line} {mutant.description}: "
                      f"{'SURVIVED' if outcome == 'passed' else outcome} ({seconds:.0f} s)", flush=True)
            totals[0] += killed
            totals[1] += len(chosen)
            score = 100 * killed / len(chosen) if chosen else 100.0
            lines += [f"## {module}", "", f"{killed} of {len(chosen)} mutants killed ({score:.0f}%); "
                      f"{in_module} mutants in the module; tests: {', '.join(tests)}.", ""]
            if survivors:
                lines += ["Survivors:", "", "| # | line | mutation | source |", "|---|---|---|---|", *survivors, ""]
    finally:
        overlay.close()
    if totals[1]:
        lines += [f"Total: {totals[0]} of {totals[1]} killed ({100 * totals[0] / totals[1]:.0f}%)."]
    _write_report(name, lines)
    return totals[0] / totals[1] if totals[1] else 1.0


def _write_report(name: str, lines: list[str]) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    path = REPORTS / name
    path.write_text("\n".join(lines) + "\n")
    print(f"report: {path}")


def main(argv: list[str] | None = None) -> int:
    # A background job starts with SIGINT ignored, and pytest would inherit
    # that: with a handler here, children start with the default, so a
    # timed-out pytest can still be interrupted (and tear its servers down).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    faults = sub.add_parser("faults", help="apply each hand-written fault; every one must be killed")
    faults.add_argument("--quick", action="store_true", help="only the fast ones (CI)")
    faults.add_argument("--only", help="faults whose name contains this")
    mutate_ = sub.add_parser("mutants", help="AST mutants of modules, against their mapped tests")
    mutate_.add_argument("modules", nargs="*", help=f"default with --all: {', '.join(MODULES)}")
    mutate_.add_argument("--all", action="store_true")
    mutate_.add_argument("--max", type=int, default=None, help="at most this many mutants per module (sampled)")
    mutate_.add_argument("--seed", type=int, default=18)
    mutate_.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    mutate_.add_argument("--index", type=int, nargs="+", help="only the mutants of these numbers (#N in a report): "
                         "to check that new tests kill a run's survivors")
    mutate_.add_argument("--tests", nargs="+", help="run these tests instead of the module's mapped ones")
    mutate_.add_argument("--report", help="report file name in build/mutation/ (default mutants.md with --all, "
                         "else mutants-partial.md)")
    sub.add_parser("quick", help="the CI subset: quick faults, and a sample of mutants of layout and access")
    args = parser.parse_args(argv)
    if args.command == "faults":
        return run_faults(args.quick, args.only)
    if args.command == "quick":
        code = run_faults(True, None)
        score = run_mutants(QUICK_MODULES, QUICK_MAX, 18, "quick.md")
        if score < QUICK_MIN_SCORE:
            print(f"mutation score {score:.0%} is below {QUICK_MIN_SCORE:.0%}: a test lost its teeth")
            code = 1
        return code
    chosen = dict(MODULES) if args.all else {}
    for module in args.modules:
        if module not in MODULES:
            parser.error(f"{module}: not in MODULES ({', '.join(MODULES)})")
        chosen[module] = tuple(args.tests) if args.tests else MODULES[module]
    if not chosen:
        parser.error("name modules or use --all")
    if args.list:
        for module in chosen:
            for mutant in mutants((ROOT / module).read_text()):
                print(f"{module}:{mutant.line} #{mutant.index} {mutant.description}")
        return 0
    run_mutants(chosen, args.max, args.seed, args.report or ("mutants.md" if args.all else "mutants-partial.md"),
                set(args.index) if args.index else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
