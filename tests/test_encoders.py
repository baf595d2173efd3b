"""Image-encoder registry: tiny real towers of every type, frozen-ness, checkpoint round trips, loud errors."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from xraygpt.encoders import (
    EncoderConfig,
    build_encoder,
    build_open_clip_model,
    get_open_clip_tokenizer,
    list_encoders,
    save_open_clip_checkpoint,
)
from xraygpt.encoders.base import CXR_MEAN

TINY_SWIN = {"embed_dim": 16, "depths": [1, 2], "num_heads": [1, 2], "window_size": 2, "patch_size": 4}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8}
TINY = {
    # name: (config, expected (num_tokens, hidden_size))
    "open_clip": (EncoderConfig("open_clip", "xray-vit-tiny", image_size=32,
                                arch={"layers": 1, "width": 64, "head_width": 32, "patch_size": 16}), (4, 64)),
    "medclip_vit": (EncoderConfig("medclip", "vit", image_size=32, arch=TINY_SWIN), (16, 32)),
    "medclip_resnet": (EncoderConfig("medclip", "resnet", image_size=64), (4, 2048)),
    "hf_clip": (EncoderConfig("hf_clip", arch=TINY_CLIP), (16, 32)),
}


def pixels(encoder, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = encoder.processing.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def perturbed_(module: nn.Module, seed: int = 7) -> nn.Module:
    """Move every weight away from the seeded init, so a loader that silently skips keys is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_encoders_shape_and_frozen(kind):
    cfg, (tokens, hidden) = TINY[kind]
    encoder = build_encoder(cfg)
    assert (encoder.num_tokens, encoder.hidden_size) == (tokens, hidden)
    out = encoder(pixels(encoder))
    assert out.shape == (2, tokens, hidden) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    assert encoder.identity()["checkpoint"] is None
    json.dumps(encoder.identity())  # goes into saved configs and cache keys


@pytest.mark.parametrize("kind", ["open_clip", "medclip_vit", "medclip_resnet", "hf_clip"])
def test_pooled_feature_is_one_token(kind):
    cfg, _ = TINY[kind]
    encoder = build_encoder(EncoderConfig.from_dict({**cfg.to_dict(), "feature": "pooled"}))
    out = encoder(pixels(encoder))
    assert encoder.num_tokens == 1 and out.shape == (2, 1, encoder.hidden_size)


@pytest.mark.parametrize("kind", ["medclip_vit", "hf_clip"])
def test_token_grid_averages_square_regions_of_the_patch_grid(kind):
    cfg, (tokens, hidden) = TINY[kind]  # both 4x4 grids
    full = build_encoder(cfg)
    pooled = build_encoder(EncoderConfig.from_dict({**cfg.to_dict(), "token_grid": 2}))
    x = pixels(full)
    f, p = full(x), pooled(x)  # (2, 16, D), (2, 4, D)
    assert pooled.num_tokens == 4 and p.shape == (2, 4, hidden)
    grid = f.reshape(2, 4, 4, hidden)  # row-major patch grid
    top_right = grid[:, 0:2, 2:4].mean((1, 2))  # pooled token 1: rows 0-1, columns 2-3
    torch.testing.assert_close(p[:, 1], top_right)
    assert pooled.identity()["token_grid"] == 2 and "token_grid" not in full.identity()  # old cache keys unchanged


def test_token_grid_errors_name_the_key():
    with pytest.raises(ValueError, match="token_grid=8 needs a square patch grid of at least 8x8"):
        build_encoder(EncoderConfig.from_dict({**TINY["hf_clip"][0].to_dict(), "token_grid": 8})).num_tokens
    with pytest.raises(ValueError, match="feature=pooled has one token"):
        EncoderConfig("hf_clip", feature="pooled", token_grid=2)
    with pytest.raises(ValueError, match="integer >= 0"):
        EncoderConfig("hf_clip", token_grid=-1)


def test_random_init_is_seeded_and_leaves_caller_rng_alone():
    cfg = TINY["open_clip"][0]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = build_encoder(cfg), build_encoder(cfg)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert a.identity() == b.identity()


def test_shipped_tiny_vit_builds_and_is_fast():
    encoder = build_encoder(EncoderConfig())  # the embedded default: xray-vit-tiny, random init
    assert (encoder.num_tokens, encoder.hidden_size) == (49, 256)
    assert encoder.processing.image_size == 224 and encoder.processing.mean == CXR_MEAN
    x = pixels(encoder)
    with torch.no_grad():
        encoder(x)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = encoder(x)
            times.append(time.perf_counter() - start)
    assert out.shape == (2, 49, 256)
    assert min(times) < 1.0, times


