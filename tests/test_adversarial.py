import math

import pytest
import torch

from xmodal.training.adversarial import CMGAN, SharedTopHeads


def softplus(z: float) -> float:
    # BCE-with-logits of logit z: against label 1 it is softplus(-z), against label 0 softplus(z).
    return math.log1p(math.exp(z))


def test_heads_shapes_and_shared_top_layer():
    torch.manual_seed(0)
    heads = SharedTopHeads(image_dim=5, text_dim=3, dim=4, hidden=6).eval()
    image, text = torch.randn(2, 5), torch.randn(2, 3)
    assert heads.encode_image(image).shape == (2, 4)
    assert heads.encode_text(text).shape == (2, 4)
    assert heads.image_hidden(image).shape == heads.text_hidden(text).shape == (2, 6)
    # Both paths end in the very same layer: editing it moves both outputs, by the same delta map.
    before_image, before_text = heads.encode_image(image), heads.encode_text(text)
    with torch.no_grad():
        heads.shared.weight.add_(1.0)
    delta_image = heads.encode_image(image) - before_image
    delta_text = heads.encode_text(text) - before_text
    torch.testing.assert_close(delta_image, heads.image_hidden(image).sum(1, keepdim=True).expand(2, 4))
    torch.testing.assert_close(delta_text, heads.text_hidden(text).sum(1, keepdim=True).expand(2, 4))
    with torch.no_grad():
        heads.shared.weight.zero_()
        heads.shared.bias.copy_(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    expected = torch.tensor([[1.0, -2.0, 3.0, 0.5]]).expand(2, 4)
    torch.testing.assert_close(heads.encode_image(image), expected)
    torch.testing.assert_close(heads.encode_text(text), expected)
    # Shared, so counted once: two modality layers plus one shared layer.
    assert sum(p.numel() for p in heads.parameters()) == (5 * 6 + 6) + (3 * 6 + 6) + (6 * 4 + 4)


def _closed_form_gan() -> CMGAN:
    """Zero weights so every quantity is a constant or a one-term function of the input."""
    gan = CMGAN(image_dim=3, text_dim=2, dim=2, hidden=4, reconstruction_weight=1.0, intra_weight=0.5,
                inter_weight=0.25)
    with torch.no_grad():
        for p in gan.parameters():
            p.zero_()
        # Decoders output their bias whatever the common.
        gan.image_decoder.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        gan.text_decoder.bias.copy_(torch.tensor([1.0, 0.0]))
        # Intra discriminators output their final bias whatever the input.
        gan.image_discriminator[2].bias.fill_(0.3)
        gan.text_discriminator[2].bias.fill_(-0.7)
        # Modality discriminator: logit = leaky_relu(common[0]), so it depends on the modality.
        gan.modality_discriminator[0].weight[0, 0] = 1.0
        gan.modality_discriminator[2].weight[0, 0] = 1.0
    return gan


IMAGE = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 1.0]])
TEXT = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
IMAGE_COMMON = torch.tensor([[2.0, 0.0], [2.0, 5.0]])  # modality logit 2
TEXT_COMMON = torch.tensor([[-1.0, 3.0], [-1.0, 0.0]])  # modality logit 0.2 * -1 = -0.2


def test_generator_loss_closed_form():
    losses = _closed_form_gan().generator_loss(IMAGE, TEXT, IMAGE_COMMON, TEXT_COMMON)
    # Image residuals [[0.5, 1, 0], [0, 0, -1]] -> 2.25 / 6; text [[-1, 1], [1, 2]] -> 7 / 4.
    reconstruction = 2.25 / 6 + 7 / 4
    intra = softplus(-0.3) + softplus(0.7)  # both reconstructions labelled real
    inter = softplus(2.0) + softplus(0.2)  # flipped: image common labelled 0, text common 1
    assert losses["reconstruction"].item() == pytest.approx(reconstruction, abs=1e-6)
    assert losses["adversarial_intra"].item() == pytest.approx(intra, abs=1e-6)
    assert losses["adversarial_inter"].item() == pytest.approx(inter, abs=1e-6)
    assert losses["total"].item() == pytest.approx(reconstruction + 0.5 * intra + 0.25 * inter, abs=1e-6)


def test_discriminator_loss_closed_form():
    losses = _closed_form_gan().discriminator_loss(IMAGE, TEXT, IMAGE_COMMON, TEXT_COMMON)
    intra = softplus(-0.3) + softplus(0.3) + softplus(0.7) + softplus(-0.7)
    inter = softplus(-2.0) + softplus(-0.2)  # image common labelled 1, text common 0
    assert losses["intra"].item() == pytest.approx(intra, abs=1e-6)
    assert losses["inter"].item() == pytest.approx(inter, abs=1e-6)
    assert losses["total"].item() == pytest.approx(intra + inter, abs=1e-6)


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.t() + layer.bias


