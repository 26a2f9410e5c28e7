"""scripts/export_onnx.py: the backbone through ONNX (onnxruntime) and torch.export, with a dynamic batch size, gives
PyTorch's pooler_output and last_hidden_state (float32, max abs difference <= 1e-4)."""

import sys

import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))

onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra: pip install -e '.[onnx]'")

import export_onnx  # noqa: E402
from modeling_extrema import ExtremaForPreTraining, ExtremaModel  # noqa: E402


def test_onnx_and_torch_export_of_a_saved_folder_match_pytorch(tiny_config, tmp_path, capsys):
    """The command exports the backbone of a pre-training folder (its teacher); onnxruntime and the torch.export
    program take any batch size and give the teacher's outputs."""
    torch.manual_seed(0)
    ExtremaForPreTraining(tiny_config).save_pretrained(tmp_path / "model")
    teacher = ExtremaModel.from_pretrained(tmp_path / "model").eval()
    export_onnx.main(
        ["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out"), "--torch_export"]
    )
    assert "max abs difference" in capsys.readouterr().out

    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    (batch_dim, *image_dims) = session.get_inputs()[0].shape
    assert isinstance(batch_dim, str) and image_dims == [3, tiny_config.image_size, tiny_config.image_size]
    program = torch.export.load(str(tmp_path / "out" / "model.pt2")).module()
    for batch_size in (1, 4):
        x = torch.randn(batch_size, 3, tiny_config.image_size, tiny_config.image_size)
        with torch.no_grad():
            expected = teacher(x)
            exported = program(x)
        last_hidden_state, pooler_output = session.run(
            ["last_hidden_state", "pooler_output"], {"pixel_values": x.numpy()}
        )
        for actual in ((torch.from_numpy(last_hidden_state), torch.from_numpy(pooler_output)), exported):
            assert actual[0].shape == (batch_size, 1 + tiny_config.num_patches, tiny_config.hidden_size)
            torch.testing.assert_close(actual[0], expected.last_hidden_state, atol=1e-4, rtol=0)
            torch.testing.assert_close(actual[1], expected.pooler_output, atol=1e-4, rtol=0)
