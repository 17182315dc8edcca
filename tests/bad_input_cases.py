"""Bad input a user can give, across loading, data, SAEs, attribution and the CLI.

Each case calls pm_lens as a user would and names the exception type it must raise and patterns
its message must contain (the bad value, and what is allowed). ``python -m tests.bad_input_cases``
runs them all in one process *without* the test suite's runtime type checking (a user has none)
and prints one JSON record per case: the exception's type and its MRO, its message, and the file
of the frame that raised it (which must be pm_lens's own, not torch's, transformers' or SAELens's).
``tests/test_bad_input.py`` checks the records.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import traceback
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable


@dataclass(frozen=True)
class Case:
    name: str
    error: str  # the exception type (or a base of it) that must be raised
    patterns: tuple[str, ...]  # regexes the message must match (the value, what is allowed)
    run: Callable[[Any], Any]


def _cli(env: Any, *argv: str) -> None:
    """Run the CLI in-process; a SystemExit becomes a ``CLIError`` carrying stderr and the code."""
    from pm_lens.cli import main

    err = io.StringIO()
    try:
        with redirect_stderr(err):
            code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    raise CLIError(code, err.getvalue())


class CLIError(Exception):
    def __init__(self, code: Any, stderr: str):
        super().__init__(stderr.strip())
        self.code = code


def _write(env: Any, name: str, text: str) -> str:
    path = Path(env.tmp) / name
    path.write_text(text)
    return str(path)


def _sae(env: Any, hook: str = "blocks.1.hook_resid_post", d_in: int = 64, **cfg: Any) -> Any:
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=16, metadata=SAEMetadata(hook_name=hook), **cfg))


def _nan_sae(env: Any) -> Any:
    import torch

    sae = _sae(env)
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    return sae


def _causal_lm_dir(env: Any) -> str:
    import transformers

    from pm_lens.testing import CHAR_VOCAB

    path = Path(env.tmp) / "causal_lm"
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=len(CHAR_VOCAB), max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _attribution(env: Any) -> Any:
    return env.pm.attribute(env.rm, env.pairs, saes=[env.good_sae], progress=False)


P = "What is 2+2?"
CASES = [
    # ---- loading a reward model ----
    Case("load: missing folder", "OSError", (r"/no/such/model", r"local model directory"),
         lambda env: env.pm.RewardModel.from_pretrained("/no/such/model")),
    Case("load: causal LM folder", "ValueError", (r"causal LM \(LlamaForCausalLM\), not a reward model",),
         lambda env: env.pm.RewardModel.from_pretrained(_causal_lm_dir(env))),
    Case("load: dtype int8", "ValueError", (r"'int8'", r"allowed: 'float32'"),
         lambda env: env.pm.RewardModel.from_hf(env.hf, env.tokenizer, dtype="int8")),
    Case("load: dtype typo", "ValueError", (r"'fp33'", r"bfloat16"),
         lambda env: env.pm.RewardModel.from_hf(env.hf, env.tokenizer, dtype="fp33")),
    Case("load: integer torch dtype", "ValueError", (r"torch.int64", r"allowed"),
         lambda env: env.pm.RewardModel.from_hf(env.hf, env.tokenizer, dtype=__import__("torch").int64)),
    Case("load: device garbage", "ValueError", (r"'gpu-zero'",),
         lambda env: env.pm.RewardModel.from_hf(env.hf, env.tokenizer, device="gpu-zero")),
    Case("load: causal LM object", "ValueError", (r"LlamaForCausalLM", r"LlamaForSequenceClassification"),
         lambda env: env.pm.RewardModel.from_hf(__import__("transformers").LlamaForCausalLM(env.hf.config), env.tokenizer)),
    Case("load: two labels without an objective", "ValueError", (r"num_labels=2", r"objective="),
         lambda env: env.pm.RewardModel.from_hf(
             __import__("pm_lens.testing", fromlist=["x"]).tiny_hf_reward_model(num_labels=2), env.tokenizer)),
    Case("model: token id outside the vocabulary", "ValueError", (r"token id 999", r"\[0, 104\)"),
         lambda env: env.rm.reward(__import__("torch").tensor([[1, 2, 999]]))),
    Case("model: sequence longer than n_ctx", "ValueError", (r"sequence length 200", r"n_ctx=128"),
         lambda env: env.rm.reward(__import__("torch").ones(1, 200, dtype=__import__("torch").long))),
    # ---- data ----
    Case("data: missing file", "FileNotFoundError", (r"no_such\.jsonl",),
         lambda env: env.pm.load_pairs(str(Path(env.tmp) / "no_such.jsonl"))),
    Case("data: unsupported file type", "ValueError", (r"'pairs\.txt'", r"\.jsonl, \.json, \.csv"),
         lambda env: env.pm.load_pairs(_write(env, "pairs.txt", "x"))),
    Case("data: bad JSON line", "ValueError", (r"bad\.jsonl:2", r"not valid JSON"),
         lambda env: env.pm.load_pairs(_write(env, "bad.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n'))),
    Case("data: record without rejected", "ValueError", (r"record 0", r"missing field\(s\) \['rejected'\]"),
         lambda env: env.pm.load_pairs([{"prompt": P, "chosen": "4"}])),
    Case("data: HH transcripts with different prompts", "ValueError", (r"differ before their final assistant turn",),
         lambda env: env.pm.load_pairs([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}])),
    Case("data: not an HH transcript", "ValueError", (r"not an HH transcript", r"Assistant"),
         lambda env: env.pm.load_pairs([{"chosen": "just text", "rejected": "other text"}])),
    Case("data: prompt not a string", "TypeError", (r"PreferencePair\.prompt must be a str, got int",),
         lambda env: env.pm.PreferencePair(1, "a", "b")),
    Case("data: pairs as one string", "TypeError", (r"pairs must be a PreferencePair or a list", r"got str"),
         lambda env: env.pm.score_pairs(env.rm, "What is 2+2?", progress=False)),
    Case("data: pair tuple of two", "TypeError", (r"pairs\[0\] is a tuple of 2", r"\(prompt, chosen, rejected\)"),
         lambda env: env.pm.score_pairs(env.rm, [(P, "4")], progress=False)),
    Case("data: no pairs", "ValueError", (r"no pairs",),
         lambda env: env.pm.score_pairs(env.rm, [], progress=False)),
    Case("data: empty completion", "ValueError", (r"empty completion", r"What is 2\+2"),
         lambda env: env.pm.score_pairs(env.rm, [(P, "  ", "5")], progress=False)),
    Case("data: text longer than the context", "ValueError", (r"text 0 is \d+ tokens", r"max_len=128", r"truncate=True"),
         lambda env: env.pm.encode_pairs(env.tokenizer, [(P * 20, "4", "5")], max_len=128)),
    Case("data: padding side", "ValueError", (r"'middle'", r"'right' or 'left'"),
         lambda env: env.pm.encode_pairs(env.tokenizer, [(P, "4", "5")], max_len=128, padding_side="middle")),
    Case("data: text format", "ValueError", (r"'chatml'", r"'auto', 'chat_template', 'hh', 'raw'"),
         lambda env: env.pm.encode_pairs(env.tokenizer, [(P, "4", "5")], max_len=128, text_format="chatml")),
    Case("data: chat template the tokenizer lacks", "ValueError", (r"text_format='chat_template'", r"'hh' or 'raw'"),
         lambda env: env.pm.encode_pairs(env.tokenizer, [(P, "4", "5")], max_len=128, text_format="chat_template")),
    Case("data: batch size", "ValueError", (r"batch_size must be an integer >= 1, got 0",),
         lambda env: env.pm.score_pairs(env.rm, env.pairs, batch_size=0, progress=False)),
    # ---- SAEs ----
    Case("sae: missing path", "ValueError", (r"/no/such/sae", r"release"),
         lambda env: env.pm.load_sae("/no/such/sae")),
    Case("sae: unknown format", "ValueError", (r"'npz'", r"'saelens'"),
         lambda env: env.pm.load_sae(env.tmp, format="npz")),
    Case("sae: folder holding neither format", "ValueError", (r"cannot tell what the directory", r"cfg\.json"),
         lambda env: env.pm.load_sae(env.tmp)),
    Case("sae: an int as source", "TypeError", (r"int",),
         lambda env: env.pm.load_sae(3)),
    Case("sae: state dict without a hook name", "ValueError", (r"hook_name",),
         lambda env: env.pm.load_sae({k: v for k, v in _dl_state_dict().items()})),
    Case("sae: dtype string", "ValueError", (r"'int4'", r"allowed"),
         lambda env: env.pm.load_sae(env.sae_dir, dtype="int4")),
    Case("sae: width does not fit", "ValueError", (r"d_in=32", r"width 64"),
         lambda env: env.pm.attach_saes(env.rm, _sae(env, d_in=32))),
    Case("sae: unknown hook", "ValueError", (r"blocks\.9\.hook_resid_post", r"valid ones look like"),
         lambda env: env.pm.attach_saes(env.rm, _sae(env, hook="blocks.9.hook_resid_post"))),
    Case("sae: dtype mismatch", "ValueError", (r"torch\.float64", r"sae\.to\(torch\.float32\)"),
         lambda env: env.pm.attach_saes(env.rm, _sae(env).to(__import__("torch").float64))),
    Case("sae: NaN weights", "ValueError", (r"NaN or infinite weights in W_enc",),
         lambda env: env.pm.attach_saes(env.rm, _nan_sae(env))),
    Case("sae: hook_z without reshaping", "ValueError", (r"reshape_activations='hook_z'", r"n_heads=4, d_head=16"),
         lambda env: env.pm.attach_saes(env.rm, _sae(env, hook="blocks.1.attn.hook_z"))),
    Case("sae: not an SAE", "TypeError", (r"SAELens SAE objects, got dict",),
         lambda env: env.pm.attribute(env.rm, env.pairs, saes=[{"W_dec": 0}], progress=False)),
    Case("sae: train architecture", "ValueError", (r"'sparse'", r"topk"),
         lambda env: env.pm.train_saes(env.rm, env.pairs, hook_names=["blocks.1.hook_resid_post"], d_sae=16,
                                       architecture="sparse", progress=False)),
    Case("sae: evaluate batch size", "ValueError", (r"batch_size must be an integer >= 1, got 0",),
         lambda env: env.pm.evaluate_sae(env.rm, env.good_sae, env.pairs, batch_size=0, progress=False)),
    # ---- attribution and ablation ----
    Case("attribute: target", "ValueError", (r"'reward'", r"'chosen', 'rejected', 'margin', 'sum'"),
         lambda env: env.pm.attribute(env.rm, env.pairs, saes=[env.good_sae], target="reward", progress=False)),
    Case("attribute: method", "ValueError", (r"'gradient'", r"'atp', 'ig'"),
         lambda env: env.pm.attribute(env.rm, env.pairs, saes=[env.good_sae], method="gradient", progress=False)),
    Case("attribute: positions", "ValueError", (r"'prompt'", r"'all', 'completion', 'diverge'"),
         lambda env: env.pm.attribute(env.rm, env.pairs, saes=[env.good_sae], positions="prompt", progress=False)),
    Case("attribute: two SAEs for one hook", "ValueError", (r"several SAEs for the same hook", r"blocks\.1\.hook_resid_post"),
         lambda env: env.pm.attribute(env.rm, env.pairs, saes=[env.good_sae, _sae(env)], progress=False)),
    Case("attribute: IG steps", "ValueError", (r"ig_steps must be an integer >= 1, got 0",),
         lambda env: env.pm.attribute(env.rm, env.pairs, saes=[env.good_sae], method="ig", ig_steps=0, progress=False)),
    Case("attribute: no SAEs", "ValueError", (r"no SAEs", r"attach_saes"),
         lambda env: env.pm.attribute(env.rm, env.pairs, progress=False)),
    Case("ablate: hook without an SAE", "ValueError", (r"no SAE at 'blocks\.2\.hook_resid_post'", r"SAEs are at"),
         lambda env: env.pm.ablate(env.rm, env.pairs, saes=[env.good_sae], features=[("blocks.2.hook_resid_post", 0)],
                                   progress=False)),
    Case("ablate: feature out of range", "ValueError", (r"feature 16 does not exist", r"valid are 0\.\.15"),
         lambda env: env.pm.ablate(env.rm, env.pairs, saes=[env.good_sae], features=[("blocks.1.hook_resid_post", 16)],
                                   progress=False)),
    Case("ablate: features word", "ValueError", (r"'everything'", r"'all'"),
         lambda env: env.pm.ablate(env.rm, env.pairs, saes=[env.good_sae], features="everything", progress=False)),
    Case("ablate: feature index as text", "TypeError", (r"'3'", r"integer"),
         lambda env: env.pm.ablate(env.rm, env.pairs, saes=[env.good_sae], features=[("blocks.1.hook_resid_post", "3")],
                                   progress=False)),
    Case("ablate: baseline", "ValueError", (r"'median'", r"'zero', 'mean'"),
         lambda env: env.pm.ablate(env.rm, env.pairs, saes=[env.good_sae], features=[("blocks.1.hook_resid_post", 0)],
                                   baseline="median", progress=False)),
    Case("fidelity: top_k 0", "ValueError", (r"top_k must be an integer >= 1, got 0",),
         lambda env: env.pm.check_fidelity(env.rm, _attribution(env), top_k=0, progress=False)),
    Case("fidelity: negative n_random", "ValueError", (r"n_random must be an integer >= 0, got -1",),
         lambda env: env.pm.check_fidelity(env.rm, _attribution(env), n_random=-1, progress=False)),
    Case("ranking: direction", "ValueError", (r"'up'", r"'raising', 'lowering' or 'both'"),
         lambda env: _attribution(env).top_features(5, direction="up")),
    Case("recover: top_n", "ValueError", (r"top_n must be >= 1, got 0",),
         lambda env: __import__("pm_lens.attribution", fromlist=["x"]).recover(env.rm, _attribution(env), top_n=0)),
    # ---- the command line ----
    Case("cli: count 0", "CLIError", (r"--top", r"must be a positive integer, got 0"),
         lambda env: _cli(env, "demo", "--top", "0")),
    Case("cli: not a number", "CLIError", (r"--random", r"'abc'"),
         lambda env: _cli(env, "demo", "--random", "abc")),
    Case("cli: out under a file", "CLIError", (r"pm-lens: error: .*--out", r"a_file"),
         lambda env: _cli(env, "demo", "--out", str(Path(_write(env, "a_file", "x")) / "out"))),
    Case("cli: unknown command", "CLIError", (r"invalid choice: 'studyy'",),
         lambda env: _cli(env, "studyy")),
]


def _dl_state_dict() -> dict:
    import torch

    return {"encoder.weight": torch.randn(16, 64), "encoder.bias": torch.zeros(16), "decoder.weight": torch.randn(64, 16),
            "bias": torch.zeros(64)}


def _env(tmp: str) -> SimpleNamespace:
    import pm_lens
    from pm_lens.testing import char_tokenizer, sparse_sae_for, tiny_hf_reward_model

    tokenizer = char_tokenizer()
    hf = tiny_hf_reward_model(num_hidden_layers=3)
    rm = pm_lens.RewardModel.from_hf(hf, tokenizer)
    pairs = [pm_lens.PreferencePair(P, "4, you're welcome!", "I don't know."),
             pm_lens.PreferencePair("Capital of France?", "Paris.", "London.")]
    tokens = pm_lens.encode_pairs(tokenizer, pairs, max_len=128).chosen.tokens
    good_sae = sparse_sae_for(rm, "blocks.1.hook_resid_post", tokens, d_sae=16)
    sae_dir = Path(tmp) / "sae"
    good_sae.save_model(sae_dir)
    return SimpleNamespace(pm=pm_lens, tmp=tmp, tokenizer=tokenizer, hf=hf, rm=rm, pairs=pairs, good_sae=good_sae,
                           sae_dir=str(sae_dir))


def run_all() -> dict[str, dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import warnings

    warnings.simplefilter("ignore")
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = _env(tmp)
        for case in CASES:
            case_tmp = Path(tmp) / f"case{CASES.index(case)}"
            case_tmp.mkdir()
            env.tmp = str(case_tmp)
            try:
                case.run(env)
            except BaseException as err:  # noqa: BLE001 - the point is to see what was raised
                frames = traceback.extract_tb(err.__traceback__)
                records[case.name] = {
                    "types": [cls.__name__ for cls in type(err).__mro__],
                    "message": str(err),
                    "origin": frames[-1].filename if frames else "",
                    "code": getattr(err, "code", None),
                }
            else:
                records[case.name] = {"types": [], "message": "no error raised", "origin": "", "code": None}
    return records


if __name__ == "__main__":
    json.dump(run_all(), sys.stdout)
