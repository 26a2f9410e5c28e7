"""Is the instance representation sensitive to where and how large a crop is? (The paper's Figure 3.)

    python scripts/locality_retrieval.py --model_name_or_path extrema-output/final \
        --image cat.jpg --output_dir eval/locality

A gallery of 25 square boxes (5 scales x 5 random locations) is cut from one image and every crop is resized to the
model's input size. A query crop is ranked against the gallery by cosine similarity of the instance representations
(`pooler_output`). By default the query is a gallery box shifted by --query_jitter of its side, so the right answer
is known; --query_image (or --query_image_index) with --query_box takes the query from another image instead, as in
the paper (an image of the same category). Writes locality.png (top row: query, image with the query box in red and
the top match in green, the top-match crop; then the gallery, one scale per row, top match framed green, the box the
query came from red) and results.json (the ranking, the top match and the rank of the query's own box).
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torchvision.transforms import v2

from cli_extrema import AT_LEAST_0, AT_LEAST_1, ArgumentParser, OPEN_UNIT
from _eval_common import (
    UsageError,
    add_eval_args,
    add_image_args,
    draw_box,
    frame,
    image_stream,
    load_extrema,
    load_image,
    normalize,
    parse_checked,
    read_image_file,
    resize_panel,
    run,
    save_grid,
    write_results,
)

GREEN, RED = (0.1, 0.85, 0.1), (1.0, 0.1, 0.1)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    add_image_args(parser)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.3, 0.45, 0.6, 0.75, 0.9],
                        help="box sides as fractions of the image's shorter side")  # fmt: skip
    parser.add_argument("--num_locations", type=int, default=5, help="random boxes per scale")
    parser.add_argument("--query_box_index", type=int, default=12, help="gallery box the default query comes from")
    parser.add_argument("--query_jitter", type=float, default=0.1, help="shift of the default query, x box side")
    parser.add_argument("--query_image", help="take the query from this image file instead")
    parser.add_argument("--query_image_index", type=int, help="... or from this image of --train_split")
    parser.add_argument("--query_box", help="x0,y0,x1,y1 fractions of the query image (default: all of it)")
    return parse_checked(parser, argv, FLAG_RANGES)


FLAG_RANGES = {
    "scales": OPEN_UNIT,  # a box side larger than the image does not fit in it
    "num_locations": AT_LEAST_1,
    "query_box_index": AT_LEAST_0,
    "query_jitter": AT_LEAST_0,
    "query_image_index": AT_LEAST_0,
}


def sample_boxes(width: int, height: int, scales, num_locations: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Square boxes (x0, y0, x1, y1) in pixels: `num_locations` uniformly placed boxes per scale, scale-major."""
    generator = torch.Generator().manual_seed(seed)
    boxes = []
    for scale in scales:
        side = max(1, round(scale * min(width, height)))
        for _ in range(num_locations):
            x0 = int(torch.randint(0, width - side + 1, (1,), generator=generator))
            y0 = int(torch.randint(0, height - side + 1, (1,), generator=generator))
            boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


def crops_to_inputs(image: torch.Tensor, boxes, size: int) -> torch.Tensor:
    """Each box of a uint8 image (3, H, W), resized to size x size and normalised: (len(boxes), 3, size, size)."""
    crops = [v2.functional.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [size, size], antialias=True)
             for x0, y0, x1, y1 in boxes]  # fmt: skip
    return normalize(v2.functional.to_dtype(torch.stack(crops), torch.float32, scale=True))


