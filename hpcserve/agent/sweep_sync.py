"""How the node agents of a one-allocation sweep stay in step, through files in the shared run dir.

- ``Barrier``: every agent of the allocation arrives before any goes on. Point transitions use it so that
  every process that changes is stopped on every node before any node starts the next point's processes
  (on a test cluster all nodes share one host: a port freed by one node may be taken by another).
- point end markers: whoever ends a point first (the head when its benchmark stage ends or the point fails,
  any agent whose critical process died) writes ``sweep/end-NNNN.json``; every agent follows it.

Every file carries the job's epoch (job id + restart count), so files of an earlier start are ignored.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from hpcserve.agent.hosts import epoch
from hpcserve.errors import BackendError
from hpcserve.rundir import RunPaths, atomic_write

POLL = 0.2


def sync_dir(top: Path) -> Path:
    return top / "sweep"


class Barrier:
    def __init__(self, top: Path, nodes: int, rank: int):
        self.folder, self.nodes, self.rank = sync_dir(top), nodes, rank

    def _arrived(self, tag: str, rank: int) -> bool:
        try:
            return (self.folder / f"{tag}.node{rank}").read_text() == epoch()
        except OSError:
            return False

    def arrive(self, tag: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / f"{tag}.node{self.rank}", epoch())

    async def wait(self, tag: str, timeout: float, stop: asyncio.Event) -> bool:
        """True once every agent arrived; False when ``stop`` is set first. Raises after ``timeout``."""
        self.arrive(tag)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            missing = [r for r in range(self.nodes) if not self._arrived(tag, r)]
            if not missing:
                return True
            if stop.is_set():
                return False
            if loop.time() > deadline:
                raise BackendError(f"sweep step {tag}: node agent(s) {missing} did not arrive within {timeout:.0f}s "
                                   f"(see logs/agent-node*.log in the sweep dir)")
            await asyncio.sleep(POLL)


def _end_path(top: Path, index: int) -> Path:
    return sync_dir(top) / f"end-{index:04d}.json"


def mark_point_end(top: Path, index: int, rank: int, ok: bool, why: str) -> None:
    if point_end(top, index) is None:   # the first writer names the cause
        sync_dir(top).mkdir(parents=True, exist_ok=True)
        atomic_write(_end_path(top, index), json.dumps(
            {"epoch": epoch(), "node": rank, "ok": ok, "why": why, "ts": time.time()}) + "\n")


def point_end(top: Path, index: int) -> dict | None:
    try:
        info = json.loads(_end_path(top, index).read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("epoch") == epoch() else None


async def wait_point_end(top: Path, index: int) -> dict:
    while True:
        info = point_end(top, index)
        if info is not None:
            return info
        await asyncio.sleep(POLL)


def write_node_record(point_dir: Path, rank: int, record: dict) -> None:
    """What this node kept, stopped and started for the point (and every PID), for users and tests."""
    atomic_write(point_dir / f"sweep-node{rank}.json", json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_points(top: Path) -> list[Path]:
    """The point dirs of a sweep, in order, from sweep.json (written by `hpcserve render/submit`)."""
    try:
        index = json.loads((top / RunPaths.SWEEP).read_text())
        return [top / entry["dir"] for entry in index]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackendError(f"{top / RunPaths.SWEEP} is missing or unreadable ({e}); re-render the sweep") from None
