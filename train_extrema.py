"""Pre-train ExtreMA with accelerate, streaming images through `datasets`: one CPU to many GPUs, resumable.

    python train_extrema.py                                      # tiny ViT on Fashion-MNIST, a few minutes on a CPU
    python train_extrema.py --train_dir path/to/cifar10          # a local folder of Parquet shards or images
    accelerate launch --multi_gpu --num_processes 8 train_extrema.py --recipe vit-base-mask08x5-color

References: Wu et al. 2022, "Extreme Masking for Learning Instance and Distributed Visual Representations" (sections 3
and 5.1: AdamW (0.9, 0.95), wd 0.1, lr 1.5e-4 x batch / 256, warm-up + cosine, EMA 0.996 -> 1 on a cosine); the
official code github.com/microsoft/ExtreMA (main.py, lib/augment.py); Wu et al. 2018 for the weighted kNN monitor.

Reading order, the algorithm's: the command line (flags and recipes), the data, the model and optimiser (with the
schedules), checkpoints, the training loop (`main`), the export. The data themselves (sources, augmentations, the
resumable training stream) are in `data_extrema.py`, the kNN monitor's classifier in `eval_extrema.py`, the exported
folder (weights, image processor, model card) in `export_extrema.py`.

Two design decisions shape this file:
- An epoch is a FIXED number of optimizer steps (dataset size / global batch). Every rank reads an endless stream of
  its own shards (wrapping around if its part runs out), so no rank ever waits for another at an epoch's end.
- The stream position is (epoch, micro-batches consumed, raw rows consumed by each DataLoader worker) and is saved
  per rank next to `accelerator.save_state`. A resume rebuilds the epoch's stream with the same seed, skips the
  consumed rows before decoding them, and replays the workers' round-robin order. The augmentation and the masks of
  an image are drawn from a seed derived from (seed, epoch, image bytes), not from a process's RNG, so training is
  the same function of the data whether it resumes, uses N workers or N processes.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import cache, partial
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors import SafetensorError
from tqdm.auto import tqdm

from cli_extrema import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    ArgumentParser,
    OPEN_UNIT,
    POSITIVE,
    SEED,
    Interrupted,
    check_ranges,
    fsync_dir,
    fsync_tree,
    prepare_output_dir,
    run_cli,
    write_error_message,
)
from configuration_extrema import PRESETS, ExtremaConfig
from data_extrema import (
    AUGMENTATIONS,
    StreamPosition,
    UsageError,
    add_data_args,
    build_eval_transform,
    build_train_transform,
    count_examples,
    default_validation_split,
    device_views,
    labelled_loader,
    labelled_stream,
    load_raw_stream,
    open_dataset,
    rank_dataset,
    training_batches,
)
from eval_extrema import knn_accuracy
from export_extrema import export_backbone, push_to_hub
from modeling_extrema import ExtremaForPreTraining, ExtremaModel, collapse_statistics

logger = logging.getLogger("train_extrema")

# ----------------------------------------------------------------------------------------------------------------
# Command line

# The released models (github.com/microsoft/ExtreMA): ViT-B/16, 8 GPUs, total batch 2048, 300 epochs with 40 of
# warm-up, drop path 0.1. Any flag given on the command line overrides its recipe's value.
_IMAGENET_1K = dict(
    model_config="vit-base-patch16",
    dataset_name="ILSVRC/imagenet-1k",
    validation_split="validation",
    total_batch_size=2048,
    num_train_epochs=300,
    warmup_epochs=40,
    learning_rate=1.5e-4,
    weight_decay=0.1,
    drop_path_rate=0.1,
    ema_momentum=0.996,
    num_workers=8,
    knn_train_samples=128_116,  # a 10% gallery, as for the paper's Figure 4
    knn_val_samples=50_000,
    knn_every=6250,  # every 10 epochs
    checkpointing_steps=1250,
    mixed_precision="auto",
    color_on_device=True,  # the CPU workers would otherwise limit a GPU (docs/performance.md)
)
RECIPES = {
    # The default when no data is given: Fashion-MNIST at 32 px, 375 steps in a few minutes on 2 CPU cores. BYOL, with
    # the fixes of tiny-cifar10 below: without them its targets collapse in a run this short; with them it learns
    # faster than the InfoNCE objective of the paper's Table 6 (docs/byol-small-scale.md).
    "tiny-fashion-mnist": dict(
        model_config="tiny",
        loss="byol",
        target_centering="batch",
        head_norm="batchnorm",
        predictor_lr_multiplier=10.0,
        mask_ratio=0.75,
        num_masks=2,
        per_device_train_batch_size=128,
        num_train_epochs=0.8,
        warmup_epochs=0.08,
        learning_rate=1.5e-3,
        ema_momentum=0.98,
        drop_path_rate=0.0,
        num_workers=1,
        knn_train_samples=5_000,
        knn_val_samples=1_000,
    ),
    # BYOL on CIFAR-10 at 32 px on a CPU (docs/byol-small-scale.md): the paper's objective, augmentation (Table 4,
    # two crop + colour views) and extreme masking, plus the three changes that stop a short run from collapsing:
    # centred targets, BatchNorm heads, a 10x predictor lr; and a teacher momentum for thousands of steps, not 10^5.
    "tiny-cifar10": dict(
        model_config="tiny",
        dataset_name="uoft-cs/cifar10",
        validation_split="test",
        loss="byol",
        mask_ratio=0.75,
        num_masks=2,
        augmentation="crop_color",
        # crops of 0.7-1 of the image, not ImageNet's 0.2-1: ahead of 0.2 and of 0.5 after 3 epochs on two seeds and
        # after 25 (docs/recipe-study.md, sections 6 and 8)
        crop_min=0.7,
        target_centering="batch",
        head_norm="batchnorm",
        predictor_lr_multiplier=10.0,
        # 4x the steps of batch 256 at the same lr per image: what limits a short run (docs/recipe-study.md)
        per_device_train_batch_size=64,
        num_train_epochs=25,
        warmup_epochs=2,
        learning_rate=1e-3,
        ema_momentum=0.98,  # chosen by measurement against 0.99 (docs/byol-small-scale.md); kNN scores the teacher
        drop_path_rate=0.0,
        num_workers=1,
        knn_train_samples=10_000,
        knn_val_samples=2_000,
        knn_k=20,
        knn_every_epochs=1,
    ),
    "vit-base-mask08x5": dict(_IMAGENET_1K, mask_ratio=0.8, num_masks=5, augmentation="crop"),
    "vit-base-mask08x5-color": dict(_IMAGENET_1K, mask_ratio=0.8, num_masks=5, augmentation="shared_crop_color"),
    "vit-base-mask09x8-color": dict(_IMAGENET_1K, mask_ratio=0.9, num_masks=8, augmentation="shared_crop_color"),
    # ImageNet-22k for 30 epochs (about as many steps as 300 on 1k); the warm-up is not published: 4 epochs keeps the
    # 1k recipe's share of warm-up steps.
    "vit-base-mask08x5-color-in22k": dict(
        _IMAGENET_1K,
        dataset_name="timm/imagenet-22k-wds",
        num_train_epochs=30,
        warmup_epochs=4,
        knn_every=10_000,
        mask_ratio=0.8,
        num_masks=5,
        augmentation="shared_crop_color",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a misspelt flag is an error, not a prefix of another flag
    )
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="a named setting (the released models); default: tiny-fashion-mnist when no data is given",
    )
    add_data_args(parser)

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_config",
        help=f"a preset ({', '.join(PRESETS)}), a config JSON, or a model folder (default: --init_from's, else tiny)",
    )
    group.add_argument(
        "--config_overrides",
        help='fields of the config over --model_config\'s, as transformers\' run_clm.py takes them: e.g. '
        '"num_hidden_layers=6,hidden_size=192"',
    )
    group.add_argument(
        "--init_from",
        help="start from the weights of a folder: a backbone (exported by this script, or converted) initialises "
        "student and teacher; a full pre-training folder (convert_official_checkpoint.py --full) also the heads",
    )
    group.add_argument("--mask_ratio", type=float, help="fraction of patches hidden from the student (config's)")
    group.add_argument("--num_masks", type=int, help="masked views per image (default: the config's)")
    group.add_argument("--loss", choices=("byol", "infonce"), help="training objective (default: the config's, byol)")
    group.add_argument(
        "--drop_path_rate", type=float, help="stochastic depth of the student (default: the config's)"
    )
    group.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute the student's activations in the backward pass: less memory, about a third more compute",
    )
    group.add_argument(
        "--head_norm", choices=("layernorm", "batchnorm"), help="norm in the projector/predictor (config's: layernorm)"
    )
    group.add_argument(
        "--target_centering",
        choices=("none", "batch", "ema"),
        help="subtract the teacher projections' mean before the loss (config's: none)",
    )
    group.add_argument("--augmentation", choices=AUGMENTATIONS, default="shared_crop_color")
    group.add_argument("--crop_min", type=float, default=0.2, help="smallest random-resized-crop scale")
    group.add_argument(
        "--color_on_device",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="colour-augment on the accelerator, per batch (the workers only decode, crop and flip): for GPUs; "
        "on in the ImageNet recipes",
    )

    group = parser.add_argument_group("optimisation (defaults: the paper)")
    group.add_argument("--per_device_train_batch_size", type=int, default=64)
    group.add_argument(
        "--total_batch_size", type=int, help="global batch; sets the per-device batch from the process count"
    )
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--num_train_epochs", type=float, default=300)
    group.add_argument("--max_train_steps", type=int, help="overrides --num_train_epochs")
    group.add_argument(
        "--steps_per_epoch", type=int, help="optimizer steps per epoch, when the dataset size is not known"
    )
    group.add_argument("--learning_rate", type=float, default=1.5e-4, help="base lr, scaled by total batch / 256")
    group.add_argument("--min_learning_rate", type=float, default=0.0, help="end of the cosine (absolute)")
    group.add_argument("--warmup_epochs", type=float, default=40)
    group.add_argument("--warmup_steps", type=int, help="overrides --warmup_epochs")
    group.add_argument("--weight_decay", type=float, default=0.1)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.95)
    group.add_argument("--max_grad_norm", type=float, help="clip gradients to this norm (default: no clipping)")
    group.add_argument("--ema_momentum", type=float, default=0.996, help="initial teacher momentum, rises to 1")
    group.add_argument(
        "--predictor_lr_multiplier", type=float, default=1.0, help="the predictor's lr as a multiple of the others'"
    )
    group.add_argument(
        "--mixed_precision",
        choices=("auto", "no", "bf16", "fp16"),
        default="auto",
        help="auto: bf16 where the hardware computes in it (Ampere or newer GPUs, CPUs with AVX512-BF16 or AMX); "
        "fp16 with loss scaling on older GPUs (V100, T4); else float32",
    )
    group.add_argument("--seed", type=int, default=0)

    group = parser.add_argument_group("running it for days")
    group.add_argument("--output_dir", default="extrema-output")
    group.add_argument("--checkpointing_steps", type=int, help="save the full training state every N steps")
    group.add_argument("--keep_checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    group.add_argument("--resume_from_checkpoint", help="'latest' (in --output_dir) or a checkpoint folder")
    group.add_argument(
        "--stop_after_steps", type=int, help="stop after N steps of this run, without export (for time-limited jobs)"
    )
    group.add_argument("--logging_steps", type=int, default=10)
    group.add_argument("--report_to", default="tensorboard", choices=("tensorboard", "wandb", "trackio", "none"))
    group.add_argument("--knn_every", type=int, default=0, help="kNN accuracy every N steps (0: at start and end)")
    group.add_argument("--knn_every_epochs", type=float, help="kNN accuracy every N epochs (overrides --knn_every)")
    switch = dict(action=argparse.BooleanOptionalAction, default=False)  # --flag / --no-flag
    group.add_argument("--skip_knn", **switch, help="no kNN evaluation at all")
    group.add_argument("--knn_train_samples", type=int, default=10_000, help="gallery: the first images of each shard")
    group.add_argument("--knn_val_samples", type=int, default=10_000, help="queries: the first images of each shard")
    group.add_argument("--knn_k", type=int, default=200)
    group.add_argument("--knn_temperature", type=float, default=0.07)
    group.add_argument("--export_every", type=int, help="also export the teacher backbone every N steps")
    group.add_argument("--push_to_hub", **switch, help="upload <output_dir>/final to --hub_model_id")
    group.add_argument("--hub_model_id", help="e.g. your-name/extrema-vit-base")
    group.add_argument("--hub_private", **switch)
    return parser


def parse_args(argv=None, **overrides) -> argparse.Namespace:
    """The command line `argv` (default: sys.argv), with `overrides` as flag values given from Python; checked.

    A recipe's values, then the `overrides`, then `argv` are read as one command line, in that order: a later flag
    wins, so a flag given explicitly overrides its recipe's value, and argparse checks every value, whatever gave it.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    given = [*flags_as_argv(overrides), *argv]
    recipe, on_own_data = choose_recipe(given)
    defaults = {}
    if recipe:
        defaults = dict(RECIPES[recipe], recipe=recipe)
        if on_own_data:  # the recipe on the user's data: not on the recipe's dataset
            for key in ("dataset_name", "dataset_config", "validation_split"):
                defaults.pop(key, None)
    parser = build_parser()
    args = check_flags(parser, parser.parse_args([*flags_as_argv(defaults), *given]))
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/extrema-vit-base).")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint).is_dir():
            parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint folder.")
    return args


