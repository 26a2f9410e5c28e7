"""Every entry point at its boundary: a bad input ends in one line on stderr that names it, a non-zero exit, no
traceback and no result file; model folders' code runs only with --trust_remote_code.

Each case runs the entry point in this process through `cli_extrema.run_cli`, as its `__main__` does.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_extrema import run_cli
from conftest import REPO_ROOT
from configuration_extrema import ExtremaConfig
from modeling_extrema import ExtremaModel

sys.path.insert(0, str(REPO_ROOT / "scripts"))

import convert_official_checkpoint  # noqa: E402
import eval_finetune  # noqa: E402
import eval_knn  # noqa: E402
import eval_linear  # noqa: E402
import eval_segmentation  # noqa: E402
import export_onnx  # noqa: E402
import invert_representation  # noqa: E402
import locality_retrieval  # noqa: E402
import visualize_attention  # noqa: E402

SCRIPTS = {
    "eval_knn": eval_knn,
    "eval_linear": eval_linear,
    "eval_finetune": eval_finetune,
    "invert_representation": invert_representation,
    "locality_retrieval": locality_retrieval,
    "visualize_attention": visualize_attention,
    "convert_official_checkpoint": convert_official_checkpoint,
}
TINY = dict(patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mask_ratio=0.75)


@pytest.fixture(autouse=True)
def no_stale_log_handlers():
    """train_extrema's logging.basicConfig binds the root logger to the stderr of the test that ran it, which pytest
    closes afterwards: later logging would print a logging error (with a traceback) into this test's stderr."""
    logging.root.handlers.clear()
    yield
    logging.root.handlers.clear()


