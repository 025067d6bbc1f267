"""CM-GANs (Peng, Qi & Yuan, arXiv 1710.05106) over pre-computed image and text features.

The paper's generators are one autoencoder per modality whose encoders share their last layer and
whose decoders share their first; the encoders' output is the common representation. Two kinds of
discriminator push on it: an intra-modality one per modality, telling an original feature from its
reconstruction (so the common representation keeps what each modality needs), and one
inter-modality discriminator, telling which modality a common representation came from (so the two
modalities' distributions are pulled together). Our backbones are frozen, so the autoencoders work
on feature vectors rather than pixels and tokens.

:class:`SharedTopHeads` holds the encoders (what is served); :class:`CMGAN` holds everything else
that is trained and then thrown away: the decoders and the three discriminators. No optimiser lives
here: a training loop steps the generator side (heads + :meth:`CMGAN.generator_parameters`) on
:meth:`CMGAN.generator_loss` and the discriminator side (:meth:`CMGAN.discriminator_parameters`) on
:meth:`CMGAN.discriminator_loss`, alternately.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedTopHeads(nn.Module):
    """The generators' encoders: a modality-specific hidden layer, then one shared linear layer.

    ``common_image = shared(dropout(relu(W_i x + b_i)))``, ``common_text = shared(dropout(relu(W_t y + b_t)))``
    with the same ``shared`` applied to both: the paper's weight sharing of the encoders' last layers,
    which ties the two modalities into one space. Outputs are not normalised; callers L2-normalise
    for retrieval.
    """

    def __init__(self, image_dim: int, text_dim: int, dim: int, hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.text = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.shared = nn.Linear(hidden, dim)

    def image_hidden(self, features: torch.Tensor) -> torch.Tensor:
        return self.image(features)

    def text_hidden(self, features: torch.Tensor) -> torch.Tensor:
        return self.text(features)

    def encode_image(self, features: torch.Tensor) -> torch.Tensor:
        return self.shared(self.image_hidden(features))

    def encode_text(self, features: torch.Tensor) -> torch.Tensor:
        return self.shared(self.text_hidden(features))


def _discriminator(in_dim: int, hidden: int) -> nn.Sequential:
    # LeakyReLU, as is usual for GAN discriminators: a dead ReLU unit would pass no gradient back to
    # the generator for the inputs that switch it off.
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))


def _bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    """Mean over the batch of BCE-with-logits against a constant label."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


class CMGAN(nn.Module):
    """The decoders and discriminators of CM-GANs, with both sides' losses.

    Decoders: ``rec_i = V_i relu(S c + s) + v_i`` and likewise for text, the first layer ``S`` shared
    between modalities as in the paper. Discriminators are MLPs to one logit: ``D_i`` on image
    features, ``D_t`` on text features (original = 1, reconstruction = 0) and ``D_m`` on common
    representations (image = 1, text = 0). With ``ℓ(z, y)`` the batch mean of BCE-with-logits::

        generator:      rec   = MSE(rec_i, x) + MSE(rec_t, y)
                        intra = ℓ(D_i(rec_i), 1) + ℓ(D_t(rec_t), 1)
                        inter = ℓ(D_m(c_i), 0) + ℓ(D_m(c_t), 1)
                        total = w_rec·rec + w_intra·intra + w_inter·inter
        discriminator:  intra = ℓ(D_i(x), 1) + ℓ(D_i(rec_i), 0) + ℓ(D_t(y), 1) + ℓ(D_t(rec_t), 0)
                        inter = ℓ(D_m(c_i), 1) + ℓ(D_m(c_t), 0)
                        total = intra + inter

    The generator's inter labels are the flipped modality labels: it is rewarded when ``D_m`` cannot
    tell the modalities apart. The returned components are unweighted (for logging); only ``total``
    carries the weights.
    """

    def __init__(self, image_dim: int, text_dim: int, dim: int, hidden: int = 512,
                 reconstruction_weight: float = 1.0, intra_weight: float = 0.1, inter_weight: float = 0.1):
        super().__init__()
        self.decoder_shared = nn.Linear(dim, hidden)
        self.image_decoder = nn.Linear(hidden, image_dim)
        self.text_decoder = nn.Linear(hidden, text_dim)
        self.image_discriminator = _discriminator(image_dim, hidden)
        self.text_discriminator = _discriminator(text_dim, hidden)
        self.modality_discriminator = _discriminator(dim, hidden)
        self.reconstruction_weight = reconstruction_weight
        self.intra_weight = intra_weight
        self.inter_weight = inter_weight

    def reconstruct_image(self, common: torch.Tensor) -> torch.Tensor:
        return self.image_decoder(F.relu(self.decoder_shared(common)))

    def reconstruct_text(self, common: torch.Tensor) -> torch.Tensor:
        return self.text_decoder(F.relu(self.decoder_shared(common)))

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [p for d in (self.image_discriminator, self.text_discriminator, self.modality_discriminator)
                for p in d.parameters()]

    def generator_parameters(self) -> list[nn.Parameter]:
        return [p for layer in (self.decoder_shared, self.image_decoder, self.text_decoder)
                for p in layer.parameters()]

    def generator_loss(self, image_features: torch.Tensor, text_features: torch.Tensor,
                       image_common: torch.Tensor, text_common: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generator side's objective; backpropagates into the commons and the decoders.

        The gradient necessarily also reaches the discriminators' parameters (they sit between the
        generated samples and the loss). Step only the generator optimiser with it, and zero the
        discriminators' gradients before their own backward (``zero_grad`` first, as usual), or the
        generator's objective leaks into their update.
        """
        image_rec = self.reconstruct_image(image_common)
        text_rec = self.reconstruct_text(text_common)
        reconstruction = F.mse_loss(image_rec, image_features) + F.mse_loss(text_rec, text_features)
        adversarial_intra = _bce(self.image_discriminator(image_rec), 1.0) + _bce(self.text_discriminator(text_rec), 1.0)
        adversarial_inter = (_bce(self.modality_discriminator(image_common), 0.0)
                             + _bce(self.modality_discriminator(text_common), 1.0))
        total = (self.reconstruction_weight * reconstruction + self.intra_weight * adversarial_intra
                 + self.inter_weight * adversarial_inter)
        return {"reconstruction": reconstruction, "adversarial_intra": adversarial_intra,
                "adversarial_inter": adversarial_inter, "total": total}

    def discriminator_loss(self, image_features: torch.Tensor, text_features: torch.Tensor,
                           image_common: torch.Tensor, text_common: torch.Tensor) -> dict[str, torch.Tensor]:
        """The discriminators' objective; no gradient reaches the features, commons, encoders or decoders.

        The same commons as the generator step can be passed in: they are detached here. Call the
        discriminator optimiser's ``zero_grad`` before backpropagating this, since a preceding
        :meth:`generator_loss` backward leaves gradients on the discriminators.
        """
        image_common, text_common = image_common.detach(), text_common.detach()
        image_features, text_features = image_features.detach(), text_features.detach()
        # The reconstructions are inputs to the discriminators here, not something to improve.
        with torch.no_grad():
            image_rec = self.reconstruct_image(image_common)
            text_rec = self.reconstruct_text(text_common)
        intra = (_bce(self.image_discriminator(image_features), 1.0) + _bce(self.image_discriminator(image_rec), 0.0)
                 + _bce(self.text_discriminator(text_features), 1.0) + _bce(self.text_discriminator(text_rec), 0.0))
        inter = _bce(self.modality_discriminator(image_common), 1.0) + _bce(self.modality_discriminator(text_common), 0.0)
        return {"intra": intra, "inter": inter, "total": intra + inter}
