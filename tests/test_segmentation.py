"""Segmentation with UperNet on the backbone (scripts/eval_segmentation.py): metrics, a short fine-tune on synthetic
data (CIFAR-10 objects on textures), and the saved folder as a user loads it."""

import sys

import numpy as np
import PIL.Image
import pytest
import torch

from _isolated import run_isolated
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import eval_segmentation  # noqa: E402
from segmentation_data import NUM_LABELS, write_segmentation_parquet  # noqa: E402
from _eval_common import UsageError  # noqa: E402
from configuration_extrema import ExtremaConfig  # noqa: E402
from modeling_extrema import ExtremaModel  # noqa: E402


def test_metrics_match_a_hand_computed_reference():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    predictions = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    confusion = eval_segmentation.confusion_matrix(predictions, labels, num_labels=4, ignore_index=255)
    assert confusion.sum() == 7  # the ignored pixel is left out
    metrics = eval_segmentation.segmentation_metrics(confusion)
    # class 0: 1 hit, annotated 2, predicted 2 -> 1 / 3; class 1: 2 / (3 + 3 - 2) = 1 / 2; class 2: 1 / (2 + 1 - 1)
    # = 1 / 2; class 3: predicted once, never annotated -> 0; present in all four
    iou = [1 / 3, 1 / 2, 1 / 2, 0.0]
    assert metrics["per_class_iou"] == pytest.approx([100 * v for v in iou])
    assert metrics["mean_iou"] == pytest.approx(100 * sum(iou) / 4)
    assert metrics["pixel_accuracy"] == pytest.approx(100 * 4 / 7)
    absent = eval_segmentation.segmentation_metrics(torch.tensor([[3, 0, 0], [1, 2, 0], [0, 0, 0]]))
    assert absent["per_class_iou"][2] is None and absent["mean_iou"] == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)


def test_out_indices_spread_over_the_blocks():
    assert eval_segmentation.default_out_indices(12) == [3, 6, 9, 12]
    assert eval_segmentation.default_out_indices(4) == [1, 2, 3, 4]
    assert eval_segmentation.default_out_indices(2) == [0, 1, 2]


@pytest.fixture(scope="module")
def segmentation_dir(tmp_path_factory, request):
    from conftest import SHARED, shared_path

    cifar10_dir = shared_path("EXTREMA_CIFAR10_DIR", SHARED / "data" / "cifar10")
    folder = tmp_path_factory.mktemp("segmentation")
    write_segmentation_parquet(folder, cifar10_dir, "train", num_images=32, seed=0)
    masks = write_segmentation_parquet(folder, cifar10_dir, "validation", num_images=8, seed=1, cifar_split="test")
    return folder, masks


def test_synthetic_masks_mark_the_pasted_objects(segmentation_dir):
    import datasets

    folder, masks = segmentation_dir
    rows = datasets.load_dataset("parquet", data_files=str(folder / "validation-*.parquet"), split="train")
    assert rows.column_names == ["image", "annotation"] and len(rows) == 8
    for row, mask in zip(rows, masks):
        annotation = np.asarray(row["annotation"])
        assert np.array_equal(annotation, mask) and annotation.shape == (32, 32)
        objects = np.unique(annotation[annotation > 0])
        assert len(objects) == 1 and 1 <= objects[0] < NUM_LABELS  # one CIFAR-10 object on the background (0)
        assert 16 * 16 <= (annotation > 0).sum() <= 24 * 24


