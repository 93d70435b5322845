"""The tiny torch decoder: KV cache against full recomputation, checkpoints, seeded sampling."""

from __future__ import annotations

import json
import random

import pytest

torch = pytest.importorskip("torch")

from hpcserve.torchengine import checkpoint  # noqa: E402
from hpcserve.torchengine.model import TinyConfig, TinyLlama  # noqa: E402
from hpcserve.torchengine.sampling import generate, generate_uncached  # noqa: E402

CFG = TinyConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def test_kv_cache_matches_recomputing_the_whole_sequence():
    model = TinyLlama.random(CFG, seed=3)
    for p in _prompts(5):
        assert generate(model, p, 12, ignore_eos=True) == generate_uncached(model, p, 12, ignore_eos=True)
        assert generate(model, p, 12) == generate_uncached(model, p, 12)


def test_greedy_output_depends_on_prompt_and_weights():
    a, b = TinyLlama.random(CFG, seed=1), TinyLlama.random(CFG, seed=2)
    outs = {tuple(generate(a, p, 8, ignore_eos=True)) for p in _prompts(6)}
    assert len(outs) > 1
    p = _prompts(1)[0]
    assert generate(a, p, 8, ignore_eos=True) != generate(b, p, 8, ignore_eos=True)


def test_saved_checkpoint_loads_to_identical_outputs(tmp_path):
    model = TinyLlama.random(CFG, seed=7)
    checkpoint.save(model, tmp_path / "tiny")
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    loaded = checkpoint.load(tmp_path / "tiny")
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    for p in _prompts(8):
        assert generate(loaded, p, 10) == generate(model, p, 10)
        assert generate(loaded, p, 10, temperature=0.8, seed=5) == generate(model, p, 10, temperature=0.8, seed=5)


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no config.json"):
        checkpoint.load(tmp_path)
    checkpoint.save(TinyLlama.random(CFG), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["hidden_size"] = 32
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="do not match"):
        checkpoint.load(tmp_path / "m")


def test_temperature_sampling_is_seeded():
    model = TinyLlama.random(CFG, seed=4)
    p = _prompts(1, seed=9)[0]
    a = generate(model, p, 16, temperature=1.0, seed=11, ignore_eos=True)
    assert a == generate(model, p, 16, temperature=1.0, seed=11, ignore_eos=True)
    others = {tuple(generate(model, p, 16, temperature=1.0, seed=s, ignore_eos=True)) for s in range(12, 16)}
    assert len(others | {tuple(a)}) > 1


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="heads"):
        TinyConfig(dim=64, n_heads=5)


def test_kv_wire_roundtrip_is_bit_exact_and_checked():
    from hpcserve.torchengine import kvwire
    model = TinyLlama.random(CFG, seed=2)
    _, cache = model([5, 6, 7, 8], 0, None)
    data = kvwire.pack(cache, {"first_token": 9})
    assert data[:4] == b"HPKV"
    back, meta = kvwire.unpack(data)
    assert meta == {"first_token": 9} and len(back) == CFG.n_layers
    for (k, v), (k2, v2) in zip(cache, back):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert len(data) > CFG.n_layers * 2 * 4 * CFG.n_kv_heads * CFG.head_dim * 4   # raw float32, not JSON text
    half = [(k.bfloat16(), v.bfloat16()) for k, v in cache]
    assert torch.equal(kvwire.unpack(kvwire.pack(half, {}))[0][1][0], half[1][0])
    with pytest.raises(kvwire.WireError, match="magic"):
        kvwire.unpack(b"JSON" + data[4:])
    with pytest.raises(kvwire.WireError, match="bytes"):
        kvwire.unpack(data[:-4])


def test_command_line_mistakes_are_one_line_exit_2(tmp_path):
    import subprocess
    import sys
    for args, words in ((["--model-path", "random", "--torch-layerz", "3"], "--torch-layerz"),
                        (["--model-path", str(tmp_path)], "config.json"),
                        (["--model-path", "random", "--torch-dim", "63"], "heads")):
        r = subprocess.run([sys.executable, "-m", "hpcserve.torchengine", "--port", "1", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_scheduler_interleaves_requests_and_matches_the_oracle():
    import asyncio

    from hpcserve.torchengine.sampling import Sampling
    from hpcserve.torchengine.scheduler import Scheduler, Seq
    model = TinyLlama.random(CFG, seed=6)
    long_p, short_p = _prompts(2, seed=12)
    finished: list[str] = []

    async def run():
        sched = Scheduler(model, max_running=4)
        sched.start()

        async def one(name, prompt, n):
            seq = await sched.submit(Seq(prompt, Sampling(n, ignore_eos=True)))
            finished.append(name)
            return seq.out
        try:
            outs = await asyncio.wait_for(asyncio.gather(one("long", long_p, 40), one("short", short_p, 5)), 60)
        finally:
            await sched.stop()
        return outs, sched.iterations

    (long_out, short_out), iterations = asyncio.run(run())
    assert long_out == generate(model, long_p, 40, ignore_eos=True)
    assert short_out == generate(model, short_p, 5, ignore_eos=True)
    assert finished == ["short", "long"]
    assert iterations == 40          # one step per iteration for both, not 40 + 5
