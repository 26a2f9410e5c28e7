"""Data and augmentation for ExtreMA: where the images come from, how they become views, and the training stream.

Used by `train_extrema.py` (pre-training), `eval_extrema.py` (the kNN monitor) and the scripts in `scripts/`, so
that every one of them reads images the same way.

Reading order:
1. Sources: `add_data_args` (the data flags of every script), `open_dataset` (a Hub dataset, a local folder of
   Parquet / WebDataset shards or images, or Fashion-MNIST converted once by `prepare_fashion_mnist`),
   `split_names`, `default_validation_split`, `count_examples`, `detect_columns`, `load_raw_stream` (undecoded
   rows), `decode_image` and `load_image_stream` (RGB rows).
2. Augmentations (paper Table 4): `build_eval_transform`, `PairTransform`, `build_train_transform`.
3. Colour augmentation on the accelerator: `ColorParameters` (drawn in a DataLoader worker), `adjust_colors` and
   `color_augment` (applied to a batch on the device).
4. The training stream: `example_seed`, `StreamPosition`, `TrainingStream`, `view_fields`, `device_views` (a
   batch's two views on the device), `round_robin`, `training_batches`, `rank_dataset`.
5. Labelled batches for evaluation: `labelled_stream`, `label_fraction_keys`, `labelled_loader` (`ShardQuotaSubset`,
   `collate_eval`).

The training stream is built so that a run resumes exactly: its position is (epoch, micro-batches consumed, raw rows
consumed by each DataLoader worker); a resume rebuilds the epoch's stream with the same seed, skips the consumed rows
before decoding them, and replays the workers' round-robin order. The augmentation and the masks of an image are
drawn from a seed derived from (seed, epoch, image bytes), not from a process's RNG, so training is the same function
of the data whether it resumes, uses N workers or N processes.
"""

import argparse
import atexit
import gzip
import hashlib
import heapq
import io
import itertools
import logging
import os
import shutil
import signal
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from datasets.distributed import split_dataset_by_node
from torchvision.transforms import v2

from cli_extrema import UsageError

logger = logging.getLogger("data_extrema")

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


def check_parquet_footers(folder: Path):
    """Read the footer (the metadata) of every Parquet file under `folder`: a truncated or damaged shard is named
    before training starts rather than failing somewhere in the stream."""
    import pyarrow
    import pyarrow.parquet

    for path in sorted(folder.rglob("*.parquet")):
        try:
            pyarrow.parquet.read_metadata(path)
        except (pyarrow.ArrowException, OSError) as error:
            raise UsageError(
                f"{path} is not a readable Parquet file ({str(error).splitlines()[0]}): it is truncated or damaged; "
                "write or download it again, or move it out of --train_dir."
            ) from error


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
            data_format = _local_format(train_dir)
            if data_format == "parquet":
                check_parquet_footers(train_dir)
            if data_format == "imagefolder" and not any(
                path.suffix.lower() in PIL.Image.registered_extensions()
                for path in itertools.islice(train_dir.rglob("*"), 10_000)
            ):
                raise UsageError(
                    f"--train_dir {train_dir} holds no images, Parquet files or WebDataset .tar shards; point it at "
                    "the folder of your data."
                )
            return datasets.load_dataset_builder(data_format, data_dir=str(train_dir))
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


