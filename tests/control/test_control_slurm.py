"""The control API of a job on the local Slurm, used from outside the allocation as from a login node: job id
to run dir to head address, routes answering with the registry, an operator restart of a worker on another
node rejoining, `hpcserve top JOB_ID`, and `hpcserve status` through the API."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import redis.asyncio as aioredis
from slurm_util import pd_recipe, requires_slurm

from hpcserve import registry
from hpcserve.api import cancel, submit, wait_ready

pytestmark = [pytest.mark.slurm, requires_slurm]
KEY_ENV, KEY = "HPCSERVE_TEST_CONTROL_KEY", "slurm-control-key"


def _hpcserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True, timeout=150,
                          env=dict(os.environ))


def _records(run_dir, run_id: str) -> dict:
    url = json.loads((run_dir / "redis.json").read_text())["url"]

    async def go():
        client = aioredis.from_url(url, socket_timeout=5)
        try:
            return await registry.load_workers(client, run_id)
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_control_api_of_a_slurm_job_from_the_login_node(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)   # sbatch passes the environment to the job
    [run] = submit(pd_recipe(tmp_path), [f"router.api_key_env={KEY_ENV}"], run_dir=tmp_path / "run")
    try:
        ep = wait_ready(run, 150)
        # top by job id: the run dir from Slurm, the head address from endpoint.json, two scrapes
        res = _hpcserve("top", run.job_id, "--once", "--json", "--interval", "0.3")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["run"]["phase"] == "ready" and doc["run"]["endpoint"] == ep["url"]
        recs = _records(run.run_dir, ep["run_id"])
        assert {r["worker"]: (r["node"], r["state"], r["restarts"]) for r in doc["workers"]} == \
            {w: (rec.node, rec.state, rec.restarts) for w, rec in recs.items()} == \
            {"prefill-0": (1, "ready", 0), "decode-0": (2, "ready", 0)}
        # an operator restart of the decode worker on node 2 (its agent acts on the command)
        res = _hpcserve("restart", "decode-0", "--run", run.job_id, "--json")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["ok"] is True and out["worker"]["restarts"] == 1 and out["worker"]["node"] == 2, out
        recs = _records(run.run_dir, ep["run_id"])
        assert (recs["decode-0"].state, recs["decode-0"].restarts, recs["decode-0"].rotation) == ("ready", 1, True)
        # status through the control API
        res = _hpcserve("status", run.job_id, "--json")
        [st] = json.loads(res.stdout)
        assert (st["source"], st["phase"], st["slurm_state"]) == ("control", "ready", "RUNNING")
        assert {w["id"]: w["restarts"] for w in st["worker_list"]} == {"decode-0": 1, "prefill-0": 0}
    finally:
        cancel(run, wait=60)
