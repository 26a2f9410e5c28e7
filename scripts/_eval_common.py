"""What the evaluation and analysis scripts share: flags, loading an ExtreMA backbone, images, accuracy, output.

The data code (sources, decoding, transforms, labelled loaders) lives in `data_extrema.py` and feature extraction
and kNN in `eval_extrema.py`, so that evaluation reads images exactly as training does.
"""

import contextlib
import copy
import json
import math
import random
import re
import signal
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from safetensors import SafetensorError
from torchvision.transforms import v2
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from cli_extrema import (
    AT_LEAST_0,
    AT_LEAST_1,
    SEED,
    Interrupted,
    check_finite,
    check_ranges,
    prepare_output_dir,
    run_cli,
)
from data_extrema import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    UsageError,
    add_data_args,
    build_image_processor,
    count_examples,
    decode_image,
    default_validation_split,
    example_seed,
    label_fraction_keys,
    labelled_loader,
    labelled_stream,
    load_image_stream,
    load_raw_stream,
    open_dataset,
    split_names,
)


def add_model_args(parser):
    """The model a script reads: --model_name_or_path and the opt-in to the folder's own code."""
    parser.add_argument(
        "--model_name_or_path", required=True, help="an ExtreMA folder (e.g. <train output_dir>/final) or Hub id"
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run the model folder's own Python code instead of this project's classes (only for folders you trust)",
    )


def add_eval_args(parser, batch_size: int = 256):
    """The flags every script takes: the model, the data (the training script's flags), the output, sample caps."""
    add_model_args(parser)
    parser.add_argument("--output_dir", required=True, help="results.json (and PNGs) are written here")
    # with DataLoader workers, "the first N" are the first N / workers of each worker's shards: a fixed subset
    parser.add_argument("--max_train_samples", type=int, help="use only the first N images of the training split")
    parser.add_argument("--max_eval_samples", type=int, help="use only the first N images of the evaluation split")
    parser.add_argument("--batch_size", type=int, default=batch_size, help="per-device batch size")
    parser.add_argument("--seed", type=int, default=0)
    add_data_args(parser)
    return parser


# The ranges of the flags above and of add_image_args (see cli_extrema.check_ranges); each script adds its own.
EVAL_RANGES = {
    "max_train_samples": AT_LEAST_1,
    "max_eval_samples": AT_LEAST_1,
    "batch_size": AT_LEAST_1,
    "seed": SEED,
    "num_workers": AT_LEAST_0,
    "shuffle_buffer_size": AT_LEAST_0,
    "image_index": AT_LEAST_0,
    "panel_size": (lambda value: value >= 16, "at least 16 (pixels)"),
}


def parse_checked(parser, argv=None, ranges: dict | None = None, check=None):
    """Parse `argv`, check every flag against EVAL_RANGES and the script's `ranges` (and with `check(args)`, which
    raises a UsageError), then create and write-probe --output_dir: a mistake stops the script before any work, and
    nothing is written from invalid settings."""
    args = check_ranges(parser.parse_args(argv), {**EVAL_RANGES, **(ranges or {})})
    if check is not None:
        check(args)
    prepare_output_dir(args.output_dir)
    return args


def add_image_args(parser):
    """Flags of the analyses that look at one image."""
    parser.add_argument("--image", help="an image file (default: an image of the dataset, see --image_index)")
    parser.add_argument("--image_index", type=int, default=0, help="which image of --train_split to use")
    parser.add_argument("--panel_size", type=int, default=224, help="side of every picture in the PNG, in pixels")


# ----------------------------------------------------------------------------------------------------------------
# Models: any saved ExtreMA as a backbone, or as a classifier around it


