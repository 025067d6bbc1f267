import math

import pytest
import torch

from xmodal.training.losses import HBTRLoss, InfoNCELoss, InstanceLoss, SSCLoss, VSEPPLoss


def test_infonce_identity_pairs_at_unit_temperature():
    loss = InfoNCELoss(init_temperature=1.0)
    eye = torch.eye(2)
    # logits = I: each row's CE is -log(e^1 / (e^1 + e^0)) = log(1 + e^-1), the same in both directions.
    assert loss(eye, eye).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_infonce_asymmetric_pairs_by_hand():
    loss = InfoNCELoss(init_temperature=1.0)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # logits = [[0.6, 0.0], [0.8, 1.0]]
    image_to_text = (math.log(1 + math.exp(-0.6)) + math.log(1 + math.exp(-0.2))) / 2
    text_to_image = (math.log(1 + math.exp(0.2)) + math.log(1 + math.exp(-1.0))) / 2
    assert loss(image, text).item() == pytest.approx(0.5 * (image_to_text + text_to_image), abs=1e-6)


def test_infonce_temperature_scales_logits_and_is_clamped():
    loss = InfoNCELoss(init_temperature=0.5, max_scale=100.0)
    eye = torch.eye(2)
    assert loss(eye, eye).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)  # e^10 > 100: the clamp applies
    assert loss(eye, eye).item() == pytest.approx(math.log(1 + math.exp(-100)), abs=1e-6)


def test_infonce_gradient_reaches_temperature():
    loss = InfoNCELoss()
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    loss(image, text).backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.abs().item() > 0


# A 3-pair batch used by the triplet-style losses. s(i, j) = image_i · text_j:
#   image = [1, 0], [0, 1], [0.6, 0.8];  text = [0.8, 0.6], [0, 1], [1, 0]
#   S = [[0.8,  0.0, 1.0],
#        [0.6,  1.0, 0.0],
#        [0.96, 0.8, 0.6]]        positives (diagonal) = 0.8, 1.0, 0.6
IMAGE3 = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
TEXT3 = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]


def _batch3(requires_grad: bool = False):
    return (
        torch.tensor(IMAGE3, dtype=torch.float64, requires_grad=requires_grad),
        torch.tensor(TEXT3, dtype=torch.float64, requires_grad=requires_grad),
    )


def hinge(value: float) -> float:
    return max(0.0, value)


# Per-pair VSE++ cost at margin 0.25 (image anchor: hardest off-diagonal of row i; text anchor: of column i).
VSEPP3 = [
    hinge(0.25 - 0.8 + max(0.0, 1.0)) + hinge(0.25 - 0.8 + max(0.6, 0.96)),  # 0.45 + 0.41
    hinge(0.25 - 1.0 + max(0.6, 0.0)) + hinge(0.25 - 1.0 + max(0.0, 0.8)),  # 0    + 0.05
    hinge(0.25 - 0.6 + max(0.96, 0.8)) + hinge(0.25 - 0.6 + max(1.0, 0.0)),  # 0.61 + 0.65
]


def test_vsepp_orthogonal_pairs_ignore_the_positive_as_negative():
    eye = torch.eye(2)
    # S = I: every negative has similarity 0. At m = 0.2 each hinge is [0.2 - 1 + 0]_+ = 0; the
    # diagonal (1) must not count as a negative, else the cost would be [0.2 - 1 + 1]_+ = 0.2.
    assert VSEPPLoss(margin=0.2)(eye, eye).item() == pytest.approx(0.0, abs=1e-7)
    # At m = 1.5 each hinge is 1.5 - 1 + 0 = 0.5, two directions per pair: 1.0 per pair.
    assert VSEPPLoss(margin=1.5)(eye, eye).item() == pytest.approx(1.0, abs=1e-6)


def test_vsepp_hardest_negative_by_hand():
    image, text = _batch3()
    assert VSEPP3 == pytest.approx([0.86, 0.05, 1.26], abs=1e-12)
    assert VSEPPLoss(margin=0.25)(image, text).item() == pytest.approx((0.86 + 0.05 + 1.26) / 3, abs=1e-9)
    assert VSEPPLoss(margin=0.25, reduction="sum")(image, text).item() == pytest.approx(2.17, abs=1e-9)
    per_pair = VSEPPLoss(margin=0.25, reduction="none")(image, text)
    assert per_pair.tolist() == pytest.approx([0.86, 0.05, 1.26], abs=1e-9)


