"""Clinical efficacy: label references and predictions with a CheXpert labeler, then precision / recall / F1.

Convention (R2Gen, CheXbert-based papers): a class is *positive* for a report when its label is 1; negative,
blank and (by default) uncertain count as not positive. ``uncertain="positive"`` counts -1 as positive instead
(the "U-ones" reading). Over the N reports and C classes:

- per-class P / R / F1 from TP, FP, FN of that class (0 where the denominator is 0, sklearn's zero_division=0);
- micro: the same from TP, FP, FN summed over classes;
- macro: the unweighted mean of the per-class values;
over all 14 classes and over the 5 common ones (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion).

Everything is a function of per-sample TP / FP / FN indicators, so a bootstrap resample is three matrix
products. Labelers: ``"rules"`` (built in, ``chexpert_labeler``) or ``"chexbert"`` (CheXbert, Smit et al. 2020),
only from weights already on disk: xraygpt never downloads them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chexpert_labeler import CLASSES, label_reports

FIVE_CLASSES: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
UNCERTAIN_POLICIES = ("negative", "positive")
CHEXBERT_ENV = "XRAYGPT_CHEXBERT_WEIGHTS"
BERT_DIR_ENV = "XRAYGPT_CHEXBERT_BERT_DIR"


def binarize(labels: np.ndarray, uncertain: str = "negative") -> np.ndarray:
    """(N, C) labels in {1, 0, -1, NaN} -> (N, C) bool "positive"."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    positive = labels == 1.0
    if uncertain == "positive":
        positive |= labels == -1.0
    return positive


