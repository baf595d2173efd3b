"""Frozen-encoder feature cache: encode every image once, reuse across epochs, stages and runs.

The encoder is frozen, so its output for an image never changes: we store it as a memory-mapped float32
array (N, T, D_img) under `<cache>/features/<key>/features.npy`. The key hashes the encoder's identity
(type, name, checkpoint file size/mtime) and every image file's (image_id, path, size, mtime), so changing
either builds a new cache. Features use the eval transform (no augmentation), which is why `data.augment`
and the cache are exclusive. Each process encodes its slice into the shared file; the main process marks
the folder complete last, so a killed build is redone, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from xraygpt.assets import cache_dir

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"


def cache_key(encoder_identity: dict, dataset) -> str:
    h = hashlib.sha256(json.dumps(encoder_identity, sort_keys=True, default=str).encode())
    for i in range(len(dataset)):
        path = Path(dataset.image_path(i))
        st = path.stat()
        h.update(f"{dataset.record(i)['image_id']}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def load_or_build(encoder, dataset, *, accelerator, batch_size: int, root: str | Path | None = None,
                  progress: bool = True) -> np.ndarray:
    """Return a read-only (N, T, D_img) memmap of encoder features for `dataset` (eval transform)."""
    root = Path(root) if root else cache_dir("features")
    key = cache_key(encoder.identity(), dataset)
    folder = root / key
    final = folder / "features.npy"
    if (folder / COMPLETE).is_file():
        return np.load(final, mmap_mode="r")
    n, shape = len(dataset), (len(dataset), encoder.num_tokens, encoder.hidden_size)
    # A name of its own per job: two runs building the same cache at once must not share (and rename away) one
    # temp file; the ranks of one job agree on the main rank's name.
    name = [f"features.npy.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}" if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(name)
    tmp = folder / name[0]
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape).flush()
    accelerator.wait_for_everyone()
    out = open_memmap(tmp, mode="r+")
    rank, world = accelerator.process_index, accelerator.num_processes
    per = (n + world - 1) // world
    lo, hi = rank * per, min(n, (rank + 1) * per)
    param = next(encoder.parameters())
    encoder.to(accelerator.device)
    indices = range(lo, hi)
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=hi - lo, desc="feature cache", unit="img")
    else:
        bar = None
    for start in range(lo, hi, batch_size):
        idx = list(indices[start - lo:start - lo + batch_size])
        pixels = torch.stack([dataset[i]["image"] for i in idx]).to(accelerator.device, param.dtype)
        out[idx[0]:idx[-1] + 1] = encoder(pixels).float().cpu().numpy()
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    out.flush()
    del out
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        (folder / "meta.json").write_text(json.dumps({"encoder": encoder.identity(), "shape": list(shape)},
                                                     default=str, indent=2))
        (folder / COMPLETE).write_text("ok\n")
        log.info("feature cache written: %s %s", final, shape)
    accelerator.wait_for_everyone()
    return np.load(final, mmap_mode="r")
