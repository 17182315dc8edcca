"""What the reward model does for the other stages: runs with deltas at hooks, restarts at a layer,
pooled rewards, the token embedding, and a count of its forward passes.

Attribution, ablation, contexts and the exploit search all need the same few things from the
model: add a change to the activation at some hooks and read the reward (and the gradient of the
reward with respect to those activations); restart a forward at a layer from a cached residual;
know which block a hook belongs to and where to stop; swap token embeddings for one-hot vectors.
They are methods of :class:`pm_lens.model.RewardModel` (through :class:`ModelRuns`), so no other
stage spells a TransformerLens hook name or argument by hand.

Every forward pass is counted by purpose (``"clean"``, ``"ablation"``, ``"ig"``, ...; set with
:meth:`ModelRuns.counting`), in passes, sequences and tokens: a run reports what it cost, and tests
check that the clean forward of each text runs once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

Delta = Tensor | Callable[[Tensor], Tensor]


def final_positions(
    tokens: Int[Tensor, "batch pos"] | None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    pad_token_id: int | None = None,
) -> Int[Tensor, " batch"]:
    """The position whose output is the reward: the last attended (or non-pad) token.

    With an ``attention_mask`` the last position where it is 1; otherwise, as Hugging Face
    does, the last position whose token is not ``pad_token_id``; with neither, the last
    position. Works for left and right padding.
    """
    if attention_mask is None and tokens is None:
        raise ValueError("final_positions needs tokens or an attention mask")
    shape_of = attention_mask if attention_mask is not None else tokens
    batch, n_pos = shape_of.shape
    if attention_mask is None and pad_token_id is None:
        return torch.full((batch,), n_pos - 1, dtype=torch.long, device=shape_of.device)
    keep = attention_mask.bool() if attention_mask is not None else tokens != pad_token_id
    empty = (~keep.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sequences {empty} of the batch have no tokens (all padding)")
    index = torch.arange(n_pos, device=shape_of.device)
    return (index * keep).argmax(dim=-1)


@dataclass(frozen=True)
class PrefixKV:
    """Clean keys and values of blocks ``first_layer`` onwards for a batch, so a forward changed
    only from some position on can restart on that suffix (:meth:`ModelRuns.run_from`).

    Attributes:
        first_layer: the first block held.
        keys, values: per block, ``[batch, pos, n_kv_heads, d_head]`` as TransformerLens caches
            them (keys before rotary).
    """

    first_layer: int
    keys: dict[int, Tensor]
    values: dict[int, Tensor]

    @classmethod
    def from_cache(cls, cache: Any, first_layer: int) -> PrefixKV:
        """The blocks ``first_layer`` on of a filled TransformerLens KV cache (detached)."""
        layers = range(first_layer, len(cache.entries))
        return cls(first_layer, {b: cache.entries[b].past_keys.detach() for b in layers},
                   {b: cache.entries[b].past_values.detach() for b in layers})

    def rows(self, index: Tensor) -> PrefixKV:
        """The rows ``index`` (repeats allowed)."""
        return PrefixKV(self.first_layer, {b: k[index.to(k.device)] for b, k in self.keys.items()},
                        {b: v[index.to(v.device)] for b, v in self.values.items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys.values(), *self.values.values()])


def right_padded(attention_mask: Tensor) -> bool:
    """Whether every row's attended positions come first (what suffix restarts and split runs need)."""
    return bool((attention_mask.cummin(1).values == attention_mask).all())


def check_finite(rewards: Tensor) -> Tensor:
    """``rewards``, or a ``FloatingPointError`` naming the rows whose reward is NaN or infinite."""
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(f"non-finite reward for sequences {bad} of the batch")
    return rewards


