"""The SDPA attention fast path (``pm_lens.model.attention``) computes what TransformerLens computes,
and TransformerLens's own attention runs wherever a hook, a cache, a soft-cap or a local window needs it.

Which path ran is counted per layer (calls of ``AbstractAttention.forward``, the fallback, and of
``sdpa_attention``, the fast path), never inferred from timings.
"""

import copy
from collections import Counter

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.components import Attention, GroupedQueryAttention
from transformer_lens.components.abstract_attention import AbstractAttention

from pm_lens import RewardModel
from pm_lens.model import attention
from pm_lens.model.attention import SdpaAttention, SdpaGroupedQueryAttention, sdpa_mask, sdpa_z
from pm_lens.testing import TINY_CONFIGS, tiny_hf_reward_model
from tests.model.helpers import TEXTS

TOL = 1e-4  # the parity tolerance of tests/model/test_parity.py
GEMMA2, MISTRAL = "Gemma2ForSequenceClassification", "MistralForSequenceClassification"
LLAMA = "LlamaForSequenceClassification"
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# (architecture, config overrides, layers expected on the fast path)
CASES = [(arch, {}, set() if arch == GEMMA2 else {0, 1}) for arch in TINY_CONFIGS] + [
    # Gemma-2 without its score soft-cap: layer 0 is local (sliding window), layer 1 global.
    (GEMMA2, {"attn_logit_softcapping": None}, {1}),
    (MISTRAL, {"sliding_window": 8}, set()),
    (LLAMA, {"rope_parameters": LLAMA3_ROPE}, {0, 1}),
    (LLAMA, {"num_key_value_heads": 4}, {0, 1}),  # multi-head: Attention, not GroupedQueryAttention
    ("GPTNeoXForSequenceClassification", {"use_parallel_residual": False}, {0, 1}),
    ("GPT2ForSequenceClassification", {"scale_attn_by_inverse_layer_idx": True}, {0, 1}),  # attn_scale per layer
]
IDS = [f"{arch.removesuffix('ForSequenceClassification')}{'-' + '-'.join(o) if o else ''}"
       for arch, o, _ in CASES]


@pytest.fixture
def paths(monkeypatch):
    """Counts, per layer, the calls of the fallback (TransformerLens's forward) and of the fast path."""
    counts = {"fallback": Counter(), "fast": Counter()}
    fallback, fast = AbstractAttention.forward, attention.sdpa_attention

    def counted_fallback(self, *args, **kwargs):
        counts["fallback"][self.layer_id] += 1
        return fallback(self, *args, **kwargs)

    def counted_fast(attn, *args, **kwargs):
        counts["fast"][attn.layer_id] += 1
        return fast(attn, *args, **kwargs)

    monkeypatch.setattr(AbstractAttention, "forward", counted_fallback)
    monkeypatch.setattr(attention, "sdpa_attention", counted_fast)

    def taken(clear=True):
        result = {name: set(counter) for name, counter in counts.items()}
        if clear:
            for counter in counts.values():
                counter.clear()
        return result

    return taken


def padded(tokenizer, side):
    tokenizer.padding_side = side
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    tokens, mask = enc["input_ids"], enc["attention_mask"]
    padded_at = 0 if side == "left" else -1
    # Rows with padding; with left padding, query positions with no key to attend to.
    assert (mask[:, padded_at] == 0).sum() >= 3
    return tokens, mask


def fallback_too(rm, fn):
    """``fn()`` with the fast path, then with TransformerLens's attention everywhere."""
    fast = fn()
    rm.use_fast_attention = False
    try:
        slow = fn()
    finally:
        rm.use_fast_attention = True
    return fast, slow


def hf_rewards_one_by_one(hf_model, tokenizer):
    with torch.no_grad():
        return torch.stack([hf_model(torch.tensor([tokenizer(t)["input_ids"]])).logits[0, 0] for t in TEXTS])


# ---- the pure functions -------------------------------------------------------------------------


