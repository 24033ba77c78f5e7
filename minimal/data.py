"""The offline corpus, the task suite, and batching with loss on answer tokens only.

Everything here is read from the running interpreter's standard library, deterministically: fixed module
lists, sorted files, splits decided by a hash of each item (so adding or removing one item never moves
another between splits). Nothing is downloaded.

Corpora (token streams, `LMCorpus`):
- `docs`: the documentation: `pydoc_data` topics plus the docstrings (read with `ast`) of DOC_MODULES.
  The base models are pretrained on its train split.
- `code`: the source code of CODE_MODULES. With `docs` it forms the domain-shift pair: fine-tuning on
  code lowers code perplexity (learning) and raises docs perplexity (forgetting).

Tasks (`Task`: prompt -> answer, fixed train/validation/test splits, a metric):
- `family` (real text, classification): a standard-library docstring -> the family of its module
  (text, files, math, network, threads, formats). The family modules are not in DOC_MODULES, so the
  test docstrings were never seen in pretraining.
- `camel` (real identifiers, generation, exact match): a snake_case function name from the standard
  library -> CamelCase.
- `sentiment` (controlled synthetic, classification): templated reviews with negation -> good / bad,
  where the answer is known exactly.
- `kv_recall` (synthetic memorisation): a fixed table of number -> word; the splits are the same table,
  on purpose, since the skill measured is memorising it (MoRA's experiment).
- `translate_X_Y` (toy languages): English and three letter-substitution ciphers, each marked by a
  language tag token; translate a short sentence from language X to Y.

Format: prompt + <|answer|> + answer + <|endoftext|>; labels are -100 everywhere but the answer and the
end token, so the loss is on the answer only (`encode_example`).

Special tokens in text. Our code writes a few format tokens into prompt strings itself: the language
tags of the translation tasks and the chat roles (`PROMPT_TOKENS`), and `<|answer|>` + `<|endoftext|>`
around each solved demonstration of a k-shot prompt (chapters/ch1_introduction/in_context.py). Those are
encoded as the special tokens; any other special-token text in a prompt (a bare `<|endoftext|>`, `<|pad|>`,
...) and any special-token text in an answer or a document of an `LMCorpus` is an error, since it would
silently cut or pad the user's text.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minimal.tokenizer import get_tokenizer, special_id

STDLIB = Path(sysconfig.get_paths()["stdlib"])

# Modules present (with docstrings) from Python 3.10 to 3.13, none of them in a task family below.
DOC_MODULES = """abc argparse ast bdb cmd code codecs codeop collections colorsys compileall contextlib copy copyreg
dataclasses dis doctest email.message email.utils email.parser email.header enum functools genericpath getopt
getpass graphlib gzip hashlib hmac inspect io ipaddress keyword linecache logging mailbox mimetypes
modulefinder netrc ntpath operator optparse pdb pkgutil platform posixpath pprint profile pstats py_compile
pyclbr pydoc quopri reprlib rlcompleter runpy secrets shelve signal site stat stringprep struct symtable
sysconfig tabnanny timeit token tokenize trace traceback tracemalloc types typing uuid warnings wave weakref
webbrowser zipapp zipimport unittest.case unittest.mock importlib.abc wsgiref.handlers tkinter tkinter.ttk
tkinter.filedialog turtle xml.etree.ElementTree _collections_abc _pyio pickletools ssl bz2 lzma logging.handlers
logging.config importlib._bootstrap_external email._header_value_parser email.feedparser email.generator
email.headerregistry email.policy email._policybase unittest.result unittest.loader idlelib.editor""".split()

CODE_MODULES = """argparse ast calendar configparser csv dataclasses difflib enum fractions functools heapq
inspect pprint shlex statistics string textwrap typing""".split()

FAMILIES = {
    "text": "string textwrap difflib shlex gettext html.parser locale".split(),
    "files": "os pathlib shutil glob fnmatch tempfile filecmp fileinput zipfile tarfile".split(),
    "math": "fractions statistics random numbers heapq bisect _pydecimal".split(),
    "network": "http.client http.server urllib.request urllib.parse smtplib ftplib poplib imaplib socket "
               "socketserver".split(),
    "threads": "threading queue asyncio.tasks asyncio.events asyncio.queues concurrent.futures._base "
               "multiprocessing.pool sched selectors subprocess".split(),
    "formats": "json.decoder json.encoder csv pickle configparser plistlib base64 calendar datetime "
               "xml.dom.minidom".split(),
}

LANGUAGES = ["a", "b", "c", "d"]  # a is plain English; b, c, d are letter-substitution ciphers
LANGUAGE_TAGS = frozenset(f"<|lang_{lang}|>" for lang in LANGUAGES)
# format tokens our code writes into prompt text itself (translation tags, the chat template's roles)
PROMPT_TOKENS = LANGUAGE_TAGS | {"<|system|>", "<|user|>", "<|assistant|>"}


# ------------------------------------------------------------------------------------------ reading


def module_path(name: str) -> Path:
    """The source file of a standard-library module, found on disk (works for frozen modules too)."""
    base = STDLIB.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"standard-library module {name!r} not found under {STDLIB}")


def docstrings(name: str) -> list[str]:
    """The module, class and function docstrings of one module, in source order."""
    tree = ast.parse(module_path(name).read_text(encoding="utf-8"))
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                  ast.ClassDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for n in nodes if (d := ast.get_docstring(n))]


def function_names(name: str) -> list[str]:
    tree = ast.parse(module_path(name).read_text(encoding="utf-8"))
    return [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def split_of(item: str, val: float = 0.1, test: float = 0.1) -> str:
    """'train', 'val' or 'test', decided by a hash of the item alone."""
    u = int(hashlib.sha256(item.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return "test" if u < test else "val" if u < test + val else "train"


# ------------------------------------------------------------------------------------------ corpora


@dataclass
class LMCorpus:
    """Documents per split; `tokens(split)` is their token stream, documents separated by <|endoftext|>.

    Any text works: `LMCorpus("mine", {"train": [...], "val": [...], "test": [...]})`. A document may
    not contain special-token text (it would be read as a separator); the cipher corpora's leading
    language tag is the one exception, written by `get_corpus` itself.
    """

    name: str
    docs: dict[str, list[str]]  # split -> documents
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.docs, dict) or not self.docs:
            raise TypeError(f"docs must be a dict split -> list of str, e.g. {{'train': [...], 'val': [...]}}, "
                            f"got {type(self.docs).__name__}")
        for split, docs in self.docs.items():
            if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
                raise TypeError(f"docs[{split!r}] must be a list of str (one per document), got "
                                f"{type(docs).__name__}" + ("" if isinstance(docs, str) else " with non-str items"))

    def _split(self, split: str) -> list[str]:
        if split not in self.docs:
            raise ValueError(f"corpus {self.name!r} has no split {split!r}; it has {sorted(self.docs)}")
        return self.docs[split]

    def text(self, split: str) -> str:
        return "<|endoftext|>".join(self._split(split))

    def tokens(self, split: str) -> torch.Tensor:
        """This corpus's own documents of `split`, tokenized once (the result is kept)."""
        if split not in self._cache:
            allowed = LANGUAGE_TAGS if self.name.startswith("cipher_") else frozenset()
            for i, doc in enumerate(self._split(split)):
                _check_special(doc, allowed, f"document {i} of split {split!r} of corpus {self.name!r}")
            ids = get_tokenizer().encode(self.text(split), allowed_special={"<|endoftext|>"} | allowed)
            self._cache[split] = torch.tensor(ids, dtype=torch.long)
        return self._cache[split]

    def sha256(self) -> str:
        return hashlib.sha256("".join(self.text(s) for s in ("train", "val", "test")).encode("utf-8")).hexdigest()


