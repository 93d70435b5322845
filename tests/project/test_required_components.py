"""Under tests/run.sh a test cannot go green by skipping a component the test command installs: conftest.py
turns such a skip into a failure (HPCSERVE_REQUIRE_INSTALLED=1), at collection and at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]   # tests/

CASES = {
    "test_run.py": "import pytest\n\ndef test_x():\n    pytest.importorskip('no_such_component_here')\n",
    "test_collect.py": "import pytest\npytest.importorskip('no_such_component_either')\n\ndef test_y():\n    pass\n",
    "test_fact.py": "import pytest\n\ndef test_z():\n    pytest.skip('this machine has GPU tools')\n",
}


def _run(tmp_path: Path, required: bool) -> str:
    for name, body in CASES.items():
        (tmp_path / name).write_text(body)
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    env = {k: v for k, v in os.environ.items() if k != "HPCSERVE_REQUIRE_INSTALLED"}
    if required:
        env["HPCSERVE_REQUIRE_INSTALLED"] = "1"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                          str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    return res.stdout


def test_a_missing_component_fails_when_required(tmp_path):
    out = _run(tmp_path, required=True)
    assert "FAILED test_run.py::test_x - required component missing" in out, out
    assert "ERROR test_collect.py - required component missing" in out, out
    assert "SKIPPED [1] test_fact.py" in out, out        # a fact of the machine is still a skip


def test_the_same_skips_are_skips_when_not_required(tmp_path):
    out = _run(tmp_path, required=False)
    assert "1 skipped" not in out and "3 skipped" in out and "failed" not in out, out