def choose_recipe(argv: list[str]) -> tuple[str | None, bool]:
    """The recipe of a command line (--recipe; tiny-fashion-mnist when no data is given) and whether it names its own
    data (--dataset_name or --train_dir): the three flags that decide which defaults the other flags have."""
    chooser = ArgumentParser(add_help=False, allow_abbrev=False)  # its errors are one line too
    chooser.add_argument("--recipe", choices=sorted(RECIPES))
    chooser.add_argument("--dataset_name")
    chooser.add_argument("--train_dir")
    chosen, _ = chooser.parse_known_args(argv)
    on_own_data = bool(chosen.dataset_name or chosen.train_dir)
    return chosen.recipe or (None if on_own_data else "tiny-fashion-mnist"), on_own_data


def flags_as_argv(flags: dict) -> list[str]:
    """Flag values given from Python as command-line text: {"num_masks": 2, "skip_knn": True} -> ["--num_masks", "2",
    "--skip_knn"]. None is a flag not given; False is --no-<flag> (every switch is a BooleanOptionalAction)."""
    argv = []
    for name, value in flags.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        else:
            argv += [f"--{name}", str(value)]
    return argv


# The valid values of the numeric flags (a flag that is not given, None, is always valid), checked by `check_flags`
FLAG_RANGES = {
    "mask_ratio": FRACTION,
    "num_masks": AT_LEAST_1,
    "drop_path_rate": FRACTION,
    "crop_min": OPEN_UNIT,
    "per_device_train_batch_size": AT_LEAST_1,
    "total_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "num_train_epochs": POSITIVE,
    "max_train_steps": AT_LEAST_1,
    "steps_per_epoch": AT_LEAST_1,
    "learning_rate": POSITIVE,
    "min_learning_rate": AT_LEAST_0,
    "warmup_epochs": AT_LEAST_0,
    "warmup_steps": AT_LEAST_0,
    "weight_decay": AT_LEAST_0,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "max_grad_norm": AT_LEAST_0,  # 0, as None: no clipping
    "ema_momentum": OPEN_UNIT,  # 1: a teacher that never moves
    "predictor_lr_multiplier": AT_LEAST_0,
    "seed": SEED,
    "checkpointing_steps": AT_LEAST_0,  # the "every N steps" flags: 0, as None, is never
    "keep_checkpoints": AT_LEAST_0,  # 0: all of them
    "stop_after_steps": AT_LEAST_0,
    "logging_steps": AT_LEAST_1,
    "knn_every": AT_LEAST_0,
    "knn_every_epochs": AT_LEAST_0,
    "knn_train_samples": AT_LEAST_1,
    "knn_val_samples": AT_LEAST_1,
    "knn_k": AT_LEAST_1,
    "knn_temperature": POSITIVE,
    "export_every": AT_LEAST_0,
    "num_workers": AT_LEAST_0,
    "shuffle_buffer_size": AT_LEAST_0,
}


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Every float flag finite and every flag of `FLAG_RANGES` in its range (`cli_extrema.check_ranges`, as every
    script checks its flags); returns `args`. A value out of range ends the command with the flag's name
    (`parser.error`), as argparse does for a value of the wrong type."""
    try:
        return check_ranges(args, FLAG_RANGES)
    except UsageError as error:
        parser.error(str(error))


# ----------------------------------------------------------------------------------------------------------------
# Data: this rank's stream, and the schedule its size gives (an epoch is a fixed number of optimizer steps)


def open_training_data(accelerator, args):
    """This rank's part of the training stream, the number of training images (None: unknown), the open dataset (for
    the kNN monitor), and the split the kNN monitor queries: --validation_split, else the dataset's own validation
    split; None (no kNN accuracy) with --skip_knn or without labels or a validation split."""
    with accelerator.main_process_first():  # the Fashion-MNIST cache is built once, by the main process
        builder = open_dataset(args.dataset_name, args.dataset_config, args.train_dir, args.fashion_mnist_dir)
    raw = load_raw_stream(builder, args.train_split, args.image_column, args.label_column)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    dataset = rank_dataset(raw, rank, world_size, args.seed, args.shuffle_buffer_size)
    validation_split = None
    if not args.skip_knn and "label" not in raw.column_names:
        logger.warning(
            "The split %r has no labels (columns: %s): no kNN accuracy. Name the label column with --label_column, "
            "or pass --skip_knn.", args.train_split, raw.column_names,
        )  # fmt: skip
    if not args.skip_knn and "label" in raw.column_names:
        validation_split = args.validation_split or default_validation_split(builder)
        if validation_split is None:
            logger.warning("No validation split (name one with --validation_split): no kNN accuracy.")
    return dataset, count_examples(builder, args.train_split), builder, validation_split


@dataclass
class Schedule:
    """How long and how fast: batch sizes, epoch length in steps, learning rate and warm-up."""

    per_device_batch: int
    total_batch: int  # per device x processes x gradient accumulation
    peak_lr: float  # base lr x total batch / 256
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_schedule(args, num_examples: int | None, world_size: int) -> Schedule:
    per_device = args.per_device_train_batch_size
    if args.total_batch_size:
        per_step = world_size * args.gradient_accumulation_steps
        if args.total_batch_size % per_step:
            raise UsageError(
                f"--total_batch_size {args.total_batch_size} is not divisible by processes x accumulation "
                f"= {per_step}."
            )
        per_device = args.total_batch_size // per_step
    total_batch = per_device * world_size * args.gradient_accumulation_steps
    steps_per_epoch = args.steps_per_epoch or (num_examples // total_batch if num_examples else 0)
    if not steps_per_epoch:
        known = f" ({num_examples}, less than one global batch of {total_batch})" if num_examples else ""
        raise UsageError(f"Cannot tell how many images the training split has{known}; pass --steps_per_epoch.")
    total_steps = args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.learning_rate * total_batch / 256
    if args.min_learning_rate > peak_lr:
        raise UsageError(
            f"--min_learning_rate {args.min_learning_rate} is above the peak lr {peak_lr:.3g} (--learning_rate "
            f"{args.learning_rate} x batch {total_batch} / 256): the cosine would raise the lr; lower it."
        )
    return Schedule(
        per_device_batch=per_device,
        total_batch=total_batch,
        peak_lr=peak_lr,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=min(warmup, total_steps - 1),
    )


# ----------------------------------------------------------------------------------------------------------------
# Model and optimiser. The schedules are pure functions of the optimizer step: a checkpoint only needs the step.


def model_config_name(args) -> str:
    """--model_config, else the folder of --init_from (its architecture), else the tiny preset."""
    return args.model_config or args.init_from or "tiny"


def build_config(args) -> ExtremaConfig:
    """The config of --model_config with the fields the command line gives (a flag not given leaves the config's)."""
    overrides = {}
    for field_name in ("drop_path_rate", "mask_ratio", "num_masks", "loss", "head_norm", "target_centering"):
        if getattr(args, field_name) is not None:
            overrides[field_name] = getattr(args, field_name)
    overrides.update(parse_config_overrides(args.config_overrides))
    model_config = model_config_name(args)
    try:
        if model_config in PRESETS:
            return ExtremaConfig.from_preset(model_config, **overrides)
        path = Path(model_config)
        if path.is_file():
            return ExtremaConfig.from_dict({**ExtremaConfig.from_json_file(str(path)).to_dict(), **overrides})
        if path.is_dir():
            saved = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
            if saved.get("model_type") != "extrema":
                raise UsageError(
                    f"--model_config {path} is not an ExtreMA model folder (its config.json has model_type "
                    f"{saved.get('model_type')!r}, not 'extrema')."
                )
            return ExtremaConfig.from_pretrained(str(path), **overrides)
    except (OSError, ValueError) as error:
        if isinstance(error, UsageError):
            raise
        given = f"--model_config {model_config}" + (" --config_overrides" if args.config_overrides else "")
        raise UsageError(f"{given}: {str(error).strip().splitlines()[0]}") from error
    raise UsageError(
        f"--model_config {model_config!r} is neither a preset ({', '.join(PRESETS)}) nor a config file/folder."
    )


def parse_config_overrides(text: str | None) -> dict:
    """ "num_hidden_layers=6,hidden_size=192" as {"num_hidden_layers": 6, "hidden_size": 192}. Each value takes the
    type of the field's default, as `PretrainedConfig.update_from_string` reads it; the config checks the values."""
    defaults, overrides = ExtremaConfig().to_dict(), {}
    for item in text.split(",") if text else []:
        key, sep, value = (part.strip() for part in item.partition("="))
        default = defaults.get(key)
        if not (sep and key and value):
            raise UsageError(f"--config_overrides: {item!r} is not key=value (as num_hidden_layers=6,hidden_size=192)")
        if key in ("model_type", "transformers_version") or not isinstance(default, (bool, int, float, str)):
            raise UsageError(
                f"--config_overrides: {key!r} is not a number, string or true/false field of ExtremaConfig (the "
                "fields of a model's config.json; lists go in a config JSON given as --model_config)."
            )
        if isinstance(default, bool):
            if value.lower() not in ("true", "false"):
                raise UsageError(f"--config_overrides: {key}={value} is not true or false.")
            overrides[key] = value.lower() == "true"
            continue
        try:
            overrides[key] = type(default)(value)
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise UsageError(f"--config_overrides: {key}={value} is not {kind}.") from None
    return overrides


def build_model(accelerator, config: ExtremaConfig) -> ExtremaForPreTraining:
    """The pre-training model of this process, before `accelerator.prepare`."""
    model = ExtremaForPreTraining(config)
    world_size, device = accelerator.num_processes, accelerator.device
    if config.head_norm == "batchnorm" and world_size > 1:
        if device.type == "cuda":  # one set of head statistics over the global batch, as in one process (MoCo v3)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm runs on GPUs only
            logger.warning("BatchNorm heads on %d CPU processes use per-process batch statistics.", world_size)
    if device.type == "cpu" and accelerator.mixed_precision == "bf16":
        model.set_attn_implementation("eager")  # CPU sdpa is slower on short bf16 sequences (docs/performance.md)
    return model


def enable_gradient_checkpointing(model):
    """Recompute the activations of every ViT block in the backward pass instead of keeping them: less memory for
    about a third more compute. Only blocks that train are recomputed (not the teacher's, run without gradients)."""
    kwargs = {"use_reentrant": False}  # the reentrant variant loses gradients of inputs that do not require them
    if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.x
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# What `load_initial_weights` loads from a folder, by the architecture its config names
INIT_ARCHITECTURES = {"ExtremaModel": "backbone", "ExtremaForPreTraining": "full"}


def load_initial_weights(model: ExtremaForPreTraining, folder) -> str:
    """Load the weights of a saved ExtreMA into a new pre-training model; returns "backbone" or "full".

    A backbone (`ExtremaModel`: an export of this script, a converted official teacher) becomes the student and the
    teacher starts as its copy, with fresh heads; a pre-training folder (`ExtremaForPreTraining`: a converted official
    checkpoint with --full) sets everything, heads and teacher included. The weights must fit the run's architecture:
    without --model_config, the run's config is the folder's own (`model_config_name`).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        hint = ": convert an official .pth with scripts/convert_official_checkpoint.py --full" * folder.is_file()
        raise UsageError(f"--init_from {folder} is not a saved model folder (no config.json){hint}.")
    saved = json.loads((folder / "config.json").read_text())
    kinds = [INIT_ARCHITECTURES[name] for name in saved.get("architectures") or [] if name in INIT_ARCHITECTURES]
    if saved.get("model_type") != "extrema" or not kinds:
        raise UsageError(
            f"--init_from {folder} holds a {saved.get('model_type')!r} {saved.get('architectures')} model; it takes "
            "an ExtreMA backbone (ExtremaModel) or pre-training model (ExtremaForPreTraining) folder."
        )
    kind = kinds[0]
    # our own classes with the folder's weights: nothing of the folder's code runs
    try:
        source = (ExtremaForPreTraining if kind == "full" else ExtremaModel).from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise UsageError(
            f"--init_from {folder} cannot be loaded ({(str(error).strip().splitlines() or [''])[0][:200]}); a "
            "truncated or corrupt model.safetensors gives this: export, convert or download it again."
        ) from error
    target = model if kind == "full" else model.student
    saved_state, state = source.state_dict(), target.state_dict()
    if kind == "full" and "target_center" not in saved_state:  # a run with --target_centering ema starts at 0
        state.pop("target_center", None)
    misfits = sorted(state.keys() ^ saved_state.keys()) + sorted(
        name for name in state.keys() & saved_state.keys() if state[name].shape != saved_state[name].shape
    )
    if misfits:
        raise UsageError(
            f"--init_from {folder}: its weights do not fit this run's model ({len(misfits)} tensors differ, e.g. "
            f"{', '.join(misfits[:3])}). Build the model from the folder: leave out --model_config (or pass "
            f"--model_config {folder}) and flags that change the architecture (--head_norm, --config_overrides)."
        )
    target.load_state_dict(saved_state, strict=False)
    if kind == "backbone":
        model.reset_teacher()  # the teacher starts as the student, as at any initialisation
    return kind


def param_groups(model: torch.nn.Module, weight_decay: float, predictor_lr_multiplier: float = 1.0) -> list[dict]:
    """Weight decay on weight matrices only: not on biases, norms, layer-scale gammas or the class token.

    Each group carries an `lr_scale` (the training loop sets lr = scale x schedule): the predictor's is
    `predictor_lr_multiplier`, everything else's 1.
    """
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # the teacher
            continue
        decay = param.ndim >= 2 and not name.endswith("cls_token")
        scale = predictor_lr_multiplier if name.split(".")[0] == "predictor" else 1.0
        group = groups.setdefault(
            (scale, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        )
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model, args, peak_lr: float, device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the training loop sets each group's lr at every step."""
    return torch.optim.AdamW(
        param_groups(model, args.weight_decay, args.predictor_lr_multiplier),
        lr=peak_lr,
        betas=(args.adam_beta1, args.adam_beta2),
        # the fused kernel: one pass over all parameters, not one per tensor (docs/performance.md)
        fused=device.type in ("cuda", "cpu"),
    )


def get_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to peak_lr, then half-cycle cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@cache  # a pass over every step of the run (375k for ImageNet): once, though the summary and the warning both ask
def teacher_init_share(total_steps: int, base_momentum: float) -> float:
    """The share of its initial weights that the teacher still holds after the run: the product of the momenta.

    Every EMA step keeps a fraction m of the teacher, so after the run prod(m_t) of it is the random initialisation.
    With m rising from 0.996 to 1, that is 31% after 585 steps (3 CIFAR-10 epochs of batch 256) but 0.7% after 5,000;
    a short run with the paper's momentum evaluates and exports a teacher that is still largely random.
    """
    momenta = (ExtremaForPreTraining.teacher_momentum(step, total_steps, base_momentum) for step in range(total_steps))
    return math.exp(sum(map(math.log, momenta)))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: accelerate's save_state + each rank's stream position, written atomically


def list_checkpoints(output_dir) -> list[Path]:
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(accelerator, folder: Path, step: int, position: StreamPosition, keep: int | None = None):
    """Full training state into `folder`: written to folder.tmp, flushed to disk (files and folders), then renamed,
    so that neither a kill nor a power loss leaves half of one. A full disk or a missing permission is a UsageError
    that says so (the partial folder is removed)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # model, optimizer, RNG states of every process
        state = {"step": step, "world_size": accelerator.num_processes, "position": position.to_json()}
        (tmp / f"stream_rank{accelerator.process_index}.json").write_text(json.dumps(state))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            fsync_tree(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
            fsync_dir(folder.parent)
    except (OSError, RuntimeError, SafetensorError) as error:  # torch says "unexpected pos ..." when the disk is full
        message = write_error_message(error, tmp)
        if message is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"Cannot save the checkpoint {folder.name}: {message}") from error
    if accelerator.is_main_process and keep:
        older = [p for p in list_checkpoints(folder.parent) if p != folder]
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator, folder: Path) -> tuple[int, StreamPosition]:
    path = folder / f"stream_rank{accelerator.process_index}.json"
    if not path.exists():
        raise UsageError(f"{folder} is not a checkpoint of this script (no {path.name}).")
    state = json.loads(path.read_text())
    if state["world_size"] != accelerator.num_processes:
        raise UsageError(
            f"{folder} was written by {state['world_size']} processes; resume it with the same number "
            f"(this run has {accelerator.num_processes}) so that every rank continues its own stream."
        )
    try:
        accelerator.load_state(str(folder))
    except RuntimeError as error:
        mismatch = re.search(r"(size mismatch for [^:]+|Missing key\(s\)|Unexpected key\(s\))", str(error))
        if mismatch is None:
            raise
        raise UsageError(
            f"{folder} was saved from another model than the one this run builds ({mismatch.group(1)}); resume "
            "with the --model_config (and model flags) of the run that wrote it."
        ) from error
    return state["step"], StreamPosition.from_json(state["position"])


# What a damaged checkpoint raises while it is read: a truncated safetensors or torch file, a broken JSON, a missing file
DAMAGED_CHECKPOINT_ERRORS = (
    OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError
)  # fmt: skip


def resume(accelerator, args) -> tuple[int, StreamPosition]:
    """Load --resume_from_checkpoint ('latest': the newest in --output_dir that can be read, trying older ones when it
    is damaged) into the prepared model and optimizer (and the RNG states); returns the step and this rank's stream
    position to continue from, (0, the start) without one."""
    if not args.resume_from_checkpoint:
        return 0, StreamPosition()
    if args.resume_from_checkpoint == "latest":
        folders = list_checkpoints(args.output_dir)
        if not folders:
            logger.info("No checkpoint in %s: starting from scratch.", args.output_dir)
            return 0, StreamPosition()
    else:
        folders = [Path(args.resume_from_checkpoint)]
    for folder in reversed(folders):
        try:
            step, position = load_checkpoint(accelerator, folder)
        except UsageError:
            raise
        except DAMAGED_CHECKPOINT_ERRORS as error:
            reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
            if folder == folders[0]:  # the oldest: nothing left to try
                raise UsageError(
                    f"Cannot resume from {folder}: it cannot be read ({reason}) and there is no older checkpoint. "
                    "Start again without --resume_from_checkpoint, or give another checkpoint folder."
                ) from error
            logger.warning("Skipping %s: it cannot be read (%s); trying the checkpoint before it.", folder, reason)
            continue
        logger.info("Resumed from %s at step %d (epoch %d).", folder, step, position.epoch)
        return step, position


# ----------------------------------------------------------------------------------------------------------------
# The training loop: `main`, and the pieces of a step and of its logs


class StopSignals:
    """SIGTERM (what a cluster sends before it preempts a job) and SIGINT (Ctrl-C) ask the loop to stop after the
    step it is in: it saves a checkpoint and ends with a message saying how to resume. A second Ctrl-C stops at once.

    The processes agree on stopping (`requested` all-reduces the flag), so they save the same step together.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python handles signals in the main thread only
            self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):  # no logging here: a handler that takes the logging lock could deadlock
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def requested(self, accelerator) -> int | None:
        """The signal received (by any process), or None."""
        received = self.received or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor(float(received), device=accelerator.device)
            received = int(accelerator.reduce(flag, "max").item())
        return received or None


