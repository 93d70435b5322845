"""A real container runtime on the real local Slurm: Charliecloud's ch-run (Debian's charliecloud-runtime).

The test builds an image directory that does not contain hpcserve (a root filesystem made of hard links to
this host's /usr plus a marker file). The mock engine and its Python are bind-mounted in as the stand-in
for SGLang; the node agent, Redis and router run outside the image. Shown: the agent is not inside the image
and the engine is; setup lines run inside; readiness, a restart of a killed engine, drain (the engine's own
log says the stop signal arrived) and cancel work through the runtime; a SIGKILLed agent leaves no engine.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from proc_util import free_port_block, pid_alive, wait_for
from slurm_util import requires_slurm

from hpcserve.api import cancel, submit, wait_ready
from hpcserve.errors import BackendError

REPO = Path(__file__).resolve().parents[2]
MARKER = "etc/engine-image-marker"
pytestmark = [pytest.mark.slurm, requires_slurm,
              pytest.mark.skipif(shutil.which("ch-run") is None and os.environ.get("HPCSERVE_REQUIRE_SLURM") != "1",
                                 reason="no ch-run: apt-get install charliecloud-runtime (tests/run.sh does)")]


USR_BOUND: list[Path] = []   # set when /usr could not be hard-linked into the image (another filesystem)


def _stand_in_mounts() -> list[str]:
    """What the mock engine needs from outside the image: the repository (hpcserve.mock), the virtual
    environment and the Python it was made from."""
    out: list[str] = []
    for p in (REPO, Path(sys.prefix), Path(sys.base_prefix), *USR_BOUND):
        p = p.resolve()
        if not any(p == Path(o) or Path(o) in p.parents for o in out):
            out.append(str(p))
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[Path, str]:
    """An image directory: hard links to /usr (a copy would take gigabytes), the merged-/usr links, empty
    mount points, passwd/group, and a marker file with a random token. No hpcserve in it."""
    img = tmp_path_factory.mktemp("image") / "rootfs"
    img.mkdir()
    res = subprocess.run(["cp", "-al", "/usr", str(img / "usr")], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:   # /usr on another filesystem: bind the host's /usr instead (the marker still differs)
        shutil.rmtree(img / "usr", ignore_errors=True)
        (img / "usr").mkdir()
        USR_BOUND.append(Path("/usr"))
    for name in ("bin", "lib", "lib64", "sbin"):
        if (Path("/") / name).is_symlink():
            (img / name).symlink_to(os.readlink(Path("/") / name))
    for d in ("etc", "dev", "proc", "sys", "tmp", "home", "root", "run", "mnt", "var/tmp"):
        (img / d).mkdir(parents=True, exist_ok=True)
    for f in ("passwd", "group"):
        shutil.copy(f"/etc/{f}", img / "etc" / f)
    for f in ("hosts", "resolv.conf"):
        (img / "etc" / f).touch()
    for m in _stand_in_mounts():   # ch-run cannot create bind destinations in a read-only image
        (img / m.lstrip("/")).mkdir(parents=True, exist_ok=True)
    found = subprocess.run(["find", str(img), "-xdev", "-name", "hpcserve*", "-print", "-quit"],
                           capture_output=True, text=True, timeout=120).stdout
    assert found == "", f"the image must not contain hpcserve: {found}"
    token = secrets.token_hex(8)
    (img / MARKER).write_text(token + "\n")
    return img, token


AGGREGATED = "workers: {replicas: 1, tp: 8, restart: 2, env: {GROUP_MARK: crossed}}"


def _recipe(tmp_path: Path, img: Path, topology: str = AGGREGATED) -> Path:
    base = free_port_block(120)
    model = tmp_path / "model"
    model.mkdir()
    mounts = ", ".join(f'"{m}"' for m in _stand_in_mounts())
    text = f"""\
name: ch-serve
model: {{path: {model}, served_name: demo}}
engine:
  kind: mock
  container: {img}
  setup: ["echo image-marker=$(cat /{MARKER})"]
  mock: {{time-scale: 0}}
