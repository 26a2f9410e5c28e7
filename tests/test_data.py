"""Tests of data_extrema.py: decoding, the augmentations of Table 4 and their colour part on the device, the data
sources, the split by rank, and the training stream that resumes exactly; the labelled loader of evaluation.

Everything runs on tiny Parquet datasets written by `_train_data.py`.
"""

import io
import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.v2.functional as F
from _train_data import png_bytes, write_image_parquet
from torchvision.transforms import v2

import data_extrema as de  # the repository root is on sys.path (conftest.py)


# ---------------------------------------------------------------------------------------------------------------
# Images and augmentations


@pytest.mark.parametrize("mode", ["L", "LA", "P", "P+transparency", "RGBA", "CMYK", "I;16", "1"])
def test_decode_image_converts_every_mode_to_rgb(mode):
    transparent = mode in ("LA", "RGBA", "P+transparency")
    image = PIL.Image.new("RGBA", (6, 5), (10, 200, 30, 0 if transparent else 255)).convert(mode.split("+")[0])
    if mode == "P+transparency":
        image.info["transparency"] = image.getpixel((0, 0))  # that palette entry is transparent
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    decoded = de.decode_image({"bytes": buffer.getvalue(), "path": None})
    assert decoded.mode == "RGB" and decoded.size == (6, 5)
    if transparent:  # transparent pixels are laid on white
        assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_returns_none_for_broken_images():
    assert de.decode_image({"bytes": b"<html>404</html>", "path": None}) is None
    assert de.decode_image(png_bytes(PIL.Image.new("RGB", (8, 8)))[:30]) is None  # truncated
    assert de.decode_image(np.zeros((4, 4, 3), dtype=np.uint8)).size == (4, 4)


def spatial_correlation(a, b):
    return float(np.corrcoef(a[0].flatten().numpy(), b[0].flatten().numpy())[0, 1])


def test_train_transforms_share_or_draw_views_as_in_table_4():
    # a gray image with structure: colour jitter changes its intensities monotonically, a crop changes its layout
    rng = np.random.default_rng(0)
    gray = (np.kron(rng.random((8, 8)), np.ones((8, 8))) * 255).astype(np.uint8)
    image = PIL.Image.fromarray(gray).convert("RGB")
    torch.manual_seed(0)
    for augmentation in de.AUGMENTATIONS:
        student, teacher = de.build_train_transform(augmentation, 32)(image)
        assert student.shape == teacher.shape == (3, 32, 32) and student.dtype == torch.float32
    same = {"center", "color", "crop"}
    for augmentation in same:
        student, teacher = de.build_train_transform(augmentation, 32)(image)
        assert torch.equal(student, teacher), augmentation
    center, _ = de.build_train_transform("center", 32)(image)
    assert torch.equal(center, de.build_eval_transform(32)(image))  # "no augmentation" is the evaluation view
    shared = [spatial_correlation(*de.build_train_transform("shared_crop_color", 32)(image)) for _ in range(20)]
    independent = [spatial_correlation(*de.build_train_transform("crop_color", 32)(image)) for _ in range(20)]
    assert min(shared) > 0.9  # one crop: the same layout under two colourings
    assert np.mean(independent) < 0.6  # two crops: different layouts
    with pytest.raises(de.UsageError, match="Unknown augmentation"):
        de.build_train_transform("mixup", 32)


def reference_colors(image, params):
    """torchvision v2's float kernels, one image at a time, with the choices in a `ColorParameters` row."""
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    if params[0]:
        for op in params[5:9].long().tolist():
            image = ops[op](image, params[1 + op].item())
    return F.rgb_to_grayscale(image, num_output_channels=3) if params[9] else image


