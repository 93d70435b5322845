"""`python -m hpcserve.bench RUN_DIR`: endpoint, GPUs and name from the run's files, and a worker restart
recorded in the run's real Redis during a level makes that level invalid."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import orjson
import pytest
import redis

from hpcserve.api import load_plans, write_plans
from hpcserve.bench import main as bench_main
from hpcserve.bench.rundir import read_run
from hpcserve.bench.workload import BenchError
from hpcserve.registry import WorkerRecord, workers_key
from test_bench_mock import start_mock
from test_bench_registry import redis_url  # noqa: F401 - fixture

DEMO = "recipes/local-demo.yaml"


def make_run_dir(tmp_path, repo, endpoint: str | None, redis_url: str | None = None):
    [run_dir] = write_plans(load_plans(repo / DEMO, ["decode.replicas=2"]), tmp_path / "demo-run")
    if endpoint:
        (run_dir / "endpoint.json").write_text(json.dumps({"url": endpoint}))
    if redis_url:
        (run_dir / "redis.json").write_text(json.dumps({"url": redis_url}))
    return run_dir


def test_read_run_takes_url_gpus_and_name_from_the_run_files(tmp_path, repo):
    run_dir = make_run_dir(tmp_path, repo, "http://127.0.0.1:1")
    info = read_run(run_dir)
    assert info.url == "http://127.0.0.1:1" and info.name == "local-demo" and info.run_id == "demo-run"
    assert info.gpus == 1   # the mock demo plans 0 GPUs: per-GPU numbers fall back to the whole deployment
    assert info.redis_url is None


def test_read_run_explains_a_run_that_is_not_ready(tmp_path, repo):
    run_dir = make_run_dir(tmp_path, repo, None)
    with pytest.raises(BenchError, match="not ready"):
        read_run(run_dir)
    with pytest.raises(BenchError, match="not a run directory"):
        read_run(tmp_path)


def test_restart_during_a_level_makes_it_invalid(tmp_path, repo, redis_url, capsys):  # noqa: F811
    proc, url = start_mock(tmp_path)
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    run_dir = make_run_dir(tmp_path, repo, url, redis_url)
    wkey = workers_key(run_dir.name)
    rec = WorkerRecord(id="decode-0", role="decode", group="decode", url=url, node=0, host="127.0.0.1",
                       state="ready", restarts=0)
    client.hset(wkey, rec.id, rec.to_json())
    bumped = threading.Event()

    def restart_once_the_level_runs():
        # the level has started (and the bench read the count) once the mock saw its first /generate
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url + "/mock/stats", timeout=5) as r:
                if json.loads(r.read())["requests"].get("/generate", 0) >= 1:
                    break
            time.sleep(0.02)
        client.hset(wkey, rec.id, rec.model_copy(update={"restarts": 1}).to_json())
        bumped.set()

    bumper = threading.Thread(target=restart_once_the_level_runs, daemon=True)
    try:
        bumper.start()
        rc = bench_main([str(run_dir), "--isl", "32", "--osl", "12", "--concurrency", "1", "--num-prompts", "6",
                         "--warmup", "0"])
        bumper.join(timeout=35)
    finally:
        proc.stop()
        client.close()
    assert bumped.is_set()
    err = capsys.readouterr().err
    assert rc == 1
    assert "INVALID c=1: worker restart during the level (registry restart count 0 -> 1)" in err
    level = orjson.loads((run_dir / "bench" / "level_c0001.json").read_bytes())
    assert level["run"] == "local-demo" and level["gpus"] == 1 and level["url"] == url
    assert level["metrics"]["completed"] == 6   # every request answered: only the restart invalidates it
