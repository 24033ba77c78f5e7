"""ROUGE-L: how much two texts overlap, measured by their longest common subsequence of words.

Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries" (ACL workshop Text Summarization
Branches Out). Self-Instruct (Wang et al. 2023, arXiv 2212.10560) uses it to drop a generated instruction
that is too similar (ROUGE-L >= 0.7) to one already in the pool.

For a candidate c and a reference r, as token lists, with LCS(c, r) the length of their longest common
subsequence (tokens in the same order, gaps allowed):

    P = LCS / |c|      R = LCS / |r|      F = 2 P R / (P + R)        (0 when LCS = 0)

Tokens: lowercase, then maximal runs of letters and digits (everything else separates tokens), as in the
default tokenizer of Google's `rouge_score` package without stemming, the setting Self-Instruct used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lowercased runs of ASCII letters and digits: 'Sort these, NOW!' -> ['sort', 'these', 'now']."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row (O(|a| |b|) time)."""
    if len(a) < len(b):
        a, b = b, a  # keep the row as short as possible
    row = [0] * (len(b) + 1)  # row[j] = LCS(a[:i], b[:j]) for the current i
    for x in a:
        diagonal = 0  # LCS(a[:i-1], b[:j-1])
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


@dataclass(frozen=True)
class RougeScore:
    precision: float
    recall: float
    fmeasure: float


def rouge_l(candidate: str | list[str], reference: str | list[str]) -> RougeScore:
    """ROUGE-L precision, recall and F-measure of a candidate against one reference (strings or tokens)."""
    c = tokenize(candidate) if isinstance(candidate, str) else list(candidate)
    r = tokenize(reference) if isinstance(reference, str) else list(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return RougeScore(0.0, 0.0, 0.0)
    p, rec = lcs / len(c), lcs / len(r)
    return RougeScore(p, rec, 2 * p * rec / (p + rec))


def max_rouge_l(candidate: str, pool: list[str]) -> float:
    """The highest ROUGE-L F-measure of the candidate against any text of the pool (0 for an empty pool)."""
    tokens = tokenize(candidate)
    return max((rouge_l(tokens, tokenize(text)).fmeasure for text in pool), default=0.0)
