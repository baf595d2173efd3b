"""XrayGPT on tiny real components: splice, masks, batching invariance, save/load, original .pth import."""

import pickle

import pytest
import torch
from conftest import make_tiny_llm

from xraygpt.encoders import EncoderConfig, build_encoder
from xraygpt.model import GenerationConfig, ModelConfig, XrayGPT
from xraygpt.processing import IGNORE_INDEX, IMAGE_TOKEN_ID


@pytest.fixture()
def model(tokenizer):
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(type="open_clip", name="xray-vit-tiny"))
    m = XrayGPT(ModelConfig(), encoder=enc, llm=make_tiny_llm(len(tokenizer)), tokenizer=tokenizer)
    torch.manual_seed(1)
    torch.nn.init.normal_(m.llama_proj.weight, std=0.5)
    return m


def pixels(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g)


def test_only_projection_is_trainable(model):
    counts = model.parameter_counts()
    assert counts["trainable"] == 256 * 64 + 64
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["llama_proj.weight", "llama_proj.bias"]
    model.train()
    assert model.training and not model.llm.training and not model.encoder.training


def test_encode_images_shape(model):
    assert model.encode_images(pixels(2)).shape == (2, 49, 64)


def test_merge_places_image_embeds_exactly_at_slots(model):
    batch = model.processor(["Q one", "a longer question two"], ["A.", "B b."])
    image_embeds = torch.randn(2, 49, 64)
    merged = model.merge_image_features(batch["input_ids"], image_embeds)
    slots = batch["input_ids"] == IMAGE_TOKEN_ID
    assert torch.equal(merged[slots], image_embeds.reshape(-1, 64))
    text_embeds = model.llm.get_input_embeddings()(batch["input_ids"].clamp(min=0))
    assert torch.equal(merged[~slots], text_embeds[~slots])
    # slots start right after bos + "###Patient: <Img" in both rows (right padding keeps them aligned)
    first = slots.float().argmax(dim=1)
    assert first[0] == first[1] == 1 + len(model.tokenizer("###Patient: <Img>", add_special_tokens=False).input_ids)


def test_slot_image_count_mismatch_names_both_counts(model):
    batch = model.processor(["Q"], ["A."])
    with pytest.raises(ValueError, match=r"1 image slots \(49 tokens\) but 2 images were given \(98 tokens\)"):
        model.merge_image_features(batch["input_ids"], torch.randn(2, 49, 64))


def test_loss_only_counts_answer_tokens(model):
    batch = model.processor(["Q"], ["No acute disease."])
    px = pixels(1)
    out = model(**batch, pixel_values=px)
    assert out.logits is None  # answer-only scoring: the (B, L, V) logits are never built
    logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=px).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    keep = targets != IGNORE_INDEX
    assert keep.sum() == len(model.tokenizer("No acute disease.###", add_special_tokens=False).input_ids)
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)


def test_answer_only_loss_equals_the_llms_own_loss_and_gradient(model, monkeypatch):
    """Same loss and projection gradient as HF's full-logits loss, mean and global-token-count forms."""
    batch = model.processor(["Q", "a longer question"], ["No acute disease.", "Small left effusion."])
    px = pixels(2)
    for n_items in (None, torch.tensor(37)):
        grads = []
        for lean in (True, False):
            model.zero_grad()
            monkeypatch.setattr(model, "_can_score_answers_only", lambda lean=lean: lean)  # the path under test
            loss = model(**batch, pixel_values=px, num_items_in_batch=n_items).loss
            loss.backward()
            grads.append((loss.detach(), model.llama_proj.weight.grad.clone()))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


def test_right_padding_does_not_change_per_sample_logits(model):
    px = pixels(2)
    batch = model.processor(["Q", "a much longer question about the heart"], ["A.", "Longer answer text."])
    batched = model(batch["input_ids"], batch["attention_mask"], pixel_values=px).logits
    single_batch = model.processor(["Q"], ["A."])
    single = model(single_batch["input_ids"], single_batch["attention_mask"], pixel_values=px[:1]).logits
    n = single.shape[1]
    torch.testing.assert_close(batched[0, :n], single[0], atol=1e-5, rtol=1e-4)


