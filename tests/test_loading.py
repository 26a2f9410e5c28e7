"""from_pretrained across the ExtreMA classes: a folder saved by any class loads into any other whose backbone it holds
(a pre-training folder gives its teacher, as the export does), or stops with a clear message; never a random backbone."""

import pytest
import torch

from modeling_extrema import ExtremaBackbone, ExtremaForImageClassification, ExtremaForPreTraining, ExtremaModel

CLASSES = (ExtremaModel, ExtremaForImageClassification, ExtremaForPreTraining, ExtremaBackbone)

# (saved by, loaded as) -> the message the load stops with; every other pair loads the backbone
REFUSED = {
    (ExtremaBackbone, ExtremaModel): "a backbone folder has no class-attention blocks; load it with AutoBackbone",
    (ExtremaBackbone, ExtremaForImageClassification): "a backbone folder has no class-attention blocks",
    (ExtremaBackbone, ExtremaForPreTraining): "a backbone folder has no class-attention blocks",
    (ExtremaForImageClassification, ExtremaForPreTraining): "pre-training needs a pre-training folder or a backbone",
}


def backbone_of(model) -> torch.nn.Module:
    """The backbone a model carries: the teacher of a pre-training model, the `extrema` of a classifier."""
    if isinstance(model, ExtremaForPreTraining):
        return model.teacher
    if isinstance(model, ExtremaForImageClassification):
        return model.extrema
    return model


@pytest.mark.parametrize("saved_by", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("loaded_as", CLASSES, ids=lambda c: c.__name__)
def test_every_class_loads_every_folder_or_says_why_not(tiny_config, tmp_path, saved_by, loaded_as):
    torch.manual_seed(0)
    source = saved_by(tiny_config)
    if isinstance(source, ExtremaForPreTraining):  # a trained teacher differs from its student
        with torch.no_grad():
            for parameter in source.teacher.parameters():
                parameter.add_(torch.randn_like(parameter))
    source.save_pretrained(tmp_path)

    if (saved_by, loaded_as) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[saved_by, loaded_as]) as error:
            loaded_as.from_pretrained(tmp_path)
        assert str(tmp_path) in str(error.value) and saved_by.__name__ in str(error.value)
        return

    model, info = loaded_as.from_pretrained(tmp_path, output_loading_info=True)
    expected = backbone_of(source).state_dict()
    loaded = backbone_of(model).state_dict()
    assert set(loaded) <= set(expected)  # a backbone has no class-attention blocks: the rest is all there
    for key, tensor in loaded.items():
        torch.testing.assert_close(tensor, expected[key], atol=0, rtol=0, msg=key)
    if isinstance(model, ExtremaForPreTraining):
        if saved_by is ExtremaForPreTraining:  # the student comes back as it was, not as the teacher
            torch.testing.assert_close(model.student.state_dict(), source.student.state_dict(), atol=0, rtol=0)
        else:  # a backbone starts both networks, as reset_teacher does at initialisation
            torch.testing.assert_close(model.student.state_dict(), model.teacher.state_dict(), atol=0, rtol=0)
        assert all(not p.requires_grad for p in model.teacher.parameters())
    heads = ("classifier.", "fc_norm.", "student_projector.", "teacher_projector.", "predictor.")
    assert not [key for key in info["missing_keys"] if not key.startswith(heads)]  # only fresh heads


def test_a_pre_training_folder_loads_its_teacher_without_a_report(tiny_config, tmp_path):
    """The student and the BYOL heads of a pre-training folder are dropped on purpose: nothing missing or unexpected
    (transformers prints a load report otherwise)."""
    ExtremaForPreTraining(tiny_config).save_pretrained(tmp_path)
    _, info = ExtremaModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_the_remote_code_loads_the_teacher_and_refuses_a_backbone_folder(tiny_config, tmp_path):
    """The same, through the folder's own code (trust_remote_code) in a process without this project."""
    from _isolated import run_isolated

    torch.manual_seed(0)
    pre_training = ExtremaForPreTraining(tiny_config)
    with torch.no_grad():
        pre_training.teacher.encoder.cls_token.add_(1.0)  # the teacher differs from the student
    pre_training.save_pretrained(tmp_path / "pre-training")
    ExtremaBackbone(tiny_config).save_pretrained(tmp_path / "backbone")
    torch.save(pre_training.teacher.state_dict(), tmp_path / "teacher.pt")
    result = run_isolated(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForImageClassification

        teacher = torch.load("teacher.pt")
        for auto in (AutoModel, AutoModelForImageClassification):
            model = auto.from_pretrained({str(tmp_path / "pre-training")!r}, trust_remote_code=True)
            backbone = getattr(model, "extrema", model)
            assert type(backbone).__module__.startswith("transformers_modules"), type(backbone).__module__
            for key, tensor in backbone.state_dict().items():
                assert torch.equal(tensor, teacher[key]), key
        try:
            AutoModel.from_pretrained({str(tmp_path / "backbone")!r}, trust_remote_code=True)
        except ValueError as error:
            print(error)
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "it was saved by ExtremaBackbone; a backbone folder has no class-attention blocks" in result.stdout