def default_validation_split(builder) -> str | None:
    """The labelled split to evaluate on when --validation_split names none: 'validation', else 'test', else None."""
    splits = split_names(builder)
    return next((name for name in ("validation", "test") if name in splits), None)


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
        if split in split_names(builder):  # the split exists: its files are what cannot be read
            raise UsageError(f"Cannot read the split {split!r}: {str(error).splitlines()[0]}") from error
        raise UsageError(f"The dataset has no split {split!r}; its splits are {split_names(builder)}.") from error
    features = ds.features
    if features is None:  # some streaming formats only know their columns after the first row
        features = dict.fromkeys(next(iter(ds)))
    image_column, label_column = detect_columns(features, image_column, label_column)
    columns = [image_column] + ([label_column] if label_column else [])
    ds = ds.select_columns(columns)
    if isinstance(features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # we decode, so bad images can be skipped
    label_feature = features.get(label_column) if label_column else None
    if isinstance(label_feature, datasets.Value) and label_feature.dtype in ("string", "large_string"):
        ds = ds.cast_column(label_column, datasets.ClassLabel(names=class_names(builder, label_column)))
    renames = {image_column: "image", **({label_column: "label"} if label_column else {})}
    return ds.rename_columns({old: new for old, new in renames.items() if old != new})


_CLASS_NAMES = {}


def class_names(builder, label_column: str) -> list[str]:
    """The class names of a column of string labels: its distinct values over every split, sorted, so that class i
    is the same name in every split. Read once per dataset (the label column only, no image is decoded)."""
    key = (builder.info.builder_name, builder.config.name, repr(builder.config.data_files), label_column)
    if key not in _CLASS_NAMES:
        names = set()
        for split in split_names(builder):
            stream = builder.as_streaming_dataset(split=split).select_columns([label_column])
            names.update(str(row[label_column]) for row in stream if row[label_column] is not None)
        _CLASS_NAMES[key] = sorted(names)
        logger.info("String labels in %r: %d classes, numbered in sorted order.", label_column, len(names))
    return _CLASS_NAMES[key]


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode to RGB; transparent pixels (RGBA, LA, palette with transparency) are laid on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith(("I", "F")):  # 16-bit, 32-bit integer or float pixels: scaled to 8 bits, not clipped
        image = PIL.Image.fromarray(_to_uint8(np.asarray(image)))
    return image.convert("RGB")  # L, P, CMYK, YCbCr, ...


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Pixels of a wider type on 0-255: floats in [0, 1] and 16-bit integers by their type's range, anything else
    (8-bit values stored in a wider type, float images in other units) by the values' own range."""
    is_float = pixels.dtype.kind == "f"
    pixels = np.nan_to_num(pixels.astype(np.float64))
    low, high = float(pixels.min(initial=0)), float(pixels.max(initial=0))
    if is_float and low >= 0 and high <= 1:
        scale, low = 255.0, 0.0
    elif low >= 0 and high <= 255:
        scale, low = 1.0, 0.0
    elif low >= 0 and high <= 65535:
        scale, low = 255 / 65535, 0.0
    else:
        scale = 255 / max(high - low, 1e-12)
    return np.clip(np.round((pixels - low) * scale), 0, 255).astype(np.uint8)


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


EVAL_CROP_PCT = 0.875  # the evaluation view: the centre 87.5% of the image after resizing its short side


def build_eval_transform(image_size: int, crop_pct: float = EVAL_CROP_PCT):
    """Resize the short side to image_size / crop_pct (bilinear, antialiased), center crop, ImageNet normalisation:
    image -> (3, S, S). `build_image_processor` is the same transform as a transformers image processor."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(image_size / crop_pct), antialias=True),
            v2.CenterCrop(image_size),
            _normalize(),
        ]
    )


def build_image_processor(image_size: int, crop_pct: float = EVAL_CROP_PCT):
    """`build_eval_transform` as the image processor an exported folder carries, so that
    `AutoImageProcessor.from_pretrained(folder)` feeds a model the pixels its evaluation measured: the short side
    resized to image_size / crop_pct (bilinear), a centre crop, ImageNet normalisation. transformers' default
    (torchvision) backend reproduces the transform to float rounding; its PIL backend rounds the resized image to
    8 bits (within 1/255 before normalisation)."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": int(image_size / crop_pct)},
        resample=PIL.Image.Resampling.BILINEAR,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
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
    them to the whole batch on the accelerator. The colour part is most of a worker's time (docs/performance.md).
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
    """A seed for one image's augmentation and masks in one epoch, from its content (identical on any rank, worker or
    resume). Seed, epoch and content are hashed together: torch's and numpy's generators keep only the low 32 bits of
    a seed, so every bit of the result must depend on all three, or each epoch would repeat the first one's views."""
    if isinstance(image, dict):  # an undecoded `datasets.Image` cell: its bytes, or its path for image folders
        image = image.get("bytes") or image.get("path") or b""
    digest = zlib.crc32(image.encode() if isinstance(image, str) else bytes(image))
    mixed = hashlib.blake2b(b"%d/%d/%d" % (seed, epoch, digest), digest_size=8).digest()
    return int.from_bytes(mixed, "little") % 2**63


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
    Every image's mask noise has `noise_shape`, the model's `ExtremaConfig.mask_noise_shape`, so that a batch of it
    is the (B, *mask_noise_shape) noise that `ExtremaForPreTraining.random_masking` takes.
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
            for row in readable_rows(self.dataset):
                rows_in_pass += 1
                rows += 1
                if rows <= skip:  # consumed before the checkpoint: skip before any decoding
                    continue
                image = decode_image(row["image"])
                if image is None:
                    skipped += 1
                    continue
                # fork_rng: the per-image seed must not disturb the process RNG (it also drives drop path). Only the
                # CPU generator draws here; torch.manual_seed would also queue a CUDA seeding, with its stack trace,
                # per image
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(example_seed(self.seed, epoch, row["image"]))
                    views = view_fields(*self.transform(image))
                    noise = torch.rand(self.noise_shape)
                sample = {**views, "noise": noise, "worker": worker, "rows": rows, "skipped": skipped}
                yielded_in_pass += 1
                yield sample
            if rows_in_pass == 0:
                return  # this worker has no shard
            if yielded_in_pass == 0 and rows > skip:
                raise UsageError(f"None of the {rows_in_pass} images of this data shard could be decoded.")


