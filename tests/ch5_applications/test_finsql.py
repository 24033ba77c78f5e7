"""FinSQL pipeline: augmentation, prompts within budget, plug-ins, merge rules M1/M2, decoding, the recipe."""

from __future__ import annotations

import re

import pytest
import torch

from chapters.ch4_low_rank.lora import LoRALinear
from chapters.ch5_applications.finsql import (
    MAX_SQL_TOKENS,
    SEPARATOR,
    AugmentConfig,
    PluginConfig,
    PromptConfig,
    RecipeConfig,
    build_prompt,
    evaluate,
    extract_sql,
    factorize,
    finsql_recipe,
    generate,
    heldout_loss,
    load_plugin,
    mean_deltas,
    merge_m1,
    merge_m2,
    new_plugin,
    paraphrase,
    plugin_state,
    sql_skeleton,
    target_of,
    train_plugin,
    training_examples,
    truncation_error,
)
from chapters.ch5_applications.schema_linking import SchemaLinker
from chapters.ch5_applications.sql_databases import load_task
from minimal.data import encode_example, encode_prompt, get_tokenizer
from minimal.pretrained import load_base
from minimal.tokenizer import special_id
from tests.helpers import tiny_config, tiny_gpt

# the real tokenizer's vocabulary and block, a tiny network
SQL_TINY = tiny_config(vocab_size=2048, block_size=128, n_layer=1, n_head=2, n_embd=32)
SMALL_PLUGIN = PluginConfig(r=4, alpha=8.0)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    task = load_task("stock", tmp_path_factory.mktemp("db"))
    return task, SchemaLinker.from_database(task.tables, task.path)


# ------------------------------------------------------------------------------------------ augmentation


def test_paraphrase_properties(stock) -> None:
    task, _ = stock
    for ex in task.train[:40]:
        rewrites = paraphrase(ex.question, 3, seed=1)
        assert len(rewrites) <= 3 and len(set(rewrites)) == len(rewrites)
        assert ex.question not in rewrites
        assert rewrites == paraphrase(ex.question, 3, seed=1)  # seeded
        for r in rewrites:  # quoted values and numbers survive verbatim
            assert re.findall(r"'[^']*'|\d+", r) == re.findall(r"'[^']*'|\d+", ex.question)
    assert paraphrase("what was the average revenue", 0) == []
    assert "mean" in " ".join(paraphrase("average revenue in 2021", 4, seed=0))
    assert paraphrase("'what was the highest'", 3) == []  # nothing outside quotes to rewrite
    with pytest.raises(ValueError):
        paraphrase("x", -1)


def test_every_gold_query_fits_the_decoding_budget(tmp_path) -> None:
    enc = get_tokenizer()
    for name in ("stock", "fund", "macro", "bank"):
        task = load_task(name, tmp_path)
        longest = max(len(enc.encode(e.sql)) for e in task.train + task.test)
        assert longest + 1 <= MAX_SQL_TOKENS  # + <|endoftext|>


def test_skeleton_and_extraction(stock) -> None:
    sql = "select sector, avg(rev_est) from fin join firm using (tkr) where yr = 2021 group by sector"
    assert sql_skeleton(sql) == "select _, avg(_) from _ join _ using (_) where _ = _ group by _"
    assert sql_skeleton("select count(*) from fin where tkr = 'nova' and rev > 12.5") == \
        "select count(*) from _ where _ = _ and _ > _"
    task, _ = stock
    for ex in task.train:
        skeleton = sql_skeleton(ex.sql)
        assert "'" not in skeleton and not re.search(r"\d", skeleton)
        assert not set(re.findall(r"[a-z_]+", skeleton)) & {"fin", "firm", "tkr", "yr", "px"}
        assert extract_sql(target_of(ex.sql, skeleton=True)) == ex.sql
        assert extract_sql(target_of(ex.sql, skeleton=False)) == ex.sql
        assert target_of(ex.sql, True) == skeleton + SEPARATOR + ex.sql


