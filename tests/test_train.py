"""Tests of train_extrema.py: kNN, schedules, command line, resume, 2 processes (the data: test_data.py).

Everything runs on tiny Parquet datasets written by `_train_data.py`, the `tiny` config and batches of a few images.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy
import pytest
import torch
from _train_data import write_image_parquet
from safetensors.torch import load_file

import data_extrema as de  # the repository root is on sys.path (conftest.py)
import eval_extrema as ee
import train_extrema as te
from configuration_extrema import ExtremaConfig
from modeling_extrema import ExtremaForPreTraining

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
    assert ExtremaForPreTraining.teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert ExtremaForPreTraining.teacher_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert ExtremaForPreTraining.teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)


def test_teacher_init_share_is_the_product_of_the_momenta():
    model = ExtremaForPreTraining(ExtremaConfig.from_preset("tiny"))
    initial = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.zero_()
    for step in range(50):  # a student at 0: the teacher's weights shrink by exactly the kept share
        model.update_teacher(ExtremaForPreTraining.teacher_momentum(step, 50, 0.9))
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
    with pytest.raises(te.UsageError, match="not divisible"):
        te.plan_schedule(args, num_examples=1000, world_size=3)
    with pytest.raises(te.UsageError, match="--steps_per_epoch"):
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
    spread |= {"collapse/prediction_mean_cosine": 0.1, "collapse/prediction_std": 0.9}
    assert te.warn_on_collapse(spread, 10, warned=False) is False and not caplog.records
    # centred targets stay spread by construction: the predictions show the collapse
    centred = spread | {"collapse/prediction_mean_cosine": 0.9, "collapse/prediction_std": 0.25}
    assert te.warn_on_collapse(centred, 15, warned=False) is True and "the predictions are collapsing" in caplog.text
    caplog.clear()
    collapsed = spread | {"collapse/target_mean_cosine": 0.95, "collapse/target_std": 0.2}
    assert te.warn_on_collapse(collapsed, 20, warned=False) is True
    assert "the targets) are collapsing" in caplog.text and "--target_centering" in caplog.text
    caplog.clear()
    assert te.warn_on_collapse(collapsed, 30, warned=True) is True and not caplog.records  # once per run


@pytest.mark.parametrize("flags", ["AVX512F AVX512_BF16", "avx512f avx512_bf16", "amx_bf16 amx_tile", "avx2 avx512f"])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch, flags):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: f"processor : 0\nflags : {flags.lower()}\n")
    assert te.bf16_is_native() == ("bf16" in flags.lower())


# Which precision --mixed_precision auto trains in on each GPU: is_bf16_supported() answers with emulation allowed
# by default, and only the bf16 of Ampere or newer GPUs is computed by the hardware.
GPUS = {"A100": (True, True), "H100": (True, True), "V100": (False, True), "T4": (False, True), "P100": (False, False)}


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_auto_precision_on_gpus_is_native_bf16_else_fp16_with_loss_scaling(monkeypatch, gpu):
    native, emulated = GPUS[gpu]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or (including_emulation and emulated)
    )
    assert te.resolve_mixed_precision("auto") == ("bf16" if gpu in ("A100", "H100") else "fp16")
    assert [te.resolve_mixed_precision(choice) for choice in ("no", "bf16", "fp16")] == ["no", "bf16", "fp16"]


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cpus_is_bf16_or_float32(monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(te, "bf16_is_native", lambda: native)
    assert te.resolve_mixed_precision("auto") == ("bf16" if native else "no")


def test_drop_path_rate_changes_the_config_only_when_given(tmp_path, tiny_config):
    ExtremaConfig(**{**tiny_config.to_diff_dict(), "drop_path_rate": 0.3}).save_pretrained(tmp_path)
    base = ["--train_dir", "x", "--model_config", str(tmp_path)]
    assert te.build_config(te.parse_args(base)).drop_path_rate == 0.3
    assert te.build_config(te.parse_args([*base, "--drop_path_rate", "0"])).drop_path_rate == 0
    assert te.build_config(te.parse_args(["--train_dir", "x"])).drop_path_rate == 0.0  # the tiny preset's
    assert te.build_config(te.parse_args(["--recipe", "vit-base-mask08x5"])).drop_path_rate == 0.1  # the paper's


def test_config_overrides_set_typed_fields_over_the_preset():
    args = te.parse_args(["--recipe", "tiny-cifar10", "--config_overrides", "num_hidden_layers=6, qkv_bias=false,"
                          "layer_norm_eps=1e-5,hidden_act=relu"])
    config = te.build_config(args)
    fields = (config.num_hidden_layers, config.qkv_bias, config.layer_norm_eps, config.hidden_act)
    assert fields == (6, False, 1e-5, "relu")
    assert (config.hidden_size, config.patch_size, config.head_norm) == (128, 4, "batchnorm")  # preset's, recipe's
    assert config.out_indices == [6]  # derived from the new depth, not the preset's
    assert len(ExtremaForPreTraining(config).student.encoder.layer) == 6
    assert te.parse_config_overrides(None) == te.parse_config_overrides("") == {}


def test_gradient_checkpointing_recomputes_the_student_and_gives_the_same_gradients(tiny_config):
    """With it, the backward pass runs every student block again (so its activations need not be kept); the
    gradients are those of the plain model, drop path included (the recomputation replays the RNG)."""
    config = ExtremaConfig(**{**tiny_config.to_diff_dict(), "drop_path_rate": 0.2})
    pixels, noise = torch.randn(4, 3, 32, 32), torch.rand(4, *config.mask_noise_shape)
    gradients, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ExtremaForPreTraining(config).train()
        if checkpointing:
            te.enable_gradient_checkpointing(model)
        count = []
        for branch in (model.student, model.teacher):
            branch.encoder.layer[0].attention.register_forward_hook(lambda *_, b=branch: count.append(b))
        torch.manual_seed(1)
        model(pixel_values=pixels, noise=noise).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
        calls.append((sum(b is model.student for b in count), sum(b is model.teacher for b in count)))
    assert calls == [(1, 1), (2, 1)]  # the student's block twice: forward, then again in the backward pass
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


def test_gradient_checkpointing_flag_turns_it_on_for_the_training_run(tmp_path, monkeypatch):
    enabled, original = [], te.enable_gradient_checkpointing
    monkeypatch.setattr(
        te, "enable_gradient_checkpointing", lambda model: enabled.append(type(model)) or original(model)
    )
    write_image_parquet(tmp_path / "data", num_images=16)
    te.main(["--train_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
             "--gradient_checkpointing", *FAST])  # fmt: skip
    assert enabled == [ExtremaForPreTraining]


# ---------------------------------------------------------------------------------------------------------------
# --init_from: continuing from saved weights


def saved_pretraining_model(folder, config, seed):
    torch.manual_seed(seed)
    model = ExtremaForPreTraining(config)
    with torch.no_grad():  # a teacher that differs from the student, as after training
        for parameter in model.teacher.parameters():
            parameter.add_(0.1)
    model.save_pretrained(folder)
    return model


def test_init_from_a_backbone_sets_student_and_teacher(tmp_path, tiny_config):
    saved = saved_pretraining_model(tmp_path / "full", tiny_config, seed=1)
    saved.teacher.save_pretrained(tmp_path / "backbone")
    args = te.parse_args(["--train_dir", "x", "--init_from", str(tmp_path / "backbone")])
    torch.manual_seed(2)
    model = ExtremaForPreTraining(te.build_config(args))  # the folder's architecture, not the tiny preset's
    fresh_heads = {k: v.clone() for k, v in model.state_dict().items() if "projector" in k or "predictor" in k}
    assert te.load_initial_weights(model, args.init_from) == "backbone"
    for role in ("student", "teacher"):
        assert_same_weights(getattr(model, role).state_dict(), saved.teacher.state_dict(), atol=0)
    assert_same_weights(model.teacher_projector.state_dict(), model.student_projector.state_dict(), atol=0)
    assert_same_weights({k: v for k, v in model.state_dict().items() if k in fresh_heads}, fresh_heads, atol=0)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_init_from_a_pretraining_folder_sets_every_weight(tmp_path, tiny_config):
    saved = saved_pretraining_model(tmp_path / "full", tiny_config, seed=1)
    args = te.parse_args(["--train_dir", "x", "--init_from", str(tmp_path / "full"), "--drop_path_rate", "0.1"])
    config = te.build_config(args)
    assert (config.hidden_size, config.drop_path_rate) == (tiny_config.hidden_size, 0.1)
    torch.manual_seed(2)
    model = ExtremaForPreTraining(config)
    assert te.load_initial_weights(model, args.init_from) == "full"
    assert_same_weights(model.state_dict(), saved.state_dict(), atol=0)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_init_from_refuses_folders_that_do_not_fit(tmp_path, tiny_config):
    saved_pretraining_model(tmp_path / "full", tiny_config, seed=1)
    tiny = ExtremaForPreTraining(ExtremaConfig.from_preset("tiny"))  # another width than the saved model's
    with pytest.raises(de.UsageError, match="do not fit this run's model.*leave out --model_config"):
        te.load_initial_weights(tiny, tmp_path / "full")
    batchnorm = ExtremaForPreTraining(ExtremaConfig(**{**tiny_config.to_diff_dict(), "head_norm": "batchnorm"}))
    with pytest.raises(de.UsageError, match="do not fit"):
        te.load_initial_weights(batchnorm, tmp_path / "full")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    with pytest.raises(de.UsageError, match="'vit'.*takes an ExtreMA backbone"):
        te.load_initial_weights(tiny, tmp_path / "other")
    (tmp_path / "release.pth").write_bytes(b"")
    with pytest.raises(de.UsageError, match="convert_official_checkpoint.py --full"):
        te.load_initial_weights(tiny, tmp_path / "release.pth")
    with pytest.raises(de.UsageError, match="not a saved model folder"):
        te.load_initial_weights(tiny, tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------------
# Training runs


def test_recipes_and_defaults():
    args = te.parse_args([])
    assert args.recipe == "tiny-fashion-mnist" and args.model_config == "tiny"
    # the demo trains the paper's objective with the fixes that keep a short BYOL run from collapsing
    assert (args.loss, args.target_centering, args.head_norm, args.predictor_lr_multiplier) == (
        "byol", "batch", "batchnorm", 10.0,
    )  # fmt: skip
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


def test_flags_from_python_act_like_the_command_line():
    argv = ["--recipe", "tiny-cifar10", "--train_dir", "x", "--num_train_epochs", "3", "--head_norm", "layernorm"]
    from_python = te.parse_args([], recipe="tiny-cifar10", train_dir="x", num_train_epochs=3.0, head_norm="layernorm")
    assert vars(from_python) == vars(te.parse_args(argv))
    recipe = te.parse_args(["--recipe", "tiny-cifar10", "--train_dir", "x"])
    assert (recipe.loss, recipe.target_centering, recipe.head_norm, recipe.predictor_lr_multiplier) == (
        "byol", "batch", "batchnorm", 10.0,
    )  # fmt: skip
    assert recipe.dataset_name is None and recipe.knn_k == 20 and recipe.knn_every_epochs == 1
    with pytest.raises(SystemExit):  # as on the command line: argparse names the unknown flag
        te.parse_args([], learning_rat=1e-3)


@pytest.mark.parametrize(
    "argv, overrides, message",
    [
        (["--per_device_train_batch_size", "0"], {}, "--per_device_train_batch_size must be at least 1, got 0."),
        (["--learning_rate", "-1"], {}, "--learning_rate must be greater than 0, got -1.0."),
        (["--learning_rate", "0"], {}, "--learning_rate must be greater than 0, got 0.0."),
        (["--knn_k", "0"], {}, "--knn_k must be at least 1, got 0."),
        (["--logging_steps", "0"], {}, "--logging_steps must be at least 1, got 0."),
        (["--num_train_epochs", "0"], {}, "--num_train_epochs must be greater than 0, got 0.0."),
        (["--adam_beta2", "1"], {}, "--adam_beta2 must be in [0, 1), got 1.0."),
        (["--ema_momentum", "0"], {}, "--ema_momentum must be in (0, 1], got 0.0."),
        (["--num_workers", "-1"], {}, "--num_workers must be at least 0, got -1."),
        (["--warmup_epochs", "nan"], {}, "--warmup_epochs must be a finite number, got nan."),
        # from Python (train(**flags)), where argparse checks nothing: the same messages
        ([], {"per_device_train_batch_size": 0}, "--per_device_train_batch_size must be at least 1, got 0."),
        ([], {"weight_decay": -0.1}, "--weight_decay must be at least 0, got -0.1."),
        ([], {"recipe": "tiny-cifar10", "knn_temperature": 0}, "--knn_temperature must be greater than 0, got 0."),
        ([], {"loss": "mse"}, "argument --loss: invalid choice: 'mse'"),
        ([], {"recipe": "tiny"}, "argument --recipe: invalid choice: 'tiny'"),
    ],
)
def test_flags_out_of_range_are_refused_by_name(argv, overrides, message, capsys):
    with pytest.raises(SystemExit):
        te.parse_args(argv, **overrides)
    assert message in capsys.readouterr().err


def test_flags_from_python_must_have_the_flags_type(capsys):
    for flags, message in [
        ({"max_train_steps": 2.5}, "argument --max_train_steps: invalid int value: '2.5'"),
        ({"learning_rate": [1e-3]}, "argument --learning_rate: invalid float value: '[0.001]'"),
        ({"num_workers": True}, "argument --num_workers: expected one argument"),
        ({"learning_rat": 1e-3}, "unrecognized arguments: --learning_rat"),
    ]:
        with pytest.raises(SystemExit):
            te.parse_args([], **flags)
        assert message in capsys.readouterr().err
    assert te.parse_args([], learning_rate=1, max_train_steps=numpy.int64(3)).learning_rate == 1  # ints are numbers
    assert te.parse_args([], learning_rate="2e-3").learning_rate == 2e-3  # text is parsed, as on the command line


def test_every_numeric_flag_has_a_range_that_the_defaults_and_recipes_satisfy():
    numeric = {action.dest for action in te.build_parser()._actions if action.type in (int, float)}
    assert numeric == set(te.FLAG_RANGES)
    for recipe in te.RECIPES:
        te.parse_args(["--recipe", recipe])  # no SystemExit

def test_train_takes_the_flags_as_keywords(monkeypatch):
    calls = []
    monkeypatch.setattr(te, "main", calls.append)
    te.train(train_dir="data", max_train_steps=3, skip_knn=True, recipe="vit-base-mask08x5", color_on_device=False)
    (args,) = calls
    assert (args.max_train_steps, args.skip_knn, args.color_on_device, args.num_masks) == (3, True, False, 5)
    assert args.train_dir == "data" and args.dataset_name is None  # the recipe on the user's data


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


def free_port() -> int:
    """A port no other process listens on now (a fixed one clashes when two test runs share the machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
                   "--master_port", str(free_port()), str(REPO / "train_extrema.py"), *argv,
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
            "--mixed_precision", "no",  # accelerate's precision is process-wide: the other tests' float32
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
