"""Byte-level BPE: our own trainer, and tiktoken for fast encoding.

Byte-pair encoding (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019): start from the
256 byte values, split text into chunks with GPT-2's pre-tokenisation pattern (words, numbers,
punctuation runs, whitespace; merges never cross a chunk boundary), then repeatedly merge the most
frequent adjacent pair into a new token. The learned vocabulary is a table `token bytes -> rank`, which
is exactly what `tiktoken.Encoding` needs: at encoding time it merges, inside each chunk, the adjacent
pair whose concatenation has the lowest rank, until no pair is in the table. Because all 256 single
bytes are in the table, any string, in any script, round-trips exactly.

The shipped vocabulary (`data/tokenizer.tiktoken`, 2048 tokens including the special tokens below) is
trained on the offline corpus by `python -m minimal.pretrain`. For real GPT-2 weights use
`gpt2_encoding()` (tiktoken's own "gpt2" table; opt-in, since tiktoken may need to fetch it).
"""

from __future__ import annotations

import base64
import functools
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex
import tiktoken

# GPT-2's pre-tokenisation pattern: contractions, letters, digits, other symbols, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

VOCAB_SIZE = 2048
# Special tokens sit at the top of the vocabulary. Reserved slots let later chapters add tokens
# without retraining the tokenizer or the base models.
SPECIAL_TOKENS = [
    "<|endoftext|>",  # document separator and end of an answer
    "<|answer|>",  # separates a task prompt from its answer
    "<|pad|>",
    "<|system|>", "<|user|>", "<|assistant|>",  # chat template (instruction tuning)
    "<|lang_a|>", "<|lang_b|>", "<|lang_c|>", "<|lang_d|>",  # toy cipher languages
] + [f"<|reserved_{i}|>" for i in range(6)]
N_SPECIAL = len(SPECIAL_TOKENS)  # 16
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "tokenizer.tiktoken"


def train_bpe(texts: Iterable[str], vocab_size: int = VOCAB_SIZE, n_special: int = N_SPECIAL,
              verbose: bool = False) -> dict[bytes, int]:
    """Learn `vocab_size - n_special` mergeable ranks (256 bytes + merges) from texts.

    Ties between equally frequent pairs go to the smallest pair of token ids, so training is deterministic.
    """
    n_ranks = vocab_size - n_special
    if n_ranks < 256:
        raise ValueError(f"vocab_size must leave room for 256 bytes and {n_special} special tokens")
    chunks: Counter[bytes] = Counter()
    for text in texts:
        chunks.update(m.encode("utf-8") for m in regex.findall(GPT2_PATTERN, text))
    words = [list(w) for w in chunks]  # each chunk as a list of token ids (bytes at first)
    counts = list(chunks.values())
    vocab = [bytes([i]) for i in range(256)]  # token id -> bytes
    ranks = {b: i for i, b in enumerate(vocab)}

    pair_count: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> indices of words with it
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += counts[wi]
            where[pair].add(wi)

    while len(vocab) < n_ranks and pair_count:
        best = max(pair_count.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
        if pair_count[best] < 2:
            break
        merged = vocab[best[0]] + vocab[best[1]]
        if merged in ranks:  # the same bytes reached by another merge order: reuse that token
            new_id = ranks[merged]
        else:
            new_id = len(vocab)
            vocab.append(merged)
            ranks[merged] = new_id
        merge_words(words, counts, pair_count, where, best, new_id)
        if verbose and len(vocab) % 256 == 0:
            print(f"bpe: {len(vocab)} tokens, last merge {merged!r}")
    return ranks


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """`ids` with every occurrence of `pair` replaced by `new_id`, scanning left to right.

    Occurrences do not overlap: merging (1, 1) in [1, 1, 1] gives [new_id, 1].
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def merge_words(words: list[list[int]], counts: list[int], pair_count: Counter[tuple[int, int]],
                where: defaultdict[tuple[int, int], set[int]], best: tuple[int, int], new_id: int) -> None:
    """Merge `best` into `new_id` in every word that holds it, updating the pair counts in place.

    Only the words that contain the pair are touched (`where` indexes them): each one's old pairs are
    taken out of `pair_count` (weighted by how often the word occurs), the word is merged, and its new
    pairs are put back in.
    """
    for wi in list(where[best]):
        w, c = words[wi], counts[wi]
        for pair in zip(w, w[1:]):  # take the word's old pairs out ...
            pair_count[pair] -= c
            if pair_count[pair] <= 0:
                del pair_count[pair]
            where[pair].discard(wi)
        out = merge_pair(w, best, new_id)
        words[wi] = out
        for pair in zip(out, out[1:]):  # ... and its new pairs in
            pair_count[pair] += c
            where[pair].add(wi)


def save_ranks(ranks: dict[bytes, int], path: str | Path = DEFAULT_PATH) -> None:
    """tiktoken's text format: one `base64(token bytes) rank` per line."""
    lines = [f"{base64.b64encode(b).decode('ascii')} {r}" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_ranks(path: str | Path = DEFAULT_PATH) -> dict[bytes, int]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; build it with `python -m minimal.pretrain --tokenizer`")
    ranks = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def make_encoding(ranks: dict[bytes, int], name: str = "pfs-bpe") -> tiktoken.Encoding:
    """Wrap mergeable ranks and our special tokens (ids right after the ranks) in a tiktoken.Encoding."""
    first = max(ranks.values()) + 1
    specials = {tok: first + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


@functools.lru_cache(maxsize=4)
def get_tokenizer(path: str | None = None) -> tiktoken.Encoding:
    """The shipped tokenizer (data/tokenizer.tiktoken), loaded once."""
    return make_encoding(load_ranks(path or DEFAULT_PATH))


def special_id(enc: tiktoken.Encoding, token: str) -> int:
    if token not in enc._special_tokens:
        raise ValueError(f"unknown special token {token!r}; known: {sorted(enc._special_tokens)}")
    return enc._special_tokens[token]


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, for real GPT-2 weights. Opt-in: tiktoken may need to fetch its table."""
    return tiktoken.get_encoding("gpt2")