def test_training_examples_hybrid_augmentation(stock) -> None:
    task, linker = stock
    originals = task.train[:10]
    plain = training_examples(task, originals, linker, PromptConfig())
    both = training_examples(task, originals, linker, PromptConfig(), AugmentConfig(paraphrases=2, skeleton=True))
    assert [e.answer for e in plain] == [e.sql for e in originals]
    expected = sum(1 + len(paraphrase(e.question, 2, 0)) for e in originals)
    assert len(both) == expected > len(plain)
    assert {extract_sql(e.answer) for e in both} == {e.sql for e in originals}
    assert all(SEPARATOR in e.answer for e in both)
    assert len({e.prompt for e in both}) == len(both)  # every paraphrase is a new prompt
    longest = max(task.train, key=lambda e: len(sql_skeleton(e.sql)))  # a JOIN with a filter
    for pair in training_examples(task, [longest], linker, PromptConfig(), AugmentConfig(skeleton=True)):
        prompt_ids = encode_prompt(pair.prompt)
        ids, _ = encode_example(pair, 128)
        assert ids[: len(prompt_ids)] == prompt_ids  # the whole prompt is kept: minimal.data did not cut it
        assert len(ids) <= 128 and pair.prompt.endswith("\n" + longest.question)


# ------------------------------------------------------------------------------------------ prompts


def test_prompts_fit_the_budget(stock) -> None:
    task, linker = stock
    for cfg in (PromptConfig(max_prompt_tokens=64), PromptConfig(linking=False, max_prompt_tokens=64),
                PromptConfig(linking=False, max_prompt_tokens=40)):
        for ex in task.test:
            prompt = build_prompt(ex.question, task, linker, cfg)
            assert len(encode_prompt(prompt)) <= cfg.max_prompt_tokens
            assert prompt.endswith("\n" + ex.question)
    cut = build_prompt(task.test[0].question, task, None, PromptConfig(linking=False))
    assert cut.startswith(" firm: tkr sector | fin: tkr yr rev")  # the full schema, cut at the budget
    with pytest.raises(ValueError, match="SchemaLinker"):
        build_prompt("revenue in 2021", task, None, PromptConfig())
    with pytest.raises(ValueError, match="question alone"):
        build_prompt("revenue " * 40, task, linker, PromptConfig(max_prompt_tokens=16))


# ------------------------------------------------------------------------------------------ plug-ins


def test_plugin_is_identity_at_init_and_shares_A() -> None:
    base = tiny_gpt(config=SQL_TINY)
    idx = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = new_plugin(base, SMALL_PLUGIN), new_plugin(base, SMALL_PLUGIN)
    assert torch.equal(a(idx).logits, base(idx).logits)
    sa, sb = plugin_state(a), plugin_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same A (and B = 0)
    assert all(torch.count_nonzero(t) == 0 for k, t in sa.items() if k.endswith(".B"))
    assert not any(isinstance(m, LoRALinear) for m in base.modules())  # the base itself is left alone
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    new_plugin(base, SMALL_PLUGIN)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is left where it was
    other = plugin_state(new_plugin(base, PluginConfig(r=4, alpha=8.0, init_seed=1)))
    assert not torch.equal(other["h.0.attn.c_attn.A"], sa["h.0.attn.c_attn.A"])


