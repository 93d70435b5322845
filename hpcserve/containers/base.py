"""Container runtime protocol and registry, and the one description of an engine launch they all take.

A runtime turns an ``EngineLaunch`` (the engine's argv as it runs inside the image, its binds, working
directory, environment and setup lines) into the argv the node agent executes on the node, outside the
image. The runtime also names the signal the agent sends to stop the engine, so that the engine inside
receives SIGTERM whatever sits in between (srun, for example, turns a SIGTERM it receives into a kill).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Protocol

from hpcserve.containers.lifecycle import die_with_parent
from hpcserve.errors import HpcserveError

# argv[0] of the small shell wrapper inside the image (shows in `ps` as the engine's parent).
WRAPPER_NAME = "hpcserve-engine"


@dataclass(frozen=True)
class EngineLaunch:
    """One engine process to start inside ``image`` (None: run it bare, as with the runtime none)."""

    argv: list[str]
    image: str | None = None
    binds: list[str] = field(default_factory=list)    # SRC[:DST]; DST defaults to SRC
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)  # what the plan set for this engine (e.g. CUDA_VISIBLE_DEVICES)
    setup: list[str] = field(default_factory=list)     # shell lines run inside the image before the engine
    name: str = "engine"
    node: int = 0                                       # the plan's node index (SLURM_NODEID) it runs on
    node_name: str | None = None                        # Slurm's name of that node, when known


class ContainerRuntime(Protocol):
    name: str

    def command(self, launch: EngineLaunch) -> list[str]:
        """The argv the agent runs on the node (outside the image) to start the engine inside it."""

    def stop_signal(self, launch: EngineLaunch) -> int:
        """The signal the agent sends that process to stop the engine; it arrives inside as SIGTERM."""

    def problem(self, launch: EngineLaunch) -> str | None:
        """What would keep the engine from starting on this node (runtime or image missing), said with its
        fix; None when nothing is known to be wrong. Checked before the engine starts."""


RUNTIMES: dict[str, ContainerRuntime] = {}


def register(runtime: ContainerRuntime, *aliases: str) -> ContainerRuntime:
    for name in (runtime.name, *aliases):
        RUNTIMES[name] = runtime
    return runtime


def runtime_names() -> list[str]:
    _load_builtin()
    return sorted(RUNTIMES)


def get_runtime(name: str) -> ContainerRuntime:
    _load_builtin()
    try:
        return RUNTIMES[name]
    except KeyError:
        raise HpcserveError(f"unknown container runtime {name!r}; choose one of: {', '.join(sorted(RUNTIMES))}") \
            from None


def split_bind(bind: str) -> tuple[str, str]:
    """SRC[:DST[:OPTIONS]] -> (SRC, DST)."""
    src, _, dst = bind.partition(":")
    return src, (dst.split(":", 1)[0] if dst else src)


def full_bind(bind: str) -> str:
    """SRC:DST[:OPTIONS] with DST filled in (pyxis and apptainer take options such as ro)."""
    parts = bind.split(":")
    return ":".join([parts[0], parts[1] if len(parts) > 1 and parts[1] else parts[0], *parts[2:]])


def binds_for(run_dir: str, model_path: str | None, mounts: list[str]) -> list[str]:
    """The run dir (plan, logs, outputs), the model when it is a path, then the profile's mounts; a path
    already under one of the other binds' destinations is not bound twice."""
    out = list(mounts)
    for path in (run_dir, model_path):
        if path and path.startswith("/") and not any(_under(path, split_bind(b)[1]) for b in out):
            out.insert(0, f"{path}:{path}")
    return out


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/") or root == "/"


