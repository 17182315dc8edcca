"""The demo preference model: SmolLM2's body with a reward head, trained on planted preferences.

The embedded default PM is SmolLM2-135M-Instruct whose last ``n_trained`` (2) layers, final norm
and a new ``[d_model, 1]`` score head were trained with the Bradley-Terry loss
``-log sigmoid(r(chosen) - r(rejected))`` on the training split of :mod:`pm_lens.data.planted`.
Training can also fit low-rank updates (LoRA, rank ``lora_rank``) of every linear layer of the
``lora_layers`` layers below them (the shipped PM: rank 8 on layers 23-27); they are saved as
``<module>.lora_A``/``lora_B`` and folded into the weights on loading. The trained weights ship in
``pm_lens/assets/demo_pm.safetensors`` (float16); this module loads them
(:func:`demo_reward_model`) and reproduces them (:func:`train_demo_pm`, run by
``scripts/train_demo_pm.py``). Layers up to 22 stay SmolLM2's own: the demo SAEs at blocks 15
and 22 read the pretrained residual stream, the one at block 27 the stream after the adapted
layers 23-27 (where the PM's own reading of the planted attributes is), so a retrained PM needs
that SAE retrained too (``scripts/train_demo_saes.py --hooks blocks.27.hook_resid_post``).

Training steps:
1. SmolLM2 as a ``LlamaForSequenceClassification`` with an untrained head; the planted dataset;
2. the frozen lower layers run once over every text (right-padded, so every real position is
   exact), keeping the hidden state entering the first trained (or adapted) layer;
3. the trained layers, low-rank factors, final norm and head are fitted on those states with
   AdamW, seeded, batches of pairs drawn from a seeded generator, for ``epochs`` epochs;
4. the trained weights are saved as float16 safetensors (atomically).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.data import PreferencePair, encode_completions
from pm_lens.io import write_atomic
from pm_lens.model.reward_model import RewardModel

DEMO_PM_FILE = Path(__file__).parent / "assets" / "demo_pm.safetensors"
DEMO_SAES_DIR = Path(__file__).parent / "assets" / "demo_saes"
DEMO_SAE_HOOKS = ("blocks.15.hook_resid_post", "blocks.22.hook_resid_post", "blocks.27.hook_resid_post")


def demo_reward_model(*, cache_dir: str | Path | None = None, device: str | None = None,
                      dtype: torch.dtype | None = None) -> RewardModel:
    """The embedded default PM as a :class:`~pm_lens.RewardModel` (SmolLM2 + the shipped weights).

    The first call converts and caches SmolLM2 (~30 s, see :mod:`pm_lens.model.smollm2`)."""
    from pm_lens.model.smollm2 import smollm2_reward_model

    if not DEMO_PM_FILE.exists():
        raise FileNotFoundError(f"the demo PM weights are missing at {DEMO_PM_FILE}; run scripts/train_demo_pm.py")
    weights = {k: v.float() for k, v in load_file(str(DEMO_PM_FILE)).items()}
    return smollm2_reward_model(weights, cache_dir=cache_dir, device=device, dtype=dtype)


def export_demo_pm(folder: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """Write the demo PM as a Hugging Face reward-model folder (``save_pretrained`` of its
    ``LlamaForSequenceClassification`` and tokenizer, float32), so that the whole study can be
    tried on a real PM folder: ``pm-lens run --model FOLDER --saes demo-saes...`` or
    ``RewardModel.from_pretrained(FOLDER)``. Its SAEs are folders under ``DEMO_SAES_DIR``."""
    from pm_lens.model.smollm2 import smollm2_hf_reward_model

    if not DEMO_PM_FILE.exists():
        raise FileNotFoundError(f"the demo PM weights are missing at {DEMO_PM_FILE}; run scripts/train_demo_pm.py")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.float() for k, v in load_file(str(DEMO_PM_FILE)).items()}
    hf_model, tokenizer = smollm2_hf_reward_model(weights, cache_dir=cache_dir)
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def demo_saes(*, device: str | None = None, dtype: torch.dtype | str = torch.float32) -> list[Any]:
    """The demo PM's shipped SAEs at :data:`DEMO_SAE_HOOKS` (middle and late pretrained residual
    stream, and after the adapted layers; top-k, trained on completion tokens by
    ``scripts/train_demo_saes.py``, shipped in float16), loaded in ``dtype`` (the demo PM's
    float32 by default)."""
    from pm_lens.saes import load_sae

    return [load_sae(DEMO_SAES_DIR / hook, device=device, dtype=dtype) for hook in DEMO_SAE_HOOKS]


@dataclass(frozen=True)
class _Texts:
    """Hidden states entering the first trained layer, one ``[pos, d_model]`` tensor per text."""

    chosen: list[Tensor]
    rejected: list[Tensor]


def train_demo_pm(
    pairs: Sequence[PreferencePair],
    *,
    n_trained: int = 2,
    lora_layers: int = 5,
    lora_rank: int = 8,
    epochs: int = 3,
    batch_pairs: int = 16,
    lr: float = 1e-4,
    head_lr: float = 1e-3,
    lora_lr: float = 5e-4,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Train the demo PM on ``pairs``; returns the trained weights (float32, classifier keys, and
    ``<module>.lora_A``/``lora_B`` for the low-rank updates of the ``lora_layers`` layers below the
    ``n_trained`` last ones)."""
    from pm_lens.model.smollm2 import smollm2_hf_reward_model

    torch.manual_seed(seed)
    model, tokenizer = smollm2_hf_reward_model(None, cache_dir=cache_dir, seed=seed)
    with torch.no_grad():
        model.score.weight.zero_()
    first = model.config.num_hidden_layers - n_trained
    adapted = first - lora_layers
    if not 0 <= adapted <= first:
        raise ValueError(f"n_trained={n_trained} and lora_layers={lora_layers} need 0..{model.config.num_hidden_layers} layers")
    states = _lower_states(model, tokenizer, pairs, first=adapted, progress=progress)
    trained = _trained_parameters(model, first)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in trained.values():
        param.requires_grad_(True)
    factors = _add_low_rank(model, range(adapted, first), rank=lora_rank, generator=torch.Generator().manual_seed(seed))
    head = [p for name, p in trained.items() if name.startswith("score")]
    body = [p for name, p in trained.items() if not name.startswith("score")]
    optimizer = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr},
                                   {"params": list(factors.values()), "lr": lora_lr}], weight_decay=0.0)
    steps = epochs * math.ceil(len(pairs) / batch_pairs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="training the demo PM", disable=not progress)
    with _top_layers(model, adapted):
        model.train()
        for _ in range(epochs):
            for rows in torch.randperm(len(pairs), generator=generator).split(batch_pairs):
                chosen = _rewards(model, [states.chosen[i] for i in rows])
                rejected = _rewards(model, [states.rejected[i] for i in rows])
                loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
    bar.close()
    return {name: p.detach().clone() for name, p in (trained | factors).items()}


