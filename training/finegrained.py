"""Pair scorers over fragments (image patches, caption tokens): CRAN and MCSM, the second stage.

Both score an (image, text) *pair* from the two items' fragments, so neither reduces an item
to one vector that a vector index could search. They re-rank the first stage's candidates
(the dual encoder's `global` search). Each scorer splits into three parts, which is also how
it is served:

- ``image_side(features)`` — what an image contributes, computed once per image when it is
  indexed and kept in the side store (``[B, ...]`` tensors);
- ``text_side(features)`` — what a caption contributes, computed per query;
- ``score(image_side, text_side, first_stage)`` — ``[Bi, Bt]`` scores of every image against
  every text, or with ``pairwise=True`` ``[N]`` scores of N aligned pairs (re-ranking: one query
  repeated against its N candidates); ``first_stage`` holds the first stage's scores of the same
  pairs, which the search already has.

``features`` are a backbone's outputs: ``"fragments" [B, P, C]`` with ``"fragment_mask"
[B, P, 1]`` (tokens; image patches have no mask), and ``"pooled" [B, C]``.

- :class:`CRANScorer` — "Cross-media Relation Attention Network" (Qi, Peng, Yuan, arXiv
  1804.09539): global, local (each word attends over the image's patches) and relation
  (attention over pairs of fragments) alignment, fused into one score.
- :class:`MCSMScorer` — "Modality-specific Cross-modal Similarity Measurement" (Peng, Qi,
  Yuan, arXiv 1708.04776): a semantic space per modality built with recurrent attention over
  its own fragments, the other modality projected into it, the two similarities fused with a
  weight computed per pair.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.training.models import fragment_mask


def _mask2d(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, P]`` float mask of real fragments."""
    return fragment_mask(features)[..., 0]


class RelationAttention(nn.Module):
    """One vector for the relations among an item's fragments.

    Every ordered pair (i, j) of real fragments gets a relation feature
    ``g_ij = ReLU(U f_i + V f_j + b)``; an attention over the pairs, ``a_ij ∝ exp(w · g_ij)``
    (padding pairs masked out), pools them, and a linear map takes ``Σ a_ij g_ij`` into the
    shared space. ``U f_i + V f_j`` is the linear layer over ``[f_i; f_j]`` computed without
    building the ``P²`` concatenations.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.first = nn.Linear(dim, hidden)
        self.second = nn.Linear(dim, hidden, bias=False)
        self.attention = nn.Linear(hidden, 1, bias=False)
        self.out = nn.Linear(hidden, dim)

    def forward(self, fragments: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """fragments ``[B, P, D]``, mask ``[B, P]`` → ``[B, D]`` (L2-normalised)."""
        pairs = F.relu(self.first(fragments)[:, :, None, :] + self.second(fragments)[:, None, :, :])  # [B, P, P, H]
        pair_mask = mask[:, :, None] * mask[:, None, :]
        logits = self.attention(pairs)[..., 0].masked_fill(pair_mask == 0, -1e9).flatten(1)
        weights = logits.softmax(dim=-1).reshape(pair_mask.shape)
        pooled = (weights[..., None] * pairs).sum(dim=(1, 2))
        return F.normalize(self.out(pooled), dim=-1)


def local_alignment(words: torch.Tensor, word_mask: torch.Tensor, patches: torch.Tensor, smooth: float,
                    pairwise: bool = False) -> torch.Tensor:
    """Text-to-image attention alignment (as SCAN's t2i).

    ``words [Bt, L, D]`` (unit vectors, zero at padding), ``word_mask [Bt, L]``, ``patches [Bi, P, D]``
    (unit vectors) → ``[Bi, Bt]``, every image against every text; with ``pairwise`` (Bi = Bt = N)
    → ``[N]``, image n against text n. Each real word w attends over the patches with weights
    ``a = softmax(smooth · w·p)`` and is scored by ``cos(w, Σ a_p p)``; the pair's score is the
    mean over its real words. Since ``w · Σ a_p p = Σ a_p (w·p)`` and ``|Σ a_p p|² = aᵀ G a`` with
    G the patches' Gram matrix, the attended vectors (D floats per word and pair) are never built,
    and the word–patch similarities of a whole batch are one matrix product.
    """
    gram = patches @ patches.transpose(1, 2)  # [Bi, P, P]
    if pairwise:
        sims = torch.einsum("nld,npd->nlp", words, patches)
        attention = (smooth * sims).softmax(dim=-1)
        norm_squared = torch.einsum("nlp,npq,nlq->nl", attention, gram, attention)
        mask = word_mask
    else:
        sims = torch.einsum("tld,ipd->itlp", words, patches)  # [Bi, Bt, L, P]
        attention = (smooth * sims).softmax(dim=-1)
        norm_squared = ((attention @ gram[:, None]) * attention).sum(dim=-1)
        mask = word_mask[None]
    per_word = (attention * sims).sum(dim=-1) / norm_squared.clamp(min=1e-12).sqrt()
    return (per_word * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


def _pair_up(image: dict[str, torch.Tensor], text: dict[str, torch.Tensor], pairwise: bool):
    """Both sides with broadcastable leading dimensions: ``[Bi, 1, ...]`` × ``[1, Bt, ...]`` for every
    image against every text, or unchanged (``[N, ...]`` × ``[N, ...]``) for N aligned pairs."""
    if pairwise:
        return image, text
    return {k: v[:, None] for k, v in image.items()}, {k: v[None] for k, v in text.items()}


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1)


class CRANScorer(nn.Module):
    """CRAN's multi-level alignment: ``fused = Σ_level w_level · s_level`` over

    - ``global``: the first stage's score of the pair (the towers' `global` cosine, which the search
      already has): CRAN's global alignment, and what keeps the re-ranker from discarding it;
    - ``local``: :func:`local_alignment` of the projected tokens against the projected patches;
    - ``relation``: the cosine of the two items' :class:`RelationAttention` vectors;

    with ``w = softmax(level_logits)`` learnt (equal at the start).
    """

    levels = ("global", "local", "relation")

    def __init__(self, image_dim: int, text_dim: int, dim: int = 128, relation_hidden: int = 128, smooth: float = 9.0):
        super().__init__()
        self.smooth = smooth
        self.image_fragment = nn.Linear(image_dim, dim)
        self.text_fragment = nn.Linear(text_dim, dim)
        self.image_relation = RelationAttention(dim, relation_hidden)
        self.text_relation = RelationAttention(dim, relation_hidden)
        self.level_logits = nn.Parameter(torch.zeros(len(self.levels)))

    def _side(self, features: dict[str, torch.Tensor], fragment_map: nn.Linear, relation: RelationAttention
              ) -> dict[str, torch.Tensor]:
        mask = _mask2d(features)
        fragments = F.normalize(fragment_map(features["fragments"]), dim=-1) * mask[..., None]
        return {"fragments": fragments,
                "mask": mask, "relation": relation(fragments, mask)}

    def image_side(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._side(features, self.image_fragment, self.image_relation)

    def text_side(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._side(features, self.text_fragment, self.text_relation)

    def level_weights(self) -> torch.Tensor:
        return self.level_logits.softmax(dim=0)

    def score(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor], first_stage: torch.Tensor,
              pairwise: bool = False) -> dict[str, torch.Tensor]:
        """Every level's scores and ``fused``: ``[Bi, Bt]``, or ``[N]`` for N aligned pairs when
        ``pairwise``; ``first_stage`` holds the first stage's scores of the same pairs (same shape)."""
        local = local_alignment(text["fragments"], text["mask"], image["fragments"], self.smooth, pairwise)
        image, text = _pair_up(image, text, pairwise)
        scores = {
            "global": first_stage,
            "local": local,
            "relation": _dot(image["relation"], text["relation"]),
        }
        weights = self.level_weights()
        scores["fused"] = sum(weights[i] * scores[level] for i, level in enumerate(self.levels))
        return scores


