"""Quality benchmark: what ExtreMA learns on CIFAR-10 against its baselines, at the same budget (a CPU or one GPU).

    python benchmarks/benchmark_quality.py --train_dir path/to/cifar10 --num_train_epochs 3 --output_dir bench/quality

Every pre-training gets the same number of epochs of the same batch (the recipe's, 64) and seed:
- ExtreMA (the tiny preset, `train_extrema.py --recipe tiny-cifar10` through `ablate.run_study("fixes", ...)`):
  BYOL with the recipe's fixes (centred targets, BatchNorm heads, predictor lr x10), BYOL as the official code trains
  it (no fix), and InfoNCE (paper, Table 6) with the official heads; features: the teacher's class token;
- ViTMAE: transformers' ViTMAEForPreTraining with the same encoder (benchmark_throughput.vitmae_config_like), mask
  ratio 0.75 (the MAE recipe: AdamW (0.9, 0.95), weight decay 0.05, normalised-pixel loss, random resized crop +
  flip); features: the encoder's patch tokens with masking off, mean-pooled (MAE has no trained instance token);
- the untrained ExtreMA network (class token) and raw pixels (the normalised image as one vector).
Scores, on the same images: weighted kNN top-1 (eval_extrema.weighted_knn, k=20 and 200, T=0.07; gallery:
--max_train_samples training images, queries: --max_eval_samples test images, the first of every shard) and a linear
probe on the frozen features (eval_extrema.linear_probe_on_features: trained on the gallery, scored on the queries).
Writes results.json (with each method's kNN curve, k=20, after every epoch), table.md and curves.png (the paper's Figure
4 at small scale) to --output_dir. Finished pre-trainings are reused when the command runs again; pass the output_dir of
an `ablate.py --study fixes` run as --extrema_study_dir to reuse its ExtreMA runs.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import ViTMAEForPreTraining, get_cosine_schedule_with_warmup
from transformers.modeling_outputs import BaseModelOutputWithPooling

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the evaluation scripts' helpers

import ablate  # noqa: E402
from _eval_common import load_extrema, resolve_validation_split, run, split_loader, write_results  # noqa: E402
from benchmark_throughput import vitmae_config_like  # noqa: E402
from data_extrema import add_data_args, build_eval_transform, build_train_transform  # noqa: E402
from eval_extrema import extract_features, linear_probe_on_features, weighted_knn  # noqa: E402
from train_extrema import RECIPES, param_groups  # noqa: E402

# method in the table -> variant of the `fixes` study of benchmarks/ablate.py
EXTREMA_METHODS = {
    "ExtreMA, BYOL + fixes (tiny-cifar10)": "recipe (BYOL + all fixes)",
    "ExtreMA, BYOL, official (no fix)": "official BYOL (no fix)",
    "ExtreMA, InfoNCE, official heads": "InfoNCE (official heads)",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_train_epochs", type=float, default=3.0, help="epochs of EACH pre-training")
    parser.add_argument("--warmup_epochs", type=float, default=0.5)
    recipe_batch = RECIPES["tiny-cifar10"]["per_device_train_batch_size"]
    parser.add_argument(
        "--per_device_train_batch_size", type=int, default=recipe_batch, help="for every method (default: the recipe's)"
    )
    parser.add_argument("--max_train_samples", type=int, default=10_000, help="gallery size (the first of each shard)")
    parser.add_argument("--max_eval_samples", type=int, default=2_000, help="queries (the first of each shard)")
    parser.add_argument("--k", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--extrema_study_dir", help="reuse the ExtreMA runs of `ablate.py --study fixes` there")
    group = parser.add_argument_group("ViTMAE (the encoder copies ExtreMA's; lr and precision as ExtreMA's recipe)")
    group.add_argument("--mae_learning_rate", type=float, default=1e-3, help="base lr x batch / 256")
    group.add_argument("--mae_decoder_layers", type=int, default=2)
    group.add_argument("--mae_decoder_hidden_size", type=int, default=128)
    add_data_args(parser)
    parser.set_defaults(num_workers=1)
    return parser.parse_args(argv)


def pretrain_extrema(args) -> dict:
    """The ExtreMA methods, as variants of the ablation study (reused when already run); returns its results."""
    budget = {
        "num_train_epochs": args.num_train_epochs,
        "warmup_epochs": args.warmup_epochs,
        "knn_train_samples": args.max_train_samples,
        "knn_val_samples": args.max_eval_samples,
        "seed": args.seed,
        "num_workers": args.num_workers,
        "per_device_train_batch_size": args.per_device_train_batch_size,
    }
    study_dir = args.extrema_study_dir or Path(args.output_dir) / "extrema"
    return ablate.run_study("fixes", study_dir, list(EXTREMA_METHODS.values()), args.train_dir, **budget)


def pretrain_mae(args, config, steps_per_epoch: int, precision: str, device, on_epoch):
    """ExtreMA's budget and precision ("bf16" or "no") with the MAE recipe, on `device`; calls on_epoch(model, epoch)
    at the start and after every epoch. Returns the model and its training time in seconds."""
    start = time.perf_counter()
    set_seed(args.seed)
    mae_config = vitmae_config_like(config, args.mae_decoder_hidden_size, args.mae_decoder_layers)
    model = ViTMAEForPreTraining(mae_config).to(device).train()
    if device.type == "cpu":  # as train_extrema does on a CPU: sdpa is slow on short bf16 sequences
        model.set_attn_implementation("eager")
    total_steps = round(args.num_train_epochs * steps_per_epoch)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    batch_size = args.per_device_train_batch_size
    peak_lr = args.mae_learning_rate * batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=peak_lr, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)  # as train_extrema's
    transform = build_train_transform("crop", config.image_size, crop_min=0.2).shared  # one crop + flip view
    loader = split_loader(args, args.train_split, transform, shuffle=True, batch_size=batch_size)
    bf16 = precision == "bf16"
    step, epoch, seconds = 0, 0, 0.0
    on_epoch(model, 0)
    progress = tqdm(total=total_steps, desc="ViTMAE")
    while step < total_steps:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(pixel_values=batch["pixel_values"].to(device, non_blocking=True)).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if step % steps_per_epoch == 0 or step == total_steps:
                seconds += time.perf_counter() - start
                on_epoch(model, step / steps_per_epoch)  # not timed
                model.train()
                start = time.perf_counter()
            if step == total_steps:
                break
        epoch += 1
    progress.close()
    return model.eval(), seconds


class MeanPooledMAE(nn.Module):
    """ViTMAE's encoder with masking off; pooler_output is the mean of its patch tokens."""

    def __init__(self, mae: ViTMAEForPreTraining):
        super().__init__()
        self.vit = mae.vit
        self.vit.config.mask_ratio = 0.0  # keeps every token (in a shuffled order, which a mean ignores)

    def forward(self, pixel_values):
        tokens = self.vit(pixel_values).last_hidden_state[:, 1:]  # (B, N, D): without the class token
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.mean(dim=1))