def save_demo_pm(weights: dict[str, Tensor], path: str | Path = DEMO_PM_FILE) -> None:
    """Write trained weights as float16 safetensors (atomically)."""
    write_atomic(path, save({k: v.to(torch.float16).contiguous() for k, v in weights.items()}))


def _trained_parameters(model: torch.nn.Module, first: int) -> dict[str, torch.nn.Parameter]:
    prefixes = tuple(f"model.layers.{i}." for i in range(first, model.config.num_hidden_layers))
    return {name: p for name, p in model.named_parameters()
            if name.startswith(prefixes) or name in ("model.norm.weight", "score.weight")}


class _LowRank(torch.nn.Module):
    """``W + B @ A`` (a ``torch.nn.utils.parametrize`` parametrization of a linear weight); ``B``
    starts at zero, so training starts from the pretrained model."""

    def __init__(self, d_out: int, d_in: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(rank, d_in, generator=generator) / d_in**0.5)
        self.B = torch.nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.B @ self.A


LOW_RANK_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _add_low_rank(model: Any, layers: range, *, rank: int, generator: torch.Generator) -> dict[str, torch.nn.Parameter]:
    """Parametrize every linear weight of ``layers`` as ``W + B @ A``; the factors by their
    saved names (``model.layers.<i>.<module>.lora_A`` / ``lora_B``)."""
    from torch.nn.utils import parametrize

    factors = {}
    for i in layers:
        for name in LOW_RANK_MODULES:
            linear = model.model.layers[i].get_submodule(name)
            low_rank = _LowRank(*linear.weight.shape, rank, generator)
            parametrize.register_parametrization(linear, "weight", low_rank)
            factors[f"model.layers.{i}.{name}.lora_A"] = low_rank.A
            factors[f"model.layers.{i}.{name}.lora_B"] = low_rank.B
    return factors


class _Stop(Exception):
    pass


@torch.no_grad()
def _lower_states(model: Any, tokenizer: Any, pairs: Sequence[PreferencePair], *, first: int,
                  progress: bool, batch_size: int = 16) -> _Texts:
    """Run the frozen layers below ``first`` once per text and keep their output per text."""
    captured: list[Tensor] = []

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = model.model.layers[first].register_forward_pre_hook(grab, with_kwargs=True)
    out: dict[str, list[Tensor]] = {"chosen": [], "rejected": []}
    try:
        for start in tqdm(range(0, len(pairs), batch_size), desc="running the frozen layers", disable=not progress):
            part = pairs[start : start + batch_size]
            for side in ("chosen", "rejected"):
                batch = encode_completions(tokenizer, [p.prompt for p in part], [getattr(p, side) for p in part],
                                           max_len=2048)
                try:
                    model.model(input_ids=batch.tokens, attention_mask=batch.attention_mask)
                except _Stop:
                    pass
                hidden = captured.pop()
                out[side].extend(hidden[i, : int(n)].clone() for i, n in enumerate(batch.attention_mask.sum(-1)))
    finally:
        handle.remove()
    return _Texts(out["chosen"], out["rejected"])


class _top_layers:
    """Run only the layers from ``first`` on: the body's layer list is cut for the duration."""

    def __init__(self, model: Any, first: int) -> None:
        self.body, self.first = model.model, first

    def __enter__(self) -> None:
        self.layers = self.body.layers
        self.body.layers = torch.nn.ModuleList(list(self.layers)[self.first :])

    def __exit__(self, *exc: Any) -> None:
        self.body.layers = self.layers


def _rewards(model: Any, states: list[Tensor]) -> Tensor:
    """Rewards of texts given their hidden states entering the first trained layer (right-padded)."""
    lengths = torch.tensor([len(s) for s in states])
    hidden = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
    mask = (torch.arange(hidden.shape[1])[None] < lengths[:, None]).long()
    out = model.model(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
    return model.score(out[torch.arange(len(states)), lengths - 1])[:, 0]
