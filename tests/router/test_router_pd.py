"""PD mode through the router to real mock prefill/decode processes, with the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from hpcserve.mock.launch import MockProcess
from router_util import RouterProc, pd_args, start_pd, stats

MODEL = "mock-model"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("pd")
    workers = start_pd(log_dir)
    agg = MockProcess.start(["--disaggregation-mode", "null"], log_dir=log_dir, wait="ready")
    router = None
    try:
        router = RouterProc(pd_args(workers) + ["--served-model-name", MODEL, "--prefill-policy", "round_robin",
                                                "--decode-policy", "round_robin"], log_dir)
        yield {"router": router, "prefill": workers[0], "decode": workers[1], "agg": agg}
    finally:
        if router is not None:
            router.stop()
        for p in [*workers, agg]:
            p.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=20, max_retries=0)


def test_chat_and_completions_match_direct_aggregated_worker(cluster):
    via, direct = _client(cluster["router"].url), _client(cluster["agg"].url)
    msgs = [{"role": "user", "content": "Tell me about disaggregated serving."}]
    a = via.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    b = direct.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content  # the mock produced text
    c = via.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=9, temperature=0)
    d = direct.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=9, temperature=0)
    assert c.choices[0].text == d.choices[0].text != ""


def test_streaming_chat_and_completions_match(cluster):
    via, direct = _client(cluster["router"].url), _client(cluster["agg"].url)
    msgs = [{"role": "user", "content": "Stream me something"}]

    def chat_text(client):
        out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in out if ch.choices)

    def cmpl_text(client):
        out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0,
                                        stream=True)
        return "".join(ch.choices[0].text for ch in out if ch.choices)

    assert chat_text(via) == chat_text(direct) != ""
    assert cmpl_text(via) == cmpl_text(direct) != ""


def test_generate_batch_and_request_id(cluster):
    r = httpx.post(cluster["router"].url + "/generate", timeout=20, headers={"x-request-id": "req-42"},
                   json={"text": ["first prompt", "second prompt"], "sampling_params": {"max_new_tokens": 5}})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "req-42"
    direct = httpx.post(cluster["agg"].url + "/generate", timeout=20,
                        json={"text": ["first prompt", "second prompt"], "sampling_params": {"max_new_tokens": 5}})
    assert [x["text"] for x in r.json()] == [x["text"] for x in direct.json()]
    generated = httpx.post(cluster["router"].url + "/generate", timeout=20, json={"text": "x"})
    assert len(generated.headers["x-request-id"]) > 4  # one is made up when the client sent none


def test_return_logprob_prepends_prefill_input_logprobs(cluster):
    body = {"text": "logprob prompt", "sampling_params": {"max_new_tokens": 3}, "return_logprob": True,
            "logprob_start_len": 0}
    via = httpx.post(cluster["router"].url + "/generate", json=body, timeout=20).json()
    direct = httpx.post(cluster["agg"].url + "/generate", json=body, timeout=20).json()
    assert via["text"] == direct["text"]
    want = direct["meta_info"]["input_token_logprobs"]
    assert want and via["meta_info"]["input_token_logprobs"] == want


def test_one_request_reaches_each_side_once(cluster):
    before_p, before_d = stats(cluster["prefill"]), stats(cluster["decode"])
    r = httpx.post(cluster["router"].url + "/generate", json={"text": "count me"}, timeout=20)
    assert r.status_code == 200
    after_p, after_d = stats(cluster["prefill"]), stats(cluster["decode"])
    assert after_p["requests"].get("/generate", 0) - before_p["requests"].get("/generate", 0) == 1
    assert after_d["requests"].get("/generate", 0) - before_d["requests"].get("/generate", 0) == 1
    assert after_d["pd_rejected"] == before_d["pd_rejected"]  # bootstrap fields were present


def test_models_ready_workers_metrics(cluster):
    url = cluster["router"].url
    assert [m.id for m in _client(url).models.list().data] == [MODEL]
    ready = httpx.get(url + "/ready", timeout=5).json()
    assert ready == {"ready": True, "mode": "pd", "healthy": {"prefill": 1, "decode": 1}}
    workers = httpx.get(url + "/workers", timeout=5).json()["workers"]
    assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
    assert all(w["circuit"] == "closed" for w in workers)
    text = httpx.get(url + "/metrics", timeout=5).text
    assert 'hpcserve_router_requests_total{route="/generate",status="200"}' in text
    assert "hpcserve_router_worker_inflight" in text