class RawPixels(nn.Module):
    """The normalised image itself as the representation: (B, 3, S, S) -> (B, 3 * S * S)."""

    def forward(self, pixel_values):
        return BaseModelOutputWithPooling(pooler_output=pixel_values.flatten(1))


def decoded_split(args, split: str, image_size: int, max_samples: int) -> torch.utils.data.DataLoader:
    """The first images of a split, decoded and eval-transformed ONCE, as a loader of (pixel_values, label) batches
    that every representation reads."""
    pixel_values, labels = [], []
    for batch in split_loader(args, split, build_eval_transform(image_size), max_samples, batch_size=256):
        pixel_values.append(batch["pixel_values"])
        labels.append(batch["label"])
    dataset = torch.utils.data.TensorDataset(torch.cat(pixel_values), torch.cat(labels))
    return torch.utils.data.DataLoader(dataset, batch_size=256)


def score(backbone, gallery, queries, ks, device) -> dict:
    """kNN top-1 for each k and the linear probe's top-1 of a representation, on the same images."""
    backbone = backbone.to(device)
    train_features, train_labels = extract_features(backbone, gallery, device)
    test_features, test_labels = extract_features(backbone, queries, device)
    row = {}
    for k in ks:
        knn = weighted_knn(train_features, train_labels, test_features, test_labels, k=k, temperature=0.07)
        row[f"knn_top1_k{k}"] = knn["top1"]
    row["linear_top1"] = linear_probe_on_features(train_features, train_labels, test_features, test_labels)["top1"]
    return row


