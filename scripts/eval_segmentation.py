"""Semantic segmentation with UperNet on an ExtreMA backbone (the paper's Table 9: ADE20K, BEiT's protocol).

    python scripts/eval_segmentation.py --model_name_or_path extrema-output/final --train_dir data/ade20k-parquet \
        --reduce_labels --num_labels 150 --image_size 512 --output_dir eval/ade20k
    python scripts/eval_segmentation.py ... --resume_from_checkpoint latest     # continue a stopped run exactly

transformers' `UperNetForSemanticSegmentation` over `ExtremaBackbone` (`ExtremaForSemanticSegmentation`), trained as
the paper does: AdamW, lr 1e-4, batch 16, weight decay 0.05, layer-wise lr decay 0.85, 80k iterations, linear
warm-up (1500 iterations, BEiT's) then a poly schedule, auxiliary head weighted 0.4. The data stream through
`datasets` from any segmentation dataset with an image column and an annotation column (an image of class indices;
scene_parse_150's `image` / `annotation` by default); training crops: random resized crops of --image_size and
flips, applied to image and mask alike; evaluation: both resized to --image_size. The report: mIoU (the mean IoU over
the classes present in the predictions or the annotations) and pixel accuracy, over the validation split. The model
is saved to <output_dir>/model with its image processor: it loads with `AutoModelForSemanticSegmentation` and
`pipeline("image-segmentation")` (trust_remote_code=True).

The run saves its full state every --checkpointing_steps iterations, atomically, and on SIGTERM / Ctrl-C;
--resume_from_checkpoint continues it exactly (an image's crop is drawn from (seed, epoch, its pixels), a step's drop
path from (seed, step)). It evaluates every --eval_every_steps iterations, logs to --report_to and shows a progress
bar, as the fine-tuning script does.

Differences from the paper, kept simple here: the backbone's feature maps are all at the patch grid's scale (BEiT
adds deconvolutions for a 4-scale pyramid), and evaluation is at --image_size, not sliding windows over the full
image.
"""

import argparse
import copy
import io
import math
import re
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate.utils import set_seed
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm.auto import tqdm

from cli_extrema import AT_LEAST_0, AT_LEAST_1, ArgumentParser, FRACTION, OPEN_UNIT, POSITIVE
from _eval_common import (
    RUN_RANGES,
    EvalHistory,
    SeededTransform,
    UsageError,
    add_eval_args,
    add_run_args,
    check_run_args,
    checkpoint_interval,
    layer_decay_param_groups,
    load_extrema,
    parse_checked,
    run_accelerator,
    resolve_validation_split,
    run,
    step_seed,
    stop_on_signal,
    write_results,
)
from transformers import SegformerImageProcessor, get_polynomial_decay_schedule_with_warmup

import modeling_extrema
from data_extrema import IMAGENET_MEAN, IMAGENET_STD, StreamPosition, decode_image, load_raw_stream, open_dataset
from train_extrema import StopSignals, resume, save_checkpoint


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser, batch_size=16)
    parser.set_defaults(image_column="image", label_column="annotation")
    group = parser.add_argument_group("segmentation (defaults: the paper's Table 9)")
    group.add_argument("--num_labels", type=int, default=150, help="classes (ADE20K: 150, with --reduce_labels)")
    group.add_argument(
        "--reduce_labels", action="store_true",
        help="annotation 0 is 'other' (ignored) and class k is k - 1, as in ADE20K's scene_parse_150",
    )  # fmt: skip
    group.add_argument("--ignore_index", type=int, default=255, help="annotation value left out of loss and metrics")
    group.add_argument("--image_size", type=int, help="training crop and evaluation size (default: the backbone's)")
    group.add_argument("--max_train_steps", type=int, default=80_000, help="iterations")
    group.add_argument("--learning_rate", type=float, default=1e-4)
    group.add_argument("--weight_decay", type=float, default=0.05)
    group.add_argument("--layer_decay", type=float, default=0.85)
    group.add_argument("--warmup_steps", type=int, default=1500)
    group.add_argument("--drop_path_rate", type=float, default=0.1)
    group.add_argument("--decoder_hidden_size", type=int, default=512, help="UperNet's channels")
    group.add_argument("--mixed_precision", choices=("auto", "no", "bf16", "fp16"), default="auto")
    group = add_run_args(parser, checkpointing_steps="2000")
    group.add_argument("--eval_every_steps", type=int, default=0, help="evaluate every N steps (0: at the end)")
    return parse_checked(parser, argv, FLAG_RANGES, check=lambda args: check_run_args(args, choices=("no",)))


