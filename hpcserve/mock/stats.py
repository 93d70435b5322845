"""Counters of one mock server: /mock/stats (JSON for tests) and /metrics (Prometheus text)."""

from __future__ import annotations

from typing import Any


class Stats:
    def __init__(self, role: str, model_name: str) -> None:
        self.role = role
        self.model_name = model_name
        self.requests: dict[str, int] = {}          # endpoint -> requests received
        self.responses_ok = 0
        self.errors = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.inflight = 0                           # requests being answered (any endpoint that generates)
        self.rooms_put = 0                          # prefill: rooms whose KV was computed
        self.rooms_fetched = 0                      # prefill: rooms a decode took
        self.rooms_bootstrapped = 0                 # decode: rooms fetched and verified
        self.bootstrap_timeouts = 0                 # either side
        self.kv_mismatches = 0                      # decode: the prefill's KV was for another prompt
        self.pd_rejected = 0                        # decode: requests without bootstrap fields

    def count(self, endpoint: str) -> None:
        self.requests[endpoint] = self.requests.get(endpoint, 0) + 1

    def snapshot(self, running: int, queued: int) -> dict[str, Any]:
        total = sum(self.requests.values())
        return {
            "role": self.role,
            "requests": dict(self.requests),
            "requests_total": total,
            "requests_by_role": {self.role: total},
            "responses_ok": self.responses_ok,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "inflight": self.inflight,
            "running": running,
            "queued": queued,
            "rooms_put": self.rooms_put,
            "rooms_fetched": self.rooms_fetched,
            "rooms_bootstrapped": self.rooms_bootstrapped,
            "bootstrap_timeouts": self.bootstrap_timeouts,
            "kv_mismatches": self.kv_mismatches,
            "pd_rejected": self.pd_rejected,
        }

    def prometheus(self, running: int, queued: int, kv: dict[str, Any] | None = None) -> bytes:
        """SGLang's metric names where one exists (sglang:*), mock_* for the rest. ``kv``: the KV cache's
        view, when the server models one: then SGLang's token_usage and cache_hit_rate gauges as well."""
        m = self.model_name.replace("\\", "\\\\").replace('"', '\\"')
        lab = f'model_name="{m}"'
        lines = [
            "# HELP sglang:num_running_reqs Running requests.", "# TYPE sglang:num_running_reqs gauge",
            f"sglang:num_running_reqs{{{lab}}} {running}",
            "# HELP sglang:num_queue_reqs Queued requests.", "# TYPE sglang:num_queue_reqs gauge",
            f"sglang:num_queue_reqs{{{lab}}} {queued}",
            "# HELP sglang:prompt_tokens_total Prompt tokens processed.", "# TYPE sglang:prompt_tokens_total counter",
            f"sglang:prompt_tokens_total{{{lab}}} {self.prompt_tokens}",
            "# HELP sglang:generation_tokens_total Generated tokens.", "# TYPE sglang:generation_tokens_total counter",
            f"sglang:generation_tokens_total{{{lab}}} {self.generation_tokens}",
            "# HELP sglang:num_requests_total Requests answered.", "# TYPE sglang:num_requests_total counter",
            f"sglang:num_requests_total{{{lab}}} {self.responses_ok}",
        ]
        if kv is not None:
            usage = kv["used_blocks"] / kv["num_blocks"]
            hit = kv["hit_tokens"] / kv["query_tokens"] if kv["query_tokens"] else 0.0
            lines += ["# HELP sglang:token_usage Fraction of the KV cache in use.", "# TYPE sglang:token_usage gauge",
                      f"sglang:token_usage{{{lab}}} {usage:.6g}",
                      "# HELP sglang:cache_hit_rate Prompt tokens served from the prefix cache.",
                      "# TYPE sglang:cache_hit_rate gauge", f"sglang:cache_hit_rate{{{lab}}} {hit:.6g}"]
        lines += ["# HELP mock_requests_total Requests received per endpoint.", "# TYPE mock_requests_total counter"]
        for ep, n in sorted(self.requests.items()):
            lines.append(f'mock_requests_total{{{lab},endpoint="{ep}",role="{self.role}"}} {n}')
        lines += ["# HELP mock_errors_total Requests answered with an error.", "# TYPE mock_errors_total counter",
                  f"mock_errors_total{{{lab}}} {self.errors}",
                  "# HELP mock_bootstrap_timeouts_total PD rendezvous timeouts.",
                  "# TYPE mock_bootstrap_timeouts_total counter",
                  f"mock_bootstrap_timeouts_total{{{lab}}} {self.bootstrap_timeouts}",
                  "# HELP mock_rooms_bootstrapped_total PD rooms completed.",
                  "# TYPE mock_rooms_bootstrapped_total counter",
                  f"mock_rooms_bootstrapped_total{{{lab}}} {self.rooms_bootstrapped + self.rooms_fetched}"]
        return ("\n".join(lines) + "\n").encode()
