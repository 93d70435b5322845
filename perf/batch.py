"""Batch driver benchmark against the mock engine. Prints, from one run each:

1. achieved rows/s as a fraction of the mock engine's configured capacity (goal >= 95%). The mock runs
   with real time (time scale 1), no prefill cost, a decode step of C ms and at most K running sequences;
   every row asks for T tokens, so a sequence holds a slot for T iterations (the first token comes with
   the admitting iteration) and capacity = K * 1000 / (C * T) rows/s;
2. toolkit overhead per row: the driver process's CPU time per row (user + sys), measured as the difference
   between a large and a small run against an instant mock, so start-up costs cancel (goal <= 0.2 ms);
3. peak RSS of the driver on a 1,000,000-row input (goal < 500 MB), generated in a temp dir.

    python perf/batch.py [--cap-rows 8000] [--rss-rows 1000000] [--skip-rss] [--skip-overhead] [--skip-capacity]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import orjson

from hpcserve.mock.launch import MockProcess

PY = sys.executable


def start_mock(*extra: str) -> tuple[MockProcess, str]:
    mock = MockProcess.start(["--model-path", "m", *extra], wait="ready")
    return mock, mock.url


def write_input(path: str, rows: int, tokens: int) -> None:
    with open(path, "wb") as f:
        chunk = []
        for i in range(rows):
            chunk.append(b'{"id":"row-%d","prompt":"benchmark prompt %d","max_tokens":%d,"ignore_eos":true}\n'
                         % (i, i, tokens))
            if len(chunk) == 10000:
                f.write(b"".join(chunk))
                chunk = []
        f.write(b"".join(chunk))


def drive(url: str, inp: str, out: str, concurrency: int) -> tuple[dict, float, int, float]:
    """Run the driver as a child; (summary, cpu seconds, peak RSS bytes, wall seconds)."""
    cmd = [PY, "-m", "hpcserve.batch", "--router", url, "--input", inp, "--output", out,
           "--concurrency", str(concurrency), "--request-timeout", "600"]
    t0 = time.monotonic()
    with open(out + ".stdout", "wb") as so, open(out + ".stderr", "wb") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"driver exited {proc.returncode}: {open(out + '.stderr').read()[-2000:]}")
    summary = orjson.loads(open(out + ".stdout", "rb").read().splitlines()[-1])
    return summary, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, wall


def bench_capacity(tmp: str, rows: int, step_ms: float, max_running: int, tokens: int) -> None:
    capacity = max_running * 1000.0 / (step_ms * tokens)
    proc, url = start_mock("--mock-time-scale", "1", "--mock-decode-step-ms", str(step_ms),
                           "--mock-max-running", str(max_running))
    try:
        inp, out = os.path.join(tmp, "cap.jsonl"), os.path.join(tmp, "cap.out.jsonl")
        write_input(inp, rows, tokens)
        summary, cpu, _, wall = drive(url, inp, out, concurrency=2 * max_running)
    finally:
        proc.stop()
    achieved = summary["rows_per_s"]
    with open(out, "rb") as f:
        tok = [orjson.loads(line)["usage"]["completion_tokens"] for line in f]
    if sum(tok) != tokens * len(tok):  # the capacity formula assumes every row is exactly T tokens
        print(f"  warning: rows averaged {sum(tok) / len(tok):.2f} tokens, not {tokens}")
    print(f"capacity: mock decode step {step_ms:g} ms, max running {max_running}, {tokens} tokens/row "
          f"-> {capacity:.1f} rows/s")
    print(f"  achieved {achieved:.1f} rows/s over {summary['ok']} rows ({summary['elapsed_s']:.2f} s in the "
          f"driver, {wall:.2f} s with start-up) = {achieved / capacity:.1%} of capacity (goal >= 95%)")


def bench_overhead(tmp: str, small: int, large: int, concurrency: int) -> None:
    proc, url = start_mock("--mock-time-scale", "0")
    try:
        runs = []
        for n in (small, large):
            inp, out = os.path.join(tmp, f"ovh{n}.jsonl"), os.path.join(tmp, f"ovh{n}.out.jsonl")
            write_input(inp, n, 4)
            summary, cpu, rss, wall = drive(url, inp, out, concurrency)
            runs.append((n, cpu, summary["rows_per_s"]))
    finally:
        proc.stop()
    (n1, c1, _), (n2, c2, rate) = runs
    per_row_ms = (c2 - c1) / (n2 - n1) * 1000
    print(f"overhead: driver CPU {c1:.2f} s for {n1} rows, {c2:.2f} s for {n2} rows -> "
          f"{per_row_ms:.3f} ms per row (goal <= 0.2 ms); {rate:.0f} rows/s against an instant mock")


def bench_rss(tmp: str, rows: int, concurrency: int) -> None:
    proc, url = start_mock("--mock-time-scale", "0")
    try:
        inp, out = os.path.join(tmp, "rss.jsonl"), os.path.join(tmp, "rss.out.jsonl")
        write_input(inp, rows, 1)
        size = os.path.getsize(inp)
        summary, cpu, rss, wall = drive(url, inp, out, concurrency)
        print(f"memory: {rows} rows ({size / 1e6:.0f} MB input) in {wall:.0f} s ({summary['rows_per_s']:.0f} "
              f"rows/s): driver peak RSS {rss / 1e6:.0f} MB (goal < 500 MB), CPU {cpu / rows * 1000:.3f} ms/row")
        t0 = time.monotonic()
        check = subprocess.run([PY, "-m", "hpcserve.batch", "check", "--input", inp, "--output", out])
        print(f"  check on the finished output: exit {check.returncode} in {time.monotonic() - t0:.1f} s")
        summary, cpu, rss, wall = drive(url, inp, out, concurrency)  # a resume with nothing left to do
        print(f"  rerun with all {summary['already_done']} rows done: {wall:.1f} s, peak RSS {rss / 1e6:.0f} MB")
        t0 = time.monotonic()
        merge = subprocess.Popen([PY, "-m", "hpcserve.batch", "merge", "--input", inp, "--output",
                                  out + ".merged", "--parts", out], stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(merge.pid, 0)
        print(f"  merge into input order: exit {os.waitstatus_to_exitcode(status)} in "
              f"{time.monotonic() - t0:.1f} s, peak RSS {usage.ru_maxrss / 1e3:.0f} MB")
    finally:
        proc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cap-rows", type=int, default=8000)
    p.add_argument("--step-ms", type=float, default=20.0)
    p.add_argument("--max-running", type=int, default=64)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rss-rows", type=int, default=1_000_000)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-capacity", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hpcserve-bench-batch-") as tmp:
        if not a.skip_capacity:
            bench_capacity(tmp, a.cap_rows, a.step_ms, a.max_running, a.tokens)
        if not a.skip_overhead:
            bench_overhead(tmp, a.small, a.large, a.concurrency)
        if not a.skip_rss:
            bench_rss(tmp, a.rss_rows, a.concurrency)


if __name__ == "__main__":
    main()