def read_model_config(name_or_path: str) -> dict:
    """The config.json of a model folder or Hub repo, read as JSON: none of the folder's code runs."""
    path = Path(name_or_path)
    if path.is_file():
        raise UsageError(f"--model_name_or_path {name_or_path} is a file; pass the model's folder (with config.json).")
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise UsageError(
                f"--model_name_or_path {name_or_path} has no config.json; pass a folder exported by train_extrema.py "
                "(<output_dir>/final) or converted by scripts/convert_official_checkpoint.py."
            )
    elif path.is_absolute() or str(name_or_path).startswith(".") or str(name_or_path).count("/") > 1:
        raise UsageError(f"--model_name_or_path {name_or_path} does not exist; pass a model folder or a Hub id.")
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(str(name_or_path), "config.json"))
        except Exception as error:  # not a repo id, offline, no such repo, no access
            raise UsageError(
                f"--model_name_or_path {name_or_path!r} is neither a folder nor a Hub model this machine can reach "
                f"({first_line(error)})."
            ) from error
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{file} is not a JSON file ({first_line(error)}); export or download the model again.")
    if not isinstance(config, dict):
        raise UsageError(f"{file} is not a model configuration (a JSON object); export or download it again.")
    return config


def first_line(error, limit: int = 300) -> str:
    """The first line of an exception's message, shortened: what a one-line error can quote."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def register_auto_classes():
    """Map model_type "extrema" to the installed classes in transformers' Auto classes, so that AutoConfig / AutoModel
    & co. load ExtreMA folders with this project's code, without trust_remote_code."""
    from transformers import (
        AutoBackbone,
        AutoConfig,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForPreTraining,
    )

    from configuration_extrema import ExtremaConfig
    from modeling_extrema import ExtremaBackbone, ExtremaForImageClassification, ExtremaForPreTraining, ExtremaModel

    AutoConfig.register("extrema", ExtremaConfig, exist_ok=True)
    for auto, model_class in (
        (AutoModel, ExtremaModel),
        (AutoModelForPreTraining, ExtremaForPreTraining),
        (AutoModelForImageClassification, ExtremaForImageClassification),
        (AutoBackbone, ExtremaBackbone),
    ):
        auto.register(ExtremaConfig, model_class, exist_ok=True)


def load_extrema(name_or_path: str, trust_remote_code: bool = False, **kwargs):
    """The ExtreMA backbone (`ExtremaModel`) of a folder or Hub repo, in eval mode.

    Folders of the pre-training model (student + teacher) give their teacher and classification folders their
    backbone, so any saved ExtreMA model can be evaluated. config.json is read as JSON first and anything but an
    ExtreMA model is refused before any of its code or weights is read. The installed classes load the model;
    `trust_remote_code` (--trust_remote_code) runs the folder's own configuration_/modeling_extrema.py instead.
    Weights that cannot be read (a truncated or corrupt model.safetensors) or are not finite are refused.
    """
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

    config = read_model_config(name_or_path)
    if config.get("model_type") != "extrema":
        raise UsageError(
            f"{name_or_path!r} is a {config.get('model_type')!r} model, not ExtreMA (config model_type 'extrema'). "
            "Pass a folder exported by train_extrema.py (<output_dir>/final) or converted with "
            "scripts/convert_official_checkpoint.py."
        )
    architectures = config.get("architectures") or []
    if trust_remote_code:
        classes, kwargs = (AutoModelForPreTraining, AutoModelForImageClassification, AutoModel), {
            **kwargs, "trust_remote_code": True}  # fmt: skip
    else:
        import modeling_extrema
        from configuration_extrema import ExtremaConfig

        register_auto_classes()
        classes = (
            modeling_extrema.ExtremaForPreTraining,
            modeling_extrema.ExtremaForImageClassification,
            modeling_extrema.ExtremaModel,
        )
        try:
            kwargs["config"] = ExtremaConfig.from_pretrained(name_or_path)
        except (OSError, ValueError, TypeError) as error:
            raise UsageError(f"The config.json of {name_or_path} is invalid: {first_line(error)}") from error
    try:
        if "ExtremaForPreTraining" in architectures:
            model = classes[0].from_pretrained(name_or_path, **kwargs).teacher
        elif "ExtremaForImageClassification" in architectures:
            model = classes[1].from_pretrained(name_or_path, **kwargs).extrema
        else:
            model = classes[2].from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as error:
        raise UsageError(
            f"Cannot load the model {name_or_path}: {first_line(error)}. A truncated or corrupt model.safetensors "
            "gives this: export, convert or download the model again."
        ) from error
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(
                f"The weights of {name_or_path} are not finite (NaN or inf in {name}); nothing can be measured with "
                "them. Use an earlier checkpoint or export."
            )
    return model.eval()


