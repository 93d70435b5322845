"""``python -m hpcserve.batch`` as a user meets it: one-line errors, exit codes, the progress bar on a
terminal, progress in a real Redis, SIGTERM."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time

import orjson
import pytest

from proc_util import RedisProcess
from test_batch_mock import start_mock

PY = sys.executable


def batch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hpcserve.batch", *args], capture_output=True, timeout=timeout)


def write_rows(path, n: int) -> None:
    path.write_bytes(b"".join(orjson.dumps({"id": f"q{i}", "prompt": f"p{i}", "max_tokens": 3}) + b"\n"
                              for i in range(n)))


@pytest.mark.parametrize("args, message", [
    (["--router", "http://127.0.0.1:1", "--input", "nope.jsonl", "--output", "o.jsonl"],
     "error: batch input nope.jsonl does not exist"),
    (["--router", "ftp://x", "--input", "in.jsonl", "--output", "o.jsonl"], "must look like http://HOST:PORT"),
    (["--router", "http://h:1", "--input", "in.jsonl", "--output", "o.jsonl", "--redis-url", "redis://h"],
     "--redis-url and --run-id go together"),
    (["--router", "http://h:1", "--input", "in.jsonl", "--output", "o.jsonl", "--shard-index", "3",
      "--num-shards", "3"], "shard index 3 is outside 0..2"),
    (["--input", "in.jsonl"], "the following arguments are required: --output, --router"),
    (["merge", "--input", "in.jsonl", "--output", "o.jsonl", "--num-shards", "2"],
     "missing shard output o.jsonl.part-0000-of-0002"),
])
def test_usage_mistakes_are_one_line_and_exit_2(chdir_tmp, args, message):
    write_rows(chdir_tmp / "in.jsonl", 3)
    res = batch(*args)
    err = res.stderr.decode().strip()
    assert res.returncode == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (chdir_tmp / "o.jsonl").exists()


def test_terminal_progress_bar_and_redis_status(tmp_path):
    import redis

    rproc = RedisProcess(tmp_path).start()
    mock, url = start_mock("--mock-time-scale", "0")
    master, slave = pty.openpty()
    try:
        client = redis.Redis.from_url(rproc.url, socket_timeout=5)
        inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        write_rows(inp, 300)
        proc = subprocess.Popen([PY, "-m", "hpcserve.batch", "--router", url, "--input", str(inp), "--output",
                                 str(out), "--redis-url", rproc.url, "--run-id", "cli"],
                                stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        slave = -1
        screen = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        proc.wait(timeout=30)
        assert proc.returncode == 0
        assert b"300/300" in screen and b"rows/s" in screen  # rich drew the bar on the terminal
        fields = {k.decode(): v.decode() for k, v in client.hgetall("hpcserve:cli:status").items()}
        assert (fields["batch_state"], fields["batch_done"], fields["batch_total"]) == ("complete", "300", "300")
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
        mock.stop()
        rproc.kill()


def test_sigterm_stops_like_sigusr2(tmp_path):
    slow, url = start_mock("--mock-time-scale", "1", "--mock-decode-step-ms", "50", "--mock-max-running", "4")
    try:
        inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        write_rows(inp, 400)
        proc = subprocess.Popen([PY, "-m", "hpcserve.batch", "--router", url, "--input", str(inp), "--output",
                                 str(out), "--concurrency", "4", "--stop-grace", "5"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while (not out.exists() or out.stat().st_size == 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        slow.stop()
    assert proc.returncode == 3, stderr.decode()
    summary = orjson.loads(stdout.splitlines()[-1])
    lines = out.read_bytes().splitlines()
    assert summary["stopped"] and summary["abandoned"] == 0 and len(lines) == summary["ok"] < 400
    assert b"SIGTERM: stopping" in stderr
    res = batch("check", "--input", str(inp), "--output", str(out))
    assert res.returncode == 3
