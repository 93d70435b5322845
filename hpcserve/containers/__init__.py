"""Container runtimes: how an engine process is started inside its image (none, pyxis, apptainer, charliecloud).

Only the engine runs in the image. The node agent, Redis, router and stages run from the user's environment
on the shared filesystem, outside any image, and start each engine through the runtime named by
``cluster.container_runtime`` (docs/real-cluster.md has the picture).
"""

from hpcserve.containers.base import RUNTIMES, ContainerRuntime, EngineLaunch, get_runtime, runtime_names

__all__ = ["RUNTIMES", "ContainerRuntime", "EngineLaunch", "get_runtime", "runtime_names"]
