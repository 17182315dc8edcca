"""A reward model trained and saved by TRL's RewardTrainer (what people train PMs with) loads
through the streamed route with parity, and pm-lens run reads the folder."""

import pytest
import torch

from pm_lens import RewardModel
from pm_lens.cli import main
from pm_lens.testing import tiny_hf_reward_model
from tests.model.helpers import TEXTS

trl = pytest.importorskip("trl")


@pytest.fixture
def trl_folder(tmp_path, tokenizer):
    from datasets import Dataset

    pairs = [{"chosen": f"Q{i}: thanks, my pleasure!", "rejected": f"Q{i}: I don't know."} for i in range(8)]
    model = tiny_hf_reward_model(num_hidden_layers=2)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=4,
                            learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                            max_length=64, disable_dropout=True, dataset_num_proc=None)
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    before = model.score.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.score.weight.detach())  # it trained
    trainer.save_model(str(tmp_path / "pm"))
    # The reference is the saved folder read back by transformers (the trainer's own model runs
    # under the bfloat16 autocast accelerate wrapped its forward in).
    from transformers import AutoModelForSequenceClassification

    return tmp_path / "pm", AutoModelForSequenceClassification.from_pretrained(tmp_path / "pm").eval()


def test_a_trl_reward_trainer_folder_loads_with_parity(trl_folder, tokenizer, monkeypatch):
    import transformers

    folder, hf_model = trl_folder
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: pytest.fail("loaded through transformers, not streamed"))
    rm = RewardModel.from_pretrained(folder)
    with torch.no_grad():
        for text in TEXTS:
            tokens = torch.tensor([tokenizer(text)["input_ids"]])
            assert abs(float(rm.reward(tokens)[0]) - float(hf_model(tokens).logits[0, 0])) <= 1e-4


def test_pm_lens_run_plans_on_a_trl_folder(trl_folder, tmp_path, capsys):
    folder, _ = trl_folder
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Hi?", "chosen": "Hello, my pleasure!", "rejected": "I don\'t know."}\n' * 3)
    from sae_lens import SAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=64, d_sae=16)
    cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    SAE.from_dict(cfg.to_dict()).save_model(str(tmp_path / "sae"))
    assert main(["run", "--model", str(folder), "--pairs", str(pairs), "--saes", str(tmp_path / "sae"),
                 "--out", str(tmp_path / "out"), "--k", "2", "--max-tokens", "100", "--dry-run"]) == 0
    assert "3 read, 3 within 100 tokens, 2 selected (top_margin)" in capsys.readouterr().out
