"""The README's tour, run for real: every `$ ` command of its console blocks is executed here as written (only
the port, the run directory and the Slurm port range are moved so that the test never collides with another
deployment), and what the README shows is checked against what the command printed."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from proc_util import free_port_block
from slurm_util import requires_slurm

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent


def console_commands() -> list[tuple[str, list[str]]]:
    """(command, the lines the README shows after it) for every `$ ` line of a console block."""
    out = []
    for block in re.findall(r"```console\n(.*?)```", README, re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            cmd, *shown = chunk.rstrip("\n").split("\n")
            out.append((cmd, [s for s in shown if s.strip()]))
    return out


def readme_command(prefix: str) -> tuple[str, list[str]]:
    [found] = [(c, s) for c, s in console_commands() if c.startswith(prefix)]
    return found


def sh(cmd: str, cwd: Path, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "COLUMNS": "200", **(env or {})})


def workdir(tmp_path: Path) -> Path:
    """A folder that looks like the checkout (recipes/, slurm/) without writing into it."""
    for name in ("recipes", "slurm"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


def test_readme_commands_are_the_ones_this_test_runs():
    cmds = [c.split()[1] if c.startswith("hpcserve") else c.split()[0] for c, _ in console_commands()]
    assert cmds == ["up", "curl", "submit", "status", "cancel", "batch", "bench", "validate"]


def test_readme_tour(tmp_path):
    wd = workdir(tmp_path)
    base = free_port_block()
    port = base + 119
    up_cmd, up_shown = readme_command("hpcserve up ")
    log = open(tmp_path / "up.out", "w")
    proc = subprocess.Popen(shlex.split(up_cmd) + ["--set", f"ports.base={base}", "--set", f"router.port={port}"],
                            cwd=wd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    try:
        deadline = time.monotonic() + 90
        while "endpoint" not in (tmp_path / "up.out").read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "up.out").read_text()
            time.sleep(0.2)
        printed = (tmp_path / "up.out").read_text().splitlines()
        assert [line.split()[0] for line in printed[:3]] == [line.split()[0] for line in up_shown[:3]]
        assert f"http://127.0.0.1:{port}" in printed[1]

        curl, curl_shown = readme_command("curl ")
        res = sh(curl.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), wd)
        body = json.loads(res.stdout)
        assert set(body) == {"text", "output_ids", "meta_info"} and '"text"' in curl_shown[0]
        assert body["meta_info"]["completion_tokens"] == 8 == len(body["output_ids"])

        [py] = re.findall(r"```python\n(.*?)```", README, re.S)
        res = subprocess.run([sys.executable, "-c", py.replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip(), res.stderr

        bench, _ = readme_command("hpcserve bench ")
        res = sh(bench.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), wd)
        assert res.returncode == 0, res.stdout + res.stderr
        levels = re.findall(r"^\W*(c=\d+)\W.*\b(ok)\b", res.stdout, re.M)
        warned = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("WARNING: ")]
        assert [w.split(":")[1].split()[:3] for w in warned] == [["the", "engine", "is"], ["these", "numbers", "are"]]
        assert [lv for lv, _ in levels] == ["c=1", "c=4"], res.stdout
        assert sorted(p.name for p in (wd / "bench").glob("level_c*.json")) == ["level_c0001.json", "level_c0004.json"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        log.close()

    validate, shown = readme_command("hpcserve validate ")
    demo = (REPO / "recipes/local-demo.yaml").read_text().splitlines()
    bad = [line.replace("prefill: {replicas: 1, tp: 1}", "prefill: {replicas: 1, tpp: 1}") for line in demo]
    assert bad.index("prefill: {replicas: 1, tpp: 1}") == 5       # line 6, as the README shows
    (wd / "bad.yaml").write_text("\n".join(bad) + "\n")
    res = sh(validate, wd)
    assert res.returncode == 2 and (res.stdout + res.stderr).strip() == shown[0]


def test_readme_batch_command(tmp_path):
    wd = workdir(tmp_path)
    base = free_port_block()
    cmd, shown = readme_command("hpcserve batch ")
    rows = [{"id": f"q{i}", "prompt": f"question {i}", "sampling_params": {"max_new_tokens": 4}} for i in range(40)]
    (wd / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = sh(f"{cmd} --set ports.base={base} --set router.port={base + 119}", wd)
    assert res.returncode == 0, res.stdout + res.stderr
    out_shown = [line for line in shown if not line.startswith("batch:")]
    assert [line.split()[0] for line in out_shown] == [line.split()[0] for line in res.stdout.strip().splitlines()[-2:]]
    assert res.stdout.strip().splitlines()[-1].startswith("complete: 40 rows (0 errors) in input order in ")
    # the progress lines go to stderr: the last one as the README shows it, up to the rate
    assert shown[2].split(",")[:2] == res.stderr.strip().splitlines()[-1].split(",")[:2] == ["batch: 40/40 rows done", " 0 failed"]
    ids = [json.loads(line)["id"] for line in (wd / "results.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(r["id"] for r in rows)


@requires_slurm
def test_readme_slurm_commands(tmp_path):
    wd = workdir(tmp_path)
    base = free_port_block()
    submit, submit_shown = readme_command("hpcserve submit ")
    run_dir = tmp_path / "srun"
    res = sh(f"{submit} --run-dir {run_dir} --set ports.base={base} --set router.port={base + 119}", wd, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    printed = res.stdout.strip().splitlines()
    assert [line.split()[0] for line in printed] == [line.split()[0] for line in submit_shown]
    shown_dir = submit_shown[0].split()[-1]
    status, status_shown = readme_command("hpcserve status ")
    res = sh(status.replace(shown_dir, str(run_dir)), wd)
    assert res.returncode == 0 and " ready " in res.stdout and str(run_dir) in res.stdout, res.stdout
    assert " ready " in status_shown[1]
    cancel, cancel_shown = readme_command("hpcserve cancel ")
    res = sh(cancel.replace(shown_dir, str(run_dir)), wd, timeout=200)
    job = printed[0].split()[1]
    assert res.stdout.strip() == cancel_shown[0].replace("19", job, 1) == f"job {job}: COMPLETED"