def _split_docs(docs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for d in docs:
        out[split_of(d, val=0.05, test=0.05)].append(d)
    return out


@functools.cache
def get_corpus(name: str) -> LMCorpus:
    if name == "docs":
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)] + [d for m in DOC_MODULES for d in docstrings(m)]
    elif name == "code":
        docs = [module_path(m).read_text(encoding="utf-8") for m in CODE_MODULES]
        # split each file into top-level chunks of about 40 lines so every split sees every module
        docs = ["\n".join(lines[i:i + 40]) for d in docs if (lines := d.splitlines())
                for i in range(0, len(lines), 40)]
    elif name.startswith("cipher_") and name[7:] in LANGUAGES:
        lang = name[7:]
        docs = [f"<|lang_{lang}|>" + encipher(d, lang) for d in get_corpus("docs").docs["train"][:400]]
    else:
        raise ValueError(f"unknown corpus {name!r}; known: docs, code, cipher_a..cipher_d")
    return LMCorpus(name, _split_docs(docs))


def check_corpus_hash(recorded: str | None) -> bool:
    """Compare the docs corpus with the hash recorded beside a base model; warn once if it differs."""
    current = get_corpus("docs").sha256()
    if recorded is not None and recorded != current:
        warnings.warn(
            "the standard library of this Python differs from the one the base models were trained on "
            "(docs corpus hash differs); numbers may move slightly", stacklevel=2)
        return False
    return True


