"""Container runtimes: what runs where for every example recipe, the runtime registry against the schema,
the refusal of an image without a runtime, and the pyxis signal relay run for real in a shell."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from hpcserve.api import load_plans
from hpcserve.containers import EngineLaunch, get_runtime, runtime_names
from hpcserve.containers.base import engine_command, shell_wrapper
from hpcserve.recipe.schema import ClusterSpec
from hpcserve.render import render_sbatch

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
RUN_DIR = "/shared/runs/r1"


def test_schema_names_every_registered_runtime():
    [names] = typing.get_args(ClusterSpec.model_fields["container_runtime"].annotation),
    assert sorted(names) == runtime_names()


def _inside_image(cmd: list[str], image: str) -> list[str]:
    """The part of a runtime command that runs inside the image (after the image argument)."""
    i = cmd.index(image) if image in cmd else next(i for i, a in enumerate(cmd) if a.startswith("--container-image="))
    rest = cmd[i + 1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    while rest and rest[0].startswith("--"):   # srun's remaining options (pyxis)
        rest = rest[1:]
    return rest


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_no_hpcserve_code_runs_inside_the_engine_image(recipe):
    """Rendered script and plan of every example with its own profile: the agents' srun is not wrapped in
    any image; only engine processes go through the runtime; inside the image runs the engine command alone."""
    for _, plan in load_plans(recipe, python="/home/u/venv/bin/python"):
        script = render_sbatch(plan)
        agents = [line for line in script.splitlines() if "-m hpcserve node" in line]
        assert agents and all(line.strip().startswith("/home/u/venv/bin/python -m hpcserve node") for line in agents)
        for word in ("--container-image", "apptainer exec", "singularity exec", "ch-run", "enroot"):
            assert word not in script.replace(f"inside {plan.slurm.container}", ""), word
        image = plan.slurm.container
        for p in plan.processes:
            if p.kind != "engine":
                assert p.argv[0] in (plan.python, "redis-server") or p.kind == "redis", p.name
                continue
            cmd, _ = engine_command(plan.slurm, p.name, p.argv, p.env, p.node, RUN_DIR, None, check=False)
            if image is None:
                assert cmd == p.argv
                continue
            inside = _inside_image(cmd, image)
            assert inside[-len(p.argv):] == p.argv          # the engine command, unchanged, inside the image
            assert not any("hpcserve" in a for a in p.argv), p.argv
            assert all("hpcserve" not in a for a in inside if a != "hpcserve-engine"), inside


def test_pyxis_engine_is_an_overlapping_step_in_the_image_with_binds():
    [(_, plan)] = load_plans(REPO / "recipes/llama70b-1p1d.yaml", python="python3")
    eng = next(p for p in plan.processes if p.kind == "engine")
    cmd, sig = engine_command(plan.slurm, eng.name, eng.argv, {**eng.env, "CUDA_VISIBLE_DEVICES": "0,1"},
                              eng.node, RUN_DIR, "gpu-node-7", check=False)
    assert cmd[:2] == ["srun", "--overlap"] and "--nodelist=gpu-node-7" in cmd
    assert f"--container-image={plan.slurm.container}" in cmd
    mounts = next(a for a in cmd if a.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    # the run dir is bound; the model (under /lustre) comes with the profile's /lustre mount
    assert mounts == [f"{RUN_DIR}:{RUN_DIR}", "/lustre:/lustre"]
    assert f"--container-workdir={RUN_DIR}" in cmd
    assert sig == signal.SIGUSR1                       # srun kills a step on SIGTERM; USR1 is relayed
    assert "export CUDA_VISIBLE_DEVICES=0,1" in cmd[cmd.index("-c") + 1]
    ro = get_runtime("pyxis").command(EngineLaunch(["x"], image="i.sqsh", binds=["/m:/models:ro"], workdir="/"))
    assert "--container-mounts=/m:/models:ro" in ro              # mount options are kept


def test_apptainer_and_charliecloud_commands():
    launch = EngineLaunch(["python3", "-m", "sglang.launch_server"], image="/img/sglang.sif",
                          binds=["/lustre:/lustre:ro", "/scratch"], workdir=RUN_DIR, env={"USER": "u"})
    assert get_runtime("apptainer").command(launch) == [
        "apptainer", "exec", "--nv", "--bind", "/lustre:/lustre:ro", "--bind", "/scratch:/scratch", "--pwd", RUN_DIR,
        "/img/sglang.sif", "python3", "-m", "sglang.launch_server"]
    assert get_runtime("charliecloud").command(launch) == [
        "ch-run", "--bind=/lustre:/lustre", "--bind=/scratch:/scratch", f"--cd={RUN_DIR}", "/img/sglang.sif", "--",
        "python3", "-m", "sglang.launch_server"]
    bare = EngineLaunch(["python3", "-m", "sglang.launch_server"], setup=["module load cuda"])
    assert get_runtime("none").command(bare) == ["/bin/sh", "-c", 'module load cuda\nexec "$@"', "hpcserve-engine",
                                                 "python3", "-m", "sglang.launch_server"]


def test_image_with_runtime_none_is_refused_in_one_line():
    res = subprocess.run([sys.executable, "-m", "hpcserve", "validate", str(REPO / "recipes/llama70b-1p1d.yaml"),
                          "--set", "cluster.container_runtime=none"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "engine.container" in lines[0] and "cluster.container_runtime" in lines[0]
    assert "Traceback" not in res.stderr


TRAP = """
import signal, sys, time
def on_term(sig, frame):
    print("engine got SIGTERM, drained", flush=True)
    sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
