"""Formatting and encoding: padding, completion positions, chat templates and bad input."""

import pytest

from pm_lens.data import PreferencePair, encode_completions, encode_pairs, format_text
from pm_lens.testing import char_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
)


def test_plain_template(tokenizer):
    assert format_text(tokenizer, "Hi?", "Hello.") == "\n\nHuman: Hi?\n\nAssistant: Hello."


def test_chat_template_is_used_when_present(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    assert format_text(tokenizer, "Hi?", "Hello.") == "<bos>user: Hi?<eos><bos>assistant: Hello.<eos>"


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_and_completion_start(tokenizer, side):
    batch = encode_completions(tokenizer, ["Hi?", "What is the capital of France?"], ["Hello.", "Paris"], max_len=128,
                               padding_side=side)
    lengths = batch.attention_mask.sum(-1)
    assert batch.tokens.shape == (2, int(lengths.max()))
    for row, completion in enumerate(["Hello.", "Paris"]):
        real = batch.tokens[row][batch.attention_mask[row].bool()]
        assert tokenizer.decode(real).endswith(completion)
        start = int(batch.completion_start[row])
        assert tokenizer.decode(batch.tokens[row, start:start + len(completion)]) == completion
        assert (batch.tokens[row][~batch.attention_mask[row].bool()] == tokenizer.pad_token_id).all()
    pads_first = batch.attention_mask[:, 0] == 0
    assert pads_first.any() == (side == "left")


def test_completion_start_with_chat_template(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    batch = encode_completions(tokenizer, ["Hi?"], ["Hello."], max_len=128)
    start = int(batch.completion_start[0])
    assert tokenizer.decode(batch.tokens[0, start:start + 6]) == "Hello."
    # The chat template writes its own <bos>; no second one is added.
    assert int((batch.tokens[0] == tokenizer.bos_token_id).sum()) == 2


def test_pairs_encode_each_side(tokenizer):
    pairs = [PreferencePair("Q?", "Yes.", "No, never, not at all.")]
    batch = encode_pairs(tokenizer, pairs, max_len=128)
    assert batch.chosen.tokens.shape[1] < batch.rejected.tokens.shape[1]


def test_empty_completion_is_refused(tokenizer):
    with pytest.raises(ValueError, match="empty completion for prompt 'Hi\\?'"):
        encode_completions(tokenizer, ["Hi?"], ["  "], max_len=128)


def test_too_long_raises_or_truncates_from_the_left(tokenizer):
    prompt, completion = "x" * 100, "The end."
    with pytest.raises(ValueError, match=r"text 0 is \d+ tokens, longer than the context max_len=40"):
        encode_completions(tokenizer, [prompt], [completion], max_len=40)
    with pytest.warns(UserWarning, match="truncated 1 of 1 texts to the context of 40 tokens"):
        batch = encode_completions(tokenizer, [prompt], [completion], max_len=40, truncate=True)
    assert batch.tokens.shape == (1, 40)
    assert tokenizer.decode(batch.tokens[0]).endswith(completion)
    start = int(batch.completion_start[0])
    assert tokenizer.decode(batch.tokens[0, start:]) == completion


def test_tokenizer_without_pad_token_pads_with_eos():
    tokenizer = char_tokenizer()
    tokenizer.pad_token = None
    batch = encode_completions(tokenizer, ["a", "a"], ["b", "bbbb"], max_len=128)
    assert batch.tokens[0, -1] == tokenizer.eos_token_id
    assert batch.attention_mask[0, -1] == 0


def test_mismatched_lengths_and_bad_side(tokenizer):
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        encode_completions(tokenizer, ["a", "b"], ["c"], max_len=128)
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'middle'"):
        encode_completions(tokenizer, ["a"], ["c"], max_len=128, padding_side="middle")


def test_encode_texts(tokenizer):
    from pm_lens.data import encode_texts

    batch = encode_texts(tokenizer, ["abc", "abcdef"], max_len=128, padding_side="left")
    assert batch.tokens.shape == (2, 6) and batch.attention_mask[0].tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"text 1 is 6 tokens, longer than the context max_len=4"):
        encode_texts(tokenizer, ["abc", "abcdef"], max_len=4)
    with pytest.warns(UserWarning, match="truncated 1 of 2"):
        cut = encode_texts(tokenizer, ["abc", "abcdef"], max_len=4, truncate=True)
    assert tokenizer.decode(cut.tokens[1]) == "cdef"


# ---- text_format: an explicit, recorded choice ------------------------------------------------

HH_PROMPT = "\n\nHuman: What is the capital of France?"


def test_auto_keeps_hh_transcripts_even_with_a_chat_template(tokenizer):
    """A PM trained on raw HH text must be scored on that text: 'auto' never rewrites an HH
    transcript into the tokenizer's chat template."""
    tokenizer.chat_template = CHAT_TEMPLATE
    assert format_text(tokenizer, HH_PROMPT, "Paris.") == HH_PROMPT + "\n\nAssistant: Paris."
    assert format_text(tokenizer, "Hi?", "Hello.") == "<bos>user: Hi?<eos><bos>assistant: Hello.<eos>"


def test_each_format_on_request(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    assert format_text(tokenizer, HH_PROMPT, "Paris.", text_format="chat_template") == (
        "<bos>user: What is the capital of France?<eos><bos>assistant: Paris.<eos>")
    assert format_text(tokenizer, "Hi?", "Hello.", text_format="hh") == "\n\nHuman: Hi?\n\nAssistant: Hello."
    assert format_text(tokenizer, "Q: Hi? A:", " Hello.", text_format="raw") == "Q: Hi? A: Hello."
    batch = encode_completions(tokenizer, ["Q: Hi? A:"], [" Hello."], max_len=128, text_format="raw")
    assert tokenizer.decode(batch.tokens[0]) == "Q: Hi? A: Hello."
    assert int(batch.completion_start[0]) == len("Q: Hi? A:")


def test_describe_text_format_says_what_auto_chose(tokenizer):
    from pm_lens.data import describe_text_format

    assert describe_text_format(tokenizer, ["Hi?", HH_PROMPT]) == "hh"  # no chat template: hh for both
    tokenizer.chat_template = CHAT_TEMPLATE
    assert describe_text_format(tokenizer, ["Hi?", "Bye?"]) == "chat_template"
    assert describe_text_format(tokenizer, ["Hi?", HH_PROMPT, "Bye?"]) == "auto: chat_template for 2, hh for 1"
    assert describe_text_format(tokenizer, ["Hi?"], "raw") == "raw"


def test_bad_text_formats(tokenizer):
    with pytest.raises(ValueError, match=r"text_format must be one of \('auto', 'chat_template', 'hh', 'raw'\), got 'chatml'"):
        format_text(tokenizer, "Hi?", "Hello.", text_format="chatml")
    with pytest.raises(ValueError, match=r"text_format='chat_template' but the tokenizer has no chat template"):
        encode_pairs(tokenizer, [PreferencePair("Hi?", "a", "b")], max_len=128, text_format="chat_template")


def test_results_record_the_text_format(tokenizer):
    from pm_lens import RewardModel, ablate, attribute
    from pm_lens.testing import sparse_sae_for, tiny_hf_reward_model

    rm = RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=2), tokenizer)
    pairs = [PreferencePair(HH_PROMPT, "Paris.", "I don't know.")]
    sae = sparse_sae_for(rm, "blocks.0.hook_resid_post", encode_pairs(tokenizer, pairs, max_len=128).chosen.tokens, d_sae=32)
    assert attribute(rm, pairs, saes=[sae], progress=False).settings.text_format == "hh"
    rm.text_format = "raw"
    assert ablate(rm, pairs, saes=[sae], features=[("blocks.0.hook_resid_post", 0)], progress=False).settings.text_format == "raw"


# ---- pairs in the forms users give them --------------------------------------------------------


def test_pairs_as_one_pair_tuples_or_dicts(tokenizer):
    from pm_lens.data import as_pairs

    pair = PreferencePair("Hi?", "Hello.", "Go away.")
    assert as_pairs(pair) == [pair]
    assert as_pairs([("Hi?", "Hello.", "Go away.")]) == [pair]
    assert as_pairs([{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}]) == [pair]
    one = encode_pairs(tokenizer, pair, max_len=128)
    assert one.chosen.tokens.shape[0] == 1
    with pytest.raises(TypeError, match=r"pairs\[0\] is a tuple of 2; each item must be a PreferencePair"):
        as_pairs([("Hi?", "Hello.")])
    with pytest.raises(TypeError, match=r"pairs must be a PreferencePair or a list .*; got str"):
        as_pairs("Hi?")
    with pytest.raises(ValueError, match=r"pairs\[0\]: missing field\(s\) \['rejected'\]"):
        as_pairs([{"prompt": "Hi?", "chosen": "Hello."}])
    with pytest.raises(ValueError, match=r"no pairs: the list is empty"):
        as_pairs([])
