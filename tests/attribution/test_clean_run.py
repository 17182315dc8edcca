"""One clean run shared by every stage: counted forwards, identical results, refusals."""

import pytest
import torch

from pm_lens import Node
from pm_lens.attribution import ablate, attribute, check_fidelity, recover
from pm_lens.attribution.fidelity import ablate_like
from pm_lens.saes.contexts import top_contexts
from tests.attribution.conftest import HOOKS


def _counts(rm, before):
    return rm.forward_count.since(before).as_dict()


def test_the_pipeline_runs_each_clean_forward_once(rm, pairs, saes):
    """attribute, ablation of top features per group, a fidelity card, recovery and contexts: the
    clean forward of each side of each pair runs once (in attribute); later stages only ablate."""
    before = rm.forward_count.snapshot()
    result = attribute(rm, pairs, saes=saes, batch_tokens=128, progress=False)  # several batches
    n_batches = len(result.clean_run.batches)
    assert n_batches > 1
    groups = {"first": [0, 1], "last": [2]}
    for indices in groups.values():
        group = result.subset(indices)
        ablate_like(rm, group, group.top_nodes(3), batch_tokens=128, progress=False)
    check_fidelity(rm, result, top_k=5, n_random=5, batch_tokens=128, progress=False)
    recover(rm, result, groups, top_n=3, batch_tokens=128, progress=False)
    top_contexts(rm, saes, pairs, result.top_nodes(3), clean=result.clean_run, progress=False)
    counts = _counts(rm, before)
    assert counts["clean"]["sequences"] == 2 * len(pairs)
    assert counts["clean"]["passes"] == 2 * n_batches
    assert set(counts) - {"clean", "ablation", "total", "probe"} == set()
    assert counts["ablation"]["passes"] > 0


def test_ablation_from_a_clean_run_equals_ablation_from_scratch(rm, pairs, saes):
    result = attribute(rm, pairs, saes=saes, progress=False)
    nodes = result.top_nodes(6) + [Node.error(HOOKS[0])]
    reused = ablate(rm, pairs, saes=saes, features=nodes, clean=result.clean_run, progress=False)
    fresh = ablate(rm, pairs, saes=saes, features=nodes, progress=False)
    torch.testing.assert_close(reused.chosen, fresh.chosen, rtol=0, atol=1e-6)
    torch.testing.assert_close(reused.rejected, fresh.rejected, rtol=0, atol=1e-6)
    torch.testing.assert_close(reused.clean_chosen, fresh.clean_chosen, rtol=0, atol=1e-6)
    joint = ablate(rm, pairs, saes=saes, features=nodes, jointly=True, clean=result.clean_run, progress=False)
    torch.testing.assert_close(joint.margin, ablate(rm, pairs, saes=saes, features=nodes, jointly=True,
                                                    progress=False).margin, rtol=0, atol=1e-6)


def test_a_run_over_budget_is_recomputed_with_the_same_results(rm, pairs, saes):
    kept = attribute(rm, pairs, saes=saes, progress=False)
    lean = attribute(rm, pairs, saes=saes, clean_budget_bytes=0, progress=False)
    assert all(side is None for sides in lean.clean_run.kept for side in sides)
    assert all(side is not None for sides in kept.clean_run.kept for side in sides)
    nodes = kept.top_nodes(4)
    before = rm.forward_count.snapshot()
    from_lean = ablate_like(rm, lean, nodes, progress=False)
    recomputed = _counts(rm, before)["clean"]["sequences"]
    assert recomputed == 2 * len(pairs)  # what was not kept is run again, and counted
    torch.testing.assert_close(from_lean.margin, ablate_like(rm, kept, nodes, progress=False).margin, rtol=0, atol=1e-6)


def test_a_clean_run_of_other_pairs_or_settings_is_refused(rm, pairs, saes):
    result = attribute(rm, pairs, saes=saes, progress=False)
    with pytest.raises(ValueError, match=r"the clean run does not fit this call: other pairs \(2 given"):
        ablate(rm, pairs[:2], saes=saes, features=[(HOOKS[0], 1)], clean=result.clean_run, progress=False)
    with pytest.raises(ValueError, match=r"other settings"):
        ablate(rm, pairs, saes=saes, features=[(HOOKS[0], 1)], positions="completion", clean=result.clean_run,
               progress=False)
    with pytest.raises(ValueError, match=r"other SAEs"):
        ablate(rm, pairs, saes=saes[:1], features=[(HOOKS[0], 1)], clean=result.clean_run, progress=False)


def test_subset_of_a_clean_run_matches_a_clean_run_of_the_subset(rm, pairs, saes):
    result = attribute(rm, pairs, saes=saes, batch_tokens=128, progress=False)
    part = result.subset([0, 2])
    alone = attribute(rm, [pairs[0], pairs[2]], saes=saes, progress=False)
    torch.testing.assert_close(part.clean_run.chosen_rewards, alone.clean_run.chosen_rewards)
    nodes = part.top_nodes(3)
    torch.testing.assert_close(ablate_like(rm, part, nodes, progress=False).margin,
                               ablate_like(rm, alone, nodes, progress=False).margin, rtol=0, atol=1e-5)
    assert result.subset([2, 0]).clean_run is None  # reordered: not kept (stages then run their own)


def test_the_clean_run_keeps_the_keys_and_values_that_restarts_read(rm, pairs, saes, monkeypatch):
    """The AtP pass keeps each side's keys and values from the first SAE's block on, equal to a
    separate cached forward's, so ablations restart on a suffix without computing them again."""
    result = attribute(rm, pairs, saes=saes, progress=False)
    for side in ("chosen", "rejected"):
        run = result.clean_run.side(rm, 0, side)
        assert run.kv is not None and run.kv.first_layer == 1
        again = rm.prefix_kv(run.batch.tokens, run.batch.attention_mask, first_layer=1)
        assert set(run.kv.keys) == set(again.keys) == {1, 2, 3}
        for block in again.keys:
            assert torch.allclose(run.kv.keys[block], again.keys[block], atol=1e-5)
            assert torch.allclose(run.kv.values[block], again.values[block], atol=1e-5)
    reference = ablate_like(rm, result, result.top_nodes(6), clean=None, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("prefix_kv ran although the clean run holds the keys and values")

    monkeypatch.setattr(rm, "prefix_kv", refuse)
    reused = ablate_like(rm, result, result.top_nodes(6), progress=False)
    assert torch.allclose(reused.chosen, reference.chosen, atol=1e-5)
    assert torch.allclose(reused.rejected, reference.rejected, atol=1e-5)
