"""FinSQL in miniature: text-to-SQL with LoRA plug-ins, weight merging and output calibration.

Paper: Chao Zhang, Yuren Mao, Yijiang Fan, Yu Mi, Yunjun Gao, Lu Chen, Dongfang Lou, Jinshu Lin,
"FinSQL: Model-Agnostic LLMs-based Text-to-SQL Framework for Financial Analysis", SIGMOD 2024,
arXiv 2401.10506. Builds on lora.py (chapter 4): copy minimal/, lora.py and the
four ch5 files sql_databases.py, schema_linking.py, sql_eval.py and this one.

The pipeline, one stage per section of this file:

    question --(schema linking)--> short prompt --(base GPT + the database's LoRA plug-in)--> candidates
             --(repair, execute, vote)--> SQL

1. Prompt construction with hybrid data augmentation. Training pairs (question, SQL) are enlarged with
   (a) paraphrased questions (FinSQL asks an LLM; we substitute phrases from a fixed synonym table, seeded)
   and (b) a reasoning-style target in which the SQL skeleton comes first:
        select _ from _ where _ = _ and _ = _ | select rev from fin where tkr = 'nova' and yr = 2021
   (identifiers and literals become "_", keywords stay); the query is what follows the "|".
2. LoRA plug-ins: one LoRA per database on the same frozen base (lora.py: dW = s B A, B = 0 at init),
   trained on that database's pairs; serving a question loads the plug-in of its database.
3. Weight merging for few-shot transfer to a new database (the paper's two rules, per adapted layer):
        M1  A = (1/K) sum_k A_k,  B = (1/K) sum_k B_k                     (LoraHub with uniform weights)
        M2  dW = (1/K) sum_k s B_k A_k = U S V^T,  keep the top r:  B = U_r S_r^1/2 / s^1/2,
            A = S_r^1/2 V_r^T / s^1/2,  so that s B A is the best rank-r approximation of the mean delta
   and fine-tune the merged plug-in on a handful of the new database's pairs (versus B = 0, A random).
4. Decoding: greedy, or several samples (temperature, seeded) scored by their log-likelihood; output
   calibration (sql_eval.py) repairs, executes and votes.

Choices made here (where the paper is silent or too large for a 1M-parameter model):
- every plug-in starts from the same A (same seed). M1 averages the A's of independently trained LoRAs;
  with different random starts their A's would live in unrelated bases and the mean of products would
  not resemble any product of means;
- the LoRA adapts every linear layer with r = 32 (alpha = 64); with r = 8 the plug-in reached about a
  third of the exact match of r = 32 after the same 200 steps in our runs (the paper leaves r, alpha and the
  learning rate to LoRA practice);
- the prompt has a token budget (`max_prompt_tokens`); a prompt without schema linking is the full
  schema cut at that budget (about 310 tokens would be needed), then the question;
- the skeleton makes targets longer (our SQL: 30 tokens on average, 48 at most; skeleton + SQL: 48 and
  73), which a 128-token context feels: a pair that would not fit gets a smaller prompt budget.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from tqdm import tqdm

from chapters.ch4_low_rank.lora import LoRALinear, apply_lora, lora_scale
from chapters.ch5_applications.schema_linking import SchemaLinker, full_prompt, linked_prompt
from chapters.ch5_applications.sql_databases import SQLExample, SQLTask
from chapters.ch5_applications.sql_eval import SQL_KEYWORDS, ReadOnlyExecutor, score_predictions, self_consistency
from minimal.data import Example, collate, encode_prompt, get_tokenizer
from minimal.tokenizer import special_id
from minimal.train import TrainConfig, TrainResult, train

State = dict[str, torch.Tensor]  # "<layer>.A" [r, in], "<layer>.B" [out, r]

# ------------------------------------------------------------------------------------------ 1. prompts


# A paraphraser standing in for FinSQL's LLM: phrases and their substitutes. It shares its vocabulary with
# the third phrasing of the templates in sql_databases.py, which no original training question uses, so
# paraphrasing is measured in a setting that favours it; the notebook says so.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "what was the": ("show the", "give the", "tell me the"),
    "show the": ("what was the", "give the"),
    "what is the": ("show the", "give the"),
    "in which year did": ("which year did", "when did"),
    "year with": ("the year with",),
    "highest": ("largest", "biggest", "top"),
    "lowest": ("smallest", "least"),
    "above": ("over", "more than"),
    "average": ("mean",),
    "number of": ("count of",),
    "how many": ("count the",),
    "per": ("by", "for each"),
    "by": ("per", "for each"),
    "which": ("what",),
    "with": ("having",),
}
SEPARATOR = " | "  # between the skeleton and the query in an augmented target
MAX_SQL_TOKENS = 56  # decoding budget for plain-SQL answers: our longest gold query has 48 tokens


def paraphrase(question: str, n: int, seed: int = 0) -> list[str]:
    """Up to n distinct rewrites of `question` (none equal to it) by phrase substitution; quoted values and
    numbers are never touched."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{seed}-{question}")
    phrases = sorted(SYNONYMS, key=len, reverse=True)  # longest first: "in which year did" before "which"
    pattern = re.compile(r"\b(" + "|".join(re.escape(p) for p in phrases) + r")\b")
    pieces = re.split(r"('[^']*')", question)  # odd pieces are quoted values
    out: list[str] = []
    for _ in range(8 * n):
        if len(out) >= n:
            break
        text = "".join(p if i % 2 else pattern.sub(lambda m: rng.choice(SYNONYMS[m.group(1)])
                                                   if rng.random() < 0.6 else m.group(1), p)
                       for i, p in enumerate(pieces))
        if text != question and text not in out:
            out.append(text)
    return out


