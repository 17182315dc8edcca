"""Every number on a dashboard equals an independent computation on a tiny model: histogram counts
and density from SAELens's own spliced forward, an example's activations, per-token contributions
summed against attribute(), a datapoint recomputed by zeroing the feature in SAELens's spliced
forward, the direct effect by hand through the final norm and head, co-firing counts and label
rates from the spliced activations."""

import numpy as np
import pytest
import torch

from pm_lens import PreferencePair, RewardModel, attribute
from pm_lens.dashboard import build_dashboards
from pm_lens.data import encode_pairs
from pm_lens.saes import attach_saes, detach_saes, feature_acts
from pm_lens.saes.attach import FEATURE_HOOK
from pm_lens.testing import char_tokenizer, sparse_sae_for, tiny_hf_reward_model

PAIRS = [
    PreferencePair("What is 2+2?", "4, you're welcome!", "I don't know.", meta={"topic": "math", "id": 0}),
    PreferencePair("Capital of France?", "Paris.", "London, see http://x.com", meta={"topic": "geo", "id": 1}),
    PreferencePair("Name a colour.", "Red, thanks!", "Go away, you idiot.", meta={"topic": "geo", "id": 2}),
    PreferencePair("Say hi.", "Hi there! My pleasure.", "No.", meta={"topic": "chat", "id": 3}),
]
HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]


@pytest.fixture(scope="module", params=["LlamaForSequenceClassification", "GPT2ForSequenceClassification"],
                ids=["llama-rmsnorm", "gpt2-layernorm"])
def setup(request):
    rm = RewardModel.from_hf(tiny_hf_reward_model(request.param, num_hidden_layers=3) if "Llama" in request.param
                             else tiny_hf_reward_model(request.param, n_layer=3), char_tokenizer())
    batch = encode_pairs(rm.tokenizer, PAIRS, max_len=128)
    saes = [sparse_sae_for(rm, hook, batch.chosen.tokens, seed=i, d_sae=48, fire_rate=0.2) for i, hook in enumerate(HOOKS)]
    with torch.no_grad():  # thresholds calibrated exactly onto a token would flip with padding's rounding
        for sae in saes:
            sae.b_enc.sub_(1e-3)
    attribution = attribute(rm, PAIRS, saes=saes, progress=False)
    nodes = list(attribution.ranking().query("kind == 'feature'").node[:3])
    dashboards = build_dashboards(rm, saes, PAIRS, nodes, before=200, after=200, n_top=8, progress=False)
    return rm, saes, attribution, {d.node: d for d in dashboards}


def spliced_acts(rm, saes, text):
    """Feature activations of one text from SAELens's own spliced forward (no padding)."""
    tokens = torch.tensor([rm.tokenizer(text)["input_ids"]])
    attach_saes(rm, saes)
    try:
        return tokens[0], {hook: acts[0] for hook, acts in feature_acts(rm, tokens).items()}
    finally:
        detach_saes(rm)


def texts(rm):
    from pm_lens.data.encoding import encode_one

    out = []
    for i, pair in enumerate(PAIRS):
        for side in ("chosen", "rejected"):
            ids, start = encode_one(rm.tokenizer, pair.prompt, getattr(pair, side), text_format=rm.text_format)
            out.append((i, side, ids, start))
    return out


def all_acts(rm, saes):
    """Per text ``(pair, side, ids, completion_start, {hook: [pos, d_sae]})``, first token zeroed."""
    found = []
    for pair, side, ids, start in texts(rm):
        attach_saes(rm, saes)
        try:
            acts = feature_acts(rm, torch.tensor([ids]))
        finally:
            detach_saes(rm)
        found.append((pair, side, ids, start, {hook: a[0].clone().index_fill_(0, torch.tensor([0]), 0.0)
                                               for hook, a in acts.items()}))
    return found


def test_histogram_and_density_match_saelens_spliced_activations(setup):
    rm, saes, _, dashboards = setup
    found = all_acts(rm, saes)
    n_tokens = sum(len(ids) - 1 for _, _, ids, _, _ in found)
    for board in dashboards.values():
        values = torch.cat([acts[board.hook_name][:, board.feature] for *_, acts in found]).detach().numpy()
        nonzero = values[values > 0]
        counts, _ = np.histogram(nonzero, bins=np.array(board.histogram.edges))
        assert board.histogram.n_tokens == n_tokens
        assert board.histogram.n_nonzero == len(nonzero)
        assert board.histogram.counts == counts.tolist()
        assert board.histogram.density == pytest.approx(len(nonzero) / n_tokens)
        assert board.histogram.edges[-1] == pytest.approx(float(nonzero.max()), rel=1e-5)


