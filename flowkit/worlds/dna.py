"""The dna world: synthetic DNA with a known law, and exact metrics for sequence samplers.

The law. A sequence of length L (64 to 200) over A, C, G, T starts from the stationary
distribution of a first-order background Markov chain (`TRANSITIONS`, fixed) and follows it;
a sequence of class c then gets the class's motif planted at a uniform position with
probability `PLANT` (and a second copy with probability `SECOND`), overwriting the
background. Classes (0-based index, name, motif):

    0 promoter  TATAAT        (the bacterial -10 box)
    1 enhancer  CACGTG        (an E-box)
    2 silencer  GGGCCC

Metrics, all exact functions of the law or of fresh draws from it:
- `kmer_js(a, b, k)`: Jensen-Shannon divergence (nats) of the k-mer frequencies of two sets
  of sequences (generated against fresh samples of the world);
- `motif_rate(seqs, c)`: the fraction of sequences holding class c's motif;
- `log_likelihood(seq)`: log-likelihood per letter (nats) under the background chain.

Parsers of user input (`encode`, `parse_fasta`, `parse_class`) raise `InputError` /
`UnknownNameError` with a one-line message saying what to change.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from flowkit.errors import InputError, UnknownNameError, closest, clip

__all__ = [
    "ALPHABET",
    "CLASSES",
    "MOTIFS",
    "MIN_LENGTH",
    "MAX_LENGTH",
    "TRANSITIONS",
    "PLANT",
    "SECOND",
    "encode",
    "decode",
    "check_length",
    "parse_fasta",
    "format_fasta",
    "parse_class",
    "sample",
    "motif_rate",
    "has_motif",
    "log_likelihood",
    "kmer_counts",
    "kmer_js",
    "stationary",
]

ALPHABET = "ACGT"
CLASSES = ("promoter", "enhancer", "silencer")
MOTIFS = {"promoter": "TATAAT", "enhancer": "CACGTG", "silencer": "GGGCCC"}
MIN_LENGTH, MAX_LENGTH = 64, 200
PLANT = 0.75  # chance a class's sequence carries its motif
SECOND = 0.25  # chance of a second copy (given the first)
# background chain P(next | current), rows A, C, G, T (an AT-rich genome with few CpG)
TRANSITIONS = np.array([
    [0.36, 0.16, 0.20, 0.28],
    [0.32, 0.26, 0.08, 0.34],
    [0.28, 0.22, 0.26, 0.24],
    [0.22, 0.20, 0.24, 0.34],
])
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def stationary() -> np.ndarray:
    """The background chain's stationary distribution [4]."""
    w, v = np.linalg.eig(TRANSITIONS.T)
    p = np.real(v[:, np.argmin(np.abs(w - 1.0))])
    return p / p.sum()


# ----------------------------------------------------------------------------- parsers


def encode(seq: str) -> Tensor:
    """A DNA string -> letter indices [L] (long). Lower case is accepted (soft-masked FASTA)."""
    if not isinstance(seq, str):
        raise InputError(f"a DNA sequence must be a string, got {type(seq).__name__}")
    if not seq:
        raise InputError("the DNA sequence is empty: give letters A, C, G, T")
    out = []
    for i, ch in enumerate(seq.upper()):
        k = _INDEX.get(ch)
        if k is None:
            raise InputError(f"unknown letter {seq[i]!r} at position {i + 1} of the sequence: DNA sequences "
                             f"use only {', '.join(ALPHABET)}")
        out.append(k)
    return torch.tensor(out, dtype=torch.long)


def decode(tokens: Tensor | Sequence[int]) -> str:
    """Letter indices [L] -> a DNA string."""
    idx = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
    try:
        return "".join(ALPHABET[int(i)] for i in idx)
    except IndexError:
        raise InputError(f"letter indices must lie in [0, {len(ALPHABET)})") from None


def check_length(length: int, lengths: tuple[int, int] = (MIN_LENGTH, MAX_LENGTH), what: str = "the dna model") -> int:
    """`length` if the model takes it, else InputError naming the range."""
    lo, hi = lengths
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not lo <= int(length) <= hi:
        raise InputError(f"{what} takes sequence lengths from {lo} to {hi}, got {length!r}")
    return int(length)


