"""Conversation on a tiny real model: template layout, image encoded once, oldest turns dropped, never the image."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_xraygpt

from xraygpt.assets import pediatric_cxr_jpegs
from xraygpt.chat import Conversation, Turn
from xraygpt.processing import IMAGE_TOKEN_ID

Q1, Q2, Q3 = "Describe the given chest x-ray image in detail.", "Is the heart enlarged?", "Any pleural effusion?"


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_xraygpt(tokenizer)


@pytest.fixture(scope="module")
def film():
    return pediatric_cxr_jpegs()[0]


def tok(model, text):
    return model.tokenizer(text, add_special_tokens=False).input_ids


def test_first_answer_equals_single_turn_summary(model, film):
    conv = model.chat(film, max_new_tokens=6)
    answer = conv.ask(Q2)
    assert answer and answer == model.summarize(film, question=Q2, max_new_tokens=6)
    assert conv.history == [(Q2, answer)]
    assert conv.max_context == model.llm.config.max_position_embeddings == 512


def test_follow_up_prompt_follows_the_template(model, film):
    conv = Conversation(model, film)
    conv.turns = [Turn(Q1, "Lungs are clear."), Turn(Q2, "No.")]
    T = model.num_image_tokens
    want = ([model.tokenizer.bos_token_id] + tok(model, "###Patient: <Img>") + [IMAGE_TOKEN_ID] * T
            + tok(model, f"</Img> {Q1} ###Doctor: ") + tok(model, "Lungs are clear.###")
            + tok(model, f"Patient: {Q2} ###Doctor: ") + tok(model, "No.###")
            + tok(model, f"Patient: {Q3} ###Doctor: "))
    assert conv.encode(Q3) == want
    # the answer-side text reads as the template's conversation
    text = model.tokenizer.decode([i for i in want if i != IMAGE_TOKEN_ID], skip_special_tokens=True)
    assert text == (f"###Patient: <Img></Img> {Q1} ###Doctor: Lungs are clear.###Patient: {Q2} ###Doctor: "
                    f"No.###Patient: {Q3} ###Doctor: ")


def test_ask_generates_from_the_whole_history_and_encodes_the_image_once(model, film):
    calls = []
    hook = model.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        conv = model.chat(film, max_new_tokens=5)
        first = conv.ask(Q1)
        ids = conv.encode(Q2)
        embeds = model.merge_image_features(torch.tensor([ids]), conv.image_embeds)
        expected = model.generate_from_embeds(embeds, torch.ones(1, len(ids), dtype=torch.long), conv.generation)[0]
        assert conv.ask(Q2) == expected
        conv.ask(Q3)
    finally:
        hook.remove()
    assert len(calls) == 1  # three questions, one encoder pass
    assert [q for q, _ in conv.history] == [Q1, Q2, Q3] and conv.history[0][1] == first


def test_oldest_turns_are_dropped_with_a_warning_never_the_image(model, film):
    conv = model.chat(film, max_new_tokens=4)
    conv.turns = [Turn(Q1, "Lungs are clear. " * 3), Turn(Q2, "No.")]
    full = len(conv.encode(Q3))
    without_first = len(conv.encode(Q3, conv.turns[1:]))
    conv.max_context = without_first + 4  # room for the last turn only
    assert full + 4 > conv.max_context
    with pytest.warns(UserWarning, match=r"dropped the 1 oldest question/answer turn\(s\); the image is kept"):
        answer = conv.ask(Q3)
    assert [q for q, _ in conv.history] == [Q2, Q3] and conv.history[1][1] == answer
    assert conv.dropped_turns == 1
    ids = conv.encode("again?")
    assert ids.count(IMAGE_TOKEN_ID) == model.num_image_tokens  # the image moved into the oldest kept turn
    head = [model.tokenizer.bos_token_id] + tok(model, "###Patient: <Img>") + [IMAGE_TOKEN_ID] * model.num_image_tokens
    after = tok(model, f"</Img> {Q2} ###Doctor: ")  # the oldest kept question now follows the image
    assert ids[:len(head)] == head and ids[len(head):len(head) + len(after)] == after
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a turn that fits drops nothing
        conv.max_context = 10_000
        conv.ask("More?")
    assert len(conv.history) == 3


def test_a_question_too_long_for_the_context_alone_is_refused(model, film):
    conv = model.chat(film, max_new_tokens=4, max_context=60)  # 49 image tokens + the prompt do not fit
    with pytest.raises(ValueError, match=r"the question alone needs \d+ prompt tokens \(49 for the image\)"):
        conv.ask(Q1)
    assert conv.history == []


def test_bad_questions_fail_clearly(model, film):
    conv = model.chat(film)
    for bad in ("", "   \n"):
        with pytest.raises(ValueError, match="empty question"):
            conv.ask(bad)
    with pytest.raises(ValueError, match="places the image itself"):
        conv.ask("<Img><ImageHere></Img> Describe.")
    with pytest.raises(TypeError, match="unknown generation setting"):
        conv.ask(Q1, beams=3)
    conv.turns = [Turn(Q1, "x")]
    conv.reset()
    assert conv.history == [] and conv.image_embeds.shape == (1, 49, 64)