def _mlp_logit(mlp: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    h = _linear(mlp[0], x)
    return _linear(mlp[2], torch.where(h > 0, h, 0.2 * h)).squeeze(1)


def _bce(logits: torch.Tensor, label: int) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return -(torch.log(p) if label == 1 else torch.log(1 - p)).mean()


def test_losses_match_plain_torch_with_random_weights():
    torch.manual_seed(1)
    gan = CMGAN(image_dim=6, text_dim=5, dim=3, hidden=7)
    image, text = torch.randn(4, 6), torch.randn(4, 5)
    image_common, text_common = torch.randn(4, 3), torch.randn(4, 3)
    with torch.no_grad():
        image_rec = _linear(gan.image_decoder, _linear(gan.decoder_shared, image_common).clamp(min=0))
        text_rec = _linear(gan.text_decoder, _linear(gan.decoder_shared, text_common).clamp(min=0))
        reconstruction = ((image_rec - image) ** 2).mean() + ((text_rec - text) ** 2).mean()
        d_image, d_text, d_modality = gan.image_discriminator, gan.text_discriminator, gan.modality_discriminator
        g_intra = _bce(_mlp_logit(d_image, image_rec), 1) + _bce(_mlp_logit(d_text, text_rec), 1)
        g_inter = _bce(_mlp_logit(d_modality, image_common), 0) + _bce(_mlp_logit(d_modality, text_common), 1)
        d_intra = (_bce(_mlp_logit(d_image, image), 1) + _bce(_mlp_logit(d_image, image_rec), 0)
                   + _bce(_mlp_logit(d_text, text), 1) + _bce(_mlp_logit(d_text, text_rec), 0))
        d_inter = _bce(_mlp_logit(d_modality, image_common), 1) + _bce(_mlp_logit(d_modality, text_common), 0)
        generator = gan.generator_loss(image, text, image_common, text_common)
        discriminator = gan.discriminator_loss(image, text, image_common, text_common)
    expected_generator = {"reconstruction": reconstruction, "adversarial_intra": g_intra, "adversarial_inter": g_inter,
                          "total": reconstruction + 0.1 * g_intra + 0.1 * g_inter}
    expected_discriminator = {"intra": d_intra, "inter": d_inter, "total": d_intra + d_inter}
    for key, value in expected_generator.items():
        torch.testing.assert_close(generator[key], value, msg=key)
    for key, value in expected_discriminator.items():
        torch.testing.assert_close(discriminator[key], value, msg=key)


def test_discriminator_loss_reaches_only_the_discriminators():
    torch.manual_seed(2)
    gan = CMGAN(image_dim=6, text_dim=5, dim=3, hidden=7)
    image = torch.randn(4, 6, requires_grad=True)
    text = torch.randn(4, 5, requires_grad=True)
    image_common = torch.randn(4, 3, requires_grad=True)
    text_common = torch.randn(4, 3, requires_grad=True)
    gan.discriminator_loss(image, text, image_common, text_common)["total"].backward()
    for leaf in (image, text, image_common, text_common):
        assert leaf.grad is None
    assert all(p.grad is None for p in gan.generator_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.discriminator_parameters())


def test_generator_loss_reaches_commons_and_decoders():
    torch.manual_seed(3)
    gan = CMGAN(image_dim=6, text_dim=5, dim=3, hidden=7)
    image_common = torch.randn(4, 3, requires_grad=True)
    text_common = torch.randn(4, 3, requires_grad=True)
    gan.generator_loss(torch.randn(4, 6), torch.randn(4, 5), image_common, text_common)["total"].backward()
    assert image_common.grad.abs().sum() > 0 and text_common.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gan.generator_parameters())


@pytest.mark.slow
def test_alternating_training_reduces_reconstruction():
    torch.manual_seed(4)
    heads = SharedTopHeads(image_dim=12, text_dim=8, dim=6, hidden=32)
    gan = CMGAN(image_dim=12, text_dim=8, dim=6, hidden=32)
    generator_opt = torch.optim.Adam([*heads.parameters(), *gan.generator_parameters()], lr=1e-2)
    discriminator_opt = torch.optim.Adam(gan.discriminator_parameters(), lr=1e-2)
    image, text = torch.randn(32, 12), torch.randn(32, 8)
    reconstruction = []
    for _ in range(50):
        image_common, text_common = heads.encode_image(image), heads.encode_text(text)
        discriminator_opt.zero_grad()  # also drops what the last generator step left on them
        d_losses = gan.discriminator_loss(image, text, image_common, text_common)
        d_losses["total"].backward()
        discriminator_opt.step()
        generator_opt.zero_grad()
        g_losses = gan.generator_loss(image, text, image_common, text_common)
        g_losses["total"].backward()
        generator_opt.step()
        assert all(torch.isfinite(v) for v in (*d_losses.values(), *g_losses.values()))
        reconstruction.append(g_losses["reconstruction"].item())
    assert sum(reconstruction[-5:]) / 5 < 0.6 * sum(reconstruction[:5]) / 5