def test_every_project_config_builds():
    for entry in list_encoders():
        if entry.startswith("open_clip:"):
            encoder = build_encoder(EncoderConfig("open_clip", entry.split(":", 1)[1]))
            with torch.no_grad():
                assert encoder(pixels(encoder, batch=1)).shape == (1, encoder.num_tokens, encoder.hidden_size)


def test_list_encoders():
    names = list_encoders()
    assert "open_clip:xray-vit-tiny" in names
    assert names[-3:] == ["medclip:vit", "medclip:resnet", "hf_clip"]


# ---- open_clip checkpoints ----

def test_open_clip_visual_checkpoint_round_trip(tmp_path):
    cfg, _ = TINY["open_clip"]
    source = perturbed_(build_encoder(cfg))
    x = pixels(source)
    want = source(x)
    visual = {k: v.clone() for k, v in source.visual.state_dict().items()}
    files = {
        "full.pt": {f"visual.{k}": v for k, v in visual.items()} | {"logit_scale": torch.ones(())},
        "wrapped.pt": {"state_dict": {f"module.visual.{k}": v for k, v in visual.items()}},
        "visual_only.safetensors": visual,
    }
    for name, state in files.items():
        if name.endswith(".safetensors"):
            from safetensors.torch import save_file
            save_file(state, str(tmp_path / name))
        else:
            torch.save(state, tmp_path / name)
        loaded = build_encoder(EncoderConfig.from_dict({**cfg.to_dict(), "checkpoint": str(tmp_path / name)}))
        torch.testing.assert_close(loaded(x), want, atol=0, rtol=0, msg=name)
        ident = loaded.identity()["checkpoint"]
        assert ident["files"][0]["size"] == (tmp_path / name).stat().st_size and len(ident["files"][0]["sha256"]) == 64

    # a larger input interpolates the position grid of the loaded checkpoint
    bigger = build_encoder(EncoderConfig.from_dict({**cfg.to_dict(), "image_size": 64,
                                                    "checkpoint": str(tmp_path / "full.pt")}))
    assert bigger.num_tokens == 16 and bigger(pixels(bigger)).shape == (2, 16, 64)


def test_stage0_full_model_save_and_load(tmp_path):
    model = build_open_clip_model("xray-vit-tiny").eval()
    path = save_open_clip_checkpoint(model, tmp_path / "stage0" / "clip.safetensors", {"step": 3})
    assert not list(path.parent.glob(".*tmp*"))  # the temp file was renamed away

    reloaded = build_open_clip_model("xray-vit-tiny", path)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name

    encoder = build_encoder(EncoderConfig("open_clip", "xray-vit-tiny", checkpoint=str(path)))
    x = pixels(encoder)
    model.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = model.visual(x)
    torch.testing.assert_close(encoder(x), tokens, atol=0, rtol=0)
    random_init = build_encoder(EncoderConfig("open_clip", "xray-vit-tiny"))
    assert not torch.allclose(random_init(x), tokens)

    with pytest.raises(ValueError, match="saved from open_clip config 'xray-vit-tiny'.*xray-vit-small"):
        build_encoder(EncoderConfig("open_clip", "xray-vit-small", checkpoint=str(path)))

    tokenizer = get_open_clip_tokenizer("xray-vit-tiny")  # offline BPE from the open_clip wheel
    ids = tokenizer(["heart size is normal", "no pleural effusion"])
    assert ids.shape == (2, 128) and model.encode_text(ids).shape == (2, 256)


