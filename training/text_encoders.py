"""Project-defined text backbones: ``input_ids [B, L]`` (int64, pad id 0, right-padded) →
``{"pooled", "mid", "fragments", "fragment_mask"}``: two pooled features, and every token's
last state (``[B, L, C]``, zero at padding) with the mask of real tokens (``[B, L, 1]``), the
text's fragments for the fine-grained recipes.

Both ignore padding exactly: a row gives the same features alone as inside a batch padded
to a longer length (pad positions are zeroed before every convolution, masked out of
attention, and left out of the pooling). An all-padding row (an empty caption) gives zeros.

- :class:`DualPathTextCNN` — the deep text CNN of "Dual-path Convolutional Image-Text
  Embeddings with Instance Loss" (Zheng et al., TOMM 2020), scaled down for 2 CPU cores.
- :class:`SmallTransformerText` — a small pre-LayerNorm transformer encoder, written out by
  hand (no ``nn.TransformerEncoder``: its fused fast path and nested-tensor handling of the
  padding mask are what ONNX export trips over), with masked mean pooling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.training.tokenizer import PAD_ID

# Added to the attention logits of padding keys: exp() of it underflows to exactly 0 in
# float32, so real tokens attend as if the padding were not there, and, unlike -inf, an
# all-padding row stays finite.
MASK_LOGIT = -1e9


def token_mask(input_ids: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """[B, L, 1] float: 1 for real tokens, 0 for padding."""
    return (input_ids != pad_id).unsqueeze(-1).to(torch.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of [B, L, C]; zeros for a row without any."""
    return (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over real positions of [B, L, C]; zeros for a row without any."""
    pooled = x.masked_fill(mask == 0, float("-inf")).amax(dim=1)
    return torch.where(mask.sum(dim=1) > 0, pooled, torch.zeros_like(pooled))


# --- the dual-path text CNN ------------------------------------------------------------


class TextBottleneck(nn.Module):
    """A residual bottleneck over words: 1×1 reduce → 1×2 conv → 1×1 expand, + identity, ReLU.

    As in the paper's text branch (a ResNet-50 bottleneck with 1×2 kernels over the word
    axis, the 1×2 conv padded by one position on the left, so position t reads words t-1
    and t). LayerNorm over channels (per token) stands in for the paper's BatchNorm: it
    keeps every token independent of the batch and of padding, and behaves the same in
    training and inference.
    """

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.reduce = nn.Linear(width, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)
        # padding=1 pads both ends and gives L + 1 outputs; the first L are the left-padded conv
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=2, padding=1, bias=False)
        self.norm2 = nn.LayerNorm(hidden)
        self.expand = nn.Linear(hidden, width, bias=False)
        self.norm3 = nn.LayerNorm(width)
        nn.init.zeros_(self.norm3.weight)  # each block starts as the identity (zero-init residual)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.reduce(x))) * mask  # zero the pads before the conv reads them
        h = self.conv(h.transpose(1, 2))[:, :, :-1]
        h = F.relu(self.norm2(h.transpose(1, 2)))
        h = self.norm3(self.expand(h))
        return F.relu(x + h) * mask


class DualPathTextCNN(nn.Module):
    """Word embeddings (GloVe-initialised when ``embedding_init`` is given) → projection → residual 1×2 CNN → masked max pool.

    ``dims = {"pooled": width, "mid": width}``: "pooled" is the masked max over words after
    the last block, "mid" the same after the first block. Max pooling, as the paper's text
    CNN (its final pooling layer is a max pool over the word axis), picks each channel's
    strongest phrase detector wherever it fires in the caption. With the defaults
    (width 512, 4 blocks, bottleneck width/4) the network holds ≈0.7 M parameters plus
    ``vocab_size × 50`` for the embeddings.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_init: torch.Tensor | None = None,
        width: int = 512,
        blocks: int = 4,
        embed_dim: int = 50,
        pad_id: int = PAD_ID,
    ):
        super().__init__()
        if blocks < 1:
            raise ValueError("DualPathTextCNN needs at least one block")
        if embedding_init is not None:
            if embedding_init.ndim != 2 or embedding_init.shape[0] != vocab_size:
                raise ValueError(
                    f"embedding_init must be [vocab_size={vocab_size}, D]; got {tuple(embedding_init.shape)}"
                )
            embed_dim = embedding_init.shape[1]
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        if embedding_init is not None:
            with torch.no_grad():
                self.embed.weight.copy_(embedding_init)
                self.embed.weight[pad_id].zero_()
        self.stem = nn.Linear(embed_dim, width)
        self.stem_norm = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(TextBottleneck(width, max(1, width // 4)) for _ in range(blocks))
        self.dims = {"pooled": width, "mid": width, "fragments": width}

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = token_mask(input_ids, self.pad_id)
        x = F.relu(self.stem_norm(self.stem(self.embed(input_ids)))) * mask
        mid = None
        for index, block in enumerate(self.blocks):
            x = block(x, mask)
            if index == 0:
                mid = masked_max(x, mask)
        return {"pooled": masked_max(x, mask), "mid": mid, "fragments": x, "fragment_mask": mask}


# --- a small transformer -----------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, C]; key_bias [B, 1, 1, L]: 0 for real keys, MASK_LOGIT for padding."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        logits = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)) + key_bias
        attended = logits.softmax(dim=-1) @ v  # [B, H, L, head_dim]
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + attn(LN(x)), then x + MLP(LN(x)) (GELU, 4× width)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), key_bias))
        return x + self.dropout(self.mlp(self.norm2(x)))


class SmallTransformerText(nn.Module):
    """Token + learned position embeddings → ``layers`` pre-LN encoder layers → final LN → masked mean.

    ``dims = {"pooled": width, "mid": width}``: "pooled" is the masked mean of the final
    (LayerNorm-ed) output, "mid" the masked mean after the first layer. Sequences longer
    than ``max_length`` are an error (the tokenizer truncates to its own max length).
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        max_length: int = 64,
        dropout: float = 0.0,
        pad_id: int = PAD_ID,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError("SmallTransformerText needs at least one layer")
        self.pad_id = pad_id
        self.max_length = max_length
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.position = nn.Embedding(max_length, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.layers = nn.ModuleList(EncoderLayer(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.dims = {"pooled": width, "mid": width, "fragments": width}

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = token_mask(input_ids, self.pad_id)
        # Positions 0..L-1 as a cumulative sum keeps L dynamic in the exported graph.
        positions = torch.cumsum(torch.ones_like(input_ids), dim=1) - 1
        x = self.embed(input_ids) + self.position(positions)
        key_bias = ((1.0 - mask.squeeze(-1)) * MASK_LOGIT)[:, None, None, :]
        mid = None
        for index, layer in enumerate(self.layers):
            x = layer(x, key_bias)
            if index == 0:
                mid = masked_mean(x, mask)
        x = self.norm(x)
        return {"pooled": masked_mean(x, mask), "mid": mid, "fragments": x * mask, "fragment_mask": mask}