@dataclass(frozen=True)
class SharedPrefix:
    """The part of a split run (:meth:`ModelRuns.run_with_deltas` with ``grad_from``) before
    ``start``, run without deltas there: what another run of the same tokens up to ``start`` (the
    other side of a pair, an IG step whose deltas start later) continues from instead of running it.

    Attributes:
        start: the first position not in it.
        tokens, attention_mask: ``[batch, start]``.
        keys, values: per block (all of them), ``[batch, start, n_kv_heads, d_head]``.
        acts: per hook read (or with a gradient), its activation at positions ``[:start]`` (the hook's layout).
    """

    start: int
    tokens: Tensor
    attention_mask: Tensor
    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    acts: dict[str, Tensor]

    def fits(self, tokens: Tensor, attention_mask: Tensor, start: int, hooks: Sequence[str]) -> bool:
        """Whether a run of ``tokens`` split at ``start`` reading (or with gradients at) ``hooks``
        can continue from it."""
        return (start == self.start and tokens.shape[0] == self.tokens.shape[0] and set(hooks) <= set(self.acts)
                and torch.equal(tokens[:, :start], self.tokens) and torch.equal(attention_mask[:, :start], self.attention_mask))


@dataclass(frozen=True)
class DeltaRun:
    """What :meth:`ModelRuns.run_with_deltas` saw.

    Attributes:
        rewards: ``[batch]`` the pooled rewards.
        acts: per hook read, its activation (after its delta), in the hook's own layout.
        grads: per hook in ``grad_at``, d(sum of rewards)/d(hook output).
        kv: with ``keep_kv_from``, the run's keys and values of the blocks from there on.
        shared: a split run's part before ``grad_from`` (when it had no deltas there), for another
            run to continue from.
    """

    rewards: Float[Tensor, " batch"]
    acts: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    kv: PrefixKV | None = None
    shared: SharedPrefix | None = None


@dataclass
class ForwardCount:
    """Forward passes of a model by purpose: passes, sequences (rows) and tokens (rows x pos)."""

    passes: Counter = field(default_factory=Counter)
    sequences: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=Counter)

    def add(self, purpose: str, rows: int, positions: int) -> None:
        self.passes[purpose] += 1
        self.sequences[purpose] += rows
        self.tokens[purpose] += rows * positions

    def since(self, before: "ForwardCount") -> "ForwardCount":
        """The passes counted after ``before`` (a :meth:`snapshot`)."""
        return ForwardCount(self.passes - before.passes, self.sequences - before.sequences, self.tokens - before.tokens)

    def __add__(self, other: "ForwardCount") -> "ForwardCount":
        """Both counts together (e.g. the ranks of a distributed run)."""
        return ForwardCount(self.passes + other.passes, self.sequences + other.sequences, self.tokens + other.tokens)

    def snapshot(self) -> "ForwardCount":
        return ForwardCount(Counter(self.passes), Counter(self.sequences), Counter(self.tokens))

    def as_dict(self) -> dict[str, dict[str, int]]:
        """``{purpose: {"passes", "sequences", "tokens"}}`` plus a ``"total"`` entry."""
        out = {p: {"passes": self.passes[p], "sequences": self.sequences[p], "tokens": self.tokens[p]}
               for p in sorted(self.passes)}
        out["total"] = {key: sum(getattr(self, key).values()) for key in ("passes", "sequences", "tokens")}
        return out


