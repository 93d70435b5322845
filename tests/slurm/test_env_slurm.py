"""What each process of a job on the real local Slurm finds in its environment (/proc/PID/environ): a variable
planted in the submitting (login) shell stays with the agent, the recipe's and the group's env reach the
engines, and the API key reaches the router only, never an engine or Redis."""

from __future__ import annotations

import json

import httpx
import pytest
from chaos_util import cmdline
from proc_util import REPO, descendants, free_port_block
from slurm_util import requires_slurm

from hpcserve.api import cancel, submit, wait_ready

pytestmark = [pytest.mark.slurm, requires_slurm]

PLANTED = "H22_LOGIN_ONLY_PLANTED"
KEY_ENV = "H22_ROUTER_API_KEY"
KEY = "key-7Qm2-not-for-engines"


def _recipe(tmp_path, name: str = "slurm-env",
            topology: str = "env: {RECIPE_VAR: from-recipe}\nprefill: {replicas: 1, tp: 8}\n"
                            "decode: {replicas: 1, tp: 8, env: {GROUP_VAR: from-decode-group}}",
            router: str = f", dedicated_node: true, api_key_env: {KEY_ENV}"):
    """A mock deployment on the local profile; the default is the environment test's PD layout."""
    base = free_port_block(120)
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    p = tmp_path / "recipe.yaml"
    p.write_text(f"""\
name: {name}
model: {{path: {model}, served_name: demo}}
engine: {{kind: mock, mock: {{time-scale: 0}}}}
cluster: {REPO / "slurm/clusters/local.yaml"}
{topology}
router: {{port: {base + 119}{router}}}
ports: {{base: {base}}}
timeouts: {{startup: 90}}
""")
    return p


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e]
    return {k.decode(): v.decode(errors="replace") for k, v in items}


def _processes(run_dir) -> dict[str, int]:
    """agent-N, redis, router, prefill-0, decode-0 -> pid, from the agents' own records (hosts/node-N.json)
    and the process trees under them."""
    out = {}
    for f in sorted((run_dir / "hosts").glob("node-*.json")):
        info = json.loads(f.read_text())
        agent = info["pid"]
        out[f"agent-{info['rank']}"] = agent
        for pid in descendants(agent):
            cmd = b" ".join(cmdline(pid))
            if cmd.startswith(b"/bin/sh"):
                continue
            if b"redis-server" in cmd:
                out["redis"] = pid
            elif b"hpcserve.router" in cmd:
                out["router"] = pid
            elif b"hpcserve.mock" in cmd:
                out["prefill-0" if b"prefill" in cmd else "decode-0"] = pid
    return out


def test_job_processes_get_only_what_they_need(tmp_path, monkeypatch):
    monkeypatch.setenv(PLANTED, "login-shell-only")
    monkeypatch.setenv(KEY_ENV, KEY)
    [run] = submit(_recipe(tmp_path), run_dir=tmp_path / "run")
    try:
        ep = wait_ready(run, 150)
        r = httpx.post(ep["url"] + "/generate", json={"text": "env"}, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=30)
        assert r.status_code == 200, r.text
        procs = _processes(run.run_dir)
        assert set(procs) >= {"agent-0", "agent-1", "agent-2", "redis", "router", "prefill-0", "decode-0"}, procs
        env = {name: _environ(pid) for name, pid in procs.items()}
    finally:
        cancel(run, wait=60)
    # the agents run with the submitting environment (sbatch passes it on); nothing else gets the planted one
    assert all(env[f"agent-{i}"][PLANTED] == "login-shell-only" for i in range(3))
    assert [n for n, e in env.items() if PLANTED in e] == ["agent-0", "agent-1", "agent-2"]
    # the key reaches the router (it checks it) and the agents (the head one starts the router), nobody else
    assert env["router"][KEY_ENV] == KEY
    assert sorted(n for n, e in env.items() if KEY_ENV in e) == ["agent-0", "agent-1", "agent-2", "router"]
    assert not any(KEY in v for n in ("redis", "prefill-0", "decode-0") for v in env[n].values())
    # the recipe's env reaches every process it starts, a group's env that group's engines only
    assert {n: e.get("RECIPE_VAR") for n, e in env.items() if not n.startswith("agent")} == {
        "redis": None, "router": "from-recipe", "prefill-0": "from-recipe", "decode-0": "from-recipe"}
    assert env["decode-0"]["GROUP_VAR"] == "from-decode-group" and "GROUP_VAR" not in env["prefill-0"]
    # what the engines need from Slurm, the node and the Python setup is still there
    for name in ("prefill-0", "decode-0"):
        e = env[name]
        assert e["SLURM_JOB_ID"] == run.job_id and e["PATH"] and e["HOME"], name
        assert "SLURM_PROCID" not in e and "SLURM_STEPID" not in e   # the agent's step, not the engine's
    # the Redis password reaches the router inside its Redis URL, engines never
    assert env["router"]["HPCSERVE_REDIS_URL"].startswith("redis://:")
    assert not any("HPCSERVE_REDIS_URL" in env[n] for n in ("prefill-0", "decode-0", "redis"))


