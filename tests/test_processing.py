"""Exact token layouts: image slots, label masks, padding sides (real SmolLM2 tokenizer)."""

import pytest
import torch

from xraygpt.conversation import get_template
from xraygpt.processing import IGNORE_INDEX, IMAGE_TOKEN_ID, PromptProcessor

T = 4


@pytest.fixture()
def proc(tokenizer):
    return PromptProcessor(tokenizer, get_template("xraygpt"), num_image_tokens=T, max_txt_len=160)


def tok(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_prompt_layout_is_exact(proc, tokenizer):
    ids = proc.encode_prompt("Describe it.")
    before = tok(tokenizer, "###Patient: <Img>")
    after = tok(tokenizer, "</Img> Describe it. ###Doctor: ")
    assert ids == [tokenizer.bos_token_id] + before + [IMAGE_TOKEN_ID] * T + after


def test_labels_cover_answer_and_end_marker_only(proc, tokenizer):
    s = proc.encode("Describe it.", "No acute disease.")
    answer = tok(tokenizer, "No acute disease.###")
    n_prompt = len(proc.encode_prompt("Describe it."))
    assert s.labels == [IGNORE_INDEX] * n_prompt + answer
    assert s.input_ids[n_prompt:] == answer
    assert tokenizer.decode(answer).endswith("###")


def test_right_padding_for_training(proc, tokenizer):
    batch = proc(["Q", "A much longer question about the lungs"], ["Short.", "Longer answer here."])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    short_len = len(proc.encode("Q", "Short.").input_ids)
    assert mask[0].tolist() == [1] * short_len + [0] * (ids.shape[1] - short_len)
    assert (ids[0, short_len:] == tokenizer.pad_token_id).all()
    assert (labels[0, short_len:] == IGNORE_INDEX).all()
    assert mask[1].all()
    assert (ids == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [T, T]


def test_left_padding_for_generation(proc):
    batch = proc(["Q", "A much longer question about the lungs"])
    mask = batch["attention_mask"]
    n = len(proc.encode_prompt("Q"))
    assert mask[0].tolist() == [0] * (mask.shape[1] - n) + [1] * n
    assert (batch["labels"] == IGNORE_INDEX).all()
    assert batch["input_ids"][0, -n:].tolist() == proc.encode_prompt("Q")


def test_answer_truncated_to_max_txt_len(tokenizer):
    p = PromptProcessor(tokenizer, get_template("xraygpt"), num_image_tokens=T, max_txt_len=5)
    s = p.encode("Q", "word " * 50)
    assert sum(1 for x in s.labels if x != IGNORE_INDEX) == 5


def test_empty_caption_rejected(proc):
    with pytest.raises(ValueError, match="empty answer"):
        proc.encode("Q", "   ")


def test_count_mismatch_between_answers_and_prompts(proc):
    with pytest.raises(ValueError, match="2 instructions but 1 answers"):
        proc(["a", "b"], ["x"])


def test_pad_to_multiple_rounds_the_length_up_and_changes_nothing_else(proc):
    q, a = ["Q", "A much longer question about the lungs"], ["Short.", "Longer answer here."]
    plain = proc(q, a)
    padded = proc(q, a, pad_to_multiple_of=16)
    n = plain["input_ids"].shape[1]
    length = padded["input_ids"].shape[1]
    assert length % 16 == 0 and n <= length < n + 16
    for key, value in plain.items():
        assert torch.equal(padded[key][:, :n], value)
    assert (padded["attention_mask"][:, n:] == 0).all() and (padded["labels"][:, n:] == IGNORE_INDEX).all()