FLAG_RANGES = {
    "num_labels": AT_LEAST_1,
    "max_train_steps": AT_LEAST_1,
    "learning_rate": POSITIVE,
    "weight_decay": AT_LEAST_0,
    "layer_decay": OPEN_UNIT,
    "warmup_steps": AT_LEAST_0,
    "drop_path_rate": FRACTION,
    "decoder_hidden_size": AT_LEAST_1,
    "eval_every_steps": AT_LEAST_0,
    "image_size": AT_LEAST_1,
    **RUN_RANGES,
}


# ----------------------------------------------------------------------------------------------------------------
# Data: (image, mask) pairs streamed from any split with an image and an annotation column


class SegmentationExample:
    """A raw row {"image", "label": annotation} -> {"pixel_values" (3, S, S), "labels" (S, S) long}; None when the
    image cannot be decoded. `joint` transforms image and mask alike (torchvision v2 resizes masks with nearest); a
    random one is drawn from (seed, epoch, the image's bytes) (`SeededTransform`), so a resumed run crops as the
    uninterrupted one does."""

    def __init__(self, joint, reduce_labels: bool, ignore_index: int, seed: int = 0):
        self.joint = SeededTransform(joint, seed, key=lambda image, mask: image.numpy().tobytes())
        self.reduce_labels, self.ignore_index = reduce_labels, ignore_index
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, row):
        image, annotation = decode_image(row["image"]), row["label"]
        if image is None or annotation is None:
            return {"pixel_values": None, "labels": None}
        mask = annotation_array(annotation)
        if self.reduce_labels:  # 0 ("other") is ignored, classes 1..K become 0..K-1
            mask = np.where(mask == 0, self.ignore_index, mask - 1)
        image, mask = self.joint(v2.functional.to_image(image), tv_tensors.Mask(torch.from_numpy(mask)[None]))
        return {"pixel_values": self.normalize(image), "labels": mask[0].long()}


def annotation_array(annotation) -> np.ndarray:
    """An annotation cell (PIL image of class indices, or an undecoded {"bytes", "path"} cell) as an (H, W) array."""
    if isinstance(annotation, dict):
        annotation = PIL.Image.open(io.BytesIO(annotation["bytes"]) if annotation.get("bytes") else annotation["path"])
    array = np.asarray(annotation, dtype=np.int64)  # mode L / P / I: the class indices themselves
    return array[..., 0] if array.ndim == 3 else array  # an index map stored as RGB: every channel holds the class


def _has_pixels(row) -> bool:
    return row["pixel_values"] is not None


def segmentation_loader(args, builder, split, example: SegmentationExample, shuffle: bool, max_samples=None):
    """Batches {"pixel_values" (B, 3, S, S), "labels" (B, S, S)} of a split, each row made by `example`."""
    stream = load_raw_stream(builder, split, args.image_column, args.label_column)
    if "label" not in (stream.column_names or ["label"]):
        raise UsageError(f"The split {split!r} has no annotation column; name it with --label_column.")
    if max_samples is not None:
        stream = stream.take(max_samples)
    if shuffle:
        stream = stream.shuffle(seed=args.seed, buffer_size=max(1, args.shuffle_buffer_size), max_buffer_input_shards=1)
    stream = stream.map(example, remove_columns=["image", "label"]).filter(_has_pixels)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=args.batch_size,
        num_workers=min(args.num_workers, stream.num_shards),
        generator=torch.Generator().manual_seed(args.seed),
    )


# ----------------------------------------------------------------------------------------------------------------
# Model: UperNet on the backbone's weights


def default_out_indices(num_layers: int) -> list[int]:
    """Four blocks spread over the depth, the last included (BEiT takes blocks 4, 6, 8, 12 of 12); every stage,
    the patch embeddings (0) included, for networks of fewer than four blocks."""
    if num_layers < 4:
        return list(range(num_layers + 1))
    return [round(num_layers * k / 4) for k in (1, 2, 3, 4)]


