"""Six optimizer steps of train_extrema.py's procedure against the official ExtreMA training code.

`official_extrema_train_shared.pt` (../shared/golden/README.md, "Golden training trajectory") holds the official
`main.py` + `lib/builder.py` run from a released-layout checkpoint: each step's lr, EMA momentum and loss, and the
weights after the sixth step. The test converts the initial checkpoint with scripts/convert_official_checkpoint.py
and trains with what `train_extrema.main` uses: `parse_args` + `plan_schedule`, `get_lr` / `teacher_momentum`,
`param_groups` in a fused AdamW, the model's forward and `update_teacher`.
"""

import sys

import torch

import train_extrema as te  # the repository root is on sys.path (conftest.py)
from conftest import REPO_ROOT
from modeling_extrema import ExtremaForPreTraining

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import convert_official_checkpoint  # noqa: E402
from convert_official_checkpoint import config_from_state_dict, convert, load_official_state_dict  # noqa: E402

# Adam divides each step by sqrt(v) + eps, so its first steps turn float differences in small gradients into weight
# differences far above float32's: 1.7e-5 at most here (the class token), 3e-6 elsewhere; 2e-6 in the losses.
WEIGHT_ATOL = 1e-4
LOSS_ATOL = 1e-5
# The attention key biases get a zero gradient up to float noise (softmax ignores a constant added to every logit):
# ~1e-9 here, against ~1e-2 for the query and value biases. Adam's eps (1e-8) is of the same size as that noise, so it
# still moves them by a fraction of the lr each step, differently in each implementation (up to 6.5e-4 here, 3.7e-4 in
# the official run); every other tensor of the student moves by ~2.8e-3 (the sum of the lrs).
KEY_BIAS_GRAD = 1e-7
KEY_BIAS_MOVE = 1e-3


def training_args(schedule: dict, *extra_flags: str):
    """train_extrema's command line for the golden run's recipe, with `extra_flags`."""
    flags = {
        "--train_dir": "unused",  # no data is read: the golden file holds the batches
        "--per_device_train_batch_size": schedule["batch_size"],
        "--steps_per_epoch": schedule["steps_per_epoch"],
        "--num_train_epochs": schedule["epochs"],
        "--warmup_epochs": schedule["warmup_epochs"],
        "--learning_rate": schedule["base_learning_rate"],
        "--min_learning_rate": schedule["min_learning_rate"],
        "--weight_decay": schedule["weight_decay"],
        "--ema_momentum": schedule["ema_momentum"],
        "--drop_path_rate": 0,
        "--mixed_precision": "no",
    }
    return te.parse_args([str(x) for item in flags.items() for x in item] + list(extra_flags))


def official_checkpoint(golden: dict, name: str, tmp_path) -> dict:
    """A checkpoint of the golden file through the conversion script's loader, as a released .pth goes."""
    path = tmp_path / f"{name}.pth"
    torch.save(golden[name], path)
    return load_official_state_dict(path)


def split_key_biases(tensors: dict, hidden_size: int) -> tuple[dict, dict]:
    """(every tensor without the attention key biases, the key biases): `k.bias`, and the middle third of `qkv.bias`."""
    others, key_biases = {}, {}
    for name, tensor in tensors.items():
        if name.endswith("attention.qkv.bias"):
            query, key, value = tensor.split(hidden_size)
            others[name], key_biases[name] = torch.cat([query, value]), key
        elif name.endswith("attention.k.bias"):
            key_biases[name] = tensor
        else:
            others[name] = tensor
    return others, key_biases


def converted_model(golden: dict, args, tmp_path):
    """The golden run's initial checkpoint converted in memory with the conversion script's functions."""
    state_dict = official_checkpoint(golden, "initial_checkpoint", tmp_path)
    config = config_from_state_dict(
        state_dict,
        golden["config"]["num_attention_heads"],  # the one field the tensors cannot tell
        mask_ratio=golden["config"]["mask_ratio"],
        num_masks=golden["config"]["num_masks"],
        drop_path_rate=args.drop_path_rate,
    )
    return convert(state_dict, config, full=True)


def model_from_init_from(golden: dict, args, tmp_path):
    """The model `train_extrema.main` builds with `--init_from` a folder that the conversion script wrote."""
    path = tmp_path / "official.pth"
    torch.save(golden["initial_checkpoint"], path)
    config = golden["config"]
    convert_official_checkpoint.main([
        "--checkpoint", str(path), "--output_dir", args.init_from, "--full",
        "--num_attention_heads", str(config["num_attention_heads"]),
        "--mask_ratio", str(config["mask_ratio"]), "--num_masks", str(config["num_masks"]),
    ])  # fmt: skip
    model = ExtremaForPreTraining(te.build_config(args))  # without --model_config: the folder's architecture
    assert te.load_initial_weights(model, args.init_from) == "full"
    return model


