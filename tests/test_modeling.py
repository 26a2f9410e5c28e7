"""Behaviour of the ExtreMA model: parity with the official code, masking, EMA, attention, saving and loading."""

import copy
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from configuration_extrema import PRESETS, ExtremaConfig
from conftest import REPO_ROOT
from modeling_extrema import (
    ExtremaForImageClassification,
    ExtremaForPreTraining,
    ExtremaModel,
    byol_loss,
    collapse_statistics,
    infonce_loss,
)

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from convert_official_checkpoint import config_from_state_dict, convert, load_official_state_dict  # noqa: E402


def images(config, batch_size=3, size=None, seed=0):
    size = size or config.image_size
    return torch.randn(batch_size, config.num_channels, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------- parity


def test_conversion_reproduces_the_official_implementation(golden_path):
    golden = torch.load(golden_path, map_location="cpu", weights_only=True)
    state_dict = load_official_state_dict(golden_path)
    config = config_from_state_dict(state_dict, mask_ratio=0.8, num_masks=len(golden["masks"]))
    assert (config.hidden_size, config.num_hidden_layers, config.num_class_attention_layers) == (192, 3, 2)
    assert (config.projector_hidden_size, config.projection_dim, config.num_visible_patches) == (512, 64, 39)
    model = convert(state_dict, config, full=True).eval()
    pixel_values, ids_keep = golden["pixel_values"], torch.stack(golden["masks"])  # (M, B, K)

    def close(actual, expected):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)

    with torch.no_grad():
        teacher = model.teacher(pixel_values)
        close(teacher.pooler_output, golden["teacher_instance"])
        close(teacher.last_hidden_state[:, 1:], golden["teacher_tokens"])
        close(model.teacher_projector(teacher.pooler_output), golden["teacher_projection"])
        def image_major(golden_rows):  # the official code stacks the views mask-major: (M * B, ...) -> (B * M, ...)
            return golden_rows.unflatten(0, (len(golden["masks"]), -1)).transpose(0, 1).flatten(0, 1)

        student = model.student(pixel_values, ids_keep=ids_keep)
        close(student.pooler_output, image_major(golden["student_instance_masked"]))
        predictions = model.predictor(model.student_projector(student.pooler_output))
        close(predictions, image_major(golden["student_prediction_masked"]))

        model.update_teacher(0.99)  # the official forward moves the teacher first, then computes the targets
        output = model(pixel_values, ids_keep=ids_keep)
        close(output.loss, golden["byol_loss"])
        close(model.teacher(pixel_values).pooler_output, golden["teacher_instance_after_ema"])
        # the student did not move; predictions are (B, M, P), the golden ones mask-major (M * B, P)
        close(output.predictions.flatten(0, 1), image_major(golden["student_prediction_masked"]))


def test_backbone_conversion_takes_the_requested_encoder(golden_path):
    state_dict = load_official_state_dict(golden_path)
    config = config_from_state_dict(state_dict)
    momentum = convert(state_dict, config, encoder="momentum")
    base = convert(state_dict, config, encoder="base")
    torch.testing.assert_close(
        momentum.encoder.cls_token, state_dict["momentum_encoder.cls_token"], atol=0, rtol=0
    )
    torch.testing.assert_close(base.encoder.cls_token, state_dict["base_encoder.cls_token"], atol=0, rtol=0)


def test_conversion_command_writes_a_loadable_folder(golden_path, tmp_path):
    from transformers import AutoModel, AutoModelForPreTraining

    from convert_official_checkpoint import main as convert_main

    golden = torch.load(golden_path, map_location="cpu", weights_only=True)
    convert_main(["--checkpoint", str(golden_path), "--output_dir", str(tmp_path / "backbone")])
    assert {"model.safetensors", "preprocessor_config.json", "README.md", "modeling_extrema.py"} <= {
        p.name for p in (tmp_path / "backbone").iterdir()
    }
    backbone = AutoModel.from_pretrained(tmp_path / "backbone", trust_remote_code=True).eval()
    with torch.no_grad():
        pooled = backbone(golden["pixel_values"]).pooler_output
    torch.testing.assert_close(pooled, golden["teacher_instance"], atol=1e-5, rtol=0)

    convert_main(["--checkpoint", str(golden_path), "--output_dir", str(tmp_path / "full"), "--full"])
    full = AutoModelForPreTraining.from_pretrained(tmp_path / "full", trust_remote_code=True).eval()
    ids_keep = torch.stack(golden["masks"])
    with torch.no_grad():
        predictions = full(golden["pixel_values"], ids_keep=ids_keep).predictions  # (B, M, P)
    expected = golden["student_prediction_masked"].unflatten(0, (len(golden["masks"]), -1)).transpose(0, 1)
    torch.testing.assert_close(predictions, expected, atol=1e-5, rtol=0)


