"""The test suite's own rule: PyTorch loads only in the tests that compare with it.

Each case runs pytest on a few tests in a fresh Python and reports whether `torch` was imported by the
end of the session, so a fixture or import that pulls PyTorch into every test shows up here.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROBE = """
import sys
import pytest


class Probe:
    def pytest_sessionfinish(self):
        print("torch loaded:", "torch" in sys.modules)


sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[Probe()]))
"""


@pytest.mark.slow  # a Python subprocess
@pytest.mark.parametrize(
    "tests, loads_torch",
    [
        (["tests/test_config.py::test_missing_config_file", "tests/test_tokenizer.py"], False),
        (["tests/test_convert.py::test_to_torch_state_dict_round_trips_into_torch"], True),  # the probe sees it
    ],
)
def test_torch_is_imported_only_by_tests_that_compare_with_it(tests, loads_torch):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", PROBE, *tests], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"torch loaded: {loads_torch}" in proc.stdout, proc.stdout[-2000:]