def test_a_short_finetune_reports_its_predictions_miou_and_saves_a_folder_that_loads(segmentation_dir, tmp_path):
    from transformers import AutoModelForSemanticSegmentation

    folder, masks = segmentation_dir
    torch.manual_seed(0)
    config = ExtremaConfig.from_preset(
        "tiny", patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mask_ratio=0.75
    )
    ExtremaModel(config).save_pretrained(tmp_path / "backbone")
    args = ["--model_name_or_path", str(tmp_path / "backbone"), "--train_dir", str(folder),
            "--output_dir", str(tmp_path / "out"), "--num_labels", str(NUM_LABELS), "--num_workers", "0",
            "--max_train_steps", "4", "--warmup_steps", "1", "--batch_size", "8", "--decoder_hidden_size", "16",
            "--mixed_precision", "no", "--learning_rate", "1e-3"]  # fmt: skip
    results = eval_segmentation.main(args)
    assert (results["steps"], results["num_pixels"], results["out_indices"]) == (4, 8 * 32 * 32, [0, 1, 2])

    # the reported metrics are those of the saved model's predictions on the validation images, recomputed here
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out" / "model", trust_remote_code=True).eval()
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tmp_path / "out" / "model")
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(folder / "validation-*.parquet"), split="train")
    inputs = processor(images=[row["image"] for row in rows], return_tensors="pt")
    with torch.no_grad():
        predictions = model(**inputs).logits.argmax(dim=1).numpy()  # (8, 32, 32)
    labels = np.stack(masks)
    ious = []
    for k in range(NUM_LABELS):
        union = ((predictions == k) | (labels == k)).sum()
        if union:
            ious.append(((predictions == k) & (labels == k)).sum() / union)
    assert results["mean_iou"] == pytest.approx(100 * np.mean(ious), abs=1e-6)
    assert results["pixel_accuracy"] == pytest.approx(100 * (predictions == labels).mean(), abs=1e-6)

    # a user without this project: AutoModelForSemanticSegmentation and the pipeline, as remote code
    image = rows[0]["image"]
    image.save(tmp_path / "image.png")
    expected = processor.post_process_semantic_segmentation(
        model(**processor(images=image, return_tensors="pt")), target_sizes=[(32, 32)]
    )[0]
    result = run_isolated(
        f"""
        import numpy as np, PIL.Image, torch
        from transformers import AutoModelForSemanticSegmentation, pipeline
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path / "out" / "model")!r},
                                                                 trust_remote_code=True)
        assert type(model).__name__ == "ExtremaForSemanticSegmentation", type(model)
        segmenter = pipeline("image-segmentation", model={str(tmp_path / "out" / "model")!r}, trust_remote_code=True)
        label_map = np.full((32, 32), -1)
        for segment in segmenter(PIL.Image.open("image.png")):
            label_map[np.asarray(segment["mask"]) > 0] = int(segment["label"].split("_")[-1])
        np.save("label_map.npy", label_map)
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "label_map.npy"), expected.numpy())


def test_an_invalid_setting_writes_nothing(tmp_path):
    with pytest.raises(UsageError, match="--layer_decay must be in"):
        eval_segmentation.main(["--model_name_or_path", "m", "--output_dir", str(tmp_path / "out"),
                                "--layer_decay", "0"])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_resume_after_a_stop_continues_exactly(segmentation_dir, tmp_path):
    # 32 training images in batches of 8: 4 per epoch, so the stop (step 7) and the checkpoint it resumes from
    # (step 4) fall at an epoch's end and inside the next; random crops, flips and drop path throughout
    folder, _ = segmentation_dir
    torch.manual_seed(0)
    config = ExtremaConfig.from_preset("tiny", patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    ExtremaModel(config).save_pretrained(tmp_path / "backbone")

    def flags(output_dir, *more):
        return ["--model_name_or_path", str(tmp_path / "backbone"), "--train_dir", str(folder),
                "--output_dir", str(tmp_path / output_dir), "--num_labels", str(NUM_LABELS), "--num_workers", "0",
                "--max_train_steps", "10", "--warmup_steps", "2", "--batch_size", "8", "--decoder_hidden_size", "16",
                "--mixed_precision", "no", "--learning_rate", "1e-3", "--drop_path_rate", "0.2",
                "--eval_every_steps", "5", "--report_to", "none", *more]  # fmt: skip

    whole = eval_segmentation.main(flags("whole", "--checkpointing_steps", "no"))
    assert eval_segmentation.main(flags("parts", "--checkpointing_steps", "4", "--stop_after_steps", "7")) is None
    assert sorted(p.name for p in (tmp_path / "parts").glob("checkpoint-*")) == ["checkpoint-4"]
    resumed = eval_segmentation.main(flags("parts", "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest"))
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    assert resumed["eval_history"] == whole["eval_history"] and [row["step"] for row in whole["eval_history"]] == [5, 10]
    from transformers import AutoModelForSemanticSegmentation

    weights = [
        AutoModelForSemanticSegmentation.from_pretrained(tmp_path / run / "model", trust_remote_code=True).state_dict()
        for run in ("whole", "parts")
    ]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_the_crops_are_a_function_of_seed_epoch_and_image():
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = PIL.Image.fromarray(rng.integers(0, 11, (32, 32), dtype=np.uint8), mode="L")
    joint = eval_segmentation.v2.RandomResizedCrop(16, scale=(0.25, 1.0), antialias=True)
    example = eval_segmentation.SegmentationExample(joint, reduce_labels=False, ignore_index=255, seed=3)
    row = {"image": image, "label": mask}
    first = example(row)
    torch.manual_seed(123)  # what was drawn before does not matter
    again = example(row)
    assert torch.equal(again["pixel_values"], first["pixel_values"]) and torch.equal(again["labels"], first["labels"])
    example.joint.epoch = 1
    assert not torch.equal(example(row)["pixel_values"], first["pixel_values"])


PRETRAINED = REPO_ROOT / "tests" / "fixtures" / "tiny-cifar10-teacher"
# the margin against what the two seeds measured: docs/downstream.md#segmentation-table-9
SEG_TRAIN_IMAGES, SEG_VAL_IMAGES, SEG_STEPS, SEG_MARGIN = 256, 128, 60, 1.0


def test_the_pretrained_backbone_beats_random_initialisation_in_miou(tmp_path):
    # The paper's Table 9 at toy scale: the 25-epoch tiny-cifar10 teacher (tests/fixtures, see its README) against the
    # same network from random initialisation, the same short run on CIFAR-10 objects pasted on textures (objects of
    # the validation images from the CIFAR-10 test split, which the teacher never saw)
    from conftest import SHARED, shared_path

    cifar10_dir = shared_path("EXTREMA_CIFAR10_DIR", SHARED / "data" / "cifar10")
    write_segmentation_parquet(tmp_path / "data", cifar10_dir, "train", num_images=SEG_TRAIN_IMAGES, seed=0)
    write_segmentation_parquet(tmp_path / "data", cifar10_dir, "validation", num_images=SEG_VAL_IMAGES, seed=1,
                               cifar_split="test")  # fmt: skip
    torch.manual_seed(0)
    ExtremaModel(ExtremaConfig.from_pretrained(PRETRAINED)).save_pretrained(tmp_path / "random")
    miou = {}
    for name, folder in (("pretrained", PRETRAINED), ("random", tmp_path / "random")):
        results = eval_segmentation.main(
            ["--model_name_or_path", str(folder), "--train_dir", str(tmp_path / "data"),
             "--output_dir", str(tmp_path / name), "--num_labels", str(NUM_LABELS), "--num_workers", "0",
             "--max_train_steps", str(SEG_STEPS), "--warmup_steps", "5", "--batch_size", "16",
             "--decoder_hidden_size", "64", "--learning_rate", "5e-4", "--report_to", "none",
             "--checkpointing_steps", "no", "--mixed_precision", "no"]
        )  # fmt: skip
        miou[name] = results["mean_iou"]
    assert miou["pretrained"] > miou["random"] + SEG_MARGIN, miou


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_to_the_end(segmentation_dir, tmp_path, monkeypatch, capsys):
    import os
    import signal

    from test_boundary import run_entry_point

    folder, _ = segmentation_dir
    torch.manual_seed(0)
    config = ExtremaConfig.from_preset("tiny", patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    ExtremaModel(config).save_pretrained(tmp_path / "backbone")
    calls, step_seed = [], eval_segmentation.step_seed

    def preempted(*args):  # called once per step, before its forward pass
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_seed(*args)

    monkeypatch.setattr(eval_segmentation, "step_seed", preempted)
    output_dir = tmp_path / "out"
    argv = ["--model_name_or_path", str(tmp_path / "backbone"), "--train_dir", str(folder),
            "--output_dir", str(output_dir), "--num_labels", str(NUM_LABELS), "--num_workers", "0",
            "--max_train_steps", "6", "--warmup_steps", "1", "--batch_size", "8", "--decoder_hidden_size", "16",
            "--mixed_precision", "no", "--report_to", "none", "--checkpointing_steps", "no"]  # fmt: skip
    code, stderr = run_entry_point(eval_segmentation, argv, capsys)
    assert code == 128 + signal.SIGTERM and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: stopped by SIGTERM at step 2 of 6") and "latest" in errors[0]
    assert (output_dir / "checkpoint-2").is_dir() and not (output_dir / "results.json").exists()
    monkeypatch.setattr(eval_segmentation, "step_seed", step_seed)
    resumed = eval_segmentation.main(argv + ["--resume_from_checkpoint", "latest"])
    assert resumed["steps"] == 6 and (output_dir / "results.json").exists()