def test_conversion_rejects_other_checkpoints(tmp_path):
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not an official ExtreMA checkpoint"):
        load_official_state_dict(tmp_path / "resnet.pth")


# ------------------------------------------------------------------------------------------------------- backbone


def test_output_shapes_and_representations(tiny_config):
    model = ExtremaModel(tiny_config).eval()
    x = images(tiny_config)
    out = model(x, output_attentions=True, output_hidden_states=True)
    n, d, h = tiny_config.num_patches, tiny_config.hidden_size, tiny_config.num_attention_heads
    assert out.last_hidden_state.shape == (3, 1 + n, d)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0], atol=0, rtol=0)
    assert len(out.hidden_states) == tiny_config.num_hidden_layers + 1
    assert all(state.shape == (3, n, d) for state in out.hidden_states)
    assert len(out.attentions) == tiny_config.num_hidden_layers
    assert all(a.shape == (3, h, n, n) for a in out.attentions)
    assert len(out.class_attentions) == tiny_config.num_class_attention_layers
    assert all(a.shape == (3, h, 1, 1 + n) for a in out.class_attentions)
    torch.testing.assert_close(out.class_attentions[-1].sum(-1), torch.ones(3, h, 1))  # a distribution


def test_sdpa_and_eager_attention_agree(tiny_config):
    torch.manual_seed(0)
    sdpa = ExtremaModel(tiny_config).eval()
    eager = ExtremaModel(copy.deepcopy(tiny_config)).eval()  # its own config: the implementation lives there
    eager.load_state_dict(sdpa.state_dict())
    eager.set_attn_implementation("eager")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    x = images(tiny_config)
    ids_keep = torch.stack([torch.randperm(tiny_config.num_patches)[:5] for _ in range(3)])
    with torch.no_grad():
        for kwargs in ({}, {"ids_keep": ids_keep}):
            torch.testing.assert_close(sdpa(x, **kwargs).last_hidden_state, eager(x, **kwargs).last_hidden_state)


def test_class_attention_leaves_patch_tokens_unchanged(tiny_config):
    model = ExtremaModel(tiny_config).eval()
    x = images(tiny_config)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        # patch tokens out = final norm of the last self-attention block's tokens: class attention did not touch them
        torch.testing.assert_close(out.last_hidden_state[:, 1:], model.layernorm(out.hidden_states[-1]))
        for layer in model.encoder.class_attention_layer:  # perturbing class attention moves only the class token
            layer.attention.v.weight.add_(1.0)
        perturbed = model(x)
    torch.testing.assert_close(perturbed.last_hidden_state[:, 1:], out.last_hidden_state[:, 1:], atol=0, rtol=0)
    assert not torch.allclose(perturbed.pooler_output, out.pooler_output)


def test_masked_input_encodes_only_visible_patches(tiny_config):
    model = ExtremaModel(tiny_config).eval()
    x = images(tiny_config)
    ids_keep = torch.tensor([[0, 5, 9], [1, 2, 3], [15, 7, 4]])
    with torch.no_grad():
        out = model(x, ids_keep=ids_keep)
        assert out.last_hidden_state.shape == (3, 1 + 3, tiny_config.hidden_size)
        # the masked patches have no influence: change them and nothing moves
        x2 = x.clone()
        x2[:, :, 8:16, 8:16] += 5.0  # patch 5 of the 4x4 grid (row 1, col 1), visible only in image 0
        out2 = model(x2, ids_keep=ids_keep)
    torch.testing.assert_close(out2.last_hidden_state[1:], out.last_hidden_state[1:], atol=0, rtol=0)
    assert not torch.allclose(out2.last_hidden_state[0], out.last_hidden_state[0])


def test_multi_mask_batch_is_image_major(tiny_config):
    model = ExtremaModel(tiny_config).eval()
    x = images(tiny_config)
    ids_keep = torch.stack([torch.randperm(16).view(2, 8)[:, :4] for _ in range(3)], dim=1)  # (M=2, B=3, K=4)
    with torch.no_grad():
        joint = model(x, ids_keep=ids_keep).pooler_output  # (B * M, D)
        separate = torch.stack([model(x, ids_keep=ids_keep[m]).pooler_output for m in range(2)], dim=1)  # (B, M, D)
    torch.testing.assert_close(joint, separate.flatten(0, 1))


