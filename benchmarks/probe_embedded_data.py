"""Do the rendered films really carry their labels? Probe them from raw pixels.

    python benchmarks/probe_embedded_data.py [--out benchmarks/results/probe_embedded_data.json] [--epochs 10]

Trains two probes on the train split of the embedded dataset and scores test AUROC per CheXpert class:
a linear model on 64x64 pixels and a tiny CNN on 128x128 pixels (torch, CPU, about a minute each on 2 cores).
Requirement (issue 4): AUROC >= 0.9 for every class with >= 20 test positives. Writes numbers only.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from xraygpt.data.embedded import build_embedded_dataset

MIN_POSITIVES = 20
TARGET_AUROC = 0.9


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Mann-Whitney AUROC with average ranks for ties; None when a class has no positive or no negative."""
    pos, n = int(labels.sum()), len(labels)
    if pos == 0 or pos == n:
        return None
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(n, np.float64)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * (n - pos)))


def load_split(root: Path, split: str, labels: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    anns = json.loads((root / "splits" / f"{split}.json").read_text())["annotations"]
    ids = [a["image_id"] for a in anns if labels[a["image_id"]]["labelled"]]
    x = np.stack([np.asarray(Image.open(root / "image" / f"{i}.png").convert("L").resize((size, size), Image.BOX))
                  for i in ids]).astype(np.float32) / 255.0  # fmt: skip
    y = np.array([labels[i]["labels"] for i in ids], np.float32)
    return x, y


class TinyCNN(nn.Module):
    """conv-BN-ReLU-maxpool x4 (128 -> 8 px) and a linear head on mean+max pooled features.

    Max pooling (not strided convs) keeps a 2-pixel bright granuloma alive down to the head.
    """

    def __init__(self, n_out: int):
        super().__init__()
        chans = [1, 8, 24, 48, 64]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * chans[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) -> (B, n_out)
        f = self.features(x)  # (B, 64, H/16, W/16)
        return self.head(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, wd: float, seed: int,
          shift: int = 0, verbose: bool = False) -> nn.Module:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    pos = yt.mean(0).clamp(1e-3, 1 - 1e-3)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=((1 - pos) / pos).sqrt())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * (len(x) // 64)  # full batches only: a 1-sample batch wrecks BatchNorm statistics
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for k in range(0, len(x) - 63, 64):
            idx = perm[k : k + 64]
            xb = xt[idx]
            if shift:  # small random translation so position alone cannot be memorised
                dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
                xb = torch.roll(xb, (dy, dx), dims=(-2, -1))
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"  epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    return torch.cat([model(torch.from_numpy(x[k : k + 256])) for k in range(0, len(x), 256)]).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "probe_embedded_data.json")
    ap.add_argument("--data", type=Path, default=None, help="embedded dataset folder (default: build/reuse the cache)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)

    t0 = time.perf_counter()
    ds = build_embedded_dataset(args.data)
    meta = json.loads(ds.labels_file.read_text())
    classes, labels = meta["classes"], meta["images"]
    t_build = time.perf_counter() - t0

    results: dict[str, dict] = {}
    timings = {"build_or_reuse_s": round(t_build, 2)}
    for name, size in (("linear_64px", 64), ("cnn_128px", 128)):
        t = time.perf_counter()
        xtr, ytr = load_split(ds.root, "train", labels, size)
        xte, yte = load_split(ds.root, "test", labels, size)
        mean, std = xtr.mean(0, keepdims=True), xtr.std(0, keepdims=True) + 1e-3
        if name.startswith("linear"):
            model = nn.Sequential(nn.Flatten(), nn.Linear(size * size, len(classes)))
            model = train(model, (xtr - mean) / std, ytr, epochs=40, lr=1e-3, wd=0.05, seed=args.seed)
            scores = predict(model, (xte - mean) / std)
        else:
            model = TinyCNN(len(classes))
            m, s = float(xtr.mean()), float(xtr.std())
            model = train(model, ((xtr - m) / s)[:, None], ytr, epochs=args.epochs, lr=3e-3, wd=1e-4,
                          seed=args.seed, shift=4, verbose=True)  # fmt: skip
            scores = predict(model, ((xte - m) / s)[:, None])
        timings[f"{name}_s"] = round(time.perf_counter() - t, 1)
        print(f"{name}: trained and scored in {timings[f'{name}_s']} s", flush=True)
        for k, c in enumerate(classes):
            r = results.setdefault(c, {"train_positives": int(ytr[:, k].sum()), "test_positives": int(yte[:, k].sum())})
            a = auroc(scores[:, k], yte[:, k])
            r[f"auroc_{name}"] = None if a is None else round(a, 4)
    n_test = len(yte)

    required = [c for c, r in results.items() if r["test_positives"] >= MIN_POSITIVES]
    passed = {
        p: all((results[c][f"auroc_{p}"] or 0) >= TARGET_AUROC for c in required) for p in ("linear_64px", "cnn_128px")
    }
    out = {
        "data_version": ds.manifest["version"],
        "n_train": len(ytr), "n_test": n_test,
        "requirement": f"AUROC >= {TARGET_AUROC} for classes with >= {MIN_POSITIVES} test positives",
        "required_classes": required,
        "passed": passed,
        "per_class": results,
        "timings_s": timings,
        "epochs_cnn": args.epochs, "seed": args.seed,
        "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'class':28s} {'test+':>5s} {'linear64':>9s} {'cnn128':>7s}")
    for c, r in results.items():
        fmt = lambda v: "   -" if v is None else f"{v:.3f}"  # noqa: E731
        mark = " *" if c in required else ""
        print(
            f"{c:28s} {r['test_positives']:5d} {fmt(r['auroc_linear_64px']):>9s} {fmt(r['auroc_cnn_128px']):>7s}{mark}"
        )
    print(f"* required (>= {MIN_POSITIVES} test positives); passed: {passed}; timings {timings}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
