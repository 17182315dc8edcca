"""A preference model as a TransformerLens model whose unembedding is the reward head.

A reward model (PM) is a transformer body followed by a ``[d_model, 1]`` head. Wrapped here as a
:class:`sae_lens.HookedSAETransformer` with ``d_vocab_out = 1``, its forward returns the reward at
every position, ``[batch, pos, 1]``, so every TransformerLens and SAELens tool (hooks, caches,
activation patching, spliced-in SAEs) works on it unchanged. :meth:`RewardModel.reward` reads the
reward where Hugging Face's ``*ForSequenceClassification`` reads it: the last non-pad token.

Loading a folder or hub name (``from_pretrained``) checks, before converting, that transformers read
every weight from the checkpoint: a causal LM or a classifier saved without its head would otherwise
get a randomly initialised reward head without a word.

Converting (``from_hf``):
1. look the HF architecture up in :data:`pm_lens.model.architectures.ARCHITECTURES`;
2. build a ``HookedTransformerConfig`` from the HF config (no hub access);
3. convert the body's weights with TransformerLens's converter and put the classifier's
   ``score`` weight (and bias, if any) in the unembedding;
4. refuse non-finite weights, then fold and centre what keeps parity (never the head);
5. store weights in the layout TransformerLens's forward reads (no per-forward copies);
6. record the processing in :attr:`RewardModel.processing`;
7. give attention the SDPA fast path where it is exact (:mod:`pm_lens.model.attention`;
   ``rm.use_fast_attention = False`` turns it off).

``copy.deepcopy(rm)`` gives an independent model (see :meth:`RewardModel.__deepcopy__`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from sae_lens import HookedSAETransformer
from torch import Tensor
from transformer_lens import HookedTransformerConfig
from transformer_lens.components import Unembed

from pm_lens.model.architectures import (
    ARCHITECTURES,
    DEFAULT_MAX_N_CTX,
    HEAD_ATTR,
    causal_lm_view,
    is_causal_lm,
    spec_for,
)
from pm_lens.model.attention import fast_attention_enabled, set_fast_attention
from pm_lens.model.placement import as_devices, as_dtype
from pm_lens.model.runs import ModelRuns, check_finite
from pm_lens.model.split import LayerSplit, as_split


@dataclass(frozen=True)
class WeightProcessing:
    """The weight processing applied when the model was loaded (all exact up to float rounding)."""

    fold_ln: bool
    center_writing_weights: bool
    fold_value_biases: bool
    center_unembed: bool = False  # never: with one output it would zero the reward head

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)


class RewardModel(ModelRuns, HookedSAETransformer):
    """A reward model as a ``HookedSAETransformer`` whose unembed is the reward head.

    ``rm(tokens)`` returns ``[batch, pos, 1]`` (the reward read at every position);
    ``rm.reward(tokens, attention_mask)`` returns ``[batch]`` at the pooled position. What the
    other stages need from the model (runs with deltas, restarts, counting) comes from
    :class:`pm_lens.model.runs.ModelRuns`.
    Build one with :meth:`from_hf` or :meth:`from_pretrained`.

    Attributes:
        processing: the weight processing applied at load time.
        hf_architecture: the Hugging Face architecture it was converted from.
        pad_token_id: the pad id used to find the pooled position when no mask is given.
        text_format: how pm_lens lays out a prompt and a completion for this PM, one of
            ``pm_lens.data.TEXT_FORMATS`` (default ``"auto"``: HH transcripts stay as they are,
            other prompts get the tokenizer's chat template); set it to what the PM was trained on.
        use_fast_attention: whether attention runs through one fused SDPA call wherever that is
            exact, falling back to TransformerLens's own attention per layer and call when a hook,
            cache, soft-cap or local window needs it (see :mod:`pm_lens.model.attention`).
        layer_split: the devices the layers are split over (:class:`pm_lens.model.split.LayerSplit`),
            or None when the model is on one device (``cfg.device``).
    """

    processing: WeightProcessing
    hf_architecture: str
    pad_token_id: int | None
    text_format: str = "auto"
    objective: int | list[float] | None = None  # the output (or weights) of a multi-output head (from_hf)
    layer_split: LayerSplit | None = None

    @classmethod
    def from_hf(
        cls,
        hf_model: torch.nn.Module,
        tokenizer: Any = None,
        *,
        device: str | torch.device | Sequence[str | torch.device] | None = None,
        dtype: str | torch.dtype | None = None,
        n_ctx: int | None = None,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        fold_value_biases: bool = True,
        objective: int | Sequence[float] | None = None,
    ) -> "RewardModel":
        """Convert an in-memory HF ``*ForSequenceClassification`` reward model. No hub access.

        ``from_hf`` trusts the weights it is given: a head transformers initialised at random (see
        :meth:`from_pretrained`) is converted like a trained one.

        Args:
            hf_model: the HF reward model (one output label).
            tokenizer: its tokenizer, used for text input and as ``rm.tokenizer``; not modified.
            device: where the model lives (default: the HF model's device), or several devices
                (a list, or ``"cuda:0,cuda:1"``) to split its layers over in order
                (:class:`pm_lens.model.split.LayerSplit`).
            dtype: parameter dtype, a ``torch.dtype`` or a name such as ``"bfloat16"`` (see
                :func:`pm_lens.model.as_dtype`; default: the HF model's dtype).
            n_ctx: longest sequence accepted; default is the model's context, capped at
                ``DEFAULT_MAX_N_CTX`` because TransformerLens allocates ``[n_ctx, n_ctx]``
                masks per layer.
            fold_ln, center_writing_weights, fold_value_biases: weight processing (exact).
            objective: for a head with several outputs (``num_labels > 1``: multi-objective
                PMs), the reward: an output's index, or one weight per output for their weighted
                sum. It is folded into a one-column head (``W_U @ w``, exact), so everything
                downstream sees one reward. ``rm.objective`` records it.
        """
        devices = None if device is None else as_devices(device)
        dtype = None if dtype is None else as_dtype(dtype)
        architecture = type(hf_model).__name__
        spec = spec_for(architecture)
        weights = objective_weights(objective, hf_model.score.out_features, architecture)
        param = next(hf_model.parameters())
        split = None if devices is None else as_split(devices, hf_model.config.num_hidden_layers)
        # A split model is converted on the CPU and its modules then moved to their devices.
        where = param.device if devices is None else (torch.device("cpu") if split else devices[0])
        cfg = _tl_config(hf_model.config, architecture, n_ctx=n_ctx, device=where, dtype=dtype or param.dtype)
        model = cls(cfg, move_to_device=True)
        state_dict = _reward_state_dict(hf_model, spec, cfg, weights)
        processing = _processing(spec, fold_ln, center_writing_weights, fold_value_biases)
        model.load_and_process_state_dict(state_dict, refactor_factored_attn_matrices=False, **processing.as_dict())
        return model._finish(processing, architecture, objective if weights is not None else None,
                             hf_model.config, tokenizer, split=split)

    def _finish(self, processing: WeightProcessing, architecture: str, objective: Any, hf_config: Any,
                tokenizer: Any, *, split: LayerSplit | None = None) -> "RewardModel":
        """The steps after the weights are in, shared by :meth:`from_hf` and the streamed load."""
        self.layer_split = split
        if split is not None:
            split.place(self)
        _store_as_forward_reads(self)
        self.unembed.__class__ = Float32Head
        self.use_fast_attention = True  # fast attention: SDPA where exact (pm_lens.model.attention)
        self.processing = processing
        self.hf_architecture = architecture
        self.objective = None if objective is None else (objective if isinstance(objective, int) else list(map(float, objective)))
        self.pad_token_id = hf_config.pad_token_id
        if tokenizer is not None:
            self.set_reward_tokenizer(tokenizer)
        self.eval()
        return self

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        name_or_path: str | Path,
        *,
        device: str | torch.device | Sequence[str | torch.device] | None = None,
        dtype: str | torch.dtype | None = None,
        n_ctx: int | None = None,
        local_files_only: bool | None = None,
        stream: bool = True,
        **from_hf_kwargs: Any,
    ) -> "RewardModel":
        """Load a reward model through transformers, check it, then convert it with :meth:`from_hf`.

        A local directory is read offline (``local_files_only=True``); a hub name needs network
        unless it is in the local HF cache. ``dtype`` and ``device`` are checked before anything is
        loaded, the architecture before the weights are read.

        Every weight must come from the checkpoint: a folder whose reward head (``score``) or body
        weights transformers would initialise at random raises a ``ValueError`` naming the path
        and the missing keys, and a causal LM is called one. To put a random head on a causal LM
        on purpose, load it with transformers (``num_labels=1``) and pass it to :meth:`from_hf`.

        A local folder with safetensors weights is read one layer at a time and each piece goes
        straight to ``device`` (:mod:`pm_lens.model.streaming`): peak memory is the weights plus
        one layer, not the two to three copies of loading through transformers and converting.
        ``stream=False`` (or a folder the streaming reader cannot take) loads through transformers.
        With several devices (``device=["cuda:0", "cuda:1"]`` or ``"cuda:0,cuda:1"``) the layers are
        split over them in order (:mod:`pm_lens.model.split`) and each streamed piece goes straight
        to its layer's device. ``from_hf_kwargs`` (weight processing, ``objective``) are :meth:`from_hf`'s.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        devices = None if device is None else as_devices(device)
        dtype = None if dtype is None else as_dtype(dtype)
        path = str(name_or_path)
        if local_files_only is None:
            local_files_only = Path(name_or_path).is_dir()
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=local_files_only)
        except OSError as err:
            raise OSError(
                f"cannot load a reward model from {path!r}: it is not a local model directory, "
                "and a hub name needs network or the local Hugging Face cache"
            ) from err
        spec_for(_classifier_name(config))
        if from_hf_kwargs.get("objective") is not None:  # checked before the weights are read
            objective_weights(from_hf_kwargs["objective"], getattr(config, "num_labels", 1), path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        except (OSError, ValueError):
            tokenizer = None
        if Path(path).is_dir() and stream:
            model = cls._streamed(path, config, tokenizer, devices=devices, dtype=dtype, n_ctx=n_ctx, **from_hf_kwargs)
            if model is not None:
                return model
        hf_model, loading_info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, local_files_only=local_files_only, dtype=dtype or torch.float32,
            output_loading_info=True,
        )
        _check_all_weights_loaded(path, config, loading_info)
        return cls.from_hf(hf_model, tokenizer, device=devices, dtype=dtype, n_ctx=n_ctx, **from_hf_kwargs)

    @classmethod
    def _streamed(cls, path: str, hf_config: Any, tokenizer: Any, *, devices: tuple[torch.device, ...] | None,
                  dtype: torch.dtype | None, n_ctx: int | None, fold_ln: bool = True,
                  center_writing_weights: bool = True, fold_value_biases: bool = True,
                  objective: int | Sequence[float] | None = None) -> "RewardModel | None":
        """The folder loaded layer by layer (:mod:`pm_lens.model.streaming`), or ``None`` when it
        cannot be streamed and must go through transformers."""
        from pm_lens.model.streaming import give_back_freed_memory, stream_reward_model

        if objective is None and getattr(hf_config, "num_labels", 1) != 1:
            return None  # a causal LM's default two labels, or a head needing objective=: transformers names which
        architecture = _classifier_name(hf_config)
        spec = spec_for(architecture)
        weights = objective_weights(objective, getattr(hf_config, "num_labels", 1), path)
        devices = devices or (torch.device("cpu"),)
        split = as_split(devices, hf_config.num_hidden_layers)
        cfg = _tl_config(hf_config, architecture, n_ctx=n_ctx, device=devices[0], dtype=dtype or torch.float32)
        processing = _processing(spec, fold_ln, center_writing_weights, fold_value_biases)
        model = stream_reward_model(cls, path, hf_config, spec, cfg, processing.as_dict(), weights, split=split)
        if model is None:
            return None
        model = model._finish(processing, architecture, objective if weights is not None else None, hf_config, tokenizer,
                              split=split)
        give_back_freed_memory()  # what the layout change of _finish freed
        return model

    def __deepcopy__(self, memo: dict[int, Any]) -> "RewardModel":
        """An independent copy: its weights, attributes (``processing``, ``hf_architecture``,
        ``pad_token_id``, ``tokenizer``) and attached SAEs are copies, and its MLPs run its own weights.

        SAELens wraps each MLP's ``forward`` in a closure over the original module to add the
        ``mlp.hook_in`` hook point (``add_hook_in_to_mlp``); a plain deep copy shares that closure,
        so the copy's MLPs would read the original's weights and hooks. Each copied MLP is rebound.
        """
        if self._transcoder_output_hooks:
            raise ValueError(
                f"cannot deep-copy a RewardModel with transcoders attached ({sorted(self._transcoder_output_hooks)}): "
                "their input hooks capture into the original's wrappers; call reset_saes() first"
            )
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__dict__, memo))
        for block in copied.blocks:
            if "forward" in vars(block.mlp) and hasattr(block.mlp, "hook_in"):
                _forward_through_hook_in(block.mlp)
        return copied

    @property
    def use_fast_attention(self) -> bool:
        """Whether every attention layer has the SDPA fast path (:mod:`pm_lens.model.attention`)."""
        return fast_attention_enabled(self)

    @use_fast_attention.setter
    def use_fast_attention(self, enabled: bool) -> None:
        set_fast_attention(self, enabled)

    def set_reward_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` for text input, without the hub look-ups TL's ``set_tokenizer`` makes.

        A tokenizer without a pad token is fine: pm_lens pads with its own id and always
        passes an attention mask (see ``pm_lens.data.encode_completions``).
        """
        self.tokenizer = tokenizer
        self.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
        if self.pad_token_id is None:
            self.pad_token_id = tokenizer.pad_token_id

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As ``torch.nn.Module.load_state_dict``. TransformerLens loads a converted checkpoint one
        key at a time (freeing each as it goes), and each call walks every module of the model
        (~8 s for a 30-layer model); a single key is loaded through the module that owns it."""
        if not strict and len(state_dict) == 1:
            ((key, value),) = state_dict.items()
            owner, _, name = key.rpartition(".")
            try:
                module = self.get_submodule(owner) if owner else self
            except AttributeError:
                module = self
            if module is not self:
                return module.load_state_dict({name: value}, strict=False, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: A002
        if isinstance(input, Tensor) and not input.is_floating_point():
            self.check_tokens(input, kwargs.get("attention_mask"))
        if isinstance(input, Tensor):
            self.count_forward(input)
        return super().forward(input, *args, **kwargs)

    @contextmanager
    def _token_masks(self, input: Any, kwargs: dict[str, Any]) -> Iterator[None]:
        """SAELens's masks of the tokens an attached SAE bypasses, each on its hook's device (SAELens
        puts them on the tokens' device, the first one when the layers are split)."""
        with super()._token_masks(input, kwargs):
            if self.layer_split is not None:
                for name, wrapper in self._acts_to_saes.items():
                    if getattr(wrapper, "_token_mask", None) is not None:
                        wrapper.set_token_mask(wrapper._token_mask.to(self.device_of(name)))
            yield

    def check_tokens(self, tokens: Tensor, attention_mask: Tensor | None = None) -> None:
        """Raise a ValueError if ``tokens`` cannot be run: wrong shape, ids outside the
        vocabulary, longer than the context, or a mask of another shape."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens are empty (pos = 0)")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the model's context n_ctx={self.cfg.n_ctx}; "
                "truncate the input or load the model with a larger n_ctx"
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.cfg.d_vocab:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.d_vocab})")
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from tokens shape {tuple(tokens.shape)}"
            )

    def reward(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        *,
        past_kv_cache: Any = None,
    ) -> Float[Tensor, " batch"]:
        """The reward of each sequence, read at the last non-pad position (as Hugging Face does).

        Pass ``attention_mask`` for padded batches (left or right padding). Without one, padding
        is recognised by ``pad_token_id`` when the model has one. Raises ``FloatingPointError``
        if a reward is NaN or infinite. ``past_kv_cache`` (a TransformerLens KV cache) is filled
        with this run's keys and values.
        """
        if attention_mask is None and self.pad_token_id is not None and (tokens == self.pad_token_id).any():
            attention_mask = (tokens != self.pad_token_id).long()
        per_position = self(tokens, attention_mask=attention_mask, past_kv_cache=past_kv_cache)[..., 0]
        return check_finite(self.pool(per_position, attention_mask, tokens))


def _forward_through_hook_in(mlp: torch.nn.Module) -> None:
    """Route ``mlp``'s forward through its own ``hook_in``, as SAELens's ``add_hook_in_to_mlp``
    does at construction (without replacing the hook point, so hooks already on it stay)."""
    forward = type(mlp).forward.__get__(mlp)
    mlp.forward = lambda x: forward(mlp.hook_in(x))


def _classifier_name(config: Any) -> str:
    """The ``*ForSequenceClassification`` class transformers builds for ``config``, or, when it has
    none, the config's own architecture (which :func:`spec_for` then refuses by name)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    return name or ", ".join(getattr(config, "architectures", None) or [config.model_type])


def _check_all_weights_loaded(path: str, config: Any, loading_info: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose weights transformers had to initialise at random.

    ``loading_info`` is what ``from_pretrained(..., output_loading_info=True)`` reports. Missing
    reward-head keys mean a causal LM (named from ``config.architectures``) or a classifier saved
    without its head; missing body keys mean an incomplete checkpoint.
    """
    missing = sorted(loading_info.get("missing_keys") or ())
    head = [key for key in missing if key.split(".")[0] == HEAD_ATTR]
    body = [key for key in missing if key not in head]
    remedy = (
        "load a *ForSequenceClassification checkpoint saved with its trained one-output head (as trl's "
        "RewardTrainer saves one), or, to use a random head on purpose, load the model with transformers' "
        "AutoModelForSequenceClassification.from_pretrained(path, num_labels=1) and pass it to RewardModel.from_hf"
    )
    architectures = list(getattr(config, "architectures", None) or [])
    unexpected = sorted(loading_info.get("unexpected_keys") or ())
    lm_head = [key for key in unexpected if key.startswith("lm_head.")]
    # Named by config.architectures, or, in a config without them, recognised by its LM head.
    causal = [name for name in architectures if is_causal_lm(name)] or (
        [f"its checkpoint has {', '.join(lm_head)}"] if lm_head and not architectures else []
    )
    if head and causal and not any(name in ARCHITECTURES for name in architectures):
        raise ValueError(
            f"{path!r} holds a causal LM ({', '.join(causal)}), not a reward model: its checkpoint has no reward "
            f"head ({', '.join(head)} would be initialised at random); {remedy}"
        )
    if body:
        raise ValueError(
            f"{path!r} lacks {len(body)} weight(s) of the transformer body that transformers would initialise "
            f"at random ({_some(body)}); the checkpoint is incomplete or of another model"
        )
    if head:
        besides = f", and it holds weights nothing reads ({_some(unexpected)})" if unexpected else ""
        raise ValueError(
            f"the reward head of {path!r} is not in its checkpoint ({', '.join(head)} would be initialised at "
            f"random{besides}); {remedy}"
        )


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


class Float32Head(Unembed):
    """The reward head, computed in float32 whatever the model's dtype: in bfloat16 a reward of
    ~10 is rounded to steps of 0.06, more than many features' effects. Its input, weights and
    output are float32 (the weights keep the model's dtype in memory: ``[d_model, 1]``)."""

    def forward(self, residual: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab_out"]:
        residual = self.hook_in(residual)
        return self.hook_out(torch.nn.functional.linear(residual.float(), self.W_U.T.float(), self.b_U.float()))


def _store_as_forward_reads(model: HookedSAETransformer) -> None:
    """Store weights in the memory layout TransformerLens's forward reads them in.

    TL transposes the gated-MLP weights, flattens ``W_O`` and reshapes ``W_Q/W_K/W_V`` on every
    forward and makes the result contiguous: ~200 ms per forward of a SmolLM2-sized model, most
    of pm_lens's overhead against Hugging Face (benchmarks/forward_overhead.py). Keeping the
    parameters in that layout (same values, other strides) makes those copies no-ops. A
    non-contiguous parameter cannot be written by ``safetensors`` as is: call ``.contiguous()``.
    """
    with torch.no_grad():
        for block in model.blocks:
            if type(block.mlp).__name__ == "GatedMLP":
                for name in ("W_gate", "W_in", "W_out"):
                    param = getattr(block.mlp, name)
                    param.data = param.data.T.contiguous().T
            attn = block.attn
            n_heads, d_head, d_model = attn.W_O.shape
            attn.W_O.data = attn.W_O.data.reshape(n_heads * d_head, d_model).T.contiguous().T.reshape(
                n_heads, d_head, d_model
            )
            for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
                param = attn._parameters.get(name)
                if param is not None:
                    param.data = param.data.transpose(1, 2).contiguous().transpose(1, 2)


def objective_weights(objective: Any, n_outputs: int, architecture: str = "the model") -> Tensor | None:
    """``[n_outputs]`` weights that make one reward of a head with ``n_outputs`` outputs (None for
    a one-output head without an objective); a ValueError for an objective that does not fit."""
    if objective is None:
        if n_outputs == 1:
            return None
        raise ValueError(f"{architecture}'s score head has num_labels={n_outputs} outputs; choose the reward with "
                         f"objective= (an output index in 0..{n_outputs - 1}, or {n_outputs} weights for a weighted sum)")
    if isinstance(objective, bool) or not isinstance(objective, (int, Sequence)) or isinstance(objective, str):
        raise ValueError(f"objective must be an output index or a list of {n_outputs} weights, got {objective!r}")
    if isinstance(objective, int):
        if not 0 <= objective < n_outputs:
            raise ValueError(f"objective {objective} is not an output of the score head: valid are 0..{n_outputs - 1}")
        return torch.nn.functional.one_hot(torch.tensor(objective), n_outputs).double()
    weights = list(objective)
    if len(weights) != n_outputs or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise ValueError(f"objective must hold {n_outputs} numbers (one per output), got {objective!r}")
    weights = torch.tensor(weights, dtype=torch.float64)
    if not torch.isfinite(weights).all():
        raise ValueError(f"objective weights must be finite, got {objective!r}")
    return weights


def _tl_config(hf_config: Any, architecture: str, *, n_ctx: int | None, device: torch.device | str,
               dtype: torch.dtype) -> HookedTransformerConfig:
    """The TransformerLens config of a reward model: the body's fields and a one-column unembedding."""
    fields = spec_for(architecture).tl_config(hf_config)
    fields["n_ctx"] = n_ctx or min(fields["n_ctx"], DEFAULT_MAX_N_CTX)
    return HookedTransformerConfig(**fields, d_vocab_out=1, original_architecture=architecture, device=str(device),
                                   dtype=dtype, default_prepend_bos=False)


def _processing(spec: Any, fold_ln: bool, center_writing_weights: bool, fold_value_biases: bool) -> WeightProcessing:
    return WeightProcessing(
        fold_ln=fold_ln and spec.processing["fold_ln"],
        center_writing_weights=center_writing_weights and spec.processing["center_writing_weights"],
        fold_value_biases=fold_value_biases and spec.processing["fold_value_biases"],
    )


def head_state(score: torch.nn.Module, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The unembedding ``(W_U [d_model, 1], b_U [1])`` of the reward head ``score`` (a Linear with
    ``n_outputs`` outputs), folded to one column by ``weights`` (``[n_outputs]``) when given."""
    with torch.no_grad():
        W_U = score.weight.T.clone()
        b_U = score.bias.clone() if score.bias is not None else torch.zeros(score.out_features, dtype=score.weight.dtype,
                                                                             device=score.weight.device)
        if weights is not None:
            w = weights.to(W_U.device)
            W_U = (W_U.double() @ w[:, None]).to(score.weight.dtype)
            b_U = (b_U.double() @ w).reshape(1).to(score.weight.dtype)
    return W_U, b_U


def _reward_state_dict(hf_model: torch.nn.Module, spec: Any, cfg: HookedTransformerConfig,
                       weights: Tensor | None = None) -> dict[str, Tensor]:
    """TransformerLens state dict of the body, with the ``score`` head as the unembedding (folded
    to one column by ``weights`` when the head has several outputs)."""
    with torch.no_grad():
        state_dict = spec.convert(causal_lm_view(hf_model, spec), cfg)
        state_dict["unembed.W_U"], state_dict["unembed.b_U"] = head_state(getattr(hf_model, HEAD_ATTR), weights)
    bad = [name for name, w in state_dict.items() if w.is_floating_point() and not torch.isfinite(w).all()]
    if bad:
        raise ValueError(f"the reward model has NaN or infinite weights in {_some(bad)}")
    return state_dict
