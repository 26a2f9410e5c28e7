"""ExtreMA: Extreme Masking for Learning Instance and Distributed Visual Representations.

Wu et al., 2022 (https://arxiv.org/abs/2206.04667); official code https://github.com/microsoft/ExtreMA.

ExtreMA is BYOL where the augmentation is random token masking:

    teacher (momentum ViT) ── full image ────────────────> class token ─> projector ──────────────> z   (target)
    student (ViT)          ── 10-25% of the patches, ───> class token ─> projector ─> predictor ─> p   (prediction)
                              several disjoint masks
    loss = mean over masks and images of || p/|p| - z/|z| ||^2      (asymmetric: only the student gets gradients)
    teacher <- m * teacher + (1 - m) * student                      (after each optimizer step)

The backbone (`ExtremaModel`) is a plain ViT over the patch tokens (the distributed representation), with a FIXED
2-D sin-cos position table and no class token at the input, followed by CaiT class-attention blocks
(Touvron et al., 2021) in which a class token attends over the patch tokens without changing them. The class token
after the final LayerNorm is the instance representation. Appending the class token late is what makes training
stable under extreme masking (paper, appendix A).

Reading order: outputs, embeddings (with the masking gather), attention, MLP, layers, encoder, the bare model, the
BYOL heads and losses, then the pre-training and classification heads. This file is shipped as remote code, so it
imports only torch, transformers and its configuration.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
    PreTrainedModel,
    UperNetForSemanticSegmentation,
)
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple

try:  # transformers >= 5.2 moved the backbone helpers out of `utils`
    from transformers.backbone_utils import BackboneMixin
except ImportError:
    from transformers.utils.backbone_utils import BackboneMixin

try:  # loaded as remote code (a package made by transformers) or from this repository (a top-level module)
    from .configuration_extrema import ExtremaConfig, ExtremaUperNetConfig
except ImportError:
    from configuration_extrema import ExtremaConfig, ExtremaUperNetConfig


@dataclass
class ExtremaModelOutput(BaseModelOutputWithPooling):
    """
    Output of [`ExtremaModel`]: `BaseModelOutputWithPooling` (class token in `pooler_output`, self-attention maps
    (B, H, N, N) in `attentions`) plus the class-attention maps.

    Args:
        class_attentions (`tuple(torch.FloatTensor)`, one per class-attention layer, of shape
            `(batch_size, num_heads, 1, 1 + num_patches)`): how the class token attends over [cls; patch tokens].
    """

    class_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ExtremaImageClassifierOutput(ImageClassifierOutput):
    """Output of [`ExtremaForImageClassification`]: `ImageClassifierOutput` plus the class-attention maps (see
    [`ExtremaModelOutput`])."""

    class_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ExtremaForPreTrainingOutput(ModelOutput):
    """
    Output of [`ExtremaForPreTraining`].

    Every per-image field is image-major: row i belongs to image i of the batch (its masked views follow each other
    where a field has one row per view).

    Args:
        loss (`torch.FloatTensor` of shape `()`): the BYOL (or InfoNCE) loss averaged over masks.
        predictions (`torch.FloatTensor` of shape `(batch_size, num_masks, projection_dim)`): the student's
            predictions, one per masked view of every image.
        targets (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): the teacher's projections (after
            `config.target_centering`), the regression targets.
        ids_keep (`torch.LongTensor` of shape `(num_masks, batch_size, num_visible)`): visible patch indices, in the
            layout the `ids_keep` input takes.
        student_pooler_output (`torch.FloatTensor` of shape `(batch_size, num_masks, hidden_size)`): the student's
            instance representations of the masked views.
        teacher_pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`): the teacher's instance
            representations of the full views.
        hidden_states (`tuple(torch.FloatTensor)`, with `output_hidden_states=True`): the student's visible patch
            tokens after the embeddings and after every self-attention layer, each
            `(batch_size * num_masks, num_visible, hidden_size)`: the views of image i are rows i*M .. i*M + M-1.
        attentions (`tuple(torch.FloatTensor)`, with `output_attentions=True`): the student's self-attention maps,
            one per layer, each `(batch_size * num_masks, num_heads, num_visible, num_visible)`, rows as above.
        class_attentions (`tuple(torch.FloatTensor)`, with `output_attentions=True`): the student's class-attention
            maps, one per class-attention layer, each `(batch_size * num_masks, num_heads, 1, 1 + num_visible)`.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    targets: torch.FloatTensor | None = None
    ids_keep: torch.LongTensor | None = None
    student_pooler_output: torch.FloatTensor | None = None
    teacher_pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    class_attentions: tuple[torch.FloatTensor, ...] | None = None


def sincos_position_embedding(hidden_size: int, grid_size: int) -> torch.Tensor:
    """The 2-D sin-cos position table of MAE / ExtreMA, shape (1, grid_size**2, hidden_size), patches row-major.

    The first half of the channels encodes the column, the second half the row, each as [sin(pos * w), cos(pos * w)]
    with w = 10000^(-k / (D/4)), k < D/4. Computed in float64 like the official numpy code.
    """
    omega = 1.0 / 10000 ** (torch.arange(hidden_size // 4, dtype=torch.float64) / (hidden_size / 4))
    angles = torch.outer(torch.arange(grid_size, dtype=torch.float64), omega)  # (G, D/4)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (G, D/2)
    cols = axis[None, :, :].expand(grid_size, -1, -1)  # (G, G, D/2): depends on the column
    rows = axis[:, None, :].expand(-1, grid_size, -1)  # (G, G, D/2): depends on the row
    return torch.cat([cols, rows], dim=-1).reshape(1, grid_size * grid_size, hidden_size).float()


class ExtremaPatchEmbeddings(nn.Module):
    """Non-overlapping patches to vectors with one strided convolution: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, config: ExtremaConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_size = config.patch_size
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected pixel_values of shape (batch, {self.num_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}; convert grayscale/RGBA images to RGB (an image processor does this)."
            )
        height, width = pixel_values.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the patch size {self.patch_size}; resize or crop it."
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


class ExtremaEmbeddings(nn.Module):
    """Patch embedding + position table, then (for the student) the visible patches of every mask.

    The position table is the fixed sin-cos table (not trained; a buffer so that checkpoints carry it exactly). No
    class token is added here: it is appended after the self-attention blocks (CaiT style).
    """

    def __init__(self, config: ExtremaConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = ExtremaPatchEmbeddings(config)
        self.grid_size = config.image_size // config.patch_size
        self.register_buffer(
            "position_embeddings", sincos_position_embedding(config.hidden_size, self.grid_size), persistent=True
        )

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """The position table resampled (bicubic, as in ViT / DINOv2) to a (height, width) image: (1, h*w, D)."""
        grid_h, grid_w = height // self.config.patch_size, width // self.config.patch_size
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return self.position_embeddings
        table = self.position_embeddings.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(self.position_embeddings.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        ids_keep: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
    ) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if (height, width) != (self.config.image_size,) * 2 and interpolate_pos_encoding is False:
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model ({self.config.image_size}x"
                f"{self.config.image_size}); pass interpolate_pos_encoding=True (or None) to interpolate positions."
            )
        embeddings = self.patch_embeddings(pixel_values)  # (B, N, D)
        embeddings = embeddings + self.interpolate_pos_encoding(height, width).to(embeddings.dtype)
        if ids_keep is None:
            return embeddings

        # The image is embedded once; each mask then gathers its visible tokens by index (no per-mask copy of the
        # image), so all masked views of the batch go through the encoder as one (B * num_masks, K, D) batch.
        ids_keep = check_ids_keep(ids_keep, batch_size=embeddings.shape[0], num_patches=embeddings.shape[1])
        num_masks, batch_size, _ = ids_keep.shape
        # Gathered image-major, (B, M, K, D) -> (B * M, K, D): the views of image i are rows i*M .. i*M + M-1, so that
        # row blocks follow the batch as in every other output (a batch of one image gives that image's rows)
        batch_index = torch.arange(batch_size, device=embeddings.device).view(batch_size, 1, 1)
        embeddings = embeddings[batch_index, ids_keep.transpose(0, 1)]  # (B, M, K, D)
        return embeddings.flatten(0, 1)


def check_ids_keep(ids_keep: torch.Tensor, batch_size: int, num_patches: int) -> torch.LongTensor:
    """Validate visible-patch indices of shape (B, K) or (num_masks, B, K); returns them as (num_masks, B, K)."""
    if ids_keep.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids_keep must hold integer patch indices, got dtype {ids_keep.dtype}.")
    if ids_keep.ndim == 2:
        ids_keep = ids_keep.unsqueeze(0)
    if ids_keep.ndim != 3 or ids_keep.shape[1] != batch_size:
        raise ValueError(
            f"ids_keep must have shape (batch={batch_size}, visible) or (num_masks, {batch_size}, visible), "
            f"got {tuple(ids_keep.shape)}."
        )
    # The range check reads the indices back to the host: free on the CPU, but on a GPU it would stall the device
    # every step, and it would break torch.compile graphs; there, an out-of-range index fails in the gather instead.
    check_range = ids_keep.device.type == "cpu" and not torch.compiler.is_compiling()
    if check_range and ids_keep.numel() and (int(ids_keep.min()) < 0 or int(ids_keep.max()) >= num_patches):
        raise ValueError(
            f"ids_keep indexes patches in [{int(ids_keep.min())}, {int(ids_keep.max())}] but the image has "
            f"{num_patches} patches (valid indices 0..{num_patches - 1}, row-major)."
        )
    return ids_keep.long()


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention written out, for `output_attentions`. query (B, H, Tq, d); key/value (B, H, Tk, d)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, Tq, H, d)
    return attn_output, attn_weights


class ExtremaAttention(nn.Module):
    """What the two attention modules share: the head layout and the dispatch to an attention kernel."""

    def __init__(self, config: ExtremaConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_probs_dropout_prob
        self.is_causal = False  # the sdpa integration assumes causal attention unless told otherwise

    def attend(self, query, key, value, output_attentions: bool = False):
        """Softmax attention of query (B, H, Tq, d) over key/value (B, H, Tk, d): ((B, Tq, H, d), weights or None).

        sdpa (or another registered kernel) unless attention maps are requested: only eager returns them.
        `set_attn_implementation` switches kernels only where transformers finds this dispatch in the file's source:
        5.0 looks for the indexing form, later 5.x (which add `get_interface`) for the `get_interface(` call.
        """
        attention = eager_attention_forward
        if not output_attentions and self.config._attn_implementation not in (None, "eager"):
            if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
                attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, attention)
            else:  # transformers 5.0
                attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        dropout = self.dropout if self.training else 0.0
        return attention(self, query, key, value, None, scaling=self.scaling, dropout=dropout)


class ExtremaSelfAttention(ExtremaAttention):
    """Multi-head self-attention over the patch tokens, with a fused qkv projection (the official layout)."""

    def __init__(self, config: ExtremaConfig):
        super().__init__(config)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        batch_size, seq_len, hidden_size = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, d)
        attn_output, attn_weights = self.attend(query, key, value, output_attentions)
        attn_output = attn_output.reshape(batch_size, seq_len, hidden_size)  # (B, T, H, d) -> (B, T, D)
        return self.proj(attn_output), attn_weights


class ExtremaClassAttention(ExtremaAttention):
    """CaiT class attention: only the class token queries; keys and values come from [cls; patch tokens]."""

    def __init__(self, config: ExtremaConfig):
        super().__init__(config)
        self.q = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        # hidden_states: (B, 1 + N, D), the normalised [cls; patches]
        batch_size, seq_len, hidden_size = hidden_states.shape
        query = self.q(hidden_states[:, :1]).view(batch_size, 1, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k(hidden_states).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v(hidden_states).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        attn_output, attn_weights = self.attend(query, key, value, output_attentions)  # (B, 1, H, d), (B, H, 1, 1 + N)
        return self.proj(attn_output.reshape(batch_size, 1, hidden_size)), attn_weights


class ExtremaMLP(nn.Module):
    def __init__(self, config: ExtremaConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch of whole samples, rescaling the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * mask / keep_prob


class ExtremaLayer(GradientCheckpointingLayer):
    """Pre-norm ViT block (no layer scale, as in the official backbone)."""

    def __init__(self, config: ExtremaConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ExtremaSelfAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ExtremaMLP(config)
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        attn_output, attn_weights = self.attention(self.layernorm_before(hidden_states), output_attentions)
        hidden_states = hidden_states + drop_path(attn_output, self.drop_path_rate, self.training)
        mlp_output = self.mlp(self.layernorm_after(hidden_states))
        hidden_states = hidden_states + drop_path(mlp_output, self.drop_path_rate, self.training)
        return hidden_states, attn_weights


class ExtremaClassAttentionLayer(nn.Module):
    """CaiT `LayerScaleBlockClassAttn`: updates only the class token; the patch tokens pass through unchanged."""

    def __init__(self, config: ExtremaConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ExtremaClassAttention(config)
        self.layer_scale_1 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init_value))
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ExtremaMLP(config)
        self.layer_scale_2 = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init_value))

    def forward(self, patch_tokens: torch.Tensor, cls_token: torch.Tensor, output_attentions: bool = False):
        tokens = torch.cat([cls_token, patch_tokens], dim=1)  # (B, 1 + N, D)
        attn_output, attn_weights = self.attention(self.layernorm_before(tokens), output_attentions)
        cls_token = cls_token + self.layer_scale_1 * attn_output  # (B, 1, D)
        cls_token = cls_token + self.layer_scale_2 * self.mlp(self.layernorm_after(cls_token))
        return cls_token, attn_weights


class ExtremaEncoder(nn.Module):
    """Self-attention blocks over the patch tokens, then class-attention blocks that build the class token.

    Built with `add_class_attention=False` (the dense backbone) it holds only the self-attention blocks and returns the
    patch tokens (B, N, D); otherwise [cls; patch tokens] (B, 1 + N, D).
    """

    def __init__(self, config: ExtremaConfig, add_class_attention: bool = True):
        super().__init__()
        # stochastic depth grows linearly with depth; the class-attention blocks have none (as in the official code)
        # (on the CPU: transformers 5.0 builds models under a meta default device, where .item() fails)
        rates = [x.item() for x in torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu")]
        self.layer = nn.ModuleList([ExtremaLayer(config, rate) for rate in rates])
        if add_class_attention:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
            self.class_attention_layer = nn.ModuleList(
                [ExtremaClassAttentionLayer(config) for _ in range(config.num_class_attention_layers)]
            )
        else:
            self.class_attention_layer = None

    def forward(self, hidden_states: torch.Tensor, output_attentions=False, output_hidden_states=False):
        """Returns (tokens, hidden_states, attentions, class_attentions); the last three are tuples or None.

        Self-attention maps (B, H, N, N) and class-attention maps (B, H, 1, 1 + N) are kept apart, as encoder-decoder
        models keep `cross_attentions` apart from `attentions`: code that walks `attentions` (attention rollout,
        stacking) finds one map of one shape per hidden layer.
        """
        # Collected by hand, not by transformers' output recording (`_can_record_outputs`): transformers 5.0 records
        # through `check_model_inputs`, later 5.x through `capture_outputs` (and `check_model_inputs` no longer
        # records), and this remote code must load on every 5.x.
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            hidden_states, attn_weights = layer(hidden_states, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        if self.class_attention_layer is None:
            return hidden_states, all_hidden_states, all_attentions, None

        all_class_attentions = () if output_attentions else None
        cls_token = self.cls_token.expand(hidden_states.shape[0], -1, -1)  # (B, 1, D)
        for layer in self.class_attention_layer:
            cls_token, attn_weights = layer(hidden_states, cls_token, output_attentions)
            if output_attentions:
                all_class_attentions += (attn_weights,)
        tokens = torch.cat([cls_token, hidden_states], dim=1)  # (B, 1 + N, D)
        return tokens, all_hidden_states, all_attentions, all_class_attentions


AUTO_MAP = {
    "AutoConfig": "configuration_extrema.ExtremaConfig",
    "AutoModel": "modeling_extrema.ExtremaModel",
    "AutoModelForPreTraining": "modeling_extrema.ExtremaForPreTraining",
    "AutoModelForImageClassification": "modeling_extrema.ExtremaForImageClassification",
    "AutoBackbone": "modeling_extrema.ExtremaBackbone",
}


class ExtremaPreTrainedModel(PreTrainedModel):
    config_class = ExtremaConfig
    config: ExtremaConfig
    base_model_prefix = "extrema"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ExtremaEmbeddings", "ExtremaLayer", "ExtremaClassAttentionLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    # Loading a pre-training folder: its teacher becomes this model's backbone (what the export keeps; the key mapping
    # renames `teacher.` to `_teacher_prefix`), its student and BYOL heads are dropped on purpose.
    _teacher_prefix = ""
    _keys_to_ignore_on_load_unexpected = [
        r"^student\.",
        r"^(student|teacher)_projector\.",
        r"^predictor\.",
        r"^target_center$",
    ]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, across the ExtreMA classes: a folder saved by any of them loads into any
        other whose backbone it holds (a pre-training folder gives its teacher), and one that does not hold the
        backbone (a backbone folder has no class-attention blocks) stops with a `ValueError` saying what to load
        instead: never a model whose backbone is silently random."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        key_mapping = dict(kwargs.pop("key_mapping", None) or {})
        if cls._teacher_prefix is not None:
            key_mapping.setdefault(r"^teacher\.", cls._teacher_prefix)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                key_mapping=key_mapping or None,
                output_loading_info=True,
                **kwargs,
            )
        except Exception as error:  # safetensors' error, by name: this file imports only torch and transformers
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(
                f"The weights of {pretrained_model_name_or_path} cannot be read ({error}): its model.safetensors is "
                "truncated or corrupt; download or export it again."
            ) from error
        info["missing_keys"] = model._finish_loading(set(info["missing_keys"]), pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model

    def _finish_loading(self, missing_keys: set[str], source) -> set[str]:
        """Called after loading with the keys the checkpoint lacked: raises when any backbone weight is among them
        (heads may start fresh: a classifier on a backbone folder). Returns the missing keys."""
        # Only folders of another ExtreMA class are checked: a folder of this class missing weights is transformers'
        # case (it warns), and one without `architectures` (not saved by save_pretrained) cannot be told apart.
        saved_by = (getattr(self.config, "architectures", None) or [type(self).__name__])[0]
        parameters = dict(self.named_parameters())
        head_prefixes = ("fc_norm.", "classifier.", "student_projector.", "teacher_projector.", "predictor.")
        missing = sorted(key for key in missing_keys if key in parameters and not key.startswith(head_prefixes))
        if missing and saved_by != type(self).__name__:
            if saved_by == "ExtremaBackbone":
                hint = "a backbone folder has no class-attention blocks; load it with AutoBackbone"
            elif isinstance(self, ExtremaForPreTraining):
                hint = "pre-training needs a pre-training folder or a backbone saved by ExtremaModel"
            else:
                hint = "load it with the class that saved it"
            raise ValueError(
                f"{source} holds no weights for {len(missing)} backbone parameters of {type(self).__name__} "
                f"(e.g. {missing[0]}): it was saved by {saved_by}; {hint}."
            )
        return missing_keys

    def post_init(self):
        super().post_init()
        # Every saved folder maps all the Auto classes to this file, so that a folder saved by one class opens as any
        # other (AutoBackbone on a pre-trained model, ...) with trust_remote_code=True where this project is not
        # installed. Entries the config already has (a Hub repo's) win.
        self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}

    @torch.no_grad()
    def _init_weights(self, module):
        """The official init: xavier-uniform linears (JAX ViT), patch embedding as a linear, class token N(0, 0.02).

        Every branch keys on the module that owns the parameters, so that transformers can skip modules whose
        weights were loaded from a checkpoint.
        """
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # xavier-uniform of the weight as a (out, in * k * k) matrix, its bound written out: initialising a view
            # of the weight would escape transformers 5.0's guard and overwrite weights loaded by from_pretrained
            fan_in, fan_out = module.weight[0].numel(), module.weight.shape[0]
            bound = math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out))
            nn.init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ExtremaEmbeddings):
            if not getattr(module.position_embeddings, "_is_hf_initialized", False):
                module.position_embeddings.copy_(sincos_position_embedding(self.config.hidden_size, module.grid_size))
        elif isinstance(module, ExtremaEncoder) and module.class_attention_layer is not None:
            nn.init.normal_(module.cls_token, std=self.config.initializer_range)
        elif isinstance(module, ExtremaClassAttentionLayer):
            nn.init.constant_(module.layer_scale_1, self.config.layer_scale_init_value)
            nn.init.constant_(module.layer_scale_2, self.config.layer_scale_init_value)
        else:
            super()._init_weights(module)


class ExtremaModel(ExtremaPreTrainedModel):
    """The ExtreMA backbone: patch tokens (distributed representation) and class token (instance representation).

    `last_hidden_state` is (B, 1 + N, D) after the final LayerNorm: index 0 is the class token, 1.. the patch tokens;
    `pooler_output` is the class token. With `ids_keep` (B, K) only the K listed patches are encoded; with
    `ids_keep` (num_masks, B, K) every image is encoded once per mask and the outputs are stacked image-major
    (B * num_masks, 1 + K, D): the views of image i are rows i*M .. i*M + M-1. `attentions` holds one (B, H, N, N)
    map per self-attention layer, `class_attentions` one (B, H, 1, 1 + N) map per class-attention layer;
    `hidden_states` the (B, N, D) patch tokens after the embeddings and after every self-attention layer.
    """

    def __init__(self, config: ExtremaConfig):
        super().__init__(config)
        self.config = config
        self.embeddings = ExtremaEmbeddings(config)
        self.encoder = ExtremaEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> ExtremaPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @can_return_tuple  # return_dict=False (or config.return_dict=False): the output's non-None fields as a tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        ids_keep: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> ExtremaModelOutput:
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        embeddings = self.embeddings(pixel_values, ids_keep, interpolate_pos_encoding)  # (B', K, D)
        tokens, hidden_states, attentions, class_attentions = self.encoder(
            embeddings, output_attentions, output_hidden_states
        )
        sequence_output = self.layernorm(tokens)  # (B', 1 + K, D)
        pooled_output = sequence_output[:, 0]
        return ExtremaModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=hidden_states,
            attentions=attentions,
            class_attentions=class_attentions,
        )


class ExtremaBackbone(BackboneMixin, ExtremaPreTrainedModel):
    """The ViT blocks of the backbone as feature maps for dense heads (UperNet, Mask R-CNN, DPT).

    `feature_maps` holds, for every stage of `config.out_features` (`"stem"`: the patch embeddings, `"stageI"`: the
    output of self-attention block I), its patch tokens after the final LayerNorm, laid out as an image
    (B, D, H / patch_size, W / patch_size). Any input size whose sides are multiples of the patch size works: the
    position table is interpolated. The class-attention blocks are not part of it (they never change the patch
    tokens), so a backbone loads from the weights of an [`ExtremaModel`] without them.
    """

    # an ExtremaModel's class-attention weights have no place here; loading them into a backbone drops them on purpose
    _keys_to_ignore_on_load_unexpected = ExtremaPreTrainedModel._keys_to_ignore_on_load_unexpected + [
        r"encoder\.cls_token",
        r"encoder\.class_attention_layer\.",
    ]

    def __init__(self, config: ExtremaConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * len(config.stage_names)
        self.embeddings = ExtremaEmbeddings(config)
        self.encoder = ExtremaEncoder(config, add_class_attention=False)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> ExtremaPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        batch_size, _, height, width = pixel_values.shape
        grid_height, grid_width = height // self.config.patch_size, width // self.config.patch_size
        embeddings = self.embeddings(pixel_values)  # (B, N, D), positions interpolated to the input size
        _, hidden_states, attentions, _ = self.encoder(embeddings, output_attentions, output_hidden_states=True)
        feature_maps = tuple(
            self.layernorm(hidden_states[index]).transpose(1, 2).reshape(batch_size, -1, grid_height, grid_width)
            for index in self.out_indices
        )  # each (B, N, D) -> (B, D, h, w), patches row-major
        return BackboneOutput(
            feature_maps=feature_maps,
            hidden_states=hidden_states if output_hidden_states else None,
            attentions=attentions,
        )


def build_mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, norm: str = "layernorm"):
    """BYOL head: (Linear-Norm-GELU) x (n-1), then Linear. `norm` is LayerNorm (official) or BatchNorm (BYOL)."""
    norm_layer = nn.LayerNorm if norm == "layernorm" else nn.BatchNorm1d
    layers = []
    for i in range(num_layers):
        layers.append(nn.Linear(input_dim if i == 0 else hidden_dim, output_dim if i == num_layers - 1 else hidden_dim))
        if i < num_layers - 1:
            layers += [norm_layer(hidden_dim), nn.GELU()]
    return nn.Sequential(*layers)


def byol_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over images and masks of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z); predictions (B, M, P), targets (B, P).
    Computed in float32."""
    p = F.normalize(predictions.float(), dim=-1)  # (B, M, P)
    z = F.normalize(targets.float(), dim=-1).unsqueeze(1)  # (B, 1, P), shared by all masks of an image
    return (p - z).pow(2).sum(dim=-1).mean()


def infonce_loss(predictions: torch.Tensor, targets: torch.Tensor, temperature: float):
    """InfoNCE (MoCo v3 form, scaled by 2T) whose negatives are the targets of every process; predictions (B, M, P),
    targets (B, P)."""
    p = F.normalize(predictions.float(), dim=-1)  # (B, M, P)
    z = F.normalize(targets.float(), dim=-1)  # (B, P)
    batch_size, rank = z.shape[0], 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        gathered = [torch.empty_like(z) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, z.contiguous())  # targets carry no gradient
        z = torch.cat(gathered)  # (world * B, P)
    logits = torch.einsum("bmp,np->bmn", p, z) / temperature  # (B, M, world * B)
    labels = torch.arange(batch_size, device=z.device) + rank * batch_size  # image i's target is row i + rank * B
    labels = labels.unsqueeze(1).expand(-1, p.shape[1])  # (B, M)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten()) * (2 * temperature)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all processes (itself when not distributed). No gradient flows through it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        tensor /= torch.distributed.get_world_size()
    return tensor


@torch.no_grad()
def collapse_statistics(vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """How collapsed a batch of representations (B, P) is, on the unit sphere.

    `mean_cosine`: the mean cosine similarity of distinct pairs (0 for directions spread over the sphere, 1 for one
    shared direction). `std`: the per-dimension std of the L2-normalised vectors times sqrt(P) (SimSiam's measure:
    ~1 when spread over all dimensions, 0 when collapsed to a point). Both stay on the device (no sync).
    """
    z = F.normalize(vectors.float(), dim=-1)
    n, dim = z.shape
    pair_sum = z.sum(dim=0).pow(2).sum() - n  # sum of cos over ordered distinct pairs: |sum z|^2 - sum |z|^2
    return {"mean_cosine": pair_sum / max(n * (n - 1), 1), "std": z.std(dim=0).mean() * dim**0.5}


class ExtremaForPreTraining(ExtremaPreTrainedModel):
    """ExtreMA pre-training: student and momentum teacher backbones with BYOL heads.

    Call `update_teacher(momentum)` after every optimizer step (not inside `forward`, so that gradient accumulation
    does not move the teacher several times per step).
    """

    # The backbone a pre-training model hands on is the teacher (what the export saves): `base_model` is the teacher,
    # and a backbone folder loads into it (and is copied into the student, see `_finish_loading`).
    base_model_prefix = "teacher"
    _teacher_prefix = None  # its own folders keep their keys
    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: ExtremaConfig):
        super().__init__(config)
        self.student = ExtremaModel(config)
        self.teacher = ExtremaModel(config)
        hidden, proj, norm = config.hidden_size, config.projection_dim, config.head_norm
        self.student_projector = build_mlp(3, hidden, config.projector_hidden_size, proj, norm)
        self.teacher_projector = build_mlp(3, hidden, config.projector_hidden_size, proj, norm)
        self.predictor = build_mlp(2, proj, config.predictor_hidden_size, proj, norm)
        if config.target_centering == "ema":
            # DINO's centre: a running mean of the teacher's projections, subtracted from them before the loss
            self.register_buffer("target_center", torch.zeros(1, proj))
        self.post_init()
        self.reset_teacher()

    def _student_and_teacher_parameters(self):
        student = [*self.student.parameters(), *self.student_projector.parameters()]
        teacher = [*self.teacher.parameters(), *self.teacher_projector.parameters()]
        return student, teacher

    @torch.no_grad()
    def reset_teacher(self):
        """Make the teacher an exact copy of the student (done at initialisation)."""
        student, teacher = self._student_and_teacher_parameters()
        torch._foreach_copy_(teacher, student)
        self.freeze_teacher()

    def freeze_teacher(self):
        """The teacher learns only through `update_teacher`: no gradients, and no place in an optimizer."""
        for parameter in self._student_and_teacher_parameters()[1]:
            parameter.requires_grad_(False)

    def get_input_embeddings(self) -> ExtremaPatchEmbeddings:
        return self.student.embeddings.patch_embeddings  # the student is the network that learns from the input

    def _finish_loading(self, missing_keys: set[str], source) -> set[str]:
        # A backbone folder filled the teacher (base_model_prefix): the student starts as its copy, and the teacher's
        # projector as the student's fresh one, as `reset_teacher` starts them at initialisation.
        if any(key.startswith("student.") for key in missing_keys) and not any(
            key.startswith("teacher.") for key in missing_keys
        ):
            with torch.no_grad():
                torch._foreach_copy_(list(self.student.parameters()), list(self.teacher.parameters()))
                torch._foreach_copy_(list(self.student.buffers()), list(self.teacher.buffers()))
                if any(key.startswith("teacher_projector.") for key in missing_keys):
                    torch._foreach_copy_(
                        list(self.teacher_projector.parameters()), list(self.student_projector.parameters())
                    )
            missing_keys = {key for key in missing_keys if not key.startswith("student.")}
        missing_keys = super()._finish_loading(missing_keys, source)
        # loading materialises fresh parameters (requires_grad=True), so the teacher is frozen again
        self.freeze_teacher()
        return missing_keys

    @torch.no_grad()
    def update_teacher(self, momentum: float):
        """EMA step θ_t ← m·θ_t + (1 − m)·θ_s over backbone and projector, as one fused foreach op."""
        student, teacher = self._student_and_teacher_parameters()
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)

    @staticmethod
    def teacher_momentum(step: int, total_steps: int, base_momentum: float) -> float:
        """The momentum m of `update_teacher` at optimizer step `step` of `total_steps`: from base_momentum (the paper:
        0.996) up to 1 on a half-cycle cosine (BYOL), so the teacher averages over ever more steps and ends fixed."""
        return 1.0 - (1.0 - base_momentum) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total_steps)))

    def train(self, mode: bool = True):
        # The teacher is an inference-only network: no drop path or dropout whatever the student does.
        super().train(mode)
        self.teacher.train(False)
        return self

    def random_masking(
        self, batch_size: int, num_patches: int, device=None, noise: torch.Tensor | None = None
    ) -> torch.LongTensor:
        """Sample `num_masks` masks per image of `num_patches` patches; returns visible patch indices (num_masks, B, K).

        The config owns the masking: K is `config.num_visible_patches`, an image's noise has the shape
        `config.mask_noise_shape`, and its validation checks that disjoint masks fit in the image. Disjoint masks are
        consecutive slices of ONE random permutation of an image's patches, so the masks of an image never share a
        patch (complementary views); otherwise every mask has its own permutation. `noise` (B, *mask_noise_shape),
        batch-major as the data pipeline batches it, fixes the permutations (argsort of the noise).
        """
        config = self.config
        if num_patches != config.num_patches:
            raise ValueError(
                f"Random masks are drawn for the config's {config.num_patches} patches (image_size "
                f"{config.image_size}), but the images have {num_patches}; resize them or pass ids_keep."
            )
        noise_shape = (batch_size, *config.mask_noise_shape)
        if noise is None:
            noise = torch.rand(noise_shape, device=device)
        elif tuple(noise.shape) != noise_shape:
            raise ValueError(f"noise must have shape {noise_shape}, got {tuple(noise.shape)}.")
        num_masks, num_visible = config.num_masks, config.num_visible_patches
        ids_shuffle = torch.argsort(noise, dim=-1)  # (B, N), or (B, M, N)
        if config.disjoint_masks:
            # (B, M * K) -> (B, M, K): mask i takes positions [i*K, (i+1)*K) of the image's permutation
            ids_keep = ids_shuffle[:, : num_masks * num_visible].view(batch_size, num_masks, num_visible)
        else:
            ids_keep = ids_shuffle[..., :num_visible]  # (B, M, K)
        return ids_keep.transpose(0, 1)  # (M, B, K), the layout of the ids_keep input

    @torch.no_grad()
    def center_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Subtract the batch mean (or its running mean) of the teacher's projections: (B, P) -> (B, P).

        Without negatives, nothing in the BYOL loss stops every target from drifting toward one shared direction; a
        constant target is then the cheapest thing to predict. Removing the mean that all targets share leaves only
        what tells the images apart to regress (DINO centres its teacher for the same reason).
        """
        if self.config.target_centering == "none":
            return targets
        batch_mean = all_reduce_mean(targets.float().mean(dim=0, keepdim=True))  # (1, P), over every process
        if self.config.target_centering == "batch":
            return targets - batch_mean.to(targets.dtype)
        centered = targets - self.target_center.to(targets.dtype)
        if self.training:
            self.target_center.lerp_(batch_mean, 1.0 - self.config.target_center_momentum)
        return centered

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_values_teacher: torch.Tensor | None = None,
        ids_keep: torch.LongTensor | None = None,
        noise: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ExtremaForPreTrainingOutput:
        """`pixel_values` is the student's view (masked); `pixel_values_teacher` the teacher's (default: the same).

        The masks: `ids_keep` (B, K) or (num_masks, B, K), else drawn by `random_masking` (from `noise` if given).
        `output_attentions` / `output_hidden_states` return the student's maps and hidden states of the masked views.
        """
        if pixel_values_teacher is None:
            pixel_values_teacher = pixel_values
        batch_size, _, height, width = pixel_values.shape
        if ids_keep is None:
            num_patches = (height // self.config.patch_size) * (width // self.config.patch_size)
            ids_keep = self.random_masking(batch_size, num_patches, pixel_values.device, noise)

        with torch.no_grad():
            teacher_output = self.teacher(pixel_values_teacher, return_dict=True)
            targets = self.center_targets(self.teacher_projector(teacher_output.pooler_output))  # (B, P)

        # all masks in one batch: (B * M, 1 + K, D), image-major
        student_output = self.student(
            pixel_values,
            ids_keep=ids_keep,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        num_masks = student_output.pooler_output.shape[0] // batch_size

        # the heads see the views as one batch (one set of statistics for head_norm="batchnorm")
        predictions = self.predictor(self.student_projector(student_output.pooler_output))  # (B * M, P)
        student_pooler_output = student_output.pooler_output.unflatten(0, (batch_size, num_masks))  # (B, M, D)
        predictions = predictions.unflatten(0, (batch_size, num_masks))  # (B, M, P)
        if self.config.loss == "byol":
            loss = byol_loss(predictions, targets)
        else:
            loss = infonce_loss(predictions, targets, self.config.infonce_temperature)

        return ExtremaForPreTrainingOutput(
            loss=loss,
            predictions=predictions,
            targets=targets,
            ids_keep=ids_keep if ids_keep.ndim == 3 else ids_keep.unsqueeze(0),
            student_pooler_output=student_pooler_output,
            teacher_pooler_output=teacher_output.pooler_output,
            hidden_states=student_output.hidden_states,
            attentions=student_output.attentions,
            class_attentions=student_output.class_attentions,
        )


class ExtremaForImageClassification(ExtremaPreTrainedModel):
    """A classifier on the backbone.

    `config.classifier_pooling="mean"`: LayerNorm on the mean of the patch tokens (the official fine-tuning recipe).
    `"cls"`: a non-affine BatchNorm on the class token, then the linear layer (the official linear-probe recipe).
    """

    _teacher_prefix = "extrema."

    def __init__(self, config: ExtremaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.extrema = ExtremaModel(config)
        if config.classifier_pooling == "mean":
            self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        else:
            self.fc_norm = nn.BatchNorm1d(config.hidden_size, affine=False, eps=1e-6)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> ExtremaImageClassifierOutput:
        outputs = self.extrema(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        if self.config.classifier_pooling == "mean":
            features = outputs.last_hidden_state[:, 1:].mean(dim=1)  # (B, D)
        else:
            features = outputs.pooler_output
        logits = self.classifier(self.fc_norm(features))  # (B, num_labels)

        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            elif labels.dtype.is_floating_point:  # soft targets, e.g. from mixup / cutmix
                loss = torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits, labels)
        return ExtremaImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            class_attentions=outputs.class_attentions,
        )


class ExtremaForSemanticSegmentation(UperNetForSemanticSegmentation):
    """transformers' `UperNetForSemanticSegmentation` on an [`ExtremaBackbone`] (the paper's Table 9 head), with the
    config class that makes its saved folders load with `AutoModelForSemanticSegmentation` (trust_remote_code=True)
    and `pipeline("image-segmentation")`. The feature maps are all at the patch grid's resolution (1 / patch_size):
    UperNet's FPN fuses them at that one scale."""

    config_class = ExtremaUperNetConfig

    def __init__(self, config: ExtremaUperNetConfig):
        # UperNet builds its backbone with AutoBackbone.from_config: map the backbone config's class (another copy
        # of configuration_extrema.py's, when loaded as remote code) to this file's backbone
        AutoBackbone.register(type(config.backbone_config), ExtremaBackbone, exist_ok=True)
        super().__init__(config)


# `save_pretrained` writes `auto_map` and copies this file and the configuration beside the weights, so a saved
# folder or Hub repo loads with AutoModel.from_pretrained(path, trust_remote_code=True) without this project.
ExtremaConfig.register_for_auto_class()
ExtremaModel.register_for_auto_class("AutoModel")
ExtremaForPreTraining.register_for_auto_class("AutoModelForPreTraining")
ExtremaForImageClassification.register_for_auto_class("AutoModelForImageClassification")
ExtremaBackbone.register_for_auto_class("AutoBackbone")
ExtremaUperNetConfig.register_for_auto_class()
ExtremaForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
# In-process registration: the Auto classes resolve "extrema" once this module is imported.
AutoConfig.register("extrema", ExtremaConfig, exist_ok=True)
AutoModel.register(ExtremaConfig, ExtremaModel, exist_ok=True)
AutoModelForPreTraining.register(ExtremaConfig, ExtremaForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(ExtremaConfig, ExtremaForImageClassification, exist_ok=True)
AutoBackbone.register(ExtremaConfig, ExtremaBackbone, exist_ok=True)
AutoModelForSemanticSegmentation.register(ExtremaUperNetConfig, ExtremaForSemanticSegmentation, exist_ok=True)

__all__ = [
    "collapse_statistics",
    "ExtremaBackbone",
    "ExtremaForImageClassification",
    "ExtremaForPreTraining",
    "ExtremaForPreTrainingOutput",
    "ExtremaForSemanticSegmentation",
    "ExtremaImageClassifierOutput",
    "ExtremaModel",
    "ExtremaModelOutput",
    "ExtremaPreTrainedModel",
]
