"""Turning prompts and completions into padded token batches a reward model can read.

Formatting is an explicit choice, ``text_format`` (:data:`TEXT_FORMATS`), recorded with every
result, because a PM scored on text laid out otherwise than in its training sees other text:

- ``"hh"``: the HH-RLHF plain template ``"\\n\\nHuman: {prompt}\\n\\nAssistant: {completion}"``
  (an HH transcript prompt is kept as it is, so an HH pair reproduces its transcript exactly);
- ``"chat_template"``: the tokenizer's chat template, the prompt's turns as user and assistant
  messages and the completion as the last assistant message (some templates add a system prompt);
- ``"raw"``: ``prompt + completion``, nothing added (the data carries its own layout);
- ``"auto"`` (the default): ``"hh"`` for a prompt that is an HH transcript (it has
  ``"\\n\\nHuman:"``) or when the tokenizer has no chat template, else ``"chat_template"``.
  HH data therefore keeps its text; :func:`describe_text_format` says what ``"auto"`` chose.

Encoding: each text is tokenized on its own, then padded to the longest in the batch (right or
left) with an attention mask. The first completion token of every row is recorded, so later
stages can restrict themselves to the completion.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from pm_lens.data.pairs import ASSISTANT, HUMAN, PairsLike, as_pairs, hh_turns


# Each sequence's first token is left out of SAE training, attribution, ablation, contexts and SAE
# evaluation by default (``skip_first``): in most PMs (Llama, Mistral, Qwen, Gemma bodies) it is an
# attention sink whose residual norm is tens to hundreds of times the others', which wrecks SAEs
# there and lets its features rank first for reasons that have nothing to do with the text.
SKIP_FIRST = True


@dataclass(frozen=True)
class TokenBatch:
    """Padded token ids of a batch of texts.

    Attributes:
        tokens: ``[batch, pos]`` token ids (pad positions hold ``pad_token_id``).
        attention_mask: ``[batch, pos]``, 1 on real tokens and 0 on padding.
        completion_start: ``[batch]`` position of each row's first completion token.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    completion_start: Int[Tensor, " batch"]

    def to(self, device: str | torch.device) -> "TokenBatch":
        return TokenBatch(self.tokens.to(device), self.attention_mask.to(device), self.completion_start.to(device))

    def kept(self, *, skip_first: bool = False, exclude_token_ids: Sequence[int] = ()) -> Tensor:
        """``[batch, pos]`` bool: real tokens, less each row's first one (``skip_first``, left or
        right padding) and tokens in ``exclude_token_ids``."""
        keep = self.attention_mask != 0
        if skip_first:
            first = keep.int().argmax(dim=-1)
            keep[torch.arange(keep.shape[0], device=keep.device), first] = False
        if exclude_token_ids:
            keep &= ~torch.isin(self.tokens, torch.tensor(list(exclude_token_ids), device=self.tokens.device))
        return keep


@dataclass(frozen=True)
class PairBatch:
    """The chosen and the rejected side of a batch of pairs, each padded on its own."""

    chosen: TokenBatch
    rejected: TokenBatch

    def to(self, device: str | torch.device) -> "PairBatch":
        return PairBatch(self.chosen.to(device), self.rejected.to(device))


TEXT_FORMATS = ("auto", "chat_template", "hh", "raw")


def check_text_format(text_format: str) -> None:
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text_format must be one of {TEXT_FORMATS}, got {text_format!r}")


def resolve_text_format(tokenizer: Any, prompt: str, text_format: str = "auto") -> str:
    """The concrete format (``"chat_template"``, ``"hh"`` or ``"raw"``) of one prompt."""
    check_text_format(text_format)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if text_format == "chat_template" and not has_template:
        raise ValueError("text_format='chat_template' but the tokenizer has no chat template; use 'hh' or 'raw'")
    if text_format != "auto":
        return text_format
    return "chat_template" if has_template and HUMAN not in prompt else "hh"


def adds_special_tokens(tokenizer: Any, prompt: str, text_format: str = "auto") -> bool:
    """Whether the tokenizer adds its special tokens (e.g. BOS) to the formatted text: not for a
    chat template, which writes its own."""
    return resolve_text_format(tokenizer, prompt, text_format) != "chat_template"