def test_adjust_colors_matches_torchvision_image_by_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(48, 3, 12, 12, generator=generator)
    images[:, :, 0] = images[:, :1, 0]  # gray pixels (no hue), and black and white ones
    images[:, :, 1, :6], images[:, :, 1, 6:] = 0.0, 1.0
    torch.manual_seed(0)
    params = torch.stack([de.ColorParameters()(None)[1] for _ in range(48)])  # (48, 10)
    # 8 images with one op alone, at the lower and the upper end of its range (the other factors neutral)
    params[:8, 0], params[:8, 1:5] = 1.0, torch.tensor([1.0, 1.0, 1.0, 0.0])
    for i in range(8):
        params[i, 1 + i % 4] = (0.6, 0.6, 0.8, -0.1, 1.4, 1.4, 1.2, 0.1)[i]
    assert params[:, 0].any() and not params[:, 0].all() and params[:, 9].any() and not params[:, 9].all()
    batched = de.adjust_colors(images, params)
    for image, row, out in zip(images, params, batched):
        torch.testing.assert_close(out, reference_colors(image, row), atol=1e-5, rtol=0)
    # from uint8 pixels to the normalised input of the model, as _normalize() does it
    pixels = (images * 255).round().to(torch.uint8)
    expected = torch.stack([F.normalize(reference_colors(F.to_dtype(x, torch.float32, scale=True), row),
                                        de.IMAGENET_MEAN, de.IMAGENET_STD) for x, row in zip(pixels, params)])  # fmt: skip
    torch.testing.assert_close(de.color_augment(pixels, params), expected, atol=1e-5, rtol=0)


def test_color_parameters_draw_what_torchvision_draws(monkeypatch):
    jitter = v2.RandomApply([v2.ColorJitter(*de.COLOR_JITTER)], p=de.COLOR_JITTER_P)
    grayscale = v2.RandomGrayscale(p=de.GRAYSCALE_P)
    drawn = {}
    monkeypatch.setattr(jitter.transforms[0], "transform", lambda image, params: drawn.update(jitter=params) or image)
    monkeypatch.setattr(grayscale, "transform", lambda image, params: drawn.update(gray=True) or image)
    image, seen = torch.zeros(3, 4, 4), set()
    for seed in range(100):
        drawn.clear()
        torch.manual_seed(seed)
        grayscale(jitter(image))
        after_torchvision = torch.rand(1)
        torch.manual_seed(seed)
        params = de.ColorParameters()(image)[1]
        assert torch.equal(torch.rand(1), after_torchvision)  # the same number of draws
        assert bool(params[0]) == ("jitter" in drawn) and bool(params[9]) == ("gray" in drawn)
        if "jitter" in drawn:
            choices = drawn["jitter"]
            assert params[5:9].tolist() == choices["fn_idx"].tolist()
            factors = [choices[f"{name}_factor"] for name in ("brightness", "contrast", "saturation", "hue")]
            assert params[1:5].tolist() == factors  # exactly: the same float32 draws
        seen.add((bool(params[0]), bool(params[9])))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}


@pytest.mark.parametrize("augmentation", de.AUGMENTATIONS)
def test_color_on_device_makes_the_random_choices_of_the_cpu_path(augmentation):
    """Under one image seed, both paths crop, flip and colour alike, and draw the same mask noise after."""
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray((np.kron(rng.random((6, 7, 3)), np.ones((8, 8, 1))) * 255).astype(np.uint8))
    on_cpu = de.build_train_transform(augmentation, 32)
    on_device = de.build_train_transform(augmentation, 32, color_on_device=True)
    to_levels = torch.tensor(de.IMAGENET_STD)[:, None, None] * 255  # normalised differences -> uint8 levels
    differences = []
    for seed in range(40):
        torch.manual_seed(seed)
        expected, noise = de.view_fields(*on_cpu(image)), torch.rand(16)
        torch.manual_seed(seed)
        fields = de.view_fields(*on_device(image))
        assert torch.equal(torch.rand(16), noise)
        assert fields["pixel_values"].dtype == (torch.float32 if augmentation in ("center", "crop") else torch.uint8)
        batch = {key: value[None] for key, value in fields.items()}  # a batch of one, as collated
        student, teacher = de.device_views(batch, torch.device("cpu"))
        assert (teacher is None) == ("pixel_values_teacher" not in expected)
        for view, key in ((student, "pixel_values"), (teacher, "pixel_values_teacher")):
            if view is not None:
                differences.append(((view[0] - expected[key]) * to_levels).abs().max().item())
    # The CPU path truncates to uint8 after every op (and floors its grayscale images): a few levels apart, 0 where no
    # colour op applies, while the colour parameters of another seed give a view tens of levels away.
    assert max(differences) < 6 and min(differences) == 0
    if augmentation in ("center", "crop"):  # no colour part: the flag changes nothing
        assert max(differences) == 0
    sent = {
        "center": ["pixel_values"],
        "crop": ["pixel_values"],
        "color": ["color_student", "pixel_values"],  # one view for both branches
        "crop_color": ["color_student", "color_teacher", "pixel_values", "pixel_values_teacher"],
        "shared_crop_color": ["color_student", "color_teacher", "pixel_values"],  # one uint8 crop for both views
    }
    assert sorted(fields) == sent[augmentation]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
