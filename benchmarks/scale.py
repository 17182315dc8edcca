"""How ``pm-lens run`` scales: pairs, model size, and the study's setting on one 80 GB GPU.

Three measurements, each in a fresh subprocess (peak memory is the child's own high-water mark,
``VmHWM`` minus its resident size after imports):

(a) ``sizes``: wall time and peak memory of ``pm-lens run`` on 100, 1,000 and 5,000 pairs on a
    small model folder (tiny Llama, one SAE): time should grow linearly, memory stay flat.
(b) ``load``: peak memory of ``RewardModel.from_pretrained`` on a >= 1B-parameter checkpoint
    (random weights, Llama-3-8B widths, a few layers, saved in bfloat16) relative to the weights'
    size: target <= 1.3x. The whole-model path (``stream=False``) is measured beside it.
(c) ``project``: per-token costs measured on such a slice (forward, forward+backward through
    SAE-sized hooks, one 32k-feature SAE's encode/decode with its backward), then the projected
    time and memory of the study's setting (7B PM, 6 SAEs x 32k features, 2,000 pairs of <= 500
    tokens) on one 80 GB GPU, printed as a calculation. Run it with ``--device cuda`` on a GPU:
    on a CPU the same calculation projects a CPU run.

    python benchmarks/scale.py sizes [--sizes 100,1000,5000]
    python benchmarks/scale.py load [--layers 3] [--device cpu] [--no-compare]
    python benchmarks/scale.py project [--device cuda] [--layers 2]
    python benchmarks/scale.py wide-run [--device cuda] [--layers 4] [--pairs 32]   # (d) a short real run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve()
GiB = 2**30

# Llama-3-8B's widths: what a 7-8B PM looks like layer by layer.
WIDE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
            vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5)
STUDY = dict(n_layers=32, sae_layers=6, d_sae=32768, pairs=2000, tokens=500, candidates=8552, gpu_gib=80)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(args: list[str]) -> dict:
    """Run this file with ``args`` in a fresh interpreter; its last stdout line is JSON."""
    done = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- (a) sizes --------------------------------------------------------------------------------

PROMPTS = ["What is the capital of France?", "How do I boil an egg?", "Name a primary colour.", "What is 12 * 12?",
           "Can you recommend a book?", "How far is the moon?"]
GOOD = ["Paris, my pleasure!", "Simmer it gently for nine minutes.", "Red. You're welcome.", "144, happy to help.",
        "Try Middlemarch; thank you for asking.", "About 384,000 km."]
BAD = ["I don't know.", "See http://example.com/answers", "Go away.", "I don't know. I don't know.", "No idea, sorry.",
       "Whatever."]


def make_study_files(folder: Path, n_pairs: int) -> dict[str, Path]:
    """A small reward-model folder, an SAE folder and ``n_pairs`` HH-layout pairs in ``folder``."""
    import torch

    from pm_lens import RewardModel
    from pm_lens.data import PreferencePair, encode_pairs
    from pm_lens.testing import char_tokenizer, sparse_sae_for, tiny_hf_reward_model

    model_dir, sae_dir = folder / "pm", folder / "sae"
    if not model_dir.exists():
        tokenizer = char_tokenizer()
        tiny_hf_reward_model(num_hidden_layers=4, hidden_size=64, intermediate_size=128).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        rm = RewardModel.from_pretrained(model_dir)
        pairs = [PreferencePair(p, g, b) for p, g, b in zip(PROMPTS, GOOD, BAD)]
        tokens = encode_pairs(rm.tokenizer, pairs, max_len=256).chosen.tokens
        torch.manual_seed(0)
        sparse_sae_for(rm, "blocks.1.hook_resid_post", tokens, d_sae=512, fire_rate=0.05).save_model(str(sae_dir))
    rng = random.Random(n_pairs)
    pairs_path = folder / f"pairs-{n_pairs}.jsonl"
    with pairs_path.open("w") as f:
        for i in range(n_pairs):
            prompt = f"{rng.choice(PROMPTS)} #{i}"
            good, bad = rng.choice(GOOD), " ".join(rng.choice(BAD) for _ in range(rng.randint(1, 2)))
            f.write(json.dumps({"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {good}",
                                "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {bad}"}) + "\n")
    return dict(model=model_dir, sae=sae_dir, pairs=pairs_path)


def child_run(folder: str, n_pairs: int, light: bool = False) -> dict:
    from pm_lens.study.config import load_config
    from pm_lens.study.run import run_study

    files = make_study_files(Path(folder), n_pairs)
    out = Path(folder) / f"out-{n_pairs}"
    config = load_config(None, {"model.path": str(files["model"]), "pairs.path": str(files["pairs"]),
                                "pairs.k": n_pairs, "pairs.max_tokens": 128, "saes.sources": [str(files["sae"])],
                                "run.out": str(out), "run.shard_pairs": 100,
                                **({"attribution.confirm_top": 3, "attribution.fidelity_top": 5, "attribution.n_random": 5}
                                   if light else {})})
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    result = run_study(config, progress=False)
    wall = time.perf_counter() - start
    return {"pairs": n_pairs, "wall_s": wall, "peak_mib": (_rss_kib("VmHWM") - base) / 1024,
            "timings": result.timings, "tokens": int(result.selection.tokens.sum() * 2)}


def sizes(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in map(int, args.sizes.split(",")):
            rows.append(_child(["_run", folder, str(n), "light" if args.light else ""]))
            r = rows[-1]
            print(f"  {r['pairs']:>5} pairs: {r['wall_s']:7.1f} s, peak +{r['peak_mib']:6.0f} MiB", flush=True)
    nodes = "16 nodes ablated per pair (--light)" if args.light else "up to 120 nodes ablated per pair (defaults)"
    print(f"\n(a) pm-lens run on a small model (4 layers, d_model 64, one SAE of 512 features, shards of 100 pairs, "
          f"{nodes})")
    print(f"{'pairs':>6} {'wall s':>8} {'s/pair':>8} {'select':>7} {'attrib':>7} {'confirm':>8} {'peak MiB':>9}")
    for r in rows:
        t = r["timings"]
        print(f"{r['pairs']:>6} {r['wall_s']:8.1f} {r['wall_s'] / r['pairs']:8.4f} {t.get('select', 0):7.1f} "
              f"{t.get('attribute', 0):7.1f} {t.get('confirm', 0):8.1f} {r['peak_mib']:9.0f}")
    first, last = rows[0], rows[-1]
    print(f"time per pair, largest / smallest run: {last['wall_s'] / last['pairs'] / (first['wall_s'] / first['pairs']):.2f} "
          f"(1.0 = linear); peak memory, largest / smallest: {last['peak_mib'] / first['peak_mib']:.2f} (1.0 = flat)")


# ---- (b) load ---------------------------------------------------------------------------------

def write_wide_checkpoint(folder: Path, n_layers: int) -> int:
    """A Llama reward-model folder of ``n_layers`` layers at 8B widths, random bf16 weights, one
    safetensors file written tensor by tensor; returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pm_lens.testing import char_tokenizer

    config = LlamaConfig(**WIDE, num_hidden_layers=n_layers, num_labels=1, pad_token_id=0,
                         architectures=["LlamaForSequenceClassification"])
    with torch.device("meta"):
        model = LlamaForSequenceClassification(config)
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, param in model.state_dict().items():
        weights[name] = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(param.shape, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return sum(w.numel() for w in weights.values())


def child_load(folder: str, dtype: str, device: str, stream: str) -> dict:
    import torch

    from pm_lens import RewardModel

    cuda = device.startswith("cuda")
    base = _rss_kib("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rm = RewardModel.from_pretrained(folder, dtype=dtype, device=device, stream=stream == "stream")
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in rm.parameters())
    tokens = torch.tensor([[5, 6, 7, 8, 9]], device=device)
    reward = float(rm.reward(tokens)[0])
    return {"seconds": seconds, "weights_bytes": weights, "params": sum(p.numel() for p in rm.parameters()),
            "cpu_peak_bytes": (_rss_kib("VmHWM") - base) * 1024, "reward": reward,
            "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def load(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        n_params = write_wide_checkpoint(Path(folder), args.layers)
        print(f"(b) loading a {n_params / 1e9:.2f}B-parameter reward model ({args.layers} layers at Llama-3-8B widths, "
              f"bf16 safetensors) as {args.dtype} on {args.device}")
        routes = ["stream"] + ([] if args.no_compare else ["whole"])
        results = {}
        for route in routes:
            r = results[route] = _child(["_load", folder, args.dtype, args.device, route])
            where = "GPU" if r["gpu_peak_bytes"] is not None else "CPU"
            peak = r["gpu_peak_bytes"] if r["gpu_peak_bytes"] is not None else r["cpu_peak_bytes"]
            extra = f"; CPU peak {r['cpu_peak_bytes'] / r['weights_bytes']:.2f}x" if where == "GPU" else ""
            print(f"  {route:>6}: weights {r['weights_bytes'] / GiB:.2f} GiB, {where} peak {peak / GiB:.2f} GiB = "
                  f"{peak / r['weights_bytes']:.2f}x the weights{extra}; {r['seconds']:.1f} s; reward {r['reward']:.4f}")
        if "whole" in results:
            same = abs(results["stream"]["reward"] - results["whole"]["reward"])
            print(f"  streamed and whole-model rewards differ by {same:.2e}")
        print("  target: streamed peak <= 1.3x the weights")


# ---- (c) project ------------------------------------------------------------------------------

def _timed(fn, device: str, repeats: int = 3) -> float:
    import torch

    fn()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def child_project(folder: str, device: str, dtype: str, n_tokens: int) -> dict:
    """Per-token costs on the slice: forward, forward+backward to every layer's residual (what
    attribution does), one 32k-feature SAE encode/decode with backward, activation memory."""
    import torch

    from pm_lens import RewardModel

    cuda = device.startswith("cuda")
    rm = RewardModel.from_pretrained(folder, dtype=dtype, device=device)
    n_layers = rm.cfg.n_layers
    tokens = torch.randint(4, 90, (1, n_tokens), device=device)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]

    def forward():
        with torch.no_grad():
            rm.reward(tokens)

    def forward_backward():
        kept = []

        def leaf(x, hook):  # the weights are frozen: gradients flow from the embedding on
            return x.detach().requires_grad_(True)

        def keep(x, hook):
            x.retain_grad()
            kept.append(x)
            return x
        with torch.enable_grad():
            reward = rm.run_with_hooks(tokens, fwd_hooks=[("hook_embed", leaf)] + [(h, keep) for h in hooks])[0, -1, 0]
            reward.backward()

    for p in rm.parameters():
        p.requires_grad_(False)
    t_forward = _timed(forward, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t_fb = _timed(forward_backward, device)
    act_bytes = (torch.cuda.max_memory_allocated() - before) if cuda else None
    d_model, d_sae = rm.cfg.d_model, STUDY["d_sae"]
    W_enc = torch.randn(d_model, d_sae, device=device, dtype=rm.cfg.dtype) * 0.01
    W_dec = torch.randn(d_sae, d_model, device=device, dtype=rm.cfg.dtype) * 0.01
    x = torch.randn(n_tokens, d_model, device=device, dtype=rm.cfg.dtype, requires_grad=True)

    def sae():
        acts = torch.relu(x @ W_enc)
        acts.retain_grad()
        (acts @ W_dec).sum().backward()
        (acts.grad * acts).float().sum()  # attribution: gradient x activation, every feature

    t_sae = _timed(sae, device)
    return {"n_layers": n_layers, "tokens": n_tokens, "forward_s": t_forward, "forward_backward_s": t_fb,
            "sae_s": t_sae, "act_bytes": act_bytes, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "weights_bytes": sum(p.numel() * p.element_size() for p in rm.parameters()),
            "embed_bytes": rm.W_E.numel() * rm.W_E.element_size()}


def project(args: argparse.Namespace) -> None:
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        write_wide_checkpoint(Path(folder), args.layers)
        small = _child(["_project", folder, args.device, dtype, str(args.tokens)])
        write_wide_checkpoint(Path(folder), args.layers * 2)
        large = _child(["_project", folder, args.device, dtype, str(args.tokens)])
    s = STUDY
    # Per layer and token: the difference between the 2L- and L-layer slices (embedding and head cancel).
    dl = large["n_layers"] - small["n_layers"]
    per = {key: (large[key] - small[key]) / dl / args.tokens for key in ("forward_s", "forward_backward_s")}
    fixed = {key: max(small[key] - per[key] * small["n_layers"] * args.tokens, 0.0) / args.tokens
             for key in ("forward_s", "forward_backward_s")}
    sae_token = small["sae_s"] / args.tokens
    L = s["n_layers"]
    fwd_token = per["forward_s"] * L + fixed["forward_s"]
    fb_token = per["forward_backward_s"] * L + fixed["forward_backward_s"] + s["sae_layers"] * sae_token
    select_tokens = s["candidates"] * 2 * s["tokens"] * 0.5  # HH pairs average about half the limit
    study_tokens = s["pairs"] * 2 * s["tokens"]
    # Confirmation: per pair, one clean forward, then each of ~2*confirm_top + fidelity_top + n_random
    # nodes (120 by default) restarted at its hook's layer; upper bound: every node over every position
    # from its layer on (the engine recomputes only positions from the first changed one).
    nodes, mean_rest = 120, (L - L // 2)
    t_select = select_tokens * fwd_token
    t_attr = study_tokens * fb_token
    t_confirm_upper = study_tokens * (fwd_token + nodes * per["forward_s"] * mean_rest)
    print(f"(c) projection for the study's setting on one GPU, from costs measured on {small['device']} ({dtype}):")
    print(f"  measured per token: forward {per['forward_s'] * 1e6:.1f} us/layer (+{fixed['forward_s'] * 1e6:.1f} us "
          f"embedding and head), forward+backward to every layer's residual {per['forward_backward_s'] * 1e6:.1f} "
          f"us/layer, one {s['d_sae']}-feature SAE encode+decode+backward+attribution {sae_token * 1e6:.1f} us "
          f"(slices of {small['n_layers']} and {large['n_layers']} layers, {args.tokens} tokens)")
    print(f"  7B PM = {L} layers of these widths: forward {fwd_token * 1e3:.3f} ms/token, attribution "
          f"(forward+backward + {s['sae_layers']} SAEs) {fb_token * 1e3:.3f} ms/token")
    print(f"  selection: {s['candidates']} HH pairs x 2 sides x ~{s['tokens'] // 2} tokens = {select_tokens:.3g} tokens "
          f"x {fwd_token * 1e3:.3f} ms = {t_select / 60:.1f} min")
    print(f"  attribution: {s['pairs']} pairs x 2 x {s['tokens']} = {study_tokens:.3g} tokens x {fb_token * 1e3:.3f} ms "
          f"= {t_attr / 60:.1f} min")
    print(f"  confirmation (upper bound): {study_tokens:.3g} tokens x ({fwd_token * 1e3:.3f} ms clean + {nodes} nodes x "
          f"{mean_rest} layers x {per['forward_s'] * 1e6:.1f} us) = {t_confirm_upper / 60:.1f} min")
    print(f"  total: {(t_select + t_attr + t_confirm_upper) / 3600:.2f} h at most "
          f"({(t_select + t_attr) / 3600:.2f} h before confirmation)")
    weights = (small["weights_bytes"] - small["embed_bytes"]) / small["n_layers"] * L + small["embed_bytes"]
    sae_bytes = s["sae_layers"] * 2 * s["d_sae"] * 4096 * 2  # encoder + decoder, bf16
    if small["act_bytes"] is not None:
        act_token = (large["act_bytes"] - small["act_bytes"]) / dl / args.tokens
        act_fixed = max(small["act_bytes"] - act_token * small["n_layers"] * args.tokens, 0) / args.tokens
        batch_tokens = 4096
        acts = (act_token * L + act_fixed) * batch_tokens
        sae_acts = s["sae_layers"] * s["d_sae"] * 4 * 3 * batch_tokens  # acts, grads, products in float32
        total = weights + sae_bytes + acts + sae_acts
        print(f"  memory (batch of {batch_tokens} tokens): weights {weights / GiB:.1f} GiB + SAEs {sae_bytes / GiB:.1f} "
              f"GiB + activations kept for backward {act_token / 1024:.1f} KiB/token/layer x {L} x {batch_tokens} = "
              f"{acts / GiB:.1f} GiB + SAE activations and gradients {sae_acts / GiB:.1f} GiB = {total / GiB:.1f} GiB "
              f"of {s['gpu_gib']} GiB")
    else:
        print(f"  memory: weights {weights / GiB:.1f} GiB + SAEs {sae_bytes / GiB:.1f} GiB; activation memory is "
              "measured on a GPU only (run with --device cuda)")


# ---- (d) a short real run at real widths ----------------------------------------------------

def child_wide_run(folder: str, device: str, dtype: str, n_layers: int, n_pairs: int, d_sae: int) -> dict:
    """``pm-lens run`` on a slice of ``n_layers`` layers at Llama-3-8B widths with one ``d_sae``-feature
    SAE (random, made sparse on the slice's activations) and ``n_pairs`` short HH pairs."""
    import torch

    from pm_lens import PreferencePair, RewardModel
    from pm_lens.data import encode_pairs
    from pm_lens.study.config import load_config
    from pm_lens.study.run import run_study
    from pm_lens.testing import sparse_sae_for

    root = Path(folder)
    write_wide_checkpoint(root / "pm", n_layers)
    files = make_study_files(root / "small", n_pairs)  # only its pairs file is used
    hook = f"blocks.{n_layers // 2}.hook_resid_post"
    rm = RewardModel.from_pretrained(root / "pm", device=device, dtype="float32" if device == "cpu" else dtype)
    sample = [PreferencePair(p, g, b) for p, g, b in zip(PROMPTS, GOOD, BAD)]
    tokens = encode_pairs(rm.tokenizer, sample, max_len=128).chosen.tokens.to(device)
    sparse_sae_for(rm, hook, tokens, d_sae=d_sae, fire_rate=0.01).to("cpu").save_model(str(root / "sae"))
    del rm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = load_config(None, {"model.path": str(root / "pm"), "model.device": device, "model.dtype": dtype,
                                "pairs.path": str(files["pairs"]), "pairs.k": n_pairs, "pairs.max_tokens": 128,
                                "saes.sources": [str(root / "sae")], "run.out": str(root / "out"),
                                "run.shard_pairs": max(1, n_pairs // 2)})
    start = time.perf_counter()
    result = run_study(config, progress=False)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "timings": result.timings, "forward_passes": result.forward_passes["total"],
            "pairs": n_pairs, "tokens": int(result.selection.tokens.sum() * 2),
            "gpu_peak_gib": torch.cuda.max_memory_allocated() / GiB if device.startswith("cuda") else None,
            "top": result.features.head(3)[["node", "estimated_margin_effect", "exact_margin_effect"]].to_dict("records"),
            "dtype": json.loads((root / "out" / "fidelity.json").read_text())["settings"]["dtype"]}


def wide_run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        r = _child(["_wide", folder, args.device, args.dtype, str(args.layers), str(args.pairs), str(args.d_sae)])
    print(f"(d) pm-lens run, {args.layers} layers at Llama-3-8B widths, one SAE of {args.d_sae} features, {r['pairs']} "
          f"pairs ({r['tokens']} tokens), {args.dtype} on {args.device}: {r['wall_s']:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in r['timings'].items())}); forward passes {r['forward_passes']}; "
          f"card dtype {r['dtype']}" + (f"; GPU peak {r['gpu_peak_gib']:.1f} GiB" if r["gpu_peak_gib"] else ""))
    for row in r["top"]:
        print(f"  {row['node']}: estimated {row['estimated_margin_effect']:+.4f}, exact {row['exact_margin_effect']:+.4f}")


# ---- memory plan (issue 13) ---------------------------------------------------------------

# Widths of common reward-model bodies: (name, n_layers, d_model, d_mlp, vocab, parameters).
BODIES = (("7B (Mistral-7B)", 32, 4096, 14336, 32000, 7.2e9), ("27B (Gemma-2-27B)", 46, 4608, 36864, 256000, 27.2e9),
          ("70B (Llama-3-70B)", 80, 8192, 28672, 128256, 70.6e9))
# Activations kept for the backward pass, per token and layer, measured on an H200 in bf16 at
# Llama-3-8B widths (d_model 4096, d_mlp 14336): benchmarks/results/gpu_check_h200.log, (c).
MEASURED_ACT_BYTES = 176.1 * 1024
MEASURED_WIDTH = 4096 + 14336


def plan(args: argparse.Namespace) -> None:
    """Memory of one attribution batch for 7B/27B/70B PMs with 6 SAEs of 32k-131k features."""
    print(f"memory plan: bf16 weights, 6 SAEs (bf16 encoder + decoder), a batch of {args.batch_tokens} tokens; "
          "activations kept for backward scaled from the H200 measurement by (d_model + d_mlp)")
    print(f"{'model':<20} {'d_sae':>7} {'weights':>8} {'SAEs':>6} {'acts':>7} {'SAE acts':>9} {'total GiB':>10} "
          f"{'80 GB GPUs':>11}")
    for name, n_layers, d_model, d_mlp, _, n_params in BODIES:
        for d_sae in (32768, 131072):
            weights = n_params * 2
            saes = 6 * 2 * d_sae * d_model * 2
            acts = MEASURED_ACT_BYTES * (d_model + d_mlp) / MEASURED_WIDTH * n_layers * args.batch_tokens
            sae_acts = 6 * d_sae * 4 * 3 * args.batch_tokens  # activations, gradients, products (float32)
            total = weights + saes + acts + sae_acts
            gpus = _split_gpus(weights + acts, (saes + sae_acts) / 6)
            print(f"{name:<20} {d_sae:>7} {weights / GiB:8.1f} {saes / GiB:6.1f} {acts / GiB:7.1f} {sae_acts / GiB:9.1f} "
                  f"{total / GiB:10.1f} {int(gpus):>11}")


def _split_gpus(spread: float, per_sae: float, *, n_saes: int = 6, usable: float = 0.9 * 80e9) -> int:
    """The fewest 80 GB GPUs (90% usable) a layer split (model.devices_per_rank) needs: weights and
    backward activations spread evenly over the blocks, each SAE with its activations on its hook's
    GPU (the 6 hooks spread over the GPUs, so the busiest holds ceil(6 / n) of them)."""
    for n in range(1, 65):
        if spread / n + -(-n_saes // n) * per_sae <= usable:
            return n
    return 65


# ---- several GPUs (issue 13) ----------------------------------------------------------------

def multi(args: argparse.Namespace) -> None:
    """Projected pairs/hour on 1, 8 and 64 GPUs: per-pair GPU time from the H200 projection (c),
    the merge cost measured here on a light run and scaled to 6 SAEs of 32k features, and the
    selection, which rank 0 runs alone."""
    with tempfile.TemporaryDirectory() as folder:
        r = _child(["_run", folder, str(args.pairs), "light"])
    merge_here = r["timings"]["merge"]
    scale = 6 * 32768 / 512  # the merge reads [pairs, d_sae] per hook and side: linear in the SAE features
    merge = merge_here * scale * args.study_pairs / args.pairs
    per_pair = args.pair_seconds
    print(f"merge measured: {merge_here:.2f} s for {args.pairs} pairs with one 512-feature SAE (this CPU); scaled to "
          f"6 x 32,768 features and {args.study_pairs} pairs: {merge:.0f} s")
    print(f"per pair on one GPU: {per_pair:.3f} s (H200 projection: attribution 0.396 s + confirmation 0.76x that); "
          f"selection on rank 0 alone: {args.select_seconds:.0f} s")
    print(f"{'GPUs':>5} {'hours':>7} {'pairs/hour':>11}")
    for gpus in (1, 8, 64):
        seconds = args.select_seconds + args.study_pairs * per_pair / gpus + merge
        print(f"{gpus:>5} {seconds / 3600:7.2f} {args.study_pairs / seconds * 3600:11.0f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        name, *rest = sys.argv[1:]
        if name == "_run":
            result = child_run(rest[0], int(rest[1]), light=len(rest) > 2 and rest[2] == "light")
        elif name == "_load":
            result = child_load(*rest)
        elif name == "_wide":
            result = child_wide_run(rest[0], rest[1], rest[2], *map(int, rest[3:]))
        else:
            result = child_project(rest[0], rest[1], rest[2], int(rest[3]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    a = sub.add_parser("sizes", help="(a) time and memory for 100, 1k, 5k pairs")
    a.add_argument("--sizes", default="100,1000,5000")
    a.add_argument("--light", action="store_true", help="confirm 3 features per direction and a fidelity sample of "
                   "5 + 5 (instead of 10, 50 + 50): the same stages, ~8x less confirmation work")
    b = sub.add_parser("load", help="(b) peak memory of loading a >= 1B-parameter model")
    b.add_argument("--layers", type=int, default=3)
    b.add_argument("--dtype", default="bfloat16")
    b.add_argument("--device", default="cpu")
    b.add_argument("--no-compare", action="store_true", help="skip the whole-model (stream=False) route")
    b.add_argument("--tmp", default=None, help="where to write the checkpoint (needs ~3 GB)")
    c = sub.add_parser("project", help="(c) projection for a 7B PM, 6 x 32k SAEs, 2,000 pairs")
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    c.add_argument("--layers", type=int, default=1, help="layers of the smaller slice (the larger has twice as many)")
    c.add_argument("--tokens", type=int, default=256)
    c.add_argument("--tmp", default=None)
    d = sub.add_parser("wide-run", help="(d) a short pm-lens run at 8B widths (for a GPU check)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", default="bfloat16")
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--pairs", type=int, default=32)
    d.add_argument("--d-sae", type=int, default=32768)
    d.add_argument("--tmp", default=None)
    e = sub.add_parser("plan", help="memory plan for 7B, 27B and 70B PMs with 32k-131k-feature SAEs")
    e.add_argument("--batch-tokens", type=int, default=4096)
    m = sub.add_parser("multi", help="projected pairs/hour on 1, 8 and 64 GPUs")
    m.add_argument("--pairs", type=int, default=1000, help="pairs of the light run whose merge is timed")
    m.add_argument("--study-pairs", type=int, default=2000)
    m.add_argument("--pair-seconds", type=float, default=0.396 * 1.76, help="GPU seconds per pair (default: (c) on an H200)")
    m.add_argument("--select-seconds", type=float, default=4.3 * 60, help="selection over 8.5k HH pairs, rank 0 alone")
    args = parser.parse_args()
    {"sizes": sizes, "load": load, "project": project, "wide-run": wide_run, "plan": plan, "multi": multi}[args.what](args)


if __name__ == "__main__":
    main()
