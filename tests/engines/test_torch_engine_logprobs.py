"""The torch engine as the oracle of PD log-probabilities: with real tensors, a PD pair behind the router
answers exactly what one aggregated engine answers, token for token, prompt and output log-probabilities
and top-N alternatives included, on /generate, /v1/completions (echo) and /v1/chat/completions."""

from __future__ import annotations

import httpx
import orjson
import pytest

torch = pytest.importorskip("torch")

from hpcserve.engine_shell.tokenizer import encode  # noqa: E402
from hpcserve.torchengine import checkpoint  # noqa: E402
from hpcserve.torchengine.launch import TorchProcess, start_pd_pair  # noqa: E402
from hpcserve.torchengine.model import TinyConfig, TinyLlama  # noqa: E402
from router_util import RouterProc  # noqa: E402

CFG = TinyConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq=512)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("torchlp")
    model_dir = checkpoint.save(TinyLlama.random(CFG, seed=5), root / "tiny-llama")
    flags = ["--model-path", str(model_dir), "--served-model-name", "tiny", "--torch-bootstrap-timeout", "5"]
    procs: list[TorchProcess] = []
    router = None
    try:
        procs.append(TorchProcess.start(["--disaggregation-mode", "null", *flags], log_dir=root))
        prefill, decode, boot = start_pd_pair(flags, log_dir=root)
        procs += [prefill, decode]
        router = RouterProc(["--mode", "pd", "--prefill", prefill.url, str(boot), "--decode", decode.url,
                             "--served-model-name", "tiny"], root)
        yield {"agg": procs[0].url, "pd": router.url, "oracle": checkpoint.load(model_dir)}
    finally:
        if router is not None:
            router.stop()
        for p in procs:
            p.stop()


def _post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _events(url: str, path: str, body: dict) -> list[dict]:
    r = httpx.post(url + path, json={**body, "stream": True}, timeout=60)
    assert r.status_code == 200, r.text
    return [orjson.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in ("id", "created", "e2e_latency")}
    if isinstance(doc, list):
        return [_strip(x) for x in doc]
    return doc


def test_generate_logprobs_pd_equals_aggregated_and_the_model(cluster):
    body = {"text": [PROMPT, "hello there"], "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 3,
            "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                                  "ignore_eos": True}}
    agg, pd = _post(cluster["agg"], "/generate", body), _post(cluster["pd"], "/generate", body)
    assert _strip(pd) == _strip(agg)
    meta = agg[0]["meta_info"]
    ids = encode(PROMPT)
    assert [e[1] for e in meta["input_token_logprobs"]] == ids and meta["input_token_logprobs"][0][0] is None
    assert len(meta["output_top_logprobs"]) == 6 and all(len(r) == 3 for r in meta["output_top_logprobs"])
    model = cluster["oracle"]  # an independent, uncached recomputation of each prompt position
    for j in range(1, len(ids)):
        logits, _ = model(ids[:j], 0, None)
        want = torch.log_softmax(logits.float(), -1)
        assert meta["input_token_logprobs"][j][0] == pytest.approx(float(want[ids[j]]), abs=1e-4)
        assert meta["input_top_logprobs"][j][0][1] == int(torch.argmax(want))
    greedy = [e[1] for e in meta["output_token_logprobs"]]
    assert greedy == agg[0]["output_ids"] and all(r[0][1] == t for r, t in zip(meta["output_top_logprobs"], greedy))
    streamed_pd = _events(cluster["pd"], "/generate", body)
    streamed_agg = _events(cluster["agg"], "/generate", body)
    last = lambda evs: {e["index"]: _strip(e) for e in evs}  # noqa: E731
    assert last(streamed_pd) == last(streamed_agg)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_echo_logprobs_pd_equals_aggregated(cluster, stream):
    body = {"model": "tiny", "prompt": [PROMPT, "abc"], "max_tokens": 5, "echo": True, "logprobs": 2, "n": 2,
            "temperature": 0, "ignore_eos": True}
    if not stream:
        agg, pd = _post(cluster["agg"], "/v1/completions", body), _post(cluster["pd"], "/v1/completions", body)
        assert _strip(pd) == _strip(agg)
        lp = agg["choices"][0]["logprobs"]
        n_prompt = len(encode(PROMPT))
        assert len(lp["tokens"]) == n_prompt + 5 and lp["text_offset"][n_prompt] == len(PROMPT)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(len(t) >= 1 for t in lp["top_logprobs"][1:])
        return

    def joined(evs):
        out: dict[int, dict] = {}
        for ev in evs:
            for ch in ev["choices"]:
                acc = out.setdefault(ch["index"], {"text": "", "lp": []})
                acc["text"] += ch["text"]
                if ch["logprobs"]:
                    lp = ch["logprobs"]
                    acc["lp"] += list(zip(lp["tokens"], lp["token_logprobs"], lp["text_offset"], lp["top_logprobs"]))
        return out
    agg = joined(_events(cluster["agg"], "/v1/completions", body))
    assert sorted(agg) == [0, 1, 2, 3] and agg[0]["lp"][0][2] == 0
    assert joined(_events(cluster["pd"], "/v1/completions", body)) == agg


def test_chat_top_logprobs_pd_equals_aggregated(cluster):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 6,
            "logprobs": True, "top_logprobs": 4, "temperature": 0, "ignore_eos": True}
    agg, pd = _post(cluster["agg"], "/v1/chat/completions", body), _post(cluster["pd"], "/v1/chat/completions", body)
    assert _strip(pd) == _strip(agg)
    content = agg["choices"][0]["logprobs"]["content"]
    assert len(content) == 6 and all(len(c["top_logprobs"]) == 4 for c in content)
    assert all(c["top_logprobs"][0]["logprob"] == c["logprob"] for c in content)  # greedy: the best one
    flat = lambda evs: [c for e in evs for ch in e["choices"] if ch.get("logprobs")  # noqa: E731
                        for c in ch["logprobs"]["content"]]
    assert flat(_events(cluster["pd"], "/v1/chat/completions", body)) == content
    assert flat(_events(cluster["agg"], "/v1/chat/completions", body)) == content


def test_parameters_the_torch_engine_cannot_honour_are_refused(cluster):
    for where in ("agg", "pd"):
        native = httpx.post(cluster[where] + "/generate", timeout=30,
                            json={"text": "x", "sampling_params": {"max_new_tokens": 2, "stop": ["a"]}})
        assert native.status_code == 400 and "sampling_params.stop" in native.json()["error"]["message"]
        for body in ({"stop": ["a"]}, {"min_tokens": 3}, {"frequency_penalty": 0.5},
                     {"stream": True, "stream_options": {"continuous_usage_stats": True}}):
            r = httpx.post(cluster[where] + "/v1/completions", timeout=30,
                           json={"model": "tiny", "prompt": "x", "max_tokens": 2, **body})
            assert r.status_code == 400, (body, r.text)
            doc = r.json()
            assert doc["object"] == "error" and "not supported by the torch engine" in doc["message"]
