"""Login-node check of a plan's sbatch directives against the sbatch installed here (`sbatch --help`).

A profile written for a newer Slurm (eos-h100's --segment needs 24.11; Slurm 22.05 has no such option) is
reported at validate/render time with the directive and the version found, not by sbatch at submit time.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

_OPTION = re.compile(r"(?:^|[\s,\[])(--[A-Za-z][\w-]*)")


def local_sbatch() -> tuple[str, frozenset[str]] | None:
    """(version, long options) of the sbatch on PATH, or None when there is none."""
    return local_options("sbatch")


@functools.lru_cache(maxsize=4)
def local_options(binary: str) -> tuple[str, frozenset[str]] | None:
    """(version, long options) of a Slurm client (sbatch, srun) on PATH, or None."""
    if shutil.which(binary) is None:
        return None
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20).stdout
        helptext = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    options = frozenset(_OPTION.findall(helptext))
    if not version.strip() or "--nodes" not in options:   # sbatch without a slurm.conf says nothing useful
        return None
    return version.strip(), options


def version_tuple(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


def unknown_directives(plan, needed: str | None = None) -> list[str]:
    """One line per directive of ``plan.slurm.directives`` the local sbatch does not know. ``needed``: the
    Slurm release the profile says it needs (cluster.slurm_version)."""
    found = local_sbatch()
    if found is None:
        return []
    version, known = found
    out = []
    for d in plan.slurm.directives:
        name = d.split("=", 1)[0].split()[0]
        if name not in known:
            needs = (f"; the profile says it needs Slurm {needed}" if needed else
                     "; if the target cluster runs a newer Slurm, say so in the profile (slurm_version)")
            out.append(f"sbatch directive {name} is unknown to the sbatch here ({version}){needs}")
    return out


def needs_newer(needed: str | None) -> bool:
    """True when the profile says it needs a newer Slurm than the sbatch here."""
    found = local_sbatch()
    return bool(needed and found and version_tuple(found[0]) and version_tuple(needed) > version_tuple(found[0]))
