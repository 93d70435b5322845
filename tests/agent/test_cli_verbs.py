"""The verbs as a careful user meets them (issue 17 findings 5, 7, 9): one CLI framework with help on every
option, validate checks every file, a bad --set value is blamed on --set, tables print full values when
piped, render shows what submit submits (a sweep: its one job script; --json: one document), and Slurm
problems are one line naming the real fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer

from proc_util import REPO

from hpcserve.api import load_plans, sweep_allocation, sweep_script
from hpcserve.cli.main import app

PY = sys.executable
DEMO = str(REPO / "recipes/local-demo.yaml")
SWEEP = str(REPO / "recipes/sweep-chunked-prefill.yaml")
# internal process entry points (started by agents, not typed by users): their own argparse flags pass through
PROCESS_ENTRY_POINTS = {"node", "mock-engine", "router"}


def hs(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hpcserve", *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=cwd)


def test_every_verb_is_typer_and_every_option_has_help():
    group = typer.main.get_command(app)
    passthrough = {n for n, c in group.commands.items() if c.context_settings.get("ignore_unknown_options")}
    assert passthrough == PROCESS_ENTRY_POINTS
    missing = [f"{n} {p.name}" for n, c in group.commands.items() for p in c.params
               if p.param_type_name == "option" and not (p.help or "").strip()]
    assert missing == []
    assert all((c.help or "").strip() for c in group.commands.values())


def test_validate_checks_every_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(DEMO).read_text().replace("prefill: {replicas: 1, tp: 1}", "prefill: {replicas: 1, tpp: 1}"))
    res = hs("validate", DEMO, str(bad), SWEEP)
    assert res.returncode == 2
    assert res.stdout.splitlines() == [f"ok {DEMO}", f"ok {SWEEP} (4 sweep points)"]
    assert [x for x in res.stderr.splitlines() if x.startswith("error")] == \
        [f"error: {bad}:6 prefill.tpp: unknown key (did you mean 'tp'?)"]


def test_bad_set_value_is_blamed_on_set():
    res = hs("validate", DEMO, "--set", "router.port=99999999")
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: --set router.port=99999999: port 99999999 is outside 1024-65535; "
                                  "pick one in that range")


def test_render_sweep_json_is_one_document_and_o_writes_the_submitted_script(tmp_path):
    res = hs("render", SWEEP, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["one_allocation"] is True and [p["dir"] for p in doc["points"]] == [f"point-0{i}" for i in range(4)]
    assert all(p["plan"]["name"] == "sweep-70b" for p in doc["points"])
    res = hs("render", SWEEP, "-o", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith(f"wrote {tmp_path / 'out' / 'job.sbatch'}")
    script = (tmp_path / "out" / "job.sbatch").read_text()
    plans = load_plans(SWEEP)
    dirs = [(tmp_path / "out" / f"point-0{i}", p) for i, (_, p) in enumerate(plans)]
    assert script == sweep_script(sweep_allocation([p for _, p in plans]), dirs)
    assert "--sweep" in script and "#SBATCH --nodes=3" in script
    printed = hs("render", SWEEP).stdout
    assert script in printed      # the dry run prints the same job script


def _shim(tmp_path: Path, name: str) -> dict:
    """PATH with a `name` that records being called and fails."""
    d = tmp_path / "shim"
    d.mkdir(exist_ok=True)
    (d / name).write_text(f"#!/bin/sh\ntouch {tmp_path}/{name}.called\nexit 1\n")
    (d / name).chmod(0o755)
    return {**os.environ, "PATH": f"{d}:{os.environ['PATH']}"}


def test_submit_of_a_local_recipe_never_calls_sbatch(tmp_path):
    res = hs("submit", DEMO, "--run-dir", str(tmp_path / "run"), env=_shim(tmp_path, "sbatch"))
    assert res.returncode == 2
    assert res.stderr.strip() == (f"error: {DEMO} runs on the local backend (cluster.backend); run it with "
                                  f"hpcserve up, or submit it with --cluster slurm/clusters/NAME.yaml")
    assert not (tmp_path / "sbatch.called").exists() and not (tmp_path / "run").exists()


def test_no_slurm_configuration_is_one_line_naming_slurm_conf(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env["PATH"] = f"{env['PATH']}:/usr/sbin:/sbin"
    if os.path.exists("/etc/slurm/slurm.conf"):   # a machine with a system Slurm: point at a missing file
        env["SLURM_CONF"] = str(tmp_path / "missing.conf")
    res = hs("status", "12345", env=env)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.strip().endswith("slurm.conf") and "SLURM_CONF" in res.stderr
    res = hs("submit", DEMO, "--cluster", str(REPO / "slurm/clusters/local.yaml"), "--run-dir",
             str(tmp_path / "run"), env=env)
    errors = [line for line in res.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert res.returncode == 1 and len(errors) == 1, res.stderr
    assert "SLURM_CONF" in res.stderr and "cluster profile" not in res.stderr


def test_status_table_prints_full_values_when_piped(deployment):
    run, _ = deployment()
    res = hs("status", str(run.run_dir))
    assert res.returncode == 0, res.stderr
    assert run.endpoint["url"] in res.stdout and str(run.run_dir) in res.stdout and "…" not in res.stdout


def test_usage_mistakes_are_one_line_and_exit_2():
    for args, want in ((["batch", DEMO], "error: Missing option '--input'. (see hpcserve batch --help)"),
                       (["bench"], "error: Missing argument 'URL|RUN_DIR'. (see hpcserve bench --help)"),
                       (["nosuchverb"], "error: No such command 'nosuchverb'. (see hpcserve --help)")):
        res = hs(*args)
        assert res.returncode == 2 and res.stdout == "" and res.stderr.strip() == want, (args, res.stderr)
    res = hs("bench", "--help")
    assert res.returncode == 0 and "--concurrency" in res.stdout
