"""Behaviour of the evaluation and analysis scripts (scripts/), each on a tiny model and a tiny Parquet dataset.

Datasets: "colors" (three classes of noisy red / green / blue images, which even an untrained network separates),
"noise" (random images with random labels: nothing to learn), "unlabelled" (images only).
"""

import json
import math
import sys

import datasets
import numpy as np
import PIL.Image
import PIL.ImageFont
import pytest
import torch
import torch.nn.functional as F

from _isolated import run_isolated
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # the quality benchmark

import benchmark_quality  # noqa: E402
import eval_finetune  # noqa: E402
import eval_knn  # noqa: E402
import eval_linear  # noqa: E402
import invert_representation  # noqa: E402
import locality_retrieval  # noqa: E402
import visualize_attention  # noqa: E402
from _eval_common import GRID_PADDING, UsageError, load_extrema  # noqa: E402
from configuration_extrema import ExtremaConfig  # noqa: E402
from modeling_extrema import ExtremaModel  # noqa: E402
from data_extrema import build_eval_transform, load_image_stream  # noqa: E402
from eval_extrema import weighted_knn  # noqa: E402

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def png_size(path) -> tuple[int, int]:
    with PIL.Image.open(path) as image:
        return image.size


def grid_size(panel: int, columns: int, rows: int) -> tuple[int, int]:
    """Pixel size of a save_grid PNG: panels with a gap of GRID_PADDING around each."""
    return columns * (panel + GRID_PADDING) + GRID_PADDING, rows * (panel + GRID_PADDING) + GRID_PADDING


def is_captioned_grid(path, grid: tuple[int, int]) -> bool:
    """A save_grid PNG: as wide as its panel grid, taller (title, captions, legend), with a dark title on top."""
    with PIL.Image.open(path) as image:
        title_rows = np.asarray(image.convert("L"))[:8]
        return image.width == grid[0] and image.height > grid[1] + 8 and title_rows.min() < 100


def write_split(folder, split, images, labels=None, num_classes=3):
    features = {"image": datasets.Image()}
    columns = {"image": images}
    if labels is not None:
        features["label"] = datasets.ClassLabel(num_classes=num_classes)
        columns["label"] = labels
    table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))


def color_images(n: int, seed: int, size: int = 32):
    """n images of class i % 3: the class colour at a random brightness plus pixel noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        base = np.array(COLORS[i % 3]) * rng.uniform(0.6, 1.0)
        pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        images.append(PIL.Image.fromarray(pixels))
        labels.append(i % 3)
    return images, labels


@pytest.fixture(scope="module")
def colors_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colors")
    write_split(folder, "train", *color_images(48, seed=0))
    write_split(folder, "test", *color_images(24, seed=1))
    return folder


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 200)):
        images = [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        write_split(folder, split, images, rng.integers(0, 4, n).tolist(), num_classes=4)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny ExtreMA backbone folder (32 px, patch 8: a 4 x 4 grid) with its image processor."""
    from transformers import ViTImageProcessor

    folder = tmp_path_factory.mktemp("extrema")
    torch.manual_seed(0)
    config = ExtremaConfig.from_preset(
        "tiny", patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mask_ratio=0.75
    )
    ExtremaModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def common(model_dir, data_dir, output_dir):
    return ["--model_name_or_path", str(model_dir), "--train_dir", str(data_dir), "--output_dir", str(output_dir),
            "--num_workers", "0"]  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ kNN


def test_knn_is_perfect_on_separable_classes_and_reuses_cached_features(model_dir, colors_dir, tmp_path, monkeypatch):
    results = eval_knn.main(common(model_dir, colors_dir, tmp_path) + ["--k", "5", "200"])
    assert (results["num_train"], results["num_eval"], results["num_classes"]) == (48, 24, 3)
    assert results["k=5"]["top1"] == 100.0
    assert results["k=200"]["top1"] == 100.0 and results["k=200"]["top5"] == 100.0  # k is capped at the gallery size
    assert (tmp_path / "features-train.safetensors").exists() and (tmp_path / "results.json").exists()

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(eval_knn, "extract_features", no_extraction)
    again = eval_knn.main(common(model_dir, colors_dir, tmp_path) + ["--k", "5", "10"])
    assert again["k=5"] == results["k=5"]
    # a different subset is not in the cache: it is extracted again
    with pytest.raises(AssertionError, match="from the cache"):
        eval_knn.main(common(model_dir, colors_dir, tmp_path) + ["--max_train_samples", "12"])


