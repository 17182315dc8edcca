"""What the model does for the other stages: deltas at hooks, restarts, suffix restarts, counting."""

import pytest
import torch

from pm_lens import RewardModel
from pm_lens.testing import TINY_CONFIGS, char_tokenizer, tiny_hf_reward_model


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def rm(request):
    overrides = {"num_hidden_layers": 3} if "GPT2" not in request.param and "GPTJ" not in request.param else {}
    return RewardModel.from_hf(tiny_hf_reward_model(request.param, **overrides), char_tokenizer())


def _batch(rm):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 90, (3, 24), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, 17:] = 0  # right padding
    return tokens, mask


def test_a_delta_from_a_position_on_restarted_on_the_suffix_is_exact(rm):
    """Restarting at a block from the clean input, recomputing only positions >= start against
    cached clean keys and values, equals running the whole model with the delta added."""
    tokens, mask = _batch(rm)
    hook = rm.layer_input(1)
    clean = rm.run_with_deltas(tokens, mask, read=[hook])
    delta = torch.zeros_like(clean.acts[hook])
    delta[:, 11:] = 0.5 * torch.randn_like(delta[:, 11:])
    with torch.no_grad():
        whole = rm.run_with_deltas(tokens, mask, deltas={hook: delta}).rewards
    prefix = rm.prefix_kv(tokens, mask, first_layer=1)
    suffix = rm.run_from(clean.acts[hook] + delta, mask, layer=1, prefix=prefix, start=11)
    torch.testing.assert_close(suffix, whole, atol=1e-4, rtol=1e-5)
    rows = torch.tensor([2, 0, 2])
    stacked = rm.run_from((clean.acts[hook] + delta)[rows], mask[rows], layer=1, prefix=prefix, rows=rows, start=11)
    torch.testing.assert_close(stacked, whole[rows], atol=1e-4, rtol=1e-5)
    # A delta at a hook inside the restarted block is added too.
    mlp = "blocks.1.hook_mlp_out"
    with torch.no_grad():
        whole_mlp = rm.run_with_deltas(tokens, mask, deltas={mlp: delta}).rewards
    torch.testing.assert_close(rm.run_from(clean.acts[hook], mask, layer=1, deltas={mlp: delta}, prefix=prefix, start=11),
                               whole_mlp, atol=1e-4, rtol=1e-5)


