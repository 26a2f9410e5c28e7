"""Ablations at small scale, each variant a short `train_extrema.py --recipe tiny-cifar10` run at the same budget.

    python benchmarks/ablate.py --study fixes --train_dir path/to/cifar10 --num_train_epochs 3 --output_dir bench/fixes
    python benchmarks/ablate.py --study masking --train_dir path/to/cifar10 --num_train_epochs 3 \
        --output_dir bench/masking

- `fixes`: what keeps BYOL (the paper's objective) from collapsing in a short run: the recipe, the recipe without each
  of its changes to the official training, the official training itself, and InfoNCE (paper, Table 6) for scale.
- `masking`: the paper's masking claims with the recipe: mask ratio 0.5 / 0.75 / 0.9 with one mask (Table 1: best
  near 0.8, worse beyond 0.9) and 1 / 2 / 4 masks at 0.75 (Table 2 and Figure 4: more masks learn faster).
- `recipe`: what limits the recipe in a short run: the batch (the number of steps), the crop scale, the lr, the
  teacher's momentum, the masks (docs/recipe-study.md).

Every variant changes only the flags listed in `STUDIES`, keeps the seed, and logs the teacher's weighted kNN top-1
(k=20, T=0.07; gallery: --knn_train_samples training images, queries: --knn_val_samples test images, the first of every
shard: `data_extrema.ShardQuotaSubset`) at initialisation and after every epoch. Writes `results.json` (the curves),
`table.md` and `curves.png` to --output_dir. A variant already in results.json is not run again, so an interrupted study
continues where it stopped (delete results.json to start over). Processes given different --variants can share one
--output_dir and run at the same time (one per GPU, say): each adds its variants to results.json under a file lock.
"""

import argparse
import json
import os
import textwrap
import time
from pathlib import Path

from filelock import FileLock

import train_extrema