def bf16_is_native() -> bool:
    """Whether bf16 autocast runs on bf16 hardware: a CUDA GPU that computes in it (Ampere or newer), or a CPU with
    bf16 dot products (AVX512-BF16 or AMX). Elsewhere bf16 is emulated, and slower than float32 (docs/performance.md);
    a V100 or T4 emulates it too, although `torch.cuda.is_bf16_supported()` says yes."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: assume emulated
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_mixed_precision(choice: str) -> str:
    """--mixed_precision as accelerate takes it. auto: bf16 where the hardware computes in it; on a GPU without bf16
    (V100, T4) float16, which accelerate trains with loss scaling (its GradScaler); on such a CPU float32."""
    if choice != "auto":
        return choice
    if bf16_is_native():
        return "bf16"
    return "fp16" if torch.cuda.is_available() else "no"


def make_accelerator(args) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/logs"),
        # the main process alone computes kNN accuracy; the others wait for it at a barrier
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        force=True,
    )
    for noisy in ("datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if accelerator.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # leave a core to each DataLoader worker: oversubscribed OpenMP threads spin and slow every step down
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        cores //= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, cores - args.num_workers))
    return accelerator


def forward_backward(accelerator, model, batches, accumulation_steps: int, measure_collapse: bool = False):
    """The micro-batches of one optimizer step: gradients accumulate in the parameters.

    Returns the mean loss and, with `measure_collapse`, the collapse statistics of the last micro-batch's targets and
    predictions (device tensors, see `modeling_extrema.collapse_statistics`), else None.
    """
    device = accelerator.device
    loss_sum, collapse = torch.zeros((), device=device), None
    for micro_step in range(accumulation_steps):
        batch = next(batches, None)
        if batch is None:  # only when no shard of this process yields a decodable image
            raise UsageError(
                f"Process {accelerator.process_index} got no decodable image from its part of the training data; "
                "check that the files are images (and that there are at least as many shards as processes)."
            )
        student_view, teacher_view = device_views(batch, device)  # teacher None: both branches see the same view
        inputs = {
            "pixel_values": student_view,
            "pixel_values_teacher": teacher_view,
            "noise": batch["noise"].to(device, non_blocking=True),  # (B, *config.mask_noise_shape)
        }
        # DDP all-reduces the gradients once per step, after the last micro-batch
        last = micro_step == accumulation_steps - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                outputs = model(**inputs)
            accelerator.backward(outputs.loss / accumulation_steps)
        loss_sum += outputs.loss.detach()
        if measure_collapse and last:
            collapse = {
                f"collapse/{branch}_{name}": value
                for branch, vectors in (
                    ("target", outputs.targets),
                    ("prediction", outputs.predictions.flatten(0, 1)),  # (B, M, P) -> (B * M, P)
                )
                for name, value in collapse_statistics(vectors).items()
            }
    return loss_sum / accumulation_steps, collapse


def optimizer_step(accelerator, model, optimizer, lr: float, max_grad_norm: float | None, measure_norm: bool):
    """One step of learning rate `lr` (times each group's `lr_scale`) on the gradients clipped to `max_grad_norm`
    (when set), which are then zeroed. Returns the gradient norm, measured only when clipping or `measure_norm` (it
    costs a pass over the gradients), else None."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    grad_norm = None
    if max_grad_norm or measure_norm:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def stop_if_nonfinite(accelerator, loss: float, step: int, lr: float, position: StreamPosition, output_dir: Path):
    """When the loss (the same on every rank) is not finite: save the state before this step, and stop."""
    if math.isfinite(loss):
        return
    folder = output_dir / f"nonfinite-step-{step}"
    save_checkpoint(accelerator, folder, step, position)
    raise FloatingPointError(
        f"The loss is {loss} at step {step} (lr {lr:.3g}). The state before this step is saved in "
        f"{folder} for debugging; lower --learning_rate, set --max_grad_norm, or use --mixed_precision no."
    )


def knn_loaders(builder, args, validation_split: str, transform) -> tuple:
    """The kNN monitor's gallery (--knn_train_samples training images) and queries (--knn_val_samples images of
    `validation_split`): fixed subsets, the first images of every shard, the same at every evaluation."""
    return tuple(
        labelled_loader(
            labelled_stream(builder, split, args.image_column, args.label_column), transform, batch_size=256,
            num_workers=args.num_workers, seed=args.seed, max_samples=max_samples,
        )  # fmt: skip
        for split, max_samples in ((args.train_split, args.knn_train_samples), (validation_split, args.knn_val_samples))
    )


def evaluate_knn(accelerator, backbone, loaders, args, step: int, history: list) -> dict | None:
    """kNN accuracy of the teacher on `loaders` (gallery, queries), computed by the main process while the others
    wait; appended to `history`."""
    result = None
    if accelerator.is_main_process:
        with accelerator.autocast():
            gallery, queries = loaders
            result = knn_accuracy(
                backbone, gallery, queries, accelerator.device, k=args.knn_k, temperature=args.knn_temperature
            )
        logger.info(
            "step %d: kNN top-1 %.2f%%, top-5 %.2f%% (k=%d, %d gallery / %d validation images)",
            step, result["top1"], result["top5"], args.knn_k, args.knn_train_samples, args.knn_val_samples,
        )  # fmt: skip
        accelerator.log({"knn/top1": result["top1"], "knn/top5": result["top5"]}, step=step)
    accelerator.wait_for_everyone()
    history.append({"step": step, **(result or {})})
    return result


# Thresholds of `warn_on_collapse`. Targets spread over the sphere have mean cosine ~0 and normalised std ~1.
COLLAPSE_MEAN_COSINE = 0.8
COLLAPSE_STD = 0.3


def warn_on_collapse(logs: dict, step: int, warned: bool) -> bool:
    """Warn once when the teacher's targets or the student's predictions crowd into one direction; returns whether a
    warning was given. Both are read: centred targets (--target_centering) are spread by construction, and then the
    predictions are what shows a collapse."""
    if warned:
        return True
    for branch, vectors in (("target", "the teacher's projections (the targets)"), ("prediction", "the predictions")):
        cosine, std = logs.get(f"collapse/{branch}_mean_cosine"), logs.get(f"collapse/{branch}_std")
        if cosine is not None and (cosine >= COLLAPSE_MEAN_COSINE or std <= COLLAPSE_STD):
            logger.warning(
                "step %d: %s are collapsing (mean pairwise cosine %.2f, normalised std %.2f; spread vectors give ~0 "
                "and ~1). BYOL then regresses a near-constant target and the features stop separating images. Try "
                "--target_centering batch, --head_norm batchnorm, a lower --ema_momentum or --loss infonce "
                "(docs/byol-small-scale.md).",
                step, vectors, cosine, std,
            )  # fmt: skip
            return True
    return False


class ProgressLog:
    """The progress bar, and the logs of a logging step: the tracker's scalars, the collapse warning (once), and in a
    job's log file (no terminal) a line per logging step instead of the bar's redraws."""

    def __init__(self, accelerator, schedule: Schedule, step: int):
        self.accelerator, self.schedule = accelerator, schedule
        self.bar = tqdm(
            total=schedule.total_steps,
            initial=step,
            desc="train",
            disable=not accelerator.is_main_process,
            mininterval=0.1 if sys.stderr.isatty() else 60,  # job logs get a line a minute, not every redraw
        )
        self.logged_step, self.tick, self.warned_of_collapse = step, time.perf_counter(), False

    def log(self, step: int, position: StreamPosition, collapse: dict, **scalars):
        """After optimizer step `step`: `scalars` (loss, lr, momentum, grad_norm) as train/<name>, the speed, the
        epoch, the images skipped so far, and the collapse statistics averaged over the processes."""
        accelerator, device = self.accelerator, self.accelerator.device
        images_per_second = self.schedule.total_batch * (step - self.logged_step) / (time.perf_counter() - self.tick)
        self.logged_step, self.tick = step, time.perf_counter()
        logs = {
            **{f"train/{name}": value for name, value in scalars.items()},
            "train/images_per_second": images_per_second,
            "train/epoch": step / self.schedule.steps_per_epoch,
            "data/skipped_images": sum(position.skipped_images.values()),
            **{name: accelerator.reduce(value, "mean").item() for name, value in collapse.items()},
        }
        if device.type == "cuda":
            logs["train/max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        accelerator.log(logs, step=step)
        self.warned_of_collapse = warn_on_collapse(logs, step, self.warned_of_collapse)
        loss, lr = logs["train/loss"], logs["train/lr"]
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}")
        if not sys.stderr.isatty():  # a job's log file: a line per logging step, not a progress bar's redraws
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if v is not None))


