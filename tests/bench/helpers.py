"""What the bench tests share besides the conftest's one-thread fixture."""

from __future__ import annotations

import torch

CPU = torch.device("cpu")
