"""Exact ablation: batched equals one by one; bad features are named."""

import pytest
import torch

from pm_lens import Node
from pm_lens.attribution import ablate
from pm_lens.attribution.positions import divergence, pair_masks
from pm_lens.data import encode_pairs
from tests.attribution.conftest import HOOKS


@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_batched_equals_one_by_one(rm, pairs, saes, baseline):
    features = ([(HOOKS[0], i) for i in range(0, 40, 3)] + [(HOOKS[1], i) for i in (1, 5, 9)]
                + [(HOOKS[0], "error"), Node.error(HOOKS[1])])
    kwargs = dict(saes=saes, features=features, baseline=baseline, progress=False)
    batched = ablate(rm, pairs, batch_tokens=200, **kwargs)
    looped = ablate(rm, pairs, batched=False, **kwargs)
    expected = tuple(Node(h, None if i == "error" else i) for h, i in features[:-1]) + (Node.error(HOOKS[1]),)
    assert batched.nodes == looped.nodes == expected
    assert torch.allclose(batched.chosen, looped.chosen, atol=1e-5)
    assert torch.allclose(batched.rejected, looped.rejected, atol=1e-5)
    assert batched.margin.abs().max() > 1e-3  # the ablations do something


def test_ablation_is_what_it_says(rm, pairs, saes):
    """Removing a feature by hand (encode, zero it, decode, add the error back) gives the same change."""
    hook, index = HOOKS[0], 7
    result = ablate(rm, pairs[:1], saes=saes, features=[(hook, index)], skip_first=False, progress=False)
    side = encode_pairs(rm.tokenizer, pairs[:1], max_len=128).chosen
    sae = saes[0]

    def by_hand(act, hook):
        acts = sae.encode(act)
        error = act - sae.decode(acts)
        acts[..., index] = 0
        return sae.decode(acts) + error

    with torch.no_grad():
        clean = rm.reward(side.tokens, side.attention_mask)
        with rm.hooks(fwd_hooks=[(hook, by_hand)]):
            ablated = rm.reward(side.tokens, side.attention_mask)
    assert torch.allclose(result.chosen[:, 0], ablated - clean, atol=1e-5)


def _remove_by_hand(sae, indices, mask=None):
    """Encode the activation as it arrives, remove the features (at the ``mask``'s positions),
    decode, add the error back."""

    def hook_fn(act, hook):
        acts = sae.encode(act)
        error = act - sae.decode(acts)
        if mask is None:
            acts[..., indices] = 0
        else:
            acts[..., indices] = acts[..., indices] * ~mask[..., None]
        return sae.decode(acts) + error

    return hook_fn


@pytest.mark.parametrize("hooks_used", [1, 2])
def test_joint_ablation_is_removal_in_one_run(rm, pairs, saes, hooks_used):
    """Across hooks, each hook removes its features from the activation as it arrives (after the
    earlier removal); at one hook that is the clean-run deltas added."""
    features = [(HOOKS[0], 112), (HOOKS[0], 44), (HOOKS[1], 89), (HOOKS[1], 37)][: 2 * hooks_used]
    joint = ablate(rm, pairs, saes=saes, features=features, jointly=True, skip_first=False, progress=False)
    assert joint.joint and joint.nodes == tuple(Node(h, i) for h, i in features) and joint.margin.shape == (3, 1)
    batch = encode_pairs(rm.tokenizer, pairs, max_len=128)
    fwd_hooks = [(HOOKS[h], _remove_by_hand(saes[h], [i for name, i in features if name == HOOKS[h]]))
                 for h in range(hooks_used)]
    # The rejected side's run continues from the chosen side's over the shared prompt: both are
    # checked against whole forwards.
    for side, effect, clean_reward in [(batch.chosen, joint.chosen, joint.clean_chosen),
                                       (batch.rejected, joint.rejected, joint.clean_rejected)]:
        with torch.no_grad():
            clean = rm.reward(side.tokens, side.attention_mask)
            with rm.hooks(fwd_hooks=fwd_hooks):
                ablated = rm.reward(side.tokens, side.attention_mask)
        assert torch.allclose(effect[:, 0], ablated - clean, atol=1e-5)
        assert torch.allclose(clean_reward, clean, atol=1e-5)
        assert (ablated - clean).abs().max() > 1e-3