def test_knn_on_random_labels_is_near_chance(model_dir, noise_dir, tmp_path):
    results = eval_knn.main(common(model_dir, noise_dir, tmp_path) + ["--k", "20"])
    assert results["num_classes"] == 4
    assert abs(results["k=20"]["top1"] - 25.0) < 12  # 200 queries: chance is 25% +- 3%


def test_knn_refuses_unlabelled_data(model_dir, tmp_path):
    images, _ = color_images(8, seed=0)
    write_split(tmp_path, "train", images)
    write_split(tmp_path, "test", images)
    with pytest.raises(UsageError, match="no labels"):
        eval_knn.main(common(model_dir, tmp_path, tmp_path / "out"))


def test_a_model_that_is_not_extrema_is_refused(tmp_path, colors_dir):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(tmp_path / "vit")  # fmt: skip
    with pytest.raises(UsageError, match="'vit' model, not ExtreMA"):
        eval_knn.main(common(tmp_path / "vit", colors_dir, tmp_path / "out"))
    with pytest.raises(UsageError, match="does not exist"):
        load_extrema(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------- linear probe, fine-tuning


def test_linear_probe_learns_separable_classes(model_dir, colors_dir, tmp_path):
    args = common(model_dir, colors_dir, tmp_path) + [
        "--optimizer", "sgd", "--learning_rate", "4", "--batch_size", "16", "--num_train_epochs", "4",
        "--warmup_epochs", "1", "--augmentation", "none",
    ]  # fmt: skip
    results = eval_linear.main(args)
    assert results["steps"] == 4 * 3  # 48 images in batches of 16
    assert results["top1"] == 100.0
    # the probe is a classifier that loads on its own, its backbone untouched by the training
    from transformers import AutoModelForImageClassification

    probe = AutoModelForImageClassification.from_pretrained(tmp_path / "probe", trust_remote_code=True)
    backbone = load_extrema(str(model_dir))
    torch.testing.assert_close(probe.extrema.state_dict(), backbone.state_dict())


def test_linear_probe_on_a_label_fraction_trains_on_that_subset(model_dir, colors_dir, tmp_path):
    args = common(model_dir, colors_dir, tmp_path) + [
        "--label_fraction", "0.25", "--optimizer", "sgd", "--learning_rate", "4", "--batch_size", "4",
        "--num_train_epochs", "2", "--warmup_epochs", "0", "--augmentation", "none",
    ]  # fmt: skip
    results = eval_linear.main(args)
    # 48 images of 3 classes: 4 of each class, 12 in all, in batches of 4
    assert (results["num_train"], results["label_fraction"], results["steps"]) == (12, 0.25, 2 * 3)


def test_the_probe_folder_classifies_with_the_pipeline_without_the_project(model_dir, noise_dir, tmp_path):
    """The probe folder carries the class names and the processor: transformers' image-classification pipeline, in
    a process without this project, predicts image by image what the script evaluated (on random labels, so that
    the accuracy depends on every single prediction)."""
    args = common(model_dir, noise_dir, tmp_path) + [
        "--batch_size", "50", "--num_train_epochs", "1", "--warmup_epochs", "0", "--augmentation", "none",
    ]  # fmt: skip
    results = eval_linear.main(args)
    config = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert config["id2label"] == {str(i): str(i) for i in range(4)}
    result = run_isolated(
        f"""
        import json
        import datasets
        from transformers import pipeline

        classify = pipeline("image-classification", model={str(tmp_path / "probe")!r}, trust_remote_code=True)
        split = datasets.Dataset.from_parquet({str(noise_dir / "test-00000-of-00001.parquet")!r})
        predictions = classify([row["image"].convert("RGB") for row in split], top_k=1, batch_size=50)
        top1 = [classify.model.config.label2id[prediction[0]["label"]] for prediction in predictions]
        json.dump({{"top1": top1, "labels": list(split["label"])}}, open("pipeline.json", "w"))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = json.loads((tmp_path / "pipeline.json").read_text())
    top1, labels = torch.tensor(predicted["top1"]), torch.tensor(predicted["labels"])
    assert len(top1) == results["num_eval"] == 200
    assert 100.0 * (top1 == labels).float().mean().item() == pytest.approx(results["top1"])
    # and image by image: the pipeline's top-1 is the probe's on the evaluation transform
    from transformers import AutoModelForImageClassification

    probe = AutoModelForImageClassification.from_pretrained(tmp_path / "probe", trust_remote_code=True).eval()
    split = datasets.Dataset.from_parquet(str(noise_dir / "test-00000-of-00001.parquet"))
    pixel_values = torch.stack([build_eval_transform(32)(row["image"].convert("RGB")) for row in split])
    with torch.no_grad():
        assert torch.equal(probe(pixel_values).logits.argmax(dim=1), top1)


def test_default_probe_learns_in_few_steps_where_small_batch_lars_cannot(model_dir, colors_dir, tmp_path):
    short = ["--batch_size", "16", "--num_train_epochs", "4", "--augmentation", "none"]  # 12 steps
    results = eval_linear.main(common(model_dir, colors_dir, tmp_path / "small") + short)
    assert (results["protocol"], results["optimizer"], results["steps"]) == ("small", "sgd", 12)
    assert results["top1"] == 100.0 and results["final_train_loss"] < 0.5 * math.log(3)
    # the paper's optimizer at the same batch and schedule: LARS moves the weights by 0.001 x lr of their norm per
    # step, so the logits stay near 0 and the loss near chance (ln 3), as the old defaults did
    lars = eval_linear.main(common(model_dir, colors_dir, tmp_path / "lars") + short + ["--optimizer", "lars"])
    assert lars["final_train_loss"] > 0.9 * math.log(3)


def test_paper_protocol_accumulates_gradients_up_to_its_total_batch(model_dir, colors_dir, tmp_path):
    args = common(model_dir, colors_dir, tmp_path) + ["--protocol", "paper", "--batch_size", "16",
                                                      "--num_train_epochs", "2", "--augmentation", "none"]  # fmt: skip
    results = eval_linear.main(args + ["--total_batch_size", "48"])
    assert (results["optimizer"], results["warmup_epochs"], results["total_batch"]) == ("lars", 10, 48)
    assert results["steps"] == 2  # 48 images: one optimizer step per epoch, over 3 batches
    assert results["peak_lr"] == pytest.approx(0.1 * 48 / 256)
    overridden = eval_linear.parse_args(args + ["--optimizer", "sgd"])  # flags given explicitly win
    assert (overridden.optimizer, overridden.learning_rate, overridden.num_train_epochs) == ("sgd", 0.1, 2)
    with pytest.raises(UsageError, match="multiple of --batch_size"):
        eval_linear.main(args + ["--total_batch_size", "40"])


def test_training_loop_accumulated_batches_make_the_step_of_one_large_batch():
    from accelerate import Accelerator
    from _eval_common import train_classifier

    generator = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.randn(4, generator=generator), "label": i % 3} for i in range(48)]

    def train(batch_size: int, accumulation: int):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        accelerator = Accelerator(gradient_accumulation_steps=accumulation)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (step + 1))  # lr 0.5, then 1
        loader = torch.utils.data.DataLoader(rows, batch_size=batch_size)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        steps, _ = train_classifier(
            model, optimizer, loader, accelerator, num_epochs=2, total_steps=2, scheduler=scheduler,
            loss_fn=lambda model, batch: F.cross_entropy(model(batch["pixel_values"]), batch["label"]),
        )  # fmt: skip
        return steps, accelerator.unwrap_model(model).weight.detach()

    one_batch, accumulated = train(48, 1), train(16, 3)
    assert one_batch[0] == accumulated[0] == 2
    torch.testing.assert_close(accumulated[1], one_batch[1])


def test_lars_rescales_weight_steps_by_the_trust_ratio():
    weight = torch.nn.Parameter(torch.full((2, 2), 3.0))  # norm 6
    bias = torch.nn.Parameter(torch.zeros(2))
    weight.grad, bias.grad = torch.full((2, 2), 0.5), torch.ones(2)  # weight gradient norm 1
    eval_linear.LARS([weight, bias], lr=1.0, momentum=0.0, trust_coefficient=0.1).step()
    torch.testing.assert_close(weight.detach(), torch.full((2, 2), 3.0 - 0.5 * 0.1 * 6 / 1))
    torch.testing.assert_close(bias.detach(), -torch.ones(2))  # vectors take plain SGD steps


def test_layer_decay_groups_scale_lr_by_depth(model_dir):
    from _eval_common import build_classifier, layer_decay_param_groups

    model = build_classifier(load_extrema(str(model_dir)), 3, pooling="mean")
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.5, prefix="extrema", num_layers=2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    scale = lambda name: by_param[id(names[name])]["lr_scale"]  # noqa: E731
    decay = lambda name: by_param[id(names[name])]["weight_decay"]  # noqa: E731
    assert scale("extrema.embeddings.patch_embeddings.projection.weight") == 0.5**3  # 2 blocks: depth 0 of 3
    assert scale("extrema.encoder.layer.0.mlp.fc1.weight") == 0.5**2
    assert scale("extrema.encoder.layer.1.mlp.fc1.weight") == 0.5
    assert scale("classifier.weight") == scale("extrema.encoder.class_attention_layer.0.attention.q.weight") == 1.0
    assert decay("classifier.weight") == 0.05
    assert decay("classifier.bias") == decay("extrema.encoder.cls_token") == decay("fc_norm.weight") == 0.0
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_finetuning_learns_separable_classes(model_dir, colors_dir, tmp_path):
    args = common(model_dir, colors_dir, tmp_path) + [
        "--learning_rate", "0.02", "--batch_size", "16", "--num_train_epochs", "4", "--warmup_epochs", "1",
        "--auto_augment", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--drop_path_rate", "0",
    ]  # fmt: skip
    results = eval_finetune.main(args)
    assert results["steps"] == 12
    assert results["top1"] == 100.0
    assert (tmp_path / "model" / "model.safetensors").exists()
    # a folder for others: the class names of the data and the evaluation transform as its processor
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1", "2": "2"} and config["label2id"] == {"0": 0, "1": 1, "2": 2}
    assert json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())["crop_size"]["height"] == 32


def test_finetuning_with_mixup_cutmix_and_randaugment(model_dir, colors_dir, tmp_path):
    results = eval_finetune.main(
        common(model_dir, colors_dir, tmp_path) + ["--batch_size", "16", "--num_train_epochs", "1"]
    )
    assert results["steps"] == 3 and results["auto_augment"] == "rand-m9-mstd0.5-inc1" and results["mixup"] == 0.8
    # soft targets of three classes with label smoothing: the loss is at least the targets' entropy, far above 0
    assert 0.3 < results["final_train_loss"] < 5


# -------------------------------------------------------------------------------------------------------- analyses


def test_captions_wrap_within_their_panel():
    from _eval_common import wrap_text

    font = PIL.ImageFont.load_default(size=12)
    text = "box 12, side 0.45: cosine 0.971, rank 13"
    lines = wrap_text(text, font, 100)
    assert len(lines) > 1 and all(font.getlength(line) <= 100 for line in lines) and " ".join(lines) == text
    assert wrap_text("two\nlines", font, 1000) == ["two", "lines"]


def test_attention_maps_are_distributions_over_the_patches(model_dir, colors_dir, tmp_path):
    args = common(model_dir, colors_dir, tmp_path) + ["--panel_size", "40", "--queries", "0,0", "1,1", "0.6,0.1"]
    results = visualize_attention.main(args)
    assert results["grid_size"] == 4
    assert results["query_patches"] == [0, 15, 2]  # row-major in a 4 x 4 grid
    query_maps = torch.tensor(results["query_attention"])
    assert query_maps.shape == (3, 4, 4) and (query_maps >= 0).all()
    torch.testing.assert_close(query_maps.sum(dim=(1, 2)), torch.ones(3))
    class_map = torch.tensor(results["class_attention"])
    assert class_map.shape == (4, 4) and 0 < class_map.sum() < 1  # the rest is the class token's self-attention
    assert png_size(tmp_path / "attention.png") == tuple(results["png_size"])
    assert is_captioned_grid(tmp_path / "attention.png", grid_size(40, columns=5, rows=1))
    with pytest.raises(UsageError, match="fractions"):
        visualize_attention.main(args[:-3] + ["1.5,0"])


def test_inversion_reduces_the_feature_loss(model_dir, colors_dir, tmp_path):
    args = common(model_dir, colors_dir, tmp_path) + [
        "--mask_ratios", "0.5", "0.75", "--num_steps", "25", "--generator_channels", "16", "--panel_size", "32",
    ]  # fmt: skip
    results = invert_representation.main(args)
    assert [r["num_visible"] for r in results["ratios"]] == [8, 4]  # of 16 patches
    for r in results["ratios"]:
        assert r["feature_loss_last_step"] < 0.5 * r["feature_loss_first_step"]
        assert math.isfinite(r["psnr_visible"]) and math.isfinite(r["psnr_masked"])
    assert png_size(tmp_path / "inversion.png") == tuple(results["png_size"])
    assert is_captioned_grid(tmp_path / "inversion.png", grid_size(32, columns=3, rows=2))


def test_locality_retrieval_finds_the_box_the_query_was_cut_from(model_dir, colors_dir, tmp_path):
    args = common(model_dir, colors_dir, tmp_path) + ["--panel_size", "24", "--query_box_index", "7"]
    results = locality_retrieval.main(args + ["--query_jitter", "0"])  # the query IS gallery box 7
    assert len(results["gallery_boxes"]) == 25
    sides = [box[2] - box[0] for box in results["gallery_boxes"]]
    assert sides[::5] == [round(s * 32) for s in (0.3, 0.45, 0.6, 0.75, 0.9)]  # one scale per row of 5
    assert results["top_match_index"] == 7 and results["source_rank"] == 1
    assert results["similarities"][7] == pytest.approx(1.0, abs=1e-5)
    assert results["top_match_iou_with_query"] == pytest.approx(1.0)
    assert png_size(tmp_path / "locality.png") == tuple(results["png_size"])
    assert is_captioned_grid(tmp_path / "locality.png", grid_size(24, columns=5, rows=6))

    shifted = locality_retrieval.main(args)  # shifted by 10% of the side: another crop, a known source
    assert shifted["query_box"] != results["query_box"] and shifted["query_source_index"] == 7
    with pytest.raises(UsageError, match="query_box"):
        locality_retrieval.main(args + ["--query_image_index", "1", "--query_box", "0.5,0.5,0.2,0.9"])


# ------------------------------------------------------------------------------------------------------- benchmark


def test_quality_benchmark_reports_every_method(colors_dir, tmp_path):
    args = ["--train_dir", str(colors_dir), "--output_dir", str(tmp_path), "--num_workers", "0",
            "--num_train_epochs", "2", "--warmup_epochs", "1", "--per_device_train_batch_size", "16", "--k", "5",
            "--max_train_samples", "48", "--max_eval_samples", "24"]  # fmt: skip
    results = benchmark_quality.main(args)
    rows = {row["method"].split(" (")[0]: row for row in results["rows"]}
    extrema = list(benchmark_quality.EXTREMA_METHODS)
    assert list(rows) == [m.split(" (")[0] for m in extrema] + ["ViTMAE", "ExtreMA untrained", "raw pixels"]
    for method in [m.split(" (")[0] for m in extrema] + ["ViTMAE"]:  # the same budget, a kNN curve per epoch
        assert rows[method]["epochs"] == 2 and rows[method]["train_wall_s"] > 0
        assert rows[method]["curve"]["epochs"] == [0, 1, 2] and len(rows[method]["curve"]["knn_top1"]) == 3
        assert 0 <= rows[method]["linear_top1"] <= 100
    study = json.loads((tmp_path / "extrema" / "results.json").read_text())
    assert set(study["variants"]) == set(benchmark_quality.EXTREMA_METHODS.values())
    assert (tmp_path / "curves.png").exists() and "| raw pixels | - | - |" in (tmp_path / "table.md").read_text()
    # a second run, into a new folder, reuses the pre-trainings (none is trained again) and scores them the same way
    again_dir = tmp_path / "again" / "quality"
    reuse = ["--extrema_study_dir", str(tmp_path / "extrema"), "--output_dir", str(again_dir)]
    again = benchmark_quality.main(args + reuse)
    assert [r["train_wall_s"] for r in again["rows"][:3]] == [r["train_wall_s"] for r in results["rows"][:3]]
    assert [r["knn_top1_k5"] for r in again["rows"][:3]] == [r["knn_top1_k5"] for r in results["rows"][:3]]
    assert (again_dir / "table.md").exists() and (again_dir / "curves.png").exists()

    # raw pixels, recomputed here from the images
    def pixels(split):
        transform = build_eval_transform(32)
        rows = list(load_image_stream(train_dir=str(colors_dir), split=split))
        return torch.stack([transform(r["image"]).flatten() for r in rows]), torch.tensor([r["label"] for r in rows])

    expected = weighted_knn(*pixels("train"), *pixels("test"), k=5)
    assert rows["raw pixels"]["knn_top1_k5"] == expected["top1"]
    assert "| raw pixels |" in results["table"]