def sql_skeleton(sql: str) -> str:
    """Keywords, operators and punctuation of `sql`; every identifier and literal becomes '_'."""
    def keep(m: re.Match) -> str:
        return m.group(0) if m.group(0).lower() in SQL_KEYWORDS else "_"
    return re.sub(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b|\b[A-Za-z_][A-Za-z0-9_]*\b(?!\()", keep, sql)


def extract_sql(output: str) -> str:
    """The query of a generated answer: what follows the skeleton separator, or the whole answer."""
    return output.split("|", 1)[1].strip() if "|" in output else output.strip()


@dataclass(frozen=True)
class PromptConfig:
    linking: bool = True
    k1: int = 2  # tables kept by the linker
    k2: int = 4  # columns kept per table (its key columns included)
    max_prompt_tokens: int = 64  # prompt budget; the rest of the 128-token block is for the answer

    def __post_init__(self) -> None:
        if self.max_prompt_tokens < 8:
            raise ValueError(f"max_prompt_tokens must be at least 8, got {self.max_prompt_tokens}")


def build_prompt(question: str, task: SQLTask, linker: SchemaLinker | None, cfg: PromptConfig) -> str:
    """Schema (linked or full) + newline + question, with the schema cut to fit cfg.max_prompt_tokens."""
    if cfg.linking:
        if linker is None:
            raise ValueError("linking=True needs a SchemaLinker for the task")
        text = linked_prompt(question, linker.link(question, cfg.k1, cfg.k2))
    else:
        text = full_prompt(question, task.tables)
    schema, _, q = text.rpartition("\n")
    enc = get_tokenizer()
    room = cfg.max_prompt_tokens - len(enc.encode("\n" + q)) - 1  # -1: the <|answer|> token
    if room <= 0:
        raise ValueError(f"the question alone needs more than {cfg.max_prompt_tokens} prompt tokens: {q!r}")
    ids = enc.encode(schema)
    if len(ids) > room:
        schema = enc.decode(ids[:room])
    return f"{schema}\n{q}"


@dataclass(frozen=True)
class AugmentConfig:
    paraphrases: int = 0  # extra rewrites per training question
    skeleton: bool = False  # targets "skeleton | sql" instead of "sql"
    seed: int = 0


def target_of(sql: str, skeleton: bool) -> str:
    return f"{sql_skeleton(sql)}{SEPARATOR}{sql}" if skeleton else sql


def training_examples(task: SQLTask, examples: Sequence[SQLExample], linker: SchemaLinker | None,
                      prompt_cfg: PromptConfig, aug: AugmentConfig = AugmentConfig(),
                      block_size: int = 128) -> list[Example]:
    """(prompt, target) pairs: every question plus `aug.paraphrases` rewrites of it, all with the same SQL.

    When prompt + target would not fit the block (long skeleton targets), the prompt's budget shrinks for
    that pair, so the schema is cut at its end rather than the question losing its start.
    """
    enc = get_tokenizer()
    out = []
    for ex in examples:
        target = target_of(ex.sql, aug.skeleton)
        room = block_size - len(enc.encode(target)) - 1  # -1: <|endoftext|>
        cfg = prompt_cfg if room >= prompt_cfg.max_prompt_tokens else replace(prompt_cfg, max_prompt_tokens=room)
        for q in [ex.question] + paraphrase(ex.question, aug.paraphrases, aug.seed):
            out.append(Example(build_prompt(q, task, linker, cfg), target))
    return out


# ------------------------------------------------------------------------------------------ 2. plug-ins


@dataclass(frozen=True)
class PluginConfig:
    r: int = 32
    alpha: float = 64.0
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
    init_seed: int = 0  # the same A for every plug-in (see the module docstring)


def new_plugin(base: nn.Module, cfg: PluginConfig = PluginConfig()) -> nn.Module:
    """A copy of the frozen base with a fresh LoRA (B = 0, A from cfg.init_seed): the identity at init."""
    model = copy.deepcopy(base)
    with torch.random.fork_rng(devices=[]):  # seed A without touching the caller's random state
        torch.manual_seed(cfg.init_seed)
        apply_lora(model, r=cfg.r, alpha=cfg.alpha, targets=cfg.targets)
    return model


def plugin_state(model: nn.Module) -> State:
    """A copy of every LoRA factor: {'h.0.attn.c_attn.A': [r, in], 'h.0.attn.c_attn.B': [out, r], ...}."""
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{name}.A"], state[f"{name}.B"] = m.A.detach().clone(), m.B.detach().clone()
    if not state:
        raise ValueError("the model has no LoRALinear; create it with new_plugin()")
    return state


@torch.no_grad()
def load_plugin(model: nn.Module, state: State) -> nn.Module:
    """Copy a plug-in's factors into `model` (made by new_plugin with the same config)."""
    mine = plugin_state(model)
    if set(mine) != set(state):
        raise ValueError(f"plug-in layers differ: missing {sorted(set(mine) - set(state))[:3]}, "
                         f"unexpected {sorted(set(state) - set(mine))[:3]}")
    for key, t in state.items():
        if t.shape != mine[key].shape:
            raise ValueError(f"{key}: plug-in has shape {tuple(t.shape)}, the model {tuple(mine[key].shape)}")
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.A.copy_(state[f"{name}.A"])
            m.B.copy_(state[f"{name}.B"])
    return model


def train_plugin(model: nn.Module, examples: Sequence[Example], steps: int, batch_size: int = 8,
                 lr: float = 5e-3, seed: int = 0, block_size: int = 128, progress: bool | None = False) -> TrainResult:
    """Train the LoRA of `model` on (prompt, target) pairs with the shared loop (minimal/train.py)."""
    if not examples:
        raise ValueError("train_plugin needs at least one example")
    examples = list(examples)

    def get_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, len(examples), (batch_size,), generator=gen).tolist()
        return collate([examples[i] for i in pick], block_size)

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(10, steps), seed=seed,
                      progress=progress, log_every=0)
    return train(model, get_batch, cfg, desc="finsql plug-in")