def test_open_clip_folder_with_timm_tower(tmp_path):
    """BiomedCLIP-style folder: open_clip_config.json (timm ViT + its preprocess_cfg) + weights."""
    model_cfg = {"embed_dim": 32,
                 "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                "timm_pool": "", "timm_proj": "linear", "image_size": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    preprocess = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                               "preprocess_cfg": preprocess}))
    from open_clip.model import _build_vision_tower

    torch.manual_seed(5)
    visual = _build_vision_tower(32, model_cfg["vision_cfg"]).eval()
    torch.save({f"visual.{k}": v for k, v in visual.state_dict().items()}, tmp_path / "open_clip_pytorch_model.bin")

    encoder = build_encoder(EncoderConfig("open_clip", "ignored-when-folder-has-config", checkpoint=str(tmp_path)))
    assert encoder.processing.mean == (0.1, 0.2, 0.3) and encoder.processing.resize == "squash"
    assert (encoder.num_tokens, encoder.hidden_size) == (4, 192)
    x = pixels(encoder)
    visual.set_input_size(32)  # what open_clip does for force_image_size: resample the 224 grid after loading
    with torch.no_grad():
        want = visual.trunk.forward_features(x)[:, 1:]
    torch.testing.assert_close(encoder(x), want, atol=0, rtol=0)


# ---- MedCLIP ----

# transformers-5 Swin names -> the transformers-4 names in MedCLIP's published pytorch_model.bin
TO_MEDCLIP_NAMES = [("attention.q_proj.", "attention.self.query."), ("attention.k_proj.", "attention.self.key."),
                    ("attention.v_proj.", "attention.self.value."),
                    ("attention.relative_position_bias.relative_position_bias_table",
                     "attention.self.relative_position_bias_table"),
                    ("attention.o_proj.", "attention.output.dense."), ("mlp.fc1.", "intermediate.dense."),
                    ("mlp.fc2.", "output.dense.")]


def fake_medclip_vit(folder, seed: int = 11):
    """A MedCLIP-ViT-layout checkpoint around a tiny Swin: vision_model.model.* (old names) + heads + text."""
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(seed)
    swin = SwinModel(SwinConfig(image_size=32, **TINY_SWIN), add_pooling_layer=True).eval()
    state = {}
    for key, value in swin.state_dict().items():
        for new, old in TO_MEDCLIP_NAMES:
            key = key.replace(new, old)
        state[f"vision_model.model.{key}"] = value.clone()
        if key.endswith("relative_position_bias_table"):  # a persistent buffer in transformers 4
            index_key = key.replace("relative_position_bias_table", "relative_position_index")
            state[f"vision_model.model.{index_key}"] = torch.zeros(16, dtype=torch.long)
    state["vision_model.projection_head.weight"] = torch.randn(512, swin.config.hidden_size)
    state["text_model.projection_head.weight"] = torch.randn(512, 768)
    state["logit_scale"] = torch.tensor(4.6)
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    return swin, state


def test_medclip_vit_checkpoint_layout_loads(tmp_path):
    swin, state = fake_medclip_vit(tmp_path / "medclip-vit")
    assert any(".attention.self.query." in k for k in state)
    # no arch given: the Swin shape is inferred from the tensors
    encoder = build_encoder(EncoderConfig("medclip", "vit", checkpoint=str(tmp_path / "medclip-vit"), image_size=32))
    assert (encoder.num_tokens, encoder.hidden_size) == (16, 32)
    assert list(encoder.swin.config.depths) == [1, 2] and list(encoder.swin.config.num_heads) == [1, 2]
    loaded = encoder.swin.state_dict()
    for key, value in swin.state_dict().items():
        assert torch.equal(loaded[key], value), key
    x = pixels(encoder)
    with torch.no_grad():
        want = swin(pixel_values=x).last_hidden_state
    torch.testing.assert_close(encoder(x), want, atol=0, rtol=0)
    assert encoder.processing.mean == CXR_MEAN and encoder.processing.resize == "pad"


def test_medclip_resnet_checkpoint_layout_loads(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(3)
    net = resnet50(weights=None)
    net.fc = nn.Linear(2048, 512, bias=False)  # MedCLIP's projection head lives in model.fc
    net.eval()
    state = {f"vision_model.model.{k}": v for k, v in net.state_dict().items()}
    state["logit_scale"] = torch.tensor(4.6)
    torch.save(state, tmp_path / "pytorch_model.bin")

    encoder = build_encoder(EncoderConfig("medclip", "resnet", checkpoint=str(tmp_path / "pytorch_model.bin"),
                                          image_size=64))
    x = pixels(encoder)
    with torch.no_grad():
        fmap = nn.Sequential(*list(net.children())[:-2])(x)  # up to layer4
    torch.testing.assert_close(encoder(x), fmap.flatten(2).transpose(1, 2), atol=0, rtol=0)


# ---- HF CLIPVisionModel folders ----

def test_hf_clip_folder_round_trip(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(2)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP)).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5], "image_std": [0.25], "size": {"shortest_edge": 32},
         "crop_size": {"height": 32, "width": 32}}))

    last = build_encoder(EncoderConfig("hf_clip", checkpoint=str(tmp_path)))
    penultimate = build_encoder(EncoderConfig("hf_clip", checkpoint=str(tmp_path), layer=-2))
    assert last.processing.mean == (0.5,) * 3 and last.processing.std == (0.25,) * 3
    assert last.processing.image_size == 32 and (last.num_tokens, last.hidden_size) == (16, 32)
    x = pixels(last)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(last(x), out.last_hidden_state[:, 1:], atol=0, rtol=0)
    torch.testing.assert_close(penultimate(x), out.hidden_states[-2][:, 1:], atol=0, rtol=0)
    assert not torch.allclose(last(x), penultimate(x))
    names = [f["name"] for f in last.identity()["checkpoint"]["files"]]
    assert "config.json" in names and "preprocessor_config.json" in names


