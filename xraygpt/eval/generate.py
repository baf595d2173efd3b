"""Batched generation over a split -> predictions JSONL (resumable), for the metric tables.

Deterministic by default: one fixed instruction, greedy decoding, left padding, and the LLM computed in float32
(`compute_dtype`), so a sample's greedy output does not depend on the batch it was in, the batch size, or where a
resumed run restarted. The original's random-prompt behaviour is available (seeded per sample).
`shuffle_images` breaks the image/report pairing with a seeded derangement: the control row that shows how
much the image itself contributes.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from xraygpt.conversation import DEFAULT_INSTRUCTION, default_prompt_file, pick_instruction, read_prompt_file
from xraygpt.data.dataset import CaptionDataset
from xraygpt.data.image_processing import ImageTransform
from xraygpt.eval.predictions import _drop_partial_last_line, append_predictions, done_ids
from xraygpt.model import GenerationConfig, ModelConfig, XrayGPT

log = logging.getLogger(__name__)
PREDICTIONS_NAME = "predictions.jsonl"  # in output_dir; the shuffled-image control's in output_dir/control


@dataclass
class EvalDataConfig:
    root: str = ""  # dataset folder (image/ + annotations)
    ann_file: str = "splits/test.json"  # the split to evaluate, relative to root unless absolute
    embedded: bool = True  # use the embedded IU dataset (root ignored)
    limit: int | None = None  # first N samples (smoke runs, demo)


@dataclass
class EvalConfig:
    ckpt: str = "outputs/demo/stage2"  # training output dir, model dir (xraygpt_config.json) or original .pth
    model: ModelConfig = field(default_factory=ModelConfig)  # used only when ckpt is an original .pth
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    name: str = "XrayGPT"  # the table row's name
    output_dir: str = "outputs/eval/xraygpt"
    batch_size: int = 16
    # float32: a half-precision LLM (dtype auto/bfloat16/float16) is upcast for evaluation, the same weight values
    # computed in float32, so outputs are batch-invariant. bf16 kernels block differently for other batch shapes:
    # here 15 of 32 films' greedy outputs changed between batch 8 and 32. model: keep the loaded dtype (less memory,
    # faster on GPUs; a table then reproduces only with the same batch_size). Quantized LLMs always keep theirs.
    compute_dtype: str = "float32"
    instruction: str = DEFAULT_INSTRUCTION
    random_prompt: bool = False  # the original's behaviour: a random instruction from prompt_file per sample
    prompt_file: str | None = None
    seed: int = 0
    shuffle_images: bool = False  # control: each reference is paired with another sample's image
    control: bool = False  # also run the shuffled-image control and put it in the same table
    metrics: list[str] = field(default_factory=lambda: ["rouge", "nlg", "clinical"])
    bootstrap: int = 1000
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto|cpu|cuda, got '{self.device}'")
        if self.compute_dtype not in ("float32", "model"):
            raise ValueError(f"compute_dtype must be float32 or model, got '{self.compute_dtype}'")


def load_model(ckpt: str | Path, model_cfg: ModelConfig | None = None) -> XrayGPT:
    """A trained model from a run dir / model dir, or an original .pth on top of `model_cfg`."""
    from xraygpt.train.init import find_model_dir

    path = Path(ckpt).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        model = XrayGPT(model_cfg or ModelConfig())
        model.load_original_checkpoint(path)
        return model
    return XrayGPT.from_pretrained(find_model_dir(path))


def use_compute_dtype(model: XrayGPT, compute_dtype: str) -> str:
    """Put the LLM in the evaluation's compute dtype (see EvalConfig.compute_dtype); returns the dtype it runs in."""
    llm_cfg = model.config.llm
    dtype = next(model.llm.parameters()).dtype
    if compute_dtype == "float32" and dtype in (torch.bfloat16, torch.float16):
        if llm_cfg.load_in_8bit or llm_cfg.load_in_4bit:
            log.warning("compute_dtype=float32: the LLM is quantized (llm.load_in_8bit/4bit) and keeps its compute "
                        "dtype; its outputs can depend on the batch size")
        else:
            model.llm.float()  # upcasting is exact: the weights keep the values the projection was trained with
            dtype = torch.float32
    return str(dtype).removeprefix("torch.")


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point (n >= 2): sample i gets image perm[i] != i."""
    if n < 2:
        return list(range(n))
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


def resolve_split(cfg: EvalConfig) -> tuple[Path, Path]:
    if cfg.data.embedded:
        from xraygpt.data.embedded import build_embedded_dataset

        ds = build_embedded_dataset()
        root = Path(ds.root)
    else:
        root = Path(cfg.data.root).expanduser()
    ann = Path(cfg.data.ann_file)
    return root, ann if ann.is_absolute() else root / ann


class OutputWriteError(RuntimeError):
    """The predictions file cannot be written (disk full, quota, file size limit)."""


def append_durably(path: Path, records: list[dict]) -> None:
    """Append a batch of predictions; if the write fails part-way, cut the file back to what it held before, so
    the lines already written stay intact and a rerun resumes from them."""
    if path.exists():
        _drop_partial_last_line(path)  # an interrupted earlier write; then `size` ends on a whole line
    size = path.stat().st_size if path.exists() else 0
    try:
        append_predictions(path, records)
    except OSError as e:
        try:
            with open(path, "r+b") as f:
                f.truncate(size)
        except OSError:
            pass  # done_ids ignores a partial last line anyway
        raise OutputWriteError(
            f"cannot write predictions to {path} ({e.strerror or e}): free disk space (or raise the quota / file "
            f"size limit) and rerun the same command; the predictions already in the file are kept and the run "
            f"resumes after them") from None


def generate_predictions(cfg: EvalConfig, model: XrayGPT | None = None) -> Path:
    """Generate (or finish generating) `<output_dir>/predictions.jsonl`; return its path."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no GPU is visible; use device=cpu")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preds_path = out_dir / PREDICTIONS_NAME
    model = model or load_model(cfg.ckpt, cfg.model)
    model.to(device).eval()
    llm_dtype = use_compute_dtype(model, cfg.compute_dtype)
    root, ann = resolve_split(cfg)
    dataset = CaptionDataset(root, ann, transform=ImageTransform(model.encoder.processing, train=False))
    n = len(dataset) if cfg.data.limit is None else min(cfg.data.limit, len(dataset))
    image_of = derangement(n, cfg.seed) if cfg.shuffle_images else list(range(n))
    prompts = read_prompt_file(cfg.prompt_file or default_prompt_file()) if cfg.random_prompt else None
    done = done_ids(preds_path) if preds_path.exists() else set()
    todo = [i for i in range(n) if dataset.record(i)["image_id"] not in done]
    if done:
        log.info("%s: %d predictions already done, %d to go", preds_path, n - len(todo), len(todo))
    identity = {"ckpt": str(cfg.ckpt), "encoder": model.config.encoder.name, "llm": model.config.llm.name_or_path,
                "llm_dtype": llm_dtype}
    settings = asdict(cfg.generation)
    bar = None
    if cfg.progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="generate", unit="img")
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start:start + cfg.batch_size]
        pixels = torch.stack([dataset[image_of[i]]["image"] for i in chunk]).to(device)
        instructions = [pick_instruction(prompts, cfg.seed, 0, i) if prompts else cfg.instruction for i in chunk]
        texts = model.generate(pixels, instructions, generation=cfg.generation)
        records = []
        for i, q, text in zip(chunk, instructions, texts):
            rec = dataset.record(i)
            records.append({"image_id": rec["image_id"], "reference": rec["caption"], "prediction": text,
                            "instruction": q, "image_source": dataset.record(image_of[i])["image_id"],
                            "generation": settings, "model": identity})
        append_durably(preds_path, records)  # durable per batch: a kill loses at most one batch
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    (out_dir / "eval_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    return preds_path
