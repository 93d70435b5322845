"""Cluster profiles against the real sbatch (issue 14 item 5): every example recipe with its own profile passes
`sbatch --test-only` on the local Slurm as written, or its profile says which Slurm release it needs; a
directive the local sbatch does not know is reported at validate/render time with the version found."""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_util import requires_slurm
from typer.testing import CliRunner

from hpcserve.api import load_plans, write_plans
from hpcserve.backends.slurm import SlurmBackend
from hpcserve.cli.main import app
from hpcserve.doctor.directives import local_sbatch, needs_newer, unknown_directives

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, requires_slurm]


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_passes_test_only_or_its_profile_names_the_slurm_it_needs(recipe, tmp_path):
    plans = load_plans(recipe)
    loaded, plan = plans[0]
    if plan.backend == "local":
        pytest.skip("backend local: no sbatch involved")
    needed = loaded.recipe.cluster.slurm_version
    version, known = local_sbatch()
    if needs_newer(needed):
        lines = unknown_directives(plan, needed)
        lacking = [d.split("=", 1)[0] for d in plan.slurm.directives if d.split("=", 1)[0] not in known]
        assert lacking, f"{recipe.name}: the profile says Slurm {needed} but this sbatch knows every directive"
        assert lines == [f"sbatch directive {name} is unknown to the sbatch here ({version}); the profile says "
                         f"it needs Slurm {needed}" for name in lacking]
    else:
        for d in write_plans(plans, tmp_path):
            assert "to start at" in SlurmBackend.test_only(d)


def test_eos_profile_needs_slurm_24_11_for_segment_and_validate_says_so():
    [(loaded, plan)] = load_plans(REPO / "recipes/llama70b-1p1d.yaml")
    assert loaded.recipe.cluster.slurm_version == "24.11" and "--segment=1" in plan.slurm.directives
    version, _ = local_sbatch()
    res = CliRunner().invoke(app, ["validate", str(REPO / "recipes/llama70b-1p1d.yaml")])
    assert res.exit_code == 0
    assert (f"note: sbatch directive --segment is unknown to the sbatch here ({version}); the profile says it "
            f"needs Slurm 24.11") in res.output
    assert "--exclusive is unknown" not in res.output   # a directive 22.05 has is not reported


def test_unknown_directive_without_a_declared_release_is_reported_at_render(tmp_path):
    recipe = REPO / "recipes/local-demo.yaml"
    args = ["--set", "cluster.backend=slurm", "--set", "cluster.sbatch=[--exclusive,--nosuchflag=3]"]
    res = CliRunner().invoke(app, ["render", str(recipe), *args, "-o", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    version, _ = local_sbatch()
    assert (f"note: sbatch directive --nosuchflag is unknown to the sbatch here ({version}); if the target "
            f"cluster runs a newer Slurm, say so in the profile (slurm_version)") in res.output
    assert "--exclusive is unknown" not in res.output