@dataclass
class ClinicalCounts:
    """Per-sample indicators (N, C) of true positives, false positives and false negatives."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    classes: tuple[str, ...] = CLASSES

    @classmethod
    def from_labels(cls, reference: np.ndarray, prediction: np.ndarray, uncertain: str = "negative") -> ClinicalCounts:
        ref, pred = binarize(reference, uncertain), binarize(prediction, uncertain)
        return cls(tp=(ref & pred).astype(float), fp=(~ref & pred).astype(float), fn=(ref & ~pred).astype(float))

    def metrics(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """All clinical metrics (B,) for resample weights (B, N)."""
        w = np.atleast_2d(weights)
        return clinical_from_counts(w @ self.tp, w @ self.fp, w @ self.fn, self.classes)


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        r = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return p, r, f


def clinical_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray,
                         classes: Sequence[str] = CLASSES) -> dict[str, np.ndarray]:
    """Summed counts (B, C) -> {"ce_micro_f1_14": (B,), "ce_macro_precision_5": ..., "ce_f1[Edema]": ...}."""
    tp, fp, fn = (np.atleast_2d(x) for x in (tp, fp, fn))
    p, r, f = _prf(tp, fp, fn)  # (B, C) per class
    out: dict[str, np.ndarray] = {}
    five = [list(classes).index(c) for c in FIVE_CLASSES]
    for suffix, idx in (("14", slice(None)), ("5", five)):
        mp, mr, mf = _prf(tp[:, idx].sum(1), fp[:, idx].sum(1), fn[:, idx].sum(1))
        out[f"ce_micro_precision_{suffix}"], out[f"ce_micro_recall_{suffix}"], out[f"ce_micro_f1_{suffix}"] = mp, mr, mf
        out[f"ce_macro_precision_{suffix}"] = p[:, idx].mean(1)
        out[f"ce_macro_recall_{suffix}"] = r[:, idx].mean(1)
        out[f"ce_macro_f1_{suffix}"] = f[:, idx].mean(1)
    for j, c in enumerate(classes):
        out[f"ce_precision[{c}]"], out[f"ce_recall[{c}]"], out[f"ce_f1[{c}]"] = p[:, j], r[:, j], f[:, j]
    return out


def label_counts(labels: np.ndarray) -> dict[str, dict[str, int]]:
    """How many reports are positive / negative / uncertain / blank per class (for the JSON report)."""
    return {
        c: {"positive": int((labels[:, j] == 1).sum()), "negative": int((labels[:, j] == 0).sum()),
            "uncertain": int((labels[:, j] == -1).sum()), "blank": int(np.isnan(labels[:, j]).sum())}
        for j, c in enumerate(CLASSES)
    }


# ----------------------------------------------------------------------------- labeler backends


class CheXbertWeightsMissing(FileNotFoundError):
    """The CheXbert checkpoint (or the BERT config / vocabulary it needs) is not on disk."""


def _chexbert_hint() -> str:
    return (
        "CheXbert is optional and never downloaded by xraygpt. Put the checkpoint (chexbert.pth, from the CheXbert "
        "authors: github.com/stanfordmlgroup/CheXbert) on disk and pass chexbert_weights=PATH or set "
        f"${CHEXBERT_ENV}; it also needs a local bert-base-uncased folder (config.json + vocab.txt) given as "
        f"bert_dir=PATH or ${BERT_DIR_ENV}, or already in the Hugging Face cache. Or use labeler='rules'."
    )


# CheXbert's head order and its output codes: 0 blank, 1 positive, 2 negative, 3 uncertain (No Finding: 0 / 1).
CHEXBERT_CONDITIONS: tuple[str, ...] = CLASSES[1:] + (CLASSES[0],)
_CHEXBERT_CODE = np.array([np.nan, 1.0, 0.0, -1.0])


class CheXbertLabeler:
    """CheXbert from a local checkpoint: BERT-base + 13 four-way heads + 1 two-way head on the [CLS] state."""

    def __init__(self, weights: str | os.PathLike | None = None, bert_dir: str | os.PathLike | None = None,
                 device: str = "cpu", batch_size: int = 16):
        import torch
        from torch import nn
        from transformers import BertConfig, BertModel, BertTokenizer

        weights = weights or os.environ.get(CHEXBERT_ENV)
        if not weights or not Path(weights).is_file():
            raise CheXbertWeightsMissing(f"CheXbert weights not found ({weights or 'none given'}). {_chexbert_hint()}")
        bert_dir = bert_dir or os.environ.get(BERT_DIR_ENV) or "bert-base-uncased"
        try:
            config = BertConfig.from_pretrained(str(bert_dir), local_files_only=True)
            self.tokenizer = BertTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheXbertWeightsMissing(
                f"BERT config/vocabulary not found at {bert_dir!r}: {e}. {_chexbert_hint()}") from e

        class _CheXbert(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = BertModel(config, add_pooling_layer=False)
                self.dropout = nn.Dropout(config.hidden_dropout_prob)
                heads = [nn.Linear(config.hidden_size, 4) for _ in range(13)] + [nn.Linear(config.hidden_size, 2)]
                self.linear_heads = nn.ModuleList(heads)

            def forward(self, input_ids, attention_mask):
                cls = self.dropout(self.bert(input_ids=input_ids, attention_mask=attention_mask)[0][:, 0])  # (B, H)
                return [head(cls) for head in self.linear_heads]  # 14 x (B, 4 or 2)

        self.model = _CheXbert()
        ckpt = torch.load(str(weights), map_location="cpu", weights_only=True)
        state = ckpt.get("model_state_dict", ckpt)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("bert.pooler.")}
        state.pop("bert.embeddings.position_ids", None)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights}: not a CheXbert checkpoint (missing {missing[:5]}, unexpected {unexpected[:5]})")
        self.model.eval().to(device)
        self.device, self.batch_size = device, batch_size

    def __call__(self, reports: Sequence[str]) -> np.ndarray:
        import torch

        out = np.full((len(reports), len(CLASSES)), np.nan)
        order = [CLASSES.index(c) for c in CHEXBERT_CONDITIONS]
        for s in range(0, len(reports), self.batch_size):
            texts = [" ".join(r.split()) for r in reports[s : s + self.batch_size]]
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
            with torch.no_grad():
                logits = self.model(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            codes = np.stack([lg.argmax(-1).cpu().numpy() for lg in logits], axis=1)  # (b, 14) in CheXbert order
            out[s : s + len(texts), order] = _CHEXBERT_CODE[codes]
        return out


def label_texts(texts: Sequence[str], labeler: str = "rules", chexbert_weights: str | None = None,
                bert_dir: str | None = None, device: str = "cpu") -> np.ndarray:
    """(N, 14) CheXpert labels of reports with the chosen backend."""
    if labeler == "rules":
        return label_reports(texts)
    if labeler == "chexbert":
        return CheXbertLabeler(chexbert_weights, bert_dir, device)(texts)
    raise ValueError(f"labeler must be 'rules' or 'chexbert', got {labeler!r}")
