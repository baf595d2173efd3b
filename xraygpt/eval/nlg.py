"""NLG metrics with pycocoevalcap: BLEU-1..4, METEOR, CIDEr, plus the COCO tokenisation they all read.

Corpus metrics do not average over samples, so a bootstrap cannot just resample per-sample scores. Each metric
here is written as a function of *resample weights* ``W`` (B, N) — how often each sample is drawn — computed
from per-sample statistics gathered once:

- BLEU: per-sample clipped n-gram matches, n-gram counts and lengths (pycocoevalcap's own ``cook_test``);
  corpus BLEU is a function of their sums.
- METEOR: the per-segment statistics line the METEOR 1.5 jar prints; its corpus score is a function of their
  sums (``meteor_from_stats`` reproduces the jar's formula; ``Meteor.check`` compares the two at run time).
- CIDEr(-D, as pycocoevalcap implements it): the IDF is taken over the evaluated set, so it changes with every
  resample. With one reference per sample every term is linear in idf^2 per n-gram, so a resample costs a few
  sparse products (``CiderStats``); ``W = 1`` reproduces pycocoevalcap's ``Cider`` exactly.

Tokenisation: pycocoevalcap's ``PTBTokenizer`` runs Stanford CoreNLP in Java. ``tokenize(..., "python")``
(the default) is a pure-Python re-implementation of what it does to report text (lower-case, split punctuation
and clitics, drop the COCO punctuation list, keep "-lrb-"/"-rrb-" for brackets as the Java path does since its
filter list is upper-case); on the 3,955 IU X-ray reports it gives identical token strings for 3,949 and differs
on 16 of 150,021 tokens (HTML debris such as "&gt;"). ``tokenize(..., "ptb")`` runs the Java tokenizer.
METEOR needs Java whatever the tokenizer; BLEU, CIDEr and ROUGE-L do not with the default.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- Java and the pycocoevalcap jars

JAVA_INSTALL_HINT = (
    "Install a Java runtime (>= 8): Debian/Ubuntu `sudo apt-get install default-jre-headless`, "
    "Fedora `sudo dnf install java-17-openjdk-headless`, macOS `brew install openjdk`, or `conda install openjdk`; "
    "or set JAVA_HOME. Without Java, drop 'meteor' from the metrics and keep the default tokenizer='python'."
)


class JavaNotFoundError(RuntimeError):
    """METEOR (and the optional PTB tokenizer) run Java programs shipped inside pycocoevalcap."""


def find_java() -> str:
    """Path of the ``java`` executable ($JAVA_HOME/bin/java first, then PATH), or a clear error."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(f"METEOR / the PTB tokenizer need Java, and no `java` was found. {JAVA_INSTALL_HINT}")
    return java


def pycocoevalcap_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("NLG metrics need pycocoevalcap: pip install pycocoevalcap   (or pip install -e '.[eval]')")
    return Path(next(iter(spec.submodule_search_locations)))


def _jar(relative: str) -> Path:
    path = pycocoevalcap_dir() / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall pycocoevalcap (pip install --force-reinstall pycocoevalcap)")
    return path


# ----------------------------------------------------------------------------- tokenisation

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, compared against lower-cased tokens (so brackets survive).
COCO_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                              "--", "...", ";"])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TOKEN = re.compile(
    r"""
      (?:dr|mr|mrs|ms|st|ct|jr|sr|prof|vs)\.(?=\s|$)   # abbreviations the PTB tokenizer keeps with their period
    | [a-z](?:\.[a-z])+\.                               # a.m.  e.g.
    | '(?:s|re|ve|ll|d|m)\b | n't                       # clitics split off their word
    | [a-z]+(?:\.[a-z]+)+(?![a-z.])                     # normal.calcified (a missing space after a period)
    | \d+(?:[.,]\d+)+                                   # 1.5  1,000
    | [a-z0-9]+(?:[-/&][a-z0-9]+)*                      # words, hyphenated words, x/y
    | \.\.\. | -- | `` | '' | [^\sa-z0-9]               # punctuation, one symbol at a time
    """,
    re.VERBOSE,
)