def lm_batch(
    tokens: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of a token stream: idx [B, T]; labels = idx (the model shifts internally)."""
    if len(tokens) <= block_size:
        raise ValueError(f"token stream of {len(tokens)} is too short for block_size {block_size}")
    starts = torch.randint(0, len(tokens) - block_size, (batch_size,), generator=gen)
    idx = torch.stack([tokens[s:s + block_size] for s in starts.tolist()])  # [B, T]
    return idx, idx.clone()


# ------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass
class Task:
    name: str
    kind: str  # "classify" (pick among choices, accuracy) or "generate" (greedy decode, exact match)
    splits: dict[str, list[Example]]
    choices: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def train(self) -> list[Example]:
        return self.splits["train"]

    @property
    def val(self) -> list[Example]:
        return self.splits["val"]

    @property
    def test(self) -> list[Example]:
        return self.splits["test"]


def evaluation_subset(examples: list[Example], n: int | None) -> list[Example]:
    """The one subset rule for every score in the course: n examples evenly spaced over the split.

    Splits are ordered (the `family` test split runs class by class), so the first n would leave whole
    classes out; evenly spaced indices i * len // n cover the split from end to end. n=None or n >= len
    returns the whole split. A score on n examples moves in steps of 1/n.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"the number of examples must be a positive int or None, got {n!r}")
    return [examples[i * len(examples) // n] for i in range(n)]


def _by_hash(examples: list[Example], val: float = 0.15, test: float = 0.15) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    seen = set()
    for ex in examples:
        if ex.prompt in seen:  # a prompt appears once, so no prompt is in two splits
            continue
        seen.add(ex.prompt)
        out[split_of(ex.prompt, val, test)].append(ex)
    return out


def _first_line(doc: str, limit: int = 160) -> str:
    text = " ".join(doc.split())
    return text[:limit].rsplit(" ", 1)[0] if len(text) > limit else text


def _family() -> Task:
    examples = []
    for fam, modules in FAMILIES.items():
        items = [Example(_first_line(d), fam) for m in modules for d in docstrings(m) if len(d) >= 40]
        random.Random(fam).shuffle(items)
        examples += items[:150]  # balance the families
    return Task("family", "classify", _by_hash(examples), choices=sorted(FAMILIES),
                description="standard-library docstring -> module family")


def _camel() -> Task:
    names = sorted({n for m in CODE_MODULES + DOC_MODULES for n in function_names(m)
                    if "_" in n.strip("_") and not n.startswith("_") and n.islower() and len(n) <= 24})
    examples = [Example(n, "".join(p.capitalize() for p in n.split("_") if p)) for n in names]
    return Task("camel", "generate", _by_hash(examples), description="snake_case name -> CamelCase")


_NOUNS = "movie film book meal song show game hotel phone class trip story album play service".split()
_GOOD = "great good wonderful excellent lovely fun brilliant superb pleasant enjoyable".split()
_BAD = "bad awful terrible boring poor dull horrible weak painful disappointing".split()
_TEMPLATES = ["the {n} was {neg}{a}", "this {n} is {neg}{a}", "i found the {n} {neg}{a}",
              "honestly , the {n} was {neg}{a}", "my {n} felt {neg}{a}"]


def _sentiment() -> Task:
    examples = []
    for t in _TEMPLATES:
        for n in _NOUNS:
            for a, polarity in [(a, True) for a in _GOOD] + [(a, False) for a in _BAD]:
                for neg in ("", "not ", "never "):
                    good = polarity != bool(neg)
                    examples.append(Example(t.format(n=n, neg=neg, a=a), "good" if good else "bad"))
    return Task("sentiment", "classify", _by_hash(examples), choices=["bad", "good"],
                description="templated review with negation -> good / bad")


_WORDS = ("apple river stone cloud tiger lemon piano glass candle forest rocket silver winter garden "
          "castle dragon pepper violet copper thunder marble falcon anchor meadow").split()


def _kv_recall(n: int = 128) -> Task:
    rng = random.Random(1234)
    keys = rng.sample(range(1000, 10000), n)
    table = [Example(f"key {k}", rng.choice(_WORDS)) for k in keys]
    return Task("kv_recall", "classify", {"train": table, "val": table, "test": table}, choices=sorted(_WORDS),
                description="memorise a fixed table number -> word (train = test on purpose)")


@functools.cache
def _cipher_table(lang: str) -> dict[str, str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    if lang == "a":
        return {c: c for c in letters}
    perm = list(letters)
    random.Random("cipher-" + lang).shuffle(perm)
    return dict(zip(letters, perm))


def encipher(text: str, lang: str) -> str:
    """Substitute lowercase letters with the language's fixed permutation (a is the identity)."""
    table = _cipher_table(lang)
    return "".join(table.get(c, c) for c in text)


def _translate(src: str, tgt: str) -> Task:
    sentences = sorted({" ".join(_first_line(d).lower().split()[:6]) for d in get_corpus("docs").docs["train"][:3000]})
    sentences = [s for s in sentences if len(s) >= 20 and s.isascii()]
    examples = [Example(f"<|lang_{src}|>{encipher(s, src)}<|lang_{tgt}|>", encipher(s, tgt)) for s in sentences]
    return Task(f"translate_{src}_{tgt}", "generate", _by_hash(examples),
                description=f"toy translation from language {src} to {tgt} (letter-substitution ciphers)")


TASK_NAMES = ["family", "camel", "sentiment", "kv_recall"] + [
    f"translate_{s}_{t}" for s in LANGUAGES for t in LANGUAGES if s != t]


@functools.cache
def get_task(name: str) -> Task:
    builders = {"family": _family, "camel": _camel, "sentiment": _sentiment, "kv_recall": _kv_recall}
    if name in builders:
        return builders[name]()
    parts = name.split("_")
    if len(parts) == 3 and parts[0] == "translate" and parts[1] in LANGUAGES and parts[2] in LANGUAGES \
            and parts[1] != parts[2]:
        return _translate(parts[1], parts[2])
    raise ValueError(f"unknown task {name!r}; known: {TASK_NAMES}")


# ------------------------------------------------------------------------------------------ batching


def _check_special(text: str, allowed: frozenset[str] | set[str], what: str) -> None:
    """A ValueError if `text` contains special-token text outside `allowed` (see the module docstring)."""
    found = sorted({t for t in get_tokenizer().special_tokens_set if t in text} - set(allowed))
    if found:
        raise ValueError(f"{what} contains the special token text {found}; our code adds the format tokens "
                         f"itself, so remove it from the text (or escape it, e.g. '<| endoftext |>')")


def _check_prompt(prompt: str) -> None:
    """Prompt text may hold PROMPT_TOKENS, and <|answer|>/<|endoftext|> only as solved demonstrations
    (`demo<|answer|>answer<|endoftext|>`, the k-shot format); the query's own <|answer|> is added here."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
    *demos, query = prompt.split("<|endoftext|>")
    for i, demo in enumerate(demos):
        if demo.count("<|answer|>") != 1:
            raise ValueError(f"prompt {prompt[:60]!r}...: <|endoftext|> in a prompt may only end a solved "
                             f"demonstration 'prompt<|answer|>answer<|endoftext|>', but demonstration {i} has "
                             f"{demo.count('<|answer|>')} <|answer|>; remove <|endoftext|> from the text")
    _check_special(query, PROMPT_TOKENS, f"prompt {prompt[:60]!r}")
    for demo in demos:
        _check_special(demo.replace("<|answer|>", ""), PROMPT_TOKENS, f"prompt {prompt[:60]!r}")


def encode_prompt(prompt: str) -> list[int]:
    """prompt tokens + <|answer|>: what the model sees before it answers."""
    _check_prompt(prompt)
    enc = get_tokenizer()
    allowed = PROMPT_TOKENS | {"<|answer|>", "<|endoftext|>"}
    return enc.encode(prompt, allowed_special=allowed) + [special_id(enc, "<|answer|>")]


def encode_example(ex: Example, block_size: int) -> tuple[list[int], list[int]]:
    """(ids, labels) for prompt <|answer|> answer <|endoftext|>; labels are -100 outside the answer.

    A prompt too long for the block is cut from the left (its end, next to the answer, is kept).
    """
    enc = get_tokenizer()
    p = encode_prompt(ex.prompt)
    _check_special(ex.answer, frozenset(), f"answer {ex.answer[:60]!r}")
    a = enc.encode(ex.answer, disallowed_special=()) + [special_id(enc, "<|endoftext|>")]
    if len(a) >= block_size:
        raise ValueError(f"answer of {len(a)} tokens does not fit block_size {block_size}")
    p = p[-(block_size - len(a)):]
    return p + a, [-100] * len(p) + a


def collate(examples: list[Example], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded idx [B, T] and labels [B, T] (-100 on prompt and padding)."""
    pad = special_id(get_tokenizer(), "<|pad|>")
    pairs = [encode_example(ex, block_size) for ex in examples]
    T = max(len(ids) for ids, _ in pairs)
    idx = torch.full((len(pairs), T), pad, dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        idx[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
    return idx, labels


def sample_examples(data: Task | tuple[torch.Tensor, torch.Tensor], n_samples: int, block_size: int,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, labels) [N, T] of at most n_samples examples, drawn once (seeded) from a Task's train split, or the
    first n_samples rows of a given (idx, labels) batch. Data-driven masks (FISH, FISH-DIP) score these."""
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if isinstance(data, Task):
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n_samples]
        return collate([data.train[i] for i in order.tolist()], block_size)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0][:n_samples], data[1][:n_samples]
    raise TypeError(f"data must be a minimal.data.Task or an (idx, labels) tuple of tensors, got {type(data).__name__}")


def task_batch(task: Task, batch_size: int, block_size: int, gen: torch.Generator,
               split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch (drawn with `gen`) of the task's `split`, collated as `collate` does."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if split not in task.splits or not task.splits[split]:
        raise ValueError(f"task {task.name!r} has no {split!r} examples; splits: "
                         f"{ {k: len(v) for k, v in task.splits.items()} }")
    data = task.splits[split]
    pick = torch.randint(0, len(data), (batch_size,), generator=gen).tolist()
    return collate([data[i] for i in pick], block_size)