def test_position_interpolation_for_a_larger_input(tiny_config):
    model = ExtremaModel(tiny_config).eval()
    n = tiny_config.num_patches
    x = images(tiny_config, size=2 * tiny_config.image_size)
    with torch.no_grad():
        out = model(x)  # interpolate_pos_encoding=None: interpolate when the size differs
        assert out.last_hidden_state.shape == (3, 1 + 4 * n, tiny_config.hidden_size)
        torch.testing.assert_close(model(x, interpolate_pos_encoding=True).last_hidden_state, out.last_hidden_state)
    table = model.embeddings.position_embeddings
    assert model.embeddings.interpolate_pos_encoding(32, 32) is table
    big = model.embeddings.interpolate_pos_encoding(64, 64).reshape(8, 8, -1)
    # upsampling by 2 and averaging 2x2 blocks approximately recovers the original table (it is smooth)
    pooled = F.avg_pool2d(big.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0).reshape(n, -1)
    assert (pooled - table[0]).abs().mean() < 0.1
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(x, interpolate_pos_encoding=False)


def test_position_table_is_the_fixed_sincos_table(tiny_config):
    table = ExtremaModel(tiny_config).embeddings.position_embeddings  # (1, N, D)
    d, grid = tiny_config.hidden_size, tiny_config.image_size // tiny_config.patch_size
    omega = 1.0 / 10000 ** (torch.arange(d // 4) / (d / 4))
    row, col = 2, 3
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(table[0, row * grid + col], expected)
    assert not any(name.endswith("position_embeddings") for name, _ in ExtremaModel(tiny_config).named_parameters())


# ------------------------------------------------------------------------------------------------------- training


def test_random_masks_are_disjoint_sized_and_differ_per_image(tiny_config):
    config = ExtremaConfig(**{**tiny_config.to_diff_dict(), "num_masks": 4})
    model = ExtremaForPreTraining(config)
    ids_keep = model.random_masking(batch_size=8, num_patches=16)
    assert ids_keep.shape == (4, 8, 4) and ids_keep.dtype == torch.long
    for b in range(8):
        assert len(set(ids_keep[:, b].flatten().tolist())) == 16  # 4 disjoint masks of 4 cover all 16 patches
    assert len({tuple(ids_keep[0, b].sort().values.tolist()) for b in range(8)}) > 1
    noise = torch.rand(8, 16)
    torch.testing.assert_close(model.random_masking(8, 16, noise=noise), model.random_masking(8, 16, noise=noise))


def test_non_disjoint_masks_are_sampled_independently(tiny_config):
    config = ExtremaConfig(**{**tiny_config.to_diff_dict(), "num_masks": 5, "disjoint_masks": False})
    ids_keep = ExtremaForPreTraining(config).random_masking(batch_size=2, num_patches=16)
    assert ids_keep.shape == (5, 2, 4)
    assert all(len(set(mask.tolist())) == 4 for mask in ids_keep.flatten(0, 1))


def test_return_dict_false_gives_the_outputs_fields_as_a_tuple(tiny_config):
    x = images(tiny_config)
    model = ExtremaModel(tiny_config).eval()
    with torch.no_grad():
        output, fields = model(x, output_hidden_states=True), model(x, output_hidden_states=True, return_dict=False)
        pretraining = ExtremaForPreTraining(ExtremaConfig(**{**tiny_config.to_diff_dict(), "return_dict": False}))
        pretraining_fields = pretraining.eval()(x, noise=torch.rand(3, 16))  # the heads read dicts inside
    assert len(fields) == 3 and torch.equal(fields[0], output.last_hidden_state)
    assert torch.equal(fields[1], output.pooler_output) and len(fields[2]) == len(output.hidden_states)
    assert isinstance(pretraining_fields, tuple) and pretraining_fields[0].ndim == 0  # (loss, predictions, ...)

def test_mask_noise_comes_batch_major_in_the_shape_the_config_gives(tiny_config):
    """The data pipeline batches each image's (config.mask_noise_shape) noise: (B, M, N) when every mask has its own."""
    config = ExtremaConfig(**{**tiny_config.to_diff_dict(), "num_masks": 3, "disjoint_masks": False})
    assert (tiny_config.mask_noise_shape, config.mask_noise_shape) == ((16,), (3, 16))
    model, noise = ExtremaForPreTraining(config), torch.rand(2, *config.mask_noise_shape)  # (B, M, N)
    ids_keep = model.random_masking(2, 16, noise=noise)  # (M, B, K)
    for m, b in itertools.product(range(3), range(2)):
        assert torch.equal(ids_keep[m, b], noise[b, m].argsort()[: config.num_visible_patches])
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 3, 16\)"):
        model.random_masking(2, 16, noise=noise.transpose(0, 1))
    with pytest.raises(ValueError, match="resize them or pass ids_keep"):  # masks are drawn for the config's size
        model(images(config, size=2 * config.image_size))

def test_teacher_gets_no_gradient_and_follows_the_student(tiny_config):
    torch.manual_seed(0)
    model = ExtremaForPreTraining(tiny_config)
    for s, t in zip(model.student.state_dict().values(), model.teacher.state_dict().values()):
        torch.testing.assert_close(s, t, atol=0, rtol=0)  # exact copy at init
    out = model(images(tiny_config))
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is None for p in model.teacher_projector.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert model.student.encoder.cls_token.grad.abs().sum() > 0

    with torch.no_grad():  # move the student, then check the EMA formula and its two ends
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.teacher.parameters()]
    model.update_teacher(1.0)
    assert all(torch.equal(b, p) for b, p in zip(before, model.teacher.parameters()))
    model.update_teacher(0.9)
    for b, t, s in zip(before, model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    model.update_teacher(0.0)
    for t, s in zip(model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t, s, atol=0, rtol=0)
    for t, s in zip(model.teacher_projector.parameters(), model.student_projector.parameters()):
        torch.testing.assert_close(t, s, atol=0, rtol=0)


def test_teacher_stays_in_inference_mode(tiny_config):
    config = ExtremaConfig(**{**tiny_config.to_diff_dict(), "drop_path_rate": 0.5})
    model = ExtremaForPreTraining(config).train()
    assert model.student.training and not model.teacher.training
    x = images(config)
    torch.testing.assert_close(model(x).targets, model(x).targets)  # no drop path in the teacher


def test_byol_loss_is_the_normalised_l2_averaged_over_masks(tiny_config):
    model = ExtremaForPreTraining(tiny_config)
    out = model(images(tiny_config))
    assert out.predictions.shape == (3, 2, tiny_config.projection_dim)  # (B, M, P)
    p = F.normalize(out.predictions, dim=-1).transpose(0, 1)  # (M, B, P)
    z = F.normalize(out.targets, dim=-1)
    expected = sum(((p[m] - z) ** 2).sum(-1).mean() for m in range(2)) / 2
    torch.testing.assert_close(out.loss, expected)
    cos = (p * z).sum(-1).mean()
    torch.testing.assert_close(out.loss, 2 - 2 * cos)
    assert out.ids_keep.shape == (2, 3, tiny_config.num_visible_patches)


def test_infonce_loss_single_process(tiny_config):
    torch.manual_seed(0)
    predictions, targets = torch.randn(3, 2, 8), torch.randn(3, 8)  # (B, M, P), (B, P)
    loss = infonce_loss(predictions, targets, temperature=0.2)
    p, z = F.normalize(predictions, dim=-1), F.normalize(targets, dim=-1)
    expected = sum(F.cross_entropy(p[:, m] @ z.T / 0.2, torch.arange(3)) for m in range(2)) / 2 * 0.4
    torch.testing.assert_close(loss, expected)
    config = ExtremaConfig(**{**tiny_config.to_diff_dict(), "loss": "infonce"})
    out = ExtremaForPreTraining(config)(images(config))
    torch.testing.assert_close(out.loss, infonce_loss(out.predictions, out.targets, config.infonce_temperature))
    assert not torch.allclose(out.loss, byol_loss(out.predictions, out.targets))


def test_one_optimizer_step_lowers_the_loss_on_a_fixed_batch(tiny_config):
    torch.manual_seed(0)
    model = ExtremaForPreTraining(tiny_config)
    x, noise = images(tiny_config, batch_size=8), torch.rand(8, 16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(x, noise=noise).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_teacher(0.99)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------- collapse and its fixes


def test_collapse_statistics_of_spread_and_collapsed_batches():
    one_direction = torch.randn(1, 64).expand(32, -1) * torch.rand(32, 1)  # same direction, any length
    stats = collapse_statistics(one_direction)
    assert stats["mean_cosine"].item() == pytest.approx(1.0, abs=1e-5) and stats["std"].item() == pytest.approx(0.0, abs=1e-3)
    basis = torch.eye(16)  # pairwise orthogonal: mean cosine 0
    assert collapse_statistics(basis)["mean_cosine"].item() == pytest.approx(0.0, abs=1e-6)
    spread = collapse_statistics(torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)))
    assert abs(spread["mean_cosine"].item()) < 0.01 and spread["std"].item() == pytest.approx(1.0, abs=0.02)
    # the closed form equals the mean over distinct pairs written out
    z = F.normalize(torch.randn(10, 8), dim=-1)
    cosines = z @ z.T
    expected = (cosines.sum() - cosines.diagonal().sum()) / (10 * 9)
    torch.testing.assert_close(collapse_statistics(z)["mean_cosine"], expected)


