"""wav2vec 2.0's Gumbel product quantiser: G codebooks of V learned codes, one code picked per group.

For features x [..., C]::

    logits = weight_proj(x)                    [..., G, V]   Linear(C -> G * V)
    train:  k = argmax(logits + Gumbel noise)  the hard pick of a Gumbel-softmax at temperature tau
            one_hot(k) forward, the gradient of softmax((logits + noise) / tau) backward (straight through)
    eval:   k = argmax(logits)
    q      = concat_g codebook[g, k_g]         [..., G * d]

with tau = max(max_temp * temp_decay ** update, min_temp), updated after every optimizer step
(``set_num_updates``). The perplexities, over every row of a call::

    prob_perplexity = sum_g exp(H(mean_rows softmax(logits_g)))    (no Gumbel noise; differentiable)
    code_perplexity = sum_g exp(H(mean_rows one_hot(argmax logits_g)))     (logged only)

and the diversity loss of wav2vec 2.0 is (G * V - prob_perplexity) / (G * V) (``diversity_loss``).

The straight-through one-hot is built as ``one_hot + (soft - soft.detach())``, so its forward value is
exactly 0/1 and two rows that pick the same codes get bit-identical vectors (the contrastive loss
relies on it when it masks out distractors identical to the positive).

References: wav2vec 2.0 (Baevski et al., NeurIPS 2020), fairseq
``fairseq/modules/gumbel_vector_quantizer.py`` (``combine_groups=False``, one projection layer);
Gumbel-softmax (Jang et al., ICLR 2017). fairseq ``fairseq/modules/gumbel_vector_quantizer.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GumbelVectorQuantizer", "perplexity"]


def perplexity(probs: torch.Tensor) -> torch.Tensor:
    """sum over groups of exp(entropy) of the code distributions ``probs`` [G, V] (fp32), with the
    reference's 1e-7 inside the log."""
    return torch.exp(-(probs * torch.log(probs + 1e-7)).sum(dim=-1)).sum()


class GumbelVectorQuantizer(nn.Module):
    """Gumbel-softmax product quantiser (see the module docstring).

    Args:
        dim: input width C (the CNN's channels, 512).
        num_vars: codes per group V (320).
        groups: groups G (2).
        code_dim: width of the concatenated output G * d (256: d = 128 per group); divisible by G.
        max_temp, min_temp, temp_decay: the temperature anneal (2, 0.5, 0.999995).

    Init as the reference: ``weight_proj`` N(0, 1) with zero bias, the codebook U(0, 1).
    The temperature is a buffer, so a checkpoint resumes with the value it stopped at.
    """

    def __init__(
        self,
        dim: int,
        num_vars: int = 320,
        groups: int = 2,
        code_dim: int = 256,
        max_temp: float = 2.0,
        min_temp: float = 0.5,
        temp_decay: float = 0.999995,
    ):
        super().__init__()
        if code_dim % groups != 0:
            raise ValueError(f"code_dim ({code_dim}) must be divisible by groups ({groups})")
        self.num_vars, self.groups = num_vars, groups
        self.max_temp, self.min_temp, self.temp_decay = float(max_temp), float(min_temp), float(temp_decay)
        self.weight_proj = nn.Linear(dim, groups * num_vars)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.codebook = nn.Parameter(torch.rand(groups, num_vars, code_dim // groups))  # [G, V, d]
        self.register_buffer("temperature", torch.tensor(self.max_temp))

    @property
    def total_codes(self) -> int:
        """G * V, the most the perplexity can reach."""
        return self.groups * self.num_vars

    def temperature_at(self, num_updates: int) -> float:
        """max(max_temp * temp_decay ** num_updates, min_temp)."""
        return max(self.max_temp * self.temp_decay**num_updates, self.min_temp)

    @torch.no_grad()
    def set_num_updates(self, num_updates: int) -> None:
        """Set the temperature for the step after optimizer update ``num_updates`` (no host sync)."""
        self.temperature.fill_(self.temperature_at(num_updates))

    def forward(self, x: torch.Tensor) -> dict:
        """x [..., C] -> dict: ``x`` quantised [..., G * d], ``codes`` the picked codes [..., G] (int64),
        ``prob_perplexity`` (differentiable), ``code_perplexity`` (detached)."""
        lead = x.shape[:-1]
        logits = self.weight_proj(x).view(-1, self.groups, self.num_vars).float()  # [T, G, V]
        probs = logits.softmax(dim=-1)
        prob_perplexity = perplexity(probs.mean(dim=0))
        with torch.no_grad():
            best = F.one_hot(logits.argmax(dim=-1), self.num_vars).float()  # [T, G, V]
            code_perplexity = perplexity(best.mean(dim=0))
        if self.training:
            soft = F.gumbel_softmax(logits, tau=self.temperature, hard=False)  # [T, G, V]
            codes = soft.argmax(dim=-1)  # [T, G]
            one_hot = F.one_hot(codes, self.num_vars).float() + (soft - soft.detach())
        else:
            codes = logits.argmax(dim=-1)
            one_hot = best
        quantised = torch.einsum("tgv,gvd->tgd", one_hot.to(self.codebook.dtype), self.codebook)  # [T, G, d]
        return {
            "x": quantised.reshape(*lead, -1),
            "codes": codes.view(*lead, self.groups),
            "prob_perplexity": prob_perplexity,
            "code_perplexity": code_perplexity,
        }

    def diversity_loss(self, prob_perplexity: torch.Tensor) -> torch.Tensor:
        """(G * V - prob_perplexity) / (G * V): 0 when every code is used equally often."""
        return (self.total_codes - prob_perplexity) / self.total_codes

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, num_vars={self.num_vars}, temp=({self.max_temp}, {self.min_temp}, "
                f"{self.temp_decay})")  # fmt: skip
