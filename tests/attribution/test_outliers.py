"""Massive-activation positions: one skip_first default, and effects that come from them are named."""

import warnings

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata

from pm_lens import PreferencePair, RewardModel, ablate, attribute
from pm_lens.attribution.outliers import outlier_positions
from pm_lens.data import SKIP_FIRST, encode_pairs
from pm_lens.testing import CHAR_VOCAB, char_tokenizer, tiny_hf_reward_model

HOOK = "blocks.1.hook_resid_post"
SINK = "~"  # a character whose embedding is made huge: an attention-sink-like massive activation
PAIRS = [
    PreferencePair("What is 2+2?", f"4{SINK} you're welcome!", "I don't know."),
    PreferencePair("Capital of France?", "Paris.", f"London{SINK} see http://x.com"),
]


@pytest.fixture(scope="module")
def rm():
    hf = tiny_hf_reward_model(num_hidden_layers=3)
    with torch.no_grad():
        embedding = hf.model.embed_tokens.weight
        embedding[CHAR_VOCAB.index(SINK)] *= 400.0
    return RewardModel.from_hf(hf, char_tokenizer())


def _sink_sae(rm):
    """Feature 0 reads the sink's direction and fires only there; features 1-7 fire on ordinary
    tokens (random directions, encoder biases at their 80th percentile)."""
    batch = encode_pairs(rm.tokenizer, PAIRS, max_len=128).chosen
    _, cache = rm.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=HOOK)
    x = cache[HOOK]
    sink = x[0, (batch.tokens[0] == CHAR_VOCAB.index(SINK)).nonzero()[0, 0]]
    ordinary = x[batch.attention_mask.bool() & (batch.tokens != CHAR_VOCAB.index(SINK))]
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=8, apply_b_dec_to_input=False, metadata=SAEMetadata(hook_name=HOOK)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc.copy_(torch.randn(64, 8, generator=generator) / ordinary.norm(dim=-1).mean())
        sae.W_enc[:, 0] = sink / sink.norm() ** 2
        pre = ordinary @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre, 0.8, dim=0))
        sae.b_enc[0] = -0.5
        sae.W_dec.copy_(torch.randn(8, 64, generator=generator) * ordinary.norm(dim=-1).mean() / 8)
        sae.W_dec[0] = sink
    return sae


def test_outlier_positions_are_relative_to_the_median():
    x = torch.ones(1, 5, 4)
    x[0, 2] *= 50.0
    mask = torch.tensor([[True, True, True, True, False]])
    outliers, relative = outlier_positions(x, mask)
    assert outliers.tolist() == [[False, False, True, False, False]]
    assert float(relative[0, 2]) == pytest.approx(50.0)
    outliers, _ = outlier_positions(x, torch.tensor([[True, True, False, True, True]]))
    assert not outliers.any()  # the massive position is not selected: nothing to flag


def test_the_sink_is_found_and_its_feature_named(rm):
    sae = _sink_sae(rm)
    with pytest.warns(UserWarning, match=rf"{HOOK}:0 \(rank \d+, 100% of its effect; e.g. pair 0, chosen, position \d+"):
        result = attribute(rm, PAIRS, saes=[sae], progress=False)
    sink_positions = result.outliers
    assert set(sink_positions.side) == {"chosen", "rejected"}
    assert (sink_positions.norm_ratio > 10).all()
    row = result.ranking().query("feature == 0 and kind == 'feature'").iloc[0]
    assert row.outlier_share == pytest.approx(1.0, abs=1e-6)
    assert result.outlier_effects[HOOK].to_dense()[:, 0].tolist() == pytest.approx(
        result.effects[HOOK].to_dense()[:, 0].tolist(), abs=1e-6)
    # The ordinary features owe nothing to the sink.
    ordinary = result.ranking().query("kind == 'feature' and feature != 0")
    assert (ordinary.outlier_share.abs() < 0.5).all()


def test_ablating_a_feature_at_the_sink_warns(rm):
    sae = _sink_sae(rm)
    with pytest.warns(UserWarning, match=rf"{HOOK}:0.*over 10x the median"):
        ablate(rm, PAIRS, saes=[sae], features=[(HOOK, 0)], progress=False)


def test_no_warning_when_nothing_is_massive(tokenizer):
    rm = RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=3), tokenizer)
    batch = encode_pairs(rm.tokenizer, PAIRS, max_len=128).chosen
    from pm_lens.testing import sparse_sae_for

    sae = sparse_sae_for(rm, HOOK, batch.tokens, d_sae=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = attribute(rm, PAIRS, saes=[sae], progress=False)
    assert result.outliers.empty


def test_one_first_token_default_everywhere():
    """train_saes, attribute, ablate, evaluate_sae and top_contexts leave the first token out by default."""
    import inspect

    from pm_lens.saes.contexts import top_contexts
    from pm_lens.saes.evaluate import evaluate_sae
    from pm_lens.saes.train import collect_activations, train_saes

    assert SKIP_FIRST is True
    for fn in (attribute, ablate, evaluate_sae, top_contexts, train_saes, collect_activations):
        assert inspect.signature(fn).parameters["skip_first"].default is SKIP_FIRST, fn.__name__


def test_the_first_token_is_left_out_of_attribution_by_default(rm):
    """With the sink as each text's first token (raw format), its feature gets no effect by default,
    and a warning naming it with skip_first=False."""
    sae = _sink_sae(rm)
    starting = [PreferencePair(f"{SINK}Q: 2+2? A: ", "4", "5"), PreferencePair(f"{SINK}Q: red? A: ", "yes", "no")]
    rm.text_format = "raw"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            default = attribute(rm, starting, saes=[sae], progress=False)
        with pytest.warns(UserWarning, match=rf"{HOOK}:0 .*position 0"):
            everything = attribute(rm, starting, saes=[sae], skip_first=False, progress=False)
    finally:
        rm.text_format = "auto"
    assert default.settings.skip_first is True and default.settings.text_format == "raw"
    assert default.effects[HOOK].to_dense()[:, 0].abs().max() == 0
    assert everything.effects[HOOK].to_dense()[:, 0].abs().max() > 0
