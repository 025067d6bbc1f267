"""A recipe's loss terms behind one call, so the training loop never asks which loss it runs.

A term (``{"loss": "vsepp", "level": "global", "weight": 1.0, "margin": 0.2}``) becomes an
:class:`Objective`: built from the term and a :class:`LossContext` by the class registered in
``OBJECTIVES`` under the term's ``loss``, then called as ``objective(step)`` on a :class:`Step`,
which carries everything a training step has. What is particular to a loss lives in its
objective: the inputs it takes from the step, its work before each epoch (SSC re-clusters) and an
adversary it trains (CM-GANs' discriminators). A new loss is a loss module (``losses.py``) and an
objective registered here; a new recipe is a config naming it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.training import losses
from xmodal.training.adversarial import CMGAN
from xmodal.training.models import DualEncoder

if TYPE_CHECKING:
    from xmodal.training.train import Trainee


@dataclass
class LossContext:
    """What building a term's loss may need beyond the term itself."""

    config: dict[str, Any]
    model: DualEncoder  # feature widths (CM-GANs), the pair scorer
    num_classes: int  # the training set's instances (concepts)
    category_sizes: dict[str, int]  # the number of labels of each kind of category (CCL)


@dataclass
class Step:
    """One training step's batch: backbone outputs, embeddings by level, and the batch rows' targets."""

    image_features: dict[str, torch.Tensor]  # the image backbone's outputs ("pooled", "mid", "fragments")
    text_features: dict[str, torch.Tensor]
    image: dict[str, torch.Tensor]  # embeddings by level
    text: dict[str, torch.Tensor]
    index: torch.Tensor  # the batch's rows in the training set
    labels: torch.Tensor  # the rows' instance ids
    categories: dict[str, torch.Tensor]  # the rows' ids of each kind of category
    scorer: nn.Module | None  # the model's pair scorer, when it has one


@dataclass
class EpochStart:
    """What an objective may use before an epoch's first step."""

    trainee: Trainee
    epoch: int
    seed: int  # the run's
    optimizer: torch.optim.Optimizer