class RecurrentAttention(nn.Module):
    """A modality's own semantic space: an LSTM over its (linearly projected) fragments in order (patches in raster
    order, tokens left to right), attention over the LSTM's states ``a_t ∝ exp(w · tanh(W h_t))``
    on real fragments only, ``v = normalise(Σ a_t h_t)``.

    The LSTM runs forwards only, so right-padding never reaches a real position's state.
    """

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        # Projecting first makes the LSTM's recurrence dim → dim, far cheaper than over 512-d tokens.
        self.project = nn.Linear(in_dim, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, 1, bias=False)

    def forward(self, fragments: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.project(fragments))
        logits = self.query(torch.tanh(self.key(states)))[..., 0].masked_fill(mask == 0, -1e9)
        weights = logits.softmax(dim=-1)
        return F.normalize((weights[..., None] * states).sum(dim=1), dim=-1)


class MCSMScorer(nn.Module):
    """MCSM: ``s_image`` in the image's own space (its recurrent-attention vector against the text
    projected into that space), ``s_text`` likewise in the text's space, and

        fused = α · s_image + (1 − α) · s_text,   α = sigmoid(a · s_image + b · s_text + c)

    a weight computed for each pair from how strongly each space matches it (``a = b = c = 0``
    at the start: the plain mean). The projections are 2-layer MLPs over the other modality's
    pooled feature.
    """

    levels = ("image_space", "text_space")

    def __init__(self, image_dim: int, text_dim: int, dim: int = 128, hidden: int = 256):
        super().__init__()
        self.image_space = RecurrentAttention(image_dim, dim)
        self.text_space = RecurrentAttention(text_dim, dim)
        self.text_into_image = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.image_into_text = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.gate = nn.Linear(2, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def image_side(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"own": self.image_space(features["fragments"], _mask2d(features)),
                "projected": F.normalize(self.image_into_text(features["pooled"]), dim=-1)}

    def text_side(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"own": self.text_space(features["fragments"], _mask2d(features)),
                "projected": F.normalize(self.text_into_image(features["pooled"]), dim=-1)}

    def score(self, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor], first_stage: torch.Tensor | None = None,
              pairwise: bool = False) -> dict[str, torch.Tensor]:
        """Both spaces' scores and ``fused``: ``[Bi, Bt]``, or ``[N]`` for N aligned pairs when
        ``pairwise``. MCSM measures the pair only in its own two spaces: ``first_stage`` is not read."""
        image, text = _pair_up(image, text, pairwise)
        s_image = _dot(image["own"], text["projected"])
        s_text = _dot(image["projected"], text["own"])
        alpha = torch.sigmoid(self.gate(torch.stack([s_image, s_text], dim=-1))[..., 0])
        return {"image_space": s_image, "text_space": s_text, "fused": alpha * s_image + (1 - alpha) * s_text}


SCORERS = {"cran": CRANScorer, "mcsm": MCSMScorer}


def build_scorer(kind: str, image_dim: int, text_dim: int, **options) -> nn.Module:
    if kind not in SCORERS:
        raise ValueError(f"unknown scorer {kind!r}; known: {sorted(SCORERS)}")
    return SCORERS[kind](image_dim, text_dim, **options)