def test_backward_reaches_only_projection(model):
    batch = model.processor(["Q", "R"], ["A.", "B."])
    model.train()
    model(**batch, pixel_values=pixels(2)).loss.backward()
    assert model.llama_proj.weight.grad is not None and model.llama_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("llama_proj"))


def test_greedy_generation_batch_1_equals_batch_4(model):
    px = pixels(4, seed=3)
    questions = ["Describe.", "What are the findings in this film?", "Is the heart enlarged?", "Any effusion?"]
    gen = GenerationConfig(max_new_tokens=12)
    together = model.generate(px, questions, generation=gen)
    alone = [model.generate(px[i:i + 1], [questions[i]], generation=gen)[0] for i in range(4)]
    assert together == alone
    assert all(len(t) > 0 for t in together)


def test_image_guidance_zero_is_the_null_image_and_one_is_off(model):
    features = model.get_image_features(pixels(3, seed=5))  # (3, 49, D_img)
    gen = GenerationConfig(max_new_tokens=10)
    plain = model.generate(image_features=features, generation=gen)
    assert model.generate(image_features=features, generation=gen, image_guidance=1.0) == plain
    null = model.generate(image_features=torch.zeros_like(features), generation=gen)
    assert model.generate(image_features=features, generation=gen, image_guidance=0.0) == null != plain


def test_image_guidance_follows_the_guided_log_probs(model):
    """First answer token = argmax of l_null + s (l_image - l_null), computed here from the LLM's own logits."""
    features = model.get_image_features(pixels(4, seed=6))
    batch = model.processor(["Describe."] * 4, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def next_logp(feats):
        embeds = model.merge_image_features(ids, model.encode_images(image_features=feats))
        return torch.log_softmax(model.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].float(), -1)

    image, null = next_logp(features), next_logp(torch.zeros_like(features))
    expected = (null + 3.0 * (image - null)).argmax(-1)  # (4,)
    out = model.generate(image_features=features, instructions="Describe.", max_new_tokens=1, image_guidance=3.0)
    assert out == [model.strip_answer(model.tokenizer.decode([int(t)], skip_special_tokens=True)) for t in expected]
    assert not torch.equal(expected, image.argmax(-1))  # the guidance changed at least one choice


def test_no_repeat_ngram_size_bans_a_repeated_token_even_under_guidance(model, monkeypatch):
    features = model.get_image_features(pixels(2, seed=3))
    gen = GenerationConfig(max_new_tokens=48)
    produced = []  # the LLM's own output ids (new tokens only), seen through a pass-through wrapper
    real_generate = model.llm.generate

    def recording_generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        produced.append(out)
        return out

    monkeypatch.setattr(model.llm, "generate", recording_generate)

    def answers(**overrides):
        model.generate(image_features=features, generation=gen, **overrides)
        special = {model.tokenizer.pad_token_id, model.tokenizer.eos_token_id}
        return [[t for t in row.tolist() if t not in special] for row in produced[-1][:2]]

    assert any(len(set(t)) < len(t) for t in answers())  # the tiny model repeats a token: something to ban
    for guidance in (1.0, 3.0):
        once = answers(no_repeat_ngram_size=1, image_guidance=guidance)
        assert all(len(set(t)) == len(t) > 0 for t in once), once
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be >= 0"):
        GenerationConfig(no_repeat_ngram_size=-1)


def test_image_guidance_rejects_sampling():
    with pytest.raises(ValueError, match="greedy or beam search"):
        GenerationConfig(do_sample=True, image_guidance=2.0)
    with pytest.raises(ValueError, match=">= 0"):
        GenerationConfig(image_guidance=-1.0)