# ---- errors ----

def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"Did you mean 'xray-vit-tiny'\?[\s\S]*project configs: \[.*'xray-vit-tiny'"):
        build_encoder(EncoderConfig("open_clip", "xray-vit-tiyn"))
    with pytest.raises(ValueError, match=r"Did you mean 'medclip'\?.*'medclip:vit'"):
        build_encoder(EncoderConfig("medclp", "vit"))
    with pytest.raises(ValueError, match=r"Unknown MedCLIP variant 'swin'.*\['vit', 'resnet'\]"):
        build_encoder(EncoderConfig("medclip", "swin"))
    with pytest.raises(ValueError, match=r"Unknown encoder config key 'chekpoint'. Did you mean 'checkpoint'"):
        EncoderConfig.from_dict({"type": "medclip", "chekpoint": "x"})
    with pytest.raises(ValueError, match="encoder.feature must be one of"):
        EncoderConfig(feature="cls")


class Payload:
    """A pickled object that is not a tensor."""


def test_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "medclip.bin"
    with pytest.raises(FileNotFoundError, match="nowhere/medclip.bin"):
        build_encoder(EncoderConfig("medclip", "vit", checkpoint=str(missing)))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_encoder(EncoderConfig("open_clip", checkpoint=str(tmp_path / "nope.safetensors")))

    tiny = build_encoder(TINY["open_clip"][0])  # width 64 weights into the width-256 xray-vit-tiny
    torch.save(tiny.visual.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match=r"tiny.pt does not fit[\s\S]*(missing keys|shape mismatches)"):
        build_encoder(EncoderConfig("open_clip", "xray-vit-tiny", checkpoint=str(tmp_path / "tiny.pt")))

    torch.save({"model": Payload()}, tmp_path / "code.pt")  # weights_only=True must refuse it, never run it
    with pytest.raises(ValueError, match=r"code.pt with torch.load\(weights_only=True\)"):
        build_encoder(EncoderConfig("open_clip", "xray-vit-tiny", checkpoint=str(tmp_path / "code.pt")))


def test_identity_follows_the_checkpoint_content(tmp_path):
    cfg, _ = TINY["open_clip"]
    source = build_encoder(cfg)
    path = tmp_path / "visual.pt"
    torch.save(source.visual.state_dict(), path)
    first = build_encoder(EncoderConfig.from_dict({**cfg.to_dict(), "checkpoint": str(path)})).identity()
    torch.save(perturbed_(source).visual.state_dict(), path)
    second = build_encoder(EncoderConfig.from_dict({**cfg.to_dict(), "checkpoint": str(path)})).identity()
    assert first["checkpoint"]["path"] == second["checkpoint"]["path"]
    assert first["checkpoint"]["files"][0]["sha256"] != second["checkpoint"]["files"][0]["sha256"]
    del first["checkpoint"], second["checkpoint"]
    assert first == second  # nothing else in the identity changed


def test_cxr_vgg_trunk_is_a_timm_model_with_the_documented_grid():
    import timm

    from xraygpt.encoders.cxr_cnn import CxrCNN

    trunk = timm.create_model("cxr_vgg_tiny")  # registered when xraygpt.encoders.cxr_cnn is imported
    assert isinstance(trunk, CxrCNN) and trunk.num_features == 128
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    trunk.eval()
    fmap = trunk.forward_features(x)
    assert fmap.shape == (2, 128, 8, 8)  # four 2x2 max-pools: 128 px -> 8x8
    torch.testing.assert_close(trunk(x), 0.5 * (fmap.mean((2, 3)) + fmap.amax((2, 3))))  # avgmax pool
    trunk.reset_classifier(5, "max")
    assert trunk(x).shape == (2, 5)
    with pytest.raises(ValueError, match="catavgmax"):
        trunk.reset_classifier(0, "catavgmax")  # would double the width open_clip's projection expects
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("cxr_vgg_tiny", pretrained=True)
    encoder = build_encoder(EncoderConfig("open_clip", "xray-vgg-tiny"))
    assert (encoder.num_tokens, encoder.hidden_size) == (64, 128) and encoder.processing.image_size == 128


