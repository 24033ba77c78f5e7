import pytest
import torch
import torch.nn as nn

from chapters.ch3_selective.lottery_ticket import (
    apply_lottery_ticket,
    count_lottery_ticket,
    find_ticket,
    full_masks,
    prunable_names,
    prune_step,
    random_reinit,
    remaining_fraction,
    snapshot,
    ticket_vs_random,
)
from minimal.gpt import GPT, GPTConfig
from minimal.train import TrainConfig, train

CFG = GPTConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=32)
CONSTANT = TrainConfig(steps=4, lr=1e-2, warmup=0, min_lr_ratio=1.0, log_every=0)  # constant lr


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def source(seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, CFG.vocab_size, (8, 12), generator=g)
    return lambda gen: (idx, idx)


def test_prunable_weights_are_the_linear_weights():
    assert prunable_names(tiny()) == [f"h.{i}.{s}.weight" for i in range(2)
                                      for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    with pytest.raises(ValueError, match="no nn.Linear"):
        prunable_names(nn.LayerNorm(4))


def test_prune_step_removes_the_smallest_surviving_weights():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -5, 3, 0.2], [4, -0.05, 6, 7], [0.3, 8, -9, 1]]))
    masks = full_masks(lin)
    masks["weight"][1, 1] = False  # already pruned; its tiny value must not count again
    new = prune_step(lin, masks, p=3 / 11)  # round(3/11 * 11 survivors) = 3
    removed = masks["weight"] & ~new["weight"]
    assert removed.nonzero().tolist() == [[0, 0], [0, 3], [2, 0]]  # |0.1|, |0.2|, |0.3|
    assert not new["weight"][1, 1]


@pytest.mark.parametrize("per_layer", [True, False])
def test_sparsity_after_n_rounds_and_pruned_weights_stay_zero(per_layer):
    model = tiny()
    p, rounds = 0.2, 3
    cfg = TrainConfig(steps=3, lr=1e-2, warmup=0, weight_decay=0.1, log_every=0)  # decay would move zeros
    ticket = find_ticket(model, source(), cfg, rounds=rounds, p=p, per_layer=per_layer)
    assert remaining_fraction(ticket.masks) == pytest.approx((1 - p) ** rounds, abs=1e-3)
    if per_layer:
        for n, m in ticket.masks.items():
            alive = m.numel()
            for _ in range(rounds):
                alive -= round(p * alive)
            assert int(m.sum()) == alive, n  # exactly (1 - p)^n up to per-round rounding
    assert [h["remaining"] for h in ticket.history] == pytest.approx([(1 - p) ** r for r in range(rounds)], abs=1e-3)
    hooks = apply_lottery_ticket(model, ticket.masks)
    assert hooks.n_trainable == count_lottery_ticket(CFG, ticket.masks)  # survivors + everything unpruned
    assert hooks.n_trainable == CFG.n_params() - sum(int((~m).sum()) for m in ticket.masks.values())
    train(model, source(), cfg, hooks)
    params = dict(model.named_parameters())
    for n, m in ticket.masks.items():
        assert (params[n][~m] == 0).all(), n  # pruned weights are exactly zero after training
        assert (params[n][m] != 0).any()


def test_rewinding_to_init_restores_the_survivors_bitwise():
    model = tiny()
    init = snapshot(model)
    ticket = find_ticket(model, source(), CONSTANT, rounds=2, p=0.5)
    for n, p in model.named_parameters():
        m = ticket.masks.get(n)
        expected = init[n] * m if m is not None else init[n]
        assert torch.equal(p.detach(), expected), n  # survivors = theta_init, pruned = 0, the rest = init
    assert all(torch.equal(ticket.rewind_state[n], init[n]) for n in init)


def test_rewinding_to_an_early_iterate_uses_the_weights_after_k_steps():
    k = 2
    reference = tiny()  # the first k steps of round 1, run on their own (constant lr: same updates)
    train(reference, source(), TrainConfig(steps=k, lr=1e-2, warmup=0, min_lr_ratio=1.0, log_every=0),
          apply_lottery_ticket(reference, full_masks(reference)))
    theta_k = snapshot(reference)
    model = tiny()
    ticket = find_ticket(model, source(), CONSTANT, rounds=2, p=0.3, rewind_step=k)
    assert all(torch.equal(ticket.rewind_state[n], theta_k[n]) for n in theta_k)
    for n, p in model.named_parameters():
        m = ticket.masks.get(n)
        assert torch.equal(p.detach(), theta_k[n] * m if m is not None else theta_k[n]), n
    assert not torch.equal(theta_k["h.0.mlp.c_fc.weight"], snapshot(tiny())["h.0.mlp.c_fc.weight"])


def test_random_reinit_keeps_the_mask_and_changes_the_values():
    model = tiny()
    masks = prune_step(model, full_masks(model), 0.5)
    control = random_reinit(model, masks, seed=5)
    params, theirs = dict(model.named_parameters()), dict(control.named_parameters())
    for n, m in masks.items():
        assert (theirs[n][~m] == 0).all() and (theirs[n][m] != 0).all()
        assert not torch.equal(theirs[n][m], params[n][m])
    mlp = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    mlp_masks = prune_step(mlp, full_masks(mlp), 0.4)
    other = random_reinit(mlp, mlp_masks, seed=3)
    assert (other[0].weight[~mlp_masks["0.weight"]] == 0).all() and not torch.equal(other[2].bias, mlp[2].bias)


def test_ticket_vs_random_trains_both_and_reports():
    model = tiny()
    ticket = find_ticket(model, source(), CONSTANT, rounds=1, p=0.2)
    idx, labels = source()(None)
    out = ticket_vs_random(model, ticket, source(), TrainConfig(steps=8, lr=1e-2, warmup=0, log_every=0),
                           lambda m: m(idx, labels=labels).loss.item())
    assert set(out) == {"remaining", "ticket", "random"} and out["remaining"] == pytest.approx(0.8, abs=1e-3)
    start = tiny()(idx, labels=labels).loss.item()
    assert out["ticket"] < start - 0.1  # the ticket learns


def test_errors(refuses):
    model = tiny()
    refuses(model, lambda m: apply_lottery_ticket(m, {"h.0.nope": torch.ones(2, dtype=torch.bool)}),
            "unknown parameters")
    with pytest.raises(ValueError, match="p \\(the fraction"):
        prune_step(model, full_masks(model), 1.0)
    with pytest.raises(ValueError, match="rounds"):
        find_ticket(model, source(), CONSTANT, rounds=0)
    with pytest.raises(ValueError, match="rewind_step"):
        find_ticket(model, source(), CONSTANT, rounds=1, rewind_step=99)