def test_vsepp_sum_over_negatives_by_hand():
    image, text = _batch3()
    # hardest=False (VSE0): every off-diagonal hinge counts.
    image_anchor = (
        hinge(0.25 - 0.8 + 0.0) + hinge(0.25 - 0.8 + 1.0)  # row 0: 0 + 0.45
        + hinge(0.25 - 1.0 + 0.6) + hinge(0.25 - 1.0 + 0.0)  # row 1: 0 + 0
        + hinge(0.25 - 0.6 + 0.96) + hinge(0.25 - 0.6 + 0.8)  # row 2: 0.61 + 0.45
    )
    text_anchor = (
        hinge(0.25 - 0.8 + 0.6) + hinge(0.25 - 0.8 + 0.96)  # column 0: 0.05 + 0.41
        + hinge(0.25 - 1.0 + 0.0) + hinge(0.25 - 1.0 + 0.8)  # column 1: 0 + 0.05
        + hinge(0.25 - 0.6 + 1.0) + hinge(0.25 - 0.6 + 0.0)  # column 2: 0.65 + 0
    )
    assert image_anchor + text_anchor == pytest.approx(2.67, abs=1e-12)
    loss = VSEPPLoss(margin=0.25, hardest=False)(image, text)
    assert loss.item() == pytest.approx(2.67 / 3, abs=1e-9)


def test_vsepp_single_pair_has_no_negatives():
    one = torch.tensor([[0.6, 0.8]])
    assert VSEPPLoss(margin=0.2)(one, one).item() == 0.0
    with pytest.raises(ValueError):
        VSEPPLoss(reduction="max")


def test_vsepp_gradient_flows_to_both_modalities():
    image, text = _batch3(requires_grad=True)
    VSEPPLoss(margin=0.25)(image, text).backward()
    for tensor in (image, text):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    # Only active hinges with hardest negatives touch image_0 (the loss is the mean over 3 pairs):
    #   pair 0, image anchor: 0.25 - s(0,0) + s(0,2)  -> -text_0 + text_2
    #   pair 0, text anchor:  0.25 - s(0,0) + s(2,0)  -> -text_0
    #   pair 2, text anchor:  0.25 - s(2,2) + s(0,2)  -> +text_2 (image_0 is text_2's hardest negative)
    # so d/d image_0 = (2 * text_2 - 2 * text_0) / 3 = (2 * [1, 0] - 2 * [0.8, 0.6]) / 3.
    assert image.grad[0].tolist() == pytest.approx([(2 * 1.0 - 2 * 0.8) / 3, (2 * 0.0 - 2 * 0.6) / 3], abs=1e-9)


# Shared classifier used by the instance and clustering losses: W = [[1, 0], [0, 1], [-1, 0]],
# so the logits of x = [a, b] are [a, b, -a].
W3 = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]


def test_instance_loss_by_hand():
    loss = InstanceLoss(dim=2, num_classes=3)
    with torch.no_grad():
        loss.classifier.weight.copy_(torch.tensor(W3))
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    # CE(logits, y) = log(sum_c e^logit_c) - logit_y; class 2 is an instance absent from the batch.
    image_ce = (
        (math.log(math.exp(1) + math.exp(0) + math.exp(-1)) - 1)  # image_0 logits [1, 0, -1], y=0
        + (math.log(math.exp(0) + math.exp(1) + math.exp(0)) - 1)  # image_1 logits [0, 1, 0], y=1
    ) / 2
    text_ce = (
        (math.log(math.exp(0.6) + math.exp(0.8) + math.exp(-0.6)) - 0.6)  # text_0 logits [0.6, 0.8, -0.6], y=0
        + (math.log(math.exp(0) + math.exp(1) + math.exp(0)) - 1)  # text_1 logits [0, 1, 0], y=1
    ) / 2
    assert loss(image, text, labels).item() == pytest.approx(image_ce + text_ce, abs=1e-6)


def test_instance_loss_one_shared_bias_free_classifier_gets_gradient():
    loss = InstanceLoss(dim=8, num_classes=5)
    parameters = list(loss.parameters())
    assert len(parameters) == 1 and parameters[0].shape == (5, 8)  # W_share, no bias
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    loss(image, text, torch.tensor([0, 1, 2, 4])).backward()
    for tensor in (loss.classifier.weight, image, text):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_ssc_loss_by_hand():
    loss = SSCLoss(dim=2, num_clusters=3)
    with torch.no_grad():
        loss.classifier.weight.copy_(torch.tensor(W3))
    image, text = _batch3()
    image, text = image.float(), text.float()
    clusters = torch.tensor([0, 1, 1])
    image_ce = (
        (math.log(math.exp(1) + math.exp(0) + math.exp(-1)) - 1)  # [1, 0] -> logits [1, 0, -1], cluster 0
        + (math.log(math.exp(0) + math.exp(1) + math.exp(0)) - 1)  # [0, 1] -> [0, 1, 0], cluster 1
        + (math.log(math.exp(0.6) + math.exp(0.8) + math.exp(-0.6)) - 0.8)  # [0.6, 0.8] -> [0.6, 0.8, -0.6], 1
    ) / 3
    text_ce = (
        (math.log(math.exp(0.8) + math.exp(0.6) + math.exp(-0.8)) - 0.8)  # [0.8, 0.6] -> [0.8, 0.6, -0.8], 0
        + (math.log(math.exp(0) + math.exp(1) + math.exp(0)) - 1)  # [0, 1] -> [0, 1, 0], cluster 1
        + (math.log(math.exp(1) + math.exp(0) + math.exp(-1)) - 0)  # [1, 0] -> [1, 0, -1], cluster 1
    ) / 3
    assert loss(image, text, clusters).item() == pytest.approx(image_ce + text_ce, abs=1e-6)


