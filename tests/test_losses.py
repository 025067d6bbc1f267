import math

import pytest
import torch

from xmodal.training.losses import InfoNCELoss


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
