"""ExtremaBackbone: feature maps of the ViT blocks for dense heads (transformers' UperNet), loading, remote code."""

import pytest
import torch

from _isolated import run_isolated
from modeling_extrema import ExtremaBackbone, ExtremaModel


@pytest.fixture
def config(tiny_config):
    tiny_config.num_hidden_layers = 3
    tiny_config.out_indices = [1, 2, 3]
    return tiny_config


def test_stages_name_the_embeddings_and_every_block(config):
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3"]
    assert config.out_features == ["stage1", "stage2", "stage3"]
    config.out_features = ["stem", "stage3"]
    assert config.out_indices == [0, 3]
    backbone = ExtremaBackbone(config)
    assert backbone.channels == [config.hidden_size] * 2
    with pytest.raises(ValueError, match="out_features must be a subset of stage_names"):
        config.out_features = ["stage4"]


def test_feature_maps_are_the_models_normalised_patch_tokens_as_images(config, tmp_path):
    """On a non-square input (positions interpolated), each map is the ExtremaModel's hidden state of that block
    after the final LayerNorm, laid out (B, D, H/p, W/p) with the patches row-major."""
    torch.manual_seed(0)
    model = ExtremaModel(config).eval()
    model.save_pretrained(tmp_path)
    backbone = ExtremaBackbone.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden_states = model(x, output_hidden_states=True).hidden_states
        out = backbone(x, output_hidden_states=True, output_attentions=True)
    assert [tuple(f.shape) for f in out.feature_maps] == [(2, config.hidden_size, 6, 8)] * 3
    for feature_map, index in zip(out.feature_maps, config.out_indices):
        expected = model.layernorm(hidden_states[index])  # (B, N, D)
        # the same float32 ops in another order (the backbone's own forward): a few ulps of values around 1
        torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.feature_maps[0][1, :, 2, 5], model.layernorm(hidden_states[1])[1, 2 * 8 + 5])
    assert len(out.hidden_states) == 4 and len(out.attentions) == 3
    assert all(a.shape == (2, config.num_attention_heads, 48, 48) for a in out.attentions)
    assert backbone(x).hidden_states is None


def test_upernet_trains_on_the_backbone(config):
    """transformers' UperNet builds the backbone from its config and back-propagates into every backbone weight."""
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    upernet_config = UperNetConfig(
        backbone_config=config, hidden_size=16, auxiliary_in_channels=config.hidden_size, auxiliary_channels=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(upernet_config)
    assert type(model.backbone) is ExtremaBackbone
    x = torch.randn(2, 3, 32, 48)
    labels = torch.randint(0, 3, (2, 32, 48))
    out = model(pixel_values=x, labels=labels)
    assert out.logits.shape == (2, 3, 32, 48)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    missing = [name for name, p in model.backbone.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_auto_backbone_loads_any_extrema_folder_as_remote_code(config, tmp_path):
    """A folder saved by ExtremaModel opens as a backbone with trust_remote_code where the project is not installed,
    with the same weights."""
    model = ExtremaModel(config).eval()
    model.save_pretrained(tmp_path / "model")
    x = torch.randn(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    result = run_isolated(
        f"""
        import torch
        import transformers.models.auto.auto_factory as auto_factory
        from transformers import AutoBackbone

        # transformers 5.24's AutoBackbone.from_pretrained asks the Hub whether the name is a repository and takes
        # anything else (a local folder too) for a timm model; a Hub repository needs no such help
        class LocalFolders:
            def repo_exists(self, name):
                return True
        auto_factory.hf_api = LocalFolders

        backbone = AutoBackbone.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(backbone).__module__.startswith("transformers_modules"), type(backbone).__module__
        assert type(backbone).__name__ == "ExtremaBackbone"
        with torch.no_grad():
            torch.save(backbone(torch.load("x.pt")).feature_maps, "maps.pt")
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    maps = torch.load(tmp_path / "maps.pt")
    with torch.no_grad():
        expected = ExtremaBackbone.from_pretrained(tmp_path / "model").eval()(x).feature_maps
    assert len(maps) == 3
    for actual, wanted in zip(maps, expected):
        torch.testing.assert_close(actual, wanted, atol=0, rtol=0)
