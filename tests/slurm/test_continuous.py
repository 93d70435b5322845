"""serve.continuous on the real local Slurm: a successor job is submitted before the time limit, takes over
endpoint.json and `status` when ready, the old job drains and completes; the chain goes on until cancelled."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import pytest
from proc_util import wait_for
from slurm_util import job_state, pd_recipe, requires_slurm

from hpcserve.agent.handover import generation_dir, generations
from hpcserve.api import cancel, submit, wait_ready
from hpcserve.errors import RecipeError
from hpcserve.recipe.load import load_recipe

pytestmark = [pytest.mark.slurm, requires_slurm]
BODY = {"text": "hand me over", "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
LIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")


class EndpointFollower(threading.Thread):
    """A client that reads endpoint.json before every request, the way users are told to, and tries once
    more after re-reading it when a request fails (the old router may be draining)."""

    def __init__(self, deployment):
        super().__init__(daemon=True)
        self.deployment, self.stop = deployment, threading.Event()
        self.failures: list = []
        self.texts: set = set()
        self.urls: dict[str, int] = {}

    def _once(self, client) -> tuple[bool, str]:
        url = self.deployment.endpoint["url"]
        try:
            r = client.post(url + "/generate", json=BODY)
        except httpx.HTTPError as e:
            return False, f"{type(e).__name__}: {e}"
        if r.status_code != 200:
            return False, f"HTTP {r.status_code}: {r.text[:200]}"
        self.urls[url] = self.urls.get(url, 0) + 1
        return True, r.json()["text"]

    def run(self):
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                ok, got = self._once(client)
                if not ok:
                    ok, again = self._once(client)
                    if not ok:
                        self.failures.append((got, again))
                        continue
                    got = again
                self.texts.add(got)


def _current(run) -> int:
    return generations(run.run_dir)["current"]


def test_continuous_hands_over_before_time_limit_and_chain_goes_on(tmp_path):
    recipe = pd_recipe(tmp_path, "serve: {continuous: true, handover_seconds: 100}\n", span=300)
    # 2 minutes of wall clock, successor submitted with 100 s left: about 20 s after each job starts
    [run] = submit(recipe, ["cluster.time=2", "timeouts.drain=10", "cluster.signal_seconds=30"], run_dir=tmp_path / "run")
    follower = None
    try:
        ep0 = wait_ready(run, 150)
        expected = httpx.post(ep0["url"] + "/generate", json=BODY, timeout=10).json()["text"]
        follower = EndpointFollower(run)
        follower.start()

        wait_for(lambda: _current(run) == 1, 150, "generation 1 took over the endpoint")
        jobs = generations(run.run_dir)["jobs"]
        ep1 = run.endpoint
        assert ep1["generation"] == 1 and ep1["job_id"] == jobs["1"] != run.job_id
        assert ep1["port"] == ep0["port"] + 1          # odd generations use the shifted port set
        assert (generation_dir(run.run_dir, 1) / "endpoint.json").exists()
        # the predecessor drained and ended by itself, saying why
        wait_for(lambda: job_state(run.job_id) not in LIVE, 60, "generation 0's job ended")
        assert job_state(run.job_id) == "COMPLETED"
        stopped = json.loads((run.run_dir / "stopped.json").read_text())
        assert stopped["why"] == f"handed over to job {jobs['1']} (generation 1)", stopped
        res = subprocess.run([sys.executable, "-m", "hpcserve", "status", str(run.run_dir), "--json"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        [st] = json.loads(res.stdout)
        assert (st["job_id"], st["generation"], st["phase"], st["endpoint"]) == (jobs["1"], 1, "ready", ep1["url"])
        assert st["workers"] == {"decode": {"ready": 1}, "prefill": {"ready": 1}}

        # generation 1 hands over to generation 2, which is back on the first port set
        wait_for(lambda: _current(run) == 2, 150, "generation 2 took over the endpoint")
        jobs = generations(run.run_dir)["jobs"]
        assert run.endpoint["port"] == ep0["port"] and run.endpoint["job_id"] == jobs["2"]
        wait_for(lambda: job_state(jobs["1"]) not in LIVE, 60, "generation 1's job ended")
        assert job_state(jobs["1"]) == "COMPLETED"
    finally:
        if follower is not None:
            follower.stop.set()
            follower.join(30)
        final = cancel(run, wait=60)
    assert final == "COMPLETED"    # drained and exited 0 (CANCELLED: the hard scancel after the wait)
    # every request of the endpoint-following client was answered, with the same text, by all generations
    assert follower.failures == [], follower.failures[:3]
    assert follower.texts == {expected}
    assert len(follower.urls) >= 2, follower.urls
    # cancel stopped the chain: every generation's job is over and no new one appears
    jobs = generations(run.run_dir)["jobs"]
    assert all(job_state(j) not in LIVE for j in jobs.values()), {j: job_state(j) for j in jobs.values()}


def test_continuous_refuses_recipes_that_end_by_themselves(tmp_path):
    recipe = pd_recipe(tmp_path, "serve: {continuous: true, handover_seconds: 300}\n"
                                 "benchmark: {isl: 8, osl: 4, concurrency: [1]}\n")
    with pytest.raises(RecipeError, match="serve.continuous: a recipe with benchmark ends by itself"):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match="must exceed cluster.signal_seconds"):
        load_recipe(pd_recipe(tmp_path, "serve: {continuous: true, handover_seconds: 100}\n"),
                    ["cluster.signal_seconds=120"])