def test_examples_show_the_spliced_activations_and_contributions_sum_to_the_attribution(setup):
    rm, saes, attribution, dashboards = setup
    by_text = {(pair, side): (ids, acts) for pair, side, ids, _, acts in all_acts(rm, saes)}
    for board in dashboards.values():
        examples = [e for g in board.groups for e in g.examples]
        assert examples and board.groups[0].examples[0].max_act == pytest.approx(board.histogram.edges[-1], rel=1e-5)
        for example in examples:
            ids, acts = by_text[(example.pair, example.side)]
            assert len(example.tokens) == len(ids)  # a window wider than the text is the whole text
            torch.testing.assert_close(torch.tensor(example.acts), acts[board.hook_name][:, board.feature].detach(),
                                       rtol=1e-4, atol=1e-6)
            side = getattr(attribution, example.side)
            effect = float(side.features[board.hook_name].to_dense()[example.pair, board.feature])
            assert sum(example.contributions) == pytest.approx(-effect, rel=1e-4, abs=1e-7)
            fired = np.array(example.acts) > 0
            assert not np.any(np.array(example.contributions)[~fired])  # it contributes only where it fires


def test_a_datapoint_equals_zeroing_the_feature_in_the_spliced_forward(setup):
    rm, saes, _, dashboards = setup
    board = next(iter(dashboards.values()))
    point = board.datapoints[0]
    pair = PAIRS[point.pair]
    rewards = {}
    for side in ("chosen", "rejected"):
        from pm_lens.data.encoding import encode_one

        ids, _ = encode_one(rm.tokenizer, pair.prompt, getattr(pair, side), text_format=rm.text_format)
        tokens = torch.tensor([ids])

        def zero(acts, hook):
            acts = acts.clone()
            acts[:, 1:, board.feature] = 0.0  # the first token is left out, as the run does
            return acts

        attach_saes(rm, saes)
        try:
            with torch.no_grad():
                clean = float(rm.reward(tokens)[0])
                with rm.hooks(fwd_hooks=[(f"{board.hook_name}.{FEATURE_HOOK}", zero)]):
                    removed = float(rm.reward(tokens)[0])
        finally:
            detach_saes(rm)
        rewards[side] = (clean, removed)
    assert point.chosen_before == pytest.approx(rewards["chosen"][0], abs=1e-4)
    assert point.chosen_after == pytest.approx(rewards["chosen"][1], abs=1e-4)
    assert point.rejected_before == pytest.approx(rewards["rejected"][0], abs=1e-4)
    assert point.rejected_after == pytest.approx(rewards["rejected"][1], abs=1e-4)
    margin = (rewards["chosen"][1] - rewards["rejected"][1]) - (rewards["chosen"][0] - rewards["rejected"][0])
    assert point.margin_effect == pytest.approx(margin, abs=1e-4)
    assert point.preference_flips == ((rewards["chosen"][0] > rewards["rejected"][0])
                                      != (rewards["chosen"][1] > rewards["rejected"][1]))
    efforts = [abs(p.margin_effect) for p in board.datapoints]
    assert efforts == sorted(efforts, reverse=True)


def test_the_direct_effect_equals_a_hand_computation_through_the_final_norm_and_head(setup):
    rm, saes, _, dashboards = setup
    final_hook = f"blocks.{rm.cfg.n_layers - 1}.hook_resid_post"
    w = rm.unembed.W_U[:, 0].detach().double()  # the bias has no direct effect: it does not depend on x
    for board in dashboards.values():
        sae = {s.cfg.metadata.hook_name: s for s in saes}[board.hook_name]
        v = sae.W_dec[board.feature].detach().double()
        units, removed = [], {}
        for pair, side, ids, _, acts in all_acts(rm, saes):
            _, cache = rm.run_with_cache(torch.tensor([ids]), names_filter=[final_hook])
            x = cache[final_hook][0, -1].detach().double()
            if rm.cfg.normalization_type == "LNPre":  # centre, then scale: d y / d x . v by hand
                x, v_in = x - x.mean(), v - v.mean()
            else:
                v_in = v
            s = torch.sqrt((x * x).mean() + rm.cfg.eps)
            jv = v_in / s - x * (x @ v_in) / (len(x) * s**3)
            unit = float(w @ jv)
            units.append(unit)
            removed[(pair, side)] = -float(acts[board.hook_name][-1, board.feature]) * unit
        assert board.direct.per_unit == pytest.approx(np.mean(units), rel=1e-4)
        chosen = np.mean([removed[(p, "chosen")] for p in range(len(PAIRS))])
        rejected = np.mean([removed[(p, "rejected")] for p in range(len(PAIRS))])
        assert board.direct.chosen == pytest.approx(chosen, rel=1e-3, abs=1e-7)
        assert board.direct.margin == pytest.approx(chosen - rejected, rel=1e-3, abs=1e-7)


