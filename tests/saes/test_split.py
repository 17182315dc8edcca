"""Every SAELens architecture and option: pm_lens's node split against SAELens's own splice.

The reference is SAELens itself: the SAE spliced into the model with ``add_sae(use_error_term=True)``
and feature ``i`` zeroed at ``hook_sae_acts_post`` (the error term is re-encoded from the clean
input, so only the feature moves). Exact ablation must equal that reward change, and AtP must
equal ``d reward / d acts_i * (0 - acts_i)`` read from the same spliced model. Decoder rows have
norms far from 1, so ``rescale_acts_by_decoder_norm`` cannot agree by accident.
"""

import copy

import pytest
import torch
from sae_lens import (
    AbsTopKSAE,
    AbsTopKSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    MatchingPursuitSAE,
    MatchingPursuitSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata

from pm_lens import PreferencePair, RewardModel, ablate, attribute
from pm_lens.data import encode_pairs
from pm_lens.saes.attach import check_saes
from pm_lens.saes.split import directions, split
from pm_lens.testing import tiny_hf_reward_model

PAIRS = [
    PreferencePair("What is 2+2?", "4, you're welcome!", "I don't know."),
    PreferencePair("Capital of France?", "Paris.", "London, see http://x.com"),
]
RESID, MLP_OUT, HOOK_Z = "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"
D_SAE = 96


@pytest.fixture(scope="module")
def rm():
    from pm_lens.testing import char_tokenizer

    return RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=3), char_tokenizer())


def _randomise(sae, rm, *, seed: int, sparse_bias: float | None = -0.5):
    """Random weights sized to the activations the encoder sees at the SAE's hook, with decoder
    norms spread over a factor of 10 and a nonzero b_dec."""
    tokens, mask = _tokens(rm)
    hook = sae.cfg.metadata.hook_name
    _, cache = rm.run_with_cache(tokens, attention_mask=mask, names_filter=hook)
    x = cache[hook].flatten(2)[mask.bool()]
    normalised = sae.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm")
    size = sae.cfg.d_in**0.5 if normalised else float(x.norm(dim=-1).mean())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d_in = sae.cfg.d_in
        sae.W_dec.copy_(torch.randn(sae.cfg.d_sae, d_in, generator=generator))
        norms = torch.empty(sae.cfg.d_sae).uniform_(0.3, 3.0, generator=generator) * size / 4
        sae.W_dec.mul_((norms / sae.W_dec.norm(dim=-1))[:, None])
        sae.b_dec.copy_(0.1 * size / d_in**0.5 * torch.randn(d_in, generator=generator))
        if isinstance(sae.W_enc, torch.nn.Parameter):
            sae.W_enc.copy_(torch.randn(d_in, sae.cfg.d_sae, generator=generator) / size)
        for name in ("b_enc", "b_mag"):
            if getattr(sae, name, None) is not None and sparse_bias is not None:
                getattr(sae, name).fill_(sparse_bias)
        if hasattr(sae, "b_gate"):
            sae.b_gate.copy_(0.5 * torch.randn(sae.cfg.d_sae, generator=generator))
        if hasattr(sae, "r_mag"):
            sae.r_mag.copy_(0.3 * torch.randn(sae.cfg.d_sae, generator=generator))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.cfg.d_sae, generator=generator) * 0.5)
    return sae


def _meta(hook):
    return SAEMetadata(hook_name=hook)


CASES = {
    "standard": lambda h: StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, metadata=_meta(h))),
    "standard-no-b_dec-in": lambda h: StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, apply_b_dec_to_input=False,
                                                                    metadata=_meta(h))),
    "standard-constant_norm_rescale": lambda h: StandardSAE(StandardSAEConfig(
        d_in=64, d_sae=D_SAE, normalize_activations="constant_norm_rescale", metadata=_meta(h))),
    "standard-layer_norm": lambda h: StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, normalize_activations="layer_norm",
                                                                   metadata=_meta(h))),
    "gated": lambda h: GatedSAE(GatedSAEConfig(d_in=64, d_sae=D_SAE, metadata=_meta(h))),
    "jumprelu": lambda h: JumpReLUSAE(JumpReLUSAEConfig(d_in=64, d_sae=D_SAE, metadata=_meta(h))),
    "jumprelu-no-b_dec-in-layer_norm": lambda h: JumpReLUSAE(JumpReLUSAEConfig(
        d_in=64, d_sae=D_SAE, apply_b_dec_to_input=False, normalize_activations="layer_norm", metadata=_meta(h))),
    "topk": lambda h: TopKSAE(TopKSAEConfig(d_in=64, d_sae=D_SAE, k=8, metadata=_meta(h))),
    "topk-rescale": lambda h: TopKSAE(TopKSAEConfig(d_in=64, d_sae=D_SAE, k=8, rescale_acts_by_decoder_norm=True,
                                                    metadata=_meta(h))),
    "topk-rescale-constant_norm_rescale": lambda h: TopKSAE(TopKSAEConfig(
        d_in=64, d_sae=D_SAE, k=8, rescale_acts_by_decoder_norm=True, normalize_activations="constant_norm_rescale",
        metadata=_meta(h))),
    "abstopk-rescale": lambda h: AbsTopKSAE(AbsTopKSAEConfig(d_in=64, d_sae=D_SAE, k=8, rescale_acts_by_decoder_norm=True,
                                                             metadata=_meta(h))),
}
HOOKS = {RESID: "resid", MLP_OUT: "mlp_out"}


