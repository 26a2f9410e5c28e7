"""Fine-tuning with the official recipe (scripts/eval_finetune.py): timm's pieces, exact resume, refused settings.

The tiny model and the "colors" dataset come from test_eval.py.
"""

import random
import sys

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))

import eval_finetune  # noqa: E402
from _eval_common import UsageError, seeded_rngs  # noqa: E402
from test_eval import colors_dir, common, model_dir  # noqa: E402, F401  (fixtures)


def test_training_transform_is_timms_with_the_official_randaugment(tmp_path):
    args = eval_finetune.parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o")])
    assert (args.auto_augment, args.reprob, args.mixup, args.cutmix) == ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0)
    assert (args.label_smoothing, args.layer_decay, args.drop_path_rate) == (0.1, 0.75, 0.1)
    steps = eval_finetune.finetune_transform(32, args.auto_augment, args.reprob).transforms
    crop = next(t for t in steps if isinstance(t, RandomResizedCropAndInterpolation))
    assert crop.size == (32, 32) and str(crop.interpolation.value) == "bicubic"
    randaugment = next(t for t in steps if isinstance(t, RandAugment))
    assert randaugment.num_layers == 2 and len(randaugment.ops) == 15
    assert {(op.magnitude, op.magnitude_std) for op in randaugment.ops} == {(9, 0.5)}
    assert "PosterizeIncreasing" in {op.name for op in randaugment.ops}  # "inc1": the increasing-severity ops
    erasing = next(t for t in steps if isinstance(t, RandomErasing))
    assert (erasing.probability, erasing.mode) == (0.25, "pixel")
    plain = eval_finetune.finetune_transform(32, None, 0.0).transforms
    assert not any(isinstance(t, (RandAugment, RandomErasing)) for t in plain)


def test_the_strongest_posterize_keeps_no_bits_on_any_pillow():
    """magnitude 9 + noise reaches 10, where PosterizeIncreasing keeps 0 bits (Pillow >= 12 refuses: timm passes it)."""
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    steps = eval_finetune.finetune_transform(32).transforms
    randaugment = next(t for t in steps if isinstance(t, RandAugment))
    op = next(op for op in randaugment.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    assert op.level_fn(10, op.hparams) == (0,)
    assert np.asarray(op(image)).max() == 0  # black, as ImageOps.posterize(image, 0) was
    op.magnitude = 5  # 2 bits kept: what Pillow computes
    assert np.array_equal(np.asarray(op(image)), np.asarray(PIL.ImageOps.posterize(image, 2)))


def test_augmentation_is_a_function_of_seed_epoch_and_image():
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    transform = eval_finetune.SeededTransform(eval_finetune.finetune_transform(32), seed=0)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    first = transform(image)
    after = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    torch.manual_seed(123)  # what was drawn before does not matter
    assert torch.equal(transform(image), first)
    transform.epoch = 1
    assert not torch.equal(transform(image), first)


def test_mixup_mixes_images_and_targets_from_the_seed(tmp_path):
    args = eval_finetune.parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o")])
    mixup = eval_finetune.build_mixup(args, num_labels=3)
    assert isinstance(mixup, Mixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing) == (0.8, 1.0, 0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    def mix(seed):
        with seeded_rngs(seed):
            return mixup(images.clone(), labels)

    mixed, targets = mix(7)
    assert not torch.equal(mixed, images)  # pixels of the mirrored batch are in every image
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
    assert (targets.max(dim=1).values < 1 - 0.1 + 0.1 / 3 + 1e-6).all() and (targets.min(dim=1).values > 0).all()
    again, again_targets = mix(7)
    assert torch.equal(again, mixed) and torch.equal(again_targets, targets)
    assert eval_finetune.build_mixup(
        eval_finetune.parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--mixup", "0",
                                  "--cutmix", "0"]), 3
    ) is None


def test_resume_after_a_stop_continues_exactly(model_dir, colors_dir, tmp_path):  # noqa: F811
    # the whole recipe: RandAugment, random erasing, mixup / cutmix, drop path; 48 images in batches of 8: 6 steps
    # per epoch, 2 epochs, evaluated after each
    recipe = ["--batch_size", "8", "--num_train_epochs", "2", "--warmup_epochs", "1", "--eval_every_epochs", "1",
              "--mixed_precision", "no", "--report_to", "none", "--learning_rate", "0.01"]  # fmt: skip
    whole_run = common(model_dir, colors_dir, tmp_path / "whole") + recipe + ["--checkpointing_steps", "no"]
    whole = eval_finetune.main(whole_run)
    parts = common(model_dir, colors_dir, tmp_path / "parts") + recipe + ["--checkpointing_steps", "4"]
    assert eval_finetune.main(parts + ["--stop_after_steps", "7"]) is None  # killed at step 7, the last checkpoint: 4
    assert sorted(p.name for p in (tmp_path / "parts").glob("checkpoint-*")) == ["checkpoint-4"]
    resumed = eval_finetune.main(parts + ["--resume_from_checkpoint", "latest"])
    assert resumed["steps"] == whole["steps"] == 12
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    assert resumed["eval_history"] == whole["eval_history"] and len(whole["eval_history"]) == 2
    from transformers import AutoModelForImageClassification

    weights = [
        AutoModelForImageClassification.from_pretrained(tmp_path / run / "model", trust_remote_code=True).state_dict()
        for run in ("whole", "parts")
    ]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--layer_decay", "1.5"], "--layer_decay must be in"),
        (["--reprob", "-0.1"], "--reprob must be in"),
        (["--auto_augment", "rand-x9"], "not a timm policy"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps takes"),
    ],
)
def test_an_invalid_setting_writes_nothing(model_dir, colors_dir, tmp_path, flags, message):  # noqa: F811
    output_dir = tmp_path / "out"
    with pytest.raises(UsageError, match=message):
        eval_finetune.main(common(model_dir, colors_dir, output_dir) + flags)
    assert not output_dir.exists()