def parse_fasta(text: str) -> list[tuple[str, str]]:
    """FASTA text -> [(header, sequence)]: '>' lines open records, sequence lines are joined
    (blank lines and surrounding spaces ignored), letters checked by `encode` and upper-cased."""
    if not isinstance(text, str):
        raise InputError(f"FASTA input must be text, got {type(text).__name__}")
    records: list[tuple[str, list[str]]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith(">"):
            records.append((line[1:].strip(), []))
        elif not records:
            raise InputError(f"FASTA line {n} holds sequence before any '>' header: start each record with '>name'")
        else:
            records[-1][1].append(line)
    if not records:
        raise InputError("no FASTA records found: start each record with a '>name' line")
    out = []
    for header, parts in records:
        seq = "".join(parts)
        if not seq:
            raise InputError(f"FASTA record {header!r} has no sequence: give its letters on the lines after the header")
        try:
            encode(seq)
        except InputError as e:
            raise InputError(f"FASTA record {header!r}: {e}") from None
        out.append((header, seq.upper()))
    return out


def format_fasta(records: Iterable[tuple[str, str]], width: int = 60) -> str:
    """[(header, sequence)] -> FASTA text, sequence lines `width` letters long."""
    if width < 1:
        raise InputError(f"FASTA line width must be >= 1, got {width}")
    lines = []
    for header, seq in records:
        if len(header.splitlines()) > 1 or header != header.strip("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"):
            raise InputError("a FASTA header must be one line")
        lines.append(f">{header}")
        lines.extend(seq[i:i + width] for i in range(0, len(seq), width))
    return "\n".join(lines) + "\n"


def parse_class(value: str | int, classes: Sequence[str] = CLASSES) -> int:
    """A class by name ('promoter') or 0-based index (2 or '2') -> its index."""
    if isinstance(value, bool):
        raise InputError(f"a class is a name or a 0-based index, got {value!r}")
    text = str(value).strip()
    if isinstance(value, (int, np.integer)) or (text.lstrip("-").isdigit() and text.isascii()):
        k = int(text)
        if not 0 <= k < len(classes):
            raise InputError(f"class index {k} is out of range: use 0 to {len(classes) - 1} ({', '.join(classes)})")
        return k
    if text in classes:
        return classes.index(text)
    lower = [c.lower() for c in classes]
    if text.lower() in lower:
        return lower.index(text.lower())
    raise UnknownNameError(f"unknown class {clip(text)!r}{closest(text, classes)}: use one of {', '.join(classes)} "
                           f"or a 0-based index")


# ----------------------------------------------------------------------------- the law


def sample(n: int, cls: int | Sequence[int], length: int, rng: np.random.Generator) -> Tensor:
    """n sequences [n, length] (long) of class `cls` (one index, or one per sequence)."""
    check_length(length)
    classes = np.broadcast_to(np.asarray(cls, dtype=np.int64), (n,))
    if n and (classes.min() < 0 or classes.max() >= len(CLASSES)):
        raise InputError(f"class indices must lie in [0, {len(CLASSES)})")
    cdf = np.cumsum(TRANSITIONS, axis=1)
    seqs = np.empty((n, length), dtype=np.int64)
    u = rng.random((n, length))
    seqs[:, 0] = (u[:, :1] > np.cumsum(stationary())[None]).sum(axis=1).clip(max=3)
    for i in range(1, length):
        seqs[:, i] = (u[:, i:i + 1] > cdf[seqs[:, i - 1]]).sum(axis=1).clip(max=3)
    plant, second = rng.random(n) < PLANT, rng.random(n) < SECOND
    for j in range(n):
        motif = encode(MOTIFS[CLASSES[classes[j]]]).numpy()
        for copy in range(int(plant[j]) + int(plant[j] and second[j])):
            pos = rng.integers(0, length - len(motif) + 1)
            seqs[j, pos:pos + len(motif)] = motif
    return torch.from_numpy(seqs)


def _as_strings(seqs: Tensor | Sequence[str] | Sequence[Sequence[int]]) -> list[str]:
    if isinstance(seqs, Tensor):
        return [decode(row) for row in seqs]
    return [s if isinstance(s, str) else decode(s) for s in seqs]


def has_motif(seqs, cls: int) -> np.ndarray:
    """Whether each sequence holds class `cls`'s motif [n] (bool)."""
    motif = MOTIFS[CLASSES[cls]]
    return np.array([motif in s.upper() for s in _as_strings(seqs)], dtype=bool)


def motif_rate(seqs, cls: int) -> float:
    """The fraction of sequences holding class `cls`'s motif."""
    hits = has_motif(seqs, cls)
    return float(hits.mean()) if len(hits) else float("nan")


def log_likelihood(seqs) -> np.ndarray:
    """Log-likelihood per letter (nats) of each sequence under the background chain [n]."""
    logT, log0 = np.log(TRANSITIONS), np.log(stationary())
    out = []
    for s in _as_strings(seqs):
        idx = encode(s).numpy()
        out.append((log0[idx[0]] + logT[idx[:-1], idx[1:]].sum()) / len(idx))
    return np.array(out)


def kmer_counts(seqs, k: int = 4) -> np.ndarray:
    """Counts of every k-mer [4^k] over a set of sequences."""
    counts = np.zeros(4**k)
    weights = 4 ** np.arange(k - 1, -1, -1)
    for s in _as_strings(seqs):
        idx = encode(s).numpy()
        if len(idx) >= k:
            windows = np.lib.stride_tricks.sliding_window_view(idx, k)
            counts += np.bincount(windows @ weights, minlength=4**k)
    return counts


def kmer_js(a, b, k: int = 4) -> float:
    """Jensen-Shannon divergence (nats) between the k-mer frequencies of two sets of sequences."""
    from scipy.special import rel_entr

    p, q = kmer_counts(a, k), kmer_counts(b, k)
    if p.sum() == 0 or q.sum() == 0:
        raise InputError(f"k-mer divergence needs sequences of at least {k} letters in both sets")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return float(0.5 * rel_entr(p, m).sum() + 0.5 * rel_entr(q, m).sum())
