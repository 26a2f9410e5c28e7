"""A small segmentation dataset written on the fly: CIFAR-10 objects pasted on textured backgrounds, the mask from the
placement (0: background, 1 + c: an object of CIFAR-10 class c), as Parquet in scene_parse_150's layout (`image`,
`annotation`).

    python benchmarks/segmentation_data.py --cifar10_dir path/to/cifar10-parquet --output_dir data/synthetic-seg

The segmentation tests (tests/test_segmentation.py) and the measurements of docs/downstream.md use it.
"""

import argparse
import io
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pyarrow.parquet as pq

NUM_LABELS = 11  # background + the 10 CIFAR-10 classes


def cifar_objects(cifar10_dir, split: str, count: int, skip: int = 0):
    """(RGB PIL image, label) of CIFAR-10 images skip .. skip + count - 1 of a split, read from its Parquet shards."""
    rows = []
    for path in sorted(Path(cifar10_dir).glob(f"{split}-*.parquet")):
        table = pq.read_table(path, columns=["image", "label"]).to_pylist()
        rows.extend(table)
        if len(rows) >= skip + count:
            break
    rows = rows[skip : skip + count]
    if len(rows) < count:
        raise ValueError(f"{cifar10_dir} has fewer than {skip + count} {split} images")
    return [(PIL.Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"), row["label"]) for row in rows]


def texture(rng, size: int) -> np.ndarray:
    """(size, size, 3) uint8: stripes of two random colours at a random angle and frequency, plus pixel noise."""
    y, x = np.mgrid[0:size, 0:size]
    angle, frequency = rng.uniform(0, np.pi), rng.uniform(0.3, 1.5)
    wave = 0.5 + 0.5 * np.sin(frequency * (x * np.cos(angle) + y * np.sin(angle)))[..., None]
    colors = rng.uniform(0, 255, (2, 3))
    pixels = wave * colors[0] + (1 - wave) * colors[1] + rng.normal(0, 12, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_example(rng, obj: PIL.Image.Image, label: int, size: int):
    """One (image, mask): the object resized to a random side of half to three quarters of the image, at a random
    place on a texture; the mask holds 1 + label where the object is."""
    pixels = texture(rng, size)
    side = int(rng.integers(size // 2, 3 * size // 4 + 1))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    pixels[top : top + side, left : left + side] = np.asarray(obj.resize((side, side), PIL.Image.BICUBIC))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top : top + side, left : left + side] = 1 + label
    return PIL.Image.fromarray(pixels), PIL.Image.fromarray(mask, mode="L")


def write_segmentation_parquet(folder, cifar10_dir, split="train", num_images=64, size=32, seed=0, cifar_split=None,
                               skip=0) -> list[np.ndarray]:  # fmt: skip
    """Write `num_images` examples to <folder>/<split>-00000-of-00001.parquet; returns the masks in row order."""
    rng = np.random.default_rng(seed)
    images, annotations, masks = [], [], []
    for obj, label in cifar_objects(cifar10_dir, cifar_split or split, num_images, skip):
        image, mask = make_example(rng, obj, label, size)
        images.append(image)
        annotations.append(mask)
        masks.append(np.asarray(mask))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    table = datasets.Dataset.from_dict({"image": images, "annotation": annotations}, features=features)
    table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return masks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar10_dir", required=True, help="CIFAR-10 as Parquet shards (train-*, test-*)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_train", type=int, default=2000, help="training examples (objects: CIFAR-10 train)")
    parser.add_argument("--num_validation", type=int, default=500, help="validation examples (objects: CIFAR-10 test)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    write_segmentation_parquet(args.output_dir, args.cifar10_dir, "train", args.num_train, args.size, seed=0)
    write_segmentation_parquet(args.output_dir, args.cifar10_dir, "validation", args.num_validation, args.size,
                               seed=1, cifar_split="test")  # fmt: skip


if __name__ == "__main__":
    main()
