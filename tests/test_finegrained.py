"""CCL's losses, CRAN's and MCSM's pair scorers, and CM-GANs' shared heads: hand-computed values on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xmodal.training.finegrained import CRANScorer, MCSMScorer, RecurrentAttention, RelationAttention, local_alignment
from xmodal.training.losses import (
    AdaptiveBalance, CategoryLoss, CCLLoss, ContrastivePairLoss, ScorerLoss,
)


# --- CCL ------------------------------------------------------------------------------------

def test_contrastive_pair_loss_by_hand() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # distances: d00 = 0, d11 = √0.4 (same); d01 = √0.8, d10 = √2 (different)
    positive = (0.0 + 0.4) / 2
    negative = (max(0.0, 1 - math.sqrt(0.8)) ** 2 + max(0.0, 1 - math.sqrt(2)) ** 2) / 2
    assert ContrastivePairLoss(margin=1.0)(image, text).item() == pytest.approx(0.5 * (positive + negative), abs=1e-6)
    # With labels, pairs of one label are "same" too: both share label 7 → every pair pulled together.
    everything_same = (0.0 + 0.8 + 2.0 + 0.4) / 4
    assert ContrastivePairLoss()(image, text, torch.tensor([7, 7])).item() == pytest.approx(everything_same, abs=1e-6)


def test_category_loss_has_one_classifier_per_modality() -> None:
    loss = CategoryLoss(dim=4, num_categories=5)
    assert loss.image is not loss.text
    for layer in (loss.image, loss.text):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    # uniform logits: each cross-entropy is log 5
    value = loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 4]))
    assert value.item() == pytest.approx(2 * math.log(5), abs=1e-6)


def test_adaptive_balance_by_hand() -> None:
    balance = AdaptiveBalance(2)
    losses = [torch.tensor(3.0), torch.tensor(0.5)]
    assert balance(losses).item() == pytest.approx(3.5)  # every weight 1 at the start
    with torch.no_grad():
        balance.log_variance.copy_(torch.tensor([math.log(2.0), 0.0]))
    assert balance(losses).item() == pytest.approx(3.0 / 2 + math.log(2.0) + 0.5)
    # d/ds (exp(-s) L + s) = 1 - L/2 = -0.5 < 0 for L = 3 at s = log 2: descent raises s towards
    # log L, weighting the large loss down.
    gradient = torch.autograd.grad(balance(losses), balance.log_variance)[0]
    assert gradient[0].item() == pytest.approx(-0.5) and gradient[1].item() == pytest.approx(1 - 0.5)
    with pytest.raises(ValueError, match="expected 2 task losses"):
        balance([torch.tensor(1.0)])


def test_ccl_loss_is_the_balanced_sum_of_its_terms() -> None:
    torch.manual_seed(0)
    loss = CCLLoss(dim=4, category_sizes={"group": 3, "subgroup": 5}, margin=1.0)
    image, text = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    categories = {"group": torch.tensor([0, 1, 2, 0, 1, 2]), "subgroup": torch.tensor([0, 1, 2, 3, 4, 0])}
    expected = (ContrastivePairLoss(1.0)(image, text) + loss.categories["group"](image, text, categories["group"])
                + loss.categories["subgroup"](image, text, categories["subgroup"]))
    assert loss(image, text, categories).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("scorer_class, levels", [(MCSMScorer, ("fused", "image_space")), (CRANScorer, ("fused", "local"))])
def test_scorer_loss_ranks_each_match_against_the_first_stages_hardest(scorer_class, levels) -> None:
    torch.manual_seed(0)
    scorer = scorer_class(image_dim=6, text_dim=5, dim=4)
    image_side, text_side = scorer.image_side(fragment_features(4, 3, 6)), scorer.text_side(fragment_features(4, 3, 5, [3, 2, 1, 3]))
    first_stage = torch.tensor([[0.9, 0.1, 0.5, 0.2],
                                [0.3, 0.8, 0.1, 0.7],
                                [0.6, 0.2, 0.4, 0.0],
                                [0.1, 0.9, 0.3, 0.5]])  # image i (row) against text t (column)
    loss = ScorerLoss(levels, negatives=2)
    # text t's candidates: image t, then the 2 other images the first stage ranks highest for t
    assert ScorerLoss.candidates(first_stage.t(), 2).tolist() == [[0, 2, 1], [1, 3, 2], [2, 0, 3], [3, 1, 0]]
    assert ScorerLoss.candidates(first_stage, 2).tolist() == [[0, 2, 3], [1, 3, 0], [2, 0, 1], [3, 1, 2]]
    matrix = scorer.score(image_side, text_side, first_stage)  # CRAN's global level is the first stage's score
    scale = 1 / 0.07
    expected = 0.0
    for level in levels:
        t2i = torch.stack([matrix[level][[0, 2, 1], 0], matrix[level][[1, 3, 2], 1],
                           matrix[level][[2, 0, 3], 2], matrix[level][[3, 1, 0], 3]])
        i2t = torch.stack([matrix[level][0, [0, 2, 3]], matrix[level][1, [1, 3, 0]],
                           matrix[level][2, [2, 0, 1]], matrix[level][3, [3, 1, 2]]])
        targets = torch.zeros(4, dtype=torch.long)
        expected += 0.5 * (F.cross_entropy(scale * t2i, targets) + F.cross_entropy(scale * i2t, targets)).item()
    assert loss(scorer, image_side, text_side, first_stage).item() == pytest.approx(expected, rel=1e-5)


# --- CRAN -----------------------------------------------------------------------------------

def test_local_alignment_by_hand() -> None:
    words = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # one real word, one padding
    mask = torch.tensor([[1.0, 0.0]])
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    smooth = 2.0
    a0, a1 = math.exp(smooth) / (math.exp(smooth) + 1), 1 / (math.exp(smooth) + 1)
    # attended = a0·[1,0] + a1·[0,1]; cos([1,0], attended) = a0 / |(a0, a1)|
    expected = a0 / math.hypot(a0, a1)
    assert local_alignment(words, mask, patches, smooth).item() == pytest.approx(expected, abs=1e-6)
    assert local_alignment(words, mask, patches, smooth, pairwise=True).item() == pytest.approx(expected, abs=1e-6)


def test_local_alignment_equals_building_the_attended_vectors() -> None:
    torch.manual_seed(0)
    words = F.normalize(torch.randn(3, 5, 8), dim=-1)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] + [0.0] * 4])
    words = words * mask[..., None]
    patches = F.normalize(torch.randn(3, 4, 8), dim=-1)
    matrix = local_alignment(words, mask, patches, 9.0)
    assert matrix.shape == (3, 3)
    for i in range(3):  # image i
        for t in range(3):  # text t
            attention = (9.0 * words[t] @ patches[i].t()).softmax(dim=-1)
            per_word = F.cosine_similarity(words[t], attention @ patches[i], dim=-1)
            expected = (per_word * mask[t]).sum() / mask[t].sum()
            assert matrix[i, t].item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(local_alignment(words, mask, patches, 9.0, pairwise=True), matrix.diagonal())


def test_relation_attention_ignores_padding() -> None:
    torch.manual_seed(0)
    relation = RelationAttention(dim=6, hidden=5)
    fragments = F.normalize(torch.randn(1, 3, 6), dim=-1)
    padded = torch.cat([fragments, torch.zeros(1, 2, 6)], dim=1)
    short = relation(fragments, torch.ones(1, 3))
    long = relation(padded, torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(short, long, rtol=0, atol=1e-6)


def fragment_features(batch: int, length: int, dim: int, real: list[int] | None = None) -> dict[str, torch.Tensor]:
    fragments = torch.randn(batch, length, dim)
    features = {"pooled": fragments.mean(dim=1), "fragments": fragments}
    if real is not None:
        mask = (torch.arange(length)[None, :] < torch.tensor(real)[:, None]).to(torch.float32)[..., None]
        features["fragments"] = fragments * mask
        features["fragment_mask"] = mask
    return features


@pytest.mark.parametrize("scorer_class", [CRANScorer, MCSMScorer])
def test_scorer_matrix_and_pairwise_agree(scorer_class) -> None:
    torch.manual_seed(0)
    scorer = scorer_class(image_dim=10, text_dim=7, dim=8).eval()
    images = fragment_features(3, 4, 10)
    texts = fragment_features(2, 5, 7, real=[5, 2])
    image_side, text_side = scorer.image_side(images), scorer.text_side(texts)
    first_stage = torch.rand(3, 2)
    matrix = scorer.score(image_side, text_side, first_stage)
    assert matrix["fused"].shape == (3, 2)
    for i in range(3):
        for t in range(2):
            pair = scorer.score({k: v[i:i + 1] for k, v in image_side.items()}, {k: v[t:t + 1] for k, v in text_side.items()},
                                first_stage[i, t:t + 1], pairwise=True)
            for level, value in pair.items():
                assert value.shape == (1,)
                assert value.item() == pytest.approx(matrix[level][i, t].item(), abs=1e-5)


def test_cran_fuses_its_three_levels_with_learnt_weights() -> None:
    torch.manual_seed(0)
    scorer = CRANScorer(image_dim=6, text_dim=6, dim=4)
    image_side, text_side = scorer.image_side(fragment_features(2, 4, 6)), scorer.text_side(fragment_features(3, 3, 6, [3, 1, 2]))
    first_stage = torch.rand(2, 3)
    scores = scorer.score(image_side, text_side, first_stage)
    assert torch.equal(scores["global"], first_stage)
    # equal weights at the start
    torch.testing.assert_close(scores["fused"], (scores["global"] + scores["local"] + scores["relation"]) / 3)
    with torch.no_grad():
        scorer.level_logits.copy_(torch.tensor([0.0, math.log(2.0), -1e4]))
    scores = scorer.score(image_side, text_side, first_stage)
    torch.testing.assert_close(scores["fused"], (first_stage + 2 * scores["local"]) / 3)


# --- MCSM -----------------------------------------------------------------------------------

def test_recurrent_attention_ignores_right_padding() -> None:
    torch.manual_seed(0)
    attention = RecurrentAttention(in_dim=5, dim=4)
    sequence = torch.randn(1, 3, 5)
    padded = torch.cat([sequence, torch.zeros(1, 4, 5)], dim=1)
    short = attention(sequence, torch.ones(1, 3))
    long = attention(padded, torch.tensor([[1.0] * 3 + [0.0] * 4]))
    torch.testing.assert_close(short, long, rtol=0, atol=1e-6)


def test_mcsm_fusion_weight_is_computed_per_pair() -> None:
    torch.manual_seed(0)
    scorer = MCSMScorer(image_dim=6, text_dim=5, dim=4, hidden=8)
    image_side, text_side = scorer.image_side(fragment_features(2, 4, 6)), scorer.text_side(fragment_features(3, 3, 5, [3, 1, 2]))
    scores = scorer.score(image_side, text_side)
    torch.testing.assert_close(scores["fused"], (scores["image_space"] + scores["text_space"]) / 2)  # α = 0.5 at the start
    with torch.no_grad():
        scorer.gate.weight.copy_(torch.tensor([[4.0, -4.0]]))
    scores = scorer.score(image_side, text_side)
    alpha = torch.sigmoid(4 * scores["image_space"] - 4 * scores["text_space"])
    torch.testing.assert_close(scores["fused"], alpha * scores["image_space"] + (1 - alpha) * scores["text_space"])
    # where the image space matches better, it gets the larger weight
    assert ((alpha > 0.5) == (scores["image_space"] > scores["text_space"])).all()


# --- the models -----------------------------------------------------------------------------

def tiny_config(recipe: str) -> dict:
    from xmodal.training.recipes import recipe_config

    return {**recipe_config(recipe, image_encoder="small_cnn", text_encoder="small_text_cnn", dim=8, head_hidden=16),
            "vocab_size": 20}


def test_cmgans_heads_share_their_last_layer_and_save_it_once() -> None:
    from xmodal.training.models import DualEncoder

    model = DualEncoder(tiny_config("cmgans"))
    shared = model.shared_heads["global"]
    assert model.image.heads["global"].shared_heads is shared and model.text.heads["global"].shared_heads is shared
    keys = list(model.state_dict())
    assert any(key.startswith("shared_heads.global.shared.") for key in keys)
    assert not any(key.startswith(("image.heads.", "text.heads.")) for key in keys)
    with torch.no_grad():
        shared.shared.weight.zero_()
        shared.shared.bias.fill_(1.0)
    # a zero shared layer maps both modalities onto its bias: the one point (1, …, 1)/√8
    ones = torch.full((1, 8), 1 / math.sqrt(8))
    torch.testing.assert_close(model.image.heads["global"](torch.randn(1, 256)), ones)
    torch.testing.assert_close(model.text.heads["global"](torch.randn(1, 256)), ones)


@pytest.mark.parametrize("recipe, kind", [("cran", CRANScorer), ("mcsm", MCSMScorer)])
def test_scorer_recipes_build_their_scorer(recipe: str, kind) -> None:
    from xmodal.training.models import DualEncoder, needs_fragments

    config = tiny_config(recipe)
    assert needs_fragments(config)
    assert isinstance(DualEncoder(config).scorer, kind)


def test_ccl_fragment_level_is_the_mean_of_projected_fragments() -> None:
    from xmodal.training.models import DualEncoder

    torch.manual_seed(0)
    model = DualEncoder(tiny_config("ccl")).eval()
    ids = torch.tensor([[3, 4, 5, 0, 0]])
    features = model.text.backbone(ids)
    embedded = model.text.project(features)
    per_token = model.text.heads["fragment"](features["fragments"][:, :3])
    torch.testing.assert_close(embedded["fragment"], F.normalize(per_token.mean(dim=1), dim=-1))