def build_segmenter(backbone, args) -> "modeling_extrema.ExtremaForSemanticSegmentation":
    """`ExtremaForSemanticSegmentation` whose backbone holds `backbone`'s weights (the class-attention blocks, which
    never change the patch tokens, are left out); UperNet's heads are new."""
    module = sys.modules[type(backbone).__module__]  # a Hub model's own remote code, when it has the class
    segmenter_class = getattr(module, "ExtremaForSemanticSegmentation", modeling_extrema.ExtremaForSemanticSegmentation)
    config_class = segmenter_class.config_class
    backbone_config = copy.deepcopy(backbone.config)
    backbone_config.drop_path_rate = args.drop_path_rate
    backbone_config.out_indices = default_out_indices(backbone_config.num_hidden_layers)
    config = config_class(
        backbone_config=backbone_config,
        hidden_size=args.decoder_hidden_size,
        auxiliary_in_channels=backbone_config.hidden_size,
        auxiliary_channels=max(1, args.decoder_hidden_size // 2),
        num_labels=args.num_labels,
        loss_ignore_index=args.ignore_index,
        use_auxiliary_head=len(backbone_config.out_indices) >= 3,  # UperNet's auxiliary head reads the third map
    )
    model = segmenter_class(config)
    incompatible = model.backbone.load_state_dict(backbone.state_dict(), strict=False)
    class_attention = r"encoder\.(cls_token|class_attention)"
    unexpected = [key for key in incompatible.unexpected_keys if not re.match(class_attention, key)]
    if incompatible.missing_keys or unexpected:
        raise UsageError(
            f"The backbone's weights do not fit: missing {incompatible.missing_keys}, unexpected {unexpected}."
        )
    return model


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int, ignore_index: int):
    """(num_labels, num_labels) counts: row = annotated class, column = predicted class; ignored pixels left out."""
    keep = labels != ignore_index
    index = labels[keep] * num_labels + predictions[keep]
    return torch.bincount(index, minlength=num_labels**2).reshape(num_labels, num_labels)


def segmentation_metrics(confusion: torch.Tensor) -> dict:
    """mIoU (%) over the classes present in annotations or predictions (mmseg's nan-mean), pixel accuracy (%), and the
    per-class IoU (None for absent classes)."""
    confusion = confusion.double()
    true_positives = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positives
    iou = true_positives / union  # nan where a class is neither annotated nor predicted
    present = union > 0
    return {
        "mean_iou": 100.0 * iou[present].mean().item() if present.any() else float("nan"),
        "pixel_accuracy": 100.0 * (true_positives.sum() / confusion.sum()).item(),
        "per_class_iou": [100.0 * value if not math.isnan(value) else None for value in iou.tolist()],
    }


@torch.no_grad()
def evaluate(model, loader, accelerator, num_labels: int, ignore_index: int) -> dict:
    model.eval()
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long, device=accelerator.device)
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not accelerator.is_main_process):
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(dim=1)  # (B, S, S)
        confusion += confusion_matrix(predictions, batch["labels"], num_labels, ignore_index)
    confusion = accelerator.reduce(confusion, "sum")
    return {**segmentation_metrics(confusion.cpu()), "num_pixels": int(confusion.sum())}


# ----------------------------------------------------------------------------------------------------------------
# The run


def main(argv=None):
    args = parse_args(argv)
    with StopSignals() as stop_signals:  # SIGTERM / Ctrl-C: a checkpoint, then a line saying how to resume
        return segment(args, stop_signals)


