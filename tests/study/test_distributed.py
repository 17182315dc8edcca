"""pm-lens run under torchrun (2 processes, gloo on CPU): the merged outputs equal a
single-process run's, and a run whose rank dies resumes to the same result."""

import subprocess
import sys
import textwrap

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pm_lens.cli import main
from tests.study.test_run import study  # noqa: F401  (the fixture)

# Runs pm-lens with the given arguments; the rank named by FAIL_RANK fails in its second
# attribution shard (after writing its first), as a crash would.
LAUNCHER = textwrap.dedent("""
    import os, sys
    import pm_lens.study.run as run
    if os.environ.get("FAIL_RANK") == os.environ.get("RANK"):
        original, done = run._attribute_shard, []
        def failing(*args, **kwargs):
            if done:
                raise RuntimeError("injected failure")
            done.append(original(*args, **kwargs))
            return done[-1]
        run._attribute_shard = failing
    from pm_lens.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def assert_same_outputs(got, want):
    """The same tables and card up to float rounding: torchrun runs each rank with one thread
    (OMP_NUM_THREADS=1), so sums reduce in another order than a multi-threaded single process."""
    for name in ("features.csv", "top_datapoints.csv", "top_contexts.csv", "selection.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(got / name), pd.read_csv(want / name), rtol=1e-4, atol=1e-6,
                                      obj=name)
    card, expected = (json.loads((folder / "fidelity.json").read_text()) for folder in (got, want))
    assert card.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):  # derived statistics (relative errors divide by small effects)
            assert card[key] == pytest.approx(value, rel=2e-2, abs=1e-5), key
        elif not isinstance(value, dict):
            assert card[key] == value, key
    # The per-pair effects, shard by shard (each shard holds the same pairs in both runs).
    for path in sorted((want / "shards").iterdir()):
        mine, theirs = load_file(str(got / "shards" / path.name)), load_file(str(path))
        assert mine.keys() == theirs.keys(), path.name
        for name, tensor in theirs.items():
            if tensor.is_floating_point():
                assert torch.allclose(mine[name], tensor, rtol=1e-4, atol=1e-6), (path.name, name)
            else:
                assert torch.equal(mine[name], tensor), (path.name, name)


def torchrun(launcher, args, *, fail_rank=None):
    env = {"FAIL_RANK": str(fail_rank)} if fail_rank is not None else {}
    import os

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(launcher), *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


@pytest.mark.slow
def test_two_ranks_give_the_single_process_outputs_and_resume_after_a_rank_dies(study, tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    args = ["run", str(study["config"]), "--quiet", "--shard-pairs", "1"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0

    done = torchrun(launcher, [*args, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_outputs(tmp_path / "two", tmp_path / "single")
    # The forward passes of both ranks are summed: the same clean and ablation work as one process.
    passes = [json.loads((tmp_path / run / "config.json").read_text())["forward_passes"] for run in ("two", "single")]
    for purpose in ("clean", "ablation", "selection"):
        assert passes[0][purpose] == passes[1][purpose], purpose
    shards = sorted(p.name for p in (tmp_path / "two" / "shards").iterdir())
    assert shards == [f"{kind}-{i:05d}.safetensors" for kind in ("ablation", "attribution") for i in range(6)]

    # Rank 1 dies after its first shard; torchrun stops the other; the same command resumes.
    crashed = torchrun(launcher, [*args, "--out", str(tmp_path / "resumed")], fail_rank=1)
    assert crashed.returncode != 0 and "injected failure" in crashed.stderr
    written = {p.name for p in (tmp_path / "resumed" / "shards").iterdir()}
    assert "attribution-00001.safetensors" in written and "attribution-00003.safetensors" not in written
    assert not list((tmp_path / "resumed").rglob("*.tmp"))
    again = torchrun(launcher, [*args, "--out", str(tmp_path / "resumed")])
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_outputs(tmp_path / "resumed", tmp_path / "single")