def write_split(folder, split, images, labels=None, label_feature=None):
    columns, features = {"image": images}, {"image": datasets.Image()}
    if labels is not None:
        columns["label"] = labels
        features["label"] = label_feature or datasets.ClassLabel(num_classes=3)
    table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_split(folder, "train", images(12), [i % 3 for i in range(12)])
    write_split(folder, "test", images(6, seed=1), [i % 3 for i in range(6)])
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    ExtremaModel(ExtremaConfig.from_preset("tiny", **TINY)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, model_dir):
    """Model folders that must be refused: NaN weights, a truncated or a text model.safetensors, no config.json, a
    config with zero heads, a model that is not ExtreMA."""
    root = tmp_path_factory.mktemp("bad_models")
    weights = load_file(str(model_dir / "model.safetensors"))
    config = json.loads((model_dir / "config.json").read_text())
    folders = {}
    for name in ("nan", "truncated", "text", "no_config", "zero_heads", "not_extrema"):
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
        folders[name] = folder
    save_file({k: v * float("nan") if k.endswith("layernorm.weight") else v for k, v in weights.items()},
              str(folders["nan"] / "model.safetensors"))  # fmt: skip
    data = (model_dir / "model.safetensors").read_bytes()
    (folders["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    (folders["text"] / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    (folders["no_config"] / "config.json").unlink()
    (folders["zero_heads"] / "config.json").write_text(json.dumps({**config, "num_attention_heads": 0}))
    (folders["not_extrema"] / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    return folders


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "notes.txt").write_text("not an image")
    (root / "checkpoint.pth").write_text("not a checkpoint")
    torch.save({"model": {"unrelated.weight": torch.zeros(2)}}, root / "other.pth")
    (root / "a_file").write_text("")
    return root


def run_entry_point(module, argv, capsys):
    """(exit code, stderr) of `module.main(argv)` run as from the command line."""
    capsys.readouterr()
    try:
        run_cli(module.main, argv)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
        if isinstance(exit.code, str):
            print(exit.code, file=sys.stderr)  # what the interpreter prints for sys.exit("...")
    return code, capsys.readouterr().err


# (script, flags after the model / data / output flags, what the message says). {files}, {model:<name>} are
# replaced by the fixtures' paths.
CASES = [
    ("eval_knn", ["--k", "0"], "--k must be at least 1"),
    ("eval_knn", ["--k", "abc"], "argument --k: invalid int value: 'abc'"),
    ("eval_knn", ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ("eval_knn", ["--temperature", "0"], "--temperature must be greater than 0"),
    ("eval_knn", ["--temperature", "-1"], "--temperature must be greater than 0"),
    ("eval_knn", ["--temperature", "nan"], "--temperature must be a finite number"),
    ("eval_knn", ["--batch_size", "0"], "--batch_size must be at least 1"),
    ("eval_knn", ["--max_train_samples", "0"], "--max_train_samples must be at least 1"),
    ("eval_knn", ["--model:nan"], "not finite"),
    ("eval_knn", ["--model:truncated"], "truncated or corrupt"),
    ("eval_knn", ["--model:text"], "truncated or corrupt"),
    ("eval_knn", ["--model:no_config"], "has no config.json"),
    ("eval_knn", ["--model:zero_heads"], "num_attention_heads"),
    ("eval_knn", ["--model:not_extrema"], "not ExtreMA"),
    ("eval_knn", ["--output_dir", "{files}/a_file"], "--output_dir"),
    ("eval_knn", ["--validation_split", "nosuch"], "no split 'nosuch' (--validation_split)"),  # before the features
    ("eval_linear", ["--train_split", "nosuch"], "no split 'nosuch' (--train_split)"),
    ("eval_linear", ["--num_train_epochs", "0"], "--num_train_epochs must be at least 1"),
    ("eval_linear", ["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    ("eval_linear", ["--label_fraction", "1.5"], "--label_fraction must be in (0, 1]"),
    ("eval_finetune", ["--num_train_epochs", "0"], "--num_train_epochs must be at least 1"),
    ("eval_finetune", ["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    ("eval_finetune", ["--learning_rate", "-1"], "--learning_rate must be greater than 0"),
    ("eval_finetune", ["--min_learning_rate", "0.5", "--batch_size", "4"], "--min_learning_rate 0.5 is above the peak"),
    ("invert_representation", ["--mask_ratios", "0.5", "1.0"], "--mask_ratios must be in [0, 1)"),
    ("invert_representation", ["--num_steps", "0"], "--num_steps must be at least 1"),
    ("invert_representation", ["--image", "{files}/missing.png"], "--image"),
    ("invert_representation", ["--image", "{files}/notes.txt"], "cannot be read as an image"),
    ("locality_retrieval", ["--scales", "2.0"], "--scales must be in (0, 1]"),
    ("locality_retrieval", ["--num_locations", "0"], "--num_locations must be at least 1"),
    ("locality_retrieval", ["--num_locations", "1"], "--num_locations 1"),  # 5 boxes: the default index 12 is past
    ("locality_retrieval", ["--query_image", "{files}/notes.txt"], "--query_image"),
    ("visualize_attention", ["--image", "{files}/notes.txt"], "cannot be read as an image"),
    ("visualize_attention", ["--panel_size", "0"], "--panel_size must be at least 16"),
    ("visualize_attention", ["--queries", "2,2"], "outside the image"),
]
CONVERTER_CASES = [
    (["--checkpoint", "{files}/missing.pth"], "--checkpoint"),
    (["--checkpoint", "{files}/checkpoint.pth"], "not a PyTorch checkpoint"),
    (["--checkpoint", "{files}/other.pth"], "not an official ExtreMA checkpoint"),
    (["--checkpoint", "{files}/other.pth", "--num_masks", "0"], "--num_masks must be at least 1"),
]


def expand(flags, files, bad_models):
    return [str(files) + flag[len("{files}") :] if flag.startswith("{files}") else flag for flag in flags]


def assert_refused(code, stderr, message, output_dir):
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert not (output_dir / "results.json").exists()


@pytest.mark.parametrize("script, flags, message", CASES, ids=[f"{c[0]}{' '.join(c[1])}" for c in CASES])
def test_bad_inputs_end_in_one_line(script, flags, message, data_dir, model_dir, bad_models, files, tmp_path, capsys):
    model = model_dir
    if flags and flags[0].startswith("--model:"):
        model, flags = bad_models[flags[0].split(":")[1]], flags[1:]
    output_dir = tmp_path / "out"
    argv = ["--model_name_or_path", str(model), "--train_dir", str(data_dir), "--output_dir", str(output_dir),
            "--num_workers", "0", *expand(flags, files, bad_models)]  # fmt: skip
    code, stderr = run_entry_point(SCRIPTS[script], argv, capsys)
    assert_refused(code, stderr, message, output_dir)


@pytest.mark.parametrize("flags, message", CONVERTER_CASES, ids=[" ".join(c[0]) for c in CONVERTER_CASES])
def test_converter_errors_end_in_one_line(flags, message, files, bad_models, tmp_path, capsys):
    output_dir = tmp_path / "out"
    argv = [*expand(flags, files, bad_models), "--output_dir", str(output_dir)]
    code, stderr = run_entry_point(convert_official_checkpoint, argv, capsys)
    assert_refused(code, stderr, message, output_dir)
    assert not (output_dir / "model.safetensors").exists()


def test_debug_switch_shows_the_traceback(data_dir, model_dir, tmp_path, monkeypatch):
    from cli_extrema import UsageError

    monkeypatch.setenv("EXTREMA_DEBUG", "1")
    argv = ["--model_name_or_path", str(model_dir), "--train_dir", str(data_dir), "--output_dir", str(tmp_path),
            "--k", "0"]  # fmt: skip
    with pytest.raises(UsageError, match="--k must be at least 1"):
        run_cli(eval_knn.main, argv)


# ----------------------------------------------------------------------------------------------------------------
# Odd but valid data is read right


def test_16_bit_and_float_images_are_scaled_to_8_bits(tmp_path):
    from data_extrema import decode_image

    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    PIL.Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    PIL.Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tiff")
    for name in ("deep.png", "float.tiff"):
        pixels = np.asarray(decode_image(str(tmp_path / name)))
        assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
        np.testing.assert_allclose(pixels[..., 0], np.round(ramp * 255), atol=1)


# ----------------------------------------------------------------------------------------------------------------
# Model folders' code runs only with --trust_remote_code


CANARY_CODE = """
from pathlib import Path
Path({path!r}).write_text("the folder's code ran")
from transformers import PretrainedConfig
class ExtremaConfig(PretrainedConfig):
    model_type = "extrema"
"""


def canary_folder(root, model_dir, model_type="extrema"):
    """A model folder whose configuration_extrema.py writes `root/canary` when it is imported."""
    folder = root / f"canary_{model_type}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_extrema.ExtremaConfig",
                                                   "AutoModel": "modeling_extrema.ExtremaModel"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_extrema.py").write_text(CANARY_CODE.format(path=str(root / "canary")))
    (folder / "modeling_extrema.py").write_text("from .configuration_extrema import ExtremaConfig\n")
    return folder


MODEL_SCRIPTS = {
    **{name: module for name, module in SCRIPTS.items() if name != "convert_official_checkpoint"},
    "eval_segmentation": eval_segmentation,
    "export_onnx": export_onnx,
}


@pytest.mark.parametrize("script", sorted(MODEL_SCRIPTS))
def test_a_model_folders_code_does_not_run_without_the_flag(script, model_dir, data_dir, tmp_path, capsys):
    folder = canary_folder(tmp_path, model_dir)
    argv = ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")]
    if script != "export_onnx":
        argv += ["--train_dir", str(data_dir), "--num_workers", "0"]
    module = MODEL_SCRIPTS[script]
    original = module.load_extrema
    loaded = []
    module.load_extrema = lambda *args, **kwargs: loaded.append(original(*args, **kwargs)) or _stop()
    try:
        run_entry_point(module, argv, capsys)
    finally:
        module.load_extrema = original
    assert not (tmp_path / "canary").exists()
    assert type(loaded[0]).__module__ == "modeling_extrema"  # the installed class, not the folder's


def _stop():
    from cli_extrema import UsageError

    raise UsageError("stop after loading")


def test_a_folder_that_is_not_extrema_is_refused_before_its_code_runs(model_dir, tmp_path):
    from _eval_common import load_extrema
    from cli_extrema import UsageError

    folder = canary_folder(tmp_path, model_dir, model_type="evil")
    for trust in (False, True):
        with pytest.raises(UsageError, match="not ExtreMA"):
            load_extrema(str(folder), trust_remote_code=trust)
    assert not (tmp_path / "canary").exists()


def test_the_flag_runs_the_folders_code(model_dir, tmp_path):
    """--trust_remote_code loads with the folder's own code (in a fresh process: its own module cache)."""
    folder = tmp_path / "remote"
    ExtremaModel(ExtremaConfig.from_preset("tiny", **TINY)).save_pretrained(folder)  # with its code (auto_map)
    code = f"""
import sys
sys.path.insert(0, {str(REPO_ROOT / 'scripts')!r})
from _eval_common import load_extrema
print(type(load_extrema({str(folder)!r}, trust_remote_code=True)).__module__)
print(type(load_extrema({str(folder)!r})).__module__)
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    remote, installed = result.stdout.split()[-2:]
    assert remote.startswith("transformers_modules.") and installed == "modeling_extrema"


# ----------------------------------------------------------------------------------------------------------------
# Training: refusals, preemption, damaged checkpoints

# a few optimizer steps of the tiny network on 32 px images, without kNN or trackers (as tests/test_train.py)
TRAIN = ["--report_to", "none", "--skip_knn", "--per_device_train_batch_size", "8", "--drop_path_rate", "0",
         "--mixed_precision", "no", "--max_train_steps", "6", "--num_workers", "1", "--shuffle_buffer_size", "16",
         "--learning_rate", "1e-2", "--warmup_steps", "2", "--logging_steps", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    from _train_data import write_image_parquet

    folder = tmp_path_factory.mktemp("train_data")
    write_image_parquet(folder, num_images=40, num_shards=2)
    return folder


@pytest.fixture(scope="module")
def one_go(train_data, tmp_path_factory):
    """The uninterrupted run that interrupted and resumed runs must equal."""
    import train_extrema

    output_dir = tmp_path_factory.mktemp("one_go")
    train_extrema.main(TRAIN + ["--train_dir", str(train_data), "--output_dir", str(output_dir)])
    return load_file(str(output_dir / "final" / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def signal_after_step(step: int, signum: int) -> str:
    """Python that makes the process send itself `signum` during optimizer step `step` (as a cluster would)."""
    return f"""
import os, signal, train_extrema
calls = []
step = train_extrema.optimizer_step
def optimizer_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == {step}:
        os.kill(os.getpid(), {int(signum)})
    return step(*args, **kwargs)
train_extrema.optimizer_step = optimizer_step
"""


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_equals_one_go(train_data, one_go, tmp_path):
    import train_extrema

    output_dir = tmp_path / "preempted"
    argv = TRAIN + ["--train_dir", str(train_data), "--output_dir", str(output_dir)]
    code = signal_after_step(3, signal.SIGTERM) + f"from cli_extrema import run_cli\nrun_cli(train_extrema.main, {argv})"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: stopped by SIGTERM at step 3 of 6")
    assert "--resume_from_checkpoint latest" in errors[0]
    assert [p.name for p in train_extrema.list_checkpoints(output_dir)] == ["checkpoint-3"]
    assert not (output_dir / "final").exists()

    resumed = train_extrema.main(argv + ["--resume_from_checkpoint", "latest"])
    assert resumed["step"] == 6
    assert_same_weights(one_go, load_file(str(output_dir / "final" / "model.safetensors")))


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(train_data, tmp_path, monkeypatch, capsys):
    import train_extrema

    namespace = {}
    exec(signal_after_step(2, signal.SIGINT), namespace)  # patches train_extrema.optimizer_step
    monkeypatch.setattr(train_extrema, "optimizer_step", namespace["optimizer_step"])
    output_dir = tmp_path / "interrupted"
    argv = TRAIN + ["--train_dir", str(train_data), "--output_dir", str(output_dir)]
    code, stderr = run_entry_point(train_extrema, argv, capsys)
    assert code == 130 and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")][0].startswith(
        "error: stopped by SIGINT at step 2"
    )
    assert (output_dir / "checkpoint-2" / "model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are restored


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(train_data, one_go, tmp_path, capfd):
    import train_extrema

    output_dir = tmp_path / "damaged"
    argv = TRAIN + ["--train_dir", str(train_data), "--output_dir", str(output_dir), "--checkpointing_steps", "2"]
    assert train_extrema.main(argv + ["--stop_after_steps", "4"]) is None
    weights = output_dir / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    resumed = train_extrema.main(argv + ["--resume_from_checkpoint", "latest"])
    assert resumed["step"] == 6
    assert re.search(r"Skipping \S*checkpoint-4: it cannot be read \(SafetensorError", capfd.readouterr().err)
    assert_same_weights(one_go, load_file(str(output_dir / "final" / "model.safetensors")))


def test_training_refusals_are_one_line(train_data, bad_models, tmp_path, monkeypatch, capsys):
    import accelerate

    import train_extrema
    from modeling_extrema import ExtremaForPreTraining

    def run(extra, output_dir):
        argv = TRAIN + ["--train_dir", str(train_data), "--output_dir", str(output_dir), *extra]
        return run_entry_point(train_extrema, argv, capsys)

    (tmp_path / "a_file").write_text("")
    code, stderr = run(["--recipe", "no-such-recipe"], tmp_path / "recipe")  # read before the other flags
    assert_refused(code, stderr, "argument --recipe: invalid choice: 'no-such-recipe'", tmp_path)
    code, stderr = run([], tmp_path / "a_file" / "out")
    assert_refused(code, stderr, "--output_dir", tmp_path)
    code, stderr = run(["--min_learning_rate", "0.5"], tmp_path / "min_lr")
    assert_refused(code, stderr, "--min_learning_rate 0.5 is above the peak lr", tmp_path)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("not an image")
    argv = TRAIN + ["--train_dir", str(tmp_path / "texts"), "--output_dir", str(tmp_path / "texts_out")]
    code, stderr = run_entry_point(train_extrema, argv, capsys)
    assert_refused(code, stderr, "holds no images, Parquet files or WebDataset .tar shards", tmp_path)
    code, stderr = run(["--init_from", str(bad_models["truncated"])], tmp_path / "init")
    assert_refused(code, stderr, "cannot be loaded", tmp_path)
    code, stderr = run(["--model_config", str(bad_models["not_extrema"])], tmp_path / "config")
    assert_refused(code, stderr, "is not an ExtreMA model folder", tmp_path)
    for overrides, message in [
        ("num_hidden_layers", "'num_hidden_layers' is not key=value"),
        ("no_such_field=1", "'no_such_field' is not a number, string or true/false field of ExtremaConfig"),
        ("out_indices=1", "'out_indices' is not a number, string or true/false field"),
        ("num_hidden_layers=six", "num_hidden_layers=six is not an integer"),
        ("layer_norm_eps=small", "layer_norm_eps=small is not a number"),
        ("qkv_bias=maybe", "qkv_bias=maybe is not true or false"),
        ("hidden_size=30", "hidden_size"),  # the config's own check: not a multiple of the heads
    ]:
        code, stderr = run(["--config_overrides", overrides], tmp_path / "overrides")
        assert_refused(code, stderr, "--config_overrides", tmp_path)
        assert message in stderr, stderr

    # a checkpoint of the tiny model, resumed with another --model_config
    assert run(["--checkpointing_steps", "1", "--stop_after_steps", "1"], tmp_path / "other")[0] == 0
    config = tmp_path / "wider.json"
    config.write_text(ExtremaConfig.from_preset("tiny", hidden_size=64).to_json_string())
    code, stderr = run(["--model_config", str(config), "--resume_from_checkpoint", "latest"], tmp_path / "other")
    assert_refused(code, stderr, "saved from another model", tmp_path / "other")

    # a full disk while a checkpoint is written: torch says "unexpected pos"
    def full_disk(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 4024")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full_disk)
    code, stderr = run(["--checkpointing_steps", "1"], tmp_path / "full")
    assert_refused(code, stderr, "no space left on", tmp_path / "full")
    assert not (tmp_path / "full" / "checkpoint-1.tmp").exists()
    monkeypatch.undo()

    # a loss that is not finite: the state is saved, one line says where
    class Diverging(ExtremaForPreTraining):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.loss = output.loss * float("nan")
            return output

    monkeypatch.setattr(train_extrema, "ExtremaForPreTraining", Diverging)
    code, stderr = run([], tmp_path / "nan")
    assert_refused(code, stderr, "The loss is nan at step 0", tmp_path / "nan")
    assert (tmp_path / "nan" / "nonfinite-step-0" / "model.safetensors").exists()


def test_training_on_unlabelled_data_says_that_knn_is_off(tmp_path, capfd):
    import train_extrema

    (tmp_path / "data").mkdir()
    write_split(tmp_path / "data", "train", images(16))
    argv = [flag for flag in TRAIN if flag != "--skip_knn"]
    train_extrema.main(argv + ["--train_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                               "--max_train_steps", "1"])  # fmt: skip
    assert re.search(r"WARNING The split 'train' has no labels .*: no kNN accuracy", capfd.readouterr().err)


def test_string_labels_are_mapped_to_class_ids(model_dir, tmp_path):
    names, data = ["cat", "dog", "bird"], tmp_path / "data"
    data.mkdir()
    write_split(data, "train", images(12), [names[i % 3] for i in range(12)], datasets.Value("string"))
    write_split(data, "test", images(6, seed=1), [names[i % 3] for i in range(6)], datasets.Value("string"))
    results = eval_knn.main(["--model_name_or_path", str(model_dir), "--train_dir", str(data), "--output_dir",
                             str(tmp_path / "out"), "--num_workers", "0", "--k", "3"])  # fmt: skip
    assert results["num_classes"] == 3 and results["num_train"] == 12
    from data_extrema import load_raw_stream, open_dataset

    labels = [row["label"] for row in load_raw_stream(open_dataset(train_dir=str(data)), "test")]
    assert labels == [1, 2, 0, 1, 2, 0]  # bird, cat, dog in sorted order


def test_a_truncated_parquet_shard_is_named(model_dir, data_dir, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    for split in ("train", "test"):
        shard = next(data_dir.glob(f"{split}-*.parquet"))
        data = shard.read_bytes()
        (tmp_path / "data" / shard.name).write_bytes(data if split == "test" else data[: len(data) // 2])
    argv = ["--model_name_or_path", str(model_dir), "--train_dir", str(tmp_path / "data"), "--output_dir",
            str(tmp_path / "out"), "--num_workers", "0"]  # fmt: skip
    code, stderr = run_entry_point(eval_knn, argv, capsys)
    assert_refused(code, stderr, "train-00000-of-00001.parquet is not a readable Parquet file", tmp_path / "out")


def test_sigterm_during_fine_tuning_saves_a_checkpoint_and_resumes(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    """12 images in batches of 4: 3 steps per epoch, 2 epochs; SIGTERM during step 2, then a resume to the end."""
    calls, training_loss = [], eval_finetune.training_loss

    def preempted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return training_loss(*args, **kwargs)

    monkeypatch.setattr(eval_finetune, "training_loss", preempted)
    output_dir = tmp_path / "finetune"
    argv = ["--model_name_or_path", str(model_dir), "--train_dir", str(data_dir), "--output_dir", str(output_dir),
            "--num_workers", "0", "--batch_size", "4", "--num_train_epochs", "2", "--warmup_epochs", "0",
            "--mixed_precision", "no", "--report_to", "none", "--checkpointing_steps", "no"]  # fmt: skip
    code, stderr = run_entry_point(eval_finetune, argv, capsys)
    assert code == 128 + signal.SIGTERM and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: stopped by SIGTERM at step 2 of 6") and "latest" in errors[0]
    assert (output_dir / "checkpoint-2").is_dir() and not (output_dir / "results.json").exists()
    monkeypatch.setattr(eval_finetune, "training_loss", training_loss)
    resumed = eval_finetune.main(argv + ["--resume_from_checkpoint", "latest"])
    assert resumed["steps"] == 6 and (output_dir / "results.json").exists()


def test_from_pretrained_names_a_truncated_weights_file(bad_models):
    with pytest.raises(OSError, match="model.safetensors is truncated or corrupt"):
        ExtremaModel.from_pretrained(bad_models["truncated"])