def readable_rows(dataset):
    """The rows of `dataset`; a shard that cannot be read (a damaged Parquet page, a truncated .tar) ends the stream
    with a UsageError that names its file."""
    try:
        yield from dataset
    except (OSError, ValueError) as error:  # pyarrow's errors are OSError / ValueError subclasses
        if isinstance(error, UsageError):
            raise
        raise UsageError(
            f"The data file {failing_file(error) or '(see the log)'} cannot be read ({type(error).__name__}: "
            f"{(str(error).strip().splitlines() or [''])[0]}): it is damaged; write or download it again, or move it "
            "out of the data folder."
        ) from error


def failing_file(error: BaseException) -> str | None:
    """The file `datasets` was reading when `error` was raised: the `file` its reader loops over, from the
    traceback's frames (the error itself does not name it)."""
    name, frame = None, error.__traceback__
    while frame is not None:
        value = frame.tb_frame.f_locals.get("file")
        if isinstance(value, str):
            name = value
        frame = frame.tb_next
    return name


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


def ignore_stop_signals(worker_id: int):
    """A DataLoader worker leaves SIGTERM and SIGINT to the training process, which saves a checkpoint when it gets
    one and then stops the workers (a worker killed by the signal first would end the run with an error instead)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_batches(
    dataset, transform, noise_shape, position: StreamPosition, device, *, batch_size: int, num_workers: int, seed: int
):
    """Micro-batches of `batch_size` images of one epoch (`position.epoch`) on this rank, from `position` on, read by
    `num_workers` DataLoader workers (at most one per shard); updates `position` in place.

    `noise_shape`: one image's mask noise (`ExtremaConfig.mask_noise_shape`); `seed`: the run's, from which every
    image's augmentation and masks are drawn (see `TrainingStream`).
    """
    dataset.set_epoch(position.epoch)  # a new shard order and shuffle every epoch, the same on every rank
    num_workers = min(num_workers, dataset.num_shards)
    if position.batches and position.num_workers != num_workers:
        raise UsageError(
            f"The checkpoint's stream was read by {position.num_workers} DataLoader workers, this run has "
            f"{num_workers}: resume with --num_workers {position.num_workers} to continue it exactly."
        )
    position.num_workers = num_workers
    stream = TrainingStream(dataset, transform, seed, noise_shape, skip_rows=dict(position.rows))
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),  # so that making a loader never draws from the global RNG
        worker_init_fn=ignore_stop_signals,
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
# Labelled batches for evaluation: a fixed subset of a split (the kNN monitor, the evaluation scripts)


def collate_eval(rows):
    """Rows of {pixel_values, label} to a batch; -1 stands for a missing label."""
    return {
        "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
        "label": torch.tensor([r.get("label", -1) for r in rows]),
    }


class ShardQuotaSubset(torch.utils.data.IterableDataset):
    """Batches of a fixed subset of a split: the first decodable images of every shard, `max_samples` in all.

    Shard s of S gives its first max_samples // S images (one more for the first max_samples % S shards; fewer if it
    has fewer). DataLoader workers divide the shards among them, and each reads only its shards' first images, so the
    subset is the same for any number of workers. (The first N images of the stream would not be: `datasets` splits
    N among the workers, each taking from its own shards, and a kNN gallery would change with --num_workers.)
    """

    def __init__(self, stream: datasets.IterableDataset, transform, max_samples: int, batch_size: int):
        self.stream, self.transform, self.max_samples, self.batch_size = stream, transform, max_samples, batch_size

    def __iter__(self):
        worker_info = torch.utils.data.get_worker_info()
        worker, num_workers = (worker_info.id, worker_info.num_workers) if worker_info else (0, 1)
        num_shards = self.stream.num_shards
        for index in range(worker, num_shards, num_workers):
            quota = self.max_samples // num_shards + (index < self.max_samples % num_shards)
            if quota == 0:
                continue
            shard = self.stream.shard(num_shards=num_shards, index=index)
            images = shard.map(_decode_row).filter(_is_decoded).take(quota)
            # .iter reads this one shard here; iterating the dataset itself in a worker would split it among workers
            for rows in images.iter(batch_size=self.batch_size):
                labels = rows.get("label") or [-1] * len(rows["image"])
                yield collate_eval([{"pixel_values": self.transform(image), "label": label}
                                    for image, label in zip(rows["image"], labels)])  # fmt: skip


def subset_key(seed: int, image) -> int:
    """A pseudo-random 64-bit number of an image (undecoded cell or bytes) and a seed, from the image's content."""
    if isinstance(image, dict):  # an undecoded `datasets.Image` cell: its bytes, or its path for image folders
        image = image.get("bytes") or image.get("path") or b""
    data = image.encode() if isinstance(image, str) else bytes(image)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=seed.to_bytes(8, "little")).digest(), "little")