def test_ssc_reset_classifier_in_place_or_resized():
    loss = SSCLoss(dim=4, num_clusters=3)
    weight = loss.classifier.weight
    before = weight.detach().clone()
    loss.reset_classifier(3)  # same size: same Parameter object (the optimiser keeps it), new values
    assert loss.classifier.weight is weight and not torch.equal(weight.detach(), before)
    loss.reset_classifier()
    assert loss.classifier.weight is weight
    loss.reset_classifier(5)  # new clustering with another k: new shape
    assert loss.num_clusters == 5 and loss.classifier.weight.shape == (5, 4) and loss.classifier.bias is None
    image = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1).requires_grad_()
    loss(image, text, torch.tensor([0, 1, 2, 3, 4, 4])).backward()
    for tensor in (loss.classifier.weight, image, text):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_hbtr_by_hand():
    image, text = _batch3()
    # Centroids of the negatives, not re-normalised: for image anchor 2, c_2 = (text_0 + text_1) / 2
    # = [0.4, 0.8] and image_2 · c_2 = 0.6 * 0.4 + 0.8 * 0.8 = 0.88 = (S[2,0] + S[2,1]) / 2.
    image_centroid = [
        hinge(0.15 - 0.8 + (0.0 + 1.0) / 2),  # -0.15 -> 0
        hinge(0.15 - 1.0 + (0.6 + 0.0) / 2),  # -0.55 -> 0
        hinge(0.15 - 0.6 + (0.6 * 0.4 + 0.8 * 0.8)),  # 0.43
    ]
    # Text anchors: c'_i = mean of the other images; text_i · c'_i = mean of column i's off-diagonal.
    text_centroid = [
        hinge(0.15 - 0.8 + (0.6 + 0.96) / 2),  # 0.13
        hinge(0.15 - 1.0 + (0.0 + 0.8) / 2),  # -0.45 -> 0
        hinge(0.15 - 0.6 + (1.0 + 0.0) / 2),  # 0.05
    ]
    assert sum(image_centroid) + sum(text_centroid) == pytest.approx(0.61, abs=1e-12)
    loss = HBTRLoss(margin=0.25, centroid_margin=0.15, centroid_weight=1.0)
    assert loss(image, text).item() == pytest.approx((2.17 + 0.61) / 3, abs=1e-9)
    weighted = HBTRLoss(margin=0.25, centroid_margin=0.15, centroid_weight=0.5)
    assert weighted(image, text).item() == pytest.approx((2.17 + 0.5 * 0.61) / 3, abs=1e-9)
    # Re-normalising c_2 would give 0.88 / |[0.4, 0.8]| = 0.984 and a different total: pinned above.
    assert 0.88 / math.hypot(0.4, 0.8) == pytest.approx(0.98387, abs=1e-5)


def test_hbtr_without_centroid_term_is_vsepp():
    image, text = _batch3()
    # centroid_weight = 0 leaves the hardest-negative triplet: (0.86 + 0.05 + 1.26) / 3.
    loss = HBTRLoss(margin=0.25, centroid_margin=0.15, centroid_weight=0.0)
    assert loss(image, text).item() == pytest.approx(2.17 / 3, abs=1e-9)
    one = torch.tensor([[0.6, 0.8]])
    assert HBTRLoss()(one, one).item() == 0.0  # no negatives, no centroid


def test_hbtr_gradient_flows_to_both_modalities():
    image, text = _batch3(requires_grad=True)
    HBTRLoss(margin=0.25, centroid_margin=0.15)(image, text).backward()
    for tensor in (image, text):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_every_recipe_term_builds_through_the_objective_registry():
    from xmodal.training.objectives import OBJECTIVES, all_terms
    from xmodal.training.recipes import RECIPES, recipe_config

    used = {term["loss"] for name in RECIPES for term in all_terms(recipe_config(name)).values()}
    assert used <= set(OBJECTIVES)


def test_an_unknown_loss_is_a_clear_error():
    from xmodal.training.objectives import LossContext, build_objectives
    from xmodal.training.recipes import recipe_config

    config = recipe_config("infonce", losses=[{"loss": "triplet", "level": "global", "weight": 1.0}])
    with pytest.raises(ValueError, match="unknown loss 'triplet' in recipe 'infonce'"):
        build_objectives(LossContext(config, model=None, num_classes=2, category_sizes={}))


def test_an_objective_reads_its_level_and_targets_from_the_step():
    from xmodal.training.objectives import InstanceObjective, LossContext, Step

    image, text = torch.eye(3), torch.eye(3)
    term = {"loss": "instance", "level": "concept", "weight": 1.0}
    torch.manual_seed(0)
    objective = InstanceObjective.build(term, LossContext({"dim": 3}, model=None, num_classes=3, category_sizes={}))
    labels = torch.tensor([0, 2, 1])
    step = Step(image_features={}, text_features={}, image={"concept": image}, text={"concept": text},
                index=torch.arange(3), labels=labels, categories={}, scorer=None)
    assert objective(step).item() == pytest.approx(objective.loss(image, text, labels).item())