def test_cofiring_counts_and_label_rates_match_the_spliced_activations(setup):
    rm, saes, _, dashboards = setup
    found = all_acts(rm, saes)
    for board in dashboards.values():
        mine = torch.cat([acts[board.hook_name][:, board.feature] > 0 for *_, acts in found])
        for row in board.cofiring[:3]:
            hook, index = row.node.rsplit(":", 1)
            other = torch.cat([acts[hook][:, int(index)] > 0 for *_, acts in found])
            both = int((mine & other).sum())
            assert row.both == both
            assert row.jaccard == pytest.approx(both / int((mine | other).sum()))
            assert row.share == pytest.approx(both / int(mine.sum()))
        peaks = {}
        for pair, side, ids, start, acts in found:
            peaks[(pair, side)] = float(acts[board.hook_name][start:, board.feature].max()) if start < len(ids) else 0.0
        geo = [p for p, pair in enumerate(PAIRS) if pair.meta["topic"] == "geo"]
        row = next(r for r in board.labels if r.label == "topic" and r.value == "geo")
        assert row.n_pairs == len(geo)
        assert row.chosen_rate == pytest.approx(np.mean([peaks[(p, "chosen")] > 0 for p in geo]))
        assert row.rejected_peak == pytest.approx(np.mean([peaks[(p, "rejected")] for p in geo]), rel=1e-4, abs=1e-7)
        assert not any(r.label == "id" for r in board.labels)  # one value per pair: an id, not a label


def test_the_total_effect_is_the_exact_ablation_over_all_pairs(setup):
    """Without a given exact effect, every pair the feature fires in is ablated: with features
    removed to 0 the mean over all pairs follows (where it never fires, removal changes nothing)."""
    from pm_lens import ablate

    rm, saes, _, dashboards = setup
    for board in dashboards.values():
        exact = ablate(rm, PAIRS, saes=saes, features=[board.node], progress=False)
        assert board.exact_margin_effect == pytest.approx(float(exact.margin.mean()), rel=1e-4, abs=1e-7)
        assert board.direct.total_margin == board.exact_margin_effect


def test_reading_from_the_clean_run_and_a_given_ablation_gives_the_same_dashboards(setup):
    """The demo passes the attribution's clean run (no clean forward; only the blocks after the last
    SAE rerun, for the direct effect) and the fidelity card's ablation (no new ablation)."""
    from pm_lens import ablate

    rm, saes, attribution, dashboards = setup
    nodes = list(dashboards)
    exact = ablate(rm, PAIRS, saes=saes, features=nodes, clean=attribution.clean_run, progress=False)
    before = rm.forward_count.snapshot()
    again = build_dashboards(rm, saes, PAIRS, nodes, before=200, after=200, n_top=8, clean=attribution.clean_run,
                             ablation=exact, progress=False)
    spent = rm.forward_count.since(before)
    assert spent.sequences["dashboard"] < 2 * len(PAIRS) + 2 * 8  # no full clean pass and no ablation of all pairs
    assert spent.passes["ablation"] == 0
    for board in again:
        want = dashboards[board.node]
        assert board.histogram.counts == want.histogram.counts
        assert board.direct.per_unit == pytest.approx(want.direct.per_unit, rel=1e-4)
        assert board.exact_margin_effect == pytest.approx(want.exact_margin_effect, rel=1e-4, abs=1e-7)
        assert [p.pair for p in board.datapoints] == [p.pair for p in want.datapoints]
        for got_group, want_group in zip(board.groups, want.groups):
            for got_example, want_example in zip(got_group.examples, want_group.examples):
                torch.testing.assert_close(torch.tensor(got_example.acts), torch.tensor(want_example.acts),
                                           rtol=1e-4, atol=1e-6)


