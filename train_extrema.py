"""Pre-train ExtreMA with accelerate, streaming images through `datasets`: one CPU to many GPUs, resumable.

    python train_extrema.py                                      # tiny ViT on Fashion-MNIST, a few minutes on a CPU
    python train_extrema.py --train_dir path/to/cifar10          # a local folder of Parquet shards or images
    accelerate launch --multi_gpu --num_processes 8 train_extrema.py --recipe vit-base-mask08x5-color

References: Wu et al. 2022, "Extreme Masking for Learning Instance and Distributed Visual Representations" (sections 3
and 5.1: AdamW (0.9, 0.95), wd 0.1, lr 1.5e-4 x batch / 256, warm-up + cosine, EMA 0.996 -> 1 on a cosine); the
official code github.com/microsoft/ExtreMA (main.py, lib/augment.py); Wu et al. 2018 for the weighted kNN monitor.

Reading order: data (where images come from), augmentations, the training stream and its resumable position,
kNN evaluation, schedules, export, command line, training loop.

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
import gzip
import io
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from datasets.distributed import split_dataset_by_node
from torchvision.transforms import v2
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the model files sit beside this script

from configuration_extrema import PRESETS, ExtremaConfig  # noqa: E402
from modeling_extrema import ExtremaForPreTraining, collapse_statistics  # noqa: E402

logger = logging.getLogger("train_extrema")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist package puts it
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Names tried, in order, when a dataset's image / label column is not given (Parquet: image/label, CIFAR on the Hub:
# img/label, WebDataset shards: jpg/cls ...). A column typed `Image` / `ClassLabel` is preferred over any name.
IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_COLUMN_NAMES = ("label", "labels", "cls", "class", "target", "fine_label")


class UsageError(ValueError):
    """A mistake in the command line or the data that the user can fix; printed without a traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Data: rows of {"image", "label"} streamed from the Hub, a local folder, or the Fashion-MNIST default


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The data flags shared by training and evaluation scripts."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", help="a Hub dataset, e.g. ILSVRC/imagenet-1k, timm/imagenet-1k-wds")
    group.add_argument("--dataset_config", help="the configuration (subset) of --dataset_name")
    group.add_argument(
        "--train_dir", help="a local folder of Parquet shards, WebDataset .tar shards, or images (imagefolder)"
    )
    group.add_argument("--train_split", default="train")
    group.add_argument(
        "--validation_split", help="labelled split for kNN accuracy (default: 'validation' or 'test' if present)"
    )
    group.add_argument("--image_column", help="image column (default: detected)")
    group.add_argument("--label_column", help="label column (default: detected; none for unlabelled data)")
    group.add_argument("--num_workers", type=int, default=2, help="DataLoader workers per process")
    group.add_argument(
        "--shuffle_buffer_size", type=int, default=1000, help="streaming shuffle buffer per worker (0: no shuffling)"
    )
    group.add_argument(
        "--fashion_mnist_dir",
        default=FASHION_MNIST_DIR,
        help="IDX files used when neither --dataset_name nor --train_dir is given",
    )
    return parser


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic (2 zero bytes, dtype 0x08 = uint8, ndim), big-endian dims, data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise UsageError(f"{path} is not a uint8 IDX file; is the Fashion-MNIST download complete?")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def prepare_fashion_mnist(source_dir=FASHION_MNIST_DIR, cache_dir=None) -> Path:
    """Convert Fashion-MNIST's IDX files once to Parquet shards (PNG images, ClassLabel labels); returns the folder.

    The shards have the layout of image datasets on the Hub, so the default run streams them through exactly the code
    path that streams ImageNet. The conversion writes to a temporary folder and renames it, so concurrent processes
    never see half a cache.
    """
    source_dir = Path(source_dir)
    names = {"train": "train", "test": "t10k"}
    missing = [f"{p}-{k}-idx{d}-ubyte.gz" for p in names.values() for k, d in (("images", 3), ("labels", 1))]
    missing = [name for name in missing if not (source_dir / name).exists()]
    if missing:
        raise UsageError(
            f"Fashion-MNIST (the default training data) is not in {source_dir} (missing {', '.join(missing)}). "
            "Install it with `apt-get install dataset-fashion-mnist`, point --fashion_mnist_dir at the IDX files, "
            "or train on other data with --train_dir DIR or --dataset_name NAME."
        )
    cache_dir = Path(cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "extrema" / "fashion-mnist-parquet")
    if (cache_dir / ".complete").exists():
        return cache_dir
    tmp_dir = cache_dir.with_name(f"{cache_dir.name}.tmp-{os.getpid()}")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()  # eight "Creating parquet" bars say nothing
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))}
    )
    for split, prefix in names.items():
        images = _read_idx(source_dir / f"{prefix}-images-idx3-ubyte.gz")  # (N, 28, 28)
        labels = _read_idx(source_dir / f"{prefix}-labels-idx1-ubyte.gz")  # (N,)
        num_shards = 6 if split == "train" else 2  # several shards so that ranks and workers can split them
        for shard, indices in enumerate(np.array_split(np.arange(len(images)), num_shards)):
            pngs = []
            for i in indices:
                buffer = io.BytesIO()
                PIL.Image.fromarray(images[i]).save(buffer, format="PNG")
                pngs.append({"bytes": buffer.getvalue(), "path": None})
            table = datasets.Dataset.from_dict({"image": pngs, "label": labels[indices].tolist()}, features=features)
            table.to_parquet(str(tmp_dir / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"))
    (tmp_dir / ".complete").touch()
    try:
        tmp_dir.rename(cache_dir)
    except OSError:  # another process finished first
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return cache_dir


def _local_format(data_dir: Path) -> str:
    """The `datasets` packaged builder for a local folder: Parquet shards, WebDataset tars, or an image folder."""
    for path in itertools.islice(data_dir.rglob("*"), 10_000):  # an image folder can hold millions of files
        if path.suffix.lower() == ".parquet":
            return "parquet"
        if path.suffix.lower() == ".tar":
            return "webdataset"
    return "imagefolder"


def open_dataset(dataset_name=None, dataset_config=None, train_dir=None, fashion_mnist_dir=FASHION_MNIST_DIR):
    """A `datasets` builder for the data source (not downloaded: only its split files and metadata are resolved)."""
    if dataset_name and train_dir:
        raise UsageError("Give either --dataset_name or --train_dir, not both.")
    if not dataset_name and not train_dir:
        train_dir = prepare_fashion_mnist(fashion_mnist_dir)
    try:
        if train_dir:
            train_dir = Path(train_dir)
            if not train_dir.is_dir():
                raise UsageError(f"--train_dir {train_dir} is not a folder.")
            return datasets.load_dataset_builder(_local_format(train_dir), data_dir=str(train_dir))
        return datasets.load_dataset_builder(dataset_name, dataset_config)
    except (FileNotFoundError, ConnectionError) as error:
        raise UsageError(
            f"Cannot open the dataset {dataset_name or train_dir!r}: {error}. Check the name on the Hub (and "
            "`huggingface-cli login` for gated datasets such as ILSVRC/imagenet-1k), or pass a local folder with "
            "--train_dir."
        ) from error


def split_names(builder) -> list[str]:
    if builder.info.splits:
        return list(builder.info.splits)
    return [str(split) for split in (builder.config.data_files or {})]


def count_examples(builder, split: str) -> int | None:
    """Rows in a split, from the dataset card, the Parquet footers, or the image files; None if unknown."""
    if builder.info.splits and split in builder.info.splits and builder.info.splits[split].num_examples:
        return builder.info.splits[split].num_examples
    files = {str(k): v for k, v in (builder.config.data_files or {}).items()}.get(split)
    if not files:
        return None
    if all(str(f).endswith(".parquet") for f in files):
        import pyarrow.parquet as pq

        total = 0
        for f in files:
            with datasets.utils.file_utils.xopen(f, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total
    if builder.name == "imagefolder":
        return sum(1 for f in files if Path(str(f)).suffix.lower() in PIL.Image.registered_extensions())
    return None


def detect_columns(features, image_column=None, label_column=None) -> tuple[str, str | None]:
    """The image column and the label column (None when the dataset has no labels)."""
    names = list(features or {})
    if image_column is None:
        typed = [n for n, f in (features or {}).items() if isinstance(f, datasets.Image)]
        named = [n for n in IMAGE_COLUMN_NAMES if n in names]
        if not typed + named:
            raise UsageError(f"No image column among the dataset's columns {names}; name it with --image_column.")
        image_column = (typed + named)[0]
    elif names and image_column not in names:
        raise UsageError(f"--image_column {image_column!r} is not a column of the dataset; columns: {names}.")
    if label_column is None:
        typed = [n for n, f in (features or {}).items() if isinstance(f, datasets.ClassLabel)]
        named = [n for n in LABEL_COLUMN_NAMES if n in names]
        label_column = (typed + named + [None])[0]
    elif names and label_column not in names:
        raise UsageError(f"--label_column {label_column!r} is not a column of the dataset; columns: {names}.")
    return image_column, label_column


def load_raw_stream(builder, split="train", image_column=None, label_column=None) -> datasets.IterableDataset:
    """Stream of rows {"image": undecoded ({"bytes", "path"}), "label"?}: cheap to skip and to shuffle."""
    try:
        ds = builder.as_streaming_dataset(split=split)
    except ValueError as error:  # datasets: "Bad split: X. Available splits: [...]"
        raise UsageError(f"The dataset has no split {split!r}; its splits are {split_names(builder)}.") from error
    features = ds.features
    if features is None:  # some streaming formats only know their columns after the first row
        features = dict.fromkeys(next(iter(ds)))
    image_column, label_column = detect_columns(features, image_column, label_column)
    columns = [image_column] + ([label_column] if label_column else [])
    ds = ds.select_columns(columns)
    if isinstance(features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # we decode, so bad images can be skipped
    renames = {image_column: "image", **({label_column: "label"} if label_column else {})}
    return ds.rename_columns({old: new for old, new in renames.items() if old != new})


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode to RGB; transparent pixels (RGBA, LA, palette with transparency) are laid on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")  # L, I;16, P, CMYK, YCbCr, ...


_IMAGE_DECODER = datasets.Image()


def decode_image(value) -> PIL.Image.Image | None:
    """A raw image cell (bytes / path dict, bytes, path, PIL image, array) as an RGB PIL image; None if undecodable."""
    try:
        if isinstance(value, PIL.Image.Image):
            image = value
        elif isinstance(value, np.ndarray):
            image = PIL.Image.fromarray(value)
        elif isinstance(value, (bytes, bytearray)):
            image = PIL.Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            image = _IMAGE_DECODER.decode_example({"path": value, "bytes": None})
        else:
            image = _IMAGE_DECODER.decode_example(value)
        image.load()
        return to_rgb(image)
    except Exception:  # truncated files, HTML error pages, decompression bombs...: skip, never stop training
        return None


def _decode_row(row):
    return {**row, "image": decode_image(row["image"])}


def _is_decoded(row) -> bool:
    if row["image"] is None:
        logger.warning("Skipping an image that cannot be decoded.")
        return False
    return True


def load_image_stream(
    dataset_name=None,
    dataset_config=None,
    train_dir=None,
    split="train",
    image_column=None,
    label_column=None,
    fashion_mnist_dir=FASHION_MNIST_DIR,
) -> datasets.IterableDataset:
    """Stream rows {"image": RGB PIL image, "label": int (absent for unlabelled data)} from one split.

    Sources: a Hub dataset (`dataset_name`, `dataset_config`), a local folder (`train_dir`), or Fashion-MNIST when
    neither is given. Nothing is downloaded whole. Images that cannot be decoded are skipped with a warning.
    """
    builder = open_dataset(dataset_name, dataset_config, train_dir, fashion_mnist_dir)
    raw = load_raw_stream(builder, split, image_column, label_column)
    return raw.map(_decode_row).filter(_is_decoded)


# ----------------------------------------------------------------------------------------------------------------
# Augmentations (paper Table 4), torchvision.transforms.v2


def _normalize():
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def build_eval_transform(image_size: int, crop_pct: float = 0.875):
    """Resize the short side to image_size / crop_pct, center crop, ImageNet normalisation: image -> (3, S, S)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(image_size / crop_pct), antialias=True),
            v2.CenterCrop(image_size),
            _normalize(),
        ]
    )


class PairTransform:
    """image -> (student_view, teacher_view): `shared` runs once, then `student` and `teacher` each on its result.

    When both branch transforms are None the two views are the same tensor (one augmentation for both branches).
    """

    def __init__(self, shared, student=None, teacher=None):
        self.shared, self.student, self.teacher = shared, student, teacher

    def __call__(self, image):
        image = self.shared(image)
        if self.student is None:
            return image, image
        return self.student(image), self.teacher(image)

    def __repr__(self):
        return f"PairTransform(shared={self.shared}, student={self.student}, teacher={self.teacher})"


AUGMENTATIONS = ("center", "color", "crop", "crop_color", "shared_crop_color")
# The colour augmentation of the paper (BYOL's, as in the official lib/augment.py): jitter of brightness, contrast,
# saturation and hue, applied with probability 0.8 in a random order, then grayscale with probability 0.2.
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)
COLOR_JITTER_P, GRAYSCALE_P = 0.8, 0.2


def build_train_transform(
    augmentation: str, image_size: int, crop_min: float = 0.2, color_on_device: bool = False
) -> PairTransform:
    """The augmentations of Table 4; the student's view is the one that gets masked.

    - center: resize + center crop, the same view for both branches (no augmentation);
    - color / crop: ONE colour (jitter + grayscale) or ONE random-resized-crop + flip view, shared by both branches;
    - crop_color: two independent crop + flip + colour views (MoCo v3 style);
    - shared_crop_color (the released models): one crop + flip shared by both branches, then two independent colour
      augmentations, jitter (0.4, 0.4, 0.2, 0.1) with p 0.8 and grayscale with p 0.2.

    With `color_on_device`, the views that have a colour part end as (uint8 image, colour parameters) pairs: the
    worker only decodes, crops and flips, and draws the colour choices (`ColorParameters`); `color_augment` applies
    them to the whole batch on the accelerator. The colour part is ~70% of a worker's time on ImageNet JPEGs.
    """
    center = [v2.Resize(int(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    crop = [v2.RandomResizedCrop(image_size, scale=(crop_min, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    if color_on_device:
        color, normalize = [ColorParameters()], []
    else:
        jitter = v2.ColorJitter(*COLOR_JITTER)
        color = [v2.RandomApply([jitter], p=COLOR_JITTER_P), v2.RandomGrayscale(p=GRAYSCALE_P)]
        normalize = [_normalize()]
    if augmentation == "center":
        return PairTransform(v2.Compose([v2.ToImage(), *center, _normalize()]))
    if augmentation == "color":
        return PairTransform(v2.Compose([v2.ToImage(), *center, *color, *normalize]))
    if augmentation == "crop":
        return PairTransform(v2.Compose([v2.ToImage(), *crop, _normalize()]))
    if augmentation == "crop_color":
        view = v2.Compose([*crop, *color, *normalize])
        return PairTransform(v2.ToImage(), view, view)
    if augmentation == "shared_crop_color":
        view = v2.Compose([*color, *normalize])
        return PairTransform(v2.Compose([v2.ToImage(), *crop]), view, view)
    raise UsageError(f"Unknown augmentation {augmentation!r}; choose one of {AUGMENTATIONS}.")


# ----------------------------------------------------------------------------------------------------------------
# Colour augmentation on the accelerator: the worker draws the choices, the device applies them to the batch


class ColorParameters:
    """image -> (image, params (10,)): the random choices of the colour augmentation, drawn but not applied.

    params = [jitter applied, brightness, contrast, saturation, hue, the 4 jitter ops in their order, grayscale]; the
    factors are neutral (1, 1, 1, 0) and the order 0-3 where the jitter is not applied. The draws are torchvision
    v2's own, call for call: `RandomApply.forward` (torch.rand(1) >= p skips), `ColorJitter.make_params`
    (torch.randperm(4), then one `uniform_` per factor, via `_generate_value`), `_RandomApplyTransform.forward` of
    `RandomGrayscale` (torch.rand(1) >= p skips). So under a per-image seed both paths make the same choices and draw
    the same mask noise after them, and exact resume holds either way.
    """

    def __init__(self):
        jitter = v2.ColorJitter(*COLOR_JITTER)  # its (min, max) ranges: brightness (0.6, 1.4), ..., hue (-0.1, 0.1)
        self.ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]

    def __call__(self, image):
        params = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0, 1, 2, 3, 0.0])
        if torch.rand(1) < COLOR_JITTER_P:
            params[0] = 1.0
            params[5:9] = torch.randperm(4)
            params[1:5] = torch.tensor([torch.empty(1).uniform_(low, high).item() for low, high in self.ranges])
        params[9] = float(torch.rand(1) < GRAYSCALE_P)
        return image, params

    def __repr__(self):
        return "ColorParameters()"


def _grayscale(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 1, S, S): ITU-R 601-2 luma, the weights of torchvision's `rgb_to_grayscale`."""
    r, g, b = image.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _adjust_hue(image: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by hue[i] turns: RGB -> HSV -> RGB as torchvision's tensor `adjust_hue`.

    The rotation keeps the value V (max channel) and max - min, so the way back is, per channel, V - (V - min) *
    clamp(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6 and n = 5, 3, 1 for R, G, B: torchvision's (v, p, q, t) table
    in closed form.
    """
    r, g, b = image.unbind(1)  # (B, S, S) each
    maxc, minc = image.amax(1), image.amin(1)
    delta = maxc - minc
    d = torch.where(delta == 0, 1.0, delta)  # gray pixels: any hue, the result is V
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = (h / 6.0 + hue[:, None, None]).remainder(1.0)  # (B, S, S), in turns
    n = torch.arange(5.0, 0.0, -2.0, device=image.device)[None, :, None, None]  # 5, 3, 1
    k = (n + 6.0 * h[:, None]).remainder(6.0)  # (B, 3, S, S)
    return maxc[:, None] - delta[:, None] * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_colors(image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] (B, 3, S, S) + `ColorParameters` rows (B, 10) -> the colour-augmented images (B, 3, S, S).

    The batched form of `RandomApply([ColorJitter(...)])` + `RandomGrayscale`, with torchvision's float formulas and
    clamping after each op. At each of the 4 order positions every image gets its own op: brightness, contrast and
    saturation are blends `clamp(f * x + (1 - f) * y)` with y = 0, the mean of the grayscale image, or the grayscale
    image, computed for all images and kept where they apply; hue, the costly one (HSV and back), runs only on the
    images whose op it is. Those are found on the CPU copy of `params` (the loader's), so the device never waits.
    """
    device = image.device
    ops = torch.where(params[:, :1] > 0, params[:, 5:9].long(), -1)  # (B, 4): op at each position, -1: no jitter
    op_at, factors = ops.to(device, non_blocking=True), params[:, 1:5].to(device, non_blocking=True)

    def per_image(values):  # (B,) -> (B, 1, 1, 1), to broadcast over an image
        return values[:, None, None, None]

    for position in range(4):
        op = op_at[:, position]  # (B,): 0 brightness, 1 contrast, 2 saturation, 3 hue, -1 none
        factor = per_image(factors.gather(1, op.clamp(min=0)[:, None])[:, 0])  # (B, 1, 1, 1)
        luma = _grayscale(image)  # (B, 1, S, S)
        target = torch.where(per_image(op == 1), luma.mean((-2, -1), keepdim=True), luma) * per_image(op != 0)
        blended = torch.lerp(target, image, factor).clamp_(0.0, 1.0)  # f * image + (1 - f) * target
        image = torch.where(per_image((op >= 0) & (op < 3)), blended, image)
        rows = (ops[:, position] == 3).nonzero()[:, 0].to(device, non_blocking=True)  # (H,) images turning hue here
        image.index_copy_(0, rows, _adjust_hue(image[rows], factors[rows, 3]))  # in place: torch.where's tensor
    gray = per_image(params[:, 9].to(device, non_blocking=True) > 0)
    return torch.where(gray, _grayscale(image).expand_as(image), image)


@torch.no_grad()
def color_augment(pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) + `ColorParameters` rows (B, 10) -> colour-augmented, ImageNet-normalised float (B, 3, S, S).

    What the CPU path's colour transforms and `_normalize()` do image by image, for a batch on the accelerator. The
    CPU path rounds to uint8 after each colour op, this one keeps floats: the two differ by a few uint8 levels.
    """
    image = pixels.float().mul_(1.0 / 255)  # (B, 3, S, S) in [0, 1], as ToDtype(float32, scale=True)
    image = adjust_colors(image, params)
    mean = torch.tensor(IMAGENET_MEAN).to(image.device, non_blocking=True)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD).to(image.device, non_blocking=True)[None, :, None, None]
    return (image - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# The training stream: endless, split by rank and worker, with a position that resumes exactly


def example_seed(seed: int, epoch: int, image) -> int:
    """A seed for one image's augmentation and masks, from its content (identical on any rank, worker or resume)."""
    if isinstance(image, dict):  # an undecoded `datasets.Image` cell: its bytes, or its path for image folders
        image = image.get("bytes") or image.get("path") or b""
    digest = zlib.crc32(image.encode() if isinstance(image, str) else bytes(image))
    return ((seed * 1_000_003 + epoch) * 2**32 + digest) % 2**63


@dataclass
class StreamPosition:
    """Where one rank is in its training stream: everything needed to continue it exactly.

    `batches` counts the micro-batches consumed in `epoch`; `rows` the raw rows (decodable or not) each of the
    `num_workers` DataLoader workers had read for the batches consumed so far, keyed by worker id.
    """

    epoch: int = 0
    batches: int = 0
    rows: dict = field(default_factory=dict)
    skipped_images: dict = field(default_factory=dict)
    num_workers: int | None = None

    def to_json(self) -> dict:
        return {**asdict(self), "rows": {str(k): v for k, v in self.rows.items()}}

    @classmethod
    def from_json(cls, state: dict) -> "StreamPosition":
        return cls(
            epoch=state["epoch"],
            batches=state["batches"],
            rows={int(k): v for k, v in state["rows"].items()},
            skipped_images={int(k): v for k, v in state.get("skipped_images", {}).items()},
            num_workers=state.get("num_workers"),
        )


class TrainingStream(torch.utils.data.IterableDataset):
    """Augmented pairs (and mask noise) from one rank's part of the data, endlessly.

    `dataset` yields raw rows of this rank; in a DataLoader worker, `datasets` gives each worker its own shards. A
    worker that reaches the end of its shards starts them again, so the stream never ends: an epoch is a number of
    steps, and the DataLoader keeps its strict round-robin over workers, which is what makes the order replayable.
    """

    def __init__(self, dataset, transform, seed: int, noise_shape: tuple, skip_rows: dict | None = None):
        self.dataset, self.transform, self.seed, self.noise_shape = dataset, transform, seed, noise_shape
        self.skip_rows = skip_rows or {}

    def __iter__(self):
        worker_info = torch.utils.data.get_worker_info()
        worker = worker_info.id if worker_info else 0
        epoch, skip = self.dataset.epoch, self.skip_rows.get(worker, 0)
        rows = skipped = 0
        while True:
            rows_in_pass = yielded_in_pass = 0
            for row in self.dataset:
                rows_in_pass += 1
                rows += 1
                if rows <= skip:  # consumed before the checkpoint: skip before any decoding
                    continue
                image = decode_image(row["image"])
                if image is None:
                    skipped += 1
                    continue
                # fork_rng: the per-image seed must not disturb the process RNG (it also drives drop path)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(example_seed(self.seed, epoch, row["image"]))
                    views = view_fields(*self.transform(image))
                    noise = torch.rand(self.noise_shape)
                sample = {**views, "noise": noise, "worker": worker, "rows": rows, "skipped": skipped}
                yielded_in_pass += 1
                yield sample
            if rows_in_pass == 0:
                return  # this worker has no shard
            if yielded_in_pass == 0 and rows > skip:
                raise UsageError(f"None of the {rows_in_pass} images of this data shard could be decoded.")


def view_fields(student, teacher) -> dict:
    """A sample's image fields from a `PairTransform`'s two views; a tensor shared by both branches is sent once.

    pixel_values: the student's view, pixel_values_teacher: the teacher's if it is another tensor. With the colour on
    the device a view is (uint8 image, colour parameters): the parameters go to color_student / color_teacher (none
    for the teacher when both branches see one view, as with `color`), so `shared_crop_color` sends one uint8 crop.
    """
    if not isinstance(student, tuple):
        return {"pixel_values": student} | ({} if teacher is student else {"pixel_values_teacher": teacher})
    fields = {"pixel_values": student[0], "color_student": student[1]}
    if teacher is not student:
        fields["color_teacher"] = teacher[1]
        if teacher[0] is not student[0]:
            fields["pixel_values_teacher"] = teacher[0]
    return fields


def device_views(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's and the teacher's pixel values on `device` (teacher None: the student's view is both).

    Batches with colour parameters (`--color_on_device`) carry uint8 images, which are copied (4x less than floats)
    and colour-augmented and normalised here, before the model.
    """
    student = batch["pixel_values"].to(device, non_blocking=True)
    teacher = batch.get("pixel_values_teacher")
    teacher = None if teacher is None else teacher.to(device, non_blocking=True)
    if "color_student" not in batch:
        return student, teacher
    if "color_teacher" in batch:  # one uint8 crop for both views (shared_crop_color) or two (crop_color)
        teacher = color_augment(student if teacher is None else teacher, batch["color_teacher"])
    return color_augment(student, batch["color_student"]), teacher


def round_robin(loader, num_workers: int, first_worker: int):
    """The loader's batches in worker order first_worker, first_worker + 1, ... (mod num_workers).

    A DataLoader always asks worker 0 first. An uninterrupted run was at worker `batches % num_workers` when it was
    checkpointed, so a resumed run holds back the first batches of workers < first_worker until their turn.
    """
    pending, wanted = {}, first_worker
    for batch in loader:
        pending[int(batch["worker"][0])] = batch
        while wanted in pending:
            yield pending.pop(wanted)
            wanted = (wanted + 1) % num_workers


def training_batches(dataset, transform, args, noise_shape, position: StreamPosition, device):
    """Micro-batches of one epoch (`position.epoch`) on this rank, from `position` on; updates `position` in place."""
    dataset.set_epoch(position.epoch)  # a new shard order and shuffle every epoch, the same on every rank
    num_workers = min(args.num_workers, dataset.num_shards)
    if position.batches and position.num_workers != num_workers:
        raise UsageError(
            f"The checkpoint's stream was read by {position.num_workers} DataLoader workers, this run has "
            f"{num_workers}: resume with --num_workers {position.num_workers} to continue it exactly."
        )
    position.num_workers = num_workers
    stream = TrainingStream(dataset, transform, args.seed, noise_shape, skip_rows=dict(position.rows))
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=args.per_device_train_batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed),  # so that making a loader never draws from the global RNG
    )
    for batch in round_robin(loader, max(1, num_workers), position.batches % max(1, num_workers)):
        worker = int(batch["worker"][0])
        position.batches += 1
        position.rows[worker] = int(batch["rows"][-1])
        position.skipped_images[worker] = int(batch["skipped"][-1])
        yield batch


def rank_dataset(raw: datasets.IterableDataset, rank: int, world_size: int, seed: int, buffer_size: int):
    """This rank's part of the shuffled raw stream.

    The shuffle (of the shard order, then of the rows within a buffer) uses the same seed on every rank, as
    `split_dataset_by_node` requires. Whole shards go to each rank when there are enough of them (a few more rows on
    some ranks do not matter: epochs are counted in steps); with fewer than 8 shards per rank and a count that does
    not divide by the world size, every rank reads all rows and keeps 1 in world_size.
    """
    # max_buffer_input_shards=1: the buffer fills from one shard at a time. Interleaving shards reads them in threads,
    # after which datasets 5.x sleeps 5 s whenever a pass ends or stops (apache/arrow#45214), i.e. every epoch.
    ds = raw.shuffle(seed=seed, buffer_size=buffer_size, max_buffer_input_shards=1) if buffer_size > 1 else raw
    if world_size == 1:
        return ds
    num_shards = raw.num_shards
    strategy = "shards" if num_shards % world_size == 0 or num_shards >= 8 * world_size else "examples"
    return split_dataset_by_node(ds, rank=rank, world_size=world_size, strategy=strategy)


# ----------------------------------------------------------------------------------------------------------------
# kNN evaluation (Wu et al. 2018), used while training and by scripts/eval_knn.py


@torch.no_grad()
def extract_features(backbone, dataloader, device=None, max_samples=None):
    """Instance representations `backbone(pixel_values).pooler_output` of a loader's images.

    The loader yields dicts with "pixel_values" and "label"/"labels" (or (pixel_values, labels) tuples). Returns
    features (N, D) float32 and labels (N,) long on the CPU; labels are -1 for unlabelled images.
    """
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    features, labels, seen = [], [], 0
    for batch in tqdm(dataloader, desc="features", leave=False, disable=not _is_main_process()):
        if isinstance(batch, dict):
            pixel_values = batch["pixel_values"]
            batch_labels = batch.get("label", batch.get("labels"))
        else:
            pixel_values, batch_labels = batch[0], (batch[1] if len(batch) > 1 else None)
        if batch_labels is None:
            batch_labels = torch.full((pixel_values.shape[0],), -1)
        if max_samples is not None:
            pixel_values, batch_labels = pixel_values[: max_samples - seen], batch_labels[: max_samples - seen]
        features.append(backbone(pixel_values.to(device)).pooler_output.float().cpu())  # (B, D)
        labels.append(torch.as_tensor(batch_labels).long())
        seen += pixel_values.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    backbone.train(was_training)
    if not features:
        raise UsageError("The loader yielded no image to extract features from.")
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def weighted_knn(
    train_features, train_labels, test_features, test_labels, k=200, temperature=0.07, num_classes=None,
    chunk_size=256,
):  # fmt: skip
    """Weighted kNN classification (Wu et al. 2018, as in DINO's eval_knn): top-1 / top-5 accuracy in %.

    Cosine similarity of L2-normalised features; each of the k nearest gallery images votes for its class with weight
    exp(similarity / temperature). Test images are processed in chunks of `chunk_size` to bound memory.
    """
    # float32 even under autocast (the training loop's kNN runs inside it): bf16 similarities would tie and reorder
    # neighbours, and scatter_add_ needs one dtype
    with torch.autocast(train_features.device.type, enabled=False):
        train_features = F.normalize(train_features.float(), dim=1)
        test_features = F.normalize(test_features.float(), dim=1).to(train_features.device)
        train_labels = train_labels.long().to(train_features.device)
        test_labels = test_labels.long().to(train_features.device)
        if num_classes is None:
            num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        k = min(k, train_features.shape[0])
        top1 = top5 = 0
        for start in range(0, test_features.shape[0], chunk_size):
            queries, targets = test_features[start : start + chunk_size], test_labels[start : start + chunk_size]
            similarity, neighbors = (queries @ train_features.T).topk(k, dim=1)  # (b, k)
            votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
            votes.scatter_add_(1, train_labels[neighbors], (similarity / temperature).exp())  # (b, C)
            predictions = votes.topk(min(5, num_classes), dim=1).indices  # (b, 5)
            top1 += (predictions[:, 0] == targets).sum().item()
            top5 += (predictions == targets[:, None]).any(dim=1).sum().item()
        total = test_features.shape[0]
        return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total}


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def collate_eval(rows):
    """Rows of {pixel_values, label} to a batch; -1 stands for a missing label."""
    return {
        "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
        "label": torch.tensor([r.get("label", -1) for r in rows]),
    }


def eval_loader(builder, split, args, image_size: int, max_samples: int):
    """The first `max_samples` decodable images of a split, eval-transformed, in batches (a fixed subset)."""
    transform = build_eval_transform(image_size)
    ds = load_raw_stream(builder, split, args.image_column, args.label_column)
    ds = ds.map(_decode_row).filter(_is_decoded).take(max_samples)
    ds = ds.map(lambda row: {**row, "pixel_values": transform(row["image"])}, remove_columns=["image"])
    return torch.utils.data.DataLoader(
        ds,
        batch_size=256,
        num_workers=min(args.num_workers, ds.num_shards),
        collate_fn=collate_eval,
        generator=torch.Generator().manual_seed(0),
    )


def knn_accuracy(backbone, builder, args, image_size: int, device) -> dict:
    """Weighted kNN accuracy of a backbone: gallery from the training split, queries from the validation split."""
    train_features, train_labels = extract_features(
        backbone, eval_loader(builder, args.train_split, args, image_size, args.knn_train_samples), device
    )
    test_features, test_labels = extract_features(
        backbone, eval_loader(builder, args.validation_split, args, image_size, args.knn_val_samples), device
    )
    return weighted_knn(
        train_features, train_labels, test_features, test_labels, k=args.knn_k, temperature=args.knn_temperature
    )


# ----------------------------------------------------------------------------------------------------------------
# Schedules (pure functions of the optimizer step, so a checkpoint only needs the step)


def get_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to peak_lr, then half-cycle cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def get_momentum(step: int, total_steps: int, base_momentum: float) -> float:
    """EMA momentum rising from base_momentum to 1 on a half-cycle cosine (BYOL)."""
    return 1.0 - (1.0 - base_momentum) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total_steps)))


def teacher_init_share(total_steps: int, base_momentum: float) -> float:
    """The share of its initial weights that the teacher still holds after the run: the product of the momenta.

    Every EMA step keeps a fraction m of the teacher, so after the run prod(m_t) of it is the random initialisation.
    With m rising from 0.996 to 1, that is 31% after 585 steps (3 CIFAR-10 epochs of batch 256) but 0.7% after 5,000;
    a short run with the paper's momentum evaluates and exports a teacher that is still largely random.
    """
    return math.exp(sum(math.log(get_momentum(step, total_steps, base_momentum)) for step in range(total_steps)))


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


# ----------------------------------------------------------------------------------------------------------------
# Export: the teacher backbone as a Hub-ready folder


def export_backbone(backbone, output_dir, **card_fields) -> Path:
    """Save an `ExtremaModel` with `save_pretrained`, a `ViTImageProcessor` and a model card; returns the folder.

    The folder loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`: the model classes call
    `register_for_auto_class`, so the config gets an `auto_map` and the modeling code is copied beside the weights.
    Card fields (all optional): model_id (used in the usage snippet), datasets (list), recipe (dict or str),
    knn (dict with top1/top5 and optionally k, temperature, split, dataset), tags (list), description (str).
    The kNN top-1 also goes into the card's metadata as a model-index result (the Hub shows it beside the model) when
    its dataset is a Hub id: knn["dataset"], else the first of `datasets`.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    from transformers import ViTImageProcessor

    output_dir = Path(output_dir)
    backbone.save_pretrained(output_dir, safe_serialization=True)
    size = backbone.config.image_size
    processor = ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
    )
    processor.save_pretrained(output_dir)

    text = model_card_text(backbone.config, **card_fields)
    knn, datasets = card_fields.get("knn"), card_fields.get("datasets") or None
    knn_dataset = knn and (knn.get("dataset") or (datasets or [None])[0])
    eval_results = None
    if knn_dataset:  # a kNN classifier on the frozen pooler_output: image classification, scored by accuracy
        k, temperature = knn.get("k", 200), knn.get("temperature", 0.07)
        eval_results = [
            EvalResult(
                task_type="image-classification",
                task_name="Image classification (weighted kNN on frozen features)",
                dataset_type=knn_dataset,
                dataset_name=knn_dataset,
                dataset_split=knn.get("split"),
                metric_type="accuracy",
                metric_name=f"kNN top-1 accuracy (k={k}, T={temperature})",
                metric_value=round(float(knn["top1"]), 2),
                metric_args={"k": k, "temperature": temperature},
            )
        ]
    card_data = ModelCardData(
        model_name=text.partition("\n")[0].removeprefix("# ") if eval_results else None,  # the card's title
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license="apache-2.0",
        tags=["extrema", "vision", "self-supervised-learning", "masked-image-modeling", *card_fields.get("tags", [])],
        datasets=datasets,
        eval_results=eval_results,
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{text}")
    card.save(output_dir / "README.md")
    return output_dir


def model_card_text(config, model_id=None, datasets=None, recipe=None, knn=None, description=None, **_) -> str:
    """The card's Markdown below the metadata: title, description, recipe table, kNN result, usage, citation."""
    import re

    def readable(value) -> str:  # long decimals to 3 significant digits: 375 / 468 steps shows 0.801 epochs
        return re.sub(r"\d+\.\d{5,}", lambda number: f"{float(number[0]):.{max(3, number[0].index('.'))}g}", str(value))

    model_id = model_id or "path/to/this/folder"
    lines = [
        f"# ExtreMA {config.hidden_size}-wide, {config.num_hidden_layers}-layer ViT/{config.patch_size}",
        "",
        description
        or (
            "A vision transformer pre-trained without labels with ExtreMA (Wu et al., 2022, "
            "[arXiv:2206.04667](https://arxiv.org/abs/2206.04667)): BYOL in which a student sees only 10-25% of "
            "the patches (several disjoint masks) and predicts the representation that a momentum teacher computes "
            "from the full image. This is the teacher backbone. `pooler_output` (the class token built by "
            "class-attention blocks) is the instance representation; `last_hidden_state[:, 1:]` are the patch "
            "tokens (the distributed representation)."
        ),
        "",
    ]
    if datasets:
        lines += [f"Pre-training data: {', '.join(datasets)}.", ""]
    if recipe:
        lines += ["## Training recipe", ""]
        if isinstance(recipe, dict):
            lines += ["| setting | value |", "|---|---|", *[f"| {k} | {readable(v)} |" for k, v in recipe.items()]]
        else:
            lines += [readable(recipe)]
        lines += [""]
    if knn:
        where = f" on {knn['split']}" if knn.get("split") else ""
        lines += [
            "## Evaluation",
            "",
            f"Weighted kNN (k={knn.get('k', 200)}, T={knn.get('temperature', 0.07)}) on `pooler_output`{where}: "
            f"top-1 {knn['top1']:.2f}%, top-5 {knn['top5']:.2f}%.",
            "",
        ]
    lines += [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModel",
        "",
        f'processor = AutoImageProcessor.from_pretrained("{model_id}")',
        f'model = AutoModel.from_pretrained("{model_id}", trust_remote_code=True).eval()',
        'inputs = processor(images=Image.open("image.jpg").convert("RGB"), return_tensors="pt")',
        "with torch.no_grad():",
        "    outputs = model(**inputs)",
        "instance = outputs.pooler_output  # (1, hidden): the image's representation",
        "patches = outputs.last_hidden_state[:, 1:]  # (1, num_patches, hidden): one token per patch",
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        "@article{wu2022extreme,",
        "  title={Extreme Masking for Learning Instance and Distributed Visual Representations},",
        "  author={Wu, Zhirong and Lai, Zihang and Sun, Xiao and Lin, Stephen},",
        "  journal={arXiv preprint arXiv:2206.04667},",
        "  year={2022}",
        "}",
        "```",
    ]
    return "\n".join(lines) + "\n"


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
    color_on_device=True,  # the CPU workers would otherwise limit a GPU (README, Performance)
)
RECIPES = {
    # The default when no data is given: Fashion-MNIST at 32 px, 375 steps in a few minutes on 2 CPU cores. In runs
    # this short, BYOL's targets collapse before they improve (kNN falls below its value at initialisation), so the
    # demo uses the InfoNCE objective of the paper's Table 6, whose negatives keep the features apart.
    "tiny-fashion-mnist": dict(
        model_config="tiny",
        loss="infonce",
        mask_ratio=0.75,
        num_masks=2,
        per_device_train_batch_size=128,
        num_train_epochs=0.8,
        warmup_epochs=0.08,
        learning_rate=1.5e-3,
        ema_momentum=0.99,
        drop_path_rate=0.0,
        num_workers=1,
        knn_train_samples=5_000,
        knn_val_samples=1_000,
    ),
    # BYOL on CIFAR-10 at 32 px on a CPU (README, "When BYOL collapses"): the paper's objective, augmentation (Table 4,
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
        target_centering="batch",
        head_norm="batchnorm",
        predictor_lr_multiplier=10.0,
        per_device_train_batch_size=256,
        num_train_epochs=25,
        warmup_epochs=2,
        learning_rate=1e-3,
        ema_momentum=0.99,
        drop_path_rate=0.0,
        num_workers=1,
        knn_train_samples=10_000,
        knn_val_samples=2_000,
        knn_k=20,
        knn_every=195,  # an epoch of batch 256
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="a named setting (the released models); default: tiny-fashion-mnist when no data is given",
    )
    add_data_args(parser)

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_config", default="tiny", help=f"a preset ({', '.join(PRESETS)}), a config JSON, or a model folder"
    )
    group.add_argument("--mask_ratio", type=float, help="fraction of patches hidden from the student (config's)")
    group.add_argument("--num_masks", type=int, help="masked views per image (default: the config's)")
    group.add_argument("--loss", choices=("byol", "infonce"), help="training objective (default: the config's, byol)")
    group.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth of the student")
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
        help="auto: bf16 where the hardware has it (GPUs, CPUs with AVX512-BF16 or AMX), else float32"
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
    group.add_argument("--skip_knn", action="store_true", help="no kNN evaluation at all")
    group.add_argument("--knn_train_samples", type=int, default=10_000, help="gallery size (first images of train)")
    group.add_argument("--knn_val_samples", type=int, default=10_000, help="queries (first images of validation)")
    group.add_argument("--knn_k", type=int, default=200)
    group.add_argument("--knn_temperature", type=float, default=0.07)
    group.add_argument("--export_every", type=int, help="also export the teacher backbone every N steps")
    group.add_argument("--push_to_hub", action="store_true", help="upload <output_dir>/final to --hub_model_id")
    group.add_argument("--hub_model_id", help="e.g. your-name/extrema-vit-base")
    group.add_argument("--hub_private", action="store_true")
    return parser


def parse_args(argv=None, **overrides) -> argparse.Namespace:
    """The command line `argv` (default: sys.argv), with `overrides` as flag values given from Python."""
    parser = build_parser()
    unknown = set(overrides) - {action.dest for action in parser._actions}
    if unknown:
        raise TypeError(f"Unknown training flags {sorted(unknown)}; see `python train_extrema.py --help`.")
    parser.set_defaults(**overrides)
    args = parser.parse_args(argv)
    recipe = args.recipe
    if recipe is None and not (args.dataset_name or args.train_dir):
        recipe = "tiny-fashion-mnist"
    if recipe:  # recipe values replace the defaults; flags given explicitly still win
        defaults = dict(RECIPES[recipe])
        if args.dataset_name or args.train_dir:  # the recipe on the user's data: not on the recipe's dataset
            for key in ("dataset_name", "dataset_config", "validation_split"):
                defaults.pop(key, None)
        parser.set_defaults(**{**defaults, **overrides})
        args = parser.parse_args(argv)
        args.recipe = recipe
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/extrema-vit-base).")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint).is_dir():
            parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint folder.")
    return args


def build_config(args) -> ExtremaConfig:
    overrides = {"drop_path_rate": args.drop_path_rate}
    if args.mask_ratio is not None:
        overrides["mask_ratio"] = args.mask_ratio
    if args.num_masks is not None:
        overrides["num_masks"] = args.num_masks
    for field_name in ("loss", "head_norm", "target_centering"):
        if getattr(args, field_name) is not None:
            overrides[field_name] = getattr(args, field_name)
    try:
        if args.model_config in PRESETS:
            return ExtremaConfig.from_preset(args.model_config, **overrides)
        path = Path(args.model_config)
        if path.is_file():
            return ExtremaConfig.from_dict({**ExtremaConfig.from_json_file(str(path)).to_dict(), **overrides})
        if path.is_dir():
            return ExtremaConfig.from_pretrained(str(path), **overrides)
    except ValueError as error:
        raise UsageError(str(error)) from error
    raise UsageError(
        f"--model_config {args.model_config!r} is neither a preset ({', '.join(PRESETS)}) nor a config file/folder."
    )


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: accelerate's save_state + each rank's stream position, written atomically


def list_checkpoints(output_dir) -> list[Path]:
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(accelerator, folder: Path, step: int, position: StreamPosition, keep: int | None = None):
    """Full training state into `folder`: written to folder.tmp, then renamed, so a kill never leaves half of one."""
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimizer, RNG states of every process
    state = {"step": step, "world_size": accelerator.num_processes, "position": position.to_json()}
    (tmp / f"stream_rank{accelerator.process_index}.json").write_text(json.dumps(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        if keep:
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
    accelerator.load_state(str(folder))
    return state["step"], StreamPosition.from_json(state["position"])


# ----------------------------------------------------------------------------------------------------------------
# Training


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
    return Schedule(
        per_device_batch=per_device,
        total_batch=total_batch,
        peak_lr=args.learning_rate * total_batch / 256,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=min(warmup, total_steps - 1),
    )


def bf16_is_native() -> bool:
    """Whether bf16 autocast runs on bf16 hardware: a CUDA GPU that has it, or a CPU with bf16 dot products
    (AVX512-BF16 or AMX). Elsewhere bf16 is emulated: measured 3.4x slower than float32 on an Intel Xeon without it."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: assume emulated
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def make_accelerator(args) -> Accelerator:
    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if bf16_is_native() else "no"
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
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
        batch = next(batches)
        noise = batch["noise"].to(device, non_blocking=True)
        student_view, teacher_view = device_views(batch, device)  # teacher None: both branches see the same view
        inputs = {
            "pixel_values": student_view,
            "pixel_values_teacher": teacher_view,
            "noise": noise if noise.ndim == 2 else noise.transpose(0, 1),  # (B, N), or (B, M, N) -> (M, B, N)
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
                for branch, vectors in (("target", outputs.targets), ("prediction", outputs.predictions))
                for name, value in collapse_statistics(vectors).items()
            }
    return loss_sum / accumulation_steps, collapse


def evaluate_knn(accelerator, backbone, builder, args, image_size: int, step: int) -> dict | None:
    """kNN accuracy of the teacher, computed by the main process while the others wait."""
    result = None
    if accelerator.is_main_process:
        with accelerator.autocast():
            result = knn_accuracy(backbone, builder, args, image_size, accelerator.device)
        logger.info(
            "step %d: kNN top-1 %.2f%%, top-5 %.2f%% (k=%d, %d gallery / %d %s images)",
            step, result["top1"], result["top5"], args.knn_k, args.knn_train_samples, args.knn_val_samples,
            args.validation_split,
        )  # fmt: skip
        accelerator.log({"knn/top1": result["top1"], "knn/top5": result["top5"]}, step=step)
    accelerator.wait_for_everyone()
    return result


# Thresholds of `warn_on_collapse`. Targets spread over the sphere have mean cosine ~0 and normalised std ~1.
COLLAPSE_MEAN_COSINE = 0.8
COLLAPSE_STD = 0.3


def warn_on_collapse(logs: dict, step: int, warned: bool) -> bool:
    """Warn once when the teacher's targets crowd into one direction; returns whether a warning was given."""
    cosine, std = logs.get("collapse/target_mean_cosine"), logs.get("collapse/target_std")
    if warned or cosine is None or (cosine < COLLAPSE_MEAN_COSINE and std > COLLAPSE_STD):
        return warned
    logger.warning(
        "step %d: the teacher's projections are collapsing (mean pairwise cosine %.2f, normalised std %.2f; spread "
        "targets give ~0 and ~1). BYOL then regresses a near-constant target and the features stop separating "
        "images. Try --target_centering batch, --head_norm batchnorm, a lower --ema_momentum or --loss infonce "
        "(README, 'When BYOL collapses').",
        step, cosine, std,
    )  # fmt: skip
    return True


def recipe_summary(args, config, schedule: Schedule) -> dict:
    """The settings of a run, for the log and the model card."""
    return {
        "recipe": args.recipe or "custom",
        "backbone": args.model_config,
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
        "augmentation": args.augmentation,
        "drop path (student)": config.drop_path_rate,
    }


def export_teacher(accelerator, teacher, folder: Path, args, recipe: dict, knn: dict | None = None):
    if accelerator.is_main_process:
        if args.dataset_name:
            data_ids = [args.dataset_name]
        else:
            data_ids = [] if args.train_dir else ["zalando-datasets/fashion_mnist"]
        if knn:
            knn = dict(knn, k=args.knn_k, temperature=args.knn_temperature, split=args.validation_split)
        export_backbone(teacher, folder, model_id=args.hub_model_id, datasets=data_ids, recipe=recipe, knn=knn)
        logger.info("Exported the teacher backbone to %s", folder)
    accelerator.wait_for_everyone()


def train(**flags) -> dict | None:
    """Pre-train from Python, flags as keywords: `train(recipe="tiny-cifar10", train_dir="cifar10", seed=1)`."""
    return main(parse_args([], **flags))


def main(argv=None):
    """The command line: `argv` (a list of flags, default sys.argv) or parsed arguments; returns the run's results."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    accelerator = make_accelerator(args)
    output_dir, device = Path(args.output_dir), accelerator.device
    world_size, rank = accelerator.num_processes, accelerator.process_index

    # Data. The Fashion-MNIST cache is built once, by the main process.
    with accelerator.main_process_first():
        builder = open_dataset(args.dataset_name, args.dataset_config, args.train_dir, args.fashion_mnist_dir)
    raw = load_raw_stream(builder, args.train_split, args.image_column, args.label_column)
    num_examples = count_examples(builder, args.train_split)
    schedule = plan_schedule(args, num_examples, world_size)
    args.per_device_train_batch_size = schedule.per_device_batch
    dataset = rank_dataset(raw, rank, world_size, args.seed, args.shuffle_buffer_size)
    knn_enabled = not args.skip_knn and "label" in raw.column_names
    if knn_enabled and args.validation_split is None:
        args.validation_split = next((s for s in ("validation", "test") if s in split_names(builder)), None)
        if args.validation_split is None:
            logger.warning("No validation split (name one with --validation_split): no kNN accuracy.")
            knn_enabled = False

    # Model and optimizer. The same seed on every rank gives the same initial weights.
    set_seed(args.seed)
    config = build_config(args)
    model = ExtremaForPreTraining(config)
    if config.head_norm == "batchnorm" and world_size > 1:
        if device.type == "cuda":  # one set of head statistics over the global batch, as in one process (MoCo v3)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm runs on GPUs only
            logger.warning("BatchNorm heads on %d CPU processes use per-process batch statistics.", world_size)
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16":
        model.set_attn_implementation("eager")  # CPU sdpa is slow on short bf16 sequences (1.3x step here)
    # the fused kernel: one pass over all parameters, not one per tensor (6x faster AdamW step on a CPU here)
    fused = accelerator.device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay, args.predictor_lr_multiplier),
        lr=schedule.peak_lr,
        betas=(args.adam_beta1, args.adam_beta2),
        fused=fused,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)  # owns update_teacher() and the teacher to evaluate and export
    transform = build_train_transform(args.augmentation, config.image_size, args.crop_min, args.color_on_device)
    noise_shape = (config.num_patches,) if config.disjoint_masks else (config.num_masks, config.num_patches)

    # Resume: weights, optimizer, RNG states, and this rank's stream position
    step, position = 0, StreamPosition()
    if args.resume_from_checkpoint:
        folders = list_checkpoints(output_dir) if args.resume_from_checkpoint == "latest" else None
        folder = Path(args.resume_from_checkpoint) if folders is None else (folders[-1] if folders else None)
        if folder is None:
            logger.info("No checkpoint in %s: starting from scratch.", output_dir)
        else:
            step, position = load_checkpoint(accelerator, folder)
            logger.info("Resumed from %s at step %d (epoch %d).", folder, step, position.epoch)

    recipe = recipe_summary(args, config, schedule)
    init_share = teacher_init_share(schedule.total_steps, args.ema_momentum)
    if init_share > 0.1:
        logger.warning(
            "With --ema_momentum %s over %d steps the final teacher (the network that kNN scores and the export "
            "saves) is still %.0f%% its random initialisation; lower --ema_momentum (e.g. 0.99) for a run this short.",
            args.ema_momentum, schedule.total_steps, 100 * init_share,
        )  # fmt: skip
    logger.info(
        "%d steps of %d images (%d processes x %d x %d accumulation), %d per epoch of %s images; %s",
        schedule.total_steps, schedule.total_batch, world_size, schedule.per_device_batch,
        args.gradient_accumulation_steps, schedule.steps_per_epoch, num_examples or "?", recipe,
    )  # fmt: skip
    if args.report_to != "none":
        accelerator.init_trackers("extrema", config={k: v for k, v in vars(args).items() if v is not None})
    knn_start, knn_history = None, []  # the kNN curve: one {"step", "top1", "top5"} per evaluation
    if knn_enabled and step == 0:
        knn_start = evaluate_knn(accelerator, unwrapped.teacher, builder, args, config.image_size, step)
        knn_history.append({"step": step, **(knn_start or {})})

    model.train()
    progress = tqdm(
        total=schedule.total_steps,
        initial=step,
        desc="train",
        disable=not accelerator.is_main_process,
        mininterval=0.1 if sys.stderr.isatty() else 60,  # job logs get a line a minute, not every redraw
    )
    first_step, logged_step, tick, collapse_warning = step, step, time.perf_counter(), False
    batches, loss = None, None
    while step < schedule.total_steps:
        epoch = step // schedule.steps_per_epoch
        if position.epoch != epoch:  # a new epoch (or a checkpoint taken at the end of the previous one)
            position, batches = StreamPosition(epoch=epoch), None
        if batches is None:
            batches = training_batches(dataset, transform, args, noise_shape, position, device)

        lr = get_lr(step, schedule.total_steps, schedule.warmup_steps, schedule.peak_lr, args.min_learning_rate)
        momentum = get_momentum(step, schedule.total_steps, args.ema_momentum)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        log_now = (step + 1) % args.logging_steps == 0 or step + 1 == schedule.total_steps
        loss, collapse = forward_backward(accelerator, model, batches, args.gradient_accumulation_steps, log_now)
        loss = accelerator.reduce(loss, "mean").item()  # the same value on every rank: they stop together
        if not math.isfinite(loss):
            folder = output_dir / f"nonfinite-step-{step}"
            save_checkpoint(accelerator, folder, step, position)
            raise FloatingPointError(
                f"The loss is {loss} at step {step} (lr {lr:.3g}). The state before this step is saved in "
                f"{folder} for debugging; lower --learning_rate, set --max_grad_norm, or use --mixed_precision no."
            )
        grad_norm = None
        if args.max_grad_norm or log_now:  # the norm costs a pass over the gradients: only when needed
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        unwrapped.update_teacher(momentum)
        step += 1
        progress.update(1)

        if log_now:
            images_per_second = schedule.total_batch * (step - logged_step) / (time.perf_counter() - tick)
            logged_step, tick = step, time.perf_counter()
            logs = {
                "train/loss": loss,
                "train/lr": lr,
                "train/momentum": momentum,
                "train/grad_norm": grad_norm,
                "train/images_per_second": images_per_second,
                "train/epoch": step / schedule.steps_per_epoch,
                "data/skipped_images": sum(position.skipped_images.values()),
                **{name: accelerator.reduce(value, "mean").item() for name, value in collapse.items()},
            }
            if device.type == "cuda":
                logs["train/max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            accelerator.log(logs, step=step)
            collapse_warning = warn_on_collapse(logs, step, collapse_warning)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.0f}")
            if not sys.stderr.isatty():  # a job's log file: a line per logging step, not a progress bar's redraws
                logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if v is not None))
        if args.checkpointing_steps and step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir / f"checkpoint-{step}", step, position, args.keep_checkpoints)
        if step == schedule.total_steps:
            break
        if knn_enabled and args.knn_every and step % args.knn_every == 0:
            knn = evaluate_knn(accelerator, unwrapped.teacher, builder, args, config.image_size, step)
            knn_history.append({"step": step, **(knn or {})})
            model.train()
        if args.export_every and step % args.export_every == 0:
            export_teacher(accelerator, unwrapped.teacher, output_dir / f"export-step-{step}", args, recipe)
        if args.stop_after_steps and step - first_step >= args.stop_after_steps:
            logger.info("Stopped after step %d (--stop_after_steps); continue with --resume_from_checkpoint.", step)
            accelerator.end_training()
            return None
    progress.close()
    del batches  # stops the DataLoader workers

    knn_end = None
    if knn_enabled:
        knn_end = evaluate_knn(accelerator, unwrapped.teacher, builder, args, config.image_size, step)
        knn_history.append({"step": step, **(knn_end or {})})
    if knn_start and knn_end and accelerator.is_main_process:
        print(
            f"kNN top-1 on {args.validation_split}: {knn_start['top1']:.2f}% at initialisation -> "
            f"{knn_end['top1']:.2f}% after {step} steps"
        )
    final = output_dir / "final"
    export_teacher(accelerator, unwrapped.teacher, final, args, recipe, knn_end)
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.hub_model_id, private=args.hub_private, exist_ok=True)
        api.upload_folder(repo_id=args.hub_model_id, folder_path=str(final), commit_message=f"ExtreMA, step {step}")
        logger.info("Uploaded %s to https://huggingface.co/%s", final, args.hub_model_id)
    accelerator.end_training()
    return {
        "step": step,
        "loss": loss,
        "knn_start": knn_start,
        "knn_end": knn_end,
        "knn_history": knn_history,
        "num_examples": num_examples,
        "steps_per_epoch": schedule.steps_per_epoch,
        "final_dir": str(final),
    }


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.exit(f"error: {error}")