def test_generation_stops_on_end_marker(model, tokenizer):
    """Force the LM to emit 'ok###...' by biasing its output layer, then check the marker is cut."""
    ids = tokenizer("ok###ok", add_special_tokens=False).input_ids
    lm = model.llm
    with torch.no_grad():
        lm.lm_head = torch.nn.Linear(64, len(tokenizer), bias=True)
        lm.lm_head.weight.zero_()
        lm.lm_head.bias.fill_(-10)
        lm.lm_head.bias[ids[0]] = 10  # always "ok" first ...
    seq = []

    def bias_hook(module, inp, out):  # ... then the end marker tokens in order
        step = len(seq)
        seq.append(step)
        out = out.clone()
        target = ids[min(step, len(ids) - 1)]
        out[..., -1, :] = -10
        out[..., -1, target] = 10
        return out

    lm.lm_head.register_forward_hook(bias_hook)
    assert model.generate(pixels(1), "Q", max_new_tokens=20) == ["ok"]
    assert len(seq) <= len(ids)  # stopped at the marker, not at max_new_tokens


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors", "xraygpt_config.json"]
    clone = XrayGPT.from_pretrained(tmp_path / "ckpt", encoder=model.encoder, llm=model.llm, tokenizer=model.tokenizer)
    assert torch.equal(clone.llama_proj.weight, model.llama_proj.weight)
    assert clone.config == model.config


def test_original_pth_import_ignores_extra_keys(model, tmp_path):
    w, b = torch.randn(64, 256), torch.randn(64)
    torch.save({"model": {"llama_proj.weight": w, "llama_proj.bias": b, "ln_vision.weight": torch.ones(3)},
                "epoch": 3}, tmp_path / "xraygpt.pth")
    model.load_original_checkpoint(tmp_path / "xraygpt.pth")
    assert torch.equal(model.llama_proj.weight, w) and torch.equal(model.llama_proj.bias, b)


def test_export_then_import_original_format(model, tmp_path):
    path = model.export_original_checkpoint(tmp_path / "out.pth")
    raw = torch.load(path, weights_only=True)
    assert set(raw["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    before = model.llama_proj.weight.clone()
    torch.nn.init.zeros_(model.llama_proj.weight)
    model.load_original_checkpoint(path)
    assert torch.equal(model.llama_proj.weight, before)


def test_projection_shape_mismatch_names_both_shapes(model, tmp_path):
    torch.save({"model": {"llama_proj.weight": torch.randn(4096, 768), "llama_proj.bias": torch.randn(4096)}},
               tmp_path / "vicuna7b.pth")
    with pytest.raises(ValueError, match=r"shape \(4096, 768\) but this model expects \(64, 256\)"):
        model.load_original_checkpoint(tmp_path / "vicuna7b.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_checkpoint_is_refused(model, tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        model.load_original_checkpoint(tmp_path / "evil.pth")


def test_from_pretrained_on_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no xraygpt_config.json"):
        XrayGPT.from_pretrained(tmp_path)


def test_unknown_generation_setting(model):
    with pytest.raises(TypeError, match="unknown generation setting 'beams'"):
        model.generate(pixels(1), "Q", beams=2)


@pytest.mark.slow
def test_real_smollm2_forward_backward_trains_only_projection(smollm2_dir):
    """The embedded default: real SmolLM2-135M + the shipped tiny encoder, one forward/backward."""
    from xraygpt.llm import LLMConfig

    torch.manual_seed(0)
    m = XrayGPT(ModelConfig(llm=LLMConfig(name_or_path=str(smollm2_dir))))
    assert m.llama_proj.weight.shape == (576, 256)
    assert m.parameter_counts()["trainable"] == 576 * 256 + 576
    batch = m.processor(["Describe the given chest x-ray image in detail."] * 2,
                        ["The lungs are clear. No acute disease.", "Heart size is mildly enlarged."])
    m.train()
    loss = m(**batch, pixel_values=pixels(2)).loss
    assert 0 < loss.item() < 20
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(grads) == {"llama_proj.weight", "llama_proj.bias"}
    assert grads["llama_proj.weight"].abs().sum() > 0