def python_tokenize(text: str) -> str:
    """COCO/PTB-style tokenisation without Java: lower-cased tokens joined by single spaces, punctuation dropped."""
    s = text.lower().replace("\n", " ")
    s = re.sub(r"\bcannot\b", "can not", s)
    s = re.sub(r"(\w)n't\b", r"\1 n't", s)
    out = []
    for tok in _TOKEN.findall(s):
        tok = _BRACKETS.get(tok, tok)
        if tok not in COCO_PUNCTUATION:
            out.append(tok)
    return " ".join(out)


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, Java), with its temp file outside site-packages."""
    java = find_java()
    jar = _jar("tokenizer/stanford-corenlp-3.4.1.jar")
    lines = [t.replace("\r", " ").replace("\n", " ") for t in texts]
    with tempfile.TemporaryDirectory(prefix="xraygpt_ptb_") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_text("\n".join(lines), encoding="utf-8")
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               str(src)]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace')[-500:]}")
    out = proc.stdout.decode("utf-8").split("\n")[: len(lines)]
    out += [""] * (len(lines) - len(out))
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in COCO_PUNCTUATION) for line in out]


def tokenize(texts: Sequence[str], method: str = "python") -> list[str]:
    """COCO tokenisation of each text: ``"python"`` (default, no Java) or ``"ptb"`` (pycocoevalcap's Java one)."""
    if method == "python":
        return [python_tokenize(t) for t in texts]
    if method == "ptb":
        return ptb_tokenize(texts)
    raise ValueError(f"tokenizer must be 'python' or 'ptb', got {method!r}")


# ----------------------------------------------------------------------------- BLEU

BLEU_N = 4
# Columns of the per-sample BLEU statistics: lengths, then n-gram counts of the hypothesis, then clipped matches.
_BLEU_TESTLEN, _BLEU_REFLEN, _BLEU_GUESS, _BLEU_CORRECT = 0, 1, slice(2, 6), slice(6, 10)


def bleu_stats(references_tok: Sequence[str], predictions_tok: Sequence[str]) -> np.ndarray:
    """Per-sample BLEU sufficient statistics (N, 10) from pycocoevalcap's ``cook_refs`` / ``cook_test``."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    stats = np.zeros((len(references_tok), 10))
    for i, (ref, hyp) in enumerate(zip(references_tok, predictions_tok)):
        comps = cook_test(hyp, cook_refs([ref], n=BLEU_N), eff="closest", n=BLEU_N)
        stats[i, _BLEU_TESTLEN] = comps["testlen"]
        stats[i, _BLEU_REFLEN] = comps["reflen"]
        stats[i, _BLEU_GUESS] = comps["guess"]
        stats[i, _BLEU_CORRECT] = comps["correct"]
    return stats


def bleu_from_stats(summed: np.ndarray) -> np.ndarray:
    """Corpus BLEU-1..4 from summed statistics (B, 10) -> (B, 4); pycocoevalcap's formula, constants and all."""
    small, tiny = 1e-9, 1e-15
    summed = np.atleast_2d(summed)
    ratios = (summed[:, _BLEU_CORRECT] + tiny) / (summed[:, _BLEU_GUESS] + small)  # (B, 4)
    bleus = np.exp(np.cumsum(np.log(ratios), axis=1) / np.arange(1, BLEU_N + 1))  # geometric means of 1..n
    ratio = (summed[:, _BLEU_TESTLEN] + tiny) / (summed[:, _BLEU_REFLEN] + small)
    brevity = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    return bleus * brevity[:, None]


# ----------------------------------------------------------------------------- CIDEr


class CiderStats:
    """CIDEr (pycocoevalcap's, n = 4, sigma = 6) for any resample of a one-reference-per-sample corpus.

    For sample i and n-gram g of order k, with tf counts h (hypothesis), r (reference) and idf_g =
    log(N) - log(max(1, df_g)) >= 0, pycocoevalcap computes per order
        sum_g min(h idf, r idf) r idf / (||h idf|| ||r idf||) * penalty_i
    and every sum is linear in q_g = idf_g^2: numerator A_i.q, squared norms B_i.q and C_i.q. df under a
    resample with counts w is w @ R (R: which references contain g), and N = sum(w).
    """

    def __init__(self, references_tok: Sequence[str], predictions_tok: Sequence[str], n: int = 4, sigma: float = 6.0):
        from pycocoevalcap.cider.cider_scorer import precook
        from scipy import sparse

        self.n_samples = len(references_tok)
        self.n, self.sigma = n, sigma
        vocab: dict[tuple[str, ...], int] = {}
        rows = {name: [] for name in ("A", "B", "C", "R")}
        vals = {name: [] for name in ("A", "B", "C")}
        cols = {name: [] for name in ("A", "B", "C", "R")}
        length_delta = np.zeros(self.n_samples)
        for i, (ref, hyp) in enumerate(zip(references_tok, predictions_tok)):
            h, r = precook(hyp, n), precook(ref, n)
            # pycocoevalcap's "length" counts bigrams (its `if n == 1` tests the 0-based order): kept for parity.
            length_delta[i] = sum(c for g, c in h.items() if len(g) == 2) - sum(c for g, c in r.items() if len(g) == 2)
            for g, c in r.items():
                j = vocab.setdefault(g, len(vocab))
                row = (len(g) - 1) * self.n_samples + i  # one row block per n-gram order
                rows["R"].append(i), cols["R"].append(j)
                rows["C"].append(row), cols["C"].append(j), vals["C"].append(float(c * c))
            for g, c in h.items():
                j = vocab.setdefault(g, len(vocab))
                row = (len(g) - 1) * self.n_samples + i
                rows["B"].append(row), cols["B"].append(j), vals["B"].append(float(c * c))
                if g in r:
                    rows["A"].append(row), cols["A"].append(j), vals["A"].append(float(min(c, r[g]) * r[g]))
        v = max(len(vocab), 1)
        shape = (n * self.n_samples, v)
        self.A = sparse.csr_matrix((vals["A"], (rows["A"], cols["A"])), shape=shape)
        self.B = sparse.csr_matrix((vals["B"], (rows["B"], cols["B"])), shape=shape)
        self.C = sparse.csr_matrix((vals["C"], (rows["C"], cols["C"])), shape=shape)
        # (V, N) incidence of n-grams in references, for df = R^T w.
        self.Rt = sparse.csr_matrix((np.ones(len(rows["R"])), (cols["R"], rows["R"])), shape=(v, self.n_samples))
        self.penalty = np.exp(-(length_delta**2) / (2 * sigma**2))  # (N,)

    def per_sample(self, weights: np.ndarray) -> np.ndarray:
        """Per-sample CIDEr (B, N) under each resample's IDF; weights (B, N) are draw counts."""
        w = np.atleast_2d(np.asarray(weights, dtype=float))
        total = w.sum(axis=1)  # (B,) = number of documents in each resample
        df = np.asarray(self.Rt @ w.T)  # (V, B)
        idf = np.log(total)[None, :] - np.log(np.maximum(df, 1.0))
        q = idf * idf  # (V, B)
        num = np.asarray(self.A @ q)  # (n*N, B)
        hyp = np.sqrt(np.asarray(self.B @ q))
        ref = np.sqrt(np.asarray(self.C @ q))
        denom = hyp * ref
        sim = np.where(denom != 0, num / np.where(denom != 0, denom, 1.0), num)
        sim = sim.reshape(self.n, self.n_samples, -1)  # (n, N, B)
        scores = sim.mean(axis=0) * self.penalty[:, None] * 10.0  # (N, B)
        return scores.T

    def corpus(self, weights: np.ndarray, chunk: int = 100) -> np.ndarray:
        """Corpus CIDEr (B,) = weighted mean of per-sample scores, in chunks of resamples to bound memory."""
        w = np.atleast_2d(np.asarray(weights, dtype=float))
        out = np.empty(len(w))
        for s in range(0, len(w), chunk):
            wc = w[s : s + chunk]
            out[s : s + chunk] = (self.per_sample(wc) * wc).sum(axis=1) / wc.sum(axis=1)
        return out


# ----------------------------------------------------------------------------- METEOR

# Per-segment statistics printed by METEOR 1.5 (`SCORE` on stdio): test/ref length, test/ref function words,
# then for each of 4 matcher stages (exact, stem, synonym, paraphrase) test/ref content and function matches,
# then chunks and test/ref matched words. 23 numbers.
METEOR_N_STATS = 23
# Parameters of `-l en` (task "default") in METEOR 1.5: alpha, beta, gamma, delta and the stage weights.
METEOR_PARAMS = {"alpha": 0.85, "beta": 0.20, "gamma": 0.60, "delta": 0.75, "weights": (1.0, 0.6, 0.8, 0.6)}


def meteor_from_stats(summed: np.ndarray) -> np.ndarray:
    """METEOR score(s) from (summed) statistics (B, 23) -> (B,), the jar's own formula (checked against it)."""
    p = METEOR_PARAMS
    s = np.atleast_2d(np.asarray(summed, dtype=float))
    tl, rl, tf, rf = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
    stages = s[:, 4:20].reshape(-1, 4, 4)  # (B, stage, [test content, ref content, test function, ref function])
    chunks, tm, rm = s[:, 20], s[:, 21], s[:, 22]
    w = np.asarray(p["weights"])
    d = p["delta"]
    t_matched = (w * (d * stages[:, :, 0] + (1 - d) * stages[:, :, 2])).sum(axis=1)
    r_matched = (w * (d * stages[:, :, 1] + (1 - d) * stages[:, :, 3])).sum(axis=1)
    t_len = d * (tl - tf) + (1 - d) * tf
    r_len = d * (rl - rf) + (1 - d) * rf
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(t_len > 0, t_matched / t_len, 0.0)
        rec = np.where(r_len > 0, r_matched / r_len, 0.0)
        fmean = np.where((prec > 0) & (rec > 0), prec * rec / (p["alpha"] * prec + (1 - p["alpha"]) * rec), 0.0)
        exact = (tm == tl) & (rm == rl) & (chunks == 1)
        frag = np.where(exact, 0.0, chunks / np.maximum((tm + rm) / 2, 1e-300))
    return fmean * (1 - p["gamma"] * frag ** p["beta"])


class Meteor:
    """A running METEOR 1.5 jar (`-stdio -l en -norm`, as pycocoevalcap) that returns per-segment statistics.

    Starting it costs ~10 s (the JVM loads the paraphrase table), so ``score_predictions`` starts it first and
    computes the other metrics while it loads. Use as a context manager or call ``close()``.
    """

    def __init__(self, max_heap: str = "2G"):
        java = find_java()
        jar = _jar("meteor/meteor-1.5.jar")
        self.cmd = [java, f"-Xmx{max_heap}", "-jar", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
        self.proc = subprocess.Popen(self.cmd, cwd=str(jar.parent), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)

    def _exchange(self, lines: list[str]) -> list[str]:
        """Write lines from a thread (so a full stdout pipe cannot deadlock us) and read one answer per line."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"METEOR exited with code {self.proc.returncode}: {' '.join(self.cmd)}")
        payload = "".join(line + "\n" for line in lines).encode("utf-8")

        def write() -> None:
            try:
                self.proc.stdin.write(payload)
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        answers = []
        for _ in lines:
            out = self.proc.stdout.readline()
            if not out:
                raise RuntimeError(
                    f"METEOR stopped answering (exit code {self.proc.poll()}); too little memory for -Xmx? "
                    f"Command: {' '.join(self.cmd)}"
                )
            answers.append(out.decode("utf-8").strip())
        writer.join()
        return answers

    @staticmethod
    def _clean(text: str) -> str:
        return " ".join(text.replace("|||", " ").split())

    def stats(self, references_tok: Sequence[str], predictions_tok: Sequence[str]) -> np.ndarray:
        """Per-segment statistics (N, 23), ready to be summed; the segment's hypothesis is the prediction."""
        lines = [f"SCORE ||| {self._clean(r)} ||| {self._clean(p)}" for r, p in zip(references_tok, predictions_tok)]
        answers = self._exchange(lines)
        stats = np.array([[float(x) for x in a.split()] for a in answers], dtype=float).reshape(-1, METEOR_N_STATS)
        # The jar's aggregation adds no chunks for a perfectly matched segment (one chunk covering both sides);
        # zeroing them here makes the corpus score a function of plain column sums. A segment's own score is
        # unchanged: with 0 chunks its fragmentation is 0, as it is for the jar's perfect-match case.
        perfect = (stats[:, 21] == stats[:, 0]) & (stats[:, 22] == stats[:, 1]) & (stats[:, 20] == 1)
        stats[perfect, 20] = 0.0
        return stats

    def jar_corpus_score(self, stats: np.ndarray) -> float:
        """The jar's own corpus score for these statistics (pycocoevalcap's EVAL line)."""
        fmt = " ||| ".join(" ".join(f"{x:.1f}" for x in row) for row in stats)
        self.proc.stdin.write(f"EVAL ||| {fmt}\n".encode())
        self.proc.stdin.flush()
        for _ in range(len(stats)):  # per-segment scores first, then the corpus score
            self.proc.stdout.readline()
        return float(self.proc.stdout.readline().strip())

    def check(self, stats: np.ndarray, tol: float = 1e-9) -> float:
        """Corpus METEOR, verifying that ``meteor_from_stats`` agrees with the jar (raises if not)."""
        jar = self.jar_corpus_score(stats)
        ours = float(meteor_from_stats(stats.sum(axis=0))[0])
        if abs(jar - ours) > tol:
            raise RuntimeError(f"METEOR from statistics ({ours!r}) disagrees with the jar ({jar!r}); report this bug.")
        return jar

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "proc", None) is not None:
            self.close()