def class_names(args, split: str) -> list[str] | None:
    """The class names of a labelled split's ClassLabel column (`label` ids in order), or None when it has none."""
    builder = open_dataset(args.dataset_name, args.dataset_config, args.train_dir, args.fashion_mnist_dir)
    label_feature = (load_raw_stream(builder, split, args.image_column, args.label_column).features or {}).get("label")
    return list(label_feature.names) if isinstance(label_feature, datasets.ClassLabel) else None


def save_classifier(model, folder, args) -> Path:
    """Save a trained `ExtremaForImageClassification` as a folder others load and use as it is:
    `pipeline("image-classification", model=folder, trust_remote_code=True)` predicts what the script evaluated.

    It holds the weights and the remote code (`save_pretrained`), `id2label` / `label2id` from the training split's
    class names (when its label column is a ClassLabel of as many classes as the model has), and the image processor
    of the evaluation transform (`data_extrema.build_image_processor`). Returns the folder.
    """
    names = class_names(args, args.train_split)
    if names is not None and len(names) == model.config.num_labels:
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: index for index, name in enumerate(names)}
    model.save_pretrained(folder)
    build_image_processor(model.config.image_size).save_pretrained(folder)
    return Path(folder)


def build_classifier(backbone, num_labels: int, pooling: str, **config_overrides):
    """`ExtremaForImageClassification` over a copy of `backbone`'s weights, with a fresh head.

    pooling "cls": non-affine BatchNorm + Linear on the class token (the linear probe); "mean": LayerNorm + Linear on
    the mean patch token (fine-tuning). The class comes from the module the backbone was loaded from, so a Hub
    model's own remote code is used even when its config does not map AutoModelForImageClassification.
    """
    config = copy.deepcopy(backbone.config)
    config.num_labels, config.classifier_pooling = num_labels, pooling
    for name, value in config_overrides.items():
        setattr(config, name, value)
    model = sys.modules[type(backbone).__module__].ExtremaForImageClassification(config)
    model.extrema.load_state_dict(backbone.state_dict())
    return model


# ----------------------------------------------------------------------------------------------------------------
# Data: labelled splits through data_extrema's streaming code, and accuracy on them


def split_loader(args, split: str, transform, max_samples: int | None = None, builder=None, **options):
    """`data_extrema.labelled_loader` of a split of the dataset that the data flags name (`add_data_args`), read
    as they say: --image_column / --label_column, --num_workers, --seed, --shuffle_buffer_size and --batch_size (unless
    `options` give `batch_size`). `builder`: the dataset already open."""
    if builder is None:
        builder = open_dataset(args.dataset_name, args.dataset_config, args.train_dir, args.fashion_mnist_dir)
    stream = labelled_stream(builder, split, args.image_column, args.label_column)
    if "batch_size" not in options:
        options["batch_size"] = args.batch_size
    return labelled_loader(
        stream, transform, num_workers=args.num_workers, seed=args.seed, max_samples=max_samples,
        shuffle_buffer_size=args.shuffle_buffer_size, **options,
    )  # fmt: skip


def label_fraction_subset(args, split: str) -> set[int] | None:
    """The images of --label_fraction in a split (`data_extrema.label_fraction_keys` of --seed); None without it."""
    if not args.label_fraction:
        return None
    builder = open_dataset(args.dataset_name, args.dataset_config, args.train_dir, args.fashion_mnist_dir)
    stream = labelled_stream(builder, split, args.image_column, args.label_column)
    return label_fraction_keys(stream, args.label_fraction, args.seed)


def resolve_validation_split(args) -> str:
    """--validation_split, else the dataset's 'validation' or 'test' split (`default_validation_split`). A split the
    dataset does not have (--train_split too) is refused here, before any features are computed."""
    builder = open_dataset(args.dataset_name, args.dataset_config, args.train_dir, args.fashion_mnist_dir)
    names = split_names(builder)
    for flag, split in (("--train_split", args.train_split), ("--validation_split", args.validation_split)):
        if split and names and split not in names:
            raise UsageError(f"The dataset has no split {split!r} ({flag}); its splits are {names}.")
    if args.validation_split:
        return args.validation_split
    split = default_validation_split(builder)
    if split is None:
        raise UsageError(
            f"The dataset has no 'validation' or 'test' split (it has {split_names(builder)}); name one with "
            "--validation_split."
        )
    return split


