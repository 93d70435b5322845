"""`hpcserve doctor RECIPE` on the local Slurm (issue 14 item 4): a healthy cluster passes; induced failures
each give their own line naming the node and the fix, exit status 2, no traceback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from proc_util import free_port_block
from slurm_util import requires_slurm

from hpcserve.api import load_plans
from hpcserve.doctor.checks import NodeContext, run_checks

REPO = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, base: int, extra: str = "") -> Path:
    """Mock PD over two local-Slurm nodes: prefill (with Redis + router) on node 0, decode on node 1."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    p = tmp_path / "doctor.yaml"
    p.write_text(f"""\
name: doctor-demo
model: {{path: {model}, served_name: demo}}
engine: {{kind: mock, mock: {{time-scale: 0}}}}
cluster: {{backend: slurm, partition: debug, time: "00:10:00", gpus_per_node: 2, request_gpus: false,
          cpus_per_node: 1, mem_per_node: 500M, address: 127.0.0.1, signal_seconds: 20}}
prefill: {{replicas: 1, tp: 2}}
decode: {{replicas: 1, tp: 2}}
router: {{port: {base + 99}}}
ports: {{base: {base}}}
timeouts: {{drain: 10}}
{extra}""")
    return p


def _doctor(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcserve", "doctor", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.slurm
@requires_slurm
def test_healthy_local_cluster_passes(tmp_path):
    r = _doctor(str(_recipe(tmp_path, free_port_block(100))), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    host = socket.gethostname()
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    for rank, line in enumerate(lines):
        assert line.startswith(f"ok node {rank} ({host}): ") and ", 0 failed" in line
    assert "gpus (no nvidia-smi on this node: GPUs not checked)" in r.stdout   # said, not failed
    node1 = json.loads((tmp_path / "run/doctor/node-1.json").read_text())
    assert {f["check"]: f["status"] for f in node1["findings"]}["reach"] == "ok"   # node 1 reached the head


@pytest.mark.slurm
@requires_slurm
def test_induced_failures_each_get_their_line(tmp_path):
    base = free_port_block(100)
    recipe = _recipe(tmp_path, base)
    busy = socket.create_server(("127.0.0.1", base + 30))   # decode-0's HTTP port (second replica block)
    try:
        r = _doctor(str(recipe), "--run-dir", str(tmp_path / "run"),
                    "--set", "kv_transfer.ib_device=mlx5_9", "--set", "model.path=/nonexistent/model",
                    "--set", "cluster.sbatch=[--segment=1]", cwd=tmp_path)
    finally:
        busy.close()
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    host = socket.gethostname()
    fails = [line for line in r.stdout.splitlines() if not line.startswith(("ok ", "FAIL "))]
    expected = [
        f"login ({host}): sbatch directive --segment is unknown to the sbatch here",
        f"node 0 ({host}): ib_device: InfiniBand device mlx5_9 not in /sys/class/infiniband (present: none); "
        f"fix: set kv_transfer.ib_device to a present device, or remove it",
        f"node 0 ({host}): model: /nonexistent/model is not readable on this node; fix: fix model.path, or mount "
        f"the model directory (cluster.container_mounts)",
        f"node 1 ({host}): ib_device: InfiniBand device mlx5_9",
        f"node 1 ({host}): model: /nonexistent/model is not readable on this node",
        f"node 1 ({host}): ports: decode-0 http: port {base + 30} on 127.0.0.1 is already in use (another run?); "
        f"fix: change ports.base or router.port",
    ]
    assert len(fails) == len(expected), r.stdout
    for line, want in zip(fails, expected):
        assert line.startswith(want), (line, want)
    assert "FAIL node 1" in r.stdout and "FAIL node 0" in r.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has GPU tools")
def test_no_gpu_tools_is_said_not_failed(tmp_path):
    [(_, plan)] = load_plans(_recipe(tmp_path, 24000))
    [f] = run_checks(NodeContext(plan, 0, tmp_path), ["gpus"])
    assert (f.status, f.message) == ("skip", "no nvidia-smi on this node: GPUs not checked")


def test_a_node_given_no_gpus_skips_the_gpu_check(tmp_path):
    [(_, plan)] = load_plans(_recipe(tmp_path, 24000), ["router.dedicated_node=true"])
    assert plan.nodes[0].gpus_used == []
    [f] = run_checks(NodeContext(plan, 0, tmp_path), ["gpus"])
    assert (f.status, f.message) == ("skip", "the plan gives this node no GPUs")


@pytest.mark.slurm
@requires_slurm
def test_submitted_job_runs_the_checks_first_and_fails_fast_with_the_reason_in_status(tmp_path):
    """The agents run the node checks before starting anything: a missing IB device ends the job before any
    engine or Redis starts, and `hpcserve status` says why (one line per failed check, node named)."""
    from slurm_util import scancel, wait_job_state

    from hpcserve.api import submit
    base = free_port_block(100)
    [run] = submit(_recipe(tmp_path, base), ["kv_transfer.ib_device=mlx5_9"], run_dir=tmp_path / "run")
    try:
        wait_job_state(run.job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    finally:
        scancel(run.job_id)
    r = subprocess.run([sys.executable, "-m", "hpcserve", "status", "--json", str(run.run_dir)], capture_output=True,
                       text=True, timeout=60)
    [st] = json.loads(r.stdout)
    assert st["phase"] == "failed"
    host = socket.gethostname()
    assert st["failure"].startswith("preflight failed: node ")
    assert (f"({host}): ib_device: InfiniBand device mlx5_9 not in /sys/class/infiniband (present: none); "
            f"fix: set kv_transfer.ib_device to a present device, or remove it") in st["failure"]
    logs = run.run_dir / "logs"
    assert not (run.run_dir / "redis.json").exists()               # nothing started
    assert not any((logs / f"{name}.log").exists() for name in ("prefill-0", "decode-0", "router", "redis"))


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory) -> Path:
    """A Charliecloud image directory without hpcserve: hard links to this host's /usr and the merged-/usr
    links (the way tests/slurm/test_containers_charliecloud.py builds its image)."""
    img = tmp_path_factory.mktemp("image") / "rootfs"
    img.mkdir()
    subprocess.run(["cp", "-al", "/usr", str(img / "usr")], check=True, timeout=300)
    for name in ("bin", "lib", "lib64", "sbin"):
        if (Path("/") / name).is_symlink():
            (img / name).symlink_to((Path("/") / name).readlink())
    for d in ("etc", "dev", "proc", "sys", "tmp", "home", "root", "run", "mnt", "var/tmp"):
        (img / d).mkdir(parents=True, exist_ok=True)
    for f in ("passwd", "group"):
        (img / "etc" / f).write_text(Path("/etc", f).read_text())
    return img


@pytest.mark.skipif(shutil.which("ch-run") is None, reason="ch-run not installed (tests/run.sh installs charliecloud-runtime)")
def test_image_checks_go_through_the_container_runtime(tmp_path, rootfs):
    recipe = _recipe(tmp_path, 24000)
    sets = ["cluster.container_runtime=charliecloud", "cluster.backend=local"]
    [(_, plan)] = load_plans(recipe, [*sets, f"engine.container={rootfs}"])
    got = {f.check: f for f in run_checks(NodeContext(plan, 0, tmp_path), ["container", "model"])}
    assert (got["container"].status, got["container"].message) == ("ok", f"{rootfs} starts with charliecloud")
    assert got["model"].status == "ok" and got["model"].message.endswith(f"readable inside {rootfs}")
    # an image that is not there
    [(_, plan)] = load_plans(recipe, [*sets, f"engine.container={tmp_path}/nosuch"])
    [f] = run_checks(NodeContext(plan, 0, tmp_path), ["container"])
    assert f.line(0, "n0") == (f"node 0 (n0): container: image {tmp_path}/nosuch does not exist on this node; "
                               f"fix: fix engine.container or copy the image to the shared filesystem")
    # an image that does not start (an empty directory: no /bin/sh, no mount points); the model is then not
    # checked inside it, rather than reported as missing
    (tmp_path / "empty").mkdir()
    [(_, plan)] = load_plans(recipe, [*sets, f"engine.container={tmp_path}/empty"])
    got = {f.check: f for f in run_checks(NodeContext(plan, 0, tmp_path), ["container", "model"])}
    assert got["container"].status == "fail"
    assert got["container"].message.startswith(f"image {tmp_path}/empty does not start with charliecloud (")
    assert got["model"].status == "skip" and got["model"].message.endswith("not checked: the image does not start")


def test_doctor_json_on_the_local_backend_is_one_document(tmp_path):
    r = _doctor(str(REPO / "recipes/local-demo.yaml"), "--json", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["ok"] is True and doc["failures"] == []
    assert [n["node"] for n in doc["nodes"]] == [0, 1]