def _cpus_allowed(pid: int) -> set[int]:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
    out = set()
    for part in line.split(":", 1)[1].strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def test_node_step_gets_planned_cores_and_memory_engines_split_them(tmp_path):
    """Two engines of 4 GPUs on one node: the rendered job asks for the profile's cores and memory (overridden
    here), Slurm gives the agent's step exactly that, and the agent binds each engine to its own half of the
    cores it has."""
    recipe = _recipe(tmp_path, "slurm-cpus", "workers: {replicas: 2, tp: 4}", router="")
    [run] = submit(recipe, ["cluster.cpus_per_node=2", "cluster.mem_per_node=300M"], run_dir=tmp_path / "run")
    try:
        wait_ready(run, 150)
        procs = _processes_by_cmd(run.run_dir)
        agent_env = _environ(procs["agent"])
        agent_cpus = _cpus_allowed(procs["agent"])
        engine_cpus = [_cpus_allowed(pid) for pid in procs["engines"]]
    finally:
        cancel(run, wait=60)
    script = (run.run_dir / "job.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=2\n#SBATCH --mem=300M\n" in script
    assert "srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --cpus-per-task=2 --mem=300M " in script
    # what Slurm gave the agent's step (its own record of the step, in the agent's environment)
    assert (agent_env["SLURM_CPUS_PER_TASK"], agent_env["SLURM_MEM_PER_NODE"]) == ("2", "300")
    # each engine on its own share of the agent's cores (both get one when there are fewer than two)
    assert len(engine_cpus) == 2 and all(c and c <= agent_cpus for c in engine_cpus)
    if len(agent_cpus) >= 2:
        assert not engine_cpus[0] & engine_cpus[1] and engine_cpus[0] | engine_cpus[1] == agent_cpus



def test_more_cores_than_a_node_has_is_refused_naming_the_field(tmp_path):
    """Nodes here have 4 CPUs and 4000 MB: Slurm would queue a job asking 64 cores per node for ever
    (PartitionConfig); submit refuses it before sbatch and names the field to change."""
    from hpcserve.backends.slurm import slurm_cmd
    from hpcserve.errors import BackendError
    recipe = _recipe(tmp_path)
    before = slurm_cmd("squeue", "-h", "-o", "%i").stdout.split()
    with pytest.raises(BackendError, match=r"asks 64 cores .* at most 4: set cluster.cpus_per_node"):
        submit(recipe, ["cluster.cpus_per_node=64"], run_dir=tmp_path / "run")
    with pytest.raises(BackendError, match=r"asks 8G of memory .* at most 4000M: lower cluster.mem_per_node"):
        submit(recipe, ["cluster.mem_per_node=8G"], run_dir=tmp_path / "run2")
    assert slurm_cmd("squeue", "-h", "-o", "%i").stdout.split() == before    # nothing was queued

def _processes_by_cmd(run_dir) -> dict:
    info = json.loads((run_dir / "hosts/node-0.json").read_text())
    engines = [pid for pid in descendants(info["pid"])
               if b"hpcserve.mock" in b" ".join(cmdline(pid)) and not cmdline(pid)[0].endswith(b"sh")]
    return {"agent": info["pid"], "engines": engines}