def test_sdpa_mask_is_transformer_lens_causal_and_padding_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    got = sdpa_mask(mask, dtype=torch.float32, device=torch.device("cpu"))
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    allowed = causal & mask.bool()[:, None, None, :]
    empty = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)[:, None, :, None]
    assert torch.equal(got.empty_rows, empty)  # left padding: queries 0 and 1 of row 0 have no key
    # Empty rows attend to themselves only (finite, zeroed later); every other row as TL masks it.
    expected = allowed | (empty & torch.eye(4, dtype=torch.bool))
    assert torch.equal(got.additive == 0, expected)
    assert torch.isinf(got.additive[~expected]).all() and (got.additive[~expected] < 0).all()
    # No padding (or no mask) is the plain causal mask.
    cpu = torch.device("cpu")
    assert sdpa_mask(torch.ones(2, 5, dtype=torch.long), dtype=torch.float32, device=cpu).additive is None
    assert sdpa_mask(None, dtype=torch.float32, device=cpu).additive is None


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_sdpa_z_is_masked_softmax_attention_with_repeated_kv_heads(n_kv_heads):
    """The reference is TransformerLens's maths: scores / scale, where(mask), softmax, NaN -> 0,
    pattern @ v, K/V heads repeat_interleave'd."""
    generator = torch.Generator().manual_seed(0)
    batch, n_pos, n_heads, d_head, scale = 3, 6, 4, 8, 0.3
    q = torch.randn(batch, n_pos, n_heads, d_head, generator=generator)
    k, v = (torch.randn(batch, n_pos, n_kv_heads, d_head, generator=generator) for _ in range(2))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    repeat = n_heads // n_kv_heads
    k_, v_ = (x.repeat_interleave(repeat, dim=2).transpose(1, 2) for x in (k, v))
    scores = q.transpose(1, 2) @ k_.transpose(-1, -2) * scale
    allowed = torch.ones(n_pos, n_pos, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    pattern = torch.softmax(torch.where(allowed, scores, -torch.inf), dim=-1)
    pattern = torch.where(pattern.isnan(), 0.0, pattern)
    expected = (pattern @ v_).transpose(1, 2)

    got = sdpa_z(q, k, v, sdpa_mask(mask, dtype=q.dtype, device=q.device), scale=scale)
    torch.testing.assert_close(got, expected)
    assert (got[0, :3] == 0).all() and (got[0, 3:] != 0).any()


# ---- the same rewards, per-position outputs and gradients ---------------------------------------


@pytest.mark.parametrize("arch, overrides, fast_layers", CASES, ids=IDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_fast_path_equals_fallback_and_hugging_face(arch, overrides, fast_layers, side, tokenizer, paths):
    hf_model = tiny_hf_reward_model(arch, **overrides)
    rm = RewardModel.from_hf(hf_model, tokenizer)
    assert rm.use_fast_attention
    tokens, mask = padded(tokenizer, side)
    expected = hf_rewards_one_by_one(hf_model, tokenizer)
    assert expected.abs().max() > 0.5

    with torch.no_grad():
        per_position = rm(tokens, attention_mask=mask)[..., 0]
        assert paths() == {"fast": fast_layers, "fallback": {0, 1} - fast_layers}
        rewards = rm.reward(tokens, mask)
        paths()
        rm.use_fast_attention = False
        fallback_per_position = rm(tokens, attention_mask=mask)[..., 0]
        fallback_rewards = rm.reward(tokens, mask)
        assert paths() == {"fast": set(), "fallback": {0, 1}}

    # Every position, padding included (left padding: query rows with no key to attend to).
    assert (per_position - fallback_per_position).abs().max() <= TOL
    assert (rewards - fallback_rewards).abs().max() <= TOL
    assert (rewards - expected).abs().max() <= TOL


@pytest.mark.parametrize("arch", list(TINY_CONFIGS) + ["Gemma2-no-softcap"])
def test_gradients_equal_the_fallbacks(arch, tokenizer, paths):
    """Attribution's use: a forward hook keeps a residual activation, the summed reward is
    back-propagated; the activation's gradient and every attention weight's gradient agree."""
    hf_model = (tiny_hf_reward_model(GEMMA2, attn_logit_softcapping=None) if arch == "Gemma2-no-softcap"
                else tiny_hf_reward_model(arch))
    rm = RewardModel.from_hf(hf_model, tokenizer)
    tokens, mask = padded(tokenizer, "left")

    def gradients():
        kept = {}

        def keep(resid, hook):
            resid.retain_grad()
            kept["resid"] = resid

        rm.zero_grad(set_to_none=True)
        with rm.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", keep)]):
            rm.reward(tokens, mask).sum().backward()
        attn_grads = {name: p.grad.clone() for name, p in rm.named_parameters() if ".attn." in name}
        return kept["resid"].grad, attn_grads

    (resid_grad, attn_grads), (fallback_resid_grad, fallback_attn_grads) = fallback_too(rm, gradients)
    assert paths()["fast"] == ({1} if arch == "Gemma2-no-softcap" else set() if arch == GEMMA2 else {0, 1})

    assert torch.isfinite(resid_grad).all()
    assert (resid_grad - fallback_resid_grad).abs().max() <= 1e-5 * fallback_resid_grad.abs().max()
    scale = max(g.abs().max() for g in fallback_attn_grads.values())
    for name, grad in attn_grads.items():
        fallback = fallback_attn_grads[name]
        if fallback.abs().max() <= 1e-6 * scale:
            # Zero in exact arithmetic, rounding noise on both paths: without rotary, the key bias
            # adds a constant to each row of scores, which softmax ignores.
            assert grad.abs().max() <= 1e-6 * scale, name
        else:
            assert (grad - fallback).abs().max() <= 1e-5 * fallback.abs().max(), name


def test_backward_hook_on_the_residual_keeps_the_fast_path(tokenizer, paths):
    rm = RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)
    tokens, mask = padded(tokenizer, "left")

    def gradient():
        seen = []
        with rm.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", lambda grad, hook: seen.append(grad.clone()))]):
            rm.reward(tokens, mask).sum().backward()
        return seen[0]

    grad, fallback_grad = fallback_too(rm, gradient)
    assert paths()["fast"] == {0, 1}
    assert (grad - fallback_grad).abs().max() <= 1e-5 * fallback_grad.abs().max()


# ---- hooks inside attention take the fallback ----------------------------------------------------


ATTENTION_HOOKS = ["hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores",
                   "hook_pattern", "hook_z", "hook_result"]


@pytest.fixture
def rm(tokenizer):
    return RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)