# ------------------------------------------------------------------------------------------ 3. merging


def _check_states(states: Sequence[State]) -> None:
    if not states:
        raise ValueError("merging needs at least one plug-in")
    keys = set(states[0])
    for k, s in enumerate(states[1:], 1):
        if set(s) != keys or any(s[n].shape != states[0][n].shape for n in keys):
            raise ValueError(f"plug-in {k} has other layers or shapes than plug-in 0; merge plug-ins of one config")


def merge_m1(states: Sequence[State]) -> State:
    """M1: the element-wise mean of the A's and of the B's (K = 1 returns the plug-in unchanged)."""
    _check_states(states)
    return {n: torch.stack([s[n] for s in states]).mean(0) for n in states[0]}


def mean_deltas(states: Sequence[State], scale: float) -> dict[str, torch.Tensor]:
    """{layer: (1/K) sum_k scale * B_k @ A_k} [out, in]: what M2 factorises."""
    _check_states(states)
    layers = [n[:-2] for n in states[0] if n.endswith(".A")]
    return {layer: torch.stack([scale * s[f"{layer}.B"] @ s[f"{layer}.A"] for s in states]).mean(0)
            for layer in layers}


def factorize(delta: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with scale * B @ A = the best rank-r approximation of delta (truncated SVD)."""
    if not 1 <= r <= min(delta.shape):
        raise ValueError(f"rank r={r} must be in [1, {min(delta.shape)}] for a delta of shape {tuple(delta.shape)}")
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)  # [out, m], [m], [m, in]
    root = (S[:r] / scale).sqrt()  # [r]
    B = (U[:, :r] * root).to(delta.dtype)  # [out, r]
    A = (root[:, None] * Vh[:r]).to(delta.dtype)  # [r, in]
    return A, B


def merge_m2(states: Sequence[State], scale: float, r: int | None = None) -> State:
    """M2: mean of the deltas, re-factorised to rank r (default: the plug-ins' rank) by truncated SVD."""
    deltas = mean_deltas(states, scale)
    r = r or next(t.shape[0] for n, t in states[0].items() if n.endswith(".A"))
    out = {}
    for layer, delta in deltas.items():
        out[f"{layer}.A"], out[f"{layer}.B"] = factorize(delta, r, scale)
    return out


def truncation_error(delta: torch.Tensor, r: int) -> float:
    """||delta - best rank-r approximation||_F / ||delta||_F."""
    A, B = factorize(delta, r, 1.0)
    return float(torch.linalg.norm(delta - B @ A) / torch.linalg.norm(delta).clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ 4. decoding


@dataclass
class Candidate:
    text: str  # the generated answer (skeleton and query, or query)
    sql: str  # the query extracted from it
    logprob: float  # sum of the log-probabilities of the generated tokens (temperature 1)
    tokens: list[int]  # the generated token ids, the stop token included when it was produced


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[str], n: int = 1, temperature: float = 0.0, seed: int = 0,
             block_size: int = 128, max_new_tokens: int | None = None, scores: bool = True,
             progress: bool = False) -> list[list[Candidate]]:
    """n candidates per prompt (greedy when temperature == 0, then n must be 1), with their log-likelihood
    (one extra forward pass; scores=False skips it and leaves logprob = nan).

    Prompts of equal token length share a batch (GPT.generate has no padding); each answer stops at
    <|endoftext|>, after max_new_tokens tokens, or at the end of the block.
    """
    if temperature == 0 and n != 1:
        raise ValueError("greedy decoding gives one candidate per prompt; use temperature > 0 for n > 1")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    enc = get_tokenizer()
    eot = special_id(enc, "<|endoftext|>")
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_prompt(p) for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        if len(ids) >= block_size:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, no room left in a block of {block_size}")
        by_len.setdefault(len(ids), []).append(i)
    gen = torch.Generator(device=device).manual_seed(seed)
    out: list[list[Candidate]] = [[] for _ in prompts]
    for length, rows in tqdm(sorted(by_len.items()), desc="decode", disable=not progress, leave=False):
        idx = torch.tensor([encoded[i] for i in rows for _ in range(n)], device=device)  # [b*n, T]
        budget = block_size - length if max_new_tokens is None else min(max_new_tokens, block_size - length)
        seq = model.generate(idx, budget, temperature=temperature, stop_token=eot, generator=gen)
        if scores:
            logp = model(seq).logits[:, :-1].log_softmax(-1)  # [b*n, T'-1, V]
            picked = logp.gather(-1, seq[:, 1:, None]).squeeze(-1)  # [b*n, T'-1]: log p(token t+1 | ..t)
        for j, toks in enumerate(seq[:, length:].tolist()):
            cut = toks.index(eot) + 1 if eot in toks else len(toks)  # keep the stop token in the likelihood
            text = enc.decode([t for t in toks[:cut] if t != eot])
            score = picked[j, length - 1:length - 1 + cut].sum().item() if scores else float("nan")
            out[rows[j // n]].append(Candidate(text, extract_sql(text), score, toks[:cut]))
    return out


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(model: nn.Module, task: SQLTask, prompts: Sequence[str], examples: Sequence[SQLExample],
             n_samples: int = 1, temperature: float = 0.0, seed: int = 0,
             max_new_tokens: int | None = None) -> dict[str, float]:
    """EX / EM / failing queries on `examples`; with n_samples > 1, self-consistency over sampled candidates
    (the greedy answer is one of them). Answers are cut at max_new_tokens (None: the end of the block)."""
    if len(prompts) != len(examples):
        raise ValueError(f"{len(prompts)} prompts for {len(examples)} examples")
    greedy = [c[0] for c in generate(model, prompts, max_new_tokens=max_new_tokens, scores=n_samples > 1)]
    with ReadOnlyExecutor(task.path) as executor:
        if n_samples <= 1:
            preds = [c.sql for c in greedy]
        else:
            names = sorted({n for t in task.tables.values() for n in (t.name, *t.columns)})
            sampled = generate(model, prompts, n=n_samples - 1, temperature=temperature, seed=seed,
                               max_new_tokens=max_new_tokens)
            preds = [self_consistency([(c.sql, c.logprob) for c in [g] + s], executor, names).sql
                     for g, s in zip(greedy, sampled)]
        score = score_predictions(preds, [e.sql for e in examples], executor)
    return score.as_dict()


@torch.no_grad()
def heldout_loss(model: nn.Module, examples: Sequence[Example], block_size: int = 128, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy on the target tokens of (prompt, target) pairs (teacher forcing)."""
    if not examples:
        raise ValueError("heldout_loss needs at least one example")
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    for start in range(0, len(examples), batch_size):
        idx, labels = (t.to(device) for t in collate(list(examples[start:start + batch_size]), block_size))
        n = int((labels[:, 1:] != -100).sum())
        total += model(idx, labels=labels).loss.item() * n
        count += n
    return total / count


# ------------------------------------------------------------------------------------------ the recipe


@dataclass
class RecipeConfig:
    database: str = "stock"  # the plug-in that is trained and scored
    batch_size: int = 8
    lr: float = 5e-3
    prompt: PromptConfig = field(default_factory=PromptConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    plugin: PluginConfig = field(default_factory=PluginConfig)
    n_samples: int = 5  # self-consistency: the greedy answer + 4 samples; 1 turns it off
    temperature: float = 0.7
    max_test: int | None = None  # score only the first max_test test questions
    # few-shot transfer, off unless transfer_to names a database
    transfer_to: str | None = None
    other_sources: tuple[str, ...] = ("fund",)  # more plug-ins to merge with the first one
    few_shot: int = 16
    transfer_steps: int = 30
    merge: str = "m2"  # "m1", "m2" or "none" (random LoRA init)


def _fit_and_score(base: nn.Module, task: SQLTask, linker: SchemaLinker, cfg: RecipeConfig, steps: int,
                   examples: Sequence[SQLExample], seed: int, init: State | None = None,
                   progress: bool = False) -> tuple[nn.Module, dict[str, float]]:
    model = new_plugin(base, cfg.plugin)
    if init is not None:
        load_plugin(model, init)
    data = training_examples(task, examples, linker, cfg.prompt, cfg.augment)
    train_plugin(model, data, steps, cfg.batch_size, cfg.lr, seed=seed, progress=progress)
    test = task.test[: cfg.max_test]
    prompts = [build_prompt(e.question, task, linker, cfg.prompt) for e in test]
    return model, evaluate(model, task, prompts, test, max_new_tokens=_budget(cfg))


def _budget(cfg: RecipeConfig) -> int | None:
    return None if cfg.augment.skeleton else MAX_SQL_TOKENS


def finsql_recipe(steps: int = 200, seed: int = 0, cfg: RecipeConfig | None = None, directory: str | None = None,
                  progress: bool = False) -> dict[str, float]:
    """The pipeline at leaderboard size, about a minute of one CPU core with the defaults.

    Trains the LoRA plug-in of `cfg.database` (schema-linked prompts) for `steps` steps on the shipped
    `base` model and scores its held-out questions: greedy EX / EM / failing queries, then EX / EM with
    self-consistency (`cfg.n_samples` candidates). With `cfg.transfer_to`, it also trains the plug-ins of
    `cfg.other_sources`, merges them with the first (`cfg.merge`), fine-tunes the merged plug-in on
    `cfg.few_shot` pairs of the new database and adds transfer_EX / transfer_EM.
    """
    import tempfile

    from chapters.ch5_applications.sql_databases import load_task
    from minimal.pretrained import load_base

    cfg = cfg or RecipeConfig()
    if cfg.merge not in ("m1", "m2", "none"):
        raise ValueError(f"merge must be 'm1', 'm2' or 'none', got {cfg.merge!r}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        where = directory or tmp
        base = load_base("base")
        names = [cfg.database] + ([*cfg.other_sources, cfg.transfer_to] if cfg.transfer_to else [])
        tasks = {n: load_task(n, where, seed=seed) for n in names}
        linkers = {n: SchemaLinker.from_database(t.tables, t.path) for n, t in tasks.items()}
        task = tasks[cfg.database]
        model, greedy = _fit_and_score(base, task, linkers[cfg.database], cfg, steps, task.train, seed, None, progress)
        out = {"EX": greedy["EX"], "EM": greedy["EM"], "errors": greedy["errors"], "n_test": greedy["n"]}
        if cfg.n_samples > 1:
            test = task.test[: cfg.max_test]
            prompts = [build_prompt(e.question, task, linkers[cfg.database], cfg.prompt) for e in test]
            voted = evaluate(model, task, prompts, test, cfg.n_samples, cfg.temperature, seed, _budget(cfg))
            out |= {"EX_sc": voted["EX"], "EM_sc": voted["EM"]}
        if cfg.transfer_to:
            states = [plugin_state(model)]
            for i, name in enumerate(cfg.other_sources, 1):
                other = new_plugin(base, cfg.plugin)
                data = training_examples(tasks[name], tasks[name].train, linkers[name], cfg.prompt, cfg.augment)
                train_plugin(other, data, steps, cfg.batch_size, cfg.lr, seed=seed + i, progress=progress)
                states.append(plugin_state(other))
            init = {"m1": lambda: merge_m1(states), "none": lambda: None,
                    "m2": lambda: merge_m2(states, lora_scale(cfg.plugin.r, cfg.plugin.alpha))}[cfg.merge]()
            target = tasks[cfg.transfer_to]
            shots = random.Random(seed).sample(target.train, cfg.few_shot)
            _, score = _fit_and_score(base, target, linkers[cfg.transfer_to], cfg, cfg.transfer_steps, shots, seed,
                                      init, progress)
            out |= {"transfer_EX": score["EX"], "transfer_EM": score["EM"]}
    return out
