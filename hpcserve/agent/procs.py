"""The one place a process spec becomes a running process (and the one place processes are stopped).

Each child gets its own process group (so stopping it stops everything it spawned) and dies with the
agent (PR_SET_PDEATHSIG), so neither a graceful stop nor a SIGKILLed agent leaves orphans. Each child
ignores SIGUSR2: Slurm sends the time-limit signal (--signal=USR2@N) to every process of the step, and its
default action would kill engines, Redis and the router at once instead of letting their agent drain them.
The agent's event loop (uvloop, so libuv) resets every signal to its default in the child after preexec_fn,
so the ignore is set by a POSIX shell that then execs the program (an ignored signal stays ignored across
exec; a program that handles USR2 itself, like the batch driver, still gets it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from hpcserve.agent.gpus import visible_devices
from hpcserve.containers.lifecycle import die_with_parent
from hpcserve.errors import BackendError

# Variables of the agent's own srun step that would mislead frameworks inside the engine.
_STEP_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_STEPID", "SLURM_STEP_ID",
              "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_CPU_BIND", "SLURM_CPU_BIND_LIST",
              "SLURM_CPU_BIND_TYPE", "SLURM_CPU_BIND_VERBOSE", "SLURM_DISTRIBUTION", "SLURM_TASKS_PER_NODE")


# What a child takes from the agent's (the login's) environment besides the recipe's and group's env: the
# system basics, the Python setup the job was submitted with, Slurm's job variables and the settings of the
# GPU, communication, container and engine stacks. Anything else stays with the agent: a login session's
# variables do not reach engines (recipe `env:` passes a variable on on purpose).
_INHERIT = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "HOSTNAME",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "LIBRARY_PATH", "CPATH", "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED",
    "VIRTUAL_ENV", "MODULEPATH", "LOADEDMODULES", "CC", "CXX", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"})
_INHERIT_PREFIXES = (
    "LC_", "XDG_", "SLURM_", "SLURMD_", "PMI_", "PMIX_", "CONDA_", "CUDA_", "NVIDIA_", "NCCL_", "NVSHMEM_",
    "UCX_", "FI_", "GLOO_", "OMP_", "MKL_", "TORCH", "PYTORCH_", "TRITON_", "HF_", "TRANSFORMERS_", "SGLANG_",
    "FLASHINFER_", "HPCSERVE_", "CH_", "APPTAINER", "SINGULARITY", "ENROOT_", "PYXIS_", "DYN_", "NATS_", "ETCD_")


def inherited(environ: dict[str, str], secrets: frozenset[str] = frozenset()) -> dict[str, str]:
    """The part of ``environ`` every child gets: the names and prefixes above, without the agent's step
    variables and without ``secrets`` (given back by name only to the processes that use them)."""
    return {k: v for k, v in environ.items()
            if (k in _INHERIT or k.startswith(_INHERIT_PREFIXES)) and k not in _STEP_VARS and k not in secrets}


def child_env(*layers: dict[str, str], secrets: frozenset[str] = frozenset(),
              keep: frozenset[str] = frozenset()) -> dict[str, str]:
    """What a child starts with: the inherited part of the agent's environment without ``secrets`` except
    those in ``keep``, then the layers; GPU indices a layer sets are mapped onto the devices Slurm gave this
    step (hpcserve.agent.gpus)."""
    env = inherited(dict(os.environ), secrets - keep)
    env.update({k: os.environ[k] for k in keep if k in os.environ})
    for layer in layers:
        env.update(layer)
    planned = next((layer["CUDA_VISIBLE_DEVICES"] for layer in reversed(layers) if "CUDA_VISIBLE_DEVICES" in layer),
                   None)
    if planned is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(planned, os.environ)
    return env


def cpu_shares(weights: dict[str, int], cpus: list[int]) -> dict[str, list[int]]:
    """Consecutive, disjoint parts of ``cpus`` for each name, in proportion to its weight (an engine's GPUs),
    each at least one core. With fewer cores than names, names share cores in turn."""
    names = sorted(weights)
    if not names or not cpus:
        return {}
    if len(cpus) < len(names):
        return {n: [cpus[i % len(cpus)]] for i, n in enumerate(names)}
    total = sum(max(1, weights[n]) for n in names)
    out, start, acc = {}, 0, 0
    for i, n in enumerate(names):
        acc += max(1, weights[n])
        # cumulative rounding, leaving at least one core for each name still to come
        end = len(cpus) if i == len(names) - 1 else max(start + 1, min(len(cpus) - (len(names) - i - 1),
                                                                         round(acc * len(cpus) / total)))
        out[n] = cpus[start:end]
        start = end
    return out


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None


_IGNORE_USR2 = ("/bin/sh", "-c", 'trap "" USR2; exec "$@"')


async def spawn(name: str, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path,
                cpus: list[int] | None = None) -> Child:
    """Start ``argv``; ``cpus``: bind it (and what it starts) to these cores."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    prog = shutil.which(argv[0], path=env.get("PATH", os.defpath)) if "/" not in argv[0] else argv[0]
    if prog is None or not os.path.exists(prog):
        raise BackendError(f"{name}: cannot start {argv[0]!r}: not found on this node; "
                           f"fix engine.python / cluster.python or install it")
    if not os.access(prog, os.X_OK):
        raise BackendError(f"{name}: cannot execute {argv[0]!r}: permission denied")
    with open(log_path, "ab", buffering=0) as log:
        proc = await asyncio.create_subprocess_exec(
            *_IGNORE_USR2, argv[0], *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
            stderr=asyncio.subprocess.STDOUT, env=env, cwd=str(cwd), start_new_session=True,
            preexec_fn=die_with_parent if not cpus else lambda: _bind_and_die_with_parent(cpus))
    return Child(name, proc)


def _bind_and_die_with_parent(cpus: list[int]) -> None:
    os.sched_setaffinity(0, cpus)   # inherited across the shell's exec and by the engine's own children
    die_with_parent()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def stop(child: Child, grace: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
    """``sig`` (SIGTERM, or what the container runtime relays as SIGTERM) to the child's process group,
    SIGKILL after ``grace`` seconds; returns the exit code."""
    if child.running:
        _signal_group(child.pid, sig)
        try:
            await asyncio.wait_for(child.proc.wait(), grace)
        except asyncio.TimeoutError:
            pass
    _signal_group(child.pid, signal.SIGKILL)   # stragglers the child left in its group
    if child.running:
        try:
            await asyncio.wait_for(child.proc.wait(), 5)
        except asyncio.TimeoutError:
            pass
    return child.proc.returncode