def test_target_centering_removes_the_shared_direction(tiny_config):
    torch.manual_seed(0)
    x = images(tiny_config, batch_size=6)
    plain = ExtremaForPreTraining(tiny_config).train()
    raw = plain(x).targets
    batch = ExtremaForPreTraining(ExtremaConfig(**{**tiny_config.to_diff_dict(), "target_centering": "batch"}))
    batch.load_state_dict(plain.state_dict())
    torch.testing.assert_close(batch.train()(x).targets, raw - raw.mean(0, keepdim=True))

    ema_config = ExtremaConfig(**{**tiny_config.to_diff_dict(), "target_centering": "ema", "target_center_momentum": 0.9})
    ema = ExtremaForPreTraining(ema_config)
    ema.load_state_dict(plain.state_dict(), strict=False)  # the centre starts at 0
    first = ema.train()(x).targets
    torch.testing.assert_close(first, raw)  # centred by the initial centre, 0
    torch.testing.assert_close(ema.target_center, 0.1 * raw.mean(0, keepdim=True))
    second = ema(x).targets
    torch.testing.assert_close(second, raw - 0.1 * raw.mean(0, keepdim=True))
    torch.testing.assert_close(ema.target_center, 0.19 * raw.mean(0, keepdim=True))
    ema.eval()(x)  # evaluation does not move the centre
    torch.testing.assert_close(ema.target_center, 0.19 * raw.mean(0, keepdim=True))
    assert "target_center" in ema.state_dict() and "target_center" not in plain.state_dict()  # saved and resumed