def segment(args, stop_signals):
    accelerator = run_accelerator(args)
    set_seed(args.seed)
    backbone = load_extrema(args.model_name_or_path, args.trust_remote_code)
    image_size = args.image_size or backbone.config.image_size
    if image_size % backbone.config.patch_size:
        raise UsageError(f"--image_size {image_size} is not a multiple of the patch size {backbone.config.patch_size}.")
    builder = open_dataset(args.dataset_name, args.dataset_config, args.train_dir, args.fashion_mnist_dir)
    validation_split = resolve_validation_split(args)
    model = build_segmenter(backbone, args)

    train_joint = v2.Compose(
        [v2.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    )
    train_example = SegmentationExample(train_joint, args.reduce_labels, args.ignore_index, args.seed)
    eval_example = SegmentationExample(v2.Resize((image_size, image_size), antialias=True), args.reduce_labels,
                                       args.ignore_index)  # fmt: skip
    train_loader = segmentation_loader(args, builder, args.train_split, train_example, True, args.max_train_samples)
    eval_loader = segmentation_loader(args, builder, validation_split, eval_example, False, args.max_eval_samples)

    num_layers = model.config.backbone_config.num_hidden_layers
    groups = layer_decay_param_groups(model, args.weight_decay, args.layer_decay, "backbone", num_layers)
    lr = args.learning_rate
    optimizer = torch.optim.AdamW([{**g, "lr": lr * g["lr_scale"]} for g in groups], lr=lr, betas=(0.9, 0.999))
    warmup = min(args.warmup_steps, args.max_train_steps - 1)
    scheduler = get_polynomial_decay_schedule_with_warmup(
        optimizer, warmup, args.max_train_steps, lr_end=0.0, power=1.0
    )
    model, optimizer, eval_loader = accelerator.prepare(model, optimizer, eval_loader)
    train_loader = accelerator.prepare(train_loader)
    history = EvalHistory()
    accelerator.register_for_checkpointing(scheduler, history)  # saved and restored by save_state / load_state
    step, position = resume(accelerator, args)
    if args.report_to != "none":
        accelerator.init_trackers("extrema-segmentation", config={k: v for k, v in vars(args).items() if v is not None})

    def evaluate_now():
        metrics = evaluate(model, eval_loader, accelerator, args.num_labels, args.ignore_index)
        history.rows.append({"step": step, **{k: metrics[k] for k in ("mean_iou", "pixel_accuracy")}})
        accelerator.log({f"eval/{name}": metrics[name] for name in ("mean_iou", "pixel_accuracy")}, step=step)
        model.train()
        return metrics

    # iterations, not epochs (the paper's 80k): the epochs of the stream follow one another, each reshuffled
    checkpoint_every, output_dir, first_step, loss = checkpoint_interval(args), Path(args.output_dir), step, math.nan
    progress = tqdm(total=args.max_train_steps, initial=step, desc="segmentation",
                    disable=not accelerator.is_main_process)  # fmt: skip
    epoch, skip = position.epoch, position.batches  # skip: batches of the epoch already trained on
    model.train()

    def finished() -> bool:
        stopped = args.stop_after_steps and step - first_step >= args.stop_after_steps
        return step >= args.max_train_steps or bool(stopped)

    while not finished():
        train_example.joint.epoch = epoch  # the epoch's crops
        train_loader.set_epoch(epoch)  # the epoch's shuffle
        batch_index = -1
        for batch_index, batch in enumerate(train_loader):
            if batch_index < skip:
                continue
            set_seed(step_seed(args.seed, step, accelerator.process_index))  # drop path: the same after a resume
            outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            accelerator.backward(outputs.loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_now = max(scheduler.get_last_lr())  # the step's largest lr (layer decay scales the others down)
            scheduler.step()
            step += 1
            loss = accelerator.reduce(outputs.loss.detach(), "mean").item()
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr_now:.2e}")
            if step % args.logging_steps == 0:
                accelerator.log({"train/loss": loss, "train/lr": lr_now}, step=step)
            if args.eval_every_steps and step % args.eval_every_steps == 0 and step < args.max_train_steps:
                evaluate_now()
            position = StreamPosition(epoch=epoch, batches=batch_index + 1)
            folder = output_dir / f"checkpoint-{step}"
            saved = checkpoint_every and step % checkpoint_every == 0 and step < args.max_train_steps
            if saved:
                save_checkpoint(accelerator, folder, step, position, args.keep_checkpoints)
            received = stop_signals.requested(accelerator)
            if received:
                progress.close()
                if not saved:
                    save_checkpoint(accelerator, folder, step, position, args.keep_checkpoints)
                stop_on_signal(accelerator, received, step, args.max_train_steps, folder)
            if finished():
                break
        if batch_index < 0:
            raise UsageError(f"The split {args.train_split!r} has no image with an annotation that can be read.")
        epoch, skip = epoch + 1, 0
    progress.close()
    if step < args.max_train_steps:  # --stop_after_steps (as a kill: the last checkpoint is where it continues)
        accelerator.print(f"Stopped after step {step} (--stop_after_steps); continue with --resume_from_checkpoint.")
        accelerator.end_training()
        return None

    metrics = evaluate_now()
    results = {
        "model": str(args.model_name_or_path),
        "eval_split": validation_split,
        "image_size": image_size,
        "num_labels": args.num_labels,
        "steps": args.max_train_steps,
        "batch_size": args.batch_size * accelerator.num_processes,
        "learning_rate": args.learning_rate,
        "layer_decay": args.layer_decay,
        "out_indices": accelerator.unwrap_model(model).config.backbone_config.out_indices,
        "mixed_precision": accelerator.mixed_precision,
        "final_train_loss": loss,
        "eval_history": history.rows,
        **metrics,
    }
    if accelerator.is_main_process:
        save_segmenter(accelerator.unwrap_model(model), f"{args.output_dir}/model", image_size, args.reduce_labels)
        write_results(args.output_dir, results)
    accelerator.end_training()
    return results


def save_segmenter(model, folder, image_size: int, reduce_labels: bool):
    """The model and the image processor that prepares its inputs (resize, ImageNet normalisation) and turns its
    logits into label maps (`post_process_semantic_segmentation`, which pipeline("image-segmentation") calls)."""
    model.save_pretrained(folder)
    SegformerImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_reduce_labels=reduce_labels,
    ).save_pretrained(folder)


if __name__ == "__main__":
    run(main)