print("engine up", flush=True)
time.sleep(60)
sys.exit(3)
"""


def test_relay_shell_turns_the_group_signal_into_sigterm_and_keeps_the_exit_code(tmp_path):
    """srun forwards USR1 to the step's whole process group: the engine must not die of it, but get
    SIGTERM from the shell, and the step must exit with the engine's own code."""
    script = tmp_path / "engine.py"
    script.write_text(TRAP)
    argv = shell_wrapper(EngineLaunch([sys.executable, str(script)]), relay="USR1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "engine up"
        time.sleep(0.2)   # the shell sets its trap right after starting the engine
        os.killpg(proc.pid, signal.SIGUSR1)
        assert proc.stdout.readline().strip() == "engine got SIGTERM, drained"
        assert proc.wait(20) == 7
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_charliecloud_names_what_keeps_the_engine_from_starting(tmp_path):
    ch = get_runtime("charliecloud")
    missing = EngineLaunch(["python3"], image=str(tmp_path / "nope"), workdir="/")
    assert ch.problem(missing) == (f"image {tmp_path / 'nope'} does not exist on this node ({os.uname().nodename}); "
                                   f"fix engine.container")
    img = tmp_path / "img"
    (img / "lustre").mkdir(parents=True)
    ok = EngineLaunch(["python3"], image=str(img), binds=["/lustre:/lustre", "/tmp/run:/tmp/run"], workdir="/")
    assert ch.problem(ok) is None
    bad = EngineLaunch(["python3"], image=str(img), binds=["/scratch/models:/models"], workdir="/")
    assert ch.problem(bad) == (f"bind destination /models does not exist in image {img}; create it there "
                               f"(mkdir -p {img}/models) or change cluster.container_mounts")
    assert get_runtime("none").problem(missing) is None


def test_pyxis_image_on_the_local_backend_is_refused_in_one_line():
    res = subprocess.run([sys.executable, "-m", "hpcserve", "validate", str(REPO / "recipes/llama70b-1p1d.yaml"),
                          "--set", "cluster.backend=local"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    [line] = res.stderr.strip().splitlines()
    assert "pyxis starts engines as Slurm job steps" in line and "charliecloud" in line


def test_agent_refuses_to_start_an_engine_whose_image_is_missing(tmp_path):
    from types import SimpleNamespace

    from hpcserve.errors import HpcserveError
    settings = SimpleNamespace(container=str(tmp_path / "gone.sif"), container_runtime="charliecloud",
                               container_mounts=[], container_setup=[])
    with pytest.raises(HpcserveError, match=rf"^decode-0: image {tmp_path}/gone.sif does not exist on this node"):
        engine_command(settings, "decode-0", ["python3", "-m", "sglang.launch_server"], {}, 0, str(tmp_path))