def _tokens(rm):
    batch = encode_pairs(rm.tokenizer, PAIRS, max_len=128).chosen
    return batch.tokens, batch.attention_mask


def _fired(sae, rm, hook):
    """Features that fire on the chosen side, most often first (at most 4)."""
    tokens, mask = _tokens(rm)
    _, cache = rm.run_with_cache(tokens, attention_mask=mask, names_filter=hook)
    acts = sae.encode(cache[hook])
    counts = ((acts != 0) & mask.bool()[..., None]).sum((0, 1))
    order = counts.argsort(descending=True)
    return [int(i) for i in order[:4] if counts[i] > 0]


def _spliced(rm, sae, feature, *, grad=False):
    """Chosen rewards with ``sae`` spliced in (error term) and ``feature`` zeroed (or None: kept),
    and with ``grad`` the gradient of the summed reward with respect to the feature activations."""
    tokens, mask = _tokens(rm)
    hook = sae.cfg.metadata.hook_name
    seen = {}

    def patch(acts, hook):  # noqa: ANN001
        if feature is not None:
            acts = acts.clone()
            acts[..., feature] = 0
        if grad:
            acts = acts.detach().requires_grad_(True)
            seen["acts"] = acts
        return acts

    rm.add_sae(sae, use_error_term=True)
    try:
        with torch.set_grad_enabled(grad), rm.hooks(fwd_hooks=[(f"{hook}.hook_sae_acts_post", patch)]):
            rewards = rm.reward(tokens, mask)
            if grad:
                rewards.sum().backward()
    finally:
        rm.reset_saes()
    return rewards.detach(), (seen["acts"].detach(), seen["acts"].grad) if grad else None


def _check_against_splice(rm, sae):
    """Exact ablation and AtP of the features that fire equal SAELens's splice with each zeroed."""
    hook = sae.cfg.metadata.hook_name
    features = _fired(sae, rm, hook)
    assert features, "the test SAE must fire"
    clean, _ = _spliced(rm, sae, None)
    exact = ablate(rm, PAIRS, saes=[sae], features=[(hook, i) for i in features], skip_first=False, progress=False)
    for column, i in enumerate(features):
        zeroed, _ = _spliced(rm, sae, i)
        torch.testing.assert_close(exact.chosen[:, column], (zeroed - clean).float(), atol=2e-4, rtol=1e-3)
    atp = attribute(rm, PAIRS, saes=[sae], skip_first=False, progress=False)
    _, (acts, grad) = _spliced(rm, sae, None, grad=True)
    _, mask = _tokens(rm)
    reference = (grad * -acts * mask[..., None]).sum(1)
    estimated = atp.chosen.features[hook].to_dense()
    torch.testing.assert_close(estimated[:, features], reference[:, features], atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("hook", list(HOOKS), ids=list(HOOKS.values()))
@pytest.mark.parametrize("case", list(CASES))
def test_ablation_and_atp_equal_saelens_splice(rm, case, hook):
    sae = _randomise(CASES[case](hook), rm, seed=list(CASES).index(case), sparse_bias=-0.5 if "topk" not in case else 0.0)
    _check_against_splice(rm, sae)


def test_hook_z_sae_with_reshaping_equals_saelens_splice(rm):
    sae = _randomise(StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, reshape_activations="hook_z",
                                                   metadata=_meta(HOOK_Z))), rm, seed=7)
    tokens, mask = _tokens(rm)
    _, cache = rm.run_with_cache(tokens, attention_mask=mask, names_filter=HOOK_Z)
    assert cache[HOOK_Z].ndim == 4  # [batch, pos, n_heads, d_head]
    _check_against_splice(rm, sae)


def test_matching_pursuit_split_equals_its_own_decode(rm):
    """Matching pursuit's encode has no acts hook to patch, so the reference is its own decode:
    removing feature i from the split moves x by decode(acts) - decode(acts with a_i = 0)."""
    sae = _randomise(MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=64, d_sae=D_SAE, residual_threshold=1.0,
                                                                 max_iterations=6, metadata=_meta(RESID))), rm, seed=3)
    check_saes(rm, [sae])
    tokens, mask = _tokens(rm)
    _, cache = rm.run_with_cache(tokens, attention_mask=mask, names_filter=RESID)
    nodes = split(sae, cache[RESID])
    i = int((nodes.acts != 0).sum((0, 1)).argmax())
    removed = nodes.acts.clone()
    removed[..., i] = 0
    expected = sae.decode(removed) - sae.decode(nodes.acts)
    got = nodes.scale * (0 - nodes.acts[..., i : i + 1]) * directions(sae)[i]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.decode(nodes.acts) + nodes.error, nodes.x)


