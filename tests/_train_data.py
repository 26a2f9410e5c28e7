"""Small image datasets written on the fly for the training tests (Parquet shards in the Hub's image layout)."""

import io
from pathlib import Path

import datasets
import numpy as np
import PIL.Image


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_parquet(
    folder, split="train", num_images=40, num_shards=2, size=32, seed=0, broken=(), num_classes=4, column="image"
) -> list[bytes]:
    """`num_images` random RGB images (class = which quadrant is bright) in `num_shards` Parquet files.

    Rows whose index is in `broken` hold bytes that are not an image. Returns the image bytes in row order.
    """
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for i in range(num_images):
        label = i % num_classes
        pixels = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
        half = size // 2
        pixels[(label // 2) * half : (label // 2 + 1) * half, (label % 2) * half : (label % 2 + 1) * half] += 127
        images.append(b"this is not an image" if i in broken else png_bytes(PIL.Image.fromarray(pixels)))
        labels.append(label)
    features = datasets.Features(
        {column: datasets.Image(), "label": datasets.ClassLabel(names=[f"class{k}" for k in range(num_classes)])}
    )
    for shard, rows in enumerate(np.array_split(np.arange(num_images), num_shards)):
        table = datasets.Dataset.from_dict(
            {column: [{"bytes": images[i], "path": None} for i in rows], "label": [labels[i] for i in rows]},
            features=features,
        )
        table.to_parquet(str(folder / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"))
    return images
