"""The built-in container runtimes. Each starts the engine so that the agent's stop signal reaches it as
SIGTERM and the agent's death (SIGKILL, PR_SET_PDEATHSIG on the started process) ends it."""

from __future__ import annotations

import os
import pwd
import signal

from hpcserve.containers.base import (EngineLaunch, full_bind, missing_image, missing_tool, register, shell_wrapper,
                                     split_bind)


class Bare:
    """No container: the engine runs in the node's environment (a virtual environment, modules)."""

    name = "none"

    def command(self, launch: EngineLaunch) -> list[str]:
        return shell_wrapper(launch)

    def stop_signal(self, launch: EngineLaunch) -> int:
        return signal.SIGTERM

    def problem(self, launch: EngineLaunch) -> str | None:
        return None


class Pyxis:
    """An srun step with pyxis's --container-image (enroot underneath), overlapping the agent's step on the
    same node, as srt-slurm starts SGLang. srun answers SIGTERM by killing the step, so the agent sends
    SIGUSR1, which srun forwards, and a shell inside the image turns it into SIGTERM for the engine. A
    killed srun (agent gone) makes Slurm end the step within seconds."""

    name = "pyxis"
    relay = "USR1"

    def command(self, launch: EngineLaunch) -> list[str]:
        if launch.image is None:
            return shell_wrapper(launch)
        where = f"--nodelist={launch.node_name}" if launch.node_name else f"--relative={launch.node}"
        mounts = ",".join(map(full_bind, launch.binds))
        # Slurm sets CUDA_VISIBLE_DEVICES for a step itself: restate the plan's choice inside the image.
        gpus = launch.env.get("CUDA_VISIBLE_DEVICES")
        inner = EngineLaunch(launch.argv, setup=([f"export CUDA_VISIBLE_DEVICES={gpus}"] if gpus else [])
                             + list(launch.setup))
        return ["srun", "--overlap", "--nodes=1", "--ntasks=1", where, f"--job-name={launch.name}",
                "--export=ALL", f"--container-image={launch.image}",
                *([f"--container-mounts={mounts}"] if mounts else []),
                f"--container-workdir={launch.workdir}", "--no-container-mount-home",
                *shell_wrapper(inner, relay=self.relay)]

    def stop_signal(self, launch: EngineLaunch) -> int:
        return signal.SIGUSR1 if launch.image is not None else signal.SIGTERM

    def problem(self, launch: EngineLaunch) -> str | None:
        if launch.image is None:
            return None
        return missing_tool("srun", "Slurm's clients") or missing_image(launch.image)


class Apptainer:
    """`apptainer exec --nv` (or `singularity exec`): the runtime's starter forwards signals to the
    container process and takes it down when it dies; the host environment passes in by default."""

    def __init__(self, binary: str):
        self.name = binary

    def command(self, launch: EngineLaunch) -> list[str]:
        if launch.image is None:
            return shell_wrapper(launch)
        binds = [a for b in launch.binds for a in ("--bind", full_bind(b))]
        return [self.name, "exec", "--nv", *binds, "--pwd", launch.workdir, launch.image, *shell_wrapper(launch)]

    def stop_signal(self, launch: EngineLaunch) -> int:
        return signal.SIGTERM

    def problem(self, launch: EngineLaunch) -> str | None:
        if launch.image is None:
            return None
        return missing_tool(self.name, self.name.capitalize()) or missing_image(launch.image)


class Charliecloud:
    """`ch-run IMAGE -- CMD`: unprivileged, no daemon, no PID namespace; ch-run sets up its namespaces and
    execs the command in place, so the engine keeps the agent-started PID, process group and parent-death
    signal. The image is a directory or SquashFS; bind destinations must exist in it (ch-run does not
    create them in a read-only image)."""

    name = "charliecloud"

    def command(self, launch: EngineLaunch) -> list[str]:
        if launch.image is None:
            return shell_wrapper(launch)
        binds = [f"--bind={':'.join(split_bind(b))}" for b in launch.binds]   # ch-run takes no mount options
        # ch-run refuses to start without $USER, which a job's environment does not always carry
        user = [] if launch.env.get("USER") else ["env", f"USER={pwd.getpwuid(os.getuid()).pw_name}"]
        return [*user, "ch-run", *binds, f"--cd={launch.workdir}", launch.image, "--", *shell_wrapper(launch)]

    def stop_signal(self, launch: EngineLaunch) -> int:
        return signal.SIGTERM

    def problem(self, launch: EngineLaunch) -> str | None:
        if launch.image is None:
            return None
        found = missing_tool("ch-run", "Charliecloud (Debian: charliecloud-runtime)") or missing_image(launch.image)
        if found or not os.path.isdir(launch.image):
            return found
        # ch-run cannot create a bind destination in a read-only image; /tmp comes from the host
        for _, dst in map(split_bind, launch.binds):
            if not (dst == "/tmp" or dst.startswith("/tmp/") or os.path.isdir(os.path.join(launch.image, dst.lstrip("/")))):
                return (f"bind destination {dst} does not exist in image {launch.image}; create it there "
                        f"(mkdir -p {launch.image.rstrip('/')}{dst}) or change cluster.container_mounts")
        return None


register(Bare())
register(Pyxis())
register(Apptainer("apptainer"))
register(Apptainer("singularity"))
register(Charliecloud())