def split_size_and_classes(args, split: str, max_samples: int | None = None) -> tuple[int, int]:
    """(number of images, number of classes) of a labelled split, capped at `max_samples` images.

    Read from the dataset's metadata (split sizes, a ClassLabel column) when it has them, else by reading the label
    column of the (capped) split once, without decoding images.
    """
    builder = open_dataset(args.dataset_name, args.dataset_config, args.train_dir, args.fashion_mnist_dir)
    raw = load_raw_stream(builder, split, args.image_column, args.label_column)
    if "label" not in (raw.column_names or ["label"]):
        raise UsageError(f"The split {split!r} has no label column; name it with --label_column.")
    size = count_examples(builder, split)
    label_feature = (raw.features or {}).get("label")
    num_classes = label_feature.num_classes if isinstance(label_feature, datasets.ClassLabel) else None
    if size is None or num_classes is None:
        labels = [row["label"] for row in (raw.take(max_samples) if max_samples else raw)]
        size, num_classes = len(labels), num_classes or max(labels) + 1
    return (min(size, max_samples) if max_samples else size), num_classes


def image_stream(args, split: str, max_samples: int | None = None):
    """Rows {"image": RGB PIL, "label"?} of a split: the first `max_samples` decodable images (a fixed subset)."""
    stream = load_image_stream(
        dataset_name=args.dataset_name,
        dataset_config=args.dataset_config,
        train_dir=args.train_dir,
        split=split,
        image_column=args.image_column,
        label_column=args.label_column,
        fashion_mnist_dir=args.fashion_mnist_dir,
    )
    if max_samples is not None:
        stream = stream.take(max_samples)
    return stream


def read_image_file(path, flag: str):
    """An image file as an RGB PIL image, decoded as training decodes (16-bit and float pixels scaled to 8 bits)."""
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path} is not a file; give the path of an image (PNG, JPEG, TIFF...).")
    image = decode_image(str(path))
    if image is None:
        raise UsageError(f"{flag} {path} cannot be read as an image; give a PNG, JPEG, TIFF... file.")
    return image


def load_image(args):
    """One RGB PIL image: the file --image, else image number --image_index of --train_split."""
    if args.image:
        return read_image_file(args.image, "--image")
    row = next(iter(image_stream(args, args.train_split).skip(args.image_index).take(1)), None)
    if row is None:
        raise UsageError(
            f"The split {args.train_split!r} has fewer than {args.image_index + 1} images; lower --image_index."
        )
    return row["image"]


# ----------------------------------------------------------------------------------------------------------------
# Training: the loop of the linear probe and of fine-tuning


def train_classifier(
    model, optimizer, loader, accelerator, *, loss_fn, scheduler, num_epochs: int, total_steps: int,
    max_grad_norm: float | None = None, frozen=None, desc: str = "train",
) -> tuple[int, float]:  # fmt: skip
    """Train a prepared classifier for `num_epochs` passes over `loader`; returns (optimizer steps, last loss).

    loss_fn(model, batch) -> scalar loss; `scheduler`: the learning rates (e.g. transformers'
    `get_cosine_schedule_with_warmup`), stepped once per optimizer step. It is not passed through
    `accelerator.prepare`, which would step it once per process. Gradients accumulate over the Accelerator's
    `gradient_accumulation_steps` batches per optimizer step. `frozen` (a submodule: the probe's backbone) stays in
    eval mode, so that its dropout, drop path and BatchNorm statistics do not change while the head trains.
    """
    step, loss = 0, torch.tensor(float("nan"))
    progress = tqdm(total=total_steps, desc=desc, disable=not accelerator.is_main_process)
    for epoch in range(num_epochs):
        loader.set_epoch(epoch)  # a new shuffle of the same images
        model.train()
        if frozen is not None:
            frozen.eval()
        for batch in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                accelerator.backward(loss)
                if max_grad_norm and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()  # the prepared optimizer steps only once the gradients are accumulated
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                lr = max(scheduler.get_last_lr())  # the step's largest lr (layer decay scales the others down)
                scheduler.step()
                step += 1
                progress.update(1)
                progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
                if not math.isfinite(loss.item()):  # a NaN head scores something: never a result
                    raise UsageError(
                        f"The loss is {loss.item()} at step {step} (lr {lr:.3g}); nothing was written. Lower "
                        "--learning_rate, or set --max_grad_norm where the script has it."
                    )
    progress.close()
    return step, loss.item()


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict:
    """Top-1 / top-5 accuracy in % over the whole loader (all processes)."""
    model.eval()
    correct1 = correct5 = total = 0
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not accelerator.is_main_process):
        logits = model(batch["pixel_values"]).logits
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        top5, labels = accelerator.gather_for_metrics((top5, batch["label"]))
        correct1 += (top5[:, 0] == labels).sum().item()
        correct5 += (top5 == labels[:, None]).any(dim=1).sum().item()
        total += labels.shape[0]
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "num_eval": total}


