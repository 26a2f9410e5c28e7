"""Weighted k-NN accuracy of an ExtreMA backbone's instance representation (Wu et al. 2018; the paper's appendix D).

    python scripts/eval_knn.py --model_name_or_path extrema-output/final --dataset_name uoft-cs/cifar10 \
        --output_dir eval/knn

The gallery is the training split, the queries the validation split. The instance representation (`pooler_output`,
the class token) is extracted once per split and cached in <output_dir>/features-<split>.safetensors, so that a rerun
with other k or temperatures does not touch the model. Classification is `eval_extrema.weighted_knn` (cosine
similarity, votes weighted by exp(similarity / T)), the same function as the training loop's kNN monitor.
"""

import argparse
from pathlib import Path

from accelerate import Accelerator
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _eval_common import (
    UsageError,
    add_eval_args,
    load_extrema,
    parse_checked,
    resolve_validation_split,
    run,
    split_loader,
    write_results,
)
from cli_extrema import AT_LEAST_1, ArgumentParser, POSITIVE
from data_extrema import build_eval_transform
from eval_extrema import extract_features, weighted_knn


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(parser)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 200], help="neighbour counts to report")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--overwrite_cache", action="store_true", help="extract the features again")
    return parse_checked(parser, argv, FLAG_RANGES)


FLAG_RANGES = {"k": AT_LEAST_1, "temperature": POSITIVE}


def cached_features(backbone, args, split, max_samples, device):
    """(features (N, D), labels (N,)) of a split, from <output_dir>/features-<split>.safetensors when it matches."""
    path = Path(args.output_dir) / f"features-{split}.safetensors"
    # what the cached features depend on; a file made from anything else is recomputed
    key = {
        "model": str(args.model_name_or_path),
        "weights": f"{sum(p.double().sum().item() for p in backbone.parameters()):.12e}",  # a retrained model differs
        "data": str(args.dataset_name or args.train_dir or "fashion-mnist"),
        "config": str(args.dataset_config),
        "split": split,
        "max_samples": str(max_samples),
        "image_size": str(backbone.config.image_size),
    }
    if path.exists() and not args.overwrite_cache:
        with safe_open(path, "pt") as cache:
            if cache.metadata() == key:
                return cache.get_tensor("features"), cache.get_tensor("labels")
    loader = split_loader(args, split, build_eval_transform(backbone.config.image_size), max_samples)
    features, labels = extract_features(backbone, loader, device)
    if not torch.isfinite(features).all():
        raise UsageError(
            f"The features of the split {split!r} are not finite (NaN or inf): the model's outputs are broken; "
            "nothing was written. Use an earlier checkpoint or export."
        )
    if (labels < 0).any():
        raise UsageError(
            f"{int((labels < 0).sum())} images of the split {split!r} have no label (-1), as in some Hub test "
            "splits; evaluate on a labelled split (--validation_split)."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": features.contiguous(), "labels": labels.contiguous()}, path, metadata=key)
    return features, labels


def main(argv=None):
    args = parse_args(argv)
    device = Accelerator().device
    backbone = load_extrema(args.model_name_or_path, args.trust_remote_code).to(device)
    validation_split = resolve_validation_split(args)
    train_features, train_labels = cached_features(backbone, args, args.train_split, args.max_train_samples, device)
    test_features, test_labels = cached_features(backbone, args, validation_split, args.max_eval_samples, device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1

    results = {
        "model": str(args.model_name_or_path),
        "representation": "pooler_output (class token)",
        "train_split": args.train_split,
        "eval_split": validation_split,
        "num_train": len(train_labels),
        "num_eval": len(test_labels),
        "num_classes": num_classes,
        "temperature": args.temperature,
    }
    for k in args.k:
        knn = weighted_knn(
            train_features, train_labels, test_features, test_labels, k=k, temperature=args.temperature,
            num_classes=num_classes,
        )  # fmt: skip
        results[f"k={k}"] = knn
    write_results(args.output_dir, results)
    return results


if __name__ == "__main__":
    run(main)
