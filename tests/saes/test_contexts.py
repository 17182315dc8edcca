"""Top contexts: the strongest firings of a feature, checked against the SAE's own encoding."""

import pytest
import torch

from pm_lens import PreferencePair, RewardModel
from pm_lens.data import encode_pairs
from pm_lens import Node, attribute
from pm_lens.saes.contexts import top_contexts
from pm_lens.testing import tiny_hf_reward_model
from tests.saes.helpers import build_standard_sae, sparse_sae_for

HOOK = "blocks.1.hook_resid_post"
PAIRS = [
    PreferencePair("What is 2+2?", "4, you're welcome!", "I don't know."),
    PreferencePair("Capital of France?", "Paris.", "London, see http://x.com"),
    PreferencePair("Name a colour.", "Red, thanks!", "Go away, you idiot."),
]


@pytest.fixture
def rm(tokenizer):
    return RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=3), tokenizer)


def _reference_acts(rm, sae, index, skip_first, skip_last=False):
    """Every (activation, pair, side, position) of feature ``index``, from run_with_cache + encode."""
    batch = encode_pairs(rm.tokenizer, PAIRS, max_len=128)
    out = []
    for side_name, side in (("chosen", batch.chosen), ("rejected", batch.rejected)):
        _, cache = rm.run_with_cache(side.tokens, attention_mask=side.attention_mask, names_filter=HOOK)
        acts = sae.encode(cache[HOOK])[..., index] * side.attention_mask
        if skip_first:
            acts[:, 0] = 0
        if skip_last:
            acts[torch.arange(len(acts)), side.attention_mask.sum(1) - 1] = 0
        out += [(float(acts[r, p]), r, side_name, p, int(side.tokens[r, p])) for r, p in (acts > 0).nonzero().tolist()]
    return out


@pytest.mark.parametrize("skip_first, skip_last", [(False, False), (True, False), (True, True)])
def test_contexts_are_the_strongest_firings(rm, skip_first, skip_last):
    sae = sparse_sae_for(rm, HOOK, encode_pairs(rm.tokenizer, PAIRS, max_len=128).chosen.tokens, seed=3, d_sae=64)
    with torch.no_grad():
        reference = {i: _reference_acts(rm, sae, i, skip_first, skip_last) for i in range(64)}
        with_last = {i: _reference_acts(rm, sae, i, skip_first) for i in range(64)}
    index = max(reference, key=lambda i: len(reference[i]))  # the feature that fires most
    result = top_contexts(rm, [sae], PAIRS, [(HOOK, index)], n_contexts=3, skip_first=skip_first, skip_last=skip_last,
                          progress=False)
    found = result[Node(HOOK, index)]
    expected = sorted(reference[index], key=lambda r: -r[0])
    assert found.contexts[0].max_act == pytest.approx(expected[0][0], rel=1e-5)
    assert [c.max_act for c in found.contexts] == sorted((c.max_act for c in found.contexts), reverse=True)
    assert len({(c.pair, c.side) for c in found.contexts}) == len(found.contexts)  # one context per text
    for context in found.contexts:
        assert context.tokens[context.peak] == rm.tokenizer.decode([next(r[4] for r in expected if r[0] == context.max_act)])
        assert context.acts[context.peak] == context.max_act > 0
    peaks = {}
    for value, *_, token in expected:
        peaks[token] = max(peaks.get(token, 0.0), value)
    best = max(peaks, key=peaks.get)
    assert found.top_tokens[0][0] == rm.tokenizer.decode([best])
    assert found.top_tokens[0][1] == pytest.approx(peaks[best], rel=1e-5)
    assert found.firing_rate == pytest.approx(len(expected) / _n_tokens(rm, skip_first, skip_last))
    batch = encode_pairs(rm.tokenizer, PAIRS, max_len=128)
    for side_index, side in enumerate((batch.chosen, batch.rejected)):
        for pair in range(len(PAIRS)):
            start = int(side.completion_start[pair])
            in_completion = [r[0] for r in with_last[index] if r[1] == pair and r[2] == ("chosen", "rejected")[side_index] and r[3] >= start]
            assert float(found.completion_max[pair, side_index]) == pytest.approx(max(in_completion, default=0.0), rel=1e-5)
    assert found.completion_max.sum() > 0
    lengths = torch.cat([batch.chosen.attention_mask.sum(1), batch.rejected.attention_mask.sum(1)])
    at_last = [r[0] for r in with_last[index] if r[3] == lengths[r[1] + (len(PAIRS) if r[2] == "rejected" else 0)] - 1]
    assert found.last_token_mean == pytest.approx(sum(at_last) / (2 * len(PAIRS)), rel=1e-5, abs=1e-7)


def _n_tokens(rm, skip_first, skip_last):
    batch = encode_pairs(rm.tokenizer, PAIRS, max_len=128)
    n = int(batch.chosen.attention_mask.sum() + batch.rejected.attention_mask.sum())
    return n - 2 * len(PAIRS) * (int(skip_first) + int(skip_last))


def test_bad_features_are_named(rm):
    sae = build_standard_sae(HOOK, d_in=rm.cfg.d_model, d_sae=64)
    with pytest.raises(ValueError, match="no SAE at 'blocks.0.hook_resid_post'"):
        top_contexts(rm, [sae], PAIRS, [("blocks.0.hook_resid_post", 1)], progress=False)
    with pytest.raises(ValueError, match="valid are 0..63"):
        top_contexts(rm, [sae], PAIRS, [(HOOK, 64)], progress=False)


