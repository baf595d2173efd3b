"""Stage 0 (MedCLIP-style encoder pretraining): the loss on hand-made values, and a short real run.

The short run builds the embedded dataset for the first 80 IU reports (real reports, rendered films) in a
temp folder, trains xray-vgg-tiny for a few steps, and checks the loss falls, the checkpoint loads through
the encoder registry with identical features, and a rerun reuses it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xraygpt.config import ConfigError, load_config
from xraygpt.encoders import EncoderConfig, build_encoder
from xraygpt.encoders.open_clip_encoder import build_open_clip_model
from xraygpt.encoders.pretrain import (
    CHECKPOINT_NAME,
    INIT_NAME,
    META_NAME,
    EncoderPretrainConfig,
    auroc,
    batch_order,
    contrastive_loss,
    encode_text,
    evaluate_encoder,
    pretrain_encoder,
    semantic_similarity,
    semantic_targets,
)

REPO = Path(__file__).resolve().parents[1]
STAGE0_YAML = REPO / "configs" / "demo" / "stage0_encoder.yaml"


# ---------------------------------------------------------------------------------------------- loss, exact
def test_semantic_targets_exact_values():
    labels = torch.tensor([
        [1, 0, 0],  # two identical "normal" pairs: they share their mass equally
        [1, 0, 0],
        [0, 1, 1],  # overlaps row 3 with cosine 1/sqrt(2)
        [0, 1, 0],
        [0, 0, 0],  # unlabelled: matches only itself
    ], dtype=torch.float32)  # fmt: skip
    a, b = 2 - math.sqrt(2), math.sqrt(2) - 1  # 1 / (1 + 1/sqrt2) and (1/sqrt2) / (1 + 1/sqrt2)
    expected = torch.tensor([
        [0.5, 0.5, 0, 0, 0],
        [0.5, 0.5, 0, 0, 0],
        [0, 0, a, b, 0],
        [0, 0, b, a, 0],
        [0, 0, 0, 0, 1],
    ])  # fmt: skip
    got = semantic_targets(labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(got.sum(1), torch.ones(5), rtol=0, atol=1e-7)


def test_contrastive_loss_exact_values():
    feats = torch.eye(4)  # image i and report i identical unit vectors: logits = scale * I
    e = math.e
    # identity targets: -log softmax of the diagonal = log(e + 3) - 1, in both directions
    plain = contrastive_loss(feats, feats, torch.tensor(1.0))
    assert plain.item() == pytest.approx(math.log(e + 3) - 1, abs=1e-6)
    # semantic targets: every row sums to 1, so each direction costs mean_i(L - t_ii) with L = log(e + 3);
    # the label similarity is symmetric, so both directions see the same targets
    labels = torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 1]])
    t, sim = semantic_targets(labels), semantic_similarity(labels)
    torch.testing.assert_close(sim, sim.T, rtol=0, atol=0)
    s = 1 / math.sqrt(2)  # cosine of [1, 1] with [1, 0] and with [0, 1]
    assert t[0].tolist() == pytest.approx([1 / (2 + s), 1 / (2 + s), 0, s / (2 + s)], abs=1e-7)
    diag = [1 / (2 + s), 1 / (2 + s), 1 / (1 + s), 1 / (1 + 3 * s)]
    expected = math.log(e + 3) - sum(diag) / 4
    assert contrastive_loss(feats, feats, torch.tensor(1.0), sim).item() == pytest.approx(expected, abs=1e-6)
    # a uniform logit matrix costs log(B) whatever the targets
    zeros = torch.zeros(4, 4)
    assert contrastive_loss(zeros, zeros, torch.tensor(1.0), sim).item() == pytest.approx(math.log(4), abs=1e-6)
    with pytest.raises(ValueError, match="positive diagonal"):
        contrastive_loss(feats, feats, torch.tensor(1.0), torch.zeros(4, 4))


def test_auroc_exact_with_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert auroc([1.0, 2.0], [1, 1]) is None


def test_batch_order_full_disjoint_seeded():
    lengths = torch.randint(5, 100, (50,), generator=torch.Generator().manual_seed(1))
    a = batch_order(lengths, 8, 2, torch.Generator().manual_seed(0))
    b = batch_order(lengths, 8, 2, torch.Generator().manual_seed(0))
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert len(a) == 6 and all(len(x) == 8 for x in a)  # 50 // 8 full batches, the last 2 dropped
    flat = torch.cat(a).tolist()
    assert len(set(flat)) == 48


# ---------------------------------------------------------------------------------------------- config
def test_demo_config_loads_and_points_where_later_stages_read():
    cfg = load_config(EncoderPretrainConfig, STAGE0_YAML)
    assert cfg.model.name == "xray-vgg-tiny" and cfg.data.embedded and cfg.loss.semantic and cfg.loss.label_weight > 0
    assert Path(cfg.run.output_dir) / CHECKPOINT_NAME == Path("outputs/demo/stage0/encoder.safetensors")
    assert STAGE0_YAML.read_text().startswith("#") and "scripts/train_encoder.py --cfg" in STAGE0_YAML.read_text()
    with pytest.raises(ConfigError, match="run.epoch'.*Did you mean 'epochs'"):
        load_config(EncoderPretrainConfig, STAGE0_YAML, ["run.epoch=3"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(EncoderPretrainConfig, STAGE0_YAML, ["run.batch_size=1"])


# ---------------------------------------------------------------------------------------------- short real run
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from xraygpt.data.embedded import build_embedded_dataset

    tmp = tmp_path_factory.mktemp("stage0")
    mp = pytest.MonkeyPatch()
    mp.setenv("XRAYGPT_CACHE", str(tmp / "cache"))
    ds = build_embedded_dataset(out_dir=tmp / "data", limit=80)
    overrides = [f"data.root={ds.root}", "data.limit=80", f"run.output_dir={tmp / 'run'}", "run.batch_size=16",
                 "run.epochs=5", "run.length_buckets=1", "run.progress=false", "optim.lr=1e-3"]  # fmt: skip
    cfg = load_config(EncoderPretrainConfig, STAGE0_YAML, overrides)
    result = pretrain_encoder(cfg)
    yield cfg, overrides, result, ds
    mp.undo()


def test_short_run_loss_falls_and_saves(short_run):
    cfg, _, result, ds = short_run
    history = result.meta["train"]["epoch_mean_loss"]
    assert len(history) == 5
    # falls every epoch, well clear of noise (measured: 3.42 -> 3.06 -> 3.01 -> 2.99 -> 2.98)
    assert all(b < a for a, b in zip(history, history[1:])), history
    assert history[-1] < history[0] - 0.25, history
    out = Path(cfg.run.output_dir)
    meta = json.loads((out / META_NAME).read_text())
    assert meta["data"]["n_train"] == ds.manifest["splits"]["train"]
    assert meta["data"]["manifest_version"] == ds.manifest["version"]
    assert meta["config"]["run"]["batch_size"] == 16 and meta["model_name"] == "xray-vgg-tiny"
    assert result.checkpoint == out / CHECKPOINT_NAME and not result.reused


def test_checkpoint_loads_through_registry_with_identical_features(short_run):
    _, _, result, _ = short_run
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    pooled = build_encoder(EncoderConfig(type="open_clip", name="xray-vgg-tiny", checkpoint=str(result.checkpoint),
                                         feature="pooled"))  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(pooled(x)[:, 0], result.model.encode_image(x), rtol=0, atol=0)
    patch = build_encoder(EncoderConfig(type="open_clip", name="xray-vgg-tiny", checkpoint=str(result.checkpoint)))
    random = build_encoder(EncoderConfig(type="open_clip", name="xray-vgg-tiny"))
    with torch.no_grad():
        assert patch(x).shape == (2, 64, 128)  # cxr_vgg_tiny: 8x8 grid of 128 channels
        assert not torch.allclose(patch(x), random(x))


def test_label_head_is_saved_and_the_untrained_twin_beside_it(short_run):
    cfg, _, result, ds = short_run
    classes = json.loads(ds.labels_file.read_text())["classes"]
    labels = build_encoder(EncoderConfig(type="open_clip", name="xray-vgg-tiny", checkpoint=str(result.checkpoint),
                                         feature="labels"))  # fmt: skip
    assert labels.label_classes == classes and result.meta["label_classes"] == classes
    init_file = result.checkpoint.parent / INIT_NAME
    untrained = build_encoder(EncoderConfig(type="open_clip", name="xray-vgg-tiny", checkpoint=str(init_file),
                                            feature="labels"))  # fmt: skip
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained_f, untrained_f = labels(x), untrained(x)
    assert trained_f.shape == untrained_f.shape == (2, 64, 2 * len(classes))
    assert not torch.allclose(trained_f, untrained_f)
    # the untrained twin is the seeded init (run.seed) that evaluate_encoder also calls "random"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        reference = build_open_clip_model("xray-vgg-tiny")
    saved = build_open_clip_model("xray-vgg-tiny", init_file)
    for (name, a), b in zip(reference.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name


def test_trimmed_text_encoding_equals_full_context(short_run):
    _, _, result, _ = short_run
    from xraygpt.encoders import get_open_clip_tokenizer

    tokens = get_open_clip_tokenizer("xray-vgg-tiny")(["heart size normal. lungs clear.", "small left effusion"])
    with torch.no_grad():
        full = result.model.encode_text(tokens, normalize=True)
        torch.testing.assert_close(encode_text(result.model, tokens), full, rtol=0, atol=1e-6)


def test_rerun_reuses_and_other_config_refuses(short_run):
    cfg, overrides, result, _ = short_run
    mtime = result.checkpoint.stat().st_mtime_ns
    again = pretrain_encoder(load_config(EncoderPretrainConfig, STAGE0_YAML, overrides + ["run.progress=true"]))
    assert again.reused and again.model is None and result.checkpoint.stat().st_mtime_ns == mtime
    assert again.meta == json.loads(json.dumps(result.meta))  # the saved record (tuples read back as lists)
    init_file = result.checkpoint.parent / INIT_NAME
    before = load_file(init_file)
    init_file.unlink()  # a run saved before the untrained twin existed gets it on reuse, identical
    pretrain_encoder(load_config(EncoderPretrainConfig, STAGE0_YAML, overrides))
    after = load_file(init_file)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(FileExistsError, match="run.seed"):
        pretrain_encoder(load_config(EncoderPretrainConfig, STAGE0_YAML, overrides + ["run.seed=1"]))


def test_evaluate_encoder_reports_both_encoders(short_run):
    cfg, _, result, ds = short_run
    ev = evaluate_encoder(cfg, result.checkpoint)
    assert ev["n_test"] == ds.manifest["splits"]["test"]
    for name in ("trained", "random"):
        r = ev["retrieval"][name]
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1
        assert set(ev["probe_auroc"][name]) == set(json.loads(ds.labels_file.read_text())["classes"])
    head = ev["label_head_auroc"]["trained"]
    assert set(head) == set(json.loads(ds.labels_file.read_text())["classes"])
    assert all(v is None or 0 <= v <= 1 for v in head.values())


def test_vit_stage0_config_trains_a_vit_whose_loss_falls(tmp_path):
    """The shipped ViT alternative (xray-vit-hybrid: conv stem + transformer blocks) runs the same recipe."""
    from xraygpt.data.embedded import build_embedded_dataset
    from xraygpt.encoders.open_clip_encoder import TimmModel

    ds = build_embedded_dataset(out_dir=tmp_path / "data", limit=80)
    cfg = load_config(EncoderPretrainConfig, REPO / "configs" / "demo" / "stage0_encoder_vit.yaml",
                      [f"data.root={ds.root}", "data.limit=80", f"run.output_dir={tmp_path / 'run'}",
                       "run.batch_size=16", "run.epochs=5", "run.length_buckets=1", "run.progress=false"])  # fmt: skip
    assert cfg.model.name == "xray-vit-hybrid" and cfg.loss.label_weight > 0
    result = pretrain_encoder(cfg)
    history = result.meta["train"]["epoch_mean_loss"]
    assert history[-1] < history[0] - 0.25, history
    trunk = result.model.visual
    assert isinstance(trunk, TimmModel) and len(trunk.trunk.blocks) == 4  # a transformer, not a convnet
    enc = build_encoder(EncoderConfig(type="open_clip", name="xray-vit-hybrid", checkpoint=str(result.checkpoint),
                                      feature="labels"))  # fmt: skip
    assert enc(torch.zeros(1, 3, 128, 128)).shape == (1, 64, 28)


def test_mesh_label_set_trains_a_finer_head_from_train_tags(tmp_path):
    """data.label_set=mesh: the head predicts CheXpert-14 plus drawn MeSH findings, sides and zones; classes come
    from the training split's tags, written beside the run; encoder.feature=labels then reads 2 x that many."""
    from xraygpt.data.embedded import build_embedded_dataset

    ds = build_embedded_dataset(out_dir=tmp_path / "data", limit=80)
    cfg = load_config(EncoderPretrainConfig, STAGE0_YAML,
                      [f"data.root={ds.root}", "data.limit=80", f"run.output_dir={tmp_path / 'run'}",
                       "run.batch_size=16", "run.epochs=1", "run.progress=false", "data.label_set=mesh",
                       "data.mesh_min_films=2"])  # fmt: skip
    result = pretrain_encoder(cfg)
    derived = json.loads((tmp_path / "run" / "labels_mesh.json").read_text())
    chexpert = json.loads(ds.labels_file.read_text())["classes"]
    classes = result.meta["label_classes"]
    assert classes == derived["classes"] and classes[:14] == chexpert and len(classes) > 20
    assert any("|right" in c or "|left" in c for c in classes)  # sides became classes
    assert result.meta["data"]["label_set"] == "mesh"
    enc = build_encoder(EncoderConfig(type="open_clip", name="xray-vgg-tiny", checkpoint=str(result.checkpoint),
                                      feature="labels"))  # fmt: skip
    assert enc.label_classes == classes and enc(torch.zeros(1, 3, 128, 128)).shape == (1, 64, 2 * len(classes))
    with pytest.raises(ConfigError, match="label_set must be one of"):
        load_config(EncoderPretrainConfig, STAGE0_YAML, ["data.label_set=mesh14"])