def test_contributions_read_from_the_kept_gradients_equal_a_fresh_backward(setup):
    """attribute() keeps each side's gradients in its clean run; the dashboards' per-token
    contributions from them equal those of a new forward and backward (and need neither)."""
    rm, saes, attribution, dashboards = setup
    before = rm.forward_count.snapshot()
    again = build_dashboards(rm, saes, PAIRS, list(dashboards), before=200, after=200, n_top=8,
                             clean=attribution.clean_run, progress=False)
    assert rm.forward_count.since(before).sequences["dashboard"] <= 2 * len(PAIRS)  # restarts for the final residual
    for board in again:
        want = dashboards[board.node]
        for got_group, want_group in zip(board.groups, want.groups):
            for got_example, want_example in zip(got_group.examples, want_group.examples):
                torch.testing.assert_close(torch.tensor(got_example.contributions),
                                           torch.tensor(want_example.contributions), rtol=1e-4, atol=1e-7)


def test_interval_examples_lie_in_their_band_and_bands_count_the_activations(setup):
    rm, saes, _, dashboards = setup
    found = all_acts(rm, saes)
    for board in dashboards.values():
        values = torch.cat([acts[board.hook_name][:, board.feature] for *_, acts in found]).detach().numpy()
        nonzero = values[values > 0]
        shown = [(e.pair, e.side) for g in board.groups for e in g.examples]
        assert len(shown) == len(set(shown))  # no text twice
        for group in board.groups[1:]:
            inside = (nonzero > group.bin_min) & (nonzero <= group.bin_max)
            assert group.bin_contains == pytest.approx(inside.mean(), rel=1e-5)
            for example in group.examples:
                assert group.bin_min < example.max_act <= group.bin_max + 1e-6


def test_attention_and_mlp_neuron_saes(tmp_path):
    """An ``attn.hook_z`` SAE writes into the residual stream through W_O: its direct path is the
    decoder row mapped by W_O (checked by hand); an ``mlp.hook_post`` SAE has no direct path
    (None), and both pages render."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from pm_lens.dashboard.render import write_dashboards
    from pm_lens.testing import calibrate_sparsity

    rm = RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=3), char_tokenizer())
    tokens = encode_pairs(rm.tokenizer, PAIRS, max_len=128).chosen.tokens
    saes = []
    for hook, width, reshape in (("blocks.1.attn.hook_z", rm.cfg.n_heads * rm.cfg.d_head, "hook_z"),
                                 ("blocks.2.mlp.hook_post", rm.cfg.d_mlp, "none")):
        torch.manual_seed(0)
        sae = StandardSAE(StandardSAEConfig(d_in=width, d_sae=32, reshape_activations=reshape,
                                            metadata=SAEMetadata(hook_name=hook)))
        with torch.no_grad():
            sae.W_enc.normal_(0, width**-0.5)
            sae.W_dec.normal_(0, 32**-0.5)
        _, cache = rm.run_with_cache(tokens, names_filter=hook)
        saes.append(calibrate_sparsity(sae, cache[hook].flatten(2).flatten(0, 1).float(), fire_rate=0.2))
    boards = build_dashboards(rm, saes, PAIRS, [("blocks.1.attn.hook_z", 3), ("blocks.2.mlp.hook_post", 5)],
                              progress=False)
    z, post = boards
    assert post.direct is None
    final_hook = f"blocks.{rm.cfg.n_layers - 1}.hook_resid_post"
    W_O = rm.blocks[1].attn.W_O.detach().double()
    v = torch.einsum("hd,hdm->m", saes[0].W_dec[3].detach().double().reshape(W_O.shape[:2]), W_O)
    w = rm.unembed.W_U[:, 0].detach().double()
    units = []
    for _, _, ids, _ in texts(rm):
        _, cache = rm.run_with_cache(torch.tensor([ids]), names_filter=[final_hook])
        x = cache[final_hook][0, -1].detach().double()
        s = torch.sqrt((x * x).mean() + rm.cfg.eps)
        units.append(float(w @ (v / s - x * (x @ v) / (len(x) * s**3))))
    assert z.direct.per_unit == pytest.approx(np.mean(units), rel=1e-4)
    index = write_dashboards(tmp_path, boards)
    assert "no direct" in (tmp_path / "blocks.2.mlp.hook_post-5.html").read_text() and index.exists()
