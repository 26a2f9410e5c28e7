"""Linear probe of an ExtreMA backbone's instance representation (the paper's Table 14, MAE's main_linprobe.py).

    python scripts/eval_linear.py --model_name_or_path extrema-output/final --dataset_name uoft-cs/cifar10 \
        --output_dir eval/linear --num_train_epochs 90 --batch_size 256

The backbone is frozen; a non-affine BatchNorm then a linear layer are trained on its class token
(`ExtremaForImageClassification` with classifier_pooling="cls"). Two protocols (--protocol; any flag given on the
command line overrides its protocol's value):

- `small` (the default): SGD with momentum 0.9, base lr 0.1 x batch / 256, no weight decay, 1 warm-up epoch then
  cosine decay, 90 epochs, RandomResizedCrop + flip, every batch an optimizer step. It learns in a few hundred steps
  of a few thousand images, as in a CPU run or a quick check of a checkpoint.
- `paper`: the official recipe (Table 14): LARS, base lr 0.1 x 4096 / 256, no weight decay, momentum 0.9, total batch
  4096 (gradients of --batch_size batches are accumulated up to it), 10 warm-up epochs then cosine decay, 90 epochs,
  RandomResizedCrop + flip. LARS moves each weight matrix by trust (0.001) x lr of its norm per step, so it needs the
  large lr that the large batch gives (MAE's probe: batch 16384, lr 6.4) and thousands of steps: at batch 256 (lr 0.1)
  the probe stays near chance for hundreds of steps.

The trained probe is saved to <output_dir>/probe (a classifier that loads with from_pretrained).
"""

import argparse
import math

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from cli_extrema import AT_LEAST_0, AT_LEAST_1, ArgumentParser, FRACTION, OPEN_UNIT, POSITIVE
from _eval_common import (
    UsageError,
    add_eval_args,
    build_classifier,
    evaluate,
    label_fraction_subset,
    load_extrema,
    parse_checked,
    resolve_validation_split,
    run,
    save_classifier,
    split_loader,
    split_size_and_classes,
    train_classifier,
    write_results,
)
from transformers import get_cosine_schedule_with_warmup

from data_extrema import build_eval_transform, build_train_transform


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight matrix is rescaled by trust * |w| / |update| (You et al. 2017).

    MAE's util/lars.py, used by the official linear probe; biases and norm parameters (ndim 1) take plain SGD steps.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    ratio = torch.where(
                        (param_norm > 0) & (update_norm > 0), group["trust"] * param_norm / update_norm, 1.0
                    )
                    update = update * ratio
                momentum = self.state[p].setdefault("momentum", torch.zeros_like(p))
                momentum.mul_(group["momentum"]).add_(update)
                p.add_(momentum, alpha=-group["lr"])


# Values of the flags under each --protocol (flags given on the command line win)
PROTOCOLS = {
    "small": dict(optimizer="sgd", learning_rate=0.1, weight_decay=0.0, momentum=0.9, total_batch_size=None,
                  num_train_epochs=90, warmup_epochs=1, augmentation="crop"),
    "paper": dict(optimizer="lars", learning_rate=0.1, weight_decay=0.0, momentum=0.9, total_batch_size=4096,
                  num_train_epochs=90, warmup_epochs=10, augmentation="crop"),
}  # fmt: skip


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser, batch_size=256)
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="small", help="see above; default: small")
    parser.add_argument("--optimizer", choices=("lars", "sgd"))
    parser.add_argument("--learning_rate", type=float, help="lr = base lr x total batch / 256")
    parser.add_argument("--weight_decay", type=float)
    parser.add_argument("--momentum", type=float)
    parser.add_argument(
        "--total_batch_size",
        type=int,
        help="images per optimizer step, a multiple of --batch_size x processes: gradients are accumulated up to it "
        "(default: --batch_size x processes)",
    )
    parser.add_argument("--num_train_epochs", type=int)
    parser.add_argument("--warmup_epochs", type=float)
    parser.add_argument("--augmentation", choices=("crop", "none"), help="crop: RandomResizedCrop + flip (official)")
    parser.add_argument("--num_labels", type=int, help="number of classes (default: read from the dataset)")
    parser.add_argument(
        "--label_fraction",
        type=float,
        help="train on a class-balanced fraction of the training split, chosen by --seed (0.01, 0.1: the paper's "
        "semi-supervised settings)",
    )
    args = parser.parse_args(argv)
    parser.set_defaults(**PROTOCOLS[args.protocol])
    return parse_checked(parser, argv, FLAG_RANGES)


