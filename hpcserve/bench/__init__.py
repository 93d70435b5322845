"""Serving benchmark: load generator, validity rules, result files and plots.

API for callers (recipe benchmark stage, sweeps):
  runner.BenchConfig, runner.run_benchmark (async) / runner.run (sync), validity.registry_restart_counter,
  results.write_rollup, report.make_report; ``main(argv)`` is the command line.
"""

from __future__ import annotations

from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from hpcserve.bench.cli import main as cli_main
    return cli_main(argv)


def make_report(paths, out_dir):
    from hpcserve.bench.report import make_report as _make_report
    return _make_report(paths, out_dir)