def markdown_table(rows, ks, batch_size: int) -> str:
    lines = [
        "| method | epochs x batch | wall time (s) | " + " | ".join(f"kNN top-1, k={k} (%)" for k in ks)
        + " | linear probe top-1 (%) |",
        "|---|---|---|" + "---|" * len(ks) + "---|",
    ]  # fmt: skip
    for row in rows:
        budget = f"{row['epochs']:g} x {batch_size}" if row["epochs"] else "-"
        wall = f"{row['train_wall_s']:.0f}" if row["epochs"] else "-"
        knn = " | ".join(f"{row[f'knn_top1_k{k}']:.2f}" for k in ks)
        lines.append(f"| {row['method']} | {budget} | {wall} | {knn} | {row['linear_top1']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the ExtreMA runs trained, too
    validation_split = resolve_validation_split(args)
    study = pretrain_extrema(args)
    rows = []
    for method, variant in EXTREMA_METHODS.items():
        run_ = study["variants"][variant]
        curve = {"epochs": run_["epochs"], "knn_top1": run_["knn_top1"]}
        rows.append({"method": method, "backbone": load_extrema(run_["final_dir"]), "epochs": args.num_train_epochs,
                     "train_wall_s": run_["wall_s"], "curve": curve, "steps_per_epoch": run_["steps_per_epoch"]})  # fmt: skip
    config = rows[0]["backbone"].config
    gallery = decoded_split(args, args.train_split, config.image_size, args.max_train_samples)
    queries = decoded_split(args, validation_split, config.image_size, args.max_eval_samples)

    mae_curve = {"epochs": [], "knn_top1": []}

    def mae_knn(model, epoch):
        pooled = MeanPooledMAE(model)
        train_features, train_labels = extract_features(pooled, gallery, device)
        test_features, test_labels = extract_features(pooled, queries, device)
        pooled.vit.config.mask_ratio = 0.75  # back to training
        knn = weighted_knn(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07)
        mae_curve["epochs"].append(round(epoch, 3))
        mae_curve["knn_top1"].append(knn["top1"])
        print(f"ViTMAE after {epoch:g} epochs: kNN top-1 {knn['top1']:.2f}%", flush=True)

    # in the precision the ExtreMA runs trained in (--mixed_precision auto: bf16 where the CPU has bf16 dot products;
    # a study recorded before the runs stored it: float32)
    precision = study["variants"][EXTREMA_METHODS[rows[0]["method"]]].get("mixed_precision", "no")
    mae, mae_seconds = pretrain_mae(args, config, rows[0]["steps_per_epoch"], precision, device, mae_knn)
    rows.append({"method": "ViTMAE (mean-pooled encoder tokens)", "backbone": MeanPooledMAE(mae),
                 "epochs": args.num_train_epochs, "train_wall_s": mae_seconds, "curve": mae_curve})  # fmt: skip
    set_seed(args.seed)
    untrained = type(rows[0]["backbone"])(config).eval()
    rows.append({"method": "ExtreMA untrained (class token)", "backbone": untrained, "epochs": 0, "train_wall_s": 0})
    rows.append({"method": "raw pixels", "backbone": RawPixels(), "epochs": 0, "train_wall_s": 0})
    for row in rows:
        row.update(score(row.pop("backbone"), gallery, queries, args.k, device))
        row.pop("steps_per_epoch", None)

    table = markdown_table(rows, args.k, args.per_device_train_batch_size)
    print(table)
    (output_dir / "table.md").write_text(table + "\n")
    title = f"ExtreMA tiny on CIFAR-10: kNN during pre-training (seed {args.seed})"
    curves = {row["method"]: (row["curve"]["epochs"], row["curve"]["knn_top1"]) for row in rows if row.get("curve")}
    levels = {row["method"]: row["knn_top1_k20"] for row in rows if not row.get("curve") and "knn_top1_k20" in row}
    ablate.plot_curves(curves, output_dir / "curves.png", title, levels)
    results = {
        "data": args.dataset_name or args.train_dir,
        "gallery": f"{len(gallery.dataset)} images of {args.train_split}, the first of every shard",
        "queries": f"{len(queries.dataset)} images of {validation_split}, the first of every shard",
        "budget": {"epochs": args.num_train_epochs, "batch_size": args.per_device_train_batch_size, "seed": args.seed},
        "vitmae": {
            "mask_ratio": 0.75,
            "norm_pix_loss": True,
            "decoder": f"{args.mae_decoder_layers} layers x {args.mae_decoder_hidden_size}",
            "optimizer": f"AdamW (0.9, 0.95), weight decay 0.05, base lr {args.mae_learning_rate}",
            "augmentation": "random resized crop (0.2-1) + flip",
        },
        "rows": rows,
        "table": table,
    }
    write_results(args.output_dir, results)
    return results


if __name__ == "__main__":
    run(main)
