"""ExtreMA model configuration.

`ExtremaConfig` describes the backbone (a ViT whose patch tokens are summarised by CaiT class-attention blocks), the
BYOL heads used for pre-training, and the masking recipe. Named presets cover the sizes of the paper and a `tiny`
network that trains on a CPU in minutes:

    config = ExtremaConfig.from_preset("vit-base-patch16", num_masks=5)

This file is shipped as remote code with every saved model, so it imports only `transformers`.
"""

import math
import numbers

from transformers import AutoConfig, PretrainedConfig, UperNetConfig

try:  # transformers >= 5.2 moved the backbone helpers out of `utils`
    from transformers.backbone_utils import BackboneConfigMixin
except ImportError:
    from transformers.utils.backbone_utils import BackboneConfigMixin

# Sizes follow the ViT family (Dosovitskiy et al.) at 224 px with 16 px patches; `tiny` is a 32 px, patch-4 network
# for CIFAR-10 / Fashion-MNIST on a CPU. Projector and predictor widths follow BYOL (4096 hidden, 256 out) except for
# `tiny`, whose heads are shrunk so that they do not dominate its compute.
PRESETS = {
    "tiny": dict(
        image_size=32,
        patch_size=4,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        projector_hidden_size=512,
        projection_dim=128,
        predictor_hidden_size=512,
        num_masks=2,
    ),
    "vit-tiny-patch16": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3),
    "vit-small-patch16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vit-base-patch16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vit-large-patch16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
}

# The ranges of the numeric fields, checked before the checks that combine them (which would divide by zero)
POSITIVE_INTEGER_FIELDS = (
    "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "projector_hidden_size", "projection_dim", "predictor_hidden_size", "num_masks",
)  # fmt: skip
FIELD_RANGES = {  # name: (test, phrase)
    "num_class_attention_layers": (lambda value: value >= 0 and value == int(value), "an integer >= 0"),
    "mlp_ratio": (lambda value: value > 0, "greater than 0"),
    "layer_norm_eps": (lambda value: value > 0, "greater than 0"),
    "layer_scale_init_value": (lambda value: value >= 0, "at least 0"),
    "drop_path_rate": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "attention_probs_dropout_prob": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "initializer_range": (lambda value: value >= 0, "at least 0"),
    "mask_ratio": (lambda value: 0 <= value < 1, "in [0, 1); the paper uses 0.75-0.9"),
    "infonce_temperature": (lambda value: value > 0, "greater than 0"),
    "target_center_momentum": (lambda value: 0 <= value < 1, "in [0, 1)"),
}


class ExtremaConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of an ExtreMA model ([`ExtremaModel`], [`ExtremaForPreTraining`],
    [`ExtremaForImageClassification`]). The defaults give the ViT-Base/16 of the paper with 80% masking.

    Args:
        image_size (`int`, defaults to 224): input resolution the position table is built for.
        patch_size (`int`, defaults to 16): side of the square patches.
        num_channels (`int`, defaults to 3): input channels.
        hidden_size (`int`, defaults to 768): token width D.
        num_hidden_layers (`int`, defaults to 12): self-attention (ViT) blocks over the patch tokens.
        num_attention_heads (`int`, defaults to 12): heads in every attention layer.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width as a multiple of `hidden_size`.
        qkv_bias (`bool`, defaults to `True`): bias on the query/key/value projections.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation.
        num_class_attention_layers (`int`, defaults to 2): CaiT class-attention blocks that build the class token.
        layer_scale_init_value (`float`, defaults to 0.1): initial LayerScale of the class-attention blocks.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth of the self-attention blocks (student only).
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02): std of the class token's normal init.
        projector_hidden_size (`int`, defaults to 4096): hidden width of the 3-layer projector.
        projection_dim (`int`, defaults to 256): output width of projector and predictor.
        predictor_hidden_size (`int`, defaults to 4096): hidden width of the 2-layer predictor.
        mask_ratio (`float`, defaults to 0.8): fraction of patches hidden from the student, in [0, 1).
        num_masks (`int`, defaults to 1): masked views of every image encoded by the student per step.
        disjoint_masks (`bool`, defaults to `True`): draw the masks of an image from one permutation so that their
            visible patches do not overlap.
        loss (`str`, defaults to `"byol"`): `"byol"` (normalised L2) or `"infonce"`.
        infonce_temperature (`float`, defaults to 0.2): temperature of the InfoNCE loss.
        classifier_pooling (`str`, defaults to `"mean"`): features of [`ExtremaForImageClassification`]: `"mean"`
            (mean of the patch tokens, the fine-tuning recipe) or `"cls"` (the class token, the linear-probe recipe).
        head_norm (`str`, defaults to `"layernorm"`): normalisation inside the projector and predictor:
            `"layernorm"` (the official heads) or `"batchnorm"` (BYOL / MoCo v3 heads; one set of statistics over all
            masked views of a step, synchronised across processes by the training script).
        target_centering (`str`, defaults to `"none"`): what is subtracted from the teacher's projections before the
            loss normalises them: `"none"` (the official loss), `"batch"` (their batch mean, over all processes) or
            `"ema"` (a running mean of it, as DINO centres its teacher).
        target_center_momentum (`float`, defaults to 0.9): momentum of the running centre for `target_centering="ema"`.
        out_features (`list[str]`, *optional*): stages [`ExtremaBackbone`] returns as feature maps, named from
            `stage_names`: `"stem"` (the patch embeddings) and `"stage1"` .. `"stage{num_hidden_layers}"` (the
            self-attention blocks). Defaults to the last block.
        out_indices (`list[int]`, *optional*): the same stages by index into `stage_names` (0 is the stem).
    """

    model_type = "extrema"

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        num_channels=3,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        num_class_attention_layers=2,
        layer_scale_init_value=0.1,
        drop_path_rate=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.02,
        projector_hidden_size=4096,
        projection_dim=256,
        predictor_hidden_size=4096,
        mask_ratio=0.8,
        num_masks=1,
        disjoint_masks=True,
        loss="byol",
        infonce_temperature=0.2,
        classifier_pooling="mean",
        head_norm="layernorm",
        target_centering="none",
        target_center_momentum=0.9,
        out_features=None,
        out_indices=None,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.num_class_attention_layers = num_class_attention_layers
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.projector_hidden_size = projector_hidden_size
        self.projection_dim = projection_dim
        self.predictor_hidden_size = predictor_hidden_size
        self.mask_ratio = mask_ratio
        self.num_masks = num_masks
        self.disjoint_masks = disjoint_masks
        self.loss = loss
        self.infonce_temperature = infonce_temperature
        self.classifier_pooling = classifier_pooling
        self.head_norm = head_norm
        self.target_centering = target_centering
        self.target_center_momentum = target_center_momentum
        kwargs.pop("stage_names", None)  # saved by `to_dict`, but always derived from num_hidden_layers
        super().__init__(**kwargs)
        self.validate_extrema()
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    @property
    def stage_names(self) -> list[str]:
        """The backbone's stages: the patch embeddings, then every self-attention block (class attention is not one:
        it leaves the patch tokens unchanged)."""
        return ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]

    @property
    def intermediate_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_visible_patches(self) -> int:
        """Patches each masked view keeps: int(N * (1 - ratio)), the official rounding (39 of 196 at 80%)."""
        return int(self.num_patches * (1 - self.mask_ratio))

    @property
    def mask_noise_shape(self) -> tuple[int, ...]:
        """Shape of one image's mask noise, whose argsort orders its patches: (N,) for disjoint masks, cut from one
        permutation, else (num_masks, N), a permutation per mask. A batch of it is (B, *mask_noise_shape)."""
        return (self.num_patches,) if self.disjoint_masks else (self.num_masks, self.num_patches)

    def validate_extrema(self):
        """Raise a `ValueError` that names the offending field (called on construction; call again after edits)."""
        for name in POSITIVE_INTEGER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name, (valid, phrase) in FIELD_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
            if not valid(value):
                raise ValueError(f"{name} must be {phrase}, got {value}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick a head count that divides it (head width 64 is standard)."
            )
        if self.hidden_size % 4 != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by 4 for the 2-D sin-cos position table."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})."
            )
        if self.num_visible_patches < 1:
            raise ValueError(
                f"mask_ratio {self.mask_ratio} leaves no visible patch out of {self.num_patches}; lower it."
            )
        if self.disjoint_masks and self.num_masks * self.num_visible_patches > self.num_patches:
            raise ValueError(
                f"{self.num_masks} disjoint masks of {self.num_visible_patches} visible patches need "
                f"{self.num_masks * self.num_visible_patches} patches but the image has {self.num_patches}; "
                "use fewer masks, a higher mask_ratio, or disjoint_masks=False."
            )
        if self.loss not in ("byol", "infonce"):
            raise ValueError(f"loss must be 'byol' or 'infonce', got {self.loss!r}.")
        if self.classifier_pooling not in ("mean", "cls"):
            raise ValueError(f"classifier_pooling must be 'mean' or 'cls', got {self.classifier_pooling!r}.")
        if self.head_norm not in ("layernorm", "batchnorm"):
            raise ValueError(f"head_norm must be 'layernorm' or 'batchnorm', got {self.head_norm!r}.")
        if self.target_centering not in ("none", "batch", "ema"):
            raise ValueError(f"target_centering must be 'none', 'batch' or 'ema', got {self.target_centering!r}.")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ExtremaConfig":
        """A shipped configuration by name (see `PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"Unknown ExtreMA preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


class ExtremaUperNetConfig(UperNetConfig):
    r"""
    Configuration of [`ExtremaForSemanticSegmentation`]: transformers' `UperNetConfig` whose `backbone_config` is an
    [`ExtremaConfig`]. Its own `model_type` lets a saved segmentation folder map `AutoConfig` and
    `AutoModelForSemanticSegmentation` to this project's remote code.
    """

    model_type = "extrema_upernet"

    def to_dict(self):
        # The backbone's own auto_map (and the folder it came from) would make UperNet build it with
        # AutoBackbone.from_config as remote code of that folder; without them the classes this file and
        # modeling_extrema.py register are used, where they are loaded from (this folder's copies, as remote code).
        output = super().to_dict()
        if isinstance(output.get("backbone_config"), dict):
            backbone = output["backbone_config"]
            output["backbone_config"] = {k: v for k, v in backbone.items() if k not in ("auto_map", "_name_or_path")}
        return output


# Registered on import, so that the backbone_config of a saved ExtremaUperNetConfig resolves ("extrema") wherever this
# file is loaded, as remote code too, before any model class is.
AutoConfig.register("extrema", ExtremaConfig, exist_ok=True)
AutoConfig.register("extrema_upernet", ExtremaUperNetConfig, exist_ok=True)

__all__ = ["ExtremaConfig", "ExtremaUperNetConfig", "PRESETS"]
