"""The C harness of perf/router.py (perf/harness.c): built once per run with the system C compiler, fed
the same canned answers and request bodies as the Python harness in router_fake.py."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path

from router_fake import fake_answers, http_answer, load_requests

SOURCE = Path(__file__).resolve().parent / "harness.c"


def build(workdir: Path) -> Path | None:
    """Compile the harness; None when there is no C compiler (the caller says so and uses Python)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out = workdir / "harness"
    subprocess.run([cc, "-O2", "-o", str(out), str(SOURCE)], check=True)
    return out


def answers_file(role: str, workdir: Path) -> Path:
    path = workdir / f"answers-{role}.bin"
    with open(path, "wb") as f:
        for (route, stream), body in fake_answers(role).items():
            data = http_answer(role, bool(stream), body)
            f.write(b"%b %d %d\n%b" % (route, stream, len(data), data))
    return path


def serve_argv(harness: Path, role: str, port: int, workdir: Path) -> list[str]:
    return [str(harness), "serve", str(port), str(answers_file(role, workdir)), role]


def _requests_file(target: dict, stream: bool, workdir: Path) -> Path:
    path = Path(tempfile.mkstemp(prefix="requests-", suffix=".bin", dir=workdir)[1])
    with open(path, "wb") as f:
        for req in load_requests(target, stream):
            f.write(b"%d\n%b" % (len(req), req))
    return path


def _load(harness: Path, target: dict, n: int, conc: int, stream: bool, workdir: Path):
    ports = [target["prefill_port"], target["decode_port"]] if target["kind"] == "direct" else [target["port"]]
    reqs = _requests_file(target, stream, workdir)
    lat_path = reqs.with_suffix(".lat")
    try:
        out = subprocess.run([str(harness), "load", str(n), str(conc), str(reqs), str(lat_path), str(int(stream)),
                              *map(str, ports)], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"load generator failed: {out.stderr.strip()}")
        rps, errors = out.stdout.split()
        lat = [float(x) for x in lat_path.read_text().split()]
    finally:
        reqs.unlink(missing_ok=True)
        lat_path.unlink(missing_ok=True)
    return float(rps), lat, int(errors)


async def run_load(harness: Path, target: dict, n: int, conc: int, stream: bool, workdir: Path):
    """Same contract as router_fake.run_load: (req/s, latencies in seconds, errors)."""
    return await asyncio.to_thread(_load, harness, target, n, conc, stream, workdir)
