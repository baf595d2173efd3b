"""Recipe units: schedule values, batch plan, optimizer groups, checkpoint atomicity, strict configs."""


import pytest
import torch

from xraygpt.config import ConfigError, load_config
from xraygpt.train import checkpoint as ckpt
from xraygpt.train.batches import BatchPlan
from xraygpt.train.config import TrainConfig
from xraygpt.train.optim import param_groups
from xraygpt.train.schedule import build_scheduler, lr_at

STAGE1 = dict(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=500, total_steps=5000)


def test_schedule_values_stage1():
    assert lr_at(0, **STAGE1) == 1e-6
    assert lr_at(250, **STAGE1) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert lr_at(500, **STAGE1) == pytest.approx(1e-4)
    assert lr_at(2750, **STAGE1) == pytest.approx(9e-5)  # half-way through the cosine
    assert lr_at(5000, **STAGE1) == pytest.approx(8e-5)
    assert lr_at(9999, **STAGE1) == pytest.approx(8e-5)


def test_scheduler_follows_lr_at():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = dict(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200, total_steps=1000)
    sched = build_scheduler(opt, **s)
    seen = []
    for _ in range(1000):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for step in (0, 1, 199, 200, 600, 999):
        assert seen[step] == pytest.approx(lr_at(step, **s), rel=1e-9)


def test_weight_decay_only_on_matrices():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    m[1].weight.requires_grad_(False)
    decay, no_decay = param_groups(m, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert [p.shape for p in no_decay["params"]] == [torch.Size([4]), torch.Size([4])]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_batch_plan_same_global_batch_for_any_process_count():
    one = BatchPlan(num_samples=100, batch_size=8, num_processes=1, grad_accum=1, seed=3)
    two = BatchPlan(num_samples=100, batch_size=4, num_processes=2, grad_accum=1, seed=3)
    acc = BatchPlan(num_samples=100, batch_size=2, num_processes=2, grad_accum=2, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == acc.steps_per_epoch == 12
    for step in (0, 5, 12, 30):
        want = sorted(i for _, i in one.micro_batches(step, 0)[0])
        got = sorted(i for r in (0, 1) for mb in two.micro_batches(step, r) for _, i in mb)
        got_acc = sorted(i for r in (0, 1) for mb in acc.micro_batches(step, r) for _, i in mb)
        assert want == got == got_acc
    assert one.micro_batches(12, 0)[0][0][0] == 1  # step 12 is epoch 1


def test_batch_plan_epochs_cover_each_sample_once():
    plan = BatchPlan(num_samples=64, batch_size=4, num_processes=2, grad_accum=2, seed=0)
    seen = [i for s in range(plan.steps_per_epoch) for r in (0, 1) for mb in plan.micro_batches(s, r) for _, i in mb]
    assert sorted(seen) == list(range(64))


def test_length_grouped_plan_pads_less_covers_each_sample_once_and_keeps_the_process_invariance():
    lengths = tuple(int(x) for x in torch.randint(5, 100, (203,), generator=torch.Generator().manual_seed(1)))
    plain = BatchPlan(203, 8, 1, 1, seed=4)
    grouped = BatchPlan(203, 8, 1, 1, seed=4, lengths=lengths, group=4)
    assert torch.equal(plain.permutation(0), BatchPlan(203, 8, 1, 1, 4, lengths, group=0).permutation(0))
    assert sorted(grouped.permutation(2).tolist()) == list(range(203))

    def padded(plan):  # tokens a step computes: batch size x its longest sample, over one epoch
        return sum(8 * max(lengths[i] for i in plan.step_samples(s)[1]) for s in range(plan.steps_per_epoch))

    assert padded(grouped) < 0.8 * padded(plain)
    # the first group of 4 batches holds the plain order's first 32 samples, longest first, batches reordered
    first = [grouped.step_samples(s)[1] for s in range(4)]
    assert sorted(i for b in first for i in b) == sorted(plain.permutation(0)[:32].tolist())
    assert all(min(lengths[i] for i in a) >= max(lengths[i] for i in b) or
               max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a in first for b in first if a != b)
    assert grouped.permutation(0).tolist() == BatchPlan(203, 8, 1, 1, 4, lengths, 4).permutation(0).tolist()
    assert grouped.permutation(0).tolist() != grouped.permutation(1).tolist()
    two = BatchPlan(203, 4, 2, 1, seed=4, lengths=lengths, group=4)  # same global batches on 2 processes
    for step in (0, 3, 30):
        assert sorted(i for r in (0, 1) for mb in two.micro_batches(step, r) for _, i in mb) == \
            sorted(grouped.step_samples(step)[1])
    with pytest.raises(ValueError, match="one length per sample"):
        BatchPlan(203, 8, 1, 1, seed=0, group=2)


def test_batch_plan_too_small_dataset_is_clear():
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        BatchPlan(num_samples=10, batch_size=8, num_processes=1, grad_accum=2, seed=0).steps_per_epoch


def test_checkpoint_commit_is_atomic(tmp_path):
    tmp = ckpt.begin_checkpoint(tmp_path, 10)
    (tmp / "model.safetensors").write_bytes(b"x")
    assert ckpt.latest_checkpoint(tmp_path) is None  # a kill here leaves nothing that looks complete
    ckpt.commit_checkpoint(tmp_path, ckpt.TrainerState(step=10), tmp, keep_last=2)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000010"
    half = ckpt.begin_checkpoint(tmp_path, 20)  # killed during the next save
    (half / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000010"
    assert ckpt.clean_partial(tmp_path) == [half]


def test_checkpoint_pruning_keeps_last_and_best(tmp_path):
    for step in (1, 2, 3, 4):
        t = ckpt.begin_checkpoint(tmp_path, step)
        ckpt.commit_checkpoint(tmp_path, ckpt.TrainerState(step=step), t, keep_last=2, protect={"step_000001"})
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000001", "step_000003", "step_000004"]


def test_unknown_key_names_closest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'run.max_step'. Did you mean 'max_steps'\?"):
        load_config(TrainConfig, f)


def test_wrong_type_names_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match="run.batch_size: expected an integer"):
        load_config(TrainConfig, f)


def test_overrides_and_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_DATA", "/data/mimic")
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  root: ${oc.env:MY_DATA}\noptim:\n  init_lr: 1e-4\n")
    cfg = load_config(TrainConfig, f, ["run.max_steps=7", "model.llm.dtype=bfloat16"])
    assert cfg.data.root == "/data/mimic" and cfg.run.max_steps == 7
    assert cfg.optim.init_lr == 1e-4 and cfg.model.llm.dtype == "bfloat16"


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(TrainConfig, None, ["run.max_steps"])


def test_invalid_choice_is_clear():
    with pytest.raises(ValueError, match="run.mixed_precision must be"):
        load_config(TrainConfig, None, ["run.mixed_precision=fp8"])
