"""What each request sends: random token ids of an exact length (deterministic by seed) or dataset rows."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import orjson

from hpcserve.errors import HpcserveError

# Ids in this range are ordinary tokens for every common vocabulary (all have >= 32000 entries) and
# stay clear of the low ids some tokenizers reserve for BOS/EOS/padding.
DEFAULT_TOKEN_RANGE = (1000, 30000)


class BenchError(HpcserveError):
    """A benchmark input the user can fix (bad dataset, bad option)."""


@dataclass(frozen=True)
class RequestSpec:
    """One request's payload: exactly one of ``input_ids`` and ``prompt`` is set."""

    input_ids: tuple[int, ...] | None = None
    prompt: str | None = None
    output_len: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Known only for token ids; for text prompts the server reports it."""
        return len(self.input_ids) if self.input_ids is not None else 0


def random_requests(n: int, isl: int, osl: int, *, seed: int, tag: str = "",
                    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE) -> list[RequestSpec]:
    """``n`` distinct prompts of exactly ``isl`` ids. ``tag`` (e.g. the level) keeps levels from sharing
    prompts, so a later level never gets a prefix-cache hit from an earlier one."""
    population = range(*token_range)
    return [RequestSpec(input_ids=tuple(random.Random(f"{seed}:{tag}:{i}").choices(population, k=isl)),
                        output_len=osl) for i in range(n)]


def load_dataset(path: Path, default_osl: int | None) -> list[RequestSpec]:
    """JSONL rows with ``prompt`` (text) or ``input_ids`` (list of ints), optional ``output_len``."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"dataset {path} not found; pass an existing JSONL file to --dataset")
    rows: list[RequestSpec] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise BenchError(f"{where}: not valid JSON ({e}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise BenchError(f"{where}: expected a JSON object with 'prompt' or 'input_ids'")
            rows.append(_row_to_spec(row, where, default_osl))
    if not rows:
        raise BenchError(f"dataset {path} is empty; it needs one JSON object per line")
    return rows


def _row_to_spec(row: dict, where: str, default_osl: int | None) -> RequestSpec:
    osl = row.get("output_len", default_osl)
    if osl is None:
        raise BenchError(f"{where}: no 'output_len' in the row; add it or pass --osl")
    if not isinstance(osl, int) or isinstance(osl, bool) or osl < 0:
        raise BenchError(f"{where}: 'output_len' must be a non-negative integer, got {osl!r}")
    if "input_ids" in row:
        ids = row["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise BenchError(f"{where}: 'input_ids' must be a non-empty list of non-negative integers")
        return RequestSpec(input_ids=tuple(ids), output_len=osl)
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BenchError(f"{where}: needs a non-empty 'prompt' string or an 'input_ids' list")
    return RequestSpec(prompt=prompt, output_len=osl)


def take(rows: list[RequestSpec], n: int, offset: int = 0) -> list[RequestSpec]:
    """``n`` rows starting at ``offset``, wrapping around a dataset smaller than the run."""
    return [rows[(offset + i) % len(rows)] for i in range(n)]
