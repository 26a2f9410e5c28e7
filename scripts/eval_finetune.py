"""End-to-end fine-tuning of an ExtreMA backbone for image classification (the paper's Table 13, BEiT / MAE recipe).

    python scripts/eval_finetune.py --model_name_or_path extrema-output/final --dataset_name uoft-cs/cifar10 \
        --output_dir eval/finetune --num_train_epochs 100 --batch_size 128

`ExtremaForImageClassification` with classifier_pooling="mean": LayerNorm + Linear on the mean of the patch tokens
(the distributed representation). The official recipe: AdamW (0.9, 0.999), base lr 1e-3 x batch / 256, weight decay
0.05, layer-wise lr decay 0.75, 5 warm-up epochs then cosine, label smoothing 0.1, mixup 0.8 / cutmix 1.0,
RandAugment (9, 0.5), drop path 0.1. Mixup / cutmix and RandAugment can be switched off. The fine-tuned classifier is
saved to <output_dir>/model.
"""

import argparse
import math
import re

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torchvision.transforms import v2

from cli_extrema import AT_LEAST_0, AT_LEAST_1, FRACTION, OPEN_UNIT, POSITIVE
from _eval_common import (
    parse_checked,
    add_eval_args,
    build_classifier,
    evaluate,
    load_extrema,
    resolve_validation_split,
    run,
    split_size_and_classes,
    train_classifier,
    write_results,
)
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from data_extrema import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, label_fraction_keys, labelled_loader


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser, batch_size=128)
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="lr = base lr x total batch / 256")
    parser.add_argument("--min_learning_rate", type=float, default=1e-6)
    parser.add_argument("--layer_decay", type=float, default=0.75, help="0.65 for ImageNet-22k pre-training")
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--num_train_epochs", type=int, default=100, help="100 for ViT-B, 200 for ViT-S")
    parser.add_argument("--warmup_epochs", type=float, default=5)
    parser.add_argument("--drop_path_rate", type=float, default=0.1)
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    parser.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    parser.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    parser.add_argument("--randaugment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max_grad_norm", type=float, help="clip gradients to this norm (default: no clipping)")
    parser.add_argument("--num_labels", type=int, help="number of classes (default: read from the dataset)")
    parser.add_argument(
        "--label_fraction",
        type=float,
        help="train on a class-balanced fraction of the training split, chosen by --seed (0.01, 0.1: the paper's "
        "semi-supervised settings)",
    )
    return parse_checked(parser, argv, FLAG_RANGES)


FLAG_RANGES = {
    "learning_rate": POSITIVE,
    "min_learning_rate": AT_LEAST_0,
    "layer_decay": OPEN_UNIT,
    "weight_decay": AT_LEAST_0,
    "num_train_epochs": AT_LEAST_1,
    "warmup_epochs": AT_LEAST_0,
    "drop_path_rate": FRACTION,
    "label_smoothing": FRACTION,
    "mixup": AT_LEAST_0,
    "cutmix": AT_LEAST_0,
    "max_grad_norm": AT_LEAST_0,
    "num_labels": (lambda value: value >= 2, "at least 2"),
    "label_fraction": OPEN_UNIT,
}


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay: patch embedding 0, ViT block i is i + 1, the rest (class
    attention, final norm, head) num_layers + 1."""
    if name.startswith("extrema.embeddings."):
        return 0
    block = re.match(r"extrema\.encoder\.layer\.(\d+)\.", name)
    return int(block.group(1)) + 1 if block else num_layers + 1


def layer_decay_param_groups(model, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with lr_scale = layer_decay ** (depth from the top) and no weight decay on vectors / cls_token."""
    num_layers = model.config.num_hidden_layers
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = layer_id(name, num_layers)
        no_decay = param.ndim < 2 or name.endswith("cls_token")
        group = groups.setdefault(
            (depth, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers + 1 - depth),
            },
        )
        group["params"].append(param)
    return list(groups.values())


def finetune_transform(image_size: int, randaugment: bool):
    """RandomResizedCrop + flip (+ RandAugment: 2 ops of magnitude 9), ImageNet normalisation."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            *([v2.RandAugment(num_ops=2, magnitude=9)] if randaugment else []),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator()
    set_seed(args.seed)
    backbone = load_extrema(args.model_name_or_path, args.trust_remote_code)
    image_size = backbone.config.image_size
    validation_split = resolve_validation_split(args)
    num_train, num_labels = split_size_and_classes(args, args.train_split, args.max_train_samples)
    num_labels = args.num_labels or num_labels
    subset = label_fraction_keys(args, args.train_split, args.label_fraction) if args.label_fraction else None
    num_train = len(subset) if subset is not None else num_train
    model = build_classifier(backbone, num_labels, pooling="mean", drop_path_rate=args.drop_path_rate)

    train_transform = finetune_transform(image_size, args.randaugment)
    train_loader = labelled_loader(
        args, args.train_split, train_transform, args.max_train_samples, shuffle=True, subset_keys=subset
    )
    eval_loader = labelled_loader(args, validation_split, build_eval_transform(image_size), args.max_eval_samples)
    # mixup or cutmix (one of the two per batch, as timm does): labels become class probabilities
    mixers = []
    if args.mixup > 0:
        mixers.append(v2.MixUp(alpha=args.mixup, num_classes=num_labels))
    if args.cutmix > 0:
        mixers.append(v2.CutMix(alpha=args.cutmix, num_classes=num_labels))
    mix = v2.RandomChoice(mixers) if mixers else None

    total_batch = args.batch_size * accelerator.num_processes
    peak_lr = args.learning_rate * total_batch / 256
    groups = layer_decay_param_groups(model, args.weight_decay, args.layer_decay)
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

    def loss_fn(model, batch):
        pixel_values, targets = batch["pixel_values"], batch["label"]
        if mix is not None:
            pixel_values, targets = mix(pixel_values, targets)  # targets: (B, num_labels) probabilities
        return F.cross_entropy(model(pixel_values).logits, targets, label_smoothing=args.label_smoothing)

    step, loss = train_classifier(
        model, optimizer, train_loader, accelerator, loss_fn=loss_fn,
        scheduler=scheduler,
        num_epochs=args.num_train_epochs, total_steps=total_steps, max_grad_norm=args.max_grad_norm, desc="fine-tune",
    )  # fmt: skip

    metrics = evaluate(model, eval_loader, accelerator)
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
        "mixup": args.mixup,
        "cutmix": args.cutmix,
        "randaugment": args.randaugment,
        "label_smoothing": args.label_smoothing,
        "final_train_loss": loss,
        **metrics,
    }
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(f"{args.output_dir}/model")
        write_results(args.output_dir, results)
    return results


if __name__ == "__main__":
    run(main)