def test_a_clean_run_gives_the_same_contexts_without_running_the_model(rm):
    sae = sparse_sae_for(rm, HOOK, encode_pairs(rm.tokenizer, PAIRS, max_len=128).chosen.tokens, seed=3, d_sae=64)
    attribution = attribute(rm, PAIRS, saes=[sae], progress=False)
    nodes = attribution.top_nodes(4)
    before = rm.forward_count.snapshot()
    from_clean = top_contexts(rm, [sae], PAIRS, nodes, skip_last=True, clean=attribution.clean_run, progress=False)
    assert rm.forward_count.since(before).as_dict()["total"]["passes"] == 0
    by_running = top_contexts(rm, [sae], PAIRS, nodes, skip_last=True, progress=False)
    assert rm.forward_count.since(before).as_dict()["contexts"]["passes"] == 2  # one batch, two sides
    for node in nodes:
        a, b = from_clean[node], by_running[node]
        assert [(c.pair, c.side, c.peak, c.tokens) for c in a.contexts] == [(c.pair, c.side, c.peak, c.tokens) for c in b.contexts]
        assert [c.max_act for c in a.contexts] == pytest.approx([c.max_act for c in b.contexts], rel=1e-5)
        assert [t for t, _ in a.top_tokens] == [t for t, _ in b.top_tokens]
        assert a.firing_rate == b.firing_rate and a.last_token_mean == pytest.approx(b.last_token_mean, rel=1e-5)
        torch.testing.assert_close(a.completion_max, b.completion_max)


@pytest.mark.parametrize("positions", ["completion", "diverge"])
def test_positions_keep_firings_elsewhere_out(rm, positions):
    """positions="completion"/"diverge": every context peaks (and every firing counted is) inside
    the pair's masks, the strongest of those is found, completion_max stays over the completion,
    and a clean run of the same positions gives the same contexts."""
    from pm_lens.attribution.positions import pair_masks

    pairs = PAIRS + [PreferencePair("Say hi.", "Hi there, friend!", "Hi there. Go away.")]  # diverges mid-completion
    batch = encode_pairs(rm.tokenizer, pairs, max_len=128)
    sae = sparse_sae_for(rm, HOOK, batch.chosen.tokens, seed=3, d_sae=64)
    masks = pair_masks(batch, positions, skip_first=True)
    inside = {}
    with torch.no_grad():
        for side_name, side, mask in (("chosen", batch.chosen, masks[0]), ("rejected", batch.rejected, masks[1])):
            _, cache = rm.run_with_cache(side.tokens, attention_mask=side.attention_mask, names_filter=HOOK)
            acts = sae.encode(cache[HOOK]) * side.attention_mask[..., None]
            inside[side_name] = (acts * mask[..., None], acts)
    def strongest(i, which):
        return max(float(inside[side][which][..., i].amax()) for side in inside)

    fired_outside = [i for i in range(64) if strongest(i, 1) > strongest(i, 0) > 0]
    assert fired_outside  # a feature whose strongest firing is outside the positions: the case that matters
    index = fired_outside[0]
    found = top_contexts(rm, [sae], pairs, [(HOOK, index)], n_contexts=3, positions=positions, progress=False)[Node(HOOK, index)]
    everywhere = top_contexts(rm, [sae], pairs, [(HOOK, index)], n_contexts=3, progress=False)[Node(HOOK, index)]
    best = max(float(inside[s][0][..., index].max()) for s in inside)
    assert found.contexts[0].max_act == pytest.approx(best, rel=1e-5)
    assert found.contexts[0].max_act < everywhere.contexts[0].max_act
    for context in found.contexts:
        mask = masks[("chosen", "rejected").index(context.side)]
        position = next(p for p in range(mask.shape[1]) if mask[context.pair, p] and
                        abs(float(inside[context.side][0][context.pair, p, index]) - context.max_act) < 1e-6)
        assert mask[context.pair, position]
    torch.testing.assert_close(found.completion_max, everywhere.completion_max)
    attribution = attribute(rm, pairs, saes=[sae], positions=positions, progress=False)
    clean = top_contexts(rm, [sae], pairs, [(HOOK, index)], n_contexts=3, positions=positions,
                         clean=attribution.clean_run, progress=False)[Node(HOOK, index)]
    assert [(c.pair, c.side, c.peak) for c in clean.contexts] == [(c.pair, c.side, c.peak) for c in found.contexts]


def test_a_feature_seen_only_at_the_last_token_is_not_said_to_never_fire():
    """With skip_last, a summary feature (firing only where the reward is read) has no contexts;
    its description says where it fires instead of "(never fires)"."""
    from pm_lens.saes.contexts import FeatureContexts

    node = Node(HOOK, 1)
    summary = FeatureContexts(node, [], [], 0.0, torch.zeros(1, 2), last_token_mean=2.5)
    silent = FeatureContexts(node, [], [], 0.0, torch.zeros(1, 2), last_token_mean=0.0)
    assert summary.describe() == "(fires only at the last token, mean 2.5)"
    assert silent.describe() == "(never fires)"