def shell_wrapper(launch: EngineLaunch, relay: str | None = None) -> list[str]:
    """argv for ``sh -c`` inside the image when it is needed: setup lines first, then the engine.

    ``relay`` names a signal the launcher (srun) forwards unchanged: the shell turns it into SIGTERM for the
    engine. The engine starts with that signal ignored, because srun signals the whole process group.
    Without setup or relay the engine argv is returned as it is (the runtime then execs it directly).
    """
    if not launch.setup and relay is None:
        return list(launch.argv)
    lines = list(launch.setup)
    if relay is None:
        lines.append('exec "$@"')
    else:
        lines += [f'trap "" {relay}', '"$@" &', "pid=$!",
                  f'trap \'kill -TERM "$pid" 2>/dev/null\' {relay} TERM',
                  # wait returns early when a trapped signal arrives: wait again until the engine is gone
                  'while :; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done',
                  'exit "$rc"']
    return ["/bin/sh", "-c", "\n".join(lines), WRAPPER_NAME, *launch.argv]


def describe(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def missing_tool(binary: str, runtime: str) -> str | None:
    if shutil.which(binary) is None:
        return (f"{binary} not found on this node ({os.uname().nodename}); install {runtime} there or choose "
                f"another cluster.container_runtime")
    return None


def missing_image(image: str) -> str | None:
    """A local image path that does not exist (registry references such as docker://... are not checked)."""
    if image.startswith("/") and not os.path.exists(image):
        return f"image {image} does not exist on this node ({os.uname().nodename}); fix engine.container"
    return None


_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from hpcserve.containers import runtimes  # noqa: F401  (registers)


def engine_command(settings, name: str, argv: list[str], env: dict[str, str], node: int, run_dir: str,
                   node_name: str | None = None, check: bool = True) -> tuple[list[str], int]:
    """The node agent's call: the argv that starts this engine through the plan's runtime, and the signal
    that stops it. ``settings`` is the plan's container part (container_runtime, container,
    container_mounts, container_setup); it is read by attribute so this layer does not import the plan.
    ``check``: first ask the runtime whether the engine can start here (one-line error naming the fix)."""
    model = argv[argv.index("--model-path") + 1] if "--model-path" in argv[:-1] else None
    launch = EngineLaunch(
        argv=list(argv), image=settings.container, workdir=run_dir, env=dict(env), name=name, node=node,
        node_name=node_name, setup=list(getattr(settings, "container_setup", []) or []),
        binds=binds_for(run_dir, model, list(settings.container_mounts)) if settings.container else [])
    runtime = get_runtime(settings.container_runtime)
    problem = runtime.problem(launch) if check else None
    if problem:
        raise HpcserveError(f"{name}: {problem}")
    return runtime.command(launch), int(runtime.stop_signal(launch))


def run_in_image(settings, argv: list[str], run_dir: str, model_path: str | None = None,
                 timeout: float = 120.0) -> tuple[int, str]:
    """Run a short command in the engine's image the way the engine will run (same runtime and binds), for
    checks before any engine starts (``hpcserve doctor``): (exit code, last line of its output). Raises
    HpcserveError with the fix when the runtime or image is missing, or the command does not end in time."""
    launch = EngineLaunch(list(argv), image=settings.container, workdir=run_dir, env=dict(os.environ),
                          name="image-check", binds=binds_for(run_dir, model_path, list(settings.container_mounts))
                          if settings.container else [])
    runtime = get_runtime(settings.container_runtime)
    problem = runtime.problem(launch)
    if problem:
        raise HpcserveError(problem)
    try:
        res = subprocess.run(runtime.command(launch), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=timeout, start_new_session=True, preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired:
        raise HpcserveError(f"image {settings.container} did not run `{describe(argv)}` within {timeout:.0f}s "
                            f"through {runtime.name}") from None
    except OSError as e:
        raise HpcserveError(f"cannot start {runtime.name}: {e.strerror}") from None
    lines = (res.stderr + res.stdout).strip().splitlines()
    return res.returncode, lines[-1] if lines else ""


def image_starts(settings, run_dir: str, timeout: float = 120.0) -> str | None:
    """None when the engine's image starts through its runtime (``true`` runs in it), else why not."""
    if not settings.container:
        return None
    try:
        code, last = run_in_image(settings, ["true"], run_dir, timeout=timeout)
    except HpcserveError as e:
        return str(e)
    if code != 0:
        return f"image {settings.container} does not start with {settings.container_runtime} (exit {code}): {last}"
    return None
