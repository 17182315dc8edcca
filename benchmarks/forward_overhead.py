"""Cost of running a reward model through pm_lens instead of plain Hugging Face.

pm_lens wraps a ``*ForSequenceClassification`` reward model as a TransformerLens
``HookedSAETransformer`` (``RewardModel``). This script measures what that costs, on a
SmolLM2-135M-sized random Llama reward model (30 layers, d_model 576, 9 heads, 3 KV heads),
float32 on CPU:

1. Build the HF model from a config (fixed seed) and convert it with ``RewardModel.from_hf``.
2. Check they compute the same thing: max |reward difference| on every input set.
3. Time, interleaved (HF, pm_lens, pm_lens without the attention fast path, HF, ...) after a
   warm-up so that machine noise hits all alike, and take the median of ``--repeats`` runs of
   (a) the forward pass under ``torch.no_grad`` and
   (b) forward + backward of the summed reward with respect to all parameters,
   on a full batch (all-ones mask) and on a right-padded batch.
4. Profile one forward of each with ``torch.profiler`` and time the model's components
   (embedding, norms, attention, MLP, head) with forward hooks, to show where extra time goes.
5. Optionally (``--variants``) time TransformerLens config options and calling patterns that
   might change the speed, against the same HF baseline.

pm_lens runs attention through one fused ``scaled_dot_product_attention`` call wherever that is
exact (no attention hook, cache, soft-cap or local window; ``pm_lens.model.attention``), as HF does;
the table times that, and one line under it gives the ratios with TransformerLens's own attention
(``rm.use_fast_attention = False``, the fast path's fallback).

How to read it: ``ratio`` is pm_lens / HF, the median over back-to-back pairs of runs; the
target is a ratio <= 1.10 (issue 11). Absolute seconds on a shared 2-core machine are noisy (the load
average is printed at the start and the end); the ratios are what to compare. In the profile
tables ``extra ms`` is pm_lens minus HF per forward, so the rows at the top are where pm_lens
loses time; a ``copy_`` of a weight-shaped tensor is a weight re-laid-out on every forward.

Run ``python benchmarks/forward_overhead.py --help`` for options; ``--quick`` smoke-tests the
script on a tiny model in seconds.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

from pm_lens.model.reward_model import RewardModel  # noqa: E402
from pm_lens.testing import tiny_hf_reward_model  # noqa: E402

ARCHITECTURE = "LlamaForSequenceClassification"
TARGET_RATIO = 1.10  # issue 11: forward and forward+backward

# SmolLM2-135M's shape (its real weights tie the embeddings; untied here, which changes nothing timed).
SMOLLM2_CONFIG = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=False,
)
QUICK_CONFIG = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=False,
)
PAD_TOKEN_ID = 0  # tiny_hf_reward_model's pad id; random tokens are drawn above it


@dataclass(frozen=True)
class Batch:
    """One input set: tokens (pad id at padded positions, as HF pooling expects) and its mask."""

    name: str
    tokens: Tensor
    attention_mask: Tensor


@dataclass(frozen=True)
class Models:
    hf: torch.nn.Module
    rm: RewardModel


# ----------------------------------------------------------------------------- setup


def build_models(config: dict, *, seed: int) -> Models:
    """The HF reward model (random init with ``seed``, float32, eval) and its pm_lens conversion."""
    hf = tiny_hf_reward_model(ARCHITECTURE, seed=seed, **config)
    rm = RewardModel.from_hf(hf)
    return Models(hf=hf, rm=rm)


def make_batches(*, vocab_size: int, batch: int, n_pos: int, seed: int) -> list[Batch]:
    """A full batch (all-ones mask) and the same tokens right-padded to random lengths."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(PAD_TOKEN_ID + 1, vocab_size, (batch, n_pos), generator=generator)
    full = Batch("full", tokens, torch.ones_like(tokens))
    lengths = torch.randint(n_pos // 2, n_pos + 1, (batch,), generator=generator)
    mask = (torch.arange(n_pos)[None, :] < lengths[:, None]).long()
    padded = Batch("right-padded", tokens.masked_fill(mask == 0, PAD_TOKEN_ID), mask)
    return [full, padded]


def hf_reward(hf: torch.nn.Module, batch: Batch) -> Tensor:
    return hf(batch.tokens, attention_mask=batch.attention_mask).logits[:, 0]


def tl_reward(rm: RewardModel, batch: Batch) -> Tensor:
    return rm.reward(batch.tokens, batch.attention_mask)


def tl_reward_without_fast_attention(rm: RewardModel, batch: Batch) -> Tensor:
    """pm_lens with TransformerLens's own attention in every layer (the fast path's fallback)."""
    rm.use_fast_attention = False
    try:
        return tl_reward(rm, batch)
    finally:
        rm.use_fast_attention = True


def max_reward_diff(models: Models, batch: Batch, reward_fn: Callable = tl_reward) -> tuple[float, float]:
    """Max |HF - pm_lens| reward difference, and the largest |reward| for scale."""
    with torch.no_grad():
        hf, tl = hf_reward(models.hf, batch), reward_fn(models.rm, batch)
    return (hf - tl).abs().max().item(), hf.abs().max().item()


# ----------------------------------------------------------------------------- timing


def forward_only(model: torch.nn.Module, reward_fn: Callable, batch: Batch) -> Callable[[], float]:
    """A timed forward under ``no_grad``; returns seconds."""

    def run() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            reward_fn(model, batch)
            return time.perf_counter() - start

    return run


def forward_backward(model: torch.nn.Module, reward_fn: Callable, batch: Batch) -> Callable[[], float]:
    """A timed forward + backward of the summed reward w.r.t. all parameters; returns seconds.

    Gradients are cleared (outside the timed region) so each run allocates them afresh.
    """

    def run() -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        reward_fn(model, batch).sum().backward()
        return time.perf_counter() - start

    return run


def interleaved_times(runs: dict[str, Callable[[], float]], *, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each run, calling them in turn (a, b, a, b, ...) after ``warmup`` rounds."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return times


def paired_summary(baseline: list[float], candidate: list[float]) -> dict[str, float]:
    """Median seconds of each, and the median of the ratios of runs made back to back.

    Load from other processes changes over seconds, so the ratio of neighbouring runs is
    steadier than the ratio of the two medians.
    """
    ratios = [c / b for b, c in zip(baseline, candidate)]
    return {"baseline": statistics.median(baseline), "candidate": statistics.median(candidate),
            "ratio": statistics.median(ratios)}


def time_table(models: Models, batches: list[Batch], *, repeats: int, warmup: int) -> pd.DataFrame:
    """HF vs pm_lens seconds and their ratio, for forward and forward+backward on each batch;
    ``TL-attention ratio`` and ``TL-attention max |dreward|`` are pm_lens without the fast path."""
    diffs = {batch.name: max_reward_diff(models, batch) for batch in batches}
    fallback_diffs = {b.name: max_reward_diff(models, b, tl_reward_without_fast_attention)[0] for b in batches}
    rows = []
    modes = {"forward (no_grad)": forward_only, "forward+backward": forward_backward}
    for mode, make_run in modes.items():
        for batch in batches:
            runs = {
                "HF": make_run(models.hf, hf_reward, batch),
                "pm_lens": make_run(models.rm, tl_reward, batch),
                "TL attention": make_run(models.rm, tl_reward_without_fast_attention, batch),
            }
            times = interleaved_times(runs, repeats=repeats, warmup=warmup)
            summary = paired_summary(times["HF"], times["pm_lens"])
            fallback = paired_summary(times["HF"], times["TL attention"])
            diff, scale = diffs[batch.name]
            rows.append({
                "pass": mode, "input": batch.name, "HF s": summary["baseline"], "pm_lens s": summary["candidate"],
                "ratio": summary["ratio"], "max |dreward|": diff, "max |reward|": scale,
                "TL-attention ratio": fallback["ratio"], "TL-attention max |dreward|": fallback_diffs[batch.name],
            })
    for model in (models.hf, models.rm):
        model.zero_grad(set_to_none=True)  # free the gradients before profiling
    table = pd.DataFrame(rows)
    table["target met"] = table["ratio"] <= TARGET_RATIO
    return table


# ----------------------------------------------------------------------------- profile


def profile_forward(run: Callable[[], object]) -> list:
    """torch.profiler events (with input shapes) of one warm forward, per aten op and shape."""
    with torch.no_grad():
        run()  # warm: first calls on new shapes pay one-off kernel set-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run()
    return [e for e in prof.key_averages(group_by_input_shape=True) if e.self_cpu_time_total > 0]


def per_op(events: list) -> pd.DataFrame:
    """Self CPU milliseconds and calls per op, all input shapes together."""
    rows = [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in events]
    return pd.DataFrame(rows).groupby("op").sum()


def op_comparison(hf_events: list, tl_events: list, *, top: int) -> pd.DataFrame:
    """Per-op self time in one forward, HF vs pm_lens, sorted by pm_lens's extra milliseconds."""
    table = per_op(hf_events).add_suffix(" HF").join(per_op(tl_events).add_suffix(" pm_lens"), how="outer")
    table = table.fillna(0)
    table["extra ms"] = table["ms pm_lens"] - table["ms HF"]
    total = table.sum(numeric_only=True).rename("(all ops)")
    table = table.sort_values("extra ms", ascending=False)
    shown = pd.concat([table.head(top), table.tail(3), total.to_frame().T])
    return shown[["ms HF", "calls HF", "ms pm_lens", "calls pm_lens", "extra ms"]].astype(
        {"calls HF": int, "calls pm_lens": int})


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def non_matmul_ops_by_shape(events: list, model: torch.nn.Module, batch: Batch, *, top: int) -> pd.DataFrame:
    """The most expensive non-matmul ops of one forward, by input shape, with what the shape looks like.

    A tensor whose dimensions are a weight's (in any order, heads flattened or not) is labelled
    "weight": copying one each forward is pure overhead. ``[batch, head, pos, pos]`` is "pattern".
    """
    weight_dims = set()
    for param in model.parameters():
        if param.ndim >= 2:
            weight_dims.add(tuple(sorted(param.shape)))
            weight_dims.add(tuple(sorted((param.shape[0] * param.shape[-1], *param.shape[1:-1]))))
            weight_dims.add(tuple(sorted((param.shape[0] * param.shape[1], *param.shape[2:]))))
    n_batch, n_pos = batch.tokens.shape

    def looks_like(shapes: list) -> str:
        first = tuple(shapes[0]) if shapes and shapes[0] else ()
        if tuple(sorted(first)) in weight_dims and first[:1] != (n_batch,):
            return "weight"
        if len(first) == 4 and first[0] == n_batch and first[2:] == (n_pos, n_pos):
            return "pattern"
        return "activation" if first else ""

    rows = [{"op": e.key, "first input": str(list(e.input_shapes[0])) if e.input_shapes else "",
             "looks like": looks_like(e.input_shapes), "ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in events if e.key not in MATMULS]
    return pd.DataFrame(rows).sort_values("ms", ascending=False).head(top).set_index(["op", "first input"])


# Which submodules make up each component, in each model (the rest is residual adds,
# masks, hook points, pooling and Python between modules).
HF_COMPONENTS = {"embed": ("embed_tokens",), "norms": ("input_layernorm", "post_attention_layernorm", "norm"),
                 "attention": ("self_attn", "rotary_emb"), "mlp": ("mlp",), "head": ("score",)}
TL_COMPONENTS = {"embed": ("embed",), "norms": ("ln1", "ln2", "ln_final"), "attention": ("attn",),
                 "mlp": ("mlp",), "head": ("unembed",)}


class ComponentClock:
    """Seconds spent in each component of a model during one call, measured with forward hooks.

    ``components`` maps a component to the last names of the submodules that make it up
    (``"mlp"`` matches every ``blocks.N.mlp``); a matching module inside another is not timed twice.
    """

    def __init__(self, model: torch.nn.Module, components: dict[str, tuple[str, ...]]):
        self.components = components
        kinds = {leaf: kind for kind, leaves in components.items() for leaf in leaves}
        timed = {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in kinds}
        self.seconds: dict[str, float] = defaultdict(float)
        self._starts: dict[int, float] = {}
        self._handles = []
        for name, module in timed.items():
            if not any(name.startswith(outer + ".") for outer in timed):
                kind = kinds[name.rsplit(".", 1)[-1]]
                self._handles.append(module.register_forward_pre_hook(self._start))
                self._handles.append(module.register_forward_hook(self._stopper(kind)))

    def _start(self, module: torch.nn.Module, *_: object) -> None:
        self._starts[id(module)] = time.perf_counter()

    def _stopper(self, kind: str) -> Callable:
        def stop(module: torch.nn.Module, *_: object) -> None:
            self.seconds[kind] += time.perf_counter() - self._starts.pop(id(module))

        return stop

    def measure(self, run: Callable[[], object]) -> dict[str, float]:
        """Component seconds of one call of ``run``; ``rest`` is the time outside all of them."""
        self.seconds.clear()
        start = time.perf_counter()
        with torch.no_grad():
            run()
        total = time.perf_counter() - start
        parts = {kind: self.seconds[kind] for kind in self.components}
        return parts | {"rest": total - sum(parts.values()), "total": total}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def component_comparison(models: Models, batch: Batch, *, repeats: int) -> pd.DataFrame:
    """Median milliseconds per component of a forward, HF and pm_lens measured interleaved."""
    clocks = {"HF": ComponentClock(models.hf, HF_COMPONENTS), "pm_lens": ComponentClock(models.rm, TL_COMPONENTS)}
    runs = {"HF": lambda: hf_reward(models.hf, batch), "pm_lens": lambda: tl_reward(models.rm, batch)}
    samples: dict[str, list[dict[str, float]]] = defaultdict(list)
    try:
        for i in range(repeats + 1):  # the first round is a warm-up
            for name, clock in clocks.items():
                parts = clock.measure(runs[name])
                if i > 0:
                    samples[name].append(parts)
    finally:
        for clock in clocks.values():
            clock.remove()
    table = pd.DataFrame({f"{name} ms": 1e3 * pd.DataFrame(rows).median() for name, rows in samples.items()})
    table["extra ms"] = table["pm_lens ms"] - table["HF ms"]
    table["ratio"] = table["pm_lens ms"] / table["HF ms"]
    return table


# ----------------------------------------------------------------------------- variants


def rm_with_cfg(rm: RewardModel, **cfg_overrides: object) -> RewardModel:
    """A copy of ``rm`` whose HookedTransformerConfig has ``cfg_overrides`` (same weights, same
    attention fast path setting; built afresh, as the modules read their config when built)."""
    cfg = HookedTransformerConfig(**(rm.cfg.to_dict() | cfg_overrides))
    variant = RewardModel(cfg, move_to_device=True)
    variant.load_state_dict(rm.state_dict())
    variant.use_fast_attention = rm.use_fast_attention
    variant.processing, variant.hf_architecture, variant.pad_token_id = rm.processing, rm.hf_architecture, rm.pad_token_id
    return variant.eval()


def variant_table(models: Models, batch: Batch, *, repeats: int, warmup: int) -> pd.DataFrame:
    """Forward seconds of pm_lens variants and of HF's eager attention, each against HF (SDPA)."""
    hf_eager = copy.deepcopy(models.hf)
    hf_eager.set_attn_implementation("eager")
    candidates: dict[str, Callable[[], float]] = {
        "pm_lens as is": forward_only(models.rm, tl_reward, batch),
        "pm_lens, use_fast_attention=False": forward_only(models.rm, tl_reward_without_fast_attention, batch),
        "pm_lens, mask omitted": forward_only(models.rm, lambda rm, b: rm.reward(b.tokens), batch),
        "pm_lens, ungroup_grouped_query_attention": forward_only(
            rm_with_cfg(models.rm, ungroup_grouped_query_attention=True), tl_reward, batch),
        "pm_lens, use_split_qkv_input": forward_only(
            rm_with_cfg(models.rm, use_split_qkv_input=True), tl_reward, batch),
        "HF, attn_implementation='eager'": forward_only(hf_eager, hf_reward, batch),
    }
    rows = []
    for name, run in candidates.items():
        times = interleaved_times({"HF": forward_only(models.hf, hf_reward, batch), name: run},
                                  repeats=repeats, warmup=warmup)
        summary = paired_summary(times["HF"], times[name])
        rows.append({"variant": name, "HF s": summary["baseline"], "variant s": summary["candidate"],
                     "ratio to HF": summary["ratio"]})
    return pd.DataFrame(rows).set_index("variant")


# ----------------------------------------------------------------------------- main


def print_profile(models: Models, batch: Batch, *, repeats: int, top: int) -> None:
    print(f"\nWhere the time goes: one forward (no_grad, '{batch.name}' batch)")
    print("\nComponents (forward hooks, median of runs; 'rest' = residual adds, masks, hooks, pooling):")
    print(component_comparison(models, batch, repeats=repeats).to_string())
    hf_events = profile_forward(lambda: hf_reward(models.hf, batch))
    tl_events = profile_forward(lambda: tl_reward(models.rm, batch))
    print("\nOps (torch.profiler, self CPU ms of one forward; sorted by pm_lens's extra ms over HF):")
    print(op_comparison(hf_events, tl_events, top=top).to_string())
    print("\npm_lens's most expensive ops other than matmuls, by input shape (same profile):")
    print(non_matmul_ops_by_shape(tl_events, models.rm, batch, top=top).to_string())
    print("\nHF's, for comparison:")
    print(non_matmul_ops_by_shape(hf_events, models.hf, batch, top=top // 2).to_string())


def load_note() -> str:
    """The 1-minute load average: above the CPU count, other processes slowed the timings."""
    load = os.getloadavg()[0]
    busy = (" (busy machine: other processes compete for the cores and can slow multi-threaded torch"
            " several-fold; ratios are less reliable, --threads 1 suffers least)") if load > 0.75 * os.cpu_count() else ""
    return f"load average {load:.1f}{busy}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before each measurement")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-pos", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokens")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch.get_num_threads())")
    parser.add_argument("--top", type=int, default=12, help="rows of the op-level profile tables")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile tables")
    parser.add_argument("--variants", action="store_true",
                        help="also time TransformerLens config options and calling patterns")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and batch (2 layers, d_model 64, 2 x 16 tokens) to smoke-test")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        config, args.batch, args.n_pos, args.repeats = QUICK_CONFIG, 2, 16, min(args.repeats, 3)
    else:
        config = SMOLLM2_CONFIG
    pd.set_option("display.width", 200)
    pd.set_option("display.float_format", lambda x: f"{x:.4g}")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs; "
          f"repeats {args.repeats} (median), warm-up {args.warmup}, interleaved HF / pm_lens / pm_lens without the fast path; {load_note()}")
    start = time.perf_counter()
    models = build_models(config, seed=args.seed)
    n_params = sum(p.numel() for p in models.hf.parameters())
    print(f"{ARCHITECTURE}: {config['num_hidden_layers']} layers, d_model {config['hidden_size']}, "
          f"{config['num_attention_heads']} heads / {config['num_key_value_heads']} KV heads, "
          f"{n_params / 1e6:.1f}M params, HF attention {models.hf.config._attn_implementation!r}; "
          f"built in {time.perf_counter() - start:.1f} s")
    batches = make_batches(vocab_size=config["vocab_size"], batch=args.batch, n_pos=args.n_pos, seed=args.seed)
    print(f"inputs: {args.batch} x {args.n_pos} random tokens; right-padded lengths "
          f"{batches[1].attention_mask.sum(-1).tolist()}\n")

    table = time_table(models, batches, repeats=args.repeats, warmup=args.warmup)
    fallback_columns = ["TL-attention ratio", "TL-attention max |dreward|"]
    print(table.drop(columns=fallback_columns).to_string(index=False))
    met = bool(table["target met"].all())
    print(f"\ntarget: pm_lens / HF <= {TARGET_RATIO}x -> {'met' if met else 'NOT met'} "
          f"(worst {table['ratio'].max():.2f}x: {table.loc[table['ratio'].idxmax(), 'pass']}, "
          f"{table.loc[table['ratio'].idxmax(), 'input']})")
    print("without the fast path (TransformerLens's attention, rm.use_fast_attention = False): "
          + "; ".join(f"{row['pass']} {row['input']} {row['TL-attention ratio']:.2f}x" for _, row in table.iterrows())
          + f"; max |dreward| {table['TL-attention max |dreward|'].max():.1e}")

    if not args.no_profile:
        print_profile(models, batches[0], repeats=args.repeats, top=args.top)
    if args.variants:
        print(f"\nVariants (forward, no_grad, '{batches[0].name}' batch; each interleaved with HF SDPA):")
        print(variant_table(models, batches[0], repeats=args.repeats, warmup=args.warmup).to_string())
    print(f"\ntotal {time.perf_counter() - start:.0f} s; {load_note()}")


if __name__ == "__main__":
    main()
