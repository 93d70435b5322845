"""Compatibility tier: third-party clients, unchanged, against `hpcserve up` (mock PD behind the router).

- The OpenAI SDK, sync and async, over every parameter issue 16 names: n, logprobs/top_logprobs, echo with
  prompt log-probabilities, stop/stop_token_ids/ignore_eos/min_tokens, stream_options, models.retrieve, and
  SGLang's refusals arriving as the SDK's typed errors.
- SGLang's own `python -m sglang.bench_serving` with its sglang, sglang-oai and sglang-oai-chat backends, a
  tokenizer built here with the `tokenizers` package and a local ShareGPT-format file (nothing downloaded:
  HF_HUB_OFFLINE=1). The numbers it reports (completed requests, output tokens, per-request errors) are
  asserted. torchvision has no CPU wheel for this torch on PyPI (the CUDA-linked one cannot load its ops),
  and sglang imports it only from multimodal model configs a text benchmark never runs, so the benchmark
  process gets an inert torchvision module; the benchmark's own code runs as shipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import openai
import pytest

from proc_util import demo_overrides

from hpcserve.api import up

REPO_RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "local-demo.yaml")
MODEL = "demo"
PROMPT = "Disaggregated serving splits"

BENCH = r"""
import importlib.machinery, runpy, sys, types
class _Meta(type):
    def __getattr__(cls, a):
        if a.startswith("__"):
            raise AttributeError(a)
        return _Inert
class _Inert(metaclass=_Meta):
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): return _Inert()
def _module(name):
    m = types.ModuleType(name)
    m.__spec__, m.__file__, m.__path__, m.__version__ = importlib.machinery.ModuleSpec(name, None), "<inert>", [], "0"
    def attr(a):
        if a.startswith("__"):
            raise AttributeError(a)
        return _Inert
    m.__getattr__ = attr
    sys.modules[name] = m
for n in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
          "torchvision.transforms.v2", "torchvision.transforms.v2.functional", "torchvision.io", "torchvision.ops"):
    _module(n)