def train_like_the_official_code(golden: dict, tmp_path, args=None, build_model=converted_model):
    """The golden run with train_extrema's pieces, from the model `build_model(golden, args, tmp_path)`.

    Returns the initial state dict, the trained model, the parsed arguments, the optimizer, and per step: lr,
    momentum, loss, and the largest gradient of an attention key bias.
    """
    args = args or training_args(golden["schedule"])
    schedule = te.plan_schedule(args, num_examples=None, world_size=1)
    model = build_model(golden, args, tmp_path).train()
    config = model.config
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW(  # as main builds it; fused is its choice on CPUs and GPUs
        te.param_groups(model, args.weight_decay),
        lr=schedule.peak_lr,
        betas=(args.adam_beta1, args.adam_beta2),
        fused=True,
    )

    trace = {"lr": [], "momentum": [], "loss": [], "key_bias_grad": []}
    for step in range(schedule.total_steps):
        lr = te.get_lr(step, schedule.total_steps, schedule.warmup_steps, schedule.peak_lr, args.min_learning_rate)
        momentum = ExtremaForPreTraining.teacher_momentum(step, schedule.total_steps, args.ema_momentum)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The official forward starts with the EMA step of m_s, so step s's targets come from a teacher that has
        # already averaged in the student about to be trained. main calls update_teacher(m_s) after step s's
        # optimizer step instead, so the student that step s + 1 trains enters the teacher with m_s, not m_(s+1).
        # Over a real schedule that shift is negligible, but here 1 - m falls from 0.01 to 7e-4 in 6 steps and main's
        # order changes the losses by up to 6e-3, so the EMA step goes where the official code has it.
        model.update_teacher(momentum)
        loss = model(
            pixel_values=golden["student_views"][step],
            pixel_values_teacher=golden["teacher_views"][step],
            ids_keep=golden["masks"][step],  # (M, B, K)
        ).loss
        loss.backward()
        gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        key_bias_grads = split_key_biases(gradients, config.hidden_size)[1].values()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trace["lr"].append(lr)
        trace["momentum"].append(momentum)
        trace["loss"].append(loss.item())
        trace["key_bias_grad"].append(max(g.abs().max().item() for g in key_bias_grads))
    trace = {key: torch.tensor(values, dtype=torch.float64) for key, values in trace.items()}
    return initial, model, args, optimizer, trace


def test_training_reproduces_the_official_trajectory(golden_train_path, tmp_path):
    golden = torch.load(golden_train_path, map_location="cpu", weights_only=True)
    assert_official_trajectory(golden, *train_like_the_official_code(golden, tmp_path), tmp_path)


def test_init_from_a_converted_official_checkpoint_trains_as_the_official_code(golden_train_path, tmp_path):
    """--init_from a `convert_official_checkpoint.py --full` folder: the first step's loss, and every step after it,
    are the official code's."""
    golden = torch.load(golden_train_path, map_location="cpu", weights_only=True)
    args = training_args(golden["schedule"], "--init_from", str(tmp_path / "converted"))
    run = train_like_the_official_code(golden, tmp_path, args, build_model=model_from_init_from)
    trace = run[-1]
    assert abs(trace["loss"][0] - golden["losses"][0]) < LOSS_ATOL
    assert_official_trajectory(golden, *run, tmp_path)


def assert_official_trajectory(golden: dict, initial, model, args, optimizer, trace, tmp_path):
    """The run of `train_like_the_official_code` step by step against the official run."""
    # main's optimizer settings are the official ones
    assert optimizer.defaults["betas"] == tuple(golden["schedule"]["adam_betas"])
    assert optimizer.defaults["eps"] == golden["schedule"]["adam_eps"]
    assert args.max_grad_norm is golden["schedule"]["max_grad_norm"] is None
    # the schedules (warm-up from 0 over one epoch then cosine; momentum 0.99 -> 1) and the loss, step by step
    torch.testing.assert_close(trace["lr"], golden["learning_rates"], atol=1e-9, rtol=0)
    torch.testing.assert_close(trace["momentum"], golden["ema_momentums"], atol=1e-9, rtol=0)
    torch.testing.assert_close(trace["loss"], golden["losses"], atol=LOSS_ATOL, rtol=0)

    hidden_size = model.config.hidden_size
    official = official_checkpoint(golden, "final_checkpoint", tmp_path)
    official = convert(official, model.config, full=True).state_dict()
    final = model.state_dict()
    assert final.keys() == official.keys()
    (final, key_biases), (official, official_key_biases), (initial, initial_key_biases) = (
        split_key_biases(tensors, hidden_size) for tensors in (final, official, initial)
    )
    # The teacher moves by at most sum(1 - m_s) of the student's moves, and so do its float differences: at the
    # student's tolerance a teacher that never moved would pass.
    ema_weight = (1 - golden["ema_momentums"]).sum().item()
    for name, tensor in final.items():
        atol = WEIGHT_ATOL * (ema_weight if name.startswith("teacher") else 1)
        torch.testing.assert_close(tensor, official[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
        if "position_embeddings" not in name:  # the fixed sin-cos table; everything else is trained
            moved = (official[name] - initial[name]).abs().max()
            assert moved > 2 * atol, f"{name} moves by {moved:.2g}: the comparison would not see a frozen tensor"

    # the key biases: noise gradients at every step, small moves in both implementations
    layers = model.config.num_hidden_layers + model.config.num_class_attention_layers
    assert len(key_biases) == 2 * layers  # student and teacher
    assert trace["key_bias_grad"].max() < KEY_BIAS_GRAD
    for name, start in initial_key_biases.items():
        bound = KEY_BIAS_MOVE * (ema_weight if name.startswith("teacher") else 1)
        assert (key_biases[name] - start).abs().max() < bound, name
        assert (official_key_biases[name] - start).abs().max() < bound, name
