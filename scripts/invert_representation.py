"""Invert the distributed representation of a masked image into pixels with a deep image prior (the paper's Figure 2).

    python scripts/invert_representation.py --model_name_or_path extrema-output/final \
        --image cat.jpg --mask_ratios 0.5 0.75 0.9 --output_dir eval/invert

For each masking ratio, a random mask hides that fraction of the patches and the backbone encodes the visible patches
only (as the student sees them in training): their output tokens are the target. A small convolutional generator
(Ulyanov et al., 2018) maps fixed noise to an image, and is optimised so that the same patches' tokens, computed from
the FULL generated image, match the target. The visible tokens of a full image depend on what the masked area holds
(through attention), so this fills the masked patches with what the model believes is there; no decoder is trained.
Writes inversion.png (rows: ratios; columns: original, masked, reconstruction) and results.json (feature loss before
and after, PSNR of the reconstruction on the visible and on the masked patches).
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from cli_extrema import AT_LEAST_1, ArgumentParser, FRACTION, POSITIVE
from _eval_common import (
    add_eval_args,
    add_image_args,
    denormalize,
    load_extrema,
    load_image,
    normalize,
    parse_checked,
    resize_panel,
    run,
    save_grid,
    write_results,
)
from data_extrema import build_eval_transform


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    add_image_args(parser)
    parser.add_argument("--mask_ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--num_steps", type=int, default=1000, help="optimisation steps of the generator")
    parser.add_argument("--learning_rate", type=float, default=0.01)
    parser.add_argument("--generator_channels", type=int, default=64)
    return parse_checked(parser, argv, FLAG_RANGES)


FLAG_RANGES = {
    "mask_ratios": FRACTION,  # 1.0 would leave no patch visible
    "num_steps": AT_LEAST_1,
    "learning_rate": POSITIVE,
    "generator_channels": AT_LEAST_1,
}


class Generator(nn.Module):
    """Deep-image-prior decoder: fixed noise at 1/8 of the image size, three (upsample, conv, BN, LeakyReLU) stages,
    a 1x1 convolution to RGB and a sigmoid, so that the output is an image in [0, 1]."""

    def __init__(self, image_size: int, channels: int = 64, noise_channels: int = 32):
        super().__init__()
        self.register_buffer("noise", torch.rand(1, noise_channels, max(1, image_size // 8), max(1, image_size // 8)))
        stages, in_channels = [], noise_channels
        for size in (image_size // 4, image_size // 2, image_size):
            stages += [
                nn.Upsample(size=(max(1, size), max(1, size)), mode="bilinear"),
                nn.Conv2d(in_channels, channels, 3, padding=1),
                nn.BatchNorm2d(channels),
                nn.LeakyReLU(0.2),
            ]
            in_channels = channels
        self.net = nn.Sequential(*stages, nn.Conv2d(channels, 3, 1), nn.Sigmoid())

    def forward(self) -> torch.Tensor:
        return self.net(self.noise)  # (1, 3, S, S) in [0, 1]


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR in dB between [0, 1] images where mask (1, 1, S, S) is 1."""
    mse = ((a - b) ** 2 * mask).sum() / (mask.sum() * a.shape[1]).clamp_min(1)
    return float(10 * torch.log10(1 / mse.clamp_min(1e-10)))


def invert(backbone, pixel_values: torch.Tensor, ids_keep: torch.Tensor, args) -> tuple[torch.Tensor, list[float]]:
    """Optimise a generator so that its image's tokens at ids_keep (K,) match the masked view's; returns the image in
    [0, 1] (1, 3, S, S) and the feature loss at every step."""
    with torch.no_grad():
        target = backbone(pixel_values, ids_keep=ids_keep[None]).last_hidden_state[:, 1:]  # (1, K, D)
    generator = Generator(pixel_values.shape[-1], args.generator_channels).to(pixel_values.device)
    optimizer = torch.optim.Adam(generator.parameters(), lr=args.learning_rate)
    losses = []
    for _ in tqdm(range(args.num_steps), desc="invert", leave=False):
        tokens = backbone(normalize(generator())).last_hidden_state[:, 1:]  # (1, N, D): the full generated image
        loss = F.mse_loss(tokens[:, ids_keep], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    generator.eval()
    with torch.no_grad():
        return generator(), losses


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    device = Accelerator().device
    backbone = load_extrema(args.model_name_or_path, args.trust_remote_code).to(device)
    backbone.requires_grad_(False)  # only the generator learns
    config = backbone.config
    pixel_values = build_eval_transform(config.image_size)(load_image(args))[None].to(device)  # (1, 3, S, S)
    original = denormalize(pixel_values)
    grid, patch = config.image_size // config.patch_size, config.patch_size

    panels, captions, per_ratio = [], [], []
    for ratio in args.mask_ratios:
        num_visible = max(1, int(grid * grid * (1 - ratio)))  # the model's rounding (39 of 196 at 80%)
        noise = torch.rand(grid * grid, generator=torch.Generator().manual_seed(args.seed))
        ids_keep = torch.argsort(noise)[:num_visible].to(device)  # (K,) visible patches, row-major
        visible = torch.zeros(grid * grid, device=device)
        visible[ids_keep] = 1
        visible = visible.view(1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # (1,1,S,S)

        reconstruction, losses = invert(backbone, pixel_values, ids_keep, args)
        masked = original * visible + 0.5 * (1 - visible)  # hidden patches grey
        panels += [resize_panel(image[0].cpu(), args.panel_size) for image in (original, masked, reconstruction)]
        per_ratio.append(
            {
                "mask_ratio": ratio,
                "num_visible": num_visible,
                "feature_loss_first_step": losses[0],
                "feature_loss_last_step": losses[-1],
                "psnr_visible": psnr(reconstruction, original, visible),
                "psnr_masked": psnr(reconstruction, original, 1 - visible),
            }
        )
        captions += [
            "original",
            f"masked {ratio:.0%}: {num_visible} of {grid * grid} patches visible",
            f"reconstruction: PSNR {per_ratio[-1]['psnr_visible']:.1f} dB on the visible patches, "
            f"{per_ratio[-1]['psnr_masked']:.1f} dB on the masked",
        ]

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    width, height = save_grid(
        panels,
        output_dir / "inversion.png",
        ncols=3,
        title="Inversion of the distributed representation: an image optimised (deep image prior, "
        f"{args.num_steps} steps) so that its patch tokens match those of the masked view; one row per masking ratio",
        captions=captions,
        legend=[
            ((0.5, 0.5, 0.5), "grey: patches hidden from the model (it encoded the visible patches only)"),
            (None, "reconstruction: no decoder was trained; the masked area shows what the visible tokens imply"),
        ],
    )
    results = {
        "model": str(args.model_name_or_path),
        "num_steps": args.num_steps,
        "ratios": per_ratio,
        "png": str(output_dir / "inversion.png"),
        "png_size": [width, height],
    }
    write_results(output_dir, results)
    return results


if __name__ == "__main__":
    run(main)
