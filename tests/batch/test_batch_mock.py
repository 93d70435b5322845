"""The batch driver as a subprocess against the mock engine: SIGKILL at random points then resume,
malformed rows, 3 shards merged, SIGUSR2 graceful stop. The mock runs with --mock-time-scale 0 (instant)
except where a test needs rows in flight."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import orjson
import pytest

from hpcserve.mock.launch import MockProcess

PY = sys.executable
ROWS = 2000
MALFORMED = {7, 250, 1999}  # 1-based line numbers of broken lines


def start_mock(*extra: str) -> tuple[MockProcess, str]:
    mock = MockProcess.start(["--model-path", "m", *extra], wait="ready")
    return mock, mock.url


@pytest.fixture(scope="module")
def mock_url():
    proc, url = start_mock("--mock-time-scale", "0")
    yield url
    proc.stop()


def make_input(path, rows: int = ROWS) -> None:
    rng = random.Random(7)
    lines = []
    for n in range(1, rows + 1):
        if n in MALFORMED:
            lines.append(b'{"id": "broken", "prompt": ' if n != 250 else b'{"id": "x%d", "promptt": "a"}' % n)
            continue
        kind = n % 3
        tokens = rng.randint(1, 12)
        if kind == 0:
            row = {"id": f"r{n}", "prompt": f"prompt number {n} " * rng.randint(1, 4), "max_tokens": tokens}
        elif kind == 1:
            row = {"id": f"r{n}", "messages": [{"role": "user", "content": f"chat {n}"}],
                   "max_tokens": tokens, "temperature": 0}
        else:
            row = {"id": f"r{n}", "input_ids": [n % 250 + 1, 17, 42], "sampling_params": {"max_new_tokens": tokens}}
        lines.append(orjson.dumps(row))
    path.write_bytes(b"\n".join(lines) + b"\n")


def batch_cmd(inp, out, url, *extra: str) -> list[str]:
    return [PY, "-m", "hpcserve.batch", "--router", url, "--input", str(inp), "--output", str(out),
            "--concurrency", "32", "--max-retries", "2", "--request-timeout", "30", *extra]


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=timeout)


def rows_by_id(path) -> dict[str, dict]:
    """Output rows keyed by id, latency dropped; fails if an id appears twice."""
    out: dict[str, dict] = {}
    for line in open(path, "rb").read().splitlines():
        row = orjson.loads(line)
        key = str(row["id"])
        assert key not in out, f"id {key} written twice in {path}"
        row.pop("latency_s", None)
        out[key] = row
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, mock_url):
    d = tmp_path_factory.mktemp("baseline")
    inp, out = d / "in.jsonl", d / "out.jsonl"
    make_input(inp)
    res = run(batch_cmd(inp, out, mock_url))
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    summary = orjson.loads(res.stdout.splitlines()[-1])
    return inp, rows_by_id(out), summary


def test_uninterrupted_run_answers_every_row_and_malformed_rows_are_errors(baseline):
    inp, rows, summary = baseline
    assert len(rows) == ROWS and summary["complete"] and summary["total"] == ROWS
    assert (summary["ok"], summary["failed"]) == (ROWS - len(MALFORMED), len(MALFORMED))
    assert rows["7"]["error"].startswith("line 7: not valid JSON")
    assert rows["x250"]["error"] == "line 250: needs exactly one of 'prompt', 'messages', 'input_ids' (found none)"
    assert rows["1999"]["error"].startswith("line 1999:")
    ok = [r for r in rows.values() if "error" not in r]
    assert all(r["text"] and r["usage"]["completion_tokens"] >= 1 for r in ok)
    assert rows["r3"]["usage"]["completion_tokens"] <= 12


def _line_count(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_at_rows(cmd: list[str], out, target: int) -> int | None:
    """Start the driver, SIGKILL it once the output holds ``target`` lines; None if it finished first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and _line_count(out) < target and time.monotonic() < deadline:
        time.sleep(0.002)
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    return None