@pytest.mark.parametrize("hook", ATTENTION_HOOKS)
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_any_hook_inside_attention_takes_the_fallback_for_that_layer(rm, hook, direction, tokenizer, paths):
    tokens, mask = padded(tokenizer, "left")
    name = f"blocks.1.attn.{hook}"
    fired = []
    hooks = [(name, lambda x, hook: fired.append(hook.name))]
    with rm.hooks(**{f"{direction}_hooks": hooks}):
        rm.reward(tokens, mask).sum().backward()
    assert paths() == {"fast": {0}, "fallback": {1}}
    # hook_result only runs with use_attn_result; every other hook point fires once.
    assert fired == ([] if hook == "hook_result" else [name])
    rm.reward(tokens, mask)  # the context removed the hook: fast again
    assert paths() == {"fast": {0, 1}, "fallback": set()}


def test_run_with_cache_of_the_pattern_takes_the_fallback(rm, tokenizer, paths):
    tokens, mask = padded(tokenizer, "left")
    with torch.no_grad():
        logits, cache = rm.run_with_cache(tokens, attention_mask=mask,
                                          names_filter="blocks.0.attn.hook_pattern")
    assert paths() == {"fast": {1}, "fallback": {0}}
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert pattern.shape == (len(TEXTS), rm.cfg.n_heads, tokens.shape[1], tokens.shape[1])
    # Rows sum to 1, except the query positions of a left-padded row that precede its first token.
    first = mask.argmax(dim=-1)
    has_key = torch.arange(tokens.shape[1])[None, :] >= first[:, None]
    torch.testing.assert_close(pattern.sum(-1), has_key[:, None, :].expand_as(pattern[..., 0]).float())
    with torch.no_grad():
        _, fallback_logits = fallback_too(rm, lambda: rm(tokens, attention_mask=mask))
    assert (logits - fallback_logits).abs().max() <= TOL


