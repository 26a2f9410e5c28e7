"""export_extrema.py: the exported folder loads with AutoModel in a fresh process; the processor and the model card."""

import json
import os
import subprocess
import sys

import torch

import data_extrema as de  # the repository root is on sys.path (conftest.py)
from configuration_extrema import ExtremaConfig
from export_extrema import export_backbone
from modeling_extrema import ExtremaModel


def test_export_loads_with_automodel_in_a_fresh_process(tmp_path):
    from huggingface_hub import ModelCard

    torch.manual_seed(0)
    backbone = ExtremaModel(ExtremaConfig.from_preset("tiny")).eval()
    folder = export_backbone(
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
        "assert processor.crop_size == {'height': 32, 'width': 32}, processor.crop_size\n"
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
    assert result.stdout.split() == ["ExtremaModel", "BitImageProcessor"]
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