def labelled_stream(builder, split: str, image_column: str | None = None, label_column: str | None = None):
    """The raw rows {"image", "label"} of a split of `builder` (an `open_dataset` result) that has labels; a
    `UsageError` for a split without them."""
    stream = load_raw_stream(builder, split, image_column, label_column)
    if "label" not in (stream.column_names or ["label"]):
        raise UsageError(
            f"The split {split!r} has no labels (columns: {stream.column_names}), and this evaluation needs them. "
            "Name the label column with --label_column, or use a labelled dataset."
        )
    return stream


def label_fraction_keys(stream, fraction: float, seed: int) -> set[int]:
    """The `subset_key`s (of `seed`) of a class-balanced `fraction` of a `labelled_stream` (the paper's 1% / 10%
    semi-supervised settings).

    One pass over the split's labels and undecoded images: every class keeps round(fraction x its size) images (at
    least one), those of smallest key. Membership is a function of an image's content and the seed alone, so the
    subset is the same for any number of DataLoader workers or processes and any shard order.
    """
    if not 0 < fraction <= 1:
        raise UsageError(f"--label_fraction must be in (0, 1], e.g. 0.01 or 0.1; got {fraction}.")
    keys_by_class = {}
    for rows in stream.iter(batch_size=1000):
        for image, label in zip(rows["image"], rows["label"]):
            keys_by_class.setdefault(label, []).append(subset_key(seed, image))
    return {
        key
        for keys in keys_by_class.values()
        for key in heapq.nsmallest(max(1, round(fraction * len(keys))), keys)
    }


