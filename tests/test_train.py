"""Tests of train_extrema.py: data stream, augmentations, kNN, schedules, resume, 2 processes, export.

Everything runs on tiny Parquet datasets written by `_train_data.py`, the `tiny` config and batches of a few images.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
import torchvision.transforms.v2.functional as F
from _train_data import png_bytes, write_image_parquet
from safetensors.torch import load_file
from torchvision.transforms import v2

import data_extrema as de  # the repository root is on sys.path (conftest.py)
import eval_extrema as ee
import train_extrema as te
from configuration_extrema import ExtremaConfig
from modeling_extrema import ExtremaForPreTraining, ExtremaModel

REPO = Path(__file__).resolve().parents[1]

# a few optimizer steps of the tiny network on 32 px images, without kNN or trackers
FAST = ["--report_to", "none", "--skip_knn", "--per_device_train_batch_size", "8", "--drop_path_rate", "0",
        "--mixed_precision", "no"]  # float32 on every CPU (auto picks bf16 where the CPU has it)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models gain nothing from a second thread, and DataLoader workers need the cores (see make_accelerator)."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# kNN, schedules, weight decay


def reference_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    """Wu et al. 2018 written one query at a time."""
    train_x = train_x / train_x.norm(dim=1, keepdim=True)
    top1 = top5 = 0
    for x, y in zip(test_x / test_x.norm(dim=1, keepdim=True), test_y):
        similarity = train_x @ x
        nearest = similarity.argsort(descending=True)[:k]
        votes = torch.zeros(num_classes, dtype=torch.float64)
        for j in nearest:
            votes[train_y[j]] += torch.exp(similarity[j].double() / temperature)
        ranked = votes.argsort(descending=True)
        top1 += int(ranked[0] == y)
        top5 += int(y in ranked[:5])
    return 100 * top1 / len(test_y), 100 * top5 / len(test_y)


def test_weighted_knn_matches_a_reference_and_chunking():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=generator)
    train_y, test_y = torch.randint(0, 8, (300,), generator=generator), torch.randint(0, 8, (70,), generator=generator)
    train_x = centers[train_y] + 1.5 * torch.randn(300, 16, generator=generator)
    test_x = centers[test_y] + 1.5 * torch.randn(70, 16, generator=generator)
    result = ee.weighted_knn(train_x, train_y, test_x, test_y, k=20, temperature=0.07, chunk_size=16)
    top1, top5 = reference_knn(train_x, train_y, test_x, test_y, 20, 0.07, 8)
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)
    assert 30 < result["top1"] < 100  # neither trivial nor chance (12.5%)
    assert ee.weighted_knn(train_x, train_y, test_x, test_y, k=20, chunk_size=1000) == result
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training loop's kNN runs inside the step's autocast
        assert ee.weighted_knn(train_x, train_y, test_x, test_y, k=20, chunk_size=16) == result
        assert ee.weighted_knn(train_x.bfloat16(), train_y, test_x.bfloat16(), test_y, k=20)["top1"] > 30
    # well separated clusters are classified perfectly; k larger than the gallery is clamped
    perfect = ee.weighted_knn(centers, torch.arange(8), centers * 2, torch.arange(8), k=1000)
    assert perfect == {"top1": 100.0, "top5": 100.0}


def test_schedules():
    assert te.get_lr(0, 100, 10, 1.0) == 0.0
    assert te.get_lr(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert te.get_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert te.get_lr(55, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.55)  # half-way down the cosine
    assert te.get_lr(100, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.1)
    lrs = [te.get_lr(s, 100, 10, 1.0) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert te.get_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert te.get_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert te.get_momentum(100, 100, 0.996) == pytest.approx(1.0)


def test_teacher_init_share_is_the_product_of_the_momenta():
    model = ExtremaForPreTraining(ExtremaConfig.from_preset("tiny"))
    initial = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.zero_()
    for step in range(50):  # a student at 0: the teacher's weights shrink by exactly the kept share
        model.update_teacher(te.get_momentum(step, 50, 0.9))
    share = te.teacher_init_share(50, 0.9)
    for before, after in zip(initial, model.teacher.parameters()):
        torch.testing.assert_close(after, before * share)
    assert te.teacher_init_share(585, 0.996) == pytest.approx(0.309, abs=1e-3)  # 3 CIFAR-10 epochs, paper momentum
    assert te.teacher_init_share(585, 0.99) == pytest.approx(0.053, abs=1e-3)


def test_plan_schedule_counts_epochs_in_steps():
    args = te.parse_args(["--train_dir", "x", "--total_batch_size", "2048", "--gradient_accumulation_steps", "2"])
    schedule = te.plan_schedule(args, num_examples=1_281_167, world_size=8)
    assert (schedule.per_device_batch, schedule.total_batch) == (128, 2048)
    assert schedule.peak_lr == pytest.approx(1.5e-4 * 8)  # base lr x 2048 / 256
    assert schedule.steps_per_epoch == 625 and schedule.total_steps == 300 * 625 and schedule.warmup_steps == 40 * 625
    with pytest.raises(de.UsageError, match="not divisible"):
        te.plan_schedule(args, num_examples=1000, world_size=3)
    with pytest.raises(de.UsageError, match="--steps_per_epoch"):
        te.plan_schedule(te.parse_args(["--train_dir", "x"]), num_examples=None, world_size=1)
    fixed = te.parse_args(["--train_dir", "x", "--steps_per_epoch", "7", "--num_train_epochs", "2"])
    assert te.plan_schedule(fixed, num_examples=None, world_size=1).total_steps == 14


def test_weight_decay_only_on_weight_matrices_of_the_student():
    model = ExtremaForPreTraining(ExtremaConfig.from_preset("tiny"))
    decay, no_decay = te.param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "student.encoder.layer.0.attention.qkv.weight" in decayed
    assert "predictor.0.weight" in decayed
    assert "student.encoder.cls_token" in not_decayed and "student.layernorm.weight" in not_decayed
    assert "student.encoder.layer.0.attention.qkv.bias" in not_decayed
    assert "student.encoder.class_attention_layer.0.layer_scale_1" in not_decayed
    assert not any(n.startswith(("teacher.", "teacher_projector.")) for n in decayed | not_decayed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable


def test_predictor_lr_multiplier_scales_only_the_predictor():
    model = ExtremaForPreTraining(ExtremaConfig.from_preset("tiny"))
    groups = te.param_groups(model, 0.1, predictor_lr_multiplier=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        in_predictor = {names[id(p)].startswith("predictor.") for p in group["params"]}
        assert in_predictor == {group["lr_scale"] == 10.0}
        decayed = {p.ndim >= 2 and not names[id(p)].endswith("cls_token") for p in group["params"]}
        assert decayed == {group["weight_decay"] == 0.1}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    assert {g["lr_scale"] for g in te.param_groups(model, 0.1)} == {1.0}


def test_collapse_warning_says_what_to_try(caplog):
    spread = {"collapse/target_mean_cosine": 0.1, "collapse/target_std": 0.9}
    assert te.warn_on_collapse(spread, 10, warned=False) is False and not caplog.records
    collapsed = {"collapse/target_mean_cosine": 0.95, "collapse/target_std": 0.2}
    assert te.warn_on_collapse(collapsed, 20, warned=False) is True
    assert "collapsing" in caplog.text and "--target_centering" in caplog.text
    caplog.clear()
    assert te.warn_on_collapse(collapsed, 30, warned=True) is True and not caplog.records  # once per run


@pytest.mark.parametrize("flags", ["AVX512F AVX512_BF16", "avx512f avx512_bf16", "amx_bf16 amx_tile", "avx2 avx512f"])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch, flags):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: f"processor : 0\nflags : {flags.lower()}\n")
    assert te.bf16_is_native() == ("bf16" in flags.lower())


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
    # The CPU path truncates to uint8 after every op (and floors its grayscale images): measured at most 4.6, 4.7 and
    # 4.3 levels for color, crop_color and shared_crop_color, 0 where no colour op applies; the colour parameters of
    # another seed differed from the CPU path's view by 47 levels or more.
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by scripts/gpu_check.sh)")
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


def take_batches(dataset, args, position, count):
    transform = de.build_train_transform("shared_crop_color", 32, color_on_device=args.color_on_device)
    batches = de.training_batches(dataset, transform, args, (64,), position, torch.device("cpu"))
    return [next(batches) for _ in range(count)]


@pytest.mark.parametrize("color_on_device", [False, True], ids=["color_on_cpu", "color_on_device"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_stream_resumes_exactly(tmp_path, num_workers, color_on_device):
    write_image_parquet(tmp_path / "data", num_images=20, num_shards=3, broken={4})
    raw = de.load_raw_stream(de.open_dataset(train_dir=tmp_path / "data"), "train")
    dataset = de.rank_dataset(raw, 0, 1, seed=0, buffer_size=4)
    args = te.parse_args(["--train_dir", "x", "--per_device_train_batch_size", "3", "--num_workers", str(num_workers)]
                         + ["--color_on_device"] * color_on_device)  # fmt: skip
    position = de.StreamPosition(epoch=1)
    reference = take_batches(dataset, args, position, 9)  # 27 images from 19 decodable: the stream wraps around
    assert sum(position.skipped_images.values()) >= 1
    # shared_crop_color: two float views, or one uint8 crop and the colour parameters of each view
    on_cpu, on_device = ["pixel_values", "pixel_values_teacher"], ["color_student", "color_teacher", "pixel_values"]
    views = on_device if color_on_device else on_cpu
    assert sorted(set(reference[0]) - {"noise", "worker", "rows", "skipped"}) == views
    assert reference[0]["pixel_values"].dtype == (torch.uint8 if color_on_device else torch.float32)
    for consumed in (3, 5):
        position = de.StreamPosition(epoch=1)
        take_batches(dataset, args, position, consumed)
        saved = de.StreamPosition.from_json(json.loads(json.dumps(position.to_json())))
        resumed = take_batches(dataset, args, saved, 9 - consumed)
        for a, b in zip(reference[consumed:], resumed):
            for key in views + ["noise"]:
                assert torch.equal(a[key], b[key])
    with pytest.raises(de.UsageError, match="resume with --num_workers"):
        take_batches(dataset, te.parse_args(["--train_dir", "x", "--num_workers", "1"]), saved, 1)
    # another epoch is another order
    other = take_batches(dataset, args, de.StreamPosition(epoch=2), 1)[0]
    assert not torch.equal(other["pixel_values"], reference[0]["pixel_values"])


# ---------------------------------------------------------------------------------------------------------------
# Training runs


def test_recipes_and_defaults():
    args = te.parse_args([])
    assert args.recipe == "tiny-fashion-mnist" and args.model_config == "tiny"
    args = te.parse_args(["--recipe", "vit-base-mask08x5-color", "--num_masks", "2"])
    assert (args.model_config, args.mask_ratio, args.num_masks) == ("vit-base-patch16", 0.8, 2)
    assert (args.augmentation, args.total_batch_size, args.warmup_epochs) == ("shared_crop_color", 2048, 40)
    assert (args.adam_beta2, args.weight_decay, args.learning_rate, args.ema_momentum) == (0.95, 0.1, 1.5e-4, 0.996)
    assert te.parse_args(["--recipe", "vit-base-mask09x8-color"]).num_masks == 8
    assert te.parse_args(["--recipe", "vit-base-mask08x5"]).augmentation == "crop"
    # the ImageNet recipes run on GPUs: colour augmentation there; the CPU demo and custom runs keep it in the workers
    gpu_recipes = [name for name in te.RECIPES if name.startswith("vit-base")]
    assert len(gpu_recipes) == 4 and all(te.parse_args(["--recipe", name]).color_on_device for name in gpu_recipes)
    assert not te.parse_args([]).color_on_device and not te.parse_args(["--train_dir", "x"]).color_on_device
    assert te.parse_args(["--train_dir", "x", "--color_on_device"]).color_on_device
    assert not te.parse_args(["--recipe", "vit-base-mask08x5", "--no-color_on_device"]).color_on_device
    assert te.parse_args(["--train_dir", "x"]).recipe is None
    on_own_data = te.parse_args(["--recipe", "vit-base-mask08x5", "--train_dir", "x"])
    assert on_own_data.dataset_name is None and on_own_data.validation_split is None and on_own_data.num_masks == 5
    with pytest.raises(SystemExit):
        te.parse_args(["--push_to_hub"])


def test_train_takes_the_flags_as_keywords(monkeypatch):
    argvs = []
    monkeypatch.setattr(te, "main", argvs.append)
    te.train(train_dir="data", dataset_name=None, max_train_steps=3, skip_knn=True, recipe="vit-base-mask08x5",
             color_on_device=False)  # fmt: skip
    assert argvs == [["--train_dir", "data", "--max_train_steps", "3", "--skip_knn", "--recipe", "vit-base-mask08x5",
                      "--no-color_on_device"]]  # fmt: skip
    args = te.parse_args(argvs[0])
    assert (args.max_train_steps, args.skip_knn, args.color_on_device, args.num_masks) == (3, True, False, 5)


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("color", [[], ["--color_on_device"]], ids=["color_on_cpu", "color_on_device"])
def test_resume_after_a_kill_gives_the_same_weights(tmp_path, color):
    """6 steps in one go == 4 steps with a checkpoint at 3, a 'kill', then a resume from step 3 to 6."""
    write_image_parquet(tmp_path / "data", num_images=44, num_shards=3, broken={5})
    common = FAST + color + ["--train_dir", str(tmp_path / "data"), "--max_train_steps", "6", "--num_workers", "2",
                             "--shuffle_buffer_size", "16", "--learning_rate", "1e-2", "--warmup_steps", "2",
                             "--drop_path_rate", "0.1", "--checkpointing_steps", "3"]  # fmt: skip
    # 43 decodable images / batch 8 = 5 steps per epoch: the runs cross an epoch boundary
    one_go = te.main(common + ["--output_dir", str(tmp_path / "one_go"), "--export_every", "3"])
    assert one_go["steps_per_epoch"] == 5
    assert (tmp_path / "one_go" / "export-step-3" / "model.safetensors").exists()
    killed = tmp_path / "killed"
    assert te.main(common + ["--output_dir", str(killed), "--stop_after_steps", "4"]) is None
    assert [p.name for p in te.list_checkpoints(killed)] == ["checkpoint-3"] and not (killed / "final").exists()
    resumed = te.main(common + ["--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    assert resumed["step"] == 6
    full_state = weights(tmp_path / "one_go" / "checkpoint-6")
    assert_same_weights(full_state, weights(killed / "checkpoint-6"), atol=1e-6)
    assert_same_weights(weights(tmp_path / "one_go" / "final"), weights(killed / "final"), atol=1e-6)
    # the runs did train: the student moved away from the teacher it was copied from
    assert not torch.allclose(full_state["student.layernorm.weight"], full_state["teacher.layernorm.weight"])
    assert resumed["loss"] == pytest.approx(one_go["loss"], abs=1e-6)


@pytest.mark.parametrize(
    "fix", [[], ["--target_centering", "ema"]], ids=["official", "ema_centred"]
)
def test_two_processes_train_the_same_model_as_one(tmp_path, fix):
    """2 gloo processes x batch 4 == 1 process x batch 8: the same loss and weights (and, centred, the same centre:
    the batch mean of the targets is all-reduced).

    One Parquet shard cannot be split by shards, so rank r reads rows r, r + 2, ...: the union of the two ranks'
    batches is the 1-process batch, and the augmentations and masks follow each image, not the process. Equal
    weights therefore also show that the ranks saw different images (the same images twice would give another
    gradient); `test_ranks_read_disjoint_parts_that_cover_the_data` checks the split directly. Both runs go through
    the same launcher, on the CPU (`accelerate launch --cpu` would start one process only).
    """
    write_image_parquet(tmp_path / "data", num_images=48, num_shards=1)
    argv = FAST + ["--train_dir", str(tmp_path / "data"), "--max_train_steps", "3", "--num_workers", "0",
                   "--shuffle_buffer_size", "0", "--learning_rate", "1e-2", "--warmup_steps", "1",
                   "--total_batch_size", "8", *fix]  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # gloo picks its network interface from the host name, which fails on some machines: use the loopback
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath,
           "GLOO_SOCKET_IFNAME": "lo"}  # fmt: skip
    logs = {}
    for processes in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(29517 + processes + 2 * len(fix)), str(REPO / "train_extrema.py"), *argv,
                   "--output_dir", str(tmp_path / f"{processes}")]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[processes] = result.stderr
    assert "(1 processes x 8 x 1 accumulation)" in logs[1] and "(2 processes x 4 x 1 accumulation)" in logs[2]
    assert_same_weights(weights(tmp_path / "1" / "final"), weights(tmp_path / "2" / "final"), atol=1e-5)
    losses = [float(log.split("train/loss ")[-1].split(",")[0]) for log in logs.values()]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_nonfinite_loss_saves_the_state_and_stops(tmp_path, monkeypatch):
    class Diverging(ExtremaForPreTraining):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.loss = output.loss * float("nan")
            return output

    monkeypatch.setattr(te, "ExtremaForPreTraining", Diverging)
    write_image_parquet(tmp_path / "data", num_images=16, num_shards=1)
    argv = FAST + ["--train_dir", str(tmp_path / "data"), "--max_train_steps", "3", "--num_workers", "0",
                   "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(FloatingPointError, match="loss is nan at step 0.*nonfinite-step-0"):
        te.main(argv)
    assert (tmp_path / "out" / "nonfinite-step-0" / "model.safetensors").exists()
    assert not (tmp_path / "out" / "final").exists()


def test_trains_on_cifar10_with_knn_tensorboard_and_upload(tmp_path, cifar10_dir, monkeypatch):
    uploads = []

    class FakeHub:  # records what --push_to_hub would send
        def create_repo(self, repo_id, **kwargs):
            uploads.append(("create", repo_id))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploads.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    argv = ["--train_dir", str(cifar10_dir), "--max_train_steps", "2", "--per_device_train_batch_size", "8",
            "--num_workers", "1", "--knn_train_samples", "64", "--knn_val_samples", "32", "--knn_k", "10",
            "--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", "me/extrema-cifar"]  # fmt: skip
    result = te.main(argv)
    assert result["num_examples"] == 50_000 and result["steps_per_epoch"] == 50_000 // 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "out" / "logs").rglob("events.out.tfevents.*")))).Reload()
    logged = set(events.Tags()["scalars"])
    assert {f"collapse/{b}_{m}" for b in ("target", "prediction") for m in ("mean_cosine", "std")} <= logged
    cosine = events.Scalars("collapse/target_mean_cosine")[-1].value
    assert -1 <= cosine <= 1
    assert 0 <= result["knn_start"]["top1"] <= 100 and result["knn_end"]["top5"] >= result["knn_end"]["top1"]
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    card = (tmp_path / "out" / "final" / "README.md").read_text()
    assert "kNN" in card and f"{result['knn_end']['top1']:.2f}%" in card
    assert 'from_pretrained("me/extrema-cifar"' in card
    assert uploads[0] == ("create", "me/extrema-cifar") and uploads[1][:2] == ("upload", "me/extrema-cifar")
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(uploads[1][2])


# ---------------------------------------------------------------------------------------------------------------
# Export


def test_export_loads_with_automodel_in_a_fresh_process(tmp_path):
    from huggingface_hub import ModelCard

    torch.manual_seed(0)
    backbone = ExtremaModel(ExtremaConfig.from_preset("tiny")).eval()
    folder = te.export_backbone(
        backbone, tmp_path / "export", model_id="me/extrema-tiny", datasets=["uoft-cs/cifar10"],
        recipe={"masking": "75% x 2", "epochs / steps": "0.801282 / 375"}, knn={"top1": 61.25, "top5": 95.5, "k": 20},
    )  # fmt: skip
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "x.pt")
    expected = backbone(pixel_values).pooler_output
    script = (
        "import sys, torch\n"
        "from transformers import AutoImageProcessor, AutoModel\n"
        "model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "processor = AutoImageProcessor.from_pretrained(sys.argv[1])\n"
        "assert processor.size == {'height': 32, 'width': 32}, processor.size\n"
        "with torch.no_grad():\n"
        "    out = model(torch.load(sys.argv[2])).pooler_output\n"
        "torch.save(out, sys.argv[3])\n"
        "print(type(model).__name__, type(processor).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ExtremaModel", "ViTImageProcessor"]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, atol=1e-5, rtol=1e-5)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_extrema.ExtremaModel"
    assert (folder / "modeling_extrema.py").exists() and (folder / "model.safetensors").exists()
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(de.IMAGENET_MEAN) and processor["image_std"] == list(de.IMAGENET_STD)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["uoft-cs/cifar10"]
    assert "extrema" in card.data.tags
    assert "61.25%" in card.text and "75% x 2" in card.text and 'from_pretrained("me/extrema-tiny"' in card.text
    assert "| 0.801 / 375 |" in card.text  # long decimals are rounded in the recipe table
    (knn,) = card.data.eval_results  # model-index metadata: the Hub shows the kNN top-1 beside the model
    assert (knn.metric_value, knn.metric_type, knn.dataset_type) == (61.25, "accuracy", "uoft-cs/cifar10")
    assert knn.task_type == "image-classification" and card.data.model_name == "ExtreMA 128-wide, 4-layer ViT/4"
