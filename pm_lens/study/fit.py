"""Checks of a ``pm-lens run`` config against the model folder's own config, before the model
loads: the token limit against the model's context, and each SAE's hook and width against the
model's layers and widths. Loading a 7B PM takes minutes; a typo in a layer number should not."""

from __future__ import annotations

import re
from typing import Any

from pm_lens.study.config import RunConfig

# Hooks (after ``blocks.N.``) whose activation has d_model values, d_mlp values, or one vector per head.
RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
            "ln1.hook_normalized", "ln2.hook_normalized")
MLP = ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear")


def model_fields(path: str) -> dict[str, Any]:
    """The TransformerLens config fields of the reward-model folder ``path`` (its ``config.json``
    alone), with the context pm_lens will give it."""
    from transformers import AutoConfig

    from pm_lens.model.architectures import DEFAULT_MAX_N_CTX, spec_for
    from pm_lens.model.reward_model import _classifier_name

    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    fields = spec_for(_classifier_name(hf_config)).tl_config(hf_config)
    fields["n_ctx"] = min(fields["n_ctx"], DEFAULT_MAX_N_CTX)
    return fields


def check_context(config: RunConfig, fields: dict[str, Any]) -> None:
    """Refuse a token limit the model cannot run."""
    if config["pairs.max_tokens"] > fields["n_ctx"]:
        raise ValueError(f"pairs.max_tokens = {config['pairs.max_tokens']} exceeds the context of the model at "
                         f"{config['model.path']!r} ({fields['n_ctx']} tokens); set pairs.max_tokens <= {fields['n_ctx']}")


def hook_width(fields: dict[str, Any], hook_name: str) -> tuple[int | None, str]:
    """How many values the activation at ``hook_name`` has (None: a hook this check does not
    know, left to the check after loading), and in words why. Raises for a layer the model lacks."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    if match is None:
        return None, ""
    layer, rest, n_layers = int(match.group(1)), match.group(2), fields["n_layers"]
    if layer >= n_layers:
        raise ValueError(f"the model has {n_layers} layers (blocks.0 to blocks.{n_layers - 1}), not blocks.{layer}")
    if rest in RESIDUAL:
        return fields["d_model"], f"d_model = {fields['d_model']}"
    if rest in MLP:
        return fields["d_mlp"], f"d_mlp = {fields['d_mlp']}"
    if rest == "attn.hook_z":
        return fields["n_heads"] * fields["d_head"], f"n_heads x d_head = {fields['n_heads']} x {fields['d_head']}"
    return None, ""


def check_saes_fit(fields: dict[str, Any], saes: list[Any], sources: list[str]) -> None:
    """Refuse an SAE whose hook the model does not have or whose width is not the activation's."""
    for sae, source in zip(saes, sources):
        hook = sae.cfg.metadata.hook_name
        try:
            width, why = hook_width(fields, hook)
        except ValueError as err:
            raise ValueError(f"saes.sources: {source!r} reads {hook}, but {err}") from None
        if width is not None and sae.cfg.d_in != width:
            raise ValueError(f"saes.sources: {source!r} has d_in = {sae.cfg.d_in} but the activation at {hook} has "
                             f"{width} values ({why}): the SAE was trained on another model")


def check_train_hooks(fields: dict[str, Any], hooks: list[str]) -> None:
    """Refuse ``saes.train`` hook points in layers the model does not have."""
    for hook in hooks:
        try:
            hook_width(fields, hook)
        except ValueError as err:
            raise ValueError(f"saes.train: {hook!r} is not a hook point of this model: {err}") from None