def recipe_summary(args, config, schedule: Schedule) -> dict:
    """The settings of a run, for the log and the model card."""
    return {
        "recipe": args.recipe or "custom",
        "backbone": " ".join(filter(None, (model_config_name(args), args.config_overrides))),
        **({"initialised from": args.init_from} if args.init_from else {}),
        "data": args.dataset_name or args.train_dir or "Fashion-MNIST",
        "epochs / steps": f"{schedule.total_steps / schedule.steps_per_epoch:g} / {schedule.total_steps}",
        "total batch": schedule.total_batch,
        "optimizer": f"AdamW ({args.adam_beta1}, {args.adam_beta2}), weight decay {args.weight_decay}",
        "learning rate": f"{args.learning_rate:g} x batch / 256 = {schedule.peak_lr:.3g}, "
        f"{schedule.warmup_steps} warm-up steps, cosine",
        "teacher momentum": f"{args.ema_momentum} -> 1 (cosine)",
        "teacher's initialisation left at the end": f"{teacher_init_share(schedule.total_steps, args.ema_momentum):.1%}",
        "masking": f"{config.mask_ratio:.0%} x {config.num_masks} masks",
        "loss": config.loss,
        "augmentation": args.augmentation
        + (f", crops of {args.crop_min:g}-1 of the image" if "crop" in args.augmentation else ""),
        "drop path (student)": config.drop_path_rate,
    }


