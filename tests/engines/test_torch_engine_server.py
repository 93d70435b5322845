"""The torch engine over HTTP: aggregated and PD (through the hpcserve router) against the in-process oracle."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

torch = pytest.importorskip("torch")

from hpcserve.engines.base import WorkerLaunch, get_engine  # noqa: E402
from hpcserve.engine_shell.launch import free_port  # noqa: E402
from hpcserve.torchengine import checkpoint  # noqa: E402
from hpcserve.torchengine.launch import TorchProcess, start_pd_pair  # noqa: E402
from hpcserve.torchengine.model import TinyConfig, TinyLlama  # noqa: E402
from hpcserve.torchengine.sampling import generate  # noqa: E402
from router_util import RouterProc  # noqa: E402

CFG = TinyConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq=512)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    torch.set_num_threads(1)   # the servers run one thread too: same kernels, same float sums
    root = tmp_path_factory.mktemp("torch")
    model_dir = checkpoint.save(TinyLlama.random(CFG, seed=21), root / "tiny-llama")
    flags = ["--model-path", str(model_dir), "--torch-bootstrap-timeout", "5"]
    procs: list[TorchProcess] = []
    router = None
    try:
        agg = TorchProcess.start(["--disaggregation-mode", "null", *flags], log_dir=root)
        procs.append(agg)
        prefill, decode, boot = start_pd_pair(flags, log_dir=root)
        procs += [prefill, decode]
        router = RouterProc(["--mode", "pd", "--prefill", prefill.url, str(boot), "--decode", decode.url,
                             "--served-model-name", "tiny"], root)
        yield {"oracle": checkpoint.load(model_dir), "agg": agg, "prefill": prefill, "decode": decode,
               "boot": boot, "router": router}
    finally:
        if router is not None:
            router.stop()
        for p in procs:
            p.stop()


def _post(url: str, body: dict, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(url + "/generate", json=body, timeout=timeout)


def _cases(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 259) for _ in range(rng.randrange(1, 60))], rng.randrange(1, 24)) for _ in range(n)]


def test_greedy_generate_equals_oracle_token_for_token(cluster):
    oracle = cluster["oracle"]
    for prompt, n in _cases(8, seed=5):
        r = _post(cluster["agg"].url, {"input_ids": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0}})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["output_ids"] == generate(oracle, prompt, n)
        assert out["meta_info"]["prompt_tokens"] == len(prompt)
        assert out["meta_info"]["completion_tokens"] == len(out["output_ids"])
    text = "The capital of France is"
    r = _post(cluster["agg"].url, {"text": text, "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
    assert r.json()["output_ids"] == generate(oracle, [b + 3 for b in text.encode()], 6)


def test_50_prompts_pd_through_router_equal_aggregated_equal_oracle(cluster):
    oracle, router, agg = cluster["oracle"], cluster["router"], cluster["agg"]
    cases = _cases(50, seed=50)

    def both(case):
        prompt, n = case
        body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0}}
        return _post(router.url, body), _post(agg.url, body)

    with ThreadPoolExecutor(4) as pool:          # concurrent requests queue on each server
        results = list(pool.map(both, cases))
    for (prompt, n), (pd, ag) in zip(cases, results):
        assert pd.status_code == 200 and ag.status_code == 200, (pd.text, ag.text)
        want = generate(oracle, prompt, n)
        assert ag.json()["output_ids"] == want
        assert pd.json()["output_ids"] == want
    stats = httpx.get(cluster["prefill"].url + "/torch/stats", timeout=5).json()
    assert stats["kv_bytes_sent"] > 0 and stats["errors"] == 0


def test_seeded_temperature_sampling_pd_equals_aggregated_equals_oracle(cluster):
    oracle = cluster["oracle"]
    for i, (prompt, n) in enumerate(_cases(6, seed=8)):
        sp = {"max_new_tokens": n, "temperature": 0.9, "sampling_seed": 100 + i}
        want = generate(oracle, prompt, n, temperature=0.9, seed=100 + i)
        assert _post(cluster["agg"].url, {"input_ids": prompt, "sampling_params": sp}).json()["output_ids"] == want
        assert _post(cluster["router"].url, {"input_ids": prompt, "sampling_params": sp}).json()["output_ids"] == want


def test_stream_events_are_cumulative_and_end_like_the_plain_answer(cluster):
    body = {"text": "stream me", "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}}
    plain = _post(cluster["agg"].url, body).json()
    with httpx.stream("POST", cluster["router"].url + "/generate", json={**body, "stream": True}, timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json
    chunks = [json.loads(e) for e in events[:-1]]
    assert [len(c["output_ids"]) for c in chunks] == [1, 2, 3, 4, 5]
    assert chunks[-1]["output_ids"] == plain["output_ids"] and chunks[-1]["text"] == plain["text"]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 5}


def test_decode_checks_the_kv_it_receives_is_for_its_prompt(cluster):
    room = random.getrandbits(62)
    common = {"bootstrap_host": "127.0.0.1", "bootstrap_port": cluster["boot"], "bootstrap_room": room,
              "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    with ThreadPoolExecutor(2) as pool:
        fp = pool.submit(_post, cluster["prefill"].url, {**common, "input_ids": [10, 11, 12]})
        fd = pool.submit(_post, cluster["decode"].url, {**common, "input_ids": [10, 11, 13]})
        pre, dec = fp.result(), fd.result()
    assert pre.status_code == 200 and len(pre.json()["output_ids"]) == 1
    assert dec.status_code == 500 and "KV mismatch" in dec.json()["error"]["message"]


def test_decode_without_a_reachable_prefill_times_out_naming_the_room(cluster):
    dead = free_port()
    r = _post(cluster["decode"].url, {"input_ids": [5, 6], "bootstrap_host": "127.0.0.1", "bootstrap_port": dead,
                                      "bootstrap_room": 77})
    assert r.status_code == 500
    msg = r.json()["error"]["message"]
    assert "bootstrap timeout" in msg and "bootstrap_room 77" in msg and f"127.0.0.1:{dead}" in msg


def test_request_errors_are_400(cluster):
    agg, decode = cluster["agg"].url, cluster["decode"].url
    assert _post(decode, {"input_ids": [5, 6]}).status_code == 400          # no bootstrap fields
    assert _post(agg, {"input_ids": [5, 100000]}).status_code == 400       # id outside the vocabulary
    assert "entries for a batch of 2" in _post(agg, {"text": ["a", "b"], "rid": ["x"]}).json()["error"]["message"]
    assert _post(agg, {"text": "x", "sampling_params": {"max_new_tokens": -1}}).status_code == 400
    r = _post(agg, {"input_ids": [7] * 500, "sampling_params": {"max_new_tokens": 50, "ignore_eos": True}})
    assert r.status_code == 400 and "exceeds the model's 512" in r.json()["error"]["message"]
    assert _post(agg, {"input_ids": [7] * 4, "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_info_endpoints(cluster):
    url = cluster["prefill"].url
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    info = httpx.get(url + "/server_info", timeout=5).json()
    assert info["disaggregation_mode"] == "prefill" and info["bootstrap_port"] == cluster["boot"]
    assert info["torch_model"]["n_layers"] == 2
    models = httpx.get(cluster["agg"].url + "/v1/models", timeout=5).json()
    assert models["data"][0]["id"].endswith("tiny-llama")


def test_engine_registry_builds_the_torch_argv():
    w = WorkerLaunch(model_path="/m", served_name="m", mode="prefill", host="{addr}", port=30000, tp=1, dp=1, ep=1,
                     bootstrap_port=9000, transfer_backend="mooncake", options={"layers": 4, "dim": 128})
    argv = get_engine("torch").argv(w)
    assert argv[:3] == ["python3", "-m", "hpcserve.torchengine"]
    assert argv[argv.index("--disaggregation-bootstrap-port") + 1] == "9000"
    assert argv[-4:] == ["--torch-layers", "4", "--torch-dim", "128"]


def test_openai_endpoints_through_the_pd_router_match_the_oracle(cluster):
    import openai

    from hpcserve.engine_shell.tokenizer import apply_chat_template, decode, encode
    oracle = cluster["oracle"]
    client = openai.OpenAI(base_url=cluster["router"].url + "/v1", api_key="unused", timeout=30, max_retries=0)
    msgs = [{"role": "user", "content": "Say something."}]
    want = generate(oracle, encode(apply_chat_template(msgs)), 7, ignore_eos=True)
    chat = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=7, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == decode(want)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 7

    want = generate(oracle, encode("Once upon"), 6, temperature=0.7, seed=3, ignore_eos=True)
    cmpl = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0.7, seed=3,
                                     extra_body={"ignore_eos": True})
    assert cmpl.choices[0].text == decode(want)
    deltas = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=6, temperature=0.7, seed=3, stream=True,
        extra_body={"ignore_eos": True})]
    assert deltas == [decode([t]) for t in want]
    want = decode(generate(oracle, encode("x"), 5, ignore_eos=True))
    two = client.completions.create(model="tiny", prompt="x", n=2, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in two.choices] == [want, want] and two.usage.completion_tokens == 10


def test_batch_generate_through_the_pd_router_matches_the_oracle(cluster):
    oracle = cluster["oracle"]
    cases = _cases(4, seed=44)
    body = {"input_ids": [p for p, _ in cases],
            "sampling_params": [{"max_new_tokens": n, "temperature": 0} for _, n in cases]}
    for url in (cluster["router"].url, cluster["agg"].url):
        r = _post(url, body)
        assert r.status_code == 200, r.text
        assert [x["output_ids"] for x in r.json()] == [generate(oracle, p, n) for p, n in cases]
