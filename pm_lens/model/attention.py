"""Attention through one fused ``scaled_dot_product_attention`` call, wherever that is exact.

TransformerLens computes attention op by op (``AbstractAttention.forward``): scores
``q @ k.T / attn_scale``, a ``torch.where`` with the causal and padding mask, softmax, a NaN guard
(``where(isnan(pattern), 0, pattern)``) and ``pattern @ v``, each materialising a
``[batch, head, query_pos, key_pos]`` tensor, after a ``repeat_interleave`` of K and V for
grouped-query attention. On a SmolLM2-sized reward model on CPU that is ~100 ms per forward more
than Hugging Face, which runs the same maths as one fused
:func:`torch.nn.functional.scaled_dot_product_attention` (SDPA) call
(``benchmarks/forward_overhead.py``). The hook points ``hook_attn_scores`` and ``hook_pattern`` need
those tensors; when nothing reads or changes them, they are not worth their cost.

The method. :class:`SdpaAttention` and :class:`SdpaGroupedQueryAttention` are TransformerLens's own
``Attention`` and ``GroupedQueryAttention`` (same parameters, buffers, hook points and state dict)
with a forward that, on each call:

1. asks :func:`fast_path_blocker` whether anything needs TransformerLens's own computation; if so,
   it runs TransformerLens's forward unchanged (the *fallback*);
2. computes q, k and v with TransformerLens's ``calculate_qkv_matrices`` and rotates q and k with
   its ``apply_rotary`` (NTK-by-parts scaling, partial rotary, GPT-J adjacent pairs and the
   position ids of left-padded rows all exactly as TransformerLens does them);
3. replaces scores, mask, softmax, NaN guard and ``pattern @ v`` with one SDPA call
   (:func:`sdpa_z`): TransformerLens's scale (``1 / attn_scale``), the mask TransformerLens builds
   (:func:`sdpa_mask`: causal and, from ``attention_mask``, padding), K and V heads shared as
   ``repeat_interleave`` shares them (``enable_gqa``), and rows that TransformerLens leaves with no
   key at all (query positions before the first attended token of a left-padded sequence: softmax
   gives NaN, the guard makes the row 0) set to zero;
4. projects z with ``W_O`` and ``b_O`` as TransformerLens does (``F.linear``).

The fallback is taken, layer by layer and call by call, whenever any of these holds:

- a hook of any kind (forward, forward-pre, backward, backward-pre) on any hook point inside the
  attention module (``hook_q/k/v``, ``hook_rot_q/k``, ``hook_attn_scores``, ``hook_pattern``,
  ``hook_z``, ``hook_result``, the q/k norms' hook points), however it was added
  (``run_with_cache``, ``run_with_hooks``, ``rm.hooks(...)``, ``add_hook``, ``incl_bwd=True``), or a
  global module hook (``torch.nn.modules.module.register_module_forward_hook`` and friends);
- something other than a plain ``HookPoint`` in a hook point's place (an SAE spliced in at
  ``hook_z``);
- an additive attention mask or a position bias passed to the layer, or a KV cache entry that is
  not TransformerLens's (a cache entry is handled: its keys and values come first, queries sit
  after them, and the mask is offset accordingly, as ``apply_causal_mask`` does);
- a local (sliding-window) layer, an attention-score soft-cap (``attn_scores_soft_cap > 0``,
  Gemma-2), ``use_attn_result``, ``use_split_qkv_input``, ``use_attn_in``, a positional
  embedding other than ``standard`` (added outside attention) or ``rotary`` (shortformer, ALiBi,
  relative bias), non-causal attention, log-n query scaling, Q/K/V clipping, attention sinks,
  4-bit weights, OLMo-style Q/K norms;
- inputs, weights and mask on different devices, or a mask whose length is not the input's.

``use_hook_mlp_in`` changes nothing inside attention, so it does not block the fast path.

What differs from the fallback is float rounding: SDPA sums in another order (~1e-7 relative in
float32) and, in bfloat16/float16, keeps its softmax in float32 where TransformerLens rounds the
scores and the pattern to the parameter dtype. With non-finite activations (NaN or infinite
queries or keys) the fallback's NaN guard zeroes the affected attention rows and the fast path
passes the NaN on (``RewardModel.reward`` then raises on a non-finite reward).

``RewardModel.from_hf`` turns the fast path on; ``rm.use_fast_attention = False`` (or
:func:`set_fast_attention`) puts TransformerLens's own classes back. ``copy.deepcopy`` and
``torch.save`` keep the class of each layer, so a copy runs its own weights the same way.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.components import Attention, GroupedQueryAttention
from transformer_lens.components.abstract_attention import AbstractAttention
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.activation_functions import softcap_enabled

# Hook dictionaries every nn.Module has; any entry means someone wants to see or change a value.
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = tuple(f"_global{name}" for name in _HOOK_DICTS)
# Children of an attention module that are modules but not hook points, and run in
# calculate_qkv_matrices in both paths.
_QK_NORMS = ("q_norm", "k_norm")
_OLMO_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


# ----------------------------------------------------------------------------- the maths


@dataclass(frozen=True)
class SdpaMask:
    """The mask TransformerLens applies to one batch's scores, in the form SDPA takes.

    Attributes:
        additive: ``0`` where a query may attend to a key, ``-inf`` where not, or ``None`` for the
            plain causal mask (SDPA's ``is_causal``).
        empty_rows: ``True`` at query positions that TransformerLens leaves with no key to attend
            to (their pattern row is 0); ``None`` if there are none. ``additive`` lets such a row
            attend to its own position so that SDPA stays finite; :func:`sdpa_z` then zeroes it.
    """

    additive: Float[Tensor, "batch 1 query_pos key_pos"] | None
    empty_rows: Bool[Tensor, "batch 1 query_pos 1"] | None


CAUSAL = SdpaMask(additive=None, empty_rows=None)


def sdpa_mask(
    attention_mask: Int[Tensor, "batch pos"] | None, *, dtype: torch.dtype, device: torch.device, offset: int = 0
) -> SdpaMask:
    """The causal mask combined with the padding mask, as ``AbstractAttention.apply_causal_mask``
    builds it: query ``i`` (at position ``offset + i``, after ``offset`` cached positions) attends
    to key ``j`` iff ``j <= offset + i`` and ``attention_mask[:, j]`` is set. Without a cache, an
    all-ones (or absent) mask is the plain causal mask."""
    if attention_mask is None and offset == 0:
        return CAUSAL
    if attention_mask is None:
        raise ValueError("a cached prefix needs the attention mask of the whole sequence")
    keep = attention_mask.to(device).bool()
    if offset == 0 and bool(keep.all()):
        return CAUSAL
    n_keys = keep.shape[-1]
    queries = torch.arange(offset, n_keys, device=device)
    causal = torch.arange(n_keys, device=device)[None, :] <= queries[:, None]  # [query_pos, key_pos]
    allowed = causal & keep[:, None, None, :]  # [batch, 1, query_pos, key_pos]
    empty_rows = ~allowed.any(dim=-1, keepdim=True)
    if bool(empty_rows.any()):
        own = torch.arange(n_keys, device=device)[None, :] == queries[:, None]
        allowed = allowed | (empty_rows & own)
    else:
        empty_rows = None
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return SdpaMask(additive=additive, empty_rows=empty_rows)


def sdpa_z(
    q: Float[Tensor, "batch pos head_index d_head"],
    k: Float[Tensor, "batch key_pos kv_head_index d_head"],
    v: Float[Tensor, "batch key_pos kv_head_index d_head"],
    mask: SdpaMask,
    *,
    scale: float,
) -> Float[Tensor, "batch pos head_index d_head"]:
    """``softmax(q k^T * scale + mask) v`` per head, in TransformerLens's ``hook_z`` layout
    (``key_pos`` > ``pos`` when cached keys come first).

    Query head ``h`` reads key/value head ``h // (head_index / kv_head_index)``, as
    ``torch.repeat_interleave`` in ``GroupedQueryAttention`` assigns them; rows of
    ``mask.empty_rows`` are 0, as TransformerLens's NaN guard makes them.
    """
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask.additive, is_causal=mask.additive is None, scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
    )  # [batch, head_index, pos, d_head]
    if mask.empty_rows is not None:
        z = z.masked_fill(mask.empty_rows, 0.0)
    return z.transpose(1, 2)


# Every layer of one forward receives the same attention_mask tensor: its SDPA form is built once
# (one host-device sync, not one per layer). One entry, keyed by the tensor (through a weak
# reference, so the entry goes when the mask does), its version counter (an in-place edit
# invalidates it), the dtype and the device.
_last_mask: tuple[weakref.ref, tuple[Any, ...], SdpaMask] | None = None


def _forget(ref: weakref.ref) -> None:
    global _last_mask
    entry = _last_mask
    if entry is not None and entry[0] is ref:
        _last_mask = None


def _mask_for(attention_mask: Tensor | None, *, dtype: torch.dtype, device: torch.device, offset: int = 0) -> SdpaMask:
    global _last_mask
    if attention_mask is None and offset == 0:
        return CAUSAL
    try:
        key = (attention_mask._version, dtype, device, offset)
    except RuntimeError:  # inference-mode tensors have no version counter: do not cache
        return sdpa_mask(attention_mask, dtype=dtype, device=device, offset=offset)
    entry = _last_mask
    if entry is not None and entry[0]() is attention_mask and entry[1] == key:
        return entry[2]
    mask = sdpa_mask(attention_mask, dtype=dtype, device=device, offset=offset)
    _last_mask = (weakref.ref(attention_mask, _forget), key, mask)
    return mask


# ----------------------------------------------------------------------------- when it is exact


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(getattr(module, name) for name in _HOOK_DICTS)


def _config_blocker(attn: AbstractAttention) -> str | None:
    cfg = attn.cfg
    if attn.attn_type != "global":
        return f"a {attn.attn_type} (sliding-window) attention layer"
    if softcap_enabled(cfg.attn_scores_soft_cap):
        return f"attention-score soft-cap {cfg.attn_scores_soft_cap}"
    if cfg.use_attn_result:
        return "use_attn_result"
    if cfg.use_split_qkv_input or cfg.use_attn_in:
        return "use_split_qkv_input/use_attn_in"
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return f"positional embedding {cfg.positional_embedding_type!r}"
    if (attn._attention_dir_override or cfg.attention_dir) != "causal":
        return "non-causal attention"
    if getattr(cfg, "use_logn_attn", False) and not attn.training:
        return "log-n query scaling"
    if getattr(cfg, "clip_qkv", None) is not None:
        return "Q/K/V clipping"
    if getattr(cfg, "use_attention_sinks", False):
        return "attention sinks"
    if cfg.load_in_4bit:
        return "4-bit weights"
    if cfg.original_architecture in _OLMO_QK_NORM_ARCHITECTURES:
        return "OLMo-style Q/K norms"
    return None


def _hook_blocker(attn: AbstractAttention) -> str | None:
    global_hooks = torch.nn.modules.module
    if any(getattr(global_hooks, name, None) for name in _GLOBAL_HOOK_DICTS):
        return "a global module hook"
    for name, child in attn._modules.items():
        if child is None:
            continue
        if type(child) is HookPoint:
            if _has_hooks(child):
                return f"a hook on {name}"
        elif name in _QK_NORMS:
            if any(_has_hooks(m) for m in child.modules()):
                return f"a hook in {name}"
        else:
            return f"a {type(child).__name__} in place of {name}"
    return None


def fast_path_blocker(
    attn: AbstractAttention,
    query_input: Tensor,
    *,
    past_kv_cache_entry: object = None,
    additive_attention_mask: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_bias: Tensor | None = None,
) -> str | None:
    """Why this call of ``attn`` must run TransformerLens's own forward, or ``None`` if SDPA
    computes the same thing (see the module docstring for the list)."""
    offset = 0
    if past_kv_cache_entry is not None:
        past_keys = getattr(past_kv_cache_entry, "past_keys", None)
        if not isinstance(past_keys, Tensor) or past_keys.device != query_input.device:
            return "a KV cache of another kind or device"
        offset = past_keys.shape[1]
        if offset and attention_mask is None:
            return "a KV cache without the attention mask of the whole sequence"
    if additive_attention_mask is not None or position_bias is not None:
        return "an additive attention mask or position bias"
    reason = _config_blocker(attn) or _hook_blocker(attn)
    if reason is not None:
        return reason
    if query_input.ndim != 3 or query_input.device != attn.W_O.device:
        return "inputs of another shape or device"
    if attention_mask is not None and (
        attention_mask.device != query_input.device or attention_mask.shape[-1] != offset + query_input.shape[1]
    ):
        return "an attention mask of another device or length"
    return None


# ----------------------------------------------------------------------------- the modules


def sdpa_attention(
    attn: AbstractAttention,
    query_input: Float[Tensor, "batch pos d_model"],
    key_input: Float[Tensor, "batch pos d_model"],
    value_input: Float[Tensor, "batch pos d_model"],
    attention_mask: Int[Tensor, "batch key_pos"] | None,
    past_kv_cache_entry: Any = None,
) -> Float[Tensor, "batch pos d_model"]:
    """``attn``'s output computed through SDPA. Call only when :func:`fast_path_blocker` says so:
    the hook points that only the fallback computes (scores, pattern, z) are skipped. With a KV
    cache entry, its keys and values come first, as in TransformerLens (appended unless frozen)."""
    q, k, v = attn.calculate_qkv_matrices(query_input, key_input, value_input)
    offset = 0
    if past_kv_cache_entry is not None:
        offset = past_kv_cache_entry.past_keys.size(1)
        k, v = past_kv_cache_entry.append(k, v)
    if attn.cfg.positional_embedding_type == "rotary":
        # hook_rot_q/k are unhooked here (fast_path_blocker checked), so calling them is a no-op.
        q = attn.apply_rotary(q, offset, attention_mask)
        k = attn.apply_rotary(k, 0, attention_mask)
    mask = _mask_for(attention_mask, dtype=q.dtype, device=q.device, offset=offset)
    z = sdpa_z(q, k, v, mask, scale=1.0 / attn.attn_scale)
    # The output projection exactly as AbstractAttention.forward does it (use_attn_result off).
    # With the layout RewardModel stores W_O in, the .contiguous() copies nothing.
    w = attn.W_O.reshape(attn.cfg.n_heads * attn.cfg.d_head, attn.cfg.d_model).T.contiguous()
    if z.dtype != w.dtype:
        z = z.to(w.dtype)
    z = z.reshape(z.shape[0], z.shape[1], attn.cfg.n_heads * attn.cfg.d_head)
    if z.device.type == "mps":  # TransformerLens's workaround for pytorch#161640
        return torch.matmul(z, w.T) + attn.b_O
    return F.linear(z, w, attn.b_O)


class _SdpaPath(AbstractAttention):
    """The forward shared by both fast classes: SDPA when exact, TransformerLens's forward if not.

    A subclass of ``AbstractAttention`` (not a bare mixin) so that the fast classes have the same
    instance layout as TransformerLens's and a module's ``__class__`` can be swapped either way.
    """

    def forward(
        self,
        query_input: Tensor,
        key_input: Tensor,
        value_input: Tensor,
        past_kv_cache_entry: Any = None,
        additive_attention_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_bias: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        blocker = fast_path_blocker(
            self, query_input, past_kv_cache_entry=past_kv_cache_entry,  # type: ignore[arg-type]
            additive_attention_mask=additive_attention_mask, attention_mask=attention_mask,
            position_bias=position_bias,
        )
        if blocker is not None:
            return super().forward(  # type: ignore[misc]
                query_input, key_input, value_input, past_kv_cache_entry, additive_attention_mask,
                attention_mask, position_bias,
            )
        return sdpa_attention(self, query_input, key_input, value_input, attention_mask,  # type: ignore[arg-type]
                              past_kv_cache_entry)


class SdpaAttention(_SdpaPath, Attention):
    """TransformerLens's ``Attention`` with the SDPA fast path (see the module docstring)."""


class SdpaGroupedQueryAttention(_SdpaPath, GroupedQueryAttention):
    """TransformerLens's ``GroupedQueryAttention`` with the SDPA fast path (see the module docstring)."""


_FAST = {Attention: SdpaAttention, GroupedQueryAttention: SdpaGroupedQueryAttention}
_SLOW = {fast: slow for slow, fast in _FAST.items()}


def set_fast_attention(model: torch.nn.Module, enabled: bool) -> None:
    """Give every attention layer of ``model`` (a ``HookedTransformer``) the fast path, or take it away.

    Only the class of each module changes (``Attention`` <-> ``SdpaAttention``,
    ``GroupedQueryAttention`` <-> ``SdpaGroupedQueryAttention``); weights, hooks and attached SAEs
    stay. Attention classes other than these two are left as they are.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"use_fast_attention must be True or False, got {enabled!r}")
    table = _FAST if enabled else _SLOW
    for block in model.blocks:
        new_class = table.get(type(block.attn))
        if new_class is not None:
            block.attn.__class__ = new_class


def fast_attention_enabled(model: torch.nn.Module) -> bool:
    """Whether every attention layer of ``model`` has the fast path (each call may still fall back)."""
    return all(type(block.attn) in _SLOW for block in model.blocks)
