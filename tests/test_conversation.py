import pytest

from xraygpt.conversation import (
    DEFAULT_INSTRUCTION,
    default_prompt_file,
    get_template,
    pick_instruction,
    read_prompt_file,
    with_image,
)


def test_default_template_matches_original_code():
    t = get_template("xraygpt")
    prompt = t.prompt("<Img><ImageHere></Img> Describe it.")
    assert prompt == "###Patient: <Img><ImageHere></Img> Describe it. ###Doctor: "
    assert t.answer("Heart is normal.") == "Heart is normal.###"


def test_paper_variant_and_plain_question_gets_image_wrap():
    t = get_template("xraygpt_paper")
    assert t.prompt(DEFAULT_INSTRUCTION) == f"###Doctor: <Img><ImageHere></Img> {DEFAULT_INSTRUCTION} ###Assistant: "


def test_two_image_slots_rejected():
    with pytest.raises(ValueError, match="2 '<ImageHere>' slots"):
        with_image("<ImageHere> and <ImageHere>")


def test_unknown_template_lists_valid():
    with pytest.raises(ValueError, match="valid: .*xraygpt"):
        get_template("vicuna")


def test_prompt_file_keeps_only_image_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("header without slot\n<Img><ImageHere></Img> A\n\n<Img><ImageHere></Img> B\n")
    assert read_prompt_file(f) == ["<Img><ImageHere></Img> A", "<Img><ImageHere></Img> B"]


def test_prompt_file_without_slot_names_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Describe the image.\n")
    with pytest.raises(ValueError, match=r"p\.txt: no line contains '<ImageHere>'"):
        read_prompt_file(f)


def test_prompt_file_line_with_two_slots_names_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("<Img><ImageHere></Img> ok\n<ImageHere><ImageHere> bad\n")
    with pytest.raises(ValueError, match=r"p\.txt:2"):
        read_prompt_file(f)


def test_shipped_prompt_file_and_per_sample_choice_is_seeded():
    prompts = read_prompt_file(default_prompt_file())
    assert len(prompts) == 10
    picks = [pick_instruction(prompts, seed=0, epoch=0, index=i) for i in range(50)]
    assert picks == [pick_instruction(prompts, seed=0, epoch=0, index=i) for i in range(50)]
    assert len(set(picks)) > 3  # per sample, not one per batch
    assert picks != [pick_instruction(prompts, seed=1, epoch=0, index=i) for i in range(50)]
