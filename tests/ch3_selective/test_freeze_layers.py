import torch

from chapters.ch3_selective.freeze_layers import apply_freeze_layers, count_freeze_layers, saved_activation_bytes
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable, trainable_names
from minimal.train import TrainConfig, train
from tests.helpers import masked_batch, tiny_config, tiny_gpt

CFG = tiny_config(n_layer=3, n_embd=32)
TINY_S = GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=128)


def tiny(cfg: GPTConfig = CFG) -> GPT:
    return tiny_gpt(0, cfg, eval_mode=False)


def test_count_matches_formula_and_a_hand_count():
    model = tiny(TINY_S)
    apply_freeze_layers(model, k=1)  # d = 128: 12 d^2 + 13 d + 2 d
    assert count_trainable(model).trainable == count_freeze_layers(TINY_S, 1) == 198_528
    for k in range(0, CFG.n_layer + 1):
        model = tiny()
        apply_freeze_layers(model, k=k)
        assert count_trainable(model).trainable == count_freeze_layers(CFG, k)
    model = tiny()
    apply_freeze_layers(model, k=2, train_ln_f=False)
    assert count_trainable(model).trainable == 2 * (12 * 32 * 32 + 13 * 32) == count_freeze_layers(CFG, 2, False)
    assert not any(n.startswith("ln_f") for n in trainable_names(model))


def test_lower_blocks_bit_identical_and_gradless_after_training():
    model = tiny()
    idx, labels = masked_batch()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    apply_freeze_layers(model, k=1)
    res = train(model, lambda gen: (idx, labels), TrainConfig(steps=8, lr=1e-2, warmup=0, log_every=0))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    for n, p in model.named_parameters():
        trained = n.startswith(("h.2.", "ln_f."))
        assert torch.equal(p, before[n]) != trained, n
        if not trained:
            assert p.grad is None, n


def test_backward_stops_at_the_lowest_trained_block():
    model = tiny()
    idx, labels = masked_batch()
    apply_freeze_layers(model, k=1)
    out = model(idx, labels=labels, output_hidden_states=True)
    hs = out.hidden_states  # embeddings, then after each block
    assert all(h.grad_fn is None for h in hs[: CFG.n_layer])  # no graph below block L-k
    assert hs[CFG.n_layer].grad_fn is not None
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():  # lower blocks run explicitly without autograd: same loss and gradients
        x = hs[CFG.n_layer - 1].clone()
    x = model.h[CFG.n_layer - 1](x)[0]
    logits = model.ln_f(x) @ model.wte.weight.T
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), labels[:, 1:].reshape(-1))
    assert torch.allclose(loss, out.loss)
    grads2 = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads, grads2, strict=True))


def test_activation_memory_grows_with_k():
    idx, labels = masked_batch()
    saved = []
    for k in range(CFG.n_layer + 1):
        model = tiny()
        apply_freeze_layers(model, k=k)
        saved.append(saved_activation_bytes(model, idx, labels))
    assert all(a < b for a, b in zip(saved[:-1], saved[1:], strict=True)), saved


def test_errors(refuses):
    refuses(tiny(), lambda m: apply_freeze_layers(m, k=4), r"\[0, 3\]")
    refuses(tiny(), lambda m: apply_freeze_layers(m, k=-1), r"\[0, 3\]")
    refuses(tiny(), lambda m: apply_freeze_layers(m, k=True), r"\[0, 3\]")
    refuses(tiny(), lambda m: apply_freeze_layers(m, k=0, train_ln_f=False), "nothing to train")


def test_stacked_on_another_method_keeps_its_trainables():
    model = tiny()
    apply_freeze_layers(model, k=1, train_ln_f=False)
    apply_freeze_layers(model, k=0)  # a second method adds ln_f, the first one's top block still trains
    assert set(trainable_names(model)) == {n for n, _ in model.named_parameters() if n.startswith(("h.2.", "ln_f."))}