def test_batchnorm_heads_use_batch_statistics_in_both_branches(tiny_config):
    config = ExtremaConfig(**{**tiny_config.to_diff_dict(), "head_norm": "batchnorm"})
    torch.manual_seed(0)
    model = ExtremaForPreTraining(config).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 2 + 2 + 1 and not any(isinstance(m, torch.nn.LayerNorm) for m in model.predictor.modules())
    x = images(config, batch_size=4)
    out = model(x)
    out.loss.backward()
    assert all(p.grad is not None for p in model.predictor.parameters())
    # the teacher's projector normalises with the statistics of the batch it sees, like the student's (BYOL)
    features = model.teacher(x).pooler_output
    hidden = model.teacher_projector[0](features)
    torch.testing.assert_close(model.teacher_projector[1](hidden).mean(0), torch.zeros(hidden.shape[1]), atol=1e-5, rtol=0)
    # one set of statistics over all masked views of the step: (num_masks * B) rows normalised together
    assert model.student_projector[1].num_batches_tracked.item() == 1


# -------------------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_image_classification(tiny_config, pooling):
    config = ExtremaConfig(**{**tiny_config.to_diff_dict(), "classifier_pooling": pooling, "num_labels": 5})
    model = ExtremaForImageClassification(config)
    labels = torch.tensor([0, 3, 4])
    out = model(images(config), labels=labels)
    assert out.logits.shape == (3, 5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    soft = F.one_hot(labels, 5).float()
    torch.testing.assert_close(model(images(config), labels=soft).loss, out.loss)


def test_classifier_loads_a_pretrained_backbone(tiny_config, tmp_path):
    backbone = ExtremaModel(tiny_config)
    backbone.save_pretrained(tmp_path)
    classifier = ExtremaForImageClassification.from_pretrained(tmp_path, num_labels=4)
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(classifier.extrema.state_dict()[key], value, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ saving, loading


def test_save_and_load_round_trip_is_exact(tiny_config, tmp_path):
    model = ExtremaForPreTraining(tiny_config)
    with torch.no_grad():
        model.teacher.encoder.cls_token.add_(1.0)  # teacher != student, so a mix-up would show
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForPreTraining"] == (
        "modeling_extrema.ExtremaForPreTraining"
    )
    loaded = ExtremaForPreTraining.from_pretrained(tmp_path)
    for (key, value), loaded_value in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(value, loaded_value), key
    assert not any(p.requires_grad for p in loaded.teacher.parameters())
    x, noise = images(tiny_config), torch.rand(3, 16)
    torch.testing.assert_close(loaded.eval()(x, noise=noise).loss, model.eval()(x, noise=noise).loss, atol=0, rtol=0)


def test_auto_classes_resolve_extrema(tiny_config, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

    ExtremaModel(tiny_config).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ExtremaConfig)
    assert type(AutoModel.from_pretrained(tmp_path)) is ExtremaModel
    assert type(AutoModelForPreTraining.from_config(tiny_config)) is ExtremaForPreTraining
    assert type(AutoModelForImageClassification.from_config(tiny_config)) is ExtremaForImageClassification


def save_with_processor(config, path):
    from transformers import ViTImageProcessor

    model = ExtremaModel(config).eval()
    model.save_pretrained(path)
    size = {"height": config.image_size, "width": config.image_size}
    ViTImageProcessor(size=size, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return model


def test_remote_code_loads_without_the_project_on_the_path(tiny_config, tmp_path):
    model = save_with_processor(tiny_config, tmp_path / "model")
    x = images(tiny_config)
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, torch
assert not any('configuration_extrema' in m or 'modeling_extrema' in m for m in sys.modules)
from transformers import AutoModel, pipeline
model = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
with torch.no_grad():
    out = model(torch.load({str(tmp_path / 'x.pt')!r}))
torch.save(out.pooler_output, {str(tmp_path / 'pooled.pt')!r})
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # a fresh module cache
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "pooled.pt"), model(x).pooler_output)