@pytest.mark.parametrize("name", ["xray-vgg-tiny", "xray-vit-tiny", "xray-vit-hybrid"])
def test_label_feature_is_image_and_patch_logits_of_the_saved_head(tmp_path, name):
    """feature=labels: every token = [the head on the pooled embedding | the head on that patch], exact."""
    torch.manual_seed(0)
    model = build_open_clip_model(name).eval()
    head = nn.Linear(256, 3)
    path = save_open_clip_checkpoint(model, tmp_path / "clip.safetensors", label_head=head,
                                     label_classes=["No Finding", "Cardiomegaly", "Edema"])  # fmt: skip
    assert build_open_clip_model(name, path) is not None  # the head does not break the full-model load
    from xraygpt.encoders.open_clip_encoder import has_label_head

    assert has_label_head(path)
    enc = build_encoder(EncoderConfig("open_clip", name, checkpoint=str(path), feature="labels"))
    assert enc.label_classes == ["No Finding", "Cardiomegaly", "Edema"] and enc.hidden_size == 6
    x = pixels(enc)
    feats = enc(x)  # (2, N, 6)
    assert feats.shape == (2, enc.num_tokens, 6)
    v = model.visual
    with torch.no_grad():
        if name == "xray-vgg-tiny":
            pooled = v(x)  # (2, 256): what stage 0 embeds (patch_mean of a timm tower = its pooled output)
            patches = v.head(v.trunk.forward_features(x).flatten(2).transpose(1, 2))  # (2, 64, 256)
        elif name == "xray-vit-hybrid":
            pooled = v(x)  # (2, 256): the timm ViT's average-pooled tokens, projected
            patches = v.head(v.trunk.forward_features(x))  # (2, 64, 256): no class token, norm before the pool
        else:
            v.output_tokens = True
            patches = v(x)[1] @ v.proj  # (2, 49, 256)
            pooled = patches.mean(1)
        scale = 16.0 / pooled.norm(dim=-1, keepdim=True)  # sqrt(256) / |pooled|: the unit embedding x sqrt(E)
        image, local = head(pooled * scale), head(patches * scale[:, None])
    torch.testing.assert_close(feats[:, :, :3], image[:, None].expand(-1, enc.num_tokens, -1))
    torch.testing.assert_close(feats[:, :, 3:], local)
    if name != "xray-vgg-tiny":  # linear all the way (avg pool): the patches' own logits average to the image's
        torch.testing.assert_close(local.mean(1), image, rtol=1e-5, atol=1e-5)


def test_label_feature_errors_name_the_fix(tmp_path):
    from xraygpt.encoders.open_clip_encoder import has_label_head

    plain = save_open_clip_checkpoint(build_open_clip_model("xray-vgg-tiny"), tmp_path / "plain.safetensors")
    assert not has_label_head(plain)  # evaluate_encoder then reports no label-head AUROC
    with pytest.raises(ValueError, match="label head.*loss.label_weight > 0"):
        build_encoder(EncoderConfig("open_clip", "xray-vgg-tiny", checkpoint=str(plain), feature="labels"))
    with pytest.raises(ValueError, match="label head.*random init"):
        build_encoder(EncoderConfig("open_clip", "xray-vgg-tiny", feature="labels"))
    with pytest.raises(ValueError, match="only open_clip"):
        build_encoder(EncoderConfig("medclip", "resnet", feature="labels"))
    with pytest.raises(ValueError, match="name the 2 outputs"):
        save_open_clip_checkpoint(build_open_clip_model("xray-vgg-tiny"), tmp_path / "bad.safetensors",
                                  label_head=nn.Linear(256, 2), label_classes=["a"])  # fmt: skip


@pytest.mark.parametrize("name", ["xray-vgg-tiny", "xray-cnn-tiny", "xray-vit-hybrid"])
def test_loading_a_cnn_tower_keeps_its_batchnorm_statistics(tmp_path, name):
    """Regression: building the encoder ran a probe forward in training mode, which moved BatchNorm's running
    statistics away from the checkpoint's, so every feature differed slightly from what stage 0 trained."""
    torch.manual_seed(0)
    model = build_open_clip_model(name)
    for module in model.visual.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics a trained tower would have: far from the init
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    path = save_open_clip_checkpoint(model, tmp_path / "clip.safetensors")
    encoder = build_encoder(EncoderConfig("open_clip", name, checkpoint=str(path)))  # patch: sized by a probe run
    saved = model.visual.state_dict()
    for key, value in encoder.visual.state_dict().items():
        assert torch.equal(value, saved[key]), key
    x = pixels(encoder)
    with torch.no_grad():
        tokens = model.visual.trunk.forward_features(x)
        tokens = tokens.flatten(2).transpose(1, 2) if tokens.ndim == 4 else tokens  # (2, N, W)
        torch.testing.assert_close(encoder(x), tokens, rtol=0, atol=0)
    assert encoder.identity()["feature_code"] == 2  # cached features of the old code are not reused