def test_decode_plus_error_is_the_activation_for_every_case(rm):
    tokens, mask = _tokens(rm)
    _, cache = rm.run_with_cache(tokens, attention_mask=mask, names_filter=RESID)
    for case, build in CASES.items():
        sae = _randomise(build(RESID), rm, seed=1)
        nodes = split(sae, cache[RESID])
        torch.testing.assert_close(sae.decode(sae.encode(cache[RESID])) + nodes.error, nodes.x, msg=case)


# ---- what is refused or warned about --------------------------------------------------------


def test_hook_z_sae_without_reshaping_is_refused_with_the_fix(rm):
    sae = _randomise(StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, metadata=_meta(HOOK_Z))), rm, seed=1)
    with pytest.raises(ValueError, match=r"reshape_activations='hook_z'"):
        attribute(rm, PAIRS, saes=[sae], progress=False)
    wrong_width = StandardSAE(StandardSAEConfig(d_in=48, d_sae=D_SAE, metadata=_meta(HOOK_Z)))
    with pytest.raises(ValueError, match=r"d_in=48.*n_heads=4, d_head=16"):
        attribute(rm, PAIRS, saes=[wrong_width], progress=False)


def test_non_finite_sae_weights_are_refused(rm):
    sae = _randomise(StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, metadata=_meta(RESID))), rm, seed=1)
    with torch.no_grad():
        sae.W_dec[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite weights in W_dec"):
        attribute(rm, PAIRS, saes=[sae], progress=False)
    with torch.no_grad():
        sae.W_dec[3, 5] = 0.0
        sae.b_enc[0] = float("inf")
    with pytest.raises(ValueError, match=r"b_enc"):
        ablate(rm, PAIRS, saes=[sae], features=[(RESID, 0)], progress=False)


def test_two_saes_for_one_hook_are_refused(rm):
    a = _randomise(StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, metadata=_meta(RESID))), rm, seed=1)
    b = _randomise(StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, metadata=_meta(RESID))), rm, seed=2)
    with pytest.raises(ValueError, match=r"several SAEs for the same hook.*blocks.1.hook_resid_post"):
        attribute(rm, PAIRS, saes=[a, b], progress=False)
    with pytest.raises(ValueError, match=r"several SAEs for the same hook"):
        ablate(rm, PAIRS, saes=[a, b], features=[(RESID, 0)], progress=False)


def test_a_decoder_pm_lens_does_not_model_is_refused(rm):
    class DoublingSAE(StandardSAE):
        def decode(self, feature_acts):
            return super().decode(2 * feature_acts)

    sae = _randomise(DoublingSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, metadata=_meta(RESID))), rm, seed=1)
    with pytest.raises(ValueError, match=r"cannot split the SAE for blocks.1.hook_resid_post \(DoublingSAE\)"):
        attribute(rm, PAIRS, saes=[sae], progress=False)


def test_transcoders_are_refused(rm):
    from sae_lens import Transcoder, TranscoderConfig

    transcoder = Transcoder(TranscoderConfig(d_in=64, d_sae=D_SAE, d_out=64, apply_b_dec_to_input=False,
                                              metadata=_meta(RESID)))
    with pytest.raises(ValueError, match=r"Transcoder.*reads one hook and writes another"):
        attribute(rm, PAIRS, saes=[transcoder], progress=False)


def test_unapplied_normalisation_is_warned_about(rm):
    sae = _randomise(StandardSAE(StandardSAEConfig(d_in=64, d_sae=D_SAE, normalize_activations="expected_average_only_in",
                                                   metadata=_meta(RESID))), rm, seed=1)
    with pytest.warns(UserWarning, match=r"expected_average_only_in.*does not apply at inference"):
        check_saes(rm, [sae])


def test_sae_objects_only(rm):
    with pytest.raises(TypeError, match=r"SAELens SAE objects, got dict"):
        attribute(rm, PAIRS, saes=[{"W_dec": torch.zeros(2, 2)}], progress=False)
    with pytest.raises(TypeError, match=r"saes must be an SAE or a list of SAEs, got str"):
        attribute(rm, PAIRS, saes="blocks.1.hook_resid_post", progress=False)


def test_rescaled_topk_effects_scale_with_the_unit_direction(rm):
    """The defect this module fixes: with rescale_acts_by_decoder_norm, the effect of removing a
    feature does not grow with |W_dec[i]| (SAELens decodes with the unit row)."""
    sae = _randomise(CASES["topk-rescale"](RESID), rm, seed=5, sparse_bias=0.0)
    features = _fired(sae, rm, RESID)[:2]
    before = ablate(rm, PAIRS, saes=[sae], features=[(RESID, i) for i in features], skip_first=False, progress=False)
    scaled = copy.deepcopy(sae)
    with torch.no_grad():
        scaled.W_dec.mul_(4.0)  # encode multiplies by |W_dec| and decode divides: same acts x direction
        scaled.W_enc.div_(4.0)
    after = ablate(rm, PAIRS, saes=[scaled], features=[(RESID, i) for i in features], skip_first=False, progress=False)
    torch.testing.assert_close(after.chosen, before.chosen, atol=1e-4, rtol=1e-3)
