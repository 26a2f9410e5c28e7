"""Attention maps of an ExtreMA backbone (the paper's Figures 1 and 9).

    python scripts/visualize_attention.py --model_name_or_path extrema-output/final \
        --image cat.jpg --output_dir eval/attention

For a few query patches, the attention that each query pays to every patch in the LAST self-attention layer,
averaged over heads, and the attention of the class token in the last class-attention block (over the patches). They
are drawn over the image in one row: the image with the query patches framed in their colours, one map per query
(framed in the query's colour), then the class-attention map. Patch tokens of a model trained with ExtreMA attend to
semantically related patches although no token-level objective trained them (Figure 1). Writes attention.png and
results.json (the query patches and every map, rows summing to 1).
"""

import argparse
from pathlib import Path

import torch
from accelerate.utils import set_seed

from cli_extrema import ArgumentParser
from _eval_common import (
    COLORS,
    UsageError,
    add_eval_args,
    add_image_args,
    denormalize,
    draw_box,
    frame,
    load_extrema,
    load_image,
    overlay,
    parse_checked,
    resize_panel,
    run,
    save_grid,
    write_results,
)
from data_extrema import build_eval_transform

CLASS_COLOR = (1.0, 1.0, 0.0)  # yellow: the class-attention map


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    add_image_args(parser)
    parser.add_argument(
        "--queries",
        nargs="+",
        default=["0.3,0.3", "0.7,0.3", "0.3,0.7", "0.7,0.7"],
        help="query points as x,y fractions of the image width and height (default: four points)",
    )
    return parse_checked(parser, argv)


def query_patches(queries: list[str], grid_size: int) -> list[int]:
    """Row-major patch indices of "x,y" points given as fractions of the image in [0, 1]."""
    patches = []
    for query in queries:
        try:
            x, y = (float(v) for v in query.split(","))
        except ValueError:
            raise UsageError(f"--queries takes points as x,y fractions such as 0.25,0.5; got {query!r}.") from None
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise UsageError(f"Query point {query!r} is outside the image; use fractions in [0, 1].")
        column, row = min(int(x * grid_size), grid_size - 1), min(int(y * grid_size), grid_size - 1)
        patches.append(row * grid_size + column)
    return patches


@torch.no_grad()
def attention_maps(backbone, pixel_values: torch.Tensor, patches: list[int]):
    """Head-averaged maps of one image (1, 3, S, S): (query maps (Q, h, w), class-attention map (h, w))."""
    config = backbone.config
    grid = pixel_values.shape[-1] // config.patch_size
    outputs = backbone(pixel_values, output_attentions=True)
    last_self = outputs.attentions[-1][0].mean(0)  # (heads, N, N) -> (N, N)
    last_class = outputs.class_attentions[-1][0].mean(0)[0, 1:]  # (heads, 1, 1 + N) -> (N,): patches, not the cls key
    return last_self[patches].reshape(len(patches), grid, grid), last_class.reshape(grid, grid)


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    backbone = load_extrema(args.model_name_or_path, args.trust_remote_code)
    config = backbone.config
    pixel_values = build_eval_transform(config.image_size)(load_image(args))[None]  # (1, 3, S, S)
    grid = config.image_size // config.patch_size
    patches = query_patches(args.queries, grid)
    query_maps, class_map = attention_maps(backbone, pixel_values, patches)

    # One row: [image with framed queries] [one map per query] [class attention]
    size = args.panel_size
    image = resize_panel(denormalize(pixel_values[0]), size)
    cell = size / grid
    marked, maps = image, []
    for i, (patch, query_map) in enumerate(zip(patches, query_maps)):
        color = COLORS[i % len(COLORS)]
        row, column = divmod(patch, grid)
        marked = draw_box(marked, (column * cell, row * cell, (column + 1) * cell, (row + 1) * cell), color)
        maps.append(frame(overlay(image, query_map, color), color))
    panels = [marked, *maps, overlay(image, class_map, CLASS_COLOR)]
    captions = [
        "the image, query patches framed",
        *[f"query {i + 1} at {query}: where its patch attends" for i, query in enumerate(args.queries)],
        "class token: where it attends",
    ]
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    width, height = save_grid(
        panels,
        output_dir / "attention.png",
        ncols=len(panels),
        title=f"Attention in the last self-attention layer (layer {config.num_hidden_layers} of "
        f"{config.num_hidden_layers}) and the last class-attention block, averaged over {config.num_attention_heads} "
        "heads",
        captions=captions,
        legend=[
            *[(COLORS[i % len(COLORS)], f"query {i + 1}: the patch at {query} (x, y as fractions of the image)")
              for i, query in enumerate(args.queries)],
            (CLASS_COLOR, "the class token's attention over the patches (the instance representation's pooling)"),
            (None, "stronger colour = more attention; each map is rescaled from its own minimum to its maximum"),
        ],
    )  # fmt: skip

    results = {
        "model": str(args.model_name_or_path),
        "image": args.image or f"{args.dataset_name or args.train_dir}[{args.train_split}][{args.image_index}]",
        "grid_size": grid,
        "query_patches": patches,
        "layer": config.num_hidden_layers - 1,
        "query_attention": query_maps.tolist(),  # (Q, h, w), each sums to 1
        "class_attention": class_map.tolist(),  # (h, w), sums to 1 minus the class token's attention to itself
        "png": str(output_dir / "attention.png"),
        "png_size": [width, height],
    }
    write_results(output_dir, results)
    return results


if __name__ == "__main__":
    run(main)