def test_sigkill_at_random_points_then_resume_gives_every_id_once(tmp_path, baseline, mock_url):
    inp, expected, _ = baseline
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    kills = mid_batch = 0
    points: list[tuple[int, int]] = []  # output lines after the first and the second kill
    for attempt in range(10):
        out = tmp_path / f"out{attempt}.jsonl"
        cmd = batch_cmd(inp, out, mock_url, "--checkpoint-rows", str(rng.choice([1, 50, 1000])))
        # two kills per run: after a random number of rows, then at a random time after the restart
        # targets well before the end: the writer appends rows in bursts, so a target near ROWS can be overtaken
        if _kill_at_rows(cmd, out, rng.randint(1, ROWS * 3 // 4)) is None:
            kills += 1
            mid_batch += 0 < _line_count(out) < ROWS
        before = _line_count(out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        points.append((before, _line_count(out)))
        if attempt % 2:  # what a kill in the middle of a write leaves behind
            with open(out, "ab") as f:
                f.write(b'{"id": "r1", "text": "half a ro')
        res = run(cmd)
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        summary = orjson.loads(res.stdout.splitlines()[-1])
        assert summary["complete"] and summary["already_done"] >= min(before, 1)
        assert rows_by_id(out) == expected, f"attempt {attempt}: output differs from the uninterrupted run"
        if attempt % 2:
            assert summary["repaired_bytes"] == len(b'{"id": "r1", "text": "half a ro')
    # kills landed while rows were being answered, not only before the first or after the last (how many
    # depends on scheduling on a busy machine, so the bar is half of the first kills)
    assert kills >= 10 and mid_batch >= 5, points


def test_three_shards_merged_equal_one_shard_merged(tmp_path, baseline, mock_url):
    inp, expected, _ = baseline
    out = tmp_path / "out.jsonl"
    procs = [subprocess.Popen(batch_cmd(inp, out, mock_url, "--shard-index", str(i), "--num-shards", "3"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr.decode()[-2000:]
    parts = sorted(os.listdir(tmp_path))
    assert parts == [f"out.jsonl.part-000{i}-of-0003" for i in range(3)]
    check = [PY, "-m", "hpcserve.batch", "check", "--input", str(inp), "--output", str(out),
             "--num-shards", "3", "--shard-index", "1"]
    assert run(check).returncode == 0
    res = run([PY, "-m", "hpcserve.batch", "merge", "--input", str(inp), "--output", str(out),
               "--num-shards", "3"])
    assert res.returncode == 0, res.stderr.decode()
    one = tmp_path / "one.jsonl"
    assert run(batch_cmd(inp, one, mock_url)).returncode == 0
    assert run([PY, "-m", "hpcserve.batch", "merge", "--input", str(inp), "--output", str(one),
                "--parts", str(one)]).returncode == 0
    merged = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    single = [orjson.loads(x) for x in one.read_bytes().splitlines()]
    for r in merged + single:
        r.pop("latency_s", None)
    assert merged == single and len(merged) == ROWS
    assert [str(r["id"]) for r in merged[:8]] == ["r1", "r2", "r3", "r4", "r5", "r6", "7", "r8"]
    assert {str(r["id"]): r for r in merged} == expected


def test_sigusr2_stops_gracefully_and_the_output_resumes(tmp_path, baseline, mock_url):
    inp, expected, _ = baseline
    out = tmp_path / "out.jsonl"
    slow, slow_url = start_mock("--mock-time-scale", "1", "--mock-decode-step-ms", "40",
                                "--mock-max-running", "8")
    try:
        cmd = batch_cmd(inp, out, slow_url, "--concurrency", "8", "--stop-grace", "5")
        assert run([PY, "-m", "hpcserve.batch", "check", "--input", str(inp), "--output", str(out)]
                   ).returncode == 3
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while _line_count(out) < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGUSR2)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        slow.stop()
    assert proc.returncode == 3, stderr.decode()[-2000:]
    summary = orjson.loads(stdout.splitlines()[-1])
    assert summary["stopped"] and not summary["complete"] and summary["abandoned"] == 0  # grace sufficed
    assert summary["unsent"] > 0 and summary["done"] + summary["unsent"] < ROWS
    partial = rows_by_id(out)
    assert 20 <= len(partial) < ROWS and len(partial) == summary["ok"] + summary["failed"]
    assert b"stopped, resumable" in stderr
    assert all(expected[k] == v for k, v in partial.items())
    res = run(batch_cmd(inp, out, mock_url))
    assert res.returncode == 0 and rows_by_id(out) == expected