def crop_panel(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """A box of a uint8 image as a (3, size, size) picture in [0, 1]."""
    x0, y0, x1, y1 = box
    return resize_panel(v2.functional.to_dtype(image[:, y0:y1, x0:x1], torch.float32, scale=True), size)


def iou(a, b) -> float:
    overlap_w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    overlap_h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    overlap = overlap_w * overlap_h
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return overlap / (area_a + area_b - overlap)


def query_crop(args, image: torch.Tensor, boxes):
    """(query image (3, H, W) uint8, query box in its pixels, index of the gallery box it came from or None)."""
    if args.query_image or args.query_image_index is not None:
        if args.query_image:
            query_image = v2.functional.to_image(read_image_file(args.query_image, "--query_image"))
        else:
            row = next(iter(image_stream(args, args.train_split).skip(args.query_image_index).take(1)), None)
            if row is None:
                raise UsageError(f"--query_image_index {args.query_image_index} is past the end of the split.")
            query_image = v2.functional.to_image(row["image"])
        height, width = query_image.shape[-2:]
        fractions = [float(v) for v in args.query_box.split(",")] if args.query_box else [0, 0, 1, 1]
        if len(fractions) != 4 or not (0 <= fractions[0] < fractions[2] <= 1 and 0 <= fractions[1] < fractions[3] <= 1):
            raise UsageError(f"--query_box takes x0,y0,x1,y1 fractions with x0 < x1 and y0 < y1; got {args.query_box}.")
        box = (round(fractions[0] * width), round(fractions[1] * height), round(fractions[2] * width),
               round(fractions[3] * height))  # fmt: skip
        return query_image, box, None
    if not 0 <= args.query_box_index < len(boxes):
        raise UsageError(
            f"--query_box_index {args.query_box_index} is past the {len(boxes)} gallery boxes (--scales: "
            f"{len(args.scales)} x --num_locations {args.num_locations}); pick one in [0, {len(boxes) - 1}]."
        )
    # the source box moved by `jitter` of its side along x and y, kept inside the image
    x0, y0, x1, y1 = boxes[args.query_box_index]
    height, width = image.shape[-2:]
    shift = round(args.query_jitter * (x1 - x0))
    dx = min(shift, width - x1) if x0 < width - x1 else -min(shift, x0)
    dy = min(shift, height - y1) if y0 < height - y1 else -min(shift, y0)
    return image, (x0 + dx, y0 + dy, x1 + dx, y1 + dy), args.query_box_index


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    backbone = load_extrema(args.model_name_or_path, args.trust_remote_code)
    size = backbone.config.image_size
    image = v2.functional.to_image(load_image(args))  # (3, H, W) uint8
    height, width = image.shape[-2:]
    boxes = sample_boxes(width, height, args.scales, args.num_locations, args.seed)
    query_image, query_box, source = query_crop(args, image, boxes)

    with torch.no_grad():
        gallery = backbone(crops_to_inputs(image, boxes, size)).pooler_output  # (G, D)
        query = backbone(crops_to_inputs(query_image, [query_box], size)).pooler_output  # (1, D)
    similarity = F.cosine_similarity(query, gallery, dim=1)  # (G,)
    ranking = similarity.argsort(descending=True).tolist()
    top = ranking[0]

    # Pictures: [query | image with boxes | top match | blanks], then the gallery, one scale per row
    panel, columns = args.panel_size, max(args.num_locations, 3)
    blank = torch.ones(3, panel, panel)
    whole = crop_panel(image, (0, 0, width, height), panel)

    def to_whole(box):  # image pixels -> pixels of the whole-image panel
        return [v * panel / side for v, side in zip(box, (width, height, width, height))]

    if query_image is image:
        whole = draw_box(whole, to_whole(query_box), RED)
    whole = draw_box(whole, to_whole(boxes[top]), GREEN)
    panels = [
        frame(crop_panel(query_image, query_box, panel), RED),
        whole,
        frame(crop_panel(image, boxes[top], panel), GREEN),
        *[blank] * (columns - 3),
    ]
    rank = {index: position + 1 for position, index in enumerate(ranking)}
    if source is not None:
        query_caption = f"query: box {source} shifted by {args.query_jitter:g} of its side"
        red = f"red: the query (its box on the image) and gallery box {source}, which it was cut from"
    else:
        query_caption, red = "query: a crop of another image", "red: the query, a crop of another image"
    captions = [
        query_caption,
        "the image: query box red, top match green" if source is not None else "the image: top match green",
        f"top match: box {top}, cosine {similarity[top]:.3f}",
        *[""] * (columns - 3),
    ]
    for i, box in enumerate(boxes):
        crop = crop_panel(image, box, panel)
        if i == top:
            crop = frame(crop, GREEN)
        elif i == source:
            crop = frame(crop, RED)
        panels.append(crop)
        side = args.scales[i // args.num_locations]
        captions.append(f"box {i}, side {side:g}: cosine {similarity[i]:.3f}, rank {rank[i]}")
        if (i + 1) % args.num_locations == 0:
            panels += [blank] * (columns - args.num_locations)
            captions += [""] * (columns - args.num_locations)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    png_width, png_height = save_grid(
        panels,
        output_dir / "locality.png",
        ncols=columns,
        title=f"Which crop of the image is nearest the query? {len(boxes)} gallery crops ranked by the cosine "
        "similarity of their instance representation (pooler_output) to the query's",
        captions=captions,
        legend=[
            (RED, red),
            (GREEN, "green: the top match (its box on the image), the gallery crop most similar to the query"),
            (None, f"rows 2-{len(args.scales) + 1}: the gallery, one box side per row ("
             + ", ".join(f"{scale:g}" for scale in args.scales) + f" of the image's shorter side), "
             f"{args.num_locations} random places each; rank 1 = most similar to the query"),
        ],
    )  # fmt: skip

    results = {
        "model": str(args.model_name_or_path),
        "image_size": [width, height],
        "gallery_boxes": boxes,
        "query_box": list(query_box),
        "query_source_index": source,
        "similarities": similarity.tolist(),
        "ranking": ranking,
        "top_match_index": top,
        "top_match_box": list(boxes[top]),
        "top_match_scale": args.scales[top // args.num_locations],
        "source_rank": ranking.index(source) + 1 if source is not None else None,
        "top_match_iou_with_query": iou(boxes[top], query_box) if query_image is image else None,
        "png": str(output_dir / "locality.png"),
        "png_size": [png_width, png_height],
    }
    write_results(output_dir, results)
    return results


if __name__ == "__main__":
    run(main)