class Objective(nn.Module):
    """One loss term: its loss module (``self.loss``), the embedding level it reads and its weight."""

    def __init__(self, term: dict[str, Any], loss: nn.Module):
        super().__init__()
        self.term = term
        self.level = term["level"]
        self.weight = term["weight"]
        self.loss = loss

    @classmethod
    def build(cls, term: dict[str, Any], context: LossContext) -> Objective:
        raise NotImplementedError

    def forward(self, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def start_epoch(self, start: EpochStart) -> None:
        """Called before each epoch in which the term is active."""

    def adversary_parameters(self) -> list[nn.Parameter]:
        """Parameters stepped by the adversary optimiser on :meth:`adversary_loss`, not by the main one."""
        return []

    def adversary_loss(self, step: Step) -> torch.Tensor | None:
        """The adversary's objective on the step the generators just took, if the term has an adversary."""
        return None


OBJECTIVES: dict[str, type[Objective]] = {}


def registered(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Register an objective class as the one built for terms whose ``loss`` is ``name``."""

    def register(cls: type[Objective]) -> type[Objective]:
        OBJECTIVES[name] = cls
        return cls

    return register


class PairObjective(Objective):
    """A loss over the batch's matched (image, text) embeddings at one level."""

    def forward(self, step: Step) -> torch.Tensor:
        return self.loss(step.image[self.level], step.text[self.level])


@registered("infonce")
class InfoNCEObjective(PairObjective):
    @classmethod
    def build(cls, term: dict[str, Any], context: LossContext) -> Objective:
        return cls(term, losses.InfoNCELoss())


@registered("vsepp")
class VSEPPObjective(PairObjective):
    @classmethod
    def build(cls, term: dict[str, Any], context: LossContext) -> Objective:
        return cls(term, losses.VSEPPLoss(margin=term.get("margin", 0.2), hardest=term.get("hardest", True)))


@registered("hbtr")
class HBTRObjective(PairObjective):
    @classmethod
    def build(cls, term: dict[str, Any], context: LossContext) -> Objective:
        return cls(term, losses.HBTRLoss(margin=term.get("margin", 0.2), centroid_margin=term.get("centroid_margin", 0.1)))


@registered("instance")
class InstanceObjective(Objective):
    """Each training instance its own class."""

    @classmethod
    def build(cls, term: dict[str, Any], context: LossContext) -> Objective:
        return cls(term, losses.InstanceLoss(context.config["dim"], context.num_classes))

    def forward(self, step: Step) -> torch.Tensor:
        return self.loss(step.image[self.level], step.text[self.level], step.labels)


@registered("ssc")
class SSCObjective(Objective):
    """Each pair classified into its cluster; the pairs are clustered again before every epoch."""

    @classmethod
    def build(cls, term: dict[str, Any], context: LossContext) -> Objective:
        return cls(term, losses.SSCLoss(context.config["dim"], term["clusters"]))

    def __init__(self, term: dict[str, Any], loss: nn.Module):
        super().__init__(term, loss)
        self.clusters: torch.Tensor | None = None  # every training row's cluster id (recomputed, so never saved)

    def start_epoch(self, start: EpochStart) -> None:
        self.clusters = cluster_pairs(start.trainee, self.term["cluster_level"], self.term["clusters"], start.seed + start.epoch)
        # Cluster ids mean nothing across re-clusterings: a fresh classifier, fresh Adam moments.
        self.loss.reset_classifier(self.term["clusters"])
        for parameter in self.loss.parameters():
            start.optimizer.state.pop(parameter, None)

    def forward(self, step: Step) -> torch.Tensor:
        image = step.image[self.level]
        return self.loss(image, step.text[self.level], self.clusters[step.index].to(image.device))


@registered("ccl")
class CCLObjective(Objective):
    """The pairwise loss and one category loss per kind of category the term names."""

    @classmethod
    def build(cls, term: dict[str, Any], context: LossContext) -> Objective:
        return cls(term, losses.CCLLoss(context.config["dim"], {name: context.category_sizes[name] for name in term["categories"]},
                                        margin=term.get("margin", 1.0)))

    def forward(self, step: Step) -> torch.Tensor:
        return self.loss(step.image[self.level], step.text[self.level], step.categories)


@registered("scorer")
class ScorerObjective(Objective):
    """The pair scorer ranking each match among the first stage's (the level's) hardest candidates."""

    @classmethod
    def build(cls, term: dict[str, Any], context: LossContext) -> Objective:
        if context.model.scorer is None:
            raise ValueError(f"recipe {context.config['recipe']!r}: a 'scorer' loss needs the recipe's `scorer`")
        return cls(term, losses.ScorerLoss(tuple(term.get("levels", ("fused",))), negatives=term.get("negatives", 15)))

    def forward(self, step: Step) -> torch.Tensor:
        scorer = step.scorer
        return self.loss(scorer, scorer.image_side(step.image_features), scorer.text_side(step.text_features),
                         step.image[self.level] @ step.text[self.level].t())


@registered("cmgan")
class CMGANObjective(Objective):
    """CM-GANs' generator objective on the level and the backbone features it is projected from;
    its discriminators are the adversary."""

    @classmethod
    def build(cls, term: dict[str, Any], context: LossContext) -> Objective:
        feature = context.config["levels"][term["level"]]
        model = context.model
        gan = CMGAN(model.image.backbone.dims[feature], model.text.backbone.dims[feature], context.config["dim"],
                    hidden=context.config["head_hidden"],
                    **{k: term[k] for k in ("reconstruction_weight", "intra_weight", "inter_weight") if k in term})
        return cls(term, gan, feature)

    def __init__(self, term: dict[str, Any], loss: CMGAN, feature: str):
        super().__init__(term, loss)
        self.feature = feature

    def _inputs(self, step: Step) -> tuple[torch.Tensor, ...]:
        return (step.image_features[self.feature], step.text_features[self.feature], step.image[self.level],
                step.text[self.level])

    def forward(self, step: Step) -> torch.Tensor:
        return self.loss.generator_loss(*self._inputs(step))["total"]

    def adversary_parameters(self) -> list[nn.Parameter]:
        return self.loss.discriminator_parameters()

    def adversary_loss(self, step: Step) -> torch.Tensor:
        # The generators' output is detached inside: only the discriminators learn from this.
        return self.loss.discriminator_loss(*self._inputs(step))["total"]


def term_key(term: dict[str, Any]) -> str:
    return "_".join(str(term[k]) for k in ("loss", "level")) + "_" + hashlib.sha1(json.dumps(term, sort_keys=True).encode()).hexdigest()[:6]


def all_terms(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    terms = list(config["losses"]) + [term for stage in config["stages"] for term in stage["losses"]]
    return {term_key(term): term for term in terms}


def build_objectives(context: LossContext) -> nn.ModuleDict:
    """One objective per distinct loss term of any stage, keyed by ``term_key`` (a term in several stages is one)."""
    objectives = nn.ModuleDict()
    for key, term in all_terms(context.config).items():
        if term["loss"] not in OBJECTIVES:
            raise ValueError(f"unknown loss {term['loss']!r} in recipe {context.config['recipe']!r}; known: {sorted(OBJECTIVES)}")
        objectives[key] = OBJECTIVES[term["loss"]].build(term, context)
    return objectives


@torch.no_grad()
def cluster_pairs(trainee: Trainee, level: str, clusters: int, seed: int) -> torch.Tensor:
    """k-means over each pair's exterior embedding (image and label caption averaged): the SSC pseudo-labels."""
    from xmodal.training.clustering import kmeans

    model = trainee.model
    model.eval()
    rows = trainee.images.rows
    image = torch.cat([trainee.image_embeddings(slice(i, i + 512))[level] for i in range(0, len(rows), 512)])
    text = torch.cat([trainee.text_embeddings([r.captions[0] for r in rows[i:i + 512]])[level]
                      for i in range(0, len(rows), 512)])
    _, assignments = kmeans(F.normalize(image + text, dim=-1).cpu(), min(clusters, len(rows)), seed=seed)
    model.train()
    return assignments
