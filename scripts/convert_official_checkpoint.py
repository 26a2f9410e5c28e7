"""Convert a checkpoint of the official ExtreMA release (github.com/microsoft/ExtreMA) to a `save_pretrained` folder.

    python scripts/convert_official_checkpoint.py --checkpoint extrema_mask08x5_color_1k_300ep.pth \
        --output_dir extrema-vit-base-mask08x5-color

By default the backbone is taken from the momentum (teacher) encoder, the one the official linear probe evaluates,
and saved as an `ExtremaModel` (loadable with `AutoModel`); `--encoder base` takes the student instead, and `--full`
saves the whole `ExtremaForPreTraining` (student, teacher, projectors, predictor) to resume pre-training.
The architecture is read from the tensors; only the head count cannot be, so it defaults to width / 64.
"""

import argparse
import re
from pathlib import Path

import torch

from cli_extrema import (
    AT_LEAST_1,
    FRACTION,
    ArgumentParser,
    UsageError,
    check_ranges,
    prepare_output_dir,
    run_cli,
)
from configuration_extrema import ExtremaConfig
from export_extrema import export_backbone
from modeling_extrema import ExtremaForPreTraining, ExtremaModel

# official encoder key -> ExtremaModel key
ENCODER_RENAMES = [
    (r"^cls_token$", "encoder.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.", r"encoder.layer.\1.attention."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layer.\1.mlp."),
    (r"^blocks_token\.(\d+)\.gamma_1$", r"encoder.class_attention_layer.\1.layer_scale_1"),
    (r"^blocks_token\.(\d+)\.gamma_2$", r"encoder.class_attention_layer.\1.layer_scale_2"),
    (r"^blocks_token\.(\d+)\.norm1\.", r"encoder.class_attention_layer.\1.layernorm_before."),
    (r"^blocks_token\.(\d+)\.norm2\.", r"encoder.class_attention_layer.\1.layernorm_after."),
    (r"^blocks_token\.(\d+)\.attn\.", r"encoder.class_attention_layer.\1.attention."),
    (r"^blocks_token\.(\d+)\.mlp\.", r"encoder.class_attention_layer.\1.mlp."),
    (r"^norm\.", "layernorm."),
]


def load_official_state_dict(path) -> dict:
    if not Path(path).is_file():
        raise UsageError(f"--checkpoint {path} is not a file; give the official .pth file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and tensor errors of a file that is not a torch.save checkpoint
        raise UsageError(
            f"--checkpoint {path} is not a PyTorch checkpoint ({type(error).__name__}); is the download complete?"
        ) from error
    if isinstance(checkpoint, dict) and "checkpoint" in checkpoint:  # the golden-vector file wraps the release layout
        checkpoint = checkpoint["checkpoint"]
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not any("encoder." in k for k in state_dict):
        raise UsageError(
            f"--checkpoint {path} is not an official ExtreMA checkpoint: expected a dict with 'state_dict' holding "
            "'module.base_encoder.*' / 'module.momentum_encoder.*' tensors."
        )
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def config_from_state_dict(state_dict: dict, num_attention_heads: int | None = None, **overrides) -> ExtremaConfig:
    """Read depth, width, patch size, class-attention depth and head sizes from the tensors."""
    encoder = {k.removeprefix("momentum_encoder."): v for k, v in state_dict.items() if k.startswith("momentum_")}
    hidden_size = encoder["cls_token"].shape[-1]
    patch_weight = encoder["patch_embed.proj.weight"]  # (D, C, p, p)
    num_patches = encoder["pos_embed"].shape[1]
    grid = int(round(num_patches**0.5))
    fields = dict(
        image_size=grid * patch_weight.shape[-1],
        patch_size=patch_weight.shape[-1],
        num_channels=patch_weight.shape[1],
        hidden_size=hidden_size,
        num_hidden_layers=len({k.split(".")[1] for k in encoder if k.startswith("blocks.")}),
        num_attention_heads=num_attention_heads or max(hidden_size // 64, 1),
        mlp_ratio=encoder["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
        qkv_bias="blocks.0.attn.qkv.bias" in encoder,
        num_class_attention_layers=len({k.split(".")[1] for k in encoder if k.startswith("blocks_token.")}),
        projector_hidden_size=encoder["head.0.weight"].shape[0],
        projection_dim=encoder["head.6.weight"].shape[0],
        predictor_hidden_size=state_dict["predictor.0.weight"].shape[0],
    )
    return ExtremaConfig(**{**fields, **overrides})


def rename_encoder(encoder_state: dict) -> tuple[dict, dict]:
    """Split one official encoder into (backbone state dict, projector state dict)."""
    backbone, projector = {}, {}
    for key, value in encoder_state.items():
        if key.startswith("head."):
            projector[key.removeprefix("head.")] = value
            continue
        for pattern, replacement in ENCODER_RENAMES:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                backbone[new_key] = value
                break
        else:
            raise ValueError(f"Unexpected key {key!r} in the official checkpoint.")
    return backbone, projector


def convert(state_dict: dict, config: ExtremaConfig, encoder: str = "momentum", full: bool = False):
    """Build an `ExtremaModel` (one encoder) or, with `full`, an `ExtremaForPreTraining` from an official state dict."""
    encoders = {
        name: rename_encoder({k.removeprefix(f"{name}_encoder."): v for k, v in state_dict.items()
                              if k.startswith(f"{name}_encoder.")})
        for name in ("base", "momentum")
    }
    if not full:
        model = ExtremaModel(config)
        model.load_state_dict(encoders[encoder][0], strict=True)
        return model.eval()

    model = ExtremaForPreTraining(config)
    converted = {}
    for name, role in (("base", "student"), ("momentum", "teacher")):
        backbone, projector = encoders[name]
        converted |= {f"{role}.{k}": v for k, v in backbone.items()}
        converted |= {f"{role}_projector.{k}": v for k, v in projector.items()}
    converted |= {k: v for k, v in state_dict.items() if k.startswith("predictor.")}
    model.load_state_dict(converted, strict=True)
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="official .pth file (e.g. extrema_mask08x5_color_1k_300ep.pth)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--encoder", choices=["momentum", "base"], default="momentum",
                        help="which encoder becomes the backbone (momentum = teacher, what the linear probe uses)")
    parser.add_argument("--full", action="store_true", help="save the whole ExtremaForPreTraining")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="default: hidden size / 64")
    parser.add_argument("--mask_ratio", type=float, default=0.8, help="recorded in the config (pre-training recipe)")
    parser.add_argument("--num_masks", type=int, default=1, help="recorded in the config (pre-training recipe)")
    return parser


def main(argv=None):
    args = check_ranges(build_parser().parse_args(argv), FLAG_RANGES)
    prepare_output_dir(args.output_dir)

    state_dict = load_official_state_dict(args.checkpoint)
    try:
        config = config_from_state_dict(
            state_dict, args.num_attention_heads, mask_ratio=args.mask_ratio, num_masks=args.num_masks
        )
        model = convert(state_dict, config, encoder=args.encoder, full=args.full)
    except (KeyError, ValueError, RuntimeError) as error:  # a tensor missing, unexpected, or of another shape
        raise UsageError(
            f"--checkpoint {args.checkpoint} does not have the official ExtreMA layout ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); check --num_attention_heads."
        ) from error

    source = Path(args.checkpoint).name
    if args.full:  # everything, to continue pre-training: AutoModelForPreTraining.from_pretrained(output_dir, ...)
        model.save_pretrained(args.output_dir)
    else:
        role = "momentum (teacher)" if args.encoder == "momentum" else "base (student)"
        description = (
            f"The {role} encoder of the official ExtreMA checkpoint `{source}` (github.com/microsoft/ExtreMA), "
            "converted to 🤗 Transformers. `pooler_output` (the class token built by class-attention blocks) is the "
            "instance representation; `last_hidden_state[:, 1:]` are the patch tokens (the distributed representation)."
        )
        export_backbone(model, args.output_dir, description=description)
    print(f"Converted {source} ({config.num_hidden_layers} layers, width {config.hidden_size}) -> {args.output_dir}")


FLAG_RANGES = {"num_attention_heads": AT_LEAST_1, "mask_ratio": FRACTION, "num_masks": AT_LEAST_1}


if __name__ == "__main__":
    run_cli(main)
