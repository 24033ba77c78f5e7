import pytest
import torch

from chapters.ch2_additive.adapter_fusion import (
    FusionLayer,
    apply_adapter_fusion,
    count_adapter_fusion,
    fusion_layers,
    fusion_weights,
    train_source_adapter,
)
from chapters.ch2_additive.adapters import Adapter, apply_pfeiffer
from minimal.peft import count_trainable, trainable_names
from minimal.train import TrainConfig, train
from tests.helpers import tiny_config, tiny_gpt, token_batch

CFG = tiny_config()
L, d, m = CFG.n_layer, CFG.n_embd, 8


def ids(B: int = 2, T: int = 8, seed: int = 1) -> torch.Tensor:
    return token_batch(seed, B, T)


def random_set(seed: int, scale: float = 0.3) -> list[Adapter]:
    """One Pfeiffer adapter per layer with visible random weights (a stand-in for a stage-1 result)."""
    torch.manual_seed(seed)
    out = []
    for _ in range(L):
        a = Adapter(d, m, "relu")
        with torch.no_grad():
            for p in a.parameters():
                p.normal_(0, scale)
        out.append(a.requires_grad_(False))
    return out


def quick(steps: int = 25, lr: float = 1e-2) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, lr=lr, warmup=0, progress=False, log_every=0)


def test_stage2_trainable_set_is_q_k_v_per_layer():
    model = tiny_gpt()
    apply_adapter_fusion(model, {"a": random_set(1), "b": random_set(2), "c": random_set(3)})
    assert count_trainable(model).trainable == L * (3 * d * d + 2 * d) == count_adapter_fusion(CFG)
    assert {n.split("mlp_out.")[1] for n in trainable_names(model)} == {
        "query.weight", "query.bias", "key.weight", "key.bias", "value.weight"}
    assert count_adapter_fusion(tiny_config(n_layer=4, n_embd=128)) == 197_632  # 4 (3 * 128^2 + 2 * 128)
    v = model.h[0].mlp_out.value.weight
    assert torch.equal(v.diagonal(), torch.ones(d)) and v[0, 1].item() == pytest.approx(1e-6)


def test_one_adapter_with_identity_value_is_the_single_adapter_model():
    x, adapters = ids(), random_set(1)
    single = tiny_gpt()
    apply_pfeiffer(single, bottleneck=m)
    with torch.no_grad():
        for block, a in zip(single.h, adapters):
            block.mlp_out.load_state_dict(a.state_dict())
    fused = tiny_gpt()
    apply_adapter_fusion(fused, {"only": adapters}, value_offdiag=0.0)
    assert (single(x).logits - tiny_gpt()(x).logits).abs().max() > 1e-2  # the adapters do change the output
    assert torch.equal(fused(x).logits, single(x).logits)


def test_zero_query_and_key_give_the_mean_of_the_adapter_deltas():
    model, sets = tiny_gpt(), {"a": random_set(1), "b": random_set(2)}
    apply_adapter_fusion(model, sets, value_offdiag=0.0)
    layer = model.h[0].mlp_out
    with torch.no_grad():
        for lin in (layer.query, layer.key):
            lin.weight.zero_()
            lin.bias.zero_()
    f = torch.randn(2, 5, d)
    mean = sum(a[0].up(a[0].act(a[0].down(f))) for a in sets.values()) / 2
    torch.testing.assert_close(layer(f), f + mean, rtol=0, atol=1e-6)
    assert torch.equal(layer.last_weights, torch.full((2, 5, 2), 0.5))


def test_fusion_weights_are_a_distribution_per_token_and_layer():
    model = tiny_gpt()
    apply_adapter_fusion(model, {"a": random_set(1), "b": random_set(2), "c": random_set(3)})
    with torch.no_grad():  # sharpen the attention so the weights are far from uniform
        for layer in fusion_layers(model):
            layer.query.weight.normal_(0, 0.5)
            layer.key.weight.normal_(0, 0.5)
    x = ids(B=3, T=7)
    model(x)
    s = model.h[1].mlp_out.last_weights
    assert s.shape == (3, 7, 3) and (s >= 0).all()
    torch.testing.assert_close(s.sum(-1), torch.ones(3, 7))
    assert (s - 1 / 3).abs().max() > 0.05
    names, w = fusion_weights(model, x)
    assert names == ["a", "b", "c"] and w.shape == (L, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(L))
    torch.testing.assert_close(w[1], s.mean(dim=(0, 1)))
    only_first = torch.zeros(3, 7, dtype=torch.bool)
    only_first[:, 0] = True
    torch.testing.assert_close(fusion_weights(model, x, only_first)[1][1], s[:, 0].mean(0))