def test_divergence_and_masks(rm, pairs):
    batch = encode_pairs(rm.tokenizer, pairs, max_len=128)
    start = divergence(batch)
    for row in range(len(pairs)):
        c, r = batch.chosen.tokens[row], batch.rejected.tokens[row]
        k = int(start[row])
        assert torch.equal(c[:k], r[:k]) and c[k] != r[k]
    chosen_mask, _ = pair_masks(batch, "diverge")
    assert not chosen_mask[0, : int(start[0])].any() and chosen_mask[0, int(start[0])]
    completion, _ = pair_masks(batch, "completion", skip_first=True)
    assert (completion.sum(1) == batch.chosen.attention_mask.sum(1) - batch.chosen.completion_start).all()


def test_run_from_a_layer_matches_the_full_run(rm, pairs):
    side = encode_pairs(rm.tokenizer, pairs, max_len=128).chosen
    full = rm.run_with_deltas(side.tokens, side.attention_mask, read=[rm.layer_input(2)])
    restarted = rm.run_from(full.acts[rm.layer_input(2)], side.attention_mask, layer=2)
    assert torch.allclose(full.rewards, restarted, atol=1e-5)


def test_bad_features(rm, pairs, saes):
    with pytest.raises(ValueError, match=r"feature 500 does not exist at blocks.1.hook_resid_post: valid are 0..127"):
        ablate(rm, pairs, saes=saes, features=[(HOOKS[0], 500)])
    with pytest.raises(ValueError, match=r"no SAE at 'blocks.0.hook_resid_post'; SAEs are at"):
        ablate(rm, pairs, saes=saes, features=[("blocks.0.hook_resid_post", 1)])
    with pytest.raises(ValueError, match="no nodes given"):
        ablate(rm, pairs, saes=saes, features=[])
    with pytest.raises(ValueError, match="baseline must be one of"):
        ablate(rm, pairs, saes=saes, features=[(HOOKS[0], 1)], baseline="resample")
    with pytest.raises(ValueError, match=r"feature index -1 at blocks.1.hook_resid_post is negative; an error node is"):
        ablate(rm, pairs, saes=saes, features=[(HOOKS[0], -1)])


def test_features_in_the_forms_users_give_them(rm, pairs, saes):
    hook = saes[0].cfg.metadata.hook_name
    listed = ablate(rm, pairs, saes=saes, features=[(hook, 3)], progress=False)
    one = ablate(rm, pairs, saes=saes, features=(hook, 3), progress=False)
    assert one.nodes == (Node(hook, 3),) and torch.equal(one.chosen, listed.chosen)
    bare = ablate(rm, pairs, saes=saes[:1], features=[3], progress=False)
    assert bare.nodes == (Node(hook, 3),) and torch.allclose(bare.chosen, listed.chosen)
    named = ablate(rm, pairs, saes=saes, features=[f"{hook}:3"], progress=False)
    assert named.nodes == (Node(hook, 3),) and torch.equal(named.chosen, listed.chosen)
    with pytest.raises(TypeError, match=r"feature 3 is a bare index, but there are SAEs at .*give \(hook_name, index\) pairs"):
        ablate(rm, pairs, saes=saes, features=[3], progress=False)
    with pytest.raises(TypeError, match=r"a feature index must be an integer \(or 'error'\), got 'x'"):
        ablate(rm, pairs, saes=saes, features=[(hook, "x")], progress=False)
    single = ablate(rm, pairs[0], saes=saes, features=(hook, 3), progress=False)
    assert single.chosen.shape == (1, 1)


