"""End-to-end fine-tuning of an ExtreMA backbone for image classification: the paper's Table 13 recipe (BEiT / MAE's
main_finetune.py), built from timm's pieces.

    python scripts/eval_finetune.py --model_name_or_path extrema-output/final --dataset_name uoft-cs/cifar10 \
        --output_dir eval/finetune --num_train_epochs 100 --batch_size 128
    python scripts/eval_finetune.py ... --resume_from_checkpoint latest     # continue a killed run exactly

`ExtremaForImageClassification` with classifier_pooling="mean": LayerNorm + Linear on the mean of the patch tokens
(the distributed representation). The official recipe, every piece a flag:
- data: timm's `create_transform` (RandomResizedCrop with bicubic resizing, flip, RandAugment `rand-m9-mstd0.5-inc1`,
  random erasing 0.25 in pixel mode, ImageNet normalisation); evaluation: the project's transform (resize, center crop);
- timm's `Mixup` (mixup 0.8, cutmix 1.0, one of the two per batch) with label smoothing 0.1 and
  `SoftTargetCrossEntropy`;
- AdamW (0.9, 0.999), base lr 1e-3 x batch / 256, weight decay 0.05, layer-wise lr decay 0.75 (0.65 after
  ImageNet-22k pre-training), 5 warm-up epochs then cosine, drop path 0.1.

The run saves its full state (model, optimizer, schedule, position in the epoch) every --checkpointing_steps steps
or every epoch, atomically, and --resume_from_checkpoint continues it exactly: an image's augmentation is drawn from
a seed of (seed, epoch, its pixels) and a step's mixup and drop path from (seed, step), not from what a process drew
before, so the run is the same function of the data whether it resumes or not. It evaluates every
--eval_every_epochs epochs, logs to --report_to and shows a progress bar. The fine-tuned classifier is saved to
<output_dir>/model.
"""

import argparse
import math
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from timm.data import Mixup, create_transform
from timm.data import auto_augment as timm_auto_augment
from timm.loss import SoftTargetCrossEntropy
from tqdm.auto import tqdm

from cli_extrema import (
    AT_LEAST_0,
    AT_LEAST_1,
    FRACTION,
    OPEN_UNIT,
    POSITIVE,
    UNIT_INTERVAL,
    ArgumentParser,
)
from _eval_common import (
    RUN_RANGES,
    EvalHistory,
    SeededTransform,
    UsageError,
    add_eval_args,
    add_run_args,
    build_classifier,
    check_run_args,
    checkpoint_interval,
    evaluate,
    label_fraction_subset,
    layer_decay_param_groups,
    load_extrema,
    parse_checked,
    run_accelerator,
    resolve_validation_split,
    run,
    save_classifier,
    split_loader,
    split_size_and_classes,
    step_seed,
    stop_on_signal,
    write_results,
)
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from data_extrema import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    StreamPosition,
    build_eval_transform,
)
from train_extrema import StopSignals, resume, save_checkpoint

