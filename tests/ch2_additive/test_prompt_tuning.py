import pytest
import torch
import torch.nn.functional as F

from chapters.ch2_additive.prompt_tuning import (
    SHIPPED_N_SPECIAL,
    SHIPPED_VOCAB_SIZE,
    apply_prompt_tuning,
    count_prompt_tuning,
    nearest_tokens,
    remove_prompt_tuning,
)
from minimal.data import get_task
from minimal.evaluate import evaluate_task
from minimal.gpt import GPT, GPTConfig
from minimal.hooks import Hooks
from minimal.peft import count_trainable, trainable_names
from minimal.tokenizer import get_tokenizer

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=64)
P = 5


def tiny(seed: int = 0, config: GPTConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def ids(B: int = 2, T: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_trainable_set_is_the_prompt_only():
    model = tiny()
    hooks = apply_prompt_tuning(model, n_tokens=P)
    assert isinstance(hooks, Hooks)
    assert trainable_names(model) == ["soft_prompt.weight"]
    assert count_trainable(model).trainable == P * CFG.n_embd == count_prompt_tuning(CFG, P)
    assert count_trainable(model).total == CFG.n_params() + P * CFG.n_embd


def test_forward_equals_base_on_concatenated_embeddings():
    base, model = tiny(), tiny()
    apply_prompt_tuning(model, n_tokens=P, init="random")
    x = ids()
    S = model.soft_prompt.weight.detach()
    embeds = torch.cat([S.expand(2, -1, -1), base.wte(x)], dim=1)  # [B, P+T, d]
    want = base(inputs_embeds=embeds).logits[:, P:]
    got = model(x).logits
    assert got.shape == (2, 8, CFG.vocab_size)  # real positions only, aligned with idx
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # inputs_embeds are accepted too
    torch.testing.assert_close(model(inputs_embeds=base.wte(x)).logits, want, rtol=0, atol=1e-6)


def test_loss_is_peft_loss_with_prompt_labels_ignored():
    base, model = tiny(), tiny()
    apply_prompt_tuning(model, n_tokens=P, init="random")
    x = ids()
    labels = x.clone()  # labels[:, 0] is a target: predicted by the last prompt position
    labels[0, 3] = -100
    S = model.soft_prompt.weight.detach()
    full = base(inputs_embeds=torch.cat([S.expand(2, -1, -1), base.wte(x)], dim=1)).logits  # [B, P+T, V]
    padded = torch.cat([torch.full((2, P), -100), labels], dim=1)
    want = F.cross_entropy(full[:, :-1].reshape(-1, CFG.vocab_size), padded[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(x, labels=labels).loss, want, rtol=0, atol=1e-6)


def test_prompt_is_used_and_removal_restores_base():
    base, model = tiny(), tiny()
    x = ids()
    apply_prompt_tuning(model, n_tokens=P)
    before = model(x).logits
    with torch.no_grad():
        model.soft_prompt.weight.add_(0.1 * torch.randn(P, CFG.n_embd))
    assert (model(x).logits - before).abs().max() > 1e-4
    remove_prompt_tuning(model)
    assert torch.equal(model(x).logits, base(x).logits)
    assert count_trainable(model).trainable == 0  # the base stays frozen
    apply_prompt_tuning(model, n_tokens=P)  # can be applied again after removal


def test_generate_with_and_without_cache_and_by_hand():
    model = tiny()
    apply_prompt_tuning(model, n_tokens=P, init="random")
    x = ids(B=2, T=6)
    a = model.generate(x, 5, temperature=0.0, use_cache=True)
    b = model.generate(x, 5, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)
    seq = x
    for _ in range(5):  # greedy by hand with the hooks bypassed
        e = torch.cat([model.soft_prompt.weight.expand(2, -1, -1), model.wte(seq)], dim=1)
        nxt = GPT.forward(model, inputs_embeds=e).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(a, seq)


def test_inits():
    model = tiny()
    apply_prompt_tuning(model, n_tokens=P, init="random", seed=0)
    w = model.soft_prompt.weight
    assert w.min() >= -0.5 and w.max() <= 0.5 and w.std() > 0.2

    model = tiny()
    apply_prompt_tuning(model, n_tokens=P, init="vocab", population=7)
    rows = model.soft_prompt.weight
    match = (rows[:, None, :] == model.wte.weight[None, :7, :]).all(-1)  # [P, 7]
    assert match.any(-1).all()  # every row is one of the 7 most frequent token embeddings
    assert torch.equal(nearest_tokens(model)[:, 0], match.float().argmax(-1))

    enc = get_tokenizer()
    cfg = GPTConfig(vocab_size=enc.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)
    model = tiny(config=cfg)
    text = "the movie was"
    tok = enc.encode(text)
    n = len(tok) + 2
    apply_prompt_tuning(model, n_tokens=n, init="text", init_text=text)
    want = model.wte.weight[torch.tensor((tok * 2)[:n])]
    assert torch.equal(model.soft_prompt.weight, want)  # repeated, then cut to P


def test_works_with_the_shared_evaluation():
    enc = get_tokenizer()
    cfg = GPTConfig(vocab_size=enc.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16)
    model = tiny(config=cfg)
    apply_prompt_tuning(model, n_tokens=4)
    out = evaluate_task(model, get_task("kv_recall"), max_examples=4, block_size=cfg.block_size - 4)
    assert 0.0 <= out["accuracy"] <= 1.0


def test_dtype_follows_the_model():
    for dtype in (torch.bfloat16, torch.float64):
        model = tiny().to(dtype)
        apply_prompt_tuning(model, n_tokens=P, init="random", seed=0)
        reference = tiny()
        apply_prompt_tuning(reference, n_tokens=P, init="random", seed=0)
        assert model.soft_prompt.weight.dtype == dtype
        assert torch.equal(model.soft_prompt.weight, reference.soft_prompt.weight.to(dtype))  # the same draw
        model(ids(), labels=ids()).loss.backward()
        assert model.soft_prompt.weight.grad.dtype == dtype


def test_errors(refuses):
    refuses(tiny(), lambda m: apply_prompt_tuning(m, n_tokens=0), "n_tokens")
    refuses(tiny(), lambda m: apply_prompt_tuning(m, n_tokens=CFG.block_size), "n_tokens")
    refuses(tiny(), lambda m: apply_prompt_tuning(m, n_tokens=P, init="zeros"), "unknown prompt init")
    refuses(tiny(), lambda m: apply_prompt_tuning(m, n_tokens=P, init="text"), "init_text")
    refuses(tiny(), lambda m: apply_prompt_tuning(m, n_tokens=P, init="text", init_text="zzzz qqqq"),
            "outside the model's vocabulary")
    refuses(torch.nn.Linear(2, 2), lambda m: apply_prompt_tuning(m, n_tokens=P), "GPT", TypeError)
    model = tiny()
    apply_prompt_tuning(model, n_tokens=P)
    refuses(model, lambda m: apply_prompt_tuning(m, n_tokens=P), "already has a soft prompt")
    with pytest.raises(ValueError, match="exceed block_size"):
        model(ids(T=CFG.block_size - P + 1))
    model(ids(T=CFG.block_size - P))  # exactly full is fine
    with pytest.raises(ValueError, match="no soft prompt"):
        remove_prompt_tuning(tiny())


def test_vocab_init_never_draws_a_special_token() -> None:
    from minimal.tokenizer import N_SPECIAL, VOCAB_SIZE

    assert (SHIPPED_VOCAB_SIZE, SHIPPED_N_SPECIAL) == (VOCAB_SIZE, N_SPECIAL)  # prompt_tuning.py's copy agrees

    # seed 0 draws a special id among 100 ids from the whole vocabulary: it must be drawn again
    first_draw = torch.randint(0, VOCAB_SIZE, (100,), generator=torch.Generator().manual_seed(0))
    assert (first_draw >= VOCAB_SIZE - N_SPECIAL).any()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB_SIZE, block_size=128, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.wte.weight.copy_(torch.arange(VOCAB_SIZE, dtype=torch.float)[:, None].expand(-1, 16))  # row i = i
    apply_prompt_tuning(model, n_tokens=100, init="vocab", seed=0)
    ids = model.soft_prompt.weight[:, 0].long()
    assert ids.max() < VOCAB_SIZE - N_SPECIAL and len(set(ids.tolist())) > 50