def test_run_with_hooks_on_hook_z_changes_the_output_as_in_the_fallback(rm, tokenizer, paths):
    tokens, mask = padded(tokenizer, "right")

    def zero_head_0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0
        return z

    def run():
        return rm.run_with_hooks(tokens, attention_mask=mask,
                                 fwd_hooks=[("blocks.0.attn.hook_z", zero_head_0)])

    with torch.no_grad():
        hooked = run()
        assert paths() == {"fast": {1}, "fallback": {0}}
        rm.use_fast_attention = False
        fallback_hooked = run()
        rm.use_fast_attention = True
        clean = rm(tokens, attention_mask=mask)
    assert (hooked - clean).abs().max() > 1e-2  # the hook's output is used
    assert (hooked - fallback_hooked).abs().max() <= TOL


def test_a_global_module_hook_takes_the_fallback(rm, tokenizer, paths):
    tokens, mask = padded(tokenizer, "right")
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        rm.reward(tokens, mask)
    finally:
        handle.remove()
    assert paths() == {"fast": set(), "fallback": {0, 1}}


def test_an_sae_spliced_in_at_hook_z_takes_the_fallback(rm, tokenizer, paths):
    tokens, mask = padded(tokenizer, "right")
    with torch.no_grad():
        clean = rm.reward(tokens, mask)
    hook = "blocks.1.attn.hook_z"
    torch.manual_seed(0)
    config = StandardSAEConfig(d_in=rm.cfg.n_heads * rm.cfg.d_head, d_sae=32, reshape_activations="hook_z",
                               metadata=SAEMetadata(hook_name=hook))
    sae = StandardSAE(config)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.5)
        sae.W_dec.normal_(0, 0.5)
    rm.add_sae(sae, use_error_term=False)
    paths()
    with torch.no_grad():
        spliced, fallback_spliced = fallback_too(rm, lambda: rm.reward(tokens, mask))
    assert paths()["fast"] == {0}
    assert (spliced - clean).abs().max() > 1e-2  # the SAE's reconstruction replaced z
    assert (spliced - fallback_spliced).abs().max() <= TOL


# ---- configurations the fast path does not handle ------------------------------------------------


def test_a_kv_cache_keeps_the_fast_path_and_equals_the_whole_run(rm, tokenizer, paths):
    """Cached keys and values come first and queries sit after them, as in TransformerLens:
    continuing from a cache equals running the whole text (and equals the fallback's continuation)."""
    tokens = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        full = rm(tokens)
        paths()
        cache = TransformerLensKeyValueCache.init_cache(rm.cfg, rm.cfg.device, batch_size=1)
        rm(tokens[:, :-3], past_kv_cache=cache)
        continued = rm(tokens[:, -3:], past_kv_cache=cache)
        assert paths() == {"fast": {0, 1}, "fallback": set()}
        rm.use_fast_attention = False
        try:
            cache = TransformerLensKeyValueCache.init_cache(rm.cfg, rm.cfg.device, batch_size=1)
            rm(tokens[:, :-3], past_kv_cache=cache)
            slow = rm(tokens[:, -3:], past_kv_cache=cache)
        finally:
            rm.use_fast_attention = True
    assert (continued - full[:, -3:]).abs().max() <= TOL
    assert (continued - slow).abs().max() <= TOL


def test_a_frozen_prefix_restart_takes_the_fast_path_and_is_exact(rm, tokenizer, paths):
    """The suffix restarts of batched ablation (a frozen cache of clean keys and values, a
    right-padded batch) run through SDPA and equal the whole run with the same change."""
    tokens, mask = padded(tokenizer, "right")
    hook = rm.layer_input(1)
    with torch.no_grad():
        clean = rm.run_with_deltas(tokens, mask, read=[hook])
        start = int(mask.sum(1).min()) - 1  # every row's pooled position is at or after it
        delta = torch.zeros_like(clean.acts[hook])
        delta[:, start:] = 0.3
        whole = rm.run_with_deltas(tokens, mask, deltas={hook: delta}).rewards
        prefix = rm.prefix_kv(tokens, mask, first_layer=1)
        paths()
        suffix = rm.run_from(clean.acts[hook] + delta, mask, layer=1, prefix=prefix, start=start)
    assert paths()["fast"] == {1}
    assert (suffix - whole).abs().max() <= TOL


