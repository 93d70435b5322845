"""Every example recipe, rendered against the local cluster profile, is accepted by `sbatch --test-only`."""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_util import requires_slurm

from hpcserve.api import load_plans, write_plans
from hpcserve.backends.slurm import SlurmBackend
from hpcserve.errors import BackendError

REPO = Path(__file__).resolve().parents[2]
LOCAL = str(REPO / "slurm/clusters/local.yaml")
pytestmark = [pytest.mark.slurm, requires_slurm]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_sbatch_test_only_accepts_every_example(recipe, tmp_path):
    dirs = write_plans(load_plans(recipe, cluster=LOCAL), tmp_path)
    for d in dirs:
        verdict = SlurmBackend.test_only(d)
        assert "to start at" in verdict and "partition debug" in verdict


def test_sbatch_test_only_rejects_bad_partition(tmp_path):
    [d] = write_plans(load_plans(REPO / "recipes/local-demo.yaml", ["cluster.partition=nosuchpart"], cluster=LOCAL),
                      tmp_path)
    with pytest.raises(BackendError, match="invalid partition specified: nosuchpart"):
        SlurmBackend.test_only(d)
