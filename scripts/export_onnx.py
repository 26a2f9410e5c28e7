"""Export an ExtreMA backbone for deployment: ONNX (run by onnxruntime) and torch.export, with a dynamic batch size.

    pip install -e ".[onnx]"
    python scripts/export_onnx.py --model_name_or_path extrema-output/final --output_dir extrema-onnx

writes <output_dir>/model.onnx (input `pixel_values` (batch, 3, S, S); outputs `last_hidden_state`
(batch, 1 + N, D) and `pooler_output` (batch, D), as `ExtremaModel` returns them), checks it with onnxruntime against
PyTorch on random images of two batch sizes, and prints the largest difference. `--torch_export` also writes
<output_dir>/model.pt2 (`torch.export.save`; load it with `torch.export.load(path).module()`). Any saved ExtreMA folder
works: a pre-training folder exports its teacher, a classifier its backbone. Feed the model what the folder's image
processor produces (`AutoImageProcessor.from_pretrained(folder)`); the input size is fixed to the config's image_size.
"""

import argparse
from pathlib import Path

import torch

from _eval_common import UsageError, add_model_args, load_extrema, run
from cli_extrema import ArgumentParser, prepare_output_dir

OUTPUT_NAMES = ("last_hidden_state", "pooler_output")


class BackboneOutputs(torch.nn.Module):
    """The backbone as a function of pixel_values alone with plain tensor outputs, the form exporters trace."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.backbone(pixel_values, return_dict=True)
        return outputs.last_hidden_state, outputs.pooler_output


def example_inputs(config, batch_size: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)


def dynamic_batch():
    return {"pixel_values": {0: torch.export.Dim("batch", min=1, max=4096)}}


def export_program(backbone) -> torch.export.ExportedProgram:
    """`torch.export` of the backbone (eval mode) with a dynamic batch size; outputs as in `BackboneOutputs`."""
    module = BackboneOutputs(backbone).eval()
    return torch.export.export(module, (example_inputs(backbone.config),), dynamic_shapes=dynamic_batch())


def export_onnx(backbone, path) -> Path:
    """Write the backbone (eval mode) as an ONNX model with a dynamic batch size (torch.onnx's dynamo exporter)."""
    module = BackboneOutputs(backbone).eval()
    torch.onnx.export(
        module,
        (example_inputs(backbone.config),),
        str(path),
        input_names=["pixel_values"],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=dynamic_batch(),
        dynamo=True,
        verbose=False,
    )
    return Path(path)


@torch.no_grad()
def onnx_max_difference(backbone, path, batch_sizes=(1, 3)) -> dict[str, float]:
    """The largest absolute difference between onnxruntime's outputs and PyTorch's, per output, over random images
    of each batch size."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    differences = dict.fromkeys(OUTPUT_NAMES, 0.0)
    for batch_size in batch_sizes:
        pixel_values = example_inputs(backbone.config, batch_size)
        expected = BackboneOutputs(backbone).eval()(pixel_values)
        actual = session.run(list(OUTPUT_NAMES), {"pixel_values": pixel_values.numpy()})
        for name, ours, theirs in zip(OUTPUT_NAMES, expected, actual):
            differences[name] = max(differences[name], (ours - torch.from_numpy(theirs)).abs().max().item())
    return differences


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--output_dir", required=True, help="model.onnx (and model.pt2) are written here")
    parser.add_argument("--torch_export", action="store_true", help="also write a torch.export program, model.pt2")
    args = parser.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise UsageError(f"ONNX export needs onnx, onnxscript and onnxruntime ({error}): pip install -e '.[onnx]'.")
    prepare_output_dir(args.output_dir)
    return args


def main(argv=None):
    args = parse_args(argv)
    backbone = load_extrema(args.model_name_or_path, args.trust_remote_code).float().eval()
    output_dir = Path(args.output_dir)
    path = export_onnx(backbone, output_dir / "model.onnx")
    differences = onnx_max_difference(backbone, path)
    print(f"Wrote {path}; onnxruntime vs PyTorch, max abs difference: {differences}")
    if args.torch_export:
        program_path = output_dir / "model.pt2"
        torch.export.save(export_program(backbone), str(program_path))
        print(f"Wrote {program_path}")


if __name__ == "__main__":
    run(main)
