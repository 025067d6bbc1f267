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
        return self.matrix_loss(image @ text.t())

    def matrix_loss(self, scores: torch.Tensor) -> torch.Tensor:
        """The loss from a ``[B, B]`` score matrix whose diagonal holds the matched pairs."""
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * scores
        targets = torch.arange(scores.shape[0], device=scores.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


def _triplet_costs(scores: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge costs of every (anchor, negative) pair, positives' own entries zeroed.

    ``scores[i, j] = image_i · text_j``. Returns ``(image_anchor, text_anchor)``, both ``[B, B]``:
    ``image_anchor[i, j] = [m - s(i,i) + s(i,j)]_+`` (image i, negative text j) and
    ``text_anchor[i, j] = [m - s(j,j) + s(i,j)]_+`` (text j, negative image i), 0 on the diagonal.
    """
    positive = scores.diag()
    off_diagonal = ~torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    image_anchor = (margin - positive.unsqueeze(1) + scores).clamp(min=0) * off_diagonal
    text_anchor = (margin - positive.unsqueeze(0) + scores).clamp(min=0) * off_diagonal
    return image_anchor, text_anchor


def _reduce(per_anchor: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_anchor.mean()
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor


class VSEPPLoss(nn.Module):
    """VSE++ (Faghri et al., 2018): bidirectional triplet ranking loss with in-batch negatives.

    For each matched pair i, with ``s(i, j) = image_i · text_j``::

        [m - s(i,i) + max_{j≠i} s(i,j)]_+  +  [m - s(i,i) + max_{j≠i} s(j,i)]_+

    (image anchor against its hardest negative caption, caption anchor against its hardest negative
    image). ``hardest=False`` sums the hinge over every negative instead of taking the max (the
    paper's VSE0 baseline). Since the hinge is monotone, max-of-hinges equals hinge-of-max, so a
    batch of one (no negatives) gives 0.

    ``reduction``: ``"mean"`` (default) averages the per-pair cost over the batch; the paper *sums*
    it, but the mean keeps the effective learning rate independent of the batch size. ``"sum"``
    reproduces the paper; ``"none"`` returns the ``[B]`` per-pair costs (both directions added).
    """

    def __init__(self, margin: float = 0.2, hardest: bool = True, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
        self.margin = margin
        self.hardest = hardest
        self.reduction = reduction

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image_anchor, text_anchor = _triplet_costs(image @ text.t(), self.margin)
        if self.hardest:
            per_anchor = image_anchor.max(dim=1).values + text_anchor.max(dim=0).values
        else:
            per_anchor = image_anchor.sum(dim=1) + text_anchor.sum(dim=0)
        return _reduce(per_anchor, self.reduction)


class _SharedClassifierLoss(nn.Module):
    """CE(W image, y) + CE(W text, y) with one bias-free linear classifier W shared by both modalities.

    Each cross-entropy is a mean over the batch, so the total is the sum of the two modality means.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(dim, num_classes, bias=False)

    def forward(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(image), labels) + F.cross_entropy(self.classifier(text), labels)


class InstanceLoss(_SharedClassifierLoss):
    """Instance loss (Zheng et al., "Dual-path Convolutional Image-Text Embeddings with Instance Loss").

    Every training instance (an image together with its captions) is its own class. One linear
    classifier ``W_share`` (no bias, ``[num_classes, dim]``, ``self.classifier``) is shared by the
    image and text branches, which pushes both modalities of an instance towards the same class
    direction: ``loss = CE(W image, labels) + CE(W text, labels)``. ``labels`` are the instance ids
    (``LongTensor [B]``, values in ``[0, num_classes)``). The classifier is a parameter of this
    module: give ``loss.parameters()`` to the optimiser along with the encoders'.
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(image, text, labels)


class SSCLoss(_SharedClassifierLoss):
    """MT-HCN self-supervised clustering loss: classify each pair into its k-means cluster.

    ``image`` and ``text`` are the pairs' *exterior-level* embeddings; ``clusters`` (``LongTensor
    [B]``) are the pairs' cluster ids, computed outside this module (``training.clustering.kmeans``
    over the exterior-level features of all pairs, re-run every epoch). As in the instance loss, one
    bias-free classifier (``self.classifier``, ``[num_clusters, dim]``) is shared by both modalities:
    ``loss = CE(W image, clusters) + CE(W text, clusters)``.

    Cluster ids are arbitrary from one clustering to the next (cluster 3 this epoch has nothing to
    do with cluster 3 last epoch), so after each re-clustering call :meth:`reset_classifier`, which
    re-initialises the classifier rather than trying to align new clusters to old ones.
    """

    def __init__(self, dim: int, num_clusters: int):
        super().__init__(dim, num_clusters)

    @property
    def num_clusters(self) -> int:
        return self.classifier.out_features

    def forward(self, image: torch.Tensor, text: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        return super().forward(image, text, clusters)

    def reset_classifier(self, num_clusters: int | None = None) -> None:
        """Re-initialise the shared classifier for a new clustering (``nn.Linear``'s default init).

        With the same number of clusters (or ``None``) the weights are reset *in place*: the
        ``Parameter`` object is unchanged, so an optimiser holding it keeps training it (its state,
        e.g. Adam moments, is stale for one re-clustering; clear it if that matters). With a
        different number of clusters a new ``Parameter`` of the new shape replaces it, and the
        optimiser must be rebuilt (or given the new parameter).
        """
        if num_clusters is None or num_clusters == self.num_clusters:
            self.classifier.reset_parameters()
            return
        weight = self.classifier.weight
        self.classifier = nn.Linear(self.classifier.in_features, num_clusters, bias=False).to(
            device=weight.device, dtype=weight.dtype
        )


class HBTRLoss(nn.Module):
    """MT-HCN harmonious bidirectional triplet ranking loss.

    The VSE++ hardest-negative bidirectional triplet loss plus a term that keeps each positive
    closer to its anchor than the centroid of the anchor's negatives. For image anchor i,
    ``c_i = mean_{j≠i} text_j`` and the term is ``[m_c - s(i,i) + image_i · c_i]_+``; symmetrically
    for text anchor i with ``c'_i = mean_{j≠i} image_j`` and ``[m_c - s(i,i) + text_i · c'_i]_+``.

    The centroid is *not* re-normalised: ``image_i · c_i`` is then exactly the mean similarity of the
    anchor to its negatives (the off-diagonal mean of row i of the similarity matrix), which is what
    is computed. Re-normalising would make it the cosine to the negatives' mean direction, which
    grows towards 1 as the negatives spread out and would over-weight diverse batches.

    ``total_i = triplet_i + centroid_weight * (image-anchor term_i + text-anchor term_i)``, averaged
    over the batch. A batch of one has no negatives and gives 0.
    """

    def __init__(self, margin: float = 0.2, centroid_margin: float = 0.1, centroid_weight: float = 1.0):
        super().__init__()
        self.margin = margin
        self.centroid_margin = centroid_margin
        self.centroid_weight = centroid_weight

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scores = image @ text.t()
        image_anchor, text_anchor = _triplet_costs(scores, self.margin)
        triplet = image_anchor.max(dim=1).values + text_anchor.max(dim=0).values
        batch = scores.shape[0]
        if batch < 2:
            return triplet.mean()
        positive = scores.diag()
        off_diagonal_sum_rows = scores.sum(dim=1) - positive  # image_i · sum_{j≠i} text_j
        off_diagonal_sum_cols = scores.sum(dim=0) - positive  # text_i · sum_{j≠i} image_j
        image_centroid = (self.centroid_margin - positive + off_diagonal_sum_rows / (batch - 1)).clamp(min=0)
        text_centroid = (self.centroid_margin - positive + off_diagonal_sum_cols / (batch - 1)).clamp(min=0)
        return (triplet + self.centroid_weight * (image_centroid + text_centroid)).mean()


class ContrastivePairLoss(nn.Module):
    """CCL's inter-modality pairwise loss (the contrastive loss of Hadsell et al., as in the CCL authors' code).

    For image i and text j at Euclidean distance ``d_ij = |image_i − text_j|``::

        same:      d²
        different: max(0, m − d)²

    over every (i, j) of the batch. "Same" is the matched pair (i = j), or, when ``labels`` are
    given, every pair sharing a label. The mean over same pairs and the mean over different pairs
    are averaged: with B² − B different pairs against B same ones, a plain mean would let the
    negatives drown the positives. For unit vectors ``d² = 2 − 2 cos``, so the default margin 1
    asks different pairs to stay below cosine 0.5.
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = margin

    def forward(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        distance = torch.cdist(image, text).clamp(min=0)
        if labels is None:
            same = torch.eye(image.shape[0], dtype=torch.bool, device=image.device)
        else:
            same = labels[:, None] == labels[None, :]
        positive = distance.pow(2)[same].mean()
        if same.all():
            return positive
        negative = (self.margin - distance).clamp(min=0).pow(2)[~same].mean()
        return 0.5 * (positive + negative)


class CategoryLoss(nn.Module):
    """CCL's intra-modality semantic category loss: one classifier per modality (not shared, unlike
    the instance loss): ``CE(W_image image, y) + CE(W_text text, y)``, each a batch mean."""

    def __init__(self, dim: int, num_categories: int):
        super().__init__()
        self.image = nn.Linear(dim, num_categories)
        self.text = nn.Linear(dim, num_categories)

    def forward(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.image(image), labels) + F.cross_entropy(self.text(text), labels)


class AdaptiveBalance(nn.Module):
    """Weights for several task losses, learnt with them: ``Σ_k exp(−s_k) L_k + s_k``.

    CCL balances its intra-modality category terms against the inter-modality pairwise term
    adaptively; this is the homoscedastic-uncertainty weighting of Kendall, Gal and Cipolla (2018):
    minimising over ``s_k`` gives ``exp(−s_k) = 1 / L_k``, so a term whose loss is large is
    weighted down, and the ``+ s_k`` keeps every weight from going to 0. All ``s_k`` start at 0
    (every weight 1).
    """

    def __init__(self, tasks: int):
        super().__init__()
        self.log_variance = nn.Parameter(torch.zeros(tasks))

    def forward(self, losses: list[torch.Tensor]) -> torch.Tensor:
        if len(losses) != self.log_variance.shape[0]:
            raise ValueError(f"expected {self.log_variance.shape[0]} task losses, got {len(losses)}")
        stacked = torch.stack(losses)
        return (torch.exp(-self.log_variance) * stacked + self.log_variance).sum()


class CCLLoss(nn.Module):
    """CCL's multi-task objective at one embedding level: the inter-modality pairwise loss and one
    intra-modality category loss per kind of category (e.g. emoji group and subgroup), balanced by
    :class:`AdaptiveBalance`. ``categories[name]`` are the batch's labels of that kind."""

    def __init__(self, dim: int, category_sizes: dict[str, int], margin: float = 1.0):
        super().__init__()
        self.pair = ContrastivePairLoss(margin)
        self.categories = nn.ModuleDict({name: CategoryLoss(dim, size) for name, size in category_sizes.items()})
        self.balance = AdaptiveBalance(1 + len(self.categories))

    def forward(self, image: torch.Tensor, text: torch.Tensor, categories: dict[str, torch.Tensor]) -> torch.Tensor:
        terms = [self.pair(image, text)]
        terms += [loss(image, text, categories[name]) for name, loss in self.categories.items()]
        return self.balance(terms)


class ScorerLoss(nn.Module):
    """InfoNCE for a re-ranker, over the first stage's hardest candidates.

    For each text of the batch: its own image and the ``negatives`` other images the first stage
    (``first_stage[i, t]``, the towers' scores) ranks highest; the scorer scores these K + 1 pairs,
    a learnt temperature scales them, and cross-entropy asks for the matched pair. Each image is
    treated likewise against K texts, and both directions are averaged. This is what the scorer
    meets when it re-ranks the first stage's top N, and it costs ``2 · B · (K + 1)`` pair scores
    instead of ``B²`` (CRAN's local alignment over a 256 × 256 batch is ~25 M word–patch
    attentions). Summed over the scorer outputs named in ``levels`` (``fused`` and its parts).
    """

    def __init__(self, levels: tuple[str, ...] = ("fused",), negatives: int = 15, init_temperature: float = 0.07,
                 max_scale: float = 100.0):
        super().__init__()
        self.levels = tuple(levels)
        self.negatives = negatives
        self.logit_scale = nn.ParameterDict({
            level: nn.Parameter(torch.tensor(math.log(1.0 / init_temperature))) for level in self.levels})
        self.max_log_scale = math.log(max_scale)

    @staticmethod
    def candidates(first_stage: torch.Tensor, negatives: int) -> torch.Tensor:
        """``[B, 1 + K]``: for row b, b itself, then the K other columns scoring highest in row b."""
        batch = first_stage.shape[0]
        k = min(negatives, batch - 1)
        own = torch.eye(batch, dtype=torch.bool, device=first_stage.device)
        hardest = first_stage.detach().masked_fill(own, float("-inf")).topk(k, dim=1).indices
        return torch.cat([torch.arange(batch, device=first_stage.device)[:, None], hardest], dim=1)

    def forward(self, scorer: nn.Module, image_side: dict[str, torch.Tensor], text_side: dict[str, torch.Tensor],
                first_stage: torch.Tensor) -> torch.Tensor:
        """``first_stage [B, B]``: image i against text t."""
        batch = first_stage.shape[0]
        if batch < 2:
            return first_stage.new_zeros(())
        targets = torch.zeros(batch, dtype=torch.long, device=first_stage.device)  # the matched pair comes first
        text_rows = self.candidates(first_stage.t(), self.negatives)  # row t: images for text t
        image_rows = self.candidates(first_stage, self.negatives)  # row i: texts for image i
        k1 = text_rows.shape[1]
        own = torch.arange(batch, device=first_stage.device)[:, None].expand(batch, k1).reshape(-1)
        # text t against images text_rows[t]; image i against texts image_rows[i]; the scorer builds on
        # the first stage's scores but does not train it (it has its own loss)
        first = first_stage.detach()
        t2i = scorer.score({k: v[text_rows.reshape(-1)] for k, v in image_side.items()},
                           {k: v[own] for k, v in text_side.items()}, first[text_rows.reshape(-1), own], pairwise=True)
        i2t = scorer.score({k: v[own] for k, v in image_side.items()},
                           {k: v[image_rows.reshape(-1)] for k, v in text_side.items()}, first[own, image_rows.reshape(-1)],
                           pairwise=True)
        total = first_stage.new_zeros(())
        for level in self.levels:
            scale = self.logit_scale[level].clamp(max=self.max_log_scale).exp()
            total = total + 0.5 * (F.cross_entropy(scale * t2i[level].reshape(batch, k1), targets)
                                   + F.cross_entropy(scale * i2t[level].reshape(batch, k1), targets))
        return total
