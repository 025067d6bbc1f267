"""Contrastive objectives over a batch of matched (image, text) embeddings."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (CLIP): cross-entropy over image→text and text→image similarities.

    The temperature is learnt as a log-scale, clamped so the logits cannot blow up.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * image @ text.t()
        targets = torch.arange(image.shape[0], device=image.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