def test_cuda_color_augment_never_waits_and_matches_the_cpu():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator)
    torch.manual_seed(0)
    params = torch.stack([de.ColorParameters()(None)[1] for _ in range(64)]).pin_memory()
    expected = de.color_augment(pixels, params)
    pixels = pixels.cuda()
    de.color_augment(pixels, params)  # first calls load kernels
    torch.cuda.set_sync_debug_mode("error")  # raises on any call that makes the host wait for the GPU
    try:
        augmented = de.color_augment(pixels, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(augmented.cpu(), expected, atol=1e-5, rtol=0)


def test_eval_transform_normalises_with_imagenet_statistics():
    out = de.build_eval_transform(32)(PIL.Image.new("RGB", (50, 40), (124, 116, 104)))
    assert out.shape == (3, 32, 32)
    expected = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(de.IMAGENET_MEAN)) / torch.tensor(de.IMAGENET_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Data sources


def test_load_image_stream_skips_broken_images_and_detects_columns(tmp_path):
    images = write_image_parquet(tmp_path / "data", num_images=12, num_shards=2, broken={3, 7}, column="img")
    rows = list(de.load_image_stream(train_dir=tmp_path / "data", split="train"))
    assert len(rows) == 10
    assert all(r["image"].mode == "RGB" and r["image"].size == (32, 32) for r in rows)
    assert [r["label"] for r in rows] == [i % 4 for i in range(12) if i not in (3, 7)]
    first = np.asarray(PIL.Image.open(io.BytesIO(images[0])))
    assert np.array_equal(np.asarray(rows[0]["image"]), first)
    with pytest.raises(de.UsageError, match=r"no split 'validation'.*\['train'\]"):
        de.load_image_stream(train_dir=tmp_path / "data", split="validation")
    with pytest.raises(de.UsageError, match="--image_column 'photo'"):
        de.load_image_stream(train_dir=tmp_path / "data", image_column="photo")
    with pytest.raises(de.UsageError, match="not a folder"):
        de.load_image_stream(train_dir=tmp_path / "missing")
    with pytest.raises(de.UsageError, match="either --dataset_name or --train_dir"):
        de.load_image_stream(dataset_name="uoft-cs/cifar10", train_dir=tmp_path / "data")


def test_detect_columns_for_hub_layouts():
    webdataset = datasets.Features(
        {"__key__": datasets.Value("string"), "jpg": datasets.Image(), "cls": datasets.Value("int64")}
    )
    assert de.detect_columns(webdataset) == ("jpg", "cls")
    cifar = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    assert de.detect_columns(cifar) == ("img", "label")
    assert de.detect_columns(datasets.Features({"image": datasets.Image()})) == ("image", None)
    with pytest.raises(de.UsageError, match="No image column"):
        de.detect_columns(datasets.Features({"text": datasets.Value("string")}))


def write_idx(path, array):
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_default_is_converted_once_to_parquet(tmp_path, monkeypatch):
    source = tmp_path / "idx"
    source.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = list(de.load_image_stream(split="test", fashion_mnist_dir=source))
    assert [r["label"] for r in rows] == list(range(10))
    assert rows[0]["image"].mode == "RGB" and rows[0]["image"].size == (28, 28)
    cache = tmp_path / "cache" / "extrema" / "fashion-mnist-parquet"
    assert len(list(cache.glob("train-*.parquet"))) == 6
    assert de.count_examples(de.open_dataset(fashion_mnist_dir=source), "train") == 30
    with pytest.raises(de.UsageError, match="apt-get install dataset-fashion-mnist"):
        de.prepare_fashion_mnist(tmp_path / "nowhere", cache_dir=tmp_path / "other")


def test_ranks_read_disjoint_parts_that_cover_the_data(tmp_path):
    for num_shards in (4, 1):  # whole shards per rank, and 1 row in 2 when the shards cannot be split
        folder = tmp_path / f"shards{num_shards}"
        images = write_image_parquet(folder, num_images=24, num_shards=num_shards)
        raw = de.load_raw_stream(de.open_dataset(train_dir=folder), "train")
        ranks = [de.rank_dataset(raw, rank, world_size=2, seed=0, buffer_size=8) for rank in (0, 1)]
        seen = [[row["image"]["bytes"] for row in ranks[rank]] for rank in (0, 1)]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(images)


# ---------------------------------------------------------------------------------------------------------------
# The training stream resumes exactly, whatever the number of workers


def take_batches(dataset, position, count, num_workers, color_on_device=False):
    """`count` batches of 3 from `position` on (which they update), as the training loop reads them (seed 0)."""
    transform = de.build_train_transform("shared_crop_color", 32, color_on_device=color_on_device)
    batches = de.training_batches(
        dataset, transform, (64,), position, torch.device("cpu"), batch_size=3, num_workers=num_workers, seed=0
    )
    return [next(batches) for _ in range(count)]


@pytest.mark.parametrize("color_on_device", [False, True], ids=["color_on_cpu", "color_on_device"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_stream_resumes_exactly(tmp_path, num_workers, color_on_device):
    write_image_parquet(tmp_path / "data", num_images=20, num_shards=3, broken={4})
    raw = de.load_raw_stream(de.open_dataset(train_dir=tmp_path / "data"), "train")
    dataset = de.rank_dataset(raw, 0, 1, seed=0, buffer_size=4)
    stream = dict(num_workers=num_workers, color_on_device=color_on_device)
    position = de.StreamPosition(epoch=1)
    reference = take_batches(dataset, position, 9, **stream)  # 27 images from 19 decodable: the stream wraps around
    assert sum(position.skipped_images.values()) >= 1
    # shared_crop_color: two float views, or one uint8 crop and the colour parameters of each view
    on_cpu, on_device = ["pixel_values", "pixel_values_teacher"], ["color_student", "color_teacher", "pixel_values"]
    views = on_device if color_on_device else on_cpu
    assert sorted(set(reference[0]) - {"noise", "worker", "rows", "skipped"}) == views
    assert reference[0]["pixel_values"].dtype == (torch.uint8 if color_on_device else torch.float32)
    for consumed in (3, 5):
        position = de.StreamPosition(epoch=1)
        take_batches(dataset, position, consumed, **stream)
        saved = de.StreamPosition.from_json(json.loads(json.dumps(position.to_json())))
        resumed = take_batches(dataset, saved, 9 - consumed, **stream)
        for a, b in zip(reference[consumed:], resumed):
            for key in views + ["noise"]:
                assert torch.equal(a[key], b[key])
    with pytest.raises(de.UsageError, match="resume with --num_workers"):
        take_batches(dataset, saved, 1, num_workers=1, color_on_device=color_on_device)
    # another epoch is another order
    other = take_batches(dataset, de.StreamPosition(epoch=2), 1, **stream)[0]
    assert not torch.equal(other["pixel_values"], reference[0]["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------
# Labelled batches for evaluation


def test_labelled_loader_reads_a_fixed_labelled_subset(tmp_path):
    write_image_parquet(tmp_path / "data", num_images=12, num_shards=2, broken={3})
    write_image_parquet(tmp_path / "data", split="test", num_images=6, num_shards=1, seed=1)
    builder = de.open_dataset(train_dir=tmp_path / "data")
    assert de.default_validation_split(builder) == "test"
    transform = de.build_eval_transform(16)
    batches = list(de.labelled_loader(de.labelled_stream(builder, "train"), transform, max_samples=8, batch_size=3))
    # the first 4 decodable images of each of the 2 shards (images 0-5 and 6-11; image 3 is broken), shard by shard
    assert [len(batch["label"]) for batch in batches] == [3, 1, 3, 1]
    assert torch.cat([batch["label"] for batch in batches]).tolist() == [i % 4 for i in (0, 1, 2, 4, 6, 7, 8, 9)]
    assert batches[0]["pixel_values"].shape == (3, 3, 16, 16)
    rng = torch.get_rng_state()
    again = list(de.labelled_loader(de.labelled_stream(builder, "train"), transform, max_samples=8, batch_size=8))
    assert torch.equal(torch.cat([b["pixel_values"] for b in again]), torch.cat([b["pixel_values"] for b in batches]))
    assert torch.equal(torch.get_rng_state(), rng)  # the training's RNG is left as it was

    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    image = {"bytes": png_bytes(PIL.Image.new("RGB", (8, 8))), "path": None}
    table = datasets.Dataset.from_dict({"image": [image]}, features=datasets.Features({"image": datasets.Image()}))
    table.to_parquet(str(unlabelled / "train-00000-of-00001.parquet"))
    builder = de.open_dataset(train_dir=unlabelled)
    assert de.default_validation_split(builder) is None
    with pytest.raises(de.UsageError, match="no labels"):
        de.labelled_stream(builder, "train")


def test_an_evaluation_subset_does_not_depend_on_the_number_of_workers(tmp_path):
    """A kNN gallery must not change with --num_workers: 8 images of 3 shards (3 + 3 + 2), whoever reads them."""
    write_image_parquet(tmp_path / "data", num_images=15, num_shards=3)
    transform = de.build_eval_transform(16)

    def subset(num_workers):
        stream = de.labelled_stream(de.open_dataset(train_dir=tmp_path / "data"), "train")
        batches = list(de.labelled_loader(stream, transform, num_workers=num_workers, max_samples=8, batch_size=2))
        images = torch.cat([batch["pixel_values"] for batch in batches]).flatten(1)
        labels = torch.cat([batch["label"] for batch in batches])
        return sorted(zip(images.sum(1).tolist(), labels.tolist()))

    reference = subset(0)
    assert len(reference) == 8
    assert subset(2) == reference and subset(3) == reference


def test_label_fraction_is_class_balanced_and_the_same_for_any_workers_and_processes(tmp_path):
    """--label_fraction 0.25 of 4 classes x 20 images in 4 shards: 5 images of each class, chosen by the seed alone."""
    from datasets.distributed import split_dataset_by_node

    write_image_parquet(tmp_path / "data", num_images=80, num_shards=4, num_classes=4)
    transform = de.build_eval_transform(16)

    def subset(num_workers, seed=0, fraction=0.25):
        stream = de.labelled_stream(de.open_dataset(train_dir=tmp_path / "data"), "train")
        keys = de.label_fraction_keys(stream, fraction, seed)
        batches = list(de.labelled_loader(
            stream, transform, batch_size=4, num_workers=num_workers, seed=seed, shuffle=True, subset_keys=keys
        ))  # fmt: skip
        images = torch.cat([batch["pixel_values"] for batch in batches]).flatten(1)
        labels = torch.cat([batch["label"] for batch in batches])
        return keys, sorted(zip(images.sum(1).tolist(), labels.tolist()))

    keys, reference = subset(0)
    assert len(keys) == 20 and sorted(label for _, label in reference) == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    assert subset(2)[1] == reference and subset(3)[1] == reference  # any number of DataLoader workers
    # any number of processes: each keeps the images of its part of the stream that are in the subset
    raw = de.load_raw_stream(de.open_dataset(train_dir=tmp_path / "data"), "train")
    in_subset = de._InSubset(0, keys)
    for world_size in (2, 3):
        parts = [split_dataset_by_node(raw, rank, world_size).filter(in_subset) for rank in range(world_size)]
        assert sorted(de.subset_key(0, row["image"]) for part in parts for row in part) == sorted(keys)
    # another seed, another subset of the same balance; 1% of 20 images per class is still one of each
    other = subset(0, seed=1)[1]
    assert other != reference and sorted(label for _, label in other) == sorted(label for _, label in reference)
    assert sorted(label for _, label in subset(0, fraction=0.01)[1]) == [0, 1, 2, 3]
    with pytest.raises(de.UsageError, match="--label_fraction must be in"):
        de.label_fraction_keys(raw, 0, seed=0)


def test_a_label_fraction_is_read_once_per_run_not_once_per_epoch(tmp_path, monkeypatch):
    write_image_parquet(tmp_path / "data", num_images=40, num_shards=2, num_classes=4)
    stream = de.labelled_stream(de.open_dataset(train_dir=tmp_path / "data"), "train")
    keys = de.label_fraction_keys(stream, 0.25, seed=0)
    loader = de.labelled_loader(
        stream, de.build_eval_transform(16), batch_size=4, num_workers=2, seed=0, shuffle=True, subset_keys=keys
    )
    calls = []
    monkeypatch.setattr(de, "subset_key", lambda *args: calls.append(args))  # the pass over the split is done
    epochs = []
    for epoch in range(2):
        loader.dataset.set_epoch(epoch)  # what accelerate's prepared loader does
        epochs.append([tuple(batch["label"].tolist()) for batch in loader])
    assert calls == [] and sum(len(labels) for labels in epochs[0]) == 8  # round(0.25 x 10) of each class
    assert sorted(sum(epochs[0], ())) == sorted(sum(epochs[1], ())) and epochs[0] != epochs[1]  # reshuffled


@pytest.mark.parametrize(
    "image_size, width, height",
    [(32, 50, 40), (32, 40, 50), (32, 37, 91), (32, 300, 200), (32, 33, 33), (32, 101, 67), (32, 32, 48),
     (224, 500, 375), (224, 333, 500)],
)  # fmt: skip
def test_the_exported_processor_is_the_evaluation_transform(tmp_path, image_size, width, height):
    """What AutoImageProcessor loads from an exported folder equals build_eval_transform on non-square images of
    several sizes (short side resized to S / 0.875, centre crop, normalisation), to float rounding."""
    from transformers import AutoImageProcessor

    de.build_image_processor(image_size).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    pixels = np.random.default_rng(width * 1000 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    expected = de.build_eval_transform(image_size)(image)
    actual = processor(image, return_tensors="pt").pixel_values[0]
    assert actual.shape == expected.shape == (3, image_size, image_size)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_every_epoch_draws_new_views_and_masks():
    # torch's and numpy's generators keep the low 32 bits of a seed: the epoch must change those bits
    from data_extrema import example_seed

    cell = {"bytes": b"an image's bytes", "path": None}
    seeds = [example_seed(0, epoch, cell) for epoch in range(50)]
    assert len({seed % 2**32 for seed in seeds}) == 50
    assert len({example_seed(seed, 0, cell) % 2**32 for seed in range(50)}) == 50
    draws = [torch.rand(4, generator=torch.Generator().manual_seed(seed)) for seed in seeds[:2]]
    assert not torch.equal(*draws)
