"""`hpcserve top RUN_DIR|JOB_ID`: a live view of a deployment (per worker load, rates and latency from the
router's /metrics, state and restarts from the control API, the last events); `hpcserve drain|restart
WORKER --run RUN`: operator actions through the control API."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hpcserve.cli.common import console, fail, guarded
from hpcserve.rundir import RunPaths

RunOpt = typer.Option(".", "--run", "-r", help="Run directory or Slurm job id (default: the current directory).")


def run_dir_of(target: str) -> Path:
    """A run directory (a continuous run's current generation) or the run dir of a Slurm job id."""
    from hpcserve.agent.handover import current_dir
    p = Path(target)
    if (p / RunPaths.PLAN).exists() or (p / RunPaths.JOB).exists():
        return current_dir(p)
    if not target.replace("_", "").isdigit():
        fail(f"{target}: not a run directory (no plan.json) nor a Slurm job id; pass --run RUN_DIR|JOB_ID"
             if target == "." else f"{target}: not a run directory (no plan.json) nor a Slurm job id")
    from hpcserve.status import collect
    st = collect([target])[0]
    if not st.run_dir:
        fail(f"{target}: no run directory found (not a run dir, and Slurm does not know that job)")
    return current_dir(Path(st.run_dir))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


class TopView:
    """Two scrapes make a rate; everything else is the latest scrape."""

    def __init__(self, client, events: int) -> None:
        self.client = client
        self.events = events
        self.prev = None          # (monotonic time, RouterStats)
        self.rows: dict = {}

    async def snapshot(self) -> dict:
        from hpcserve.control import routerstats
        run, workers, events, text = await asyncio.gather(
            self.client.call("GET", "/v1/run"), self.client.call("GET", "/v1/workers"),
            self.client.call("GET", f"/v1/events?count={self.events}"), self.client.router_metrics())
        now, stats = time.monotonic(), routerstats.parse(text)
        prev_t, prev = self.prev or (now, None)
        dt = now - prev_t
        self.prev = (now, stats)

        def rate(cur: int, old: int | None) -> float | None:
            return None if old is None or dt <= 0 else max(0.0, (cur - old) / dt)
        rows = []
        for w in workers:
            s = stats.workers.get(w["id"], routerstats.WorkerStats())
            p = prev.workers.get(w["id"]) if prev else None
            rows.append({"worker": w["id"], "role": w["role"], "node": w["node"], "state": w["state"],
                         "rotation": w["rotation"], "restarts": w["restarts"], "inflight": s.inflight,
                         "req_per_s": rate(s.requests, p.requests if p else None),
                         "tok_per_s": rate(s.tokens, p.tokens if p else None), "requests": s.requests,
                         "tokens": s.tokens, "ttft_p50": s.quantile("ttft", 0.5), "ttft_p99": s.quantile("ttft", 0.99),
                         "itl_p50": s.quantile("itl", 0.5), "itl_p99": s.quantile("itl", 0.99),
                         "last_error": w.get("last_error", "")})
        t = routerstats.merged(stats)
        pt = routerstats.merged(prev) if prev else None
        total = {"inflight": stats.inflight, "queued": stats.queued,
                 "req_per_s": rate(t.requests, pt.requests if pt else None),
                 "tok_per_s": rate(t.tokens, pt.tokens if pt else None), "requests": t.requests, "tokens": t.tokens,
                 "ttft_p50": t.quantile("ttft", 0.5), "ttft_p99": t.quantile("ttft", 0.99),
                 "itl_p50": t.quantile("itl", 0.5), "itl_p99": t.quantile("itl", 0.99)}
        return {"run": run, "workers": rows, "total": total, "events": events["events"],
                "at": datetime.datetime.now().strftime("%H:%M:%S")}


def render(doc: dict, interval: float) -> Group:
    run = doc["run"]
    head = Text(f"hpcserve top  {run['name']} ({run['run_id']})  phase {run['phase']}  {run['mode']}  "
                f"endpoint {run['endpoint'] or '-'}  at {doc['at']} (every {interval:g} s)")
    t = Table(box=None, pad_edge=False)
    cols = ("worker", "role", "node", "state", "rot", "restarts", "in-flight", "req/s", "tok/s", "requests",
            "tokens", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms")
    for c in cols:
        t.add_column(c, justify="left" if c in ("worker", "role", "state") else "right")

    def nums(r: dict) -> list[str]:
        rate = [("-" if r[k] is None else f"{r[k]:.1f}") for k in ("req_per_s", "tok_per_s")]
        return [str(r["inflight"]), *rate, str(r["requests"]), str(r["tokens"]),
                *(_ms(r[k]) for k in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99"))]
    for r in doc["workers"]:
        t.add_row(r["worker"], r["role"], str(r["node"]), r["state"], "in" if r["rotation"] else "out",
                  str(r["restarts"]), *nums(r))
    tot = doc["total"]
    t.add_row("total", "", "", f"queued {tot['queued']}", "", "", *nums(tot), style="bold")
    ev = Table(box=None, pad_edge=False, show_header=False, title="last events", title_justify="left")
    for e in doc["events"]:
        when = datetime.datetime.fromtimestamp(e["ts"]).strftime("%H:%M:%S")
        ev.add_row(when, e["kind"], " ".join(f"{k}={v}" for k, v in e["fields"].items()))
    return Group(head, Text("TTFT/ITL: since router start; rates: since the last refresh"), t, ev)


async def _top(run_dir: Path, interval: float, events: int, once: bool, as_json: bool) -> int:
    from hpcserve.control.client import ControlClient, HeadUnreachable
    client = ControlClient.for_run(run_dir, timeout=max(2.0, interval * 2))
    async with client:
        view = TopView(client, events)
        if once:
            await view.snapshot()
            await asyncio.sleep(interval)   # a second scrape: rates need two
            doc = await view.snapshot()
            if as_json:
                sys.stdout.write(json.dumps(doc) + "\n")
            else:
                console.print(render(doc, interval))
            return 0
        with Live(Text(f"connecting to {client.url} ..."), console=console, auto_refresh=False,
                  transient=False) as live:
            while True:
                try:
                    live.update(render(await view.snapshot(), interval), refresh=True)
                except HeadUnreachable as err:
                    view.prev = None
                    live.update(Text(f"{err}; retrying every {interval:g} s (Ctrl-C quits)", style="bold red"),
                                refresh=True)
                await asyncio.sleep(interval)


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def top(target: str = typer.Argument(..., help="Run directory or Slurm job id."),
            interval: float = typer.Option(1.0, "--interval", "-n", min=0.2, help="Seconds between refreshes."),
            events: int = typer.Option(8, "--events", min=0, max=200, help="How many recent events to show."),
            once: bool = typer.Option(False, "--once", help="Print one view (two scrapes apart) and exit."),
            as_json: bool = typer.Option(False, "--json", help="With --once: one JSON document.")):
        """Live view of a deployment: per worker in-flight, req/s, tok/s, TTFT and ITL, state, restarts."""
        from hpcserve import aio
        from hpcserve.control.client import HeadUnreachable
        run_dir = run_dir_of(target)
        try:
            raise typer.Exit(aio.run(_top(run_dir, interval, events, once, as_json)))
        except HeadUnreachable as err:
            fail(str(err), 1)

    def action(verb: str, worker: str, target: str, method: str, timeout: float, as_json: bool,
               force: bool = False) -> None:
        from hpcserve.control.client import call
        query = f"timeout={timeout:g}" + ("&force=true" if force else "")
        doc = call(run_dir_of(target), method, f"/v1/workers/{worker}/{verb}?{query}", timeout=timeout + 15)
        if as_json:
            sys.stdout.write(json.dumps(doc) + "\n")
        else:
            console.print(("ok " if doc["ok"] else "not done: ") + doc["message"], markup=False)
        if not doc["ok"]:
            raise typer.Exit(1)

    @app.command()
    @guarded
    def drain(worker: str = typer.Argument(..., help="Worker id (see `hpcserve top` or `status`)."),
              run: str = RunOpt, timeout: float = typer.Option(60.0, help="Seconds to wait for in-flight requests."),
              as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead."),
              force: bool = typer.Option(False, "--force", help="Drain even the last worker of its role in "
                                         "rotation (new requests then get 503).")):
        """Take a worker out of rotation and wait until its in-flight requests are done."""
        action("drain", worker, run, "POST", timeout, as_json, force)

    @app.command()
    @guarded
    def restart(worker: str = typer.Argument(..., help="Worker id (see `hpcserve top` or `status`)."),
                run: str = RunOpt, timeout: float = typer.Option(120.0, help="Seconds to wait until it is ready."),
                as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead.")):
        """Restart a worker's engine and wait until it serves again (outside its restart budget)."""
        action("restart", worker, run, "POST", timeout, as_json)