def test_plugin_learns_on_a_tiny_run(stock) -> None:
    """The shipped `small` model (a random network barely moves with a LoRA in 30 steps) learns 8 pairs."""
    task, linker = stock
    model = new_plugin(load_base("small"), PluginConfig(r=8, alpha=16.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = training_examples(task, task.train[:8], linker, PromptConfig())
    result = train_plugin(model, data, steps=30, batch_size=8, lr=1e-2)
    first = sum(h["loss"] for h in result.history[:5]) / 5
    assert result.final_loss < 0.3 * first
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    with pytest.raises(ValueError, match="at least one example"):
        train_plugin(model, [], steps=1)


def test_load_plugin_round_trip_and_checks() -> None:
    base = tiny_gpt(config=SQL_TINY)
    model = new_plugin(base, SMALL_PLUGIN)
    state = random_state(model, seed=3)
    load_plugin(model, state)
    assert all(torch.equal(plugin_state(model)[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="shape"):
        load_plugin(new_plugin(base, PluginConfig(r=2, alpha=4.0)), state)
    with pytest.raises(ValueError, match="layers differ"):
        load_plugin(model, {k: v for k, v in state.items() if "h.0.mlp" not in k})
    with pytest.raises(ValueError, match="no LoRALinear"):
        plugin_state(base)


# ------------------------------------------------------------------------------------------ merging


def random_state(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in plugin_state(model).items()}


def test_m1_is_the_mean_of_factors_and_K1_is_identity() -> None:
    model = new_plugin(tiny_gpt(config=SQL_TINY), SMALL_PLUGIN)
    s1, s2, s3 = (random_state(model, k) for k in range(3))
    single = merge_m1([s1])
    assert all(torch.equal(single[k], s1[k]) for k in s1)
    merged = merge_m1([s1, s2, s3])
    for k in s1:
        torch.testing.assert_close(merged[k], (s1[k] + s2[k] + s3[k]) / 3)
    with pytest.raises(ValueError, match="at least one"):
        merge_m1([])
    with pytest.raises(ValueError, match="other layers or shapes"):
        merge_m1([s1, {k: v[:1] for k, v in s2.items()}])


def test_m2_mean_delta_and_truncation() -> None:
    model = new_plugin(tiny_gpt(config=SQL_TINY), SMALL_PLUGIN)
    states = [random_state(model, k) for k in range(3)]
    s = 2.0
    deltas = mean_deltas(states, s)
    layer = "h.0.mlp.c_fc"
    by_hand = sum(s * st[f"{layer}.B"] @ st[f"{layer}.A"] for st in states) / 3  # [128, 32]
    torch.testing.assert_close(deltas[layer], by_hand)
    # at rank 3 x 4 = 12 the mean of three rank-4 deltas is represented exactly
    full = merge_m2(states, s, r=12)
    torch.testing.assert_close(s * full[f"{layer}.B"] @ full[f"{layer}.A"], by_hand, atol=1e-5, rtol=1e-4)
    # at the plug-in rank (default) it is the best rank-4 approximation: Eckart-Young error
    m2 = merge_m2(states, s)
    assert m2[f"{layer}.A"].shape == (4, 32) and m2[f"{layer}.B"].shape == (128, 4)
    sigma = torch.linalg.svdvals(by_hand.double())
    err = torch.linalg.norm(by_hand - s * m2[f"{layer}.B"] @ m2[f"{layer}.A"])
    assert err.item() == pytest.approx(sigma[4:].square().sum().sqrt().item(), rel=1e-4)
    # merging one plug-in with M2 at its own rank gives back its delta
    one = merge_m2(states[:1], s)
    torch.testing.assert_close(s * one[f"{layer}.B"] @ one[f"{layer}.A"],
                               s * states[0][f"{layer}.B"] @ states[0][f"{layer}.A"], atol=1e-4, rtol=1e-4)


def test_truncation_error_decreases_with_rank() -> None:
    delta = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    errors = [truncation_error(delta, r) for r in range(1, 17)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-6 and 0 < errors[0] < 1
    sigma = torch.linalg.svdvals(delta)
    assert errors[3] == pytest.approx((sigma[4:].square().sum() / sigma.square().sum()).sqrt().item(), rel=1e-5)
    with pytest.raises(ValueError, match="rank"):
        factorize(delta, 17, 1.0)


def test_merged_plugin_in_a_model_has_the_merged_delta() -> None:
    base = tiny_gpt(config=SQL_TINY)
    states = [random_state(new_plugin(base, SMALL_PLUGIN), k) for k in range(2)]
    model = new_plugin(base, PluginConfig(r=8, alpha=16.0))  # rank 8, the same scale alpha / r = 2
    load_plugin(model, merge_m2(states, model.h[0].attn.c_attn.scale, r=8))
    expected = mean_deltas(states, model.h[0].attn.c_attn.scale)["h.0.attn.c_attn"]
    torch.testing.assert_close(model.h[0].attn.c_attn.delta_weight(), expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ decoding


def test_generate_likelihood_and_determinism(stock) -> None:
    task, linker = stock
    model = tiny_gpt(config=SQL_TINY)
    prompts = [build_prompt(e.question, task, linker, PromptConfig()) for e in task.test[:3]]
    greedy = generate(model, prompts)
    assert [len(c) for c in greedy] == [1, 1, 1]
    for prompt, (cand,) in zip(prompts, greedy):
        ids = encode_prompt(prompt)
        idx = torch.tensor([ids + cand.tokens])
        labels = torch.tensor([[-100] * len(ids) + cand.tokens])
        loss = model(idx, labels=labels).loss  # mean negative log-likelihood of the generated tokens
        assert cand.logprob == pytest.approx(-loss.item() * len(cand.tokens), rel=1e-4)
        assert len(ids) + len(cand.tokens) <= 128
    short = generate(model, prompts, max_new_tokens=5)
    assert all(len(c[0].tokens) <= 5 and c[0].text == enc_text(c[0].tokens) for c in short)
    unscored = generate(model, prompts, scores=False)
    assert [c[0].text for c in unscored] == [c[0].text for c in greedy]
    assert all(c[0].logprob != c[0].logprob for c in unscored)  # nan: not computed
    sampled = generate(model, prompts, n=3, temperature=1.0, seed=7)
    assert [len(c) for c in sampled] == [3, 3, 3]
    again = generate(model, prompts, n=3, temperature=1.0, seed=7)
    assert [[c.text for c in row] for row in sampled] == [[c.text for c in row] for row in again]
    with pytest.raises(ValueError, match="greedy"):
        generate(model, prompts, n=2)


def test_heldout_loss_is_token_weighted_mean(stock) -> None:
    task, linker = stock
    model = tiny_gpt(config=SQL_TINY)
    pairs = training_examples(task, task.test[:3], linker, PromptConfig())
    total = count = 0.0
    for pair in pairs:  # one example at a time, by hand: -log p(target token | everything before it)
        p_ids = encode_prompt(pair.prompt)
        a_ids = get_tokenizer().encode(pair.answer) + [special_id(get_tokenizer(), "<|endoftext|>")]
        ids = torch.tensor([p_ids + a_ids])
        logp = model(ids).logits[0].log_softmax(-1)  # [T, V]
        for t, tok in enumerate(a_ids):
            total -= logp[len(p_ids) - 1 + t, tok].item()
            count += 1
    assert heldout_loss(model, pairs, batch_size=2) == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError):
        heldout_loss(model, [])


def enc_text(tokens: list[int]) -> str:
    eot = special_id(get_tokenizer(), "<|endoftext|>")
    return get_tokenizer().decode([t for t in tokens if t != eot])


def test_evaluate_survives_a_model_that_writes_garbage(stock) -> None:
    task, linker = stock
    model = tiny_gpt(config=SQL_TINY)  # random weights: nothing it writes is a valid query
    test = task.test[:4]
    prompts = [build_prompt(e.question, task, linker, PromptConfig()) for e in test]
    greedy = evaluate(model, task, prompts, test)
    assert greedy == {"EX": 0.0, "EM": 0.0, "errors": 4, "n": 4}
    voted = evaluate(model, task, prompts, test, n_samples=3, temperature=1.0)
    assert voted["EX"] == 0.0 and voted["n"] == 4
    with pytest.raises(ValueError, match="prompts"):
        evaluate(model, task, prompts[:2], test)


def test_recipe_runs_end_to_end() -> None:
    cfg = RecipeConfig(max_test=3, batch_size=2, n_samples=2, transfer_to="bank", few_shot=4, transfer_steps=2)
    out = finsql_recipe(steps=2, seed=0, cfg=cfg)
    assert set(out) == {"EX", "EM", "errors", "n_test", "EX_sc", "EM_sc", "transfer_EX", "transfer_EM"}
    assert out["n_test"] == 3 and 0 <= out["errors"] <= 3
    assert all(0.0 <= out[k] <= 1.0 for k in ("EX", "EM", "EX_sc", "EM_sc", "transfer_EX", "transfer_EM"))
    with pytest.raises(ValueError, match="merge"):
        finsql_recipe(steps=1, cfg=RecipeConfig(merge="mean"))