sys.argv = ["bench_serving"] + sys.argv[1:]
runpy.run_module("sglang.bench_serving", run_name="__main__")
"""


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    run, backend = up(REPO_RECIPE, demo_overrides(), run_dir=tmp_path_factory.mktemp("compat") / "run")
    try:
        yield run.endpoint["url"]
    finally:
        backend.stop()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_openai_sync_models_chat_and_completions(url):
    c = _client(url)
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert c.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is PD?"}]
    chat = c.chat.completions.create(model=MODEL, messages=msgs, n=2, max_tokens=5, logprobs=True, top_logprobs=3,
                                     temperature=0)
    assert [ch.index for ch in chat.choices] == [0, 1] and chat.usage.completion_tokens == 10
    for ch in chat.choices:
        assert len(ch.logprobs.content) == 5 and all(len(t.top_logprobs) == 3 for t in ch.logprobs.content)
        assert "".join(t.token for t in ch.logprobs.content) == ch.message.content

    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0, stream=True,
                                            logprobs=True, top_logprobs=2,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5

    echo = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2, temperature=0)
    lp = echo.choices[0].logprobs
    n_prompt = echo.usage.prompt_tokens
    assert echo.choices[0].text.startswith(PROMPT) and "".join(lp.tokens[:n_prompt]) == PROMPT
    assert lp.text_offset[0] == 0 and lp.text_offset[n_prompt] == len(PROMPT) and lp.token_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:]) and len(lp.top_logprobs) == n_prompt + 4

    streamed = list(c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2,
                                         temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == echo.choices[0].text
    assert sum((ch.choices[0].logprobs.tokens for ch in streamed), []) == lp.tokens

    many = c.completions.create(model=MODEL, prompt=["one prompt", "another prompt"], n=2, max_tokens=3)
    assert sorted(ch.index for ch in many.choices) == [0, 1, 2, 3]

    knobs = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, seed=7, temperature=0.8,
                                 extra_body={"min_tokens": 2, "ignore_eos": True, "stop_token_ids": [3 + ord("e")]})
    assert knobs.choices[0].finish_reason in ("stop", "length") and knobs.usage.completion_tokens >= 2
    first = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = first[4:6]
    stopped = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


@pytest.mark.parametrize("call,words", [
    (lambda c: c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0), "max_tokens must be positive"),
    (lambda c: c.completions.create(model=MODEL, prompt=""), "Prompt cannot be empty"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}]), "role"),
    (lambda c: c.chat.completions.create(model=MODEL + ":adapter", messages=[{"role": "user", "content": "x"}]),
     "LoRA is not enabled"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                         response_format={"type": "json_object"}), "grammar-backend none"),
], ids=["max_tokens0", "empty_prompt", "role", "lora", "grammar"])
def test_openai_sync_refusals_are_typed_errors(url, call, words):
    with pytest.raises(openai.BadRequestError) as err:
        call(_client(url))
    body = err.value.body  # SGLang's ErrorResponse: {"object": "error", "message": ..., "code": 400}
    assert err.value.status_code == 400 and isinstance(body, dict) and body["code"] == 400
    assert words in body["message"]


def test_openai_async_concurrent_and_streaming(url):
    async def main():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
        try:
            assert (await c.models.retrieve(MODEL)).id == MODEL
            msgs = [{"role": "user", "content": "count"}]
            many = await asyncio.gather(*(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4 + i,
                                                                    n=2, logprobs=True, top_logprobs=1)
                                          for i in range(8)))
            assert [r.usage.completion_tokens for r in many] == [2 * (4 + i) for i in range(8)]
            stream = await c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, echo=True, logprobs=1,
                                                stream=True, stream_options={"include_usage": True})
            parts = [ch async for ch in stream]
            assert parts[-1].usage.completion_tokens == 6
            text = "".join(ch.choices[0].text for ch in parts if ch.choices)
            assert text.startswith(PROMPT) and len(text) > len(PROMPT)
            with pytest.raises(openai.BadRequestError):
                await c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
        finally:
            await c.close()
    asyncio.run(main())


# ---- SGLang's bench_serving
@pytest.fixture(scope="module")
def bench_assets(tmp_path_factory):
    pytest.importorskip("sglang")
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tmp_path_factory.mktemp("bench_assets")
    words = ["alpha", "beta", "gamma", "delta", "serve", "model", "token", "prefill", "decode", "router", "cluster",
             "node", "batch", "cache", "the", "a", "of", "to", "and", "is"]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "unk_token": "[UNK]", "model_max_length": 4096}))
    convs = [{"conversations": [{"from": "human", "value": " ".join(words[(i + j) % 20] for j in range(30))},
                                {"from": "gpt", "value": "alpha beta"}]} for i in range(40)]
    (d / "sharegpt.json").write_text(json.dumps(convs))
    return d


@pytest.mark.parametrize("backend", ["sglang", "sglang-oai", "sglang-oai-chat"])
def test_sglang_bench_serving_reports_every_request_completed(url, bench_assets, backend, tmp_path):
    n, out_len = 12, 6
    result = tmp_path / "result.jsonl"
    argv = [sys.executable, "-c", BENCH, "--backend", backend, "--base-url", url, "--model", MODEL,
            "--tokenizer", str(bench_assets), "--dataset-name", "random", "--dataset-path",
            str(bench_assets / "sharegpt.json"), "--num-prompts", str(n), "--random-input-len", "24",
            "--random-output-len", str(out_len), "--random-range-ratio", "1.0", "--max-concurrency", "4",
            "--output-file", str(result), "--output-details", "--disable-tqdm", "--seed", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(result.read_text().splitlines()[-1])
    assert report["backend"] == backend and report["completed"] == n
    assert report["total_output_tokens"] == n * out_len and report["output_lens"] == [out_len] * n
    assert report["errors"] == [""] * n
    assert f"Successful requests:                     {n}" in p.stdout