def test_stage2_learns_and_leaves_backbone_and_adapters_bit_identical():
    model, sets = tiny_gpt(), {"a": random_set(1, 0.1), "b": random_set(2, 0.1)}
    originals = {n: [a.state_dict() for a in s] for n, s in sets.items()}
    originals = {n: [{k: v.clone() for k, v in sd.items()} for sd in s] for n, s in originals.items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = apply_adapter_fusion(model, sets)
    fused_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." in n}
    q0 = model.h[0].mlp_out.query.weight.detach().clone()
    x = ids(B=4, T=10, seed=3)
    res = train(model, lambda g: (x, x), quick(), hooks=hooks)
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.05
    params = dict(model.named_parameters())
    for n, p in frozen.items():
        assert torch.equal(params[n], p), n
    for n, p in fused_before.items():
        assert torch.equal(params[n], p) and params[n].grad is None, n
    for n, s in sets.items():  # the caller's adapters were copied, never touched
        for a, sd in zip(s, originals[n]):
            assert all(torch.equal(a.state_dict()[k], v) for k, v in sd.items())
    assert not torch.equal(model.h[0].mlp_out.query.weight, q0)  # the fusion attention trained
    assert hooks.extra_loss(model).item() > 0  # V moved away from I: the regulariser is active


def test_stage1_trains_one_adapter_set_and_leaves_the_model_plain():
    model, x = tiny_gpt(), ids(B=4, T=10, seed=3)
    base_logits = model(x).logits
    adapters, res = train_source_adapter(model, lambda g: (x, x), quick(10), bottleneck=m)
    assert len(adapters) == L and all(isinstance(a, Adapter) and not a.up.weight.requires_grad for a in adapters)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert all(isinstance(b.mlp_out, torch.nn.Identity) for b in model.h)
    assert torch.equal(model(x).logits, base_logits)
    apply_adapter_fusion(model, {"src": adapters})
    assert isinstance(model.h[0].mlp_out, FusionLayer)


def test_errors(refuses):
    refuses(tiny_gpt(), lambda model: apply_adapter_fusion(model, {}), "at least one")
    refuses(tiny_gpt(), lambda model: apply_adapter_fusion(model, {"a": random_set(1)[:1]}),
            "has 1 adapters, the model has 2 layers")
    refuses(tiny_gpt(), lambda model: apply_adapter_fusion(model, {"a": [Adapter(32, 4), Adapter(32, 4)]}),
            "adapter width 32, model 64")
    refuses(tiny_gpt(), lambda model: apply_adapter_fusion(model, {"a": [torch.nn.Linear(d, d)] * L}),
            "expected an Adapter", TypeError)
    refuses(tiny_gpt(), lambda model: apply_adapter_fusion(model, {"a": random_set(1)}, temperature=0), "temperature")
    refuses(torch.nn.Linear(2, 2), lambda model: apply_adapter_fusion(model, {"a": random_set(1)}), "GPT", TypeError)
    model = tiny_gpt()
    apply_pfeiffer(model, m)
    refuses(model, lambda model: apply_adapter_fusion(model, {"a": random_set(1)}), "already holds Adapter")
    with pytest.raises(ValueError, match="no AdapterFusion layers"):
        fusion_weights(tiny_gpt(), ids())


def test_temperature_divides_the_scores_and_the_regulariser_is_the_frobenius_norm():
    torch.manual_seed(0)
    layer = FusionLayer(d, {"a": random_set(1)[0], "b": random_set(2)[0]}, temperature=4.0)
    with torch.no_grad():
        layer.query.weight.normal_(0, 0.5)
        layer.key.weight.normal_(0, 0.5)
    f = torch.randn(2, 5, d)
    layer(f)
    u = torch.stack([a.up(a.act(a.down(f))) for a in layer.adapters.values()], dim=-2)  # [B, T, N, d]
    scores = (layer.key(u) * layer.query(f).unsqueeze(-2)).sum(-1)  # [B, T, N]
    torch.testing.assert_close(layer.last_weights, (scores / 4.0).softmax(-1))
    assert (layer.last_weights - (scores * 4.0).softmax(-1)).abs().max() > 1e-3  # the inverse is visibly different
    model = tiny_gpt()
    hooks = apply_adapter_fusion(model, {"a": random_set(1)}, value_reg=0.5)
    with torch.no_grad():
        for layer in fusion_layers(model):
            layer.value.weight.copy_(torch.eye(d) + 0.1)  # ||I - V||_F^2 = d^2 * 0.01 per layer
    torch.testing.assert_close(hooks.extra_loss(model), torch.tensor(0.5 * L * d * d * 0.01))


def test_dtype_follows_the_model():
    model = tiny_gpt().to(torch.float64)
    hooks = apply_adapter_fusion(model, {"a": random_set(1), "b": random_set(2)})
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    loss = model(ids(), labels=ids()).loss + hooks.extra_loss(model)
    assert loss.dtype == torch.float64
    loss.backward()