def start_logging(accelerator, args, schedule: Schedule, recipe: dict, num_examples: int | None):
    """Log the run's plan (and warn of a teacher that would stay mostly random), and start the trackers."""
    init_share = teacher_init_share(schedule.total_steps, args.ema_momentum)
    if init_share > 0.1:
        logger.warning(
            "With --ema_momentum %s over %d steps the final teacher (the network that kNN scores and the export "
            "saves) is still %.0f%% its random initialisation; lower --ema_momentum (e.g. 0.99) for a run this short.",
            args.ema_momentum, schedule.total_steps, 100 * init_share,
        )  # fmt: skip
    logger.info(
        "%d steps of %d images (%d processes x %d x %d accumulation), %d per epoch of %s images; %s",
        schedule.total_steps, schedule.total_batch, accelerator.num_processes, schedule.per_device_batch,
        args.gradient_accumulation_steps, schedule.steps_per_epoch, num_examples or "?", recipe,
    )  # fmt: skip
    if args.report_to != "none":
        accelerator.init_trackers("extrema", config={k: v for k, v in vars(args).items() if v is not None})


def train(**flags) -> dict | None:
    """Pre-train from Python, flags as keywords: `train(recipe="tiny-cifar10", train_dir="cifar10", seed=1)`."""
    return main(parse_args([], **flags))