def test_feature_extraction_pipeline(tiny_config, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    model = save_with_processor(tiny_config, tmp_path)
    image = Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy())
    extractor = pipeline("image-feature-extraction", model=str(tmp_path), trust_remote_code=True)
    features = torch.tensor(extractor(image, return_tensors=False))  # (1, 1 + N, D)
    pixel_values = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = model(pixel_values).last_hidden_state
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "divisible by num_attention_heads"),
        ({"image_size": 30}, "divisible by patch_size"),
        ({"mask_ratio": 1.0}, r"mask_ratio must be in \[0, 1\)"),
        ({"mask_ratio": -0.1}, r"mask_ratio must be in \[0, 1\)"),
        ({"num_masks": 5}, "disjoint masks"),
        ({"loss": "mse"}, "loss must be"),
        ({"head_norm": "groupnorm"}, "head_norm must be"),
        ({"target_centering": "mean"}, "target_centering must be"),
        ({"target_center_momentum": 1.0}, r"target_center_momentum must be in \[0, 1\)"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"num_hidden_layers": -2}, "num_hidden_layers must be a positive integer"),
        ({"hidden_size": 32.5}, "hidden_size must be a positive integer"),
        ({"num_masks": 0}, "num_masks must be a positive integer"),
        ({"infonce_temperature": 0.0}, "infonce_temperature must be greater than 0"),
        ({"drop_path_rate": float("nan")}, "drop_path_rate must be a finite number"),
    ],
)
def test_bad_config_raises_a_clear_error(tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        ExtremaConfig(**{**tiny_config.to_diff_dict(), **overrides})


def test_bad_inputs_raise_clear_errors(tiny_config):
    model = ExtremaModel(tiny_config)
    with pytest.raises(ValueError, match="convert grayscale"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(2, 3, 36, 36))
    with pytest.raises(ValueError, match="valid indices 0..15"):
        model(torch.randn(2, 3, 32, 32), ids_keep=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="ids_keep must have shape"):
        model(torch.randn(2, 3, 32, 32), ids_keep=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="Unknown ExtreMA preset"):
        ExtremaConfig.from_preset("vit-huge")


def test_presets():
    assert set(PRESETS) == {"tiny", "vit-tiny-patch16", "vit-small-patch16", "vit-base-patch16", "vit-large-patch16"}
    base = ExtremaConfig.from_preset("vit-base-patch16", num_masks=5)
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.num_masks) == (768, 12, 12, 5)
    assert (base.num_patches, base.num_visible_patches) == (196, 39)
    tiny = ExtremaConfig.from_preset("tiny")
    assert (tiny.image_size, tiny.patch_size) == (32, 4)