RANDAUGMENT = "rand-m9-mstd0.5-inc1"  # the official recipe's: 2 ops of magnitude 9 +- 0.5, increasing severity


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser, batch_size=128)
    group = parser.add_argument_group("optimisation (defaults: the paper's Table 13)")
    group.add_argument("--learning_rate", type=float, default=1e-3, help="lr = base lr x total batch / 256")
    group.add_argument("--min_learning_rate", type=float, default=1e-6)
    group.add_argument("--layer_decay", type=float, default=0.75, help="0.65 after ImageNet-22k pre-training")
    group.add_argument("--weight_decay", type=float, default=0.05)
    group.add_argument("--num_train_epochs", type=int, default=100, help="100 for ViT-B, 200 for ViT-S")
    group.add_argument("--warmup_epochs", type=float, default=5)
    group.add_argument("--drop_path_rate", type=float, default=0.1)
    group.add_argument("--max_grad_norm", type=float, help="clip gradients to this norm (default: no clipping)")
    group.add_argument(
        "--mixed_precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
        help="auto: bf16 where the hardware computes in it, fp16 on older GPUs, else float32 (as train_extrema.py)",
    )  # fmt: skip
    group = parser.add_argument_group("augmentation and regularisation (defaults: the paper's Table 13)")
    group.add_argument("--auto_augment", default=RANDAUGMENT, help="timm's policy string; 'none' for no RandAugment")
    group.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    group.add_argument("--label_smoothing", type=float, default=0.1)
    group.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    group = parser.add_argument_group("data")
    group.add_argument("--num_labels", type=int, help="number of classes (default: read from the dataset)")
    group.add_argument(
        "--label_fraction", type=float,
        help="train on a class-balanced fraction of the training split, chosen by --seed (0.01, 0.1: the paper's "
        "semi-supervised settings)",
    )  # fmt: skip
    group = add_run_args(parser, checkpointing_steps="epoch")
    group.add_argument("--eval_every_epochs", type=int, default=0, help="evaluate every N epochs (0: at the end only)")
    return parse_checked(parser, argv, FLAG_RANGES, check=check_args)


FLAG_RANGES = {
    "learning_rate": POSITIVE,
    "min_learning_rate": AT_LEAST_0,
    "layer_decay": OPEN_UNIT,
    "weight_decay": AT_LEAST_0,
    "num_train_epochs": AT_LEAST_1,
    "warmup_epochs": AT_LEAST_0,
    "drop_path_rate": FRACTION,
    "max_grad_norm": AT_LEAST_0,
    "reprob": UNIT_INTERVAL,
    "label_smoothing": FRACTION,
    "mixup": AT_LEAST_0,
    "cutmix": AT_LEAST_0,
    "num_labels": (lambda value: value >= 2, "at least 2"),
    "label_fraction": OPEN_UNIT,
    "eval_every_epochs": AT_LEAST_0,
    **RUN_RANGES,
}


def check_args(args):
    """The settings that FLAG_RANGES cannot check (parse_checked checks those): refused before anything is written."""
    check_run_args(args)
    if args.auto_augment != "none":
        try:  # timm's parser of policy strings: a typo fails here, before the run starts
            finetune_transform(32, args.auto_augment, args.reprob)
        except (AssertionError, KeyError, ValueError) as error:
            raise UsageError(
                f"--auto_augment {args.auto_augment!r} is not a timm policy (e.g. {RANDAUGMENT}, or 'none'): {error}"
            ) from error
    return args


# ----------------------------------------------------------------------------------------------------------------
# The recipe's pieces: layer-wise lr decay, the training transform, mixup


def posterize(image, bits_to_keep, **kwargs):
    """timm's posterize op for any Pillow: keeping 0 bits (the strongest "PosterizeIncreasing", drawn whenever the
    magnitude noise reaches 10) gives a black image, as Pillow did before it refused 0 bits."""
    if bits_to_keep <= 0:
        return PIL.Image.new(image.mode, image.size)
    return timm_auto_augment.posterize(image, bits_to_keep, **kwargs)


def finetune_transform(image_size: int, auto_augment: str | None = RANDAUGMENT, reprob: float = 0.25):
    """timm's training transform with MAE's fine-tuning settings: RandomResizedCrop (bicubic) + flip, RandAugment
    `auto_augment` (None: off), no colour jitter, ImageNet normalisation, random erasing `reprob` in pixel mode."""
    transform = create_transform(
        input_size=image_size,
        is_training=True,
        color_jitter=None,
        auto_augment=auto_augment,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    for step in transform.transforms:
        for op in getattr(step, "ops", []):  # RandAugment's ops
            if op.aug_fn is timm_auto_augment.posterize:
                op.aug_fn = posterize
    return transform


def build_mixup(args, num_labels: int) -> Mixup | None:
    """timm's Mixup / CutMix (one of the two per batch) with label smoothing; None when both are off."""
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing, num_classes=num_labels
    )


