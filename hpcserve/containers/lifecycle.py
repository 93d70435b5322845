"""How a started process is tied to its starter: it dies with it (bottom layer, used by agent and backends)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when its parent dies, so a SIGKILLed agent leaves no orphans. The
    setting survives exec of ch-run and apptainer (neither is set-uid here) and of srun, whose death ends
    its step."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass

