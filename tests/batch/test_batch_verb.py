"""`hpcserve batch` as a user meets it on the local backend: progress while it runs (plain lines when piped,
a rich bar on a terminal), a summary with counts, failed rows said loudly (--strict: exit 1), the output in
input order for an unsharded run, and `batch-merge` putting a single output in input order."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from proc_util import free_port_block

PY = sys.executable


def recipe(tmp_path: Path) -> Path:
    base = free_port_block()
    p = tmp_path / "r.yaml"
    p.write_text(f"""\
name: verb-batch
model: {{path: demo/m, served_name: demo}}
engine: {{kind: mock, mock: {{time-scale: 1, decode-step-ms: 5, max-running: 16}}}}
cluster: {{backend: local, gpus_per_node: 0, address: 127.0.0.1}}
workers: {{replicas: 1, tp: 1}}
router: {{port: {base + 119}}}
ports: {{base: {base}}}
timeouts: {{startup: 60}}
""")
    return p


def rows(tmp_path: Path, n: int = 60, bad: int = 0) -> Path:
    """Later rows ask for fewer tokens (they finish first); ``bad`` rows have no prompt (error rows)."""
    lines = [json.dumps({"id": f"q{i}", "prompt": f"p{i}", "max_tokens": 1 + (n - i) % 9}) for i in range(n)]
    lines += [json.dumps({"id": f"bad{i}", "max_tokens": 2}) for i in range(bad)]
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def verb(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hpcserve", "batch", str(recipe(tmp_path)), "--input", str(tmp_path / "in.jsonl"),
                           "--output", str(tmp_path / "out.jsonl"), "--concurrency", "16",
                           "--run-dir", str(tmp_path / "run"), *extra],
                          capture_output=True, text=True, timeout=180)


def test_piped_progress_lines_summary_and_input_order(tmp_path):
    rows(tmp_path, 60)
    res = verb(tmp_path)
    assert res.returncode == 0, res.stderr
    progress = [x for x in res.stderr.splitlines() if x.startswith("batch: ")]
    assert progress and progress[-1].startswith("batch: 60/60 rows done, 0 failed, ") and "ETA" in progress[-1]
    assert res.stdout.splitlines()[-1].startswith(f"complete: 60 rows (0 errors) in input order in "
                                                  f"{tmp_path / 'out.jsonl'} (")
    ids = [json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == [f"q{i}" for i in range(60)]
    assert "warning" not in res.stderr


def test_failed_rows_are_said_and_strict_exits_1(tmp_path):
    rows(tmp_path, 20, bad=3)
    res = verb(tmp_path)
    assert res.returncode == 0, res.stderr
    assert "complete: 23 rows (3 errors)" in res.stdout
    assert "warning: 3 of 23 rows failed (their output rows carry an \"error\" field: " in res.stderr
    res = verb(tmp_path, "--strict")   # complete already: nothing starts, the counts are the same
    assert res.returncode == 1 and "nothing started" in res.stdout and "warning: 3 of 23 rows failed" in res.stderr


def test_terminal_shows_rich_progress(tmp_path):
    rows(tmp_path, 200)
    master, slave = pty.openpty()
    p = subprocess.Popen([PY, "-m", "hpcserve", "batch", str(recipe(tmp_path)), "--input",
                          str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                          "--run-dir", str(tmp_path / "run"), "--concurrency", "2"],
                         stdin=slave, stdout=slave, stderr=slave, env={**os.environ, "COLUMNS": "160"})
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
            elif p.poll() is not None:
                break
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        os.close(master)
    text = seen.decode(errors="replace")
    assert p.returncode == 0, text[-2000:]
    assert "200/200" in text and "failed 0" in text and "rows/s" in text and "ETA" in text
    assert "\r" in text or "\x1b[" in text      # redrawn in place, not a line per update


def test_batch_merge_orders_a_single_output(tmp_path):
    inp = rows(tmp_path, 5)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"id": f"q{i}", "text": str(i)}) + "\n" for i in (3, 0, 4, 1, 2)))
    res = subprocess.run([PY, "-m", "hpcserve", "batch-merge", "--input", str(inp), "--output", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["0", "1", "2", "3", "4"]
    assert res.stdout.strip() == f"merged 5 rows (0 errors, 0 missing) into {out}"