FLAG_RANGES = {
    "learning_rate": POSITIVE,
    "weight_decay": AT_LEAST_0,
    "momentum": FRACTION,
    "total_batch_size": AT_LEAST_1,
    "num_train_epochs": AT_LEAST_1,
    "warmup_epochs": AT_LEAST_0,
    "num_labels": (lambda value: value >= 2, "at least 2"),
    "label_fraction": OPEN_UNIT,
}


def accumulation_steps(total_batch_size: int | None, batch_size: int, num_processes: int) -> int:
    """Batches whose gradients make one optimizer step: total_batch_size / (batch_size x num_processes)."""
    per_step = batch_size * num_processes
    if total_batch_size is None:
        return 1
    if total_batch_size % per_step:
        raise UsageError(
            f"--total_batch_size {total_batch_size} is not a multiple of --batch_size x processes = {per_step}."
        )
    return total_batch_size // per_step


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator()
    accelerator.gradient_accumulation_steps = accumulation_steps(
        args.total_batch_size, args.batch_size, accelerator.num_processes
    )
    set_seed(args.seed)
    backbone = load_extrema(args.model_name_or_path, args.trust_remote_code)
    image_size = backbone.config.image_size
    validation_split = resolve_validation_split(args)
    num_train, num_labels = split_size_and_classes(args, args.train_split, args.max_train_samples)
    num_labels = args.num_labels or num_labels
    subset = label_fraction_subset(args, args.train_split)
    num_train = len(subset) if subset is not None else num_train

    model = build_classifier(backbone, num_labels, pooling="cls")
    model.extrema.requires_grad_(False)  # frozen: only the BatchNorm statistics and the linear layer learn
    torch.nn.init.normal_(model.classifier.weight, std=0.01)  # MAE's probe init
    torch.nn.init.zeros_(model.classifier.bias)

    train_transform = (
        build_train_transform("crop", image_size, crop_min=0.08).shared  # one RandomResizedCrop + flip view
        if args.augmentation == "crop"
        else build_eval_transform(image_size)
    )
    train_loader = split_loader(
        args, args.train_split, train_transform, args.max_train_samples, shuffle=True, subset_keys=subset
    )
    eval_loader = split_loader(args, validation_split, build_eval_transform(image_size), args.max_eval_samples)

    total_batch = args.batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps
    peak_lr = args.learning_rate * total_batch / 256
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "lars":
        optimizer = LARS(trainable, lr=peak_lr, weight_decay=args.weight_decay, momentum=args.momentum)
    else:
        optimizer = torch.optim.SGD(trainable, lr=peak_lr, weight_decay=args.weight_decay, momentum=args.momentum)
    steps_per_epoch = math.ceil(num_train / total_batch)
    total_steps = args.num_train_epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)  # 0 -> peak_lr -> 0
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    step, loss = train_classifier(
        model, optimizer, train_loader, accelerator,
        loss_fn=lambda model, batch: F.cross_entropy(model(batch["pixel_values"]).logits, batch["label"]),
        scheduler=scheduler,
        num_epochs=args.num_train_epochs, total_steps=total_steps,
        frozen=accelerator.unwrap_model(model).extrema, desc="linear probe",
    )  # fmt: skip

    metrics = evaluate(model, eval_loader, accelerator)
    results = {
        "model": str(args.model_name_or_path),
        "representation": "pooler_output (class token), frozen",
        "eval_split": validation_split,
        "num_train": num_train,
        "label_fraction": args.label_fraction,
        "num_labels": num_labels,
        "protocol": args.protocol,
        "optimizer": args.optimizer,
        "total_batch": total_batch,
        "warmup_epochs": args.warmup_epochs,
        "epochs": args.num_train_epochs,
        "steps": step,
        "peak_lr": peak_lr,
        "final_train_loss": loss,
        **metrics,
    }
    if accelerator.is_main_process:
        save_classifier(accelerator.unwrap_model(model), f"{args.output_dir}/probe", args)
        write_results(args.output_dir, results)
    return results


if __name__ == "__main__":
    run(main)