class _InSubset:
    """A filter of raw rows: whether the row's image is one of `keys` (a picklable callable, for DataLoader workers)."""

    def __init__(self, seed: int, keys: set[int]):
        self.seed, self.keys = seed, keys

    def __call__(self, row) -> bool:
        return subset_key(self.seed, row["image"]) in self.keys


def _rows_in(stream, keep):
    yield from (row for row in stream if keep(row))


def subset_stream(stream, seed: int, keys: set[int], num_shards: int):
    """The raw rows of `stream` whose `subset_key` (of `seed`) is in `keys`, read in one pass into an Arrow file in
    datasets' cache (removed when the process ends) and streamed from there in `num_shards` shards: a 1% subset then
    costs one pass over the split per run instead of one per epoch."""
    folder = tempfile.mkdtemp(prefix="extrema-subset-", dir=datasets.config.HF_DATASETS_CACHE)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    rows = datasets.Dataset.from_generator(
        _rows_in, features=stream.features, cache_dir=folder, fingerprint=f"subset-{seed}-{len(keys)}",
        gen_kwargs={"stream": stream, "keep": _InSubset(seed, keys)},
    )  # fmt: skip
    return rows.to_iterable_dataset(num_shards=max(1, min(num_shards, len(rows))))


def labelled_loader(
    stream, transform, *, batch_size: int, num_workers: int = 0, seed: int = 0, max_samples: int | None = None,
    shuffle: bool = False, shuffle_buffer_size: int = 1000, subset_keys: set[int] | None = None,
):  # fmt: skip
    """Batches {"pixel_values" (B, 3, S, S), "label" (B,)} of a `labelled_stream`'s decodable images, or of a subset.

    With `max_samples`, the subset is the first images of every shard (`ShardQuotaSubset`; the same for any number of
    DataLoader workers) when not shuffled, and the first images of the stream when shuffled (then it depends on the
    number of workers). With `shuffle` the images are reshuffled every epoch (call `set_epoch(epoch)` on the loader)
    through a buffer of `shuffle_buffer_size`. `subset_keys` (`label_fraction_keys` of the same `seed`) keeps only
    the images of a --label_fraction subset. Making or reading the loader never draws from the global RNG.
    """
    if subset_keys is not None:
        stream = subset_stream(stream, seed, subset_keys, num_shards=max(1, num_workers))
    num_workers = min(num_workers, stream.num_shards)
    if max_samples is not None and not shuffle:
        subset = ShardQuotaSubset(stream, transform, max_samples, batch_size)
        generator = torch.Generator().manual_seed(seed)  # so that making a loader never draws from the global RNG
        return torch.utils.data.DataLoader(subset, batch_size=None, num_workers=num_workers, generator=generator)
    stream = stream.map(_decode_row).filter(_is_decoded)
    if max_samples is not None:
        stream = stream.take(max_samples)
    if shuffle:
        # one shard at a time feeds the buffer: datasets sleeps 5 s at the end of every pass that interleaves
        # Parquet shards (a pyarrow thread-shutdown workaround), which would add 5 s to every epoch
        buffer_size = max(1, shuffle_buffer_size)
        stream = stream.shuffle(seed=seed, buffer_size=buffer_size, max_buffer_input_shards=1)
    stream = stream.map(lambda row: {**row, "pixel_values": transform(row["image"])}, remove_columns=["image"])
    return torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_eval,
        generator=torch.Generator().manual_seed(seed),
    )