def test_the_rejected_side_continues_from_the_chosen_sides_ablated_run(rm, saes, monkeypatch):
    """Pairs whose sides share everything but a short tail: a removal in the shared part changes
    both sides alike there, so the rejected side's runs recompute only the tail, and the effects
    still equal full forwards."""
    from pm_lens import PreferencePair
    from pm_lens.attribution.batching import pair_batches
    from tests.attribution.conftest import PAIRS

    pairs = [PreferencePair(p.prompt, p.chosen + " Yes, sure.", p.chosen + " No.") for p in PAIRS]
    features = [(HOOKS[0], i) for i in range(0, 30, 3)] + [(HOOKS[1], i) for i in (1, 5)]
    kwargs = dict(saes=saes, features=features, skip_first=False, progress=False)
    looped = ablate(rm, pairs, batched=False, **kwargs)
    sizes: list[tuple[int, int]] = []
    count = rm.count_forward
    monkeypatch.setattr(rm, "count_forward", lambda input: (sizes.append(tuple(input.shape[:2])), count(input)))
    batched = ablate(rm, pairs, **kwargs)
    assert torch.allclose(batched.chosen, looped.chosen, atol=1e-5)
    assert torch.allclose(batched.rejected, looped.rejected, atol=1e-5)
    batch = pair_batches(rm, pairs, batch_tokens=4096)[0]
    chosen, rejected = batch.chosen, batch.rejected
    width = rejected.tokens.shape[1]
    shared = (chosen.tokens[:, :width] == rejected.tokens).int().cumprod(1).sum(1)
    tail = int(rejected.attention_mask.sum(1).max() - shared.min())
    # The clean forwards and the chosen side's runs span the texts; the rejected side's runs of
    # removals in the shared part span only the tails (from the first unshared position on).
    assert tail < width // 3
    assert sum(positions <= tail for _, positions in sizes) >= len(HOOKS)


def test_removing_every_node_sets_the_hook_to_the_decoded_baseline(rm, pairs, saes):
    """features="all" at one hook (zero baseline, every position): the activation becomes the SAE's
    decode of zeros, on both sides (the rejected side's run continues from the chosen side's)."""
    sae = saes[0]
    everything = ablate(rm, pairs, saes=[sae], features="all", skip_first=False, progress=False)
    batch = encode_pairs(rm.tokenizer, pairs, max_len=128)

    def decoded_zeros(act, hook):
        return sae.decode(torch.zeros(*act.shape[:-1], sae.cfg.d_sae)).reshape(act.shape)

    for side, effect in [(batch.chosen, everything.chosen), (batch.rejected, everything.rejected)]:
        with torch.no_grad():
            clean = rm.reward(side.tokens, side.attention_mask)
            with rm.hooks(fwd_hooks=[(HOOKS[0], decoded_zeros)]):
                removed = rm.reward(side.tokens, side.attention_mask)
        assert torch.allclose(effect[:, 0], removed - clean, atol=1e-5)
        assert (removed - clean).abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["diverge", "completion"])
def test_a_joint_removal_at_later_positions_reruns_only_from_them(rm, pairs, saes, positions, monkeypatch):
    """A joint removal (and every node's) acts at the selected positions only, so each side's run
    restarts at its batch's first selected one against the clean keys and values, and still equals
    a whole forward that removes the features there."""
    from pm_lens.attribution import attribute

    features = [(HOOKS[0], 112), (HOOKS[0], 44), (HOOKS[1], 89), (HOOKS[1], 37)]
    clean = attribute(rm, pairs, saes=saes, positions=positions, progress=False).clean_run
    sizes: list[int] = []
    count = rm.count_forward
    monkeypatch.setattr(rm, "count_forward", lambda input: (sizes.append(input.shape[1]), count(input)))
    joint = ablate(rm, pairs, saes=saes, features=features, jointly=True, positions=positions, clean=clean,
                   progress=False)
    run_sizes = list(sizes)
    batch = encode_pairs(rm.tokenizer, pairs, max_len=128)
    masks = pair_masks(batch, positions, skip_first=True)
    for side, mask, effect in [(batch.chosen, masks[0], joint.chosen), (batch.rejected, masks[1], joint.rejected)]:
        fwd_hooks = [(HOOKS[h], _remove_by_hand(saes[h], [i for name, i in features if name == HOOKS[h]], mask))
                     for h in range(2)]
        with torch.no_grad():
            clean = rm.reward(side.tokens, side.attention_mask)
            with rm.hooks(fwd_hooks=fwd_hooks):
                ablated = rm.reward(side.tokens, side.attention_mask)
        assert torch.allclose(effect[:, 0], ablated - clean, atol=1e-5)
        assert (ablated - clean).abs().max() > 1e-3
    # One run per side, each from the side's first selected position: none spans the prompt.
    firsts = [int(mask.int().argmax(1).min()) for mask in masks]
    widths = [side.tokens.shape[1] for side in (batch.chosen, batch.rejected)]
    assert min(firsts) > 0 and run_sizes == [width - first for width, first in zip(widths, firsts)]