def main(argv=None):
    """The command line: `argv` (a list of flags, default sys.argv) or parsed arguments; returns the run's results."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    prepare_output_dir(args.output_dir)  # a folder that cannot be written stops the run now, not at its end
    with StopSignals() as stop_signals:
        return train_loop(args, stop_signals)


def train_loop(args, stop_signals):
    """`main` once the output folder is known to be writable and the stop signals are caught."""
    accelerator = make_accelerator(args)
    output_dir, device = Path(args.output_dir), accelerator.device

    # Data: this rank's endless stream; an epoch is a fixed number of optimizer steps
    dataset, num_examples, builder, validation_split = open_training_data(accelerator, args)
    schedule = plan_schedule(args, num_examples, accelerator.num_processes)
    knn_every = args.knn_every
    if args.knn_every_epochs:
        knn_every = max(1, round(args.knn_every_epochs * schedule.steps_per_epoch))

    # Model and optimizer. The same seed on every rank gives the same initial weights.
    set_seed(args.seed)
    config = build_config(args)
    model = build_model(accelerator, config)
    if args.init_from:
        kind = load_initial_weights(model, args.init_from)
        what = "every weight" if kind == "full" else "student and teacher"
        logger.info("Initialised %s from %s.", what, args.init_from)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, args, schedule.peak_lr, device))
    unwrapped = accelerator.unwrap_model(model)  # owns update_teacher() and the teacher to evaluate and export
    transform = build_train_transform(args.augmentation, config.image_size, args.crop_min, args.color_on_device)
    step, position = resume(accelerator, args)
    recipe = recipe_summary(args, config, schedule)
    start_logging(accelerator, args, schedule, recipe, num_examples)
    knn_history = []  # the kNN curve: one {"step", "top1", "top5"} per evaluation
    knn_enabled = validation_split is not None
    if knn_enabled:  # the kNN monitor's fixed subsets: the first images of every shard of each split
        loaders = knn_loaders(builder, args, validation_split, build_eval_transform(config.image_size))
        knn = partial(evaluate_knn, accelerator, unwrapped.teacher, loaders, args, history=knn_history)
    knn_start = knn(step) if knn_enabled and step == 0 else None

    model.train()
    progress = ProgressLog(accelerator, schedule, step)
    first_step, batches, loss = step, None, None
    while step < schedule.total_steps:
        epoch = step // schedule.steps_per_epoch
        if position.epoch != epoch:  # a new epoch (or a checkpoint taken at the end of the previous one)
            position, batches = StreamPosition(epoch=epoch), None
        if batches is None:
            batches = training_batches(
                dataset, transform, config.mask_noise_shape, position, device,
                batch_size=schedule.per_device_batch, num_workers=args.num_workers, seed=args.seed,
            )  # fmt: skip
        lr = get_lr(step, schedule.total_steps, schedule.warmup_steps, schedule.peak_lr, args.min_learning_rate)
        momentum = ExtremaForPreTraining.teacher_momentum(step, schedule.total_steps, args.ema_momentum)
        log_now = (step + 1) % args.logging_steps == 0 or step + 1 == schedule.total_steps
        loss, collapse = forward_backward(accelerator, model, batches, args.gradient_accumulation_steps, log_now)
        loss = accelerator.reduce(loss, "mean").item()  # the same value on every rank: they stop together
        stop_if_nonfinite(accelerator, loss, step, lr, position, output_dir)
        grad_norm = optimizer_step(accelerator, model, optimizer, lr, args.max_grad_norm, measure_norm=log_now)
        unwrapped.update_teacher(momentum)
        step += 1
        progress.bar.update(1)

        if log_now:
            progress.log(step, position, collapse, loss=loss, lr=lr, momentum=momentum, grad_norm=grad_norm)
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir / f"checkpoint-{step}", step, position, args.keep_checkpoints)
        if step == schedule.total_steps:
            break
        if knn_enabled and knn_every and step % knn_every == 0:
            knn(step)
            model.train()
        if args.export_every and step % args.export_every == 0:
            export_teacher(accelerator, unwrapped.teacher, output_dir / f"export-step-{step}", args, recipe)
        if args.stop_after_steps and step - first_step >= args.stop_after_steps:
            logger.info("Stopped after step %d (--stop_after_steps); continue with --resume_from_checkpoint.", step)
            accelerator.end_training()
            return None
        received = stop_signals.requested(accelerator)
        if received:
            folder = output_dir / f"checkpoint-{step}"
            if not (args.checkpointing_steps and step % args.checkpointing_steps == 0):  # not saved just above
                save_checkpoint(accelerator, folder, step, position, args.keep_checkpoints)
            progress.bar.close()
            accelerator.end_training()
            raise Interrupted(
                f"stopped by {signal.Signals(received).name} at step {step} of {schedule.total_steps}; the state is "
                f"saved in {folder}. Resume with the same flags and --resume_from_checkpoint latest.",
                128 + received,
            )
    progress.bar.close()
    del batches  # stops the DataLoader workers

    knn_end = knn(step) if knn_enabled else None
    final = export_final(accelerator, unwrapped.teacher, args, recipe, step, knn_start, knn_end, validation_split)
    accelerator.end_training()
    return {
        "step": step, "loss": loss, "knn_start": knn_start, "knn_end": knn_end, "knn_history": knn_history,
        "num_examples": num_examples, "steps_per_epoch": schedule.steps_per_epoch, "final_dir": str(final),
        "mixed_precision": accelerator.mixed_precision,  # what the run trained in: --mixed_precision auto resolved
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Export: the teacher backbone as a Hub-ready folder


def export_teacher(accelerator, teacher, folder: Path, args, recipe: dict, knn: dict | None = None, split=None):
    """The teacher backbone as a Hub-ready folder (`export_extrema.export_backbone`), its card with the kNN accuracy
    `knn` on the validation split `split` when given."""
    if accelerator.is_main_process:
        if args.dataset_name:
            data_ids = [args.dataset_name]
        else:
            data_ids = [] if args.train_dir else ["zalando-datasets/fashion_mnist"]
        if knn:
            knn = dict(knn, k=args.knn_k, temperature=args.knn_temperature, split=split)
        export_backbone(teacher, folder, model_id=args.hub_model_id, datasets=data_ids, recipe=recipe, knn=knn)
        logger.info("Exported the teacher backbone to %s", folder)
    accelerator.wait_for_everyone()


def export_final(accelerator, teacher, args, recipe: dict, step: int, knn_start, knn_end, split) -> Path:
    """The end of a run: the kNN change printed, the teacher exported to <output_dir>/final (its card with the final
    kNN accuracy) and, with --push_to_hub, uploaded; returns the folder."""
    if knn_start and knn_end and accelerator.is_main_process:
        print(
            f"kNN top-1 on {split}: {knn_start['top1']:.2f}% at initialisation -> "
            f"{knn_end['top1']:.2f}% after {step} steps"
        )
    final = Path(args.output_dir) / "final"
    export_teacher(accelerator, teacher, final, args, recipe, knn_end, split)
    if args.push_to_hub and accelerator.is_main_process:
        push_to_hub(final, args.hub_model_id, args.hub_private, commit_message=f"ExtreMA, step {step}")
    return final


if __name__ == "__main__":
    run_cli(main)
