"""Preference pairs: the HH-RLHF split, and loading from JSONL, CSV and datasets."""

import json

import datasets
import pandas as pd
import pytest

from pm_lens.data import PreferencePair, format_text, load_pairs, split_hh
from pm_lens.data.pairs import hh_turns

PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?"
HH_RECORD = {
    "chosen": PROMPT + "\n\nAssistant: The capital of Italy is Rome.",
    "rejected": PROMPT + "\n\nAssistant: I don't know.",
}


def test_hh_record_splits_into_prompt_and_final_responses():
    pair = split_hh(HH_RECORD["chosen"], HH_RECORD["rejected"])
    assert pair.prompt == PROMPT
    assert pair.chosen == "The capital of Italy is Rome."
    assert pair.rejected == "I don't know."


def test_hh_split_round_trips_through_the_plain_template(tokenizer):
    pair = split_hh(HH_RECORD["chosen"], HH_RECORD["rejected"])
    assert format_text(tokenizer, pair.prompt, pair.chosen) == HH_RECORD["chosen"]
    assert format_text(tokenizer, pair.prompt, pair.rejected) == HH_RECORD["rejected"]


def test_hh_prompt_becomes_chat_turns():
    assert hh_turns(PROMPT) == [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert hh_turns("Just a question?") == [{"role": "user", "content": "Just a question?"}]


def test_transcripts_that_differ_early_are_refused():
    with pytest.raises(ValueError, match="differ before their final assistant turn"):
        split_hh("\n\nHuman: A?\n\nAssistant: x", "\n\nHuman: B?\n\nAssistant: y")
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
        split_hh("no turns here", "none here either")


def test_load_jsonl_with_and_without_prompt(tmp_path):
    path = tmp_path / "pairs.jsonl"
    records = [HH_RECORD, {"prompt": "2+2?", "chosen": "4", "rejected": "5", "id": 7}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    pairs = load_pairs(path)
    assert pairs[0] == split_hh(HH_RECORD["chosen"], HH_RECORD["rejected"])
    assert pairs[1] == PreferencePair("2+2?", "4", "5")
    assert pairs[1].meta == {"id": 7}


def test_load_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    pd.DataFrame([{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}]).to_csv(path, index=False)
    assert load_pairs(path) == [PreferencePair("Hi?", "Hello!", "Go away.")]


def test_load_dataset_folder_and_dataset_dict(tmp_path):
    dataset = datasets.Dataset.from_list([HH_RECORD, HH_RECORD])
    dataset.save_to_disk(str(tmp_path / "hh"))
    expected = [split_hh(HH_RECORD["chosen"], HH_RECORD["rejected"])] * 2
    assert load_pairs(tmp_path / "hh") == expected
    splits = datasets.DatasetDict({"train": dataset, "test": dataset.select([0])})
    assert load_pairs(splits, split="test") == expected[:1]
    with pytest.raises(ValueError, match="split 'validation' not in the dataset; it has \\['test', 'train'\\]"):
        load_pairs(splits, split="validation")


def test_invalid_records_raise_or_are_skipped():
    records = [HH_RECORD, {"chosen": "x"}, {"chosen": "no turns", "rejected": "none"}]
    with pytest.raises(ValueError, match=r"record 1: .*missing field\(s\) \['rejected'\]"):
        load_pairs(records)
    with pytest.warns(UserWarning, match="skipped 2 records"):
        assert len(load_pairs(records, skip_invalid=True)) == 1


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no preference data"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported preference-data file 'pairs.txt'"):
        load_pairs(tmp_path / "pairs.txt")
    (tmp_path / "broken.jsonl").write_text('{"chosen": "a"\n')
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):
        load_pairs(tmp_path / "broken.jsonl")