# ----------------------------------------------------------------------------------------------------------------
# Pictures: normalised tensors back to [0, 1], heat maps, boxes, grids


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> the model's input (ImageNet normalisation, as build_eval_transform does)."""
    return v2.functional.normalize(images, IMAGENET_MEAN, IMAGENET_STD)


def denormalize(pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's input -> [0, 1] pixels, for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixel_values.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixel_values.device).view(-1, 1, 1)
    return (pixel_values * std + mean).clamp(0, 1)


def resize_panel(image: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(3, h, w) -> (3, size, size)."""
    return torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode=mode)[0].clamp(0, 1)


def overlay(image: torch.Tensor, heat: torch.Tensor, color=(1.0, 0.0, 0.0), alpha: float = 0.7) -> torch.Tensor:
    """Blend `color` over a (3, S, S) image where heat (h, w) is high; heat is rescaled to [0, 1] first.

    The map is upsampled with nearest neighbours, so that each patch stays one visible square.
    """
    heat = heat.float()
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    heat = torch.nn.functional.interpolate(heat[None, None], size=image.shape[-2:], mode="nearest")[0]  # (1, S, S)
    tint = torch.tensor(color, dtype=image.dtype).view(3, 1, 1)
    return image * (1 - alpha * heat) + tint * alpha * heat


def frame(image: torch.Tensor, color, width: int = 3) -> torch.Tensor:
    """Paint a border of `width` pixels in `color` inside a (3, S, S) image."""
    image = image.clone()
    tint = torch.tensor(color, dtype=image.dtype).view(3, 1, 1)
    image[:, :width], image[:, -width:] = tint, tint
    image[:, :, :width], image[:, :, -width:] = tint, tint
    return image


def draw_box(image: torch.Tensor, box, color, width: int = 2) -> torch.Tensor:
    """A rectangle (x0, y0, x1, y1) in pixel coordinates of the (3, S, S) image."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    image = image.clone()
    patch = frame(image[:, y0:y1, x0:x1], color, min(width, (y1 - y0 + 1) // 2, (x1 - x0 + 1) // 2))
    image[:, y0:y1, x0:x1] = patch
    return image


GRID_PADDING = 2


def wrap_text(text: str, font, width: float) -> list[str]:
    """Greedy word wrap of `text` into lines at most `width` pixels wide in `font` (a longer word stays whole)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            if line and font.getlength(f"{line} {word}") > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
    return lines


def text_band(width: int, blocks, font) -> torch.Tensor:
    """A white (3, h, width) strip of text. blocks: (x, max width, text, colour or None) each wrapped into its column
    from the top; a colour puts a square swatch of it before the text (a legend entry)."""
    import PIL.Image
    import PIL.ImageDraw

    line_height, swatch = round(font.size * 1.25), font.size
    wrapped = [(x, wrap_text(text, font, max_width - (swatch + 4 if color else 0)), color)
               for x, max_width, text, color in blocks]  # fmt: skip
    height = max((len(lines) for _, lines, _ in wrapped if any(lines)), default=0) * line_height
    band = PIL.Image.new("RGB", (width, height + 4 if height else 0), "white")
    draw = PIL.ImageDraw.Draw(band)
    for x, lines, color in wrapped:
        if color:
            draw.rectangle((x, 4, x + swatch - 1, 3 + swatch), fill=tuple(round(255 * c) for c in color))
            x += swatch + 4
        for i, line in enumerate(lines):
            draw.text((x, 2 + i * line_height), line, fill="black", font=font)
    return v2.functional.to_dtype(v2.functional.to_image(band), torch.float32, scale=True)


def save_grid(panels: list[torch.Tensor], path, ncols: int, title: str, captions=(), legend=()) -> tuple[int, int]:
    """Save equal-size (3, S, S) panels as one PNG that explains itself; returns (width, height) in pixels.

    From the top: `title`, then the panels row by row with a 2-pixel white gap around each (ncols * (S + 2) + 2
    pixels wide), each row above the captions of its panels (`captions[i]` under panel i, "" for none), then the
    `legend`: (colour or None, text) entries, one per line, a colour drawn as a swatch.
    """
    import PIL.ImageFont

    size = panels[0].shape[-1]
    font = PIL.ImageFont.load_default(size=min(16, max(10, size // 14)))
    title_font = PIL.ImageFont.load_default(size=font.size + 2)
    width = ncols * (size + GRID_PADDING) + GRID_PADDING
    strips = [text_band(width, [(GRID_PADDING, width - 2 * GRID_PADDING, title, None)], title_font)]
    captions = list(captions) + [""] * (len(panels) - len(captions))
    for start in range(0, len(panels), ncols):
        row = panels[start : start + ncols]
        row = row + [torch.ones_like(panels[0])] * (ncols - len(row))
        strips.append(make_grid(torch.stack(row), nrow=ncols, padding=GRID_PADDING, pad_value=1.0))
        strips.append(
            text_band(width, [(GRID_PADDING + i * (size + GRID_PADDING), size, caption, None)
                              for i, caption in enumerate(captions[start : start + ncols])], font)
        )  # fmt: skip
    for color, text in legend:
        strips.append(text_band(width, [(GRID_PADDING, width - 2 * GRID_PADDING, text, color)], font))
    picture = torch.cat(strips, dim=1)  # (3, H, width)
    save_image(picture, path)
    return picture.shape[2], picture.shape[1]


COLORS = [(1.0, 0.1, 0.1), (0.1, 0.8, 0.1), (0.2, 0.4, 1.0), (0.9, 0.1, 0.9), (0.0, 0.9, 0.9), (1.0, 0.5, 0.0)]


# ----------------------------------------------------------------------------------------------------------------
# Training runs (fine-tuning, segmentation): flags, layer-wise lr decay, draws that survive a resume, stopping


def add_run_args(parser, checkpointing_steps: str):
    """Saving, resuming, stopping and logging a training run, as train_extrema.py does them."""
    group = parser.add_argument_group("running it")
    group.add_argument(
        "--checkpointing_steps", default=checkpointing_steps,
        help="save the training state every N steps, 'epoch' (fine-tuning), or 'no'",
    )  # fmt: skip
    group.add_argument("--keep_checkpoints", type=int, default=2, help="how many recent checkpoints to keep (0: all)")
    group.add_argument("--resume_from_checkpoint", help="'latest' (in --output_dir) or a checkpoint folder")
    group.add_argument("--stop_after_steps", type=int, help="stop after N steps of this run (for time-limited jobs)")
    group.add_argument("--logging_steps", type=int, default=10)
    group.add_argument("--report_to", default="tensorboard", choices=("tensorboard", "wandb", "trackio", "none"))
    return group


RUN_RANGES = {"keep_checkpoints": AT_LEAST_0, "stop_after_steps": AT_LEAST_0, "logging_steps": AT_LEAST_1}


def run_accelerator(args):
    """The Accelerator of a training run: --mixed_precision (auto as train_extrema.py resolves it), trackers of
    --report_to logging to <output_dir>/logs."""
    # imported here: train_extrema imports the installed modeling_extrema, which a --trust_remote_code load must not
    # find already imported by every script that reads this module
    from train_extrema import resolve_mixed_precision

    return Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/logs"),
    )


def check_run_args(args, choices=("epoch", "no")):
    """--checkpointing_steps (a number or one of `choices`) and --resume_from_checkpoint, before anything is written."""
    steps = args.checkpointing_steps
    if steps not in choices and not (steps.isdigit() and int(steps) > 0):
        names = " or ".join(repr(choice) for choice in choices)
        raise UsageError(f"--checkpointing_steps takes a number of steps or {names}; got {steps!r}.")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint folder.")
    return args


def checkpoint_interval(args) -> int:
    """--checkpointing_steps as a number of steps (0: not every N steps)."""
    return int(args.checkpointing_steps) if args.checkpointing_steps.isdigit() else 0


def layer_id(name: str, num_layers: int, prefix: str) -> int:
    """Depth of a parameter for layer-wise lr decay, its backbone's parameters named `prefix`.*: the patch embedding
    0, ViT block i is i + 1, the rest (class attention, final norm, heads) num_layers + 1."""
    if name.startswith(f"{prefix}.embeddings."):
        return 0
    block = re.match(rf"{re.escape(prefix)}\.encoder\.layer\.(\d+)\.", name)
    return int(block.group(1)) + 1 if block else num_layers + 1


def layer_decay_param_groups(model, weight_decay: float, layer_decay: float, prefix: str, num_layers: int):
    """AdamW groups with lr_scale = layer_decay ** (depth from the top), BEiT's layer-wise lr decay; no weight decay
    on vectors (norms, biases, position tables) or the class token."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = layer_id(name, num_layers, prefix)
        no_decay = param.ndim < 2 or name.endswith("cls_token")
        group = groups.setdefault(
            (depth, no_decay),
            {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
             "lr_scale": layer_decay ** (num_layers + 1 - depth)},
        )  # fmt: skip
        group["params"].append(param)
    return list(groups.values())


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Run a block with python's, numpy's and torch's (CPU) global RNGs seeded by `seed`, restoring them after, so that
    the block's draws depend on the seed alone and the draws around it are unchanged."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededTransform:
    """A random transform (torchvision's and timm's draw from the global RNGs) made a function of (seed, epoch,
    image): each image's augmentation is drawn from `example_seed` of its content, so it does not depend on the
    DataLoader worker, on what was drawn before, or on whether the run resumed. Set `epoch` before iterating the
    epoch's loader. `key(*inputs)` gives the content to seed from (default: the first input's pixels)."""

    def __init__(self, transform, seed: int, key=None):
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.key = key or (lambda image, *rest: image.tobytes())

    def __call__(self, *inputs):
        with seeded_rngs(example_seed(self.seed, self.epoch, self.key(*inputs))):
            return self.transform(*inputs)

    def __repr__(self):
        return f"SeededTransform(seed={self.seed}, epoch={self.epoch}, {self.transform!r})"


def step_seed(seed: int, step: int, process_index: int) -> int:
    """The seed of an optimizer step's draws on one process (mixup, drop path)."""
    return ((seed * 1_000_003 + step) * 1024 + process_index) % 2**32


class EvalHistory:
    """The evaluations so far ({"step", ...}), saved with the checkpoints (`register_for_checkpointing`)."""

    def __init__(self):
        self.rows = []

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.rows = list(state["rows"])


def stop_on_signal(accelerator, received: int, step: int, total_steps: int, folder: Path):
    """End a run that SIGTERM / Ctrl-C asked to stop, its state saved in `folder`: `Interrupted`, with the line that
    says how to resume."""
    accelerator.end_training()
    raise Interrupted(
        f"stopped by {signal.Signals(received).name} at step {step} of {total_steps}; the state is saved in {folder}. "
        "Resume with the same flags and --resume_from_checkpoint latest.",
        128 + received,
    )


def write_results(output_dir, results: dict) -> Path:
    """Write <output_dir>/results.json and print it, leaving long lists (maps, rankings) out of the print."""
    check_finite("results", results)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({key: value for key, value in results.items() if len(json.dumps(value)) <= 200}, indent=2))
    print(f"All results: {path}")
    return path


def run(main):
    """Run a script's main() from the command line: user errors as one line, without a traceback (`run_cli`)."""
    run_cli(main)