class ModelRuns:
    """The model's services to the other stages (mixed into ``RewardModel``)."""

    # ---- hooks and layers ---------------------------------------------------------------------

    @staticmethod
    def hook_layer(hook_name: str) -> int | None:
        """The block a hook belongs to (``blocks.L.…`` → L), or None outside the blocks."""
        parts = hook_name.split(".")
        return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None

    @staticmethod
    def layer_input(layer: int) -> str:
        """The hook holding block ``layer``'s input (the residual stream a restart starts from)."""
        return f"blocks.{layer}.hook_resid_pre"

    @staticmethod
    def is_layer_output(hook_name: str) -> bool:
        """Whether the hook is its block's output (so a restart can begin at the next block)."""
        return hook_name.endswith(".hook_resid_post") and hook_name.startswith("blocks.")

    def device_of(self, hook_name: str) -> torch.device:
        """The device of the activation at ``hook_name``: ``cfg.device``, or with the layers split
        over devices (``layer_split``) the device of the hook's block."""
        split = getattr(self, "layer_split", None)
        return torch.device(self.cfg.device) if split is None else split.hook_device(hook_name)

    def stop_layer(self, hook_names: Sequence[str]) -> int | None:
        """One past the last block any hook needs; None (run everything) for hooks after the blocks."""
        layers = []
        for name in hook_names:
            layer = self.hook_layer(name)
            if layer is not None:
                layers.append(layer)
            elif name.startswith("hook_"):  # the embeddings, before block 0
                layers.append(-1)
            else:
                return None
        last = max(layers) + 1
        return None if last >= self.cfg.n_layers else last

    def hook_shapes(self, hook_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
        """The trailing shape of the activation at each hook: ``(d,)``, or ``(n_heads, d_head)``
        for per-head hooks. Learned from one two-token run, once per model and hook."""
        cache = self.__dict__.setdefault("_hook_shapes", {})
        missing = [name for name in hook_names if name not in cache]
        if missing:
            def record(act: Tensor, hook: Any) -> None:
                cache[hook.name] = tuple(act.shape[2:])

            tokens = torch.zeros((1, 2), dtype=torch.long, device=self.cfg.device)
            with torch.no_grad(), self.counting("probe"):
                self.run_with_hooks(tokens, fwd_hooks=[(name, record) for name in missing],
                                    stop_at_layer=self.stop_layer(missing))
        return {name: cache[name] for name in hook_names}

    # ---- counting -------------------------------------------------------------------------------

    @property
    def forward_count(self) -> ForwardCount:
        """Every forward pass of this model so far, by purpose."""
        return self.__dict__.setdefault("_forward_count", ForwardCount())

    @contextmanager
    def counting(self, purpose: str) -> Iterator[None]:
        """Count the forward passes inside the block under ``purpose``."""
        previous = self.__dict__.get("_purpose", "other")
        self.__dict__["_purpose"] = purpose
        try:
            yield
        finally:
            self.__dict__["_purpose"] = previous

    def count_forward(self, input: Tensor) -> None:  # noqa: A002
        rows, positions = (input.shape[0], input.shape[1]) if input.ndim >= 2 else (1, input.shape[0])
        purpose = self.__dict__.get("_purpose", "other")
        if self.__dict__.get("_continuing"):  # the rest of a pass already counted: its tokens only
            self.forward_count.tokens[purpose] += rows * positions
        else:
            self.forward_count.add(purpose, rows, positions)

    @contextmanager
    def _continued(self, already_counted: bool = True) -> Iterator[None]:
        """Forwards inside the block continue a pass already counted: only their tokens are added
        (a split run's second part; with ``already_counted=False`` they count as a pass)."""
        self.__dict__["_continuing"] = already_counted
        try:
            yield
        finally:
            self.__dict__["_continuing"] = False

    # ---- runs -----------------------------------------------------------------------------------

    def pool(
        self,
        per_position: Float[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None,
        tokens: Int[Tensor, "batch pos"] | None = None,
    ) -> Float[Tensor, " batch"]:
        """The reward of each row: ``per_position`` at its pooled position (:func:`final_positions`:
        the last attended one, or without a mask the last non-pad token), on ``cfg.device`` (the
        head may be on another device when the layers are split)."""
        index = final_positions(tokens, attention_mask, self.pad_token_id).to(per_position.device)
        return per_position.gather(1, index[:, None])[:, 0].to(self.cfg.device)

    def run_with_deltas(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"],
        *,
        read: Sequence[str] = (),
        deltas: Mapping[str, Delta] | None = None,
        grad_at: Sequence[str] = (),
        keep_kv_from: int | None = None,
        grad_from: int = 0,
        shared: SharedPrefix | None = None,
    ) -> DeltaRun:
        """Run the model, adding ``deltas[hook]`` to the activation at each hook, and read the
        activations at the hooks in ``read`` and d(sum of rewards)/d(hook output) at those in
        ``grad_at`` (the parameters get no gradient from this). With ``keep_kv_from``, the run's
        keys and values of blocks ``keep_kv_from`` on come back in ``kv`` (a :class:`PrefixKV`
        for suffix restarts, saving a :meth:`prefix_kv` forward later).

        A delta is a tensor, or a function of the activation as it arrives in this run (for
        removals that depend on what earlier hooks changed), flat (``[..., d_in]``) or in the
        hook's layout.

        ``grad_from`` (right-padded batches, tensor deltas, at most every row's pooled position):
        the gradients are wanted at positions ``grad_from`` onwards only. Attention is causal, so
        nothing before that depends on them: positions before it run first without autograd (their
        keys and values cached), then the rest with it, attending to them. The gradients come
        back full length, zero before ``grad_from``; activations, rewards and ``kv`` are those of
        one forward, and the count is one pass (its tokens are both parts'). The backward then
        covers only the tail, which is where the cost of attributing long shared prompts goes.
        Without deltas before ``grad_from``, that first part comes back as ``shared``; given one
        (from a run of the same tokens up to ``grad_from``, e.g. the other side of a pair, and no
        deltas before it here either), this run starts at ``grad_from`` instead of running it again.
        """
        if grad_from > 0 and grad_at:
            return self._split_run(tokens, attention_mask, read, deltas, grad_at, keep_kv_from, grad_from, shared)
        if shared is not None:
            raise ValueError("a shared prefix needs grad_from > 0 and grad_at")
        cache = None if keep_kv_from is None else self._empty_cache(tokens.shape[0])
        with self._delta_hooks(read, deltas, grad_at) as state:
            rewards = self.reward(tokens, attention_mask, past_kv_cache=cache)
            run = state.finish(rewards, read)
        return run if cache is None else DeltaRun(run.rewards, run.acts, run.grads, PrefixKV.from_cache(cache, keep_kv_from))

    def _split_run(self, tokens: Tensor, attention_mask: Tensor, read: Sequence[str], deltas: Mapping[str, Delta] | None,
                   grad_at: Sequence[str], keep_kv_from: int | None, start: int, shared: SharedPrefix | None) -> DeltaRun:
        """:meth:`run_with_deltas` with the positions before ``start`` run without autograd (or
        taken from ``shared``)."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        deltas = dict(deltas or {})
        if any(callable(d) for d in deltas.values()):
            raise ValueError("grad_from needs tensor deltas (a function of the arriving activation sees one part only)")
        last = final_positions(None, attention_mask)
        if not right_padded(attention_mask) or start > int(last.min()):
            raise ValueError(f"grad_from={start} needs a right-padded batch whose every row's pooled position "
                             f"(here from {int(last.min())}) is at or after it")
        wrong = {n: tuple(d.shape) for n, d in deltas.items() if d.shape[:2] != tokens.shape}
        if wrong:
            raise ValueError(f"grad_from needs deltas shaped [batch, pos, ...] like the tokens {tuple(tokens.shape)}, got {wrong}")
        head = {n: d[:, :start] for n, d in deltas.items() if d[:, :start].any()}
        tail = {n: d[:, start:] for n, d in deltas.items()}
        given = shared is not None
        if given:
            if head or not shared.fits(tokens, attention_mask, start, [*read, *grad_at]):
                raise ValueError(f"the shared prefix does not fit this run (it needs the same tokens and mask before "
                                 f"grad_from={start}, no deltas there, and holds the hooks {sorted(shared.acts)})")
            entries = [TransformerLensKeyValueCacheEntry(k, v) for k, v in zip(shared.keys, shared.values)]
            cache = TransformerLensKeyValueCache(entries, shared.attention_mask)
            seen = shared.acts
        else:
            cache = self._empty_cache(tokens.shape[0])
            with self._delta_hooks([*read, *grad_at], head, ()) as before:  # grad_at too: the gradients' shapes
                self(tokens[:, :start], attention_mask=attention_mask[:, :start], past_kv_cache=cache)
            seen = before.seen
            if not head:
                shared = SharedPrefix(start, tokens[:, :start], attention_mask[:, :start],
                                      tuple(e.past_keys for e in cache.entries), tuple(e.past_values for e in cache.entries),
                                      dict(seen))
        # The second part of one pass; a run continuing from a shared prefix is a pass of its own.
        with self._continued(already_counted=not given), self._delta_hooks(read, tail, grad_at) as after:
            per_position = self(tokens[:, start:], attention_mask=attention_mask[:, start:], past_kv_cache=cache)[..., 0]
            rewards = per_position.gather(1, (last - start).to(per_position.device)[:, None])[:, 0].to(self.cfg.device)
            run = after.finish(check_finite(rewards), read)
        acts = {n: torch.cat([seen[n], a.to(seen[n].device)], dim=1) for n, a in run.acts.items()}
        grads = {n: torch.cat([torch.zeros_like(seen[n]), g.to(seen[n].device)], dim=1) for n, g in run.grads.items()}
        kv = None if keep_kv_from is None else PrefixKV.from_cache(cache, keep_kv_from)
        return DeltaRun(run.rewards, acts, grads, kv, shared)

    def _empty_cache(self, batch: int) -> Any:
        """An empty TransformerLens KV cache, each block's entry on the block's device."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        entries = [TransformerLensKeyValueCacheEntry.init_cache_entry(self.cfg, self._block_device(b), batch)
                   for b in range(self.cfg.n_layers)]
        return TransformerLensKeyValueCache(entries, torch.empty((batch, 0), dtype=torch.int, device=self.cfg.device))

    def _block_device(self, layer: int) -> torch.device:
        return self.device_of(self.layer_input(layer))

    def run_from(
        self,
        residual: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"],
        *,
        layer: int,
        deltas: Mapping[str, Delta] | None = None,
        prefix: PrefixKV | None = None,
        rows: Tensor | None = None,
        start: int = 0,
    ) -> Float[Tensor, " batch"]:
        """Rewards of a forward restarted at block ``layer`` from ``residual`` (that block's input),
        with ``deltas`` added at later hooks: full-length tensors, or functions of the arriving
        activation (which then holds only the recomputed positions, ``start`` onwards).

        With ``prefix`` (the clean keys and values of the batch ``rows`` index into) and ``start``,
        only positions ``start`` onwards are recomputed: the forward must change nothing before
        ``start`` (causal attention then leaves those positions as they were), and attention reads
        the cached clean keys and values there. Right-padded batches only.
        """
        return self.restart(residual, attention_mask, layer=layer, deltas=deltas, prefix=prefix, rows=rows, start=start)[0]

    def restart(
        self,
        residual: Float[Tensor, "batch pos d_model"],
        attention_mask: Int[Tensor, "batch pos"],
        *,
        layer: int,
        deltas: Mapping[str, Delta] | None = None,
        prefix: PrefixKV | None = None,
        rows: Tensor | None = None,
        start: int = 0,
        keep_kv: bool = False,
    ) -> tuple[Float[Tensor, " batch"], PrefixKV | None]:
        """:meth:`run_from`, and with ``keep_kv`` this run's keys and values of blocks ``layer`` on
        at every position (the prefix's before ``start``, the recomputed ones after): the prefix of
        another row whose input agrees with this one's up to some position. Without, None."""
        deltas = dict(deltas or {})
        cache = None
        if prefix is not None and start > 0:
            if layer < prefix.first_layer:
                raise ValueError(f"the prefix holds blocks {prefix.first_layer}.. but the restart is at block {layer}")
            cache = self._prefix_cache(prefix, rows, start, layer, attention_mask, frozen=not keep_kv)
            residual = residual[:, start:]
            deltas = {name: delta if callable(delta) else delta[:, start:] for name, delta in deltas.items()}
        else:
            start = 0
            if keep_kv:
                cache = self._empty_cache(attention_mask.shape[0])
        last = final_positions(None, attention_mask) - start
        if bool((last < 0).any()):
            raise ValueError(f"start={start} is after the pooled position of some rows; a suffix restart must keep it")
        final_only = self._final_position_hooks(last, touched=deltas, layer=layer)
        with self._delta_hooks((), deltas, ()) as state, self.hooks(fwd_hooks=final_only):
            per_position = self(residual, start_at_layer=layer, attention_mask=attention_mask, past_kv_cache=cache)[..., 0]
            index = (torch.zeros_like(last) if final_only else last).to(per_position.device)
            rewards = state.finish(per_position.gather(1, index[:, None])[:, 0].to(self.cfg.device), ()).rewards
        return rewards, PrefixKV.from_cache(cache, layer) if keep_kv else None

    def _final_position_hooks(self, last: Tensor, *, touched: Mapping[str, Any], layer: int) -> list[tuple[str, Any]]:
        """Hooks that keep only each row's pooled position after the last block's attention: the
        last MLP, final norm and head act per position, and only the pooled one is read, so the
        reward is unchanged and the last MLP runs on one position per row. Empty where that is not
        exact (parallel attention and MLP, an attention-only model, a hook in the last block after
        its attention, or no block to run)."""
        final = self.cfg.n_layers - 1
        if layer > final or self.cfg.parallel_attn_mlp or self.cfg.attn_only:
            return []
        late = (f"blocks.{final}.hook_resid_mid", f"blocks.{final}.hook_mlp_in", f"blocks.{final}.ln2",
                f"blocks.{final}.mlp", f"blocks.{final}.hook_mlp_out", f"blocks.{final}.hook_resid_post", "ln_final", "unembed")
        if any(name.startswith(late) for name in touched):
            return []
        device = self._block_device(final)
        rows, last = torch.arange(len(last), device=device), last.to(device)
        return [(f"blocks.{final}.hook_resid_mid", lambda resid, hook: resid[rows, last][:, None])]

    def pooled_final_residual(
        self,
        attention_mask: Int[Tensor, "batch pos"],
        *,
        tokens: Int[Tensor, "batch pos"] | None = None,
        residual: Float[Tensor, "batch pos d_model"] | None = None,
        layer: int = 0,
        prefix: PrefixKV | None = None,
    ) -> Float[Tensor, "batch d_model"]:
        """The last block's output (the final norm's input) at each row's pooled position: a forward
        of ``tokens``, or one restarted at block ``layer`` from ``residual`` (that block's input).
        Right- or left-padded; no gradient. With ``prefix`` (the clean keys and values of blocks
        ``layer`` on, right-padded rows), a restart recomputes only the positions from the
        earliest pooled one on."""
        last = final_positions(None, attention_mask)
        start = int(last.min()) if len(last) else 0
        with torch.no_grad():
            if residual is None:
                out = self(tokens, attention_mask=attention_mask, stop_at_layer=self.cfg.n_layers)
                start = 0
            elif prefix is not None and start > 0 and layer >= prefix.first_layer and right_padded(attention_mask):
                cache = self._prefix_cache(prefix, None, start, layer, attention_mask)
                out = self(residual[:, start:], start_at_layer=layer, stop_at_layer=self.cfg.n_layers,
                           attention_mask=attention_mask, past_kv_cache=cache)
            else:
                out = self(residual, start_at_layer=layer, stop_at_layer=self.cfg.n_layers, attention_mask=attention_mask)
                start = 0
        last = (last - start).to(out.device)
        return out[torch.arange(len(last), device=out.device), last]

    def prefix_kv(
        self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"], *, first_layer: int
    ) -> PrefixKV:
        """The clean keys and values of every block from ``first_layer`` on (one forward, which fills
        a TransformerLens KV cache and so keeps the attention fast path)."""
        cache = self._empty_cache(tokens.shape[0])
        with torch.no_grad():
            self(tokens, attention_mask=attention_mask, past_kv_cache=cache)
        return PrefixKV.from_cache(cache, first_layer)

    def _prefix_cache(self, prefix: PrefixKV, rows: Tensor | None, start: int, layer: int, attention_mask: Tensor,
                      *, frozen: bool = True) -> Any:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        n = attention_mask.shape[0]
        entries = []
        for block in range(self.cfg.n_layers):
            if block >= layer:
                keys, values = prefix.keys[block], prefix.values[block]
                if rows is not None:
                    keys, values = keys[rows.to(keys.device)], values[rows.to(values.device)]
                entries.append(TransformerLensKeyValueCacheEntry(keys[:, :start], values[:, :start], frozen=frozen))
            else:
                entries.append(TransformerLensKeyValueCacheEntry.init_cache_entry(self.cfg, self._block_device(block), n))
        return TransformerLensKeyValueCache(entries, attention_mask[:, :start], frozen=frozen)

    @contextmanager
    def _delta_hooks(self, read: Sequence[str], deltas: Mapping[str, Delta] | None, grad_at: Sequence[str]) -> Iterator[Any]:
        deltas = deltas or {}
        state = _HookState(grad_at)

        def hook_fn(act: Tensor, hook: Any) -> Tensor:
            if hook.name in deltas:
                delta = deltas[hook.name]
                # Deltas may be flat ([..., d_in]); per-head activations are [..., n_heads, d_head].
                # With the layers split, the activation is on its block's device.
                act = act + (delta(act) if callable(delta) else delta).reshape(act.shape).to(act.device)
            return state.see(hook.name, act)

        names = sorted(set(read) | set(deltas) | set(grad_at))
        with torch.set_grad_enabled(bool(grad_at)), self.hooks(fwd_hooks=[(name, hook_fn) for name in names]):
            yield state

    def activations(
        self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None, hook_names: Sequence[str]
    ) -> dict[str, Tensor]:
        """The activations at ``hook_names`` (in each hook's layout, not detached), running the
        model only as far as the last of them needs."""
        seen: dict[str, Tensor] = {}

        def read(act: Tensor, hook: Any) -> None:
            seen[hook.name] = act

        with self.hooks(fwd_hooks=[(name, read) for name in hook_names]):
            self(tokens, attention_mask=attention_mask, stop_at_layer=self.stop_layer(hook_names))
        return seen

    # ---- token embeddings -----------------------------------------------------------------------

    def token_embedding(self) -> Float[Tensor, "d_vocab d_model"]:
        """The token embedding matrix (detached)."""
        return self.W_E.detach()

    @contextmanager
    def embeddings_replaced(self, replace: Callable[[Tensor], Tensor]) -> Iterator[None]:
        """Within the block, every forward's token embeddings ``[batch, pos, d_model]`` go through
        ``replace`` (e.g. to put one-hot vectors times the embedding matrix in a span)."""
        with self.hooks(fwd_hooks=[("hook_embed", lambda embed, hook: replace(embed))]):
            yield


class _HookState:
    """The activations and gradient leaves one run's hooks collect."""

    def __init__(self, grad_at: Sequence[str]):
        self.grad_at = set(grad_at)
        self.seen: dict[str, Tensor] = {}
        self.leaves: dict[str, Tensor] = {}

    def see(self, name: str, act: Tensor) -> Tensor:
        self.seen[name] = act.detach()
        if name in self.grad_at:
            self.leaves[name] = torch.zeros_like(act, requires_grad=True)
            act = act + self.leaves[name]
        return act

    def finish(self, rewards: Tensor, read: Sequence[str]) -> DeltaRun:
        grads = {}
        if self.leaves:
            wanted = list(self.leaves)
            grads = dict(zip(wanted, torch.autograd.grad(rewards.sum(), [self.leaves[n] for n in wanted])))
        return DeltaRun(rewards=rewards.detach(), acts={n: self.seen[n] for n in read if n in self.seen}, grads=grads)