def test_gradients_from_a_position_on_skip_the_backward_before_it_and_are_exact(rm):
    """grad_from=k runs positions < k without autograd and the rest with it, attending to their
    cached keys and values: the rewards, activations, keys and values are the one-forward ones,
    the gradients equal the one-forward gradients at positions >= k (zero before), deltas are
    added in both parts, and the count is one pass with all its tokens."""
    tokens, mask = _batch(rm)
    hooks = [rm.layer_input(1), "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    start = 9
    delta = torch.zeros(*tokens.shape, rm.cfg.d_model)
    delta[:, 5:] = 0.3 * torch.randn(tokens.shape[0], tokens.shape[1] - 5, rm.cfg.d_model,
                                     generator=torch.Generator().manual_seed(1))
    for deltas in ({}, {"blocks.0.hook_resid_post": delta}):
        whole = rm.run_with_deltas(tokens, mask, read=hooks, grad_at=hooks, deltas=deltas, keep_kv_from=1)
        before = rm.forward_count.snapshot()
        split = rm.run_with_deltas(tokens, mask, read=hooks, grad_at=hooks, deltas=deltas, keep_kv_from=1, grad_from=start)
        counted = rm.forward_count.since(before).as_dict()["total"]
        assert (counted["passes"], counted["sequences"], counted["tokens"]) == (1, 3, tokens.numel())
        torch.testing.assert_close(split.rewards, whole.rewards, atol=1e-4, rtol=1e-4)
        for hook in hooks:
            torch.testing.assert_close(split.acts[hook], whole.acts[hook], atol=1e-4, rtol=1e-4)
            assert split.grads[hook].shape == whole.grads[hook].shape
            assert not split.grads[hook][:, :start].any()
            torch.testing.assert_close(split.grads[hook][:, start:], whole.grads[hook][:, start:], atol=1e-4, rtol=1e-3)
            assert whole.grads[hook][:, start:].abs().sum() > 0
        for block, keys in whole.kv.keys.items():
            torch.testing.assert_close(split.kv.keys[block], keys, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(split.kv.values[block], whole.kv.values[block], atol=1e-4, rtol=1e-4)


def test_a_run_continuing_from_another_runs_shared_prefix_is_exact(rm):
    """The other side of a pair (same tokens before grad_from, another tail) continues from the
    first side's part before grad_from: the same rewards, activations, gradients and keys and
    values as running it itself, counted as one pass of the tokens it runs."""
    tokens, mask = _batch(rm)
    other = tokens.clone()
    other[:, 12:] = torch.randint(4, 90, other[:, 12:].shape, generator=torch.Generator().manual_seed(5))
    hooks = [rm.layer_input(1), "blocks.0.hook_resid_post"]
    start = 10
    first = rm.run_with_deltas(tokens, mask, read=hooks, grad_at=hooks[1:], grad_from=start)
    assert first.shared is not None and first.shared.start == start
    alone = rm.run_with_deltas(other, mask, read=hooks, grad_at=hooks[1:], keep_kv_from=1, grad_from=start)
    before = rm.forward_count.snapshot()
    continued = rm.run_with_deltas(other, mask, read=hooks, grad_at=hooks[1:], keep_kv_from=1, grad_from=start,
                                   shared=first.shared)
    counted = rm.forward_count.since(before).as_dict()["total"]
    assert (counted["passes"], counted["tokens"]) == (1, 3 * (tokens.shape[1] - start))
    torch.testing.assert_close(continued.rewards, alone.rewards, atol=1e-5, rtol=1e-5)
    for hook in hooks:
        torch.testing.assert_close(continued.acts[hook], alone.acts[hook], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(continued.grads[hooks[1]], alone.grads[hooks[1]], atol=1e-5, rtol=1e-4)
    for block, keys in alone.kv.keys.items():
        torch.testing.assert_close(continued.kv.keys[block], keys, atol=1e-5, rtol=1e-5)
    # What does not fit is refused: other tokens before grad_from, another split, deltas before it.
    moved = other.clone()
    moved[:, 3] = moved[:, 3] % 80 + 5
    for kwargs in (dict(tokens=moved, grad_from=start), dict(tokens=other, grad_from=start - 1),
                   dict(tokens=other, grad_from=start, deltas={hooks[1]: torch.ones(*tokens.shape, rm.cfg.d_model)})):
        with pytest.raises(ValueError, match="shared prefix"):
            rm.run_with_deltas(kwargs.pop("tokens"), mask, read=hooks, grad_at=hooks[1:], shared=first.shared, **kwargs)


def test_gradients_from_a_position_are_refused_where_they_would_be_wrong():
    rm = RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=2), char_tokenizer())
    tokens, mask = _batch(rm)
    hook = "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match="pooled position"):  # row 1 ends at 16
        rm.run_with_deltas(tokens, mask, grad_at=[hook], grad_from=20)
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        rm.run_with_deltas(tokens, left, grad_at=[hook], grad_from=3)
    with pytest.raises(ValueError, match="tensor deltas"):
        rm.run_with_deltas(tokens, mask, grad_at=[hook], grad_from=3, deltas={hook: lambda act: 0 * act})


def test_the_pooled_final_residual_restarted_on_the_suffix_is_exact(rm):
    """With the clean keys and values, the restart recomputes only the positions from the earliest
    pooled one; it gives what the whole restart and the whole forward give."""
    tokens, mask = _batch(rm)
    hook = rm.layer_input(1)
    clean = rm.run_with_deltas(tokens, mask, read=[hook], keep_kv_from=1)
    whole = rm.pooled_final_residual(mask, tokens=tokens)
    restarted = rm.pooled_final_residual(mask, residual=clean.acts[hook], layer=1)
    before = rm.forward_count.snapshot()
    suffix = rm.pooled_final_residual(mask, residual=clean.acts[hook], layer=1, prefix=clean.kv)
    assert rm.forward_count.since(before).as_dict()["total"]["tokens"] == 3 * (tokens.shape[1] - 16)  # row 1 ends at 16
    torch.testing.assert_close(restarted, whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(suffix, whole, atol=1e-4, rtol=1e-4)


def test_restart_and_pooling_match_the_reward(rm):
    tokens, mask = _batch(rm)
    last = rm.cfg.n_layers - 1
    clean = rm.run_with_deltas(tokens, mask, read=[rm.layer_input(last)])
    torch.testing.assert_close(clean.rewards, rm.reward(tokens, mask))
    torch.testing.assert_close(rm.run_from(clean.acts[rm.layer_input(last)], mask, layer=last), clean.rewards, atol=1e-5,
                               rtol=1e-5)
    per_position = rm(tokens, attention_mask=mask)[..., 0]
    torch.testing.assert_close(rm.pool(per_position, mask), clean.rewards)


def test_gradients_at_hooks_equal_autograd_through_the_hook():
    rm = RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=2), char_tokenizer())
    tokens, mask = _batch(rm)
    hook = "blocks.0.hook_resid_post"
    run = rm.run_with_deltas(tokens, mask, read=[hook], grad_at=[hook])
    seen = {}

    def keep(act, hook):  # noqa: ARG001
        act = act.detach().requires_grad_(True)
        seen["x"] = act
        return act

    with rm.hooks(fwd_hooks=[(hook, keep)]):
        rm.reward(tokens, mask).sum().backward()
    torch.testing.assert_close(run.grads[hook], seen["x"].grad)


def test_forward_passes_are_counted_by_purpose():
    rm = RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=2), char_tokenizer())
    tokens, mask = _batch(rm)
    before = rm.forward_count.snapshot()
    with rm.counting("clean"):
        rm.reward(tokens, mask)
    with rm.counting("ablation"):
        rm.run_from(torch.zeros(2, 24, rm.cfg.d_model), mask[:2], layer=1)
    rm.reward(tokens[:1], mask[:1])
    counts = rm.forward_count.since(before).as_dict()
    assert counts["clean"] == {"passes": 1, "sequences": 3, "tokens": 72}
    assert counts["ablation"] == {"passes": 1, "sequences": 2, "tokens": 48}
    assert counts["other"]["passes"] == 1 and counts["total"]["passes"] == 3
    rm.hook_shapes(["blocks.0.attn.hook_z"])
    rm.hook_shapes(["blocks.0.attn.hook_z"])  # memoised: one probe run, not two
    assert rm.forward_count.since(before).as_dict()["probe"]["passes"] == 1
