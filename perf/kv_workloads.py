"""The workloads of perf/kv_routing.py: chat sessions, shared system prompts, a Mooncake-style trace.

Each workload is a list of sessions; a session is a list of items, ("chat", system, questions, reply
tokens of each turn) or ("text", prompt, output tokens). One token is one byte (the mock's tokenizer).
"""

from __future__ import annotations

import random

from hpcserve.mock.model import WORDS

BLOCK = 16


def words(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        w = WORDS[rng.randrange(len(WORDS))]
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


def turn(role: str, text: str) -> str:
    return f"<|{role}|>\n{text}\n"


# ---- workloads: each a list of sessions; a session is a list of (prompt builder, max_new_tokens)

def multiturn(rng: random.Random, sessions: int = 24, turns: int = 6, system_tokens: int = 1500,
              user_tokens: int = 200, reply_tokens: int = 250, spread: float = 0.5) -> list[list]:
    """Chat sessions as long as real ones (one token per byte): the sixth turn resends about 4k tokens.

    User turns and replies vary in length, each drawn uniformly within +-``spread`` of its mean (vLLM's
    synthetic multi-turn benchmark draws them uniformly too, within about +-20%:
    benchmarks/multi_turn/generate_multi_turn.json): real replies end where the model's end-of-sequence
    token falls, and vary more than +-50%. With every reply exactly as long,
    sessions that share a worker finish in the same decode step and send their next turns together,
    a synchronisation that real traffic does not have (docs/kv-routing.md).
    """
    system = turn("system", words(random.Random(1), system_tokens))

    def draw(mean: int) -> int:
        return rng.randint(round(mean * (1 - spread)), round(mean * (1 + spread)))

    out = []
    for s in range(sessions):
        qs = [words(rng, draw(user_tokens)) for _ in range(turns)]
        out.append([("chat", system, qs, [draw(reply_tokens) for _ in range(turns)])])
    return out


def sysprompts(rng: random.Random, users: int = 160, prompts: int = 4) -> list[list]:
    systems = [turn("system", words(random.Random(10 + i), 3000)) for i in range(prompts)]
    return [[("text", systems[rng.randrange(prompts)] + turn("user", words(rng, 150)) + "<|assistant|>\n", 24)]
            for _ in range(users)]


def mooncake(rng: random.Random, requests: int = 160, chunk_tokens: int = 64) -> list[list]:
    """Mooncake-style: hash ids per request (shared ids = shared prefix), skewed towards few roots."""
    chunks: dict[int, str] = {}

    def chunk(h: int) -> str:
        if h not in chunks:
            chunks[h] = words(random.Random(1000 + h), chunk_tokens)
        return chunks[h]

    trace, next_id = [], 0
    roots: list[list[int]] = []
    for _ in range(requests):
        if roots and rng.random() < 0.8:  # extend or reuse an earlier request's ids (Zipf-like reuse)
            base = roots[min(int(rng.paretovariate(1.2)) - 1, len(roots) - 1)]
            ids = base[:rng.randint(max(1, len(base) // 2), len(base))]
        else:
            ids = []
        for _ in range(rng.randint(2, 12)):
            ids = ids + [next_id]
            next_id += 1
        roots.insert(0, ids)
        trace.append({"hash_ids": ids, "output_length": 16})
    return [[("text", "".join(chunk(h) for h in t["hash_ids"]) + words(rng, 40), t["output_length"])]
            for t in trace]


WORKLOADS = {"multiturn": multiturn, "sysprompts": sysprompts, "mooncake": mooncake}


def working_set_blocks(sessions: list[list]) -> int:
    """Distinct full blocks of all prompts (multiturn counted at its last turn: the longest history)."""
    seen = set()
    for sess in sessions:
        for kind, head, tail, n_out in ((s[0], s[1], s[2], s[3]) if s[0] == "chat" else (s[0], s[1], None, s[2])
                                        for s in sess):
            text = head + ("".join(turn("user", q) + turn("assistant", "x" * n) for q, n in zip(tail, n_out))
                           if tail else "")
            data = text.encode()
            for e in range(BLOCK, len(data) + 1, BLOCK):
                seen.add(hash(data[:e]))
    return len(seen)