def training_loss(model, batch, mixup, label_smoothing: float):
    """Cross-entropy of a batch: against mixed soft targets (with `mixup`) or smoothed labels."""
    pixel_values, labels = batch["pixel_values"], batch["label"]
    if mixup is None:
        return F.cross_entropy(model(pixel_values).logits, labels, label_smoothing=label_smoothing)
    if len(labels) % 2:  # timm mixes each image with its mirror in the batch: it needs an even batch
        pixel_values, labels = pixel_values[:-1], labels[:-1]
    pixel_values, targets = mixup(pixel_values, labels)  # targets: (B, num_labels) probabilities
    return SoftTargetCrossEntropy()(model(pixel_values).logits, targets)


# ----------------------------------------------------------------------------------------------------------------
# The run


def main(argv=None):
    args = parse_args(argv)
    with StopSignals() as stop_signals:  # SIGTERM / Ctrl-C: a checkpoint, then a line saying how to resume
        return finetune(args, stop_signals)


def finetune(args, stop_signals):
    accelerator = run_accelerator(args)
    set_seed(args.seed)
    backbone = load_extrema(args.model_name_or_path, args.trust_remote_code)
    image_size = backbone.config.image_size
    validation_split = resolve_validation_split(args)
    num_train, num_labels = split_size_and_classes(args, args.train_split, args.max_train_samples)
    num_labels = args.num_labels or num_labels
    subset = label_fraction_subset(args, args.train_split)
    num_train = len(subset) if subset is not None else num_train
    if num_train < args.batch_size:
        raise UsageError(f"The training split has {num_train} images, fewer than --batch_size {args.batch_size}.")
    model = build_classifier(backbone, num_labels, pooling="mean", drop_path_rate=args.drop_path_rate)

    auto_augment = None if args.auto_augment == "none" else args.auto_augment
    train_transform = SeededTransform(finetune_transform(image_size, auto_augment, args.reprob), args.seed)
    train_loader = split_loader(
        args, args.train_split, train_transform, args.max_train_samples, shuffle=True, subset_keys=subset
    )
    eval_loader = split_loader(args, validation_split, build_eval_transform(image_size), args.max_eval_samples)
    mixup = build_mixup(args, num_labels)

    total_batch = args.batch_size * accelerator.num_processes
    peak_lr = args.learning_rate * total_batch / 256
    if args.min_learning_rate > peak_lr:
        raise UsageError(
            f"--min_learning_rate {args.min_learning_rate} is above the peak lr {peak_lr:.3g} (--learning_rate x "
            f"batch {total_batch} / 256): the cosine would raise the lr; lower --min_learning_rate."
        )
    groups = layer_decay_param_groups(
        model, args.weight_decay, args.layer_decay, prefix="extrema", num_layers=model.config.num_hidden_layers
    )
    optimizer = torch.optim.AdamW(
        [{**group, "lr": peak_lr * group["lr_scale"]} for group in groups], lr=peak_lr, betas=(0.9, 0.999)
    )
    steps_per_epoch = math.ceil(num_train / total_batch)
    total_steps = args.num_train_epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    # every group: 0 -> its peak (peak_lr x lr_scale) -> min_learning_rate x lr_scale
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup_steps, total_steps, min_lr=args.min_learning_rate
    )
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    history = EvalHistory()
    accelerator.register_for_checkpointing(scheduler, history)  # saved and restored by save_state / load_state
    step, position = resume(accelerator, args)
    if args.report_to != "none":
        accelerator.init_trackers("extrema-finetune", config={k: v for k, v in vars(args).items() if v is not None})

    def evaluate_now(epoch: int):
        metrics = evaluate(model, eval_loader, accelerator)
        history.rows.append({"epoch": epoch, "step": step, **metrics})
        accelerator.log({f"eval/{name}": metrics[name] for name in ("top1", "top5")}, step=step)

    checkpoint_every = checkpoint_interval(args)
    output_dir, first_step, loss = Path(args.output_dir), step, float("nan")
    progress = tqdm(total=total_steps, initial=step, desc="fine-tune", disable=not accelerator.is_main_process)
    stopped = False
    for epoch in range(position.epoch, args.num_train_epochs):
        skip = position.batches if epoch == position.epoch else 0  # batches of this epoch already trained on
        train_transform.epoch = epoch  # the epoch's augmentations
        train_loader.set_epoch(epoch)  # the epoch's shuffle
        model.train()
        for batch_index, batch in enumerate(train_loader):
            if batch_index < skip:
                continue
            # mixup (numpy) and drop path (torch) draw from the global RNGs: seeded per step, they are the same
            # whether the run resumed or not (iterating a loader, for one, draws from torch's RNG)
            set_seed(step_seed(args.seed, step, accelerator.process_index))
            with accelerator.accumulate(model):
                loss_tensor = training_loss(model, batch, mixup, args.label_smoothing)
                accelerator.backward(loss_tensor)
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            lr = max(scheduler.get_last_lr())  # the step's largest lr (layer decay scales the others down)
            scheduler.step()
            step += 1
            loss = accelerator.reduce(loss_tensor.detach(), "mean").item()
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if step % args.logging_steps == 0:
                accelerator.log({"train/loss": loss, "train/lr": lr, "train/epoch": step / steps_per_epoch}, step=step)
            if checkpoint_every and step % checkpoint_every == 0:
                position = StreamPosition(epoch=epoch, batches=batch_index + 1)
                save_checkpoint(accelerator, output_dir / f"checkpoint-{step}", step, position, args.keep_checkpoints)
            if args.stop_after_steps and step - first_step >= args.stop_after_steps:
                stopped = True
                break
            received = stop_signals.requested(accelerator)
            if received:
                progress.close()
                folder = output_dir / f"checkpoint-{step}"
                if not (checkpoint_every and step % checkpoint_every == 0):  # not saved just above
                    position = StreamPosition(epoch=epoch, batches=batch_index + 1)
                    save_checkpoint(accelerator, folder, step, position, args.keep_checkpoints)
                stop_on_signal(accelerator, received, step, total_steps, folder)
        if stopped:
            break
        if args.eval_every_epochs and (epoch + 1) % args.eval_every_epochs == 0 and epoch + 1 < args.num_train_epochs:
            evaluate_now(epoch + 1)
        if args.checkpointing_steps == "epoch":
            position = StreamPosition(epoch=epoch + 1)
            save_checkpoint(accelerator, output_dir / f"checkpoint-{step}", step, position, args.keep_checkpoints)
    progress.close()
    if stopped:
        accelerator.print(f"Stopped after step {step} (--stop_after_steps); continue with --resume_from_checkpoint.")
        accelerator.end_training()
        return None

    evaluate_now(args.num_train_epochs)
    metrics = {key: value for key, value in history.rows[-1].items() if key not in ("epoch", "step")}
    results = {
        "model": str(args.model_name_or_path),
        "representation": "mean of the patch tokens, fine-tuned end to end",
        "eval_split": validation_split,
        "num_train": num_train,
        "label_fraction": args.label_fraction,
        "num_labels": num_labels,
        "epochs": args.num_train_epochs,
        "steps": step,
        "peak_lr": peak_lr,
        "layer_decay": args.layer_decay,
        "drop_path_rate": args.drop_path_rate,
        "auto_augment": auto_augment,
        "reprob": args.reprob,
        "mixup": args.mixup,
        "cutmix": args.cutmix,
        "label_smoothing": args.label_smoothing,
        "mixed_precision": accelerator.mixed_precision,
        "final_train_loss": loss,
        "eval_history": history.rows,
        **metrics,
    }
    if accelerator.is_main_process:
        save_classifier(accelerator.unwrap_model(model), f"{args.output_dir}/model", args)
        write_results(args.output_dir, results)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run(main)
