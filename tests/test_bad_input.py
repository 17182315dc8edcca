"""Every bad input in ``tests/bad_input_cases.py`` gets a clear error of the right type.

The cases run once, in a subprocess without the suite's runtime type checks (as a user runs
pm_lens). Each must raise its exception type from pm_lens's own code (not a raw torch,
transformers or SAELens error), with a one-line message that names the bad value and what is
allowed; CLI errors exit non-zero with one line on stderr and no traceback.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_input_cases import CASES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def records():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "tests.bad_input_cases"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_at_least_forty_cases_across_every_stage():
    assert len(CASES) >= 40
    stages = {case.name.split(":")[0] for case in CASES}
    assert {"load", "data", "sae", "attribute", "ablate", "fidelity", "cli"} <= stages


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(records, case):
    record = records[case.name]
    assert case.error in record["types"], f"{case.name}: raised {record['types'][:1]}: {record['message']}"
    message = record["message"]
    for pattern in case.patterns:
        assert re.search(pattern, message), f"{case.name}: {pattern!r} not in {message!r}"
    assert "Traceback" not in message
    if case.error == "CLIError":
        assert record["code"] not in (0, None), f"{case.name}: exit code {record['code']}"
        assert len(message.splitlines()) == 1 and message.startswith("pm-lens: error: "), message
    else:
        assert len(message.splitlines()) == 1, f"{case.name}: not one line: {message!r}"
        assert f"{os.sep}pm_lens{os.sep}" in record["origin"], f"{case.name}: raised in {record['origin']}"