@pytest.mark.parametrize("flag, fast_layers", [("use_attn_result", set()), ("use_split_qkv_input", set()),
                                               ("use_hook_mlp_in", {0, 1})])
def test_flags_that_change_the_attention_path_take_the_fallback(rm, tokenizer, paths, flag, fast_layers):
    """use_attn_result and use_split_qkv_input change what attention computes and hooks;
    use_hook_mlp_in adds a hook point outside attention and keeps the fast path."""
    tokens, mask = padded(tokenizer, "left")
    with torch.no_grad():
        before = rm(tokens, attention_mask=mask)
        getattr(rm, f"set_{flag}")(True)
        paths()
        after, fallback = fallback_too(rm, lambda: rm(tokens, attention_mask=mask))
    assert paths()["fast"] == fast_layers
    assert (after - before).abs().max() <= TOL and (after - fallback).abs().max() <= TOL


def test_blocker_names_the_reason(tokenizer):
    rm = RewardModel.from_hf(tiny_hf_reward_model(GEMMA2), tokenizer)
    query = torch.zeros(1, 3, rm.cfg.d_model)
    assert attention.fast_path_blocker(rm.blocks[0].attn, query) == "a local (sliding-window) attention layer"
    assert attention.fast_path_blocker(rm.blocks[1].attn, query) == "attention-score soft-cap 50.0"
    llama = RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)
    attn = llama.blocks[0].attn
    assert attention.fast_path_blocker(attn, query) is None
    attn.hook_pattern.add_hook(lambda x, hook: None)
    assert attention.fast_path_blocker(attn, query) == "a hook on hook_pattern"


# ---- the switch, the mask cache, copies ----------------------------------------------------------


def test_switch_swaps_transformer_lens_classes_back(tokenizer):
    llama = RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)
    gpt2 = RewardModel.from_hf(tiny_hf_reward_model("GPT2ForSequenceClassification"), tokenizer)
    assert {type(b.attn) for b in llama.blocks} == {SdpaGroupedQueryAttention}
    assert {type(b.attn) for b in gpt2.blocks} == {SdpaAttention}
    state = {name: t.clone() for name, t in llama.state_dict().items()}
    llama.use_fast_attention = gpt2.use_fast_attention = False
    assert {type(b.attn) for b in llama.blocks} == {GroupedQueryAttention}
    assert {type(b.attn) for b in gpt2.blocks} == {Attention}
    assert not llama.use_fast_attention
    assert all(torch.equal(state[name], t) for name, t in llama.state_dict().items())
    # pytest type-checks pm_lens at run time (jaxtyping); a user without it gets pm_lens's own message.
    with pytest.raises(TypeError, match="use_fast_attention"):
        llama.use_fast_attention = "no"


def test_a_mask_edited_in_place_is_not_served_from_the_cache(rm, tokenizer):
    tokens, mask = padded(tokenizer, "right")
    mask = mask.clone()
    with torch.no_grad():
        rm(tokens, attention_mask=mask)
        mask[:, :2] = 0  # the same tensor, now left-padded too
        edited, fallback = fallback_too(rm, lambda: rm(tokens, attention_mask=mask))
    assert (edited - fallback).abs().max() <= TOL


def test_a_deep_copy_keeps_the_fast_path_and_runs_its_own_weights(rm, tokenizer, paths):
    tokens, mask = padded(tokenizer, "left")
    with torch.no_grad():
        original = rm.reward(tokens, mask)
        copied = copy.deepcopy(rm)
        assert copied.use_fast_attention
        assert {type(b.attn) for b in copied.blocks} == {SdpaGroupedQueryAttention}
        paths()
        assert torch.equal(copied.reward(tokens, mask), original)
        assert paths()["fast"] == {0, 1}
        copied.blocks[0].attn.W_Q.mul_(-2.0)
        assert (copied.reward(tokens, mask) - original).abs().max() > 1e-2
        assert torch.equal(rm.reward(tokens, mask), original)
        copied.use_fast_attention = False
        assert rm.use_fast_attention  # the switch is per model
