"""The HTML report: sections present, text escaped, tokens shaded by activation."""

import pandas as pd
import torch

from pm_lens import Node
from pm_lens.attribution.fidelity import FidelityCard
from pm_lens.report import render_report, write_report
from pm_lens.saes.contexts import Context, FeatureContexts


def _card():
    return FidelityCard(settings={"method": "atp", "ig_steps": None, "target": "margin", "baseline": "zero", "positions": "all"},
                        n_top=2, n_random=1, k=2, pearson=0.9, spearman=0.8, pearson_top=1.0, spearman_top=1.0,
                        sign_agreement=1.0, topk_recall=1.0, median_relative_error=0.1, missed_threshold=0.5,
                        missed_in_sample=0, missed_estimated=0.0, n_outside_top=7, completeness=None)


def test_report_escapes_text_and_shades_tokens(tmp_path):
    features = pd.DataFrame({"hook_name": ["blocks.0.hook_resid_post"] * 2, "feature": [3, 5], "direction": ["raises", "lowers"],
                             "fires_on": ["'<script>'", "'x'"]})
    context = Context(pair=0, side="chosen", tokens=["Hi", "<script>", "\n"], acts=[0.0, 2.0, 1.0], peak=1, completion_start=1)
    node = Node("blocks.0.hook_resid_post", 3)
    contexts = {node: FeatureContexts(node, [context], [("<script>", 2.0)], 0.1, torch.zeros(1, 2), 0.5)}
    page = render_report(title="A & B", settings={"seed": 0}, features=features, card=_card(), contexts=contexts,
                         tables={"Extra": pd.DataFrame({"x": [1]})}, notes={"Fidelity": "a <note>"})
    assert "<script>" not in page and "&lt;script&gt;" in page and "A &amp; B" in page and "a &lt;note&gt;" in page
    for heading in ("Features that raise reward", "Features that lower reward", "Fidelity", "Extra", "Where the features fire"):
        assert f"<h2>{heading}</h2>" in page
    assert "rgba(255, 120, 0, 1.00)" in page and "rgba(255, 120, 0, 0.50)" in page  # peak and half-peak shades
    assert "blocks.0.hook_resid_post:3" in page  # the node's one spelling
    assert "class='prompt'" in page and "class='completion peak'" in page and "⏎" in page
    write_report(tmp_path / "r.html", title="t", settings={}, features=features, card=_card(), contexts=contexts)
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


def test_report_of_any_run_takes_attributes_top_features(tmp_path, tokenizer):
    """write_report on attribute(...).top_features() (no 'direction' column): features are split
    by the sign of their removal effect, and the headings say what the sign means."""
    from pm_lens import RewardModel, attribute
    from pm_lens.attribution.fidelity import check_fidelity
    from pm_lens.data import encode_pairs
    from pm_lens.testing import sparse_sae_for, tiny_hf_reward_model
    from tests.attribution.conftest import PAIRS

    rm = RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=3), tokenizer)
    tokens = encode_pairs(tokenizer, PAIRS, max_len=128).chosen.tokens
    sae = sparse_sae_for(rm, "blocks.1.hook_resid_post", tokens, d_sae=64, fire_rate=0.2)
    result = attribute(rm, PAIRS, saes=[sae], progress=False)
    top = result.top_features(6)
    card = check_fidelity(rm, result, top_k=5, n_random=3, progress=False)
    write_report(tmp_path / "r.html", title="run", settings={}, features=top, card=card, contexts={})
    page = (tmp_path / "r.html").read_text()
    assert "Features that raise reward" in page and "removing one of these lowers reward (effect &lt; 0)" in page
    raising = top[top.effect < 0]
    for row in raising.itertuples():
        assert row.node in page
    raising_words = render_report(title="t", settings={}, features=result.top_features(3, direction="raising")
                                  .assign(direction="raising"), card=card, contexts={})
    assert "Features that raise reward" in raising_words
