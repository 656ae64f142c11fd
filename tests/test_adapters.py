"""Adapter layers: gates, delta weights, merge/unmerge, zero slots (MoR) and dense LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mordasr.model.adapters import LoRALayer, MoRLayer, RoutingContext
from mordasr.model.adapters.mor import active_ranks

D = 7


def _mor(base, **kw):
    args = dict(r_shared=2, r_routed=6, top_k=3, n_zero=2, num_scores=D, alpha=None)
    args.update(kw)
    layer = MoRLayer(base, routing=RoutingContext(), **args)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layer.eval()


def _lora(base, rank=8):
    layer = LoRALayer(base, rank, 4.0, RoutingContext())
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layer.eval()


BASES = {
    "linear": (lambda: nn.Linear(12, 10), lambda: torch.randn(3, 5, 12)),
    "conv3x3": (lambda: nn.Conv2d(6, 5, 3, padding=1), lambda: torch.randn(3, 6, 9, 7)),
    "conv_strided": (lambda: nn.Conv2d(6, 5, 3, stride=2, padding=0), lambda: torch.randn(3, 6, 9, 8)),
    "conv1x1": (lambda: nn.Conv2d(6, 5, 1), lambda: torch.randn(3, 6, 4, 4)),
}


@pytest.mark.parametrize("kind", sorted(BASES))
@pytest.mark.parametrize("make", [_mor, _lora], ids=["mor", "lora"])
def test_merge_equals_gated_forward_and_unmerge_restores(kind, make):
    torch.manual_seed(0)
    base_fn, input_fn = BASES[kind]
    layer = make(base_fn())
    x = input_fn()
    scores = torch.rand(1, D)
    with torch.no_grad(), layer.routing.scores_for(scores):
        gated = layer(x)
        original = layer.base_layer.weight.clone()
        layer.merge(layer.gate(scores)[0])
        merged = layer(x)
        assert torch.allclose(merged, layer.base_layer(x))
        layer.unmerge()
    assert (merged - gated).abs().max() <= 1e-5
    assert torch.allclose(layer.base_layer.weight, original, atol=1e-6)
    assert layer.merged_gate is None


def test_delta_weight_is_sum_of_gated_rank_one_experts():
    torch.manual_seed(0)
    layer = _mor(nn.Linear(12, 10))
    gate = torch.rand(layer.rank)
    expected = sum(gate[i] * torch.outer(layer.lora_B.weight[:, i], layer.lora_A.weight[i])
                   for i in range(layer.rank)) * layer.scaling
    assert torch.allclose(layer.delta_weight(gate), expected, atol=1e-6)


def test_mor_gate_keeps_shared_ranks_and_top_k_slots():
    torch.manual_seed(0)
    layer = _mor(nn.Linear(12, 10))
    scores = torch.rand(16, D)
    gate = layer.gate(scores)
    assert gate.shape == (16, layer.rank)
    assert torch.all(gate[:, : layer.r_shared] == 1)
    probs, kept = layer.slot_probabilities(scores)
    assert torch.all(kept.sum(-1) == layer.top_k)
    routed = gate[:, layer.r_shared:]
    # Real experts kept get their renormalised probability, the rest exactly 0.
    expected = (probs * kept / (probs * kept).sum(-1, keepdim=True))[:, : layer.r_routed]
    assert torch.allclose(routed, expected)
    assert torch.all(active_ranks(gate) == layer.r_shared + kept[:, : layer.r_routed].sum(-1))


def test_zero_slot_choice_adds_no_rank():
    torch.manual_seed(0)
    layer = _mor(nn.Linear(12, 10), top_k=2, n_zero=2)
    with torch.no_grad():  # route every image to the two zero slots
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([0.0] * layer.r_routed + [10.0, 10.0]))
    scores = torch.rand(4, D)
    gate = layer.gate(scores)
    assert torch.all(active_ranks(gate) == layer.r_shared)
    assert torch.all(gate[:, layer.r_shared:] == 0)
    shared_only = torch.zeros(layer.rank)
    shared_only[: layer.r_shared] = 1
    assert torch.equal(layer.delta_weight(gate[0]), layer.delta_weight(shared_only))
    # The forward pass matches base + shared ranks only.
    x = torch.randn(4, 12)
    a = layer.lora_A.weight[: layer.r_shared]
    b = layer.lora_B.weight[:, : layer.r_shared]
    expected = layer.base_layer(x) + (x @ a.T @ b.T) * layer.scaling
    with layer.routing.scores_for(scores):
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_per_image_gates_in_one_batch():
    torch.manual_seed(0)
    layer = _mor(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 4, 6, 6)
    scores = torch.rand(2, D)
    with layer.routing.scores_for(scores):
        together = layer(x)
    for i in range(2):
        with layer.routing.scores_for(scores[i:i + 1]):
            assert torch.allclose(layer(x[i:i + 1]), together[i:i + 1], atol=1e-6)


def test_scores_belong_to_their_call_and_are_never_stale():
    """Two threads route the same layer at once, each with its own scores; outside a call the
    layer refuses to run rather than reuse the last call's scores."""
    import threading

    layer = _mor(nn.Linear(12, 12))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(1, 12)
    scores = [torch.zeros(1, D), torch.ones(1, D)]
    with torch.no_grad():
        expected = []
        for s in scores:
            with layer.routing.scores_for(s):
                expected.append(layer(x))
    assert not torch.allclose(expected[0], expected[1])
    barrier, found = threading.Barrier(2), {}

    def call(i: int) -> None:
        with torch.no_grad(), layer.routing.scores_for(scores[i]):
            barrier.wait()  # both calls have set their scores before either runs
            found[i] = layer(x)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.allclose(found[i], expected[i]) for i in range(2))
    with pytest.raises(RuntimeError, match="no degradation scores for this call"):
        layer(x)


def test_lora_gate_is_all_ones_and_ignores_scores():
    layer = _lora(nn.Linear(4, 4), rank=3)
    assert torch.equal(layer.gate(torch.rand(5, D)), torch.ones(5, 3))


def test_lora_scaling_is_alpha_over_rank():
    layer = _lora(nn.Linear(4, 4), rank=8)
    assert layer.scaling == pytest.approx(0.5)


def test_merge_refuses_non_finite_and_double_merge():
    layer = _mor(nn.Linear(4, 4))
    original = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(torch.ones(layer.rank))
    assert torch.equal(layer.base_layer.weight, original)
    with torch.no_grad():
        layer.lora_B.weight.fill_(0.1)
    layer.merge(torch.ones(layer.rank))
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge(torch.ones(layer.rank))


def test_base_layer_is_frozen_and_grouped_conv_rejected():
    layer = _mor(nn.Linear(4, 4))
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    with pytest.raises(ValueError, match="grouped"):
        _mor(nn.Conv2d(4, 4, 3, groups=2))


def test_forward_without_scores_fails_clearly():
    layer = _mor(nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="no degradation scores"):
        layer(torch.randn(1, 4))