# flag -> value changes of each variant, on top of --recipe tiny-cifar10
RECIPE_FIXES = {"target_centering": "batch", "head_norm": "batchnorm", "predictor_lr_multiplier": 10.0}
CROP_0_2 = {"crop_min": 0.2}  # the recipe's crop scale until 2026-12-03
CROP_0_5 = {"crop_min": 0.5}  # the recipe's crop scale of docs/recipe-study.md sections 6-8
CLASS_TOKEN_HEADS = (  # heads 4x as wide (hidden 2048, not 512; 256 out, not 128), a third class-attention block
    "projector_hidden_size=2048,projection_dim=256,predictor_hidden_size=2048,num_class_attention_layers=3"
)
STUDIES = {
    "fixes": {
        "recipe (BYOL + all fixes)": {},
        "without target centering": {"target_centering": "none"},
        "without BatchNorm heads": {"head_norm": "layernorm"},
        "without predictor lr x10": {"predictor_lr_multiplier": 1.0},
        "official BYOL (no fix)": {"target_centering": "none", "head_norm": "layernorm", "predictor_lr_multiplier": 1.0},
        "InfoNCE (official heads)": {
            "loss": "infonce", "target_centering": "none", "head_norm": "layernorm", "predictor_lr_multiplier": 1.0,
        },  # fmt: skip
    },
    "masking": {
        "0.5 x 1": {"mask_ratio": 0.5, "num_masks": 1},
        "0.75 x 1": {"mask_ratio": 0.75, "num_masks": 1},
        "0.9 x 1": {"mask_ratio": 0.9, "num_masks": 1},
        "0.75 x 2": {"mask_ratio": 0.75, "num_masks": 2},
        "0.75 x 4": {"mask_ratio": 0.75, "num_masks": 4},
    },
    # what limits the recipe at 3 epochs (docs/recipe-study.md). A row measured against an earlier recipe keeps that
    # recipe's values: batch 256 until 2026-12-02, crops of 0.2-1 of the image until 2026-12-03, then 0.5-1.
    "recipe": {
        "recipe (batch 64, crop min 0.7)": {},
        "crop min 0.2": CROP_0_2,
        "batch 128": {**CROP_0_2, "per_device_train_batch_size": 128},
        "batch 256": {**CROP_0_2, "per_device_train_batch_size": 256},
        "batch 128, lr x 2": {**CROP_0_2, "per_device_train_batch_size": 128, "learning_rate": 2e-3},
        "batch 256, 0.75 x 4 masks": {**CROP_0_2, "per_device_train_batch_size": 256, "num_masks": 4},
        "momentum 0.99, crop min 0.2": {**CROP_0_2, "ema_momentum": 0.99},
        "shared crop + colour, crop min 0.2": {**CROP_0_2, "augmentation": "shared_crop_color"},
        "crop min 0.35": {"crop_min": 0.35},
        "crop min 0.5": CROP_0_5,
        "shared crop + colour": {**CROP_0_5, "augmentation": "shared_crop_color"},
        "lr x 0.5": {**CROP_0_5, "learning_rate": 5e-4},
        "lr x 2": {**CROP_0_5, "learning_rate": 2e-3},
        "0.5 x 1 masks": {**CROP_0_5, "mask_ratio": 0.5, "num_masks": 1},
        "weight decay 0.05": {**CROP_0_5, "weight_decay": 0.05},
        "6 blocks": {"config_overrides": "num_hidden_layers=6"},
        "momentum 0.99": {"ema_momentum": 0.99},
        # what the class token is trained to carry (docs/recipe-study.md section 8)
        "wide heads, 3 class-attention blocks": {"config_overrides": CLASS_TOKEN_HEADS},
        "0.75 x 4 masks": {"num_masks": 4},
    },
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), required=True)
    parser.add_argument("--variants", nargs="+", help="run only these variants of the study (default: all)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_dir", help="CIFAR-10 as Parquet shards (default: the Hub's uoft-cs/cifar10)")
    parser.add_argument("--num_train_epochs", type=float, default=3.0)
    parser.add_argument("--warmup_epochs", type=float, default=0.5)
    parser.add_argument("--knn_train_samples", type=int, default=10_000)
    parser.add_argument("--knn_val_samples", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per_device_train_batch_size", type=int, help="default: the recipe's")
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument(
        "--color_on_device", action="store_true", help="colour jitter batched on the GPU (train_extrema's flag)"
    )
    args = parser.parse_args(argv)
    unknown = set(args.variants or []) - set(STUDIES[args.study])
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; the {args.study} study has {sorted(STUDIES[args.study])}")
    return args


def run_variant(folder: Path, changes: dict, train_dir=None, **budget) -> dict:
    """One pre-training of the recipe with `changes`; returns its kNN curve (epochs, top-1), wall time and export.

    `budget`: num_train_epochs, warmup_epochs, knn_train_samples, knn_val_samples, seed, num_workers,
    per_device_train_batch_size, color_on_device.
    """
    start = time.perf_counter()
    result = train_extrema.train(
        recipe="tiny-cifar10",
        **({"train_dir": train_dir} if train_dir else {"dataset_name": "uoft-cs/cifar10"}),
        **{**budget, **changes},  # a variant may set the batch
        knn_k=20,
        report_to="none",
        output_dir=str(folder),
    )
    epochs_per_step = 1 / result["steps_per_epoch"]
    return {
        "changes": changes,
        "epochs": [round(point["step"] * epochs_per_step, 3) for point in result["knn_history"]],
        "knn_top1": [point["top1"] for point in result["knn_history"]],
        "wall_s": round(time.perf_counter() - start),
        "steps": result["step"],
        "steps_per_epoch": result["steps_per_epoch"],
        "final_dir": result["final_dir"],
        "mixed_precision": result["mixed_precision"],
    }


def read_results(output_dir: Path) -> dict:
    path = output_dir / "results.json"
    return json.loads(path.read_text()) if path.exists() else {"variants": {}}


def record_variant(output_dir: Path, study: str, name: str, run: dict, budget: dict) -> dict:
    """Adds one finished variant to <output_dir>/results.json and returns the whole file.

    Under a file lock, re-reading the file and replacing it atomically: processes that run other variants of the same
    study at the same time (`--variants`, one process per GPU, say) each add theirs and lose nobody else's.
    """
    with FileLock(output_dir / "results.json.lock"):
        results = read_results(output_dir)
        results.update(study=study, recipe="tiny-cifar10", **budget)
        results["variants"][name] = run
        # the table's and the plot's order, whichever variant finished first; rows the study no longer defines (a
        # renamed variant, a study edited while this one ran) are kept, last
        order = {variant: index for index, variant in enumerate(STUDIES[study])}
        results["variants"] = dict(sorted(results["variants"].items(), key=lambda item: order.get(item[0], len(order))))
        temporary = output_dir / "results.json.tmp"
        temporary.write_text(json.dumps(results, indent=2))
        os.replace(temporary, output_dir / "results.json")
    return results


def run_study(study: str, output_dir, variants=None, train_dir=None, **budget) -> dict:
    """Run the variants of `study` not yet in <output_dir>/results.json; returns all of its results."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = read_results(output_dir)
    for name, changes in STUDIES[study].items():
        if (variants and name not in variants) or name in results["variants"]:
            continue
        folder = output_dir / name.replace(" ", "_").replace("/", "-")
        run = run_variant(folder, changes, train_dir, **budget)
        results = record_variant(output_dir, study, name, run, budget)  # after every variant: a stopped study continues
    return read_results(output_dir)


def markdown_table(results: dict) -> str:
    lines = ["| variant | changes | kNN top-1 (k=20), % at epochs 0, 1, 2, ... | gain | wall (s) |", "|---|---|---|---|---|"]
    for name, run in results["variants"].items():
        changes = ", ".join(f"`{k}={v}`" for k, v in run["changes"].items()) or "-"
        curve = " → ".join(f"{top1:.2f}" for top1 in run["knn_top1"])
        gain = run["knn_top1"][-1] - run["knn_top1"][0]
        lines.append(f"| {name} | {changes} | {curve} | {gain:+.2f} | {run['wall_s']} |")
    return "\n".join(lines)


def plot_curves(curves: dict, path: Path, title: str, levels: dict | None = None):
    """kNN top-1 against epochs, one line per method ({name: (epochs, top1s)}), dashed levels for untrained ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if len(curves) > 10:  # the default cycle has 10 colours: more lines would share them
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for name, (epochs, top1) in curves.items():
        ax.plot(epochs, top1, marker="o", label=name)
    for name, level in (levels or {}).items():
        ax.axhline(level, linestyle="--", linewidth=1, color="gray")
        ax.annotate(name, (0, level), textcoords="offset points", xytext=(2, 3), fontsize=7)
    ax.set_xlabel("epoch of CIFAR-10")
    ax.set_ylabel("kNN top-1 (%), k=20")
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    budget = {
        name: getattr(args, name)
        for name in ("num_train_epochs", "warmup_epochs", "knn_train_samples", "knn_val_samples", "seed", "num_workers",
                     "per_device_train_batch_size", "color_on_device")
    }  # fmt: skip
    results = run_study(args.study, args.output_dir, args.variants, args.train_dir, **budget)
    table = markdown_table(results)
    (Path(args.output_dir) / "table.md").write_text(table + "\n")
    curves = {name: (run["epochs"], run["knn_top1"]) for name, run in results["variants"].items()}
    title = f"ExtreMA tiny on CIFAR-10, {args.num_train_epochs:g} epochs: {args.study} study (seed {args.seed})"
    plot_curves(curves, Path(args.output_dir) / "curves.png", title)
    print(table)
    return results


if __name__ == "__main__":
    main()