cluster:
  backend: slurm
  partition: debug
  time: "00:10:00"
  gpus_per_node: 8
  request_gpus: false
  cpus_per_node: 1
  mem_per_node: 500M
  container_runtime: charliecloud
  container_mounts: [{mounts}]
  signal_seconds: 20
  address: 127.0.0.1
{topology}
router: {{port: {base + 119}, dedicated_node: true}}
ports: {{base: {base}}}
timeouts: {{startup: 90, drain: 5}}
"""
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def _engine_pids(log: Path, name: str = "workers-0") -> list[int]:
    """PIDs the agent reported for this engine, in start order."""
    text = log.read_text() if log.exists() else ""
    return [int(m) for m in re.findall(rf"started {name} \(pid (\d+)\)", text)]


def _generate(url: str) -> str:
    r = httpx.post(url + "/generate", json={"text": "Hello image", "sampling_params": {"max_new_tokens": 4}},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["text"]


def _in_image(pid: int, token: str) -> bool:
    try:
        return Path(f"/proc/{pid}/root/{MARKER}").read_text().strip() == token
    except OSError:
        return False


def test_engine_runs_in_image_agent_outside_ready_restart_drain_cancel(image, tmp_path, monkeypatch):
    img, token = image
    monkeypatch.setenv("USER", os.environ.get("USER") or "root")
    [run] = submit(_recipe(tmp_path, img), run_dir=tmp_path / "run")
    agent_log = run.run_dir / "logs/agent-node1.log"   # the router has node 0 to itself
    engine_log = run.run_dir / "logs/workers-0.log"
    try:
        ep = wait_ready(run, 150)
        assert _generate(ep["url"])
        [pid] = _engine_pids(agent_log)
        agent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])   # ch-run execs in place
        assert Path(f"/proc/{agent}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-m", b"hpcserve", b"node"]
        # (a) the engine is in the image, the agent is not
        assert _in_image(pid, token) and not _in_image(agent, token)
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink(f"/proc/{agent}/ns/mnt")
        assert not Path(f"/proc/{agent}/root/{MARKER}").exists()
        assert f"image-marker={token}" in engine_log.read_text()   # engine.setup ran inside the image
        # the plan's GPUs and the group's environment crossed into the image
        environ = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        assert environ[b"CUDA_VISIBLE_DEVICES"] == b"0,1,2,3,4,5,6,7" and environ[b"GROUP_MARK"] == b"crossed"
        # (b) a killed engine is restarted through the runtime, in the image again, and serves
        os.kill(pid, signal.SIGKILL)
        pids = wait_for(lambda: (p := _engine_pids(agent_log))[1:] and p, 60, "engine restarted")
        new = pids[1]
        assert new != pid and _in_image(new, token)
        assert "workers-0 exited with code -9" in agent_log.read_text()   # the exit status crossed ch-run
        wait_for(lambda: _generate_ok(ep["url"]), 60, "serving again after the restart")
    finally:
        final = cancel(run, wait=60)
    assert final == "COMPLETED"    # drained and exited 0 (CANCELLED: the hard scancel after the wait)
    # (c) the drain's SIGTERM reached the engine inside the image: its own log says so; nothing is left
    assert "stop signal: draining" in engine_log.read_text().rsplit(f"image-marker={token}", 1)[-1]
    assert not any(pid_alive(p) for p in _engine_pids(agent_log))


def _generate_ok(url: str) -> bool:
    try:
        return bool(_generate(url))
    except (AssertionError, httpx.HTTPError):
        return False


def test_sigkilled_agent_leaves_no_engine_in_the_image(image, tmp_path, monkeypatch):
    img, token = image
    monkeypatch.setenv("USER", os.environ.get("USER") or "root")
    [run] = submit(_recipe(tmp_path, img), run_dir=tmp_path / "run")
    agent_log = run.run_dir / "logs/agent-node1.log"
    try:
        wait_ready(run, 150)
        [pid] = _engine_pids(agent_log)
        assert _in_image(pid, token)
        agent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(agent, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 15, f"engine {pid} gone after its agent {agent} was SIGKILLed")
    finally:
        cancel(run, wait=60)
    assert not pid_alive(pid)


def test_missing_image_fails_the_job_fast_with_the_reason(image, tmp_path, monkeypatch):
    img, _ = image
    monkeypatch.setenv("USER", os.environ.get("USER") or "root")
    gone = tmp_path / "no-such-image"
    [run] = submit(_recipe(tmp_path, img), [f"engine.container={gone}"], run_dir=tmp_path / "run")
    try:
        # the job's preflight (hpcserve doctor) or, without it, the agent before the engine says it
        with pytest.raises(BackendError, match=f"image {gone} does not exist on this node.*fix engine.container"):
            wait_ready(run, 120)
    finally:
        cancel(run, wait=60)
    assert f"image {gone} does not exist" in (run.run_dir / "failure.json").read_text()


def test_image_check_runs_a_command_in_the_image_as_the_engine_would(image, tmp_path, monkeypatch):
    """What `hpcserve doctor` uses on each node before any engine starts."""
    from types import SimpleNamespace

    from hpcserve.containers.base import image_starts, run_in_image
    img, token = image
    monkeypatch.setenv("USER", os.environ.get("USER") or "root")
    settings = SimpleNamespace(container=str(img), container_runtime="charliecloud",
                               container_mounts=[str(p) for p in USR_BOUND])
    assert image_starts(settings, str(tmp_path)) is None
    assert run_in_image(settings, ["cat", f"/{MARKER}"], str(tmp_path)) == (0, token)
    code, last = run_in_image(settings, ["test", "-r", "/models/m/config.json"], str(tmp_path))
    assert code == 1
    broken = SimpleNamespace(container=str(tmp_path), container_runtime="charliecloud", container_mounts=[])
    why = image_starts(broken, str(tmp_path))
    assert why.startswith(f"image {tmp_path} does not start with charliecloud (exit 1): ") and "ch-run" in why


def test_pd_with_a_prefill_over_two_nodes_serves_from_images(image, tmp_path, monkeypatch):
    """Bind address, HTTP, PD bootstrap and dist-init ports all cross the boundary (host network)."""
    img, token = image
    monkeypatch.setenv("USER", os.environ.get("USER") or "root")
    pd = "prefill: {replicas: 1, nodes: 2, tp: 16}\ndecode: {replicas: 1, tp: 8}"
    [run] = submit(_recipe(tmp_path, img, pd), run_dir=tmp_path / "run")
    try:
        ep = wait_ready(run, 150)
        assert _generate(ep["url"])
        ranks = [p for n in (1, 2, 3) for p in _engine_pids(run.run_dir / f"logs/agent-node{n}.log", r"\S+")]
        assert len(ranks) == 3 and all(_in_image(p, token) for p in ranks)
    finally:
        cancel(run, wait=60)
    assert not any(pid_alive(p) for p in ranks)
