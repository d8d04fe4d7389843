"""The Gumbel product quantiser: perplexities and diversity loss by their formulas, exact straight-through
codes, gradients, and the temperature rule."""

from __future__ import annotations

import math

import torch

from d2v2.models.layers.quantizer import GumbelVectorQuantizer
from tests.helpers import assert_close


def entropy_perplexity(probs: torch.Tensor) -> torch.Tensor:
    """sum over groups of exp(-sum p log p), by hand (1e-7 in the log as the reference)."""
    return sum(math.exp(-sum(float(p) * math.log(float(p) + 1e-7) for p in row)) for row in probs)


def test_perplexities_and_diversity_loss_follow_their_formulas():
    quantizer = GumbelVectorQuantizer(dim=6, num_vars=5, groups=2, code_dim=8).eval()
    x = torch.randn(3, 4, 6)
    out = quantizer(x)
    logits = quantizer.weight_proj(x).view(12, 2, 5).detach()
    expected_prob = entropy_perplexity(logits.softmax(dim=-1).mean(dim=0))  # batch-averaged, no noise
    hard = torch.nn.functional.one_hot(logits.argmax(dim=-1), 5).float().mean(dim=0)
    assert_close(out["prob_perplexity"], torch.tensor(expected_prob), atol=1e-5, rtol=1e-5, name="prob_perplexity")
    assert_close(out["code_perplexity"], torch.tensor(entropy_perplexity(hard)), atol=1e-5, rtol=1e-5)
    assert_close(quantizer.diversity_loss(out["prob_perplexity"]), (10 - out["prob_perplexity"]) / 10, atol=0, rtol=0)
    assert out["x"].shape == (3, 4, 8) and out["codes"].shape == (3, 4, 2)


def test_uniform_code_use_reaches_the_full_perplexity_and_zero_diversity_loss():
    quantizer = GumbelVectorQuantizer(dim=5, num_vars=5, groups=2, code_dim=4).eval()
    with torch.no_grad():  # logits = 50 * one_hot(input): each row picks the code its input names
        quantizer.weight_proj.weight.copy_(50 * torch.cat([torch.eye(5), torch.eye(5)]))
        quantizer.weight_proj.bias.zero_()
    out = quantizer(torch.eye(5))  # every code of every group used once
    assert_close(out["code_perplexity"], torch.tensor(10.0), atol=1e-4, rtol=0)
    assert_close(out["prob_perplexity"], torch.tensor(10.0), atol=1e-3, rtol=0)
    assert float(quantizer.diversity_loss(out["prob_perplexity"]).detach()) < 1e-4
    collapsed = quantizer(torch.eye(5)[[0, 0, 0]])  # one code per group: perplexity 2, loss 0.8
    assert_close(collapsed["code_perplexity"], torch.tensor(2.0), atol=1e-4, rtol=0)
    assert_close(quantizer.diversity_loss(collapsed["prob_perplexity"]), torch.tensor(0.8), atol=1e-3, rtol=0)


def test_training_output_is_exactly_the_picked_codes_with_a_straight_through_gradient():
    quantizer = GumbelVectorQuantizer(dim=6, num_vars=7, groups=2, code_dim=6).train()
    x = torch.randn(50, 6)
    out = quantizer(x)
    codes = out["codes"]  # [50, 2], drawn with Gumbel noise
    expected = torch.cat([quantizer.codebook[0, codes[:, 0]], quantizer.codebook[1, codes[:, 1]]], dim=-1)
    assert torch.equal(out["x"], expected)  # bit-exact: rows with the same codes are identical
    out["x"].sum().backward()
    assert quantizer.weight_proj.weight.grad.abs().sum() > 0  # through the soft Gumbel-softmax
    torch.manual_seed(0)
    noisy = [quantizer(x)["codes"] for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])  # fresh Gumbel noise on every call
    assert torch.equal(quantizer.eval()(x)["codes"], quantizer.weight_proj(x).view(50, 2, 7).argmax(dim=-1))


def test_temperature_rule():
    quantizer = GumbelVectorQuantizer(dim=4, num_vars=3, groups=1, code_dim=2, max_temp=2, min_temp=0.5, temp_decay=0.9)
    assert float(quantizer.temperature) == 2.0
    quantizer.set_num_updates(3)
    assert math.isclose(float(quantizer.temperature), 2 * 0.9**3, rel_tol=1e-6)
    quantizer.set_num_updates(100)
    assert float(quantizer.temperature) == 0.5
    assert "temperature" in quantizer.state_dict()