def describe_text_format(tokenizer: Any, prompts: Sequence[str], text_format: str = "auto") -> str:
    """What ``text_format`` does to ``prompts``, for the record: the concrete format, or for a
    mix, how many prompts got each (e.g. ``"auto: hh for 3, chat_template for 5"``)."""
    counts: dict[str, int] = {}
    for prompt in prompts:
        chosen = resolve_text_format(tokenizer, prompt, text_format)
        counts[chosen] = counts.get(chosen, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return f"{text_format}: " + ", ".join(f"{name} for {n}" for name, n in sorted(counts.items()))


def format_text(tokenizer: Any, prompt: str, completion: str, *, text_format: str = "auto") -> str:
    """The model input for ``completion`` answering ``prompt`` in ``text_format`` (see the module
    docstring).

    Raises ValueError for an empty (or whitespace-only) completion: its reward would be read
    at a template token and mean nothing.
    """
    if not completion.strip():
        raise ValueError(f"empty completion for prompt {prompt[:60]!r}: a reward needs a completion to read")
    chosen = resolve_text_format(tokenizer, prompt, text_format)
    if chosen == "chat_template":
        messages = hh_turns(prompt) + [{"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if chosen == "raw":
        return prompt + completion
    return _plain_template(prompt, completion)


def _plain_template(prompt: str, completion: str) -> str:
    if HUMAN in prompt:
        return f"{prompt}{ASSISTANT} {completion}"
    return f"{HUMAN} {prompt}{ASSISTANT} {completion}"


def pad_token_id(tokenizer: Any) -> int:
    """The id pm_lens pads with: the pad token, else eos, else 0 (padding is masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_completions(
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    max_len: int,
    padding_side: str = "right",
    truncate: bool = False,
    text_format: str = "auto",
) -> TokenBatch:
    """Format and tokenize each (prompt, completion) and pad them into one batch.

    Args:
        text_format: how prompt and completion are laid out (see the module docstring).
        max_len: the model's context (``rm.cfg.n_ctx``). A longer text raises a ValueError
            naming it, unless ``truncate``: then the start of the prompt is cut (the reward is
            read at the end) and a warning says how many texts were cut.
        padding_side: where the padding goes; rewards are the same either way.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("nothing to encode: no prompts")
    check_text_format(text_format)
    rows, starts, cut = [], [], 0
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids, start = encode_one(tokenizer, prompt, completion, text_format)
        if _too_long(ids, max_len, truncate, index, "the start of the prompt"):
            ids, start, cut = ids[-max_len:], max(0, start - (len(ids) - max_len)), cut + 1
        rows.append(ids)
        starts.append(start)
    if cut:
        warnings.warn(f"truncated {cut} of {len(rows)} texts to the context of {max_len} tokens", stacklevel=2)
    return _pad(rows, starts, pad_token_id(tokenizer), padding_side)


def encode_texts(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_len: int,
    padding_side: str = "right",
    truncate: bool = False,
) -> TokenBatch:
    """Tokenize already-formatted texts and pad them into one batch (``completion_start`` is 0).

    Special tokens are added unless the tokenizer has a chat template (the text then carries its
    own). A text longer than ``max_len`` raises a ValueError, or with ``truncate`` loses its start.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not texts:
        raise ValueError("nothing to encode: no texts")
    add_special = not getattr(tokenizer, "chat_template", None)
    rows, cut = [], 0
    for index, text in enumerate(texts):
        ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
        if not ids:
            raise ValueError(f"the tokenizer produced no tokens for text {index} ({text[:60]!r})")
        if _too_long(ids, max_len, truncate, index, "its start"):
            ids, cut = ids[-max_len:], cut + 1
        rows.append(ids)
    if cut:
        warnings.warn(f"truncated {cut} of {len(rows)} texts to the context of {max_len} tokens", stacklevel=2)
    return _pad(rows, [0] * len(rows), pad_token_id(tokenizer), padding_side)


def _too_long(ids: list[int], max_len: int, truncate: bool, index: int, what_is_cut: str) -> bool:
    """Whether text ``index`` must be cut to ``max_len``; a ValueError if it may not be."""
    if len(ids) <= max_len:
        return False
    if not truncate:
        raise ValueError(
            f"text {index} is {len(ids)} tokens, longer than the context max_len={max_len}; "
            f"shorten it or pass truncate=True to cut {what_is_cut}"
        )
    return True


def encode_pairs(
    tokenizer: Any,
    pairs: PairsLike,
    *,
    max_len: int,
    padding_side: str = "right",
    truncate: bool = False,
    text_format: str = "auto",
) -> PairBatch:
    """Encode the chosen and the rejected side of ``pairs`` (see :func:`encode_completions`)."""
    pairs = as_pairs(pairs)
    prompts = [pair.prompt for pair in pairs]
    kwargs = dict(max_len=max_len, padding_side=padding_side, truncate=truncate, text_format=text_format)
    return PairBatch(
        chosen=encode_completions(tokenizer, prompts, [p.chosen for p in pairs], **kwargs),
        rejected=encode_completions(tokenizer, prompts, [p.rejected for p in pairs], **kwargs),
    )


def encode_one(tokenizer: Any, prompt: str, completion: str, text_format: str) -> tuple[list[int], int]:
    """Token ids of the formatted text and the index of the first completion token."""
    text = format_text(tokenizer, prompt, completion, text_format=text_format)
    add_special = adds_special_tokens(tokenizer, prompt, text_format)
    char_start = text.rfind(completion)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start = next((i for i, (_, end) in enumerate(offsets) if end > char_start), len(ids) - 1)
    else:
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        start = len(tokenizer(text[:char_start], add_special_tokens=add_special)["input_ids"])
    if not ids:
        raise ValueError(f"the tokenizer produced no tokens for {text[:60]!r}")
    return list(ids), min(start, len(ids) - 1)


def _pad(rows: list[list[int]], starts: list[int], pad_id: int, side: str) -> TokenBatch:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for i, ids in enumerate(rows):
        offset = width - len(ids) if side == "left" else 0
        tokens[i, offset : offset + len(ids)] = torch.tensor(ids)
        mask[i, offset : offset + len(ids)] = 1
        offsets.append(offset)
    return TokenBatch(tokens, mask, torch.tensor(starts) + torch.tensor(offsets))
