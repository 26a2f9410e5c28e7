"""Training throughput of ExtreMA against transformers' ViTMAEForPreTraining, and of the data pipeline.

Model mode (default): one training step is what `train_extrema.py` does per batch, on synthetic images:

    loss = model(student_view, teacher_view).loss   # teacher forward (no grad) + all masked views in one batch
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)   # AdamW
    model.update_teacher(momentum)                                            # EMA

The peer is `ViTMAEForPreTraining` with the same encoder (`vitmae_config_like`: mask ratio 0.75, normalised-pixel
loss, decoder 512 x 8, the MAE recipe) trained with the same AdamW. All configurations are built first, warmed up,
then timed in interleaved rounds (`--steps_per_round` steps of each per round), so that a change of load on a shared
machine hits all of them alike; the medians over rounds are reported, and the ratio to the peer is the median of
the per-round ratios. On a CPU, run as a script, it sets OMP_WAIT_POLICY=PASSIVE unless the variable is set (see the
comment below).

    python benchmarks/benchmark_throughput.py --model vit-small-patch16 --batch_size 16 --precision float32 bfloat16
    python benchmarks/benchmark_throughput.py --model vit-base-patch16 --batch_size 256 --precision bfloat16  # GPU
    python benchmarks/benchmark_throughput.py --mode data --augmentation <name> --workers 1 2 [--color_on_device]

FLOP counting (`extrema_flops`, `vitmae_flops`): matrix multiplications only, counted analytically as 2*m*n*k
(linear layers, the patch-embedding convolution as a matmul over patches, and the two attention matmuls q k^T and
a v); normalisations, activations, softmax, the loss and the optimizer are not counted (they are <1% of the
FLOPs and memory-bound). A forward counts 1x, its backward 2x (gradients of the inputs and of the weights). The
teacher runs forward only, on all N patch tokens; the student runs forward and backward on the K visible tokens of
each of the M masks; both have class-attention blocks (the class token queries the 1 + tokens) and heads (teacher
projector; student projector + predictor). The patch embedding sees no input gradient, so its backward is 1x.
ExtreMA ViT-B/16, 224 px, ratio 0.8 x 5 masks: ~140 GFLOPs per image and step. The counts are checked against
`torch.utils.flop_counter` in tests/test_benchmark.py. MFU = counted FLOPs / time / the device's dense bf16 peak.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over one step of that configuration after building it
(weights, gradients, AdamW state and activations). On CPU the growth of the process's peak resident memory (VmHWM)
from before the configuration was built to the end of one step, with freed heap returned to the OS first.

Data mode: images/s of one worker (one process, one thread) decoding the JPEGs of a Parquet image dataset (the
layout of `datasets` image datasets, e.g. the shared ImageNet sample) and applying
`data_extrema.build_train_transform(augmentation, image_size)` to make both views; with the colour on the device
(`--color_on_device` of the training script) the worker's share instead: decode, crop, flip and draw the colour
parameters. Then the cost of that colour augmentation on the benchmark's device, `data_extrema.device_views` on a
batch of `--color_batch_size` uint8 crops in pinned memory (copy to the device, both views' colour, normalisation),
and images/s through a `torch.utils.data.DataLoader` with each `--workers` count, each batch made ready for the model
on the device by `device_views` (`--color_on_device`: the workers only crop, the device colours): over the JPEGs in
memory, and through the training loop's own loader (`data_extrema.training_batches`: the Parquet stream, per-image
seeds, mask noise; at most one worker per shard).
"""

import argparse
import ctypes
import gc
import math
import os
import platform
import statistics
import time
from pathlib import Path

# OpenMP threads that spin while they wait steal the cores of a shared machine and stall whenever one of them is
# descheduled: on a shared CPU, steps run slower and erratically with the default policy (docs/performance.md).
# PASSIVE (sleep while waiting) is read once, when torch loads; OMP_WAIT_POLICY=ACTIVE overrides it.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

from configuration_extrema import PRESETS, ExtremaConfig  # noqa: E402
from data_extrema import (  # noqa: E402
    StreamPosition,
    TrainingStream,
    build_train_transform,
    decode_image,
    device_views,
    load_raw_stream,
    open_dataset,
    rank_dataset,
    training_batches,
    view_fields,
)
from modeling_extrema import ExtremaForPreTraining  # noqa: E402
from train_extrema import param_groups  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) used for MFU; override with --peak_tflops.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "V100": 125.0}


# ----------------------------------------------------------------------------------------------------------- FLOPs
def matmul_flops(m: int, n: int, k: int) -> int:
    """(m, k) @ (k, n): m * n multiply-adds of length k."""
    return 2 * m * n * k


def vit_block_flops(tokens: int, hidden: int, mlp_hidden: int) -> int:
    """Forward of one pre-norm ViT block on one sequence: qkv, q k^T, a v, output projection, MLP."""
    return (
        matmul_flops(tokens, 3 * hidden, hidden)
        + 2 * matmul_flops(tokens, tokens, hidden)  # q k^T and a v, all heads together
        + matmul_flops(tokens, hidden, hidden)
        + matmul_flops(tokens, mlp_hidden, hidden)
        + matmul_flops(tokens, hidden, mlp_hidden)
    )


def class_attention_block_flops(tokens: int, hidden: int, mlp_hidden: int) -> int:
    """Forward of one CaiT class-attention block: only the class token queries, keys/values are [cls; tokens]."""
    seq = tokens + 1
    return (
        matmul_flops(1, hidden, hidden)  # q of the class token
        + 2 * matmul_flops(seq, hidden, hidden)  # k and v of every token
        + 2 * matmul_flops(1, seq, hidden)  # q k^T and a v
        + matmul_flops(1, hidden, hidden)  # output projection
        + matmul_flops(1, mlp_hidden, hidden)
        + matmul_flops(1, hidden, mlp_hidden)  # MLP on the class token only
    )


def mlp_head_flops(dims: list[int]) -> int:
    """Forward of a chain of linear layers dims[0] -> dims[1] -> ... on one vector."""
    return sum(matmul_flops(1, d_out, d_in) for d_in, d_out in zip(dims, dims[1:]))


def extrema_flops(config: ExtremaConfig) -> dict[str, int]:
    """Matmul FLOPs of one ExtreMA training step, per image, by part (see the module docstring)."""
    num_patches, hidden, mlp_hidden = config.num_patches, config.hidden_size, config.intermediate_size
    visible, masks = config.num_visible_patches, config.num_masks
    patch_embed = matmul_flops(num_patches, hidden, config.num_channels * config.patch_size**2)

    def backbone(tokens: int) -> int:  # self-attention blocks, then class-attention blocks
        return config.num_hidden_layers * vit_block_flops(
            tokens, hidden, mlp_hidden
        ) + config.num_class_attention_layers * class_attention_block_flops(tokens, hidden, mlp_hidden)

    projector = mlp_head_flops(
        [hidden, config.projector_hidden_size, config.projector_hidden_size, config.projection_dim]
    )
    predictor = mlp_head_flops([config.projection_dim, config.predictor_hidden_size, config.projection_dim])
    return {
        "teacher forward (N tokens) + projector": patch_embed + backbone(num_patches) + projector,
        # the student embeds the image once (all N patches), then every mask gathers its K visible tokens
        "student patch embedding, fwd + bwd": 2 * patch_embed,
        "student encoders (M x K tokens), fwd + bwd": 3 * masks * backbone(visible),
        "student projector + predictor, fwd + bwd": 3 * masks * (projector + predictor),
    }


def vitmae_flops(config) -> dict[str, int]:
    """Matmul FLOPs of one ViTMAEForPreTraining training step, per image (encoder on 1 + K tokens, decoder on 1 + N)."""
    num_patches = (config.image_size // config.patch_size) ** 2
    visible = int(num_patches * (1 - config.mask_ratio))
    patch_dim = config.num_channels * config.patch_size**2
    patch_embed = matmul_flops(num_patches, config.hidden_size, patch_dim)
    encoder = config.num_hidden_layers * vit_block_flops(1 + visible, config.hidden_size, config.intermediate_size)
    decoder = (
        matmul_flops(1 + visible, config.decoder_hidden_size, config.hidden_size)  # decoder_embed
        + config.decoder_num_hidden_layers
        * vit_block_flops(1 + num_patches, config.decoder_hidden_size, config.decoder_intermediate_size)
        + matmul_flops(1 + num_patches, patch_dim, config.decoder_hidden_size)  # decoder_pred
    )
    return {
        "patch embedding, fwd + bwd": 2 * patch_embed,
        "encoder (1 + K tokens), fwd + bwd": 3 * encoder,
        "decoder (1 + N tokens), fwd + bwd": 3 * decoder,
    }


def vitmae_config_like(config: ExtremaConfig, decoder_hidden_size=512, decoder_num_hidden_layers=8, **kwargs):
    """A `ViTMAEConfig` whose encoder has ExtreMA's size, with the MAE recipe: mask ratio 0.75, normalised-pixel loss.

    The encoder copies the image and patch size, width, depth, heads, MLP, qkv bias and LayerNorm epsilon of
    `config`; the decoder has 32-wide heads and a 4x MLP (512 x 8 gives MAE's, and ViTMAEConfig's, default decoder).
    `kwargs` go to the config (e.g. attn_implementation). The peer of both benchmarks.
    """
    return ViTMAEConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        qkv_bias=config.qkv_bias,
        layer_norm_eps=config.layer_norm_eps,
        mask_ratio=0.75,
        norm_pix_loss=True,
        decoder_hidden_size=decoder_hidden_size,
        decoder_num_hidden_layers=decoder_num_hidden_layers,
        decoder_num_attention_heads=max(1, decoder_hidden_size // 32),
        decoder_intermediate_size=4 * decoder_hidden_size,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------------- training steps
def adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """The training script's AdamW: its weight-decay groups (`train_extrema.param_groups`), fused."""
    groups = param_groups(model, weight_decay=0.1)
    return torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))


class Run:
    """One configuration to time: a model, its optimizer and a fixed synthetic batch."""

    def __init__(self, name, model, precision, batch, device, flops_per_image, compile_model, momentum=0.996):
        self.name, self.precision, self.device = name, precision, device
        self.flops_per_image = flops_per_image
        self.batch = batch
        self.model = model.to(device).train()
        self.optimizer = adamw(self.model, device)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.momentum = momentum
        self.times: list[float] = []

    def step(self):
        dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.precision == "bfloat16"):
            loss = self.forward(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.model, ExtremaForPreTraining):
            self.model.update_teacher(self.momentum)

    def time_steps(self, steps: int):
        """Run `steps` steps; record the mean seconds per step (one device sync at the end, not per step)."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        self.times.append((time.perf_counter() - start) / steps)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_memory_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def release_cpu_memory():
    """Return freed heap pages to the OS and reset the peak-RSS counter, so that VmHWM measures what follows."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak resident set size (Linux >= 4.0)
    except OSError:
        pass


def build_runs(args, device) -> tuple[list[Run], ExtremaConfig, ViTMAEConfig]:
    def extrema_config(attn_implementation: str) -> ExtremaConfig:
        overrides = {"image_size": args.image_size} if args.image_size else {}
        return ExtremaConfig.from_preset(
            args.model,
            mask_ratio=args.mask_ratio,
            num_masks=args.num_masks,
            attn_implementation=attn_implementation,
            **overrides,
        )

    config = extrema_config(args.attn_implementation[0])
    peer_config = vitmae_config_like(config, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, config.image_size, config.image_size)
    images = [torch.randn(shape, generator=generator) for _ in ("student view", "teacher view")]
    images = [x.to(device) for x in images]

    specs = [("ViTMAE (peer)", p, "sdpa") for p in args.peer_precision]
    specs += [("ExtreMA", p, a) for a in args.attn_implementation for p in args.precision]
    runs = []
    for name, precision, attn_implementation in specs:
        # measure each configuration's memory while it is the newest thing in the process
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            release_cpu_memory()
            base = resident_memory_kib("VmRSS") * 1024
        torch.manual_seed(0)
        if name == "ExtreMA":
            model = ExtremaForPreTraining(extrema_config(attn_implementation))
            batch = {"pixel_values": images[0], "pixel_values_teacher": images[1]}
            flops = extrema_flops(config)
        else:
            model = ViTMAEForPreTraining(peer_config)
            batch = {"pixel_values": images[0]}
            flops = vitmae_flops(peer_config)
        run = Run(name, model, precision, batch, device, sum(flops.values()), args.compile)
        run.attn_implementation, run.flops_by_part = attn_implementation, flops
        for _ in range(max(1, args.warmup)):  # the first step also allocates the AdamW state
            run.step()
        synchronize(device)
        if device.type == "cpu":
            run.peak_memory = resident_memory_kib("VmHWM") * 1024 - base
        else:
            run.peak_memory = torch.cuda.max_memory_allocated(device) - base
        runs.append(run)
    return runs, config, peer_config


def peak_tflops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None


def describe_device(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def benchmark_model(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.attn_implementation is None:
        # the CPU sdpa kernels are slower than eager attention on the short sequences of masked views (most of all
        # in bfloat16); on CUDA the flash / memory-efficient kernels win
        args.attn_implementation = ["eager"] if device.type == "cpu" else ["sdpa"]
    if args.peer_precision is None:
        args.peer_precision = ["float32"] if device.type == "cpu" else ["bfloat16"]
    args.peer_precision = [p for p in args.peer_precision if p != "none"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs use TF32 tensor cores, as training would
        torch.backends.cudnn.allow_tf32 = True
    import transformers

    print(f"device: {describe_device(device)}; torch {torch.__version__}, transformers {transformers.__version__}")
    if device.type == "cpu":
        print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"load average before: {load_average()}")
    runs, config, peer_config = build_runs(args, device)
    print(
        f"ExtreMA {args.model}: {config.image_size} px, batch {args.batch_size}, mask ratio {args.mask_ratio} x "
        f"{args.num_masks} masks ({config.num_visible_patches} of {config.num_patches} patches visible per mask)"
        f"{', torch.compile' if args.compile else ''}"
    )
    if args.peer_precision:
        print(
            f"peer ViTMAEForPreTraining: encoder {peer_config.hidden_size} x {peer_config.num_hidden_layers}, mask "
            f"ratio {peer_config.mask_ratio}, decoder {peer_config.decoder_hidden_size} x "
            f"{peer_config.decoder_num_hidden_layers}, sdpa attention"
        )
    print(f"each step: forward, backward, fused AdamW step (+ EMA teacher update for ExtreMA); warm-up {args.warmup}")

    for _ in range(args.rounds):  # interleaved: every configuration takes its steps in every round
        for run in runs:
            run.time_steps(args.steps_per_round)
    print(f"load average after {args.rounds} rounds of {args.steps_per_round} step(s): {load_average()}")

    peak = peak_tflops(args, device)
    reference = next((r for r in runs if r.name.startswith("ViTMAE") and r.precision == "float32"), None)
    reference = reference or next((r for r in runs if r.name.startswith("ViTMAE")), None)
    header = f"{'model':<15}{'precision':<10}{'attention':<10}{'img/s':>7}{'best':>7}{'ms/step':>9}{'GFLOP/img':>10}"
    header += f"{'TFLOP/s':>9}{'MFU':>7}{'peak MiB':>9}"
    if reference:
        header += f"  {'x peer':>7}{'best':>6}"
    print("\n" + header)
    for run in runs:
        seconds, best = statistics.median(run.times), min(run.times)
        tflops = run.flops_per_image * args.batch_size / seconds / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "-"
        line = (
            f"{run.name:<15}{run.precision:<10}{run.attn_implementation:<10}{args.batch_size / seconds:7.2f}"
            f"{args.batch_size / best:7.2f}{seconds * 1e3:9.0f}{run.flops_per_image / 1e9:10.1f}"
            f"{tflops:9.3f}{mfu:>7}{run.peak_memory / 2**20:9.0f}"
        )
        if reference:
            # median of per-round ratios (both steps of a round ran under the same machine load), and best vs best
            paired = statistics.median(r / t for r, t in zip(reference.times, run.times))
            line += f"  {paired:6.2f}x{min(reference.times) / best:5.2f}x"
        print(line)
    legend = "img/s, ms/step, TFLOP/s: medians over rounds; best: the fastest round"
    print(legend + ("; x peer: median of the per-round ratios, and best vs best" if reference else ""))
    for run in runs:
        rates = " ".join(f"{args.batch_size / t:.2f}" for t in run.times)
        print(f"  img/s by round, {run.name} {run.precision} {run.attn_implementation}: {rates}")
    if peak:
        print(f"MFU against a dense bf16 peak of {peak:.0f} TFLOP/s")
    for name, parts in {run.name: run.flops_by_part for run in runs}.items():
        print(f"GFLOP/img {name}: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in parts.items()))


# ---------------------------------------------------------------------------------------------------- data pipeline
def benchmark_data(args):
    """The training pipeline's own decoding and augmentation (`data_extrema`), timed stage by stage."""
    import pyarrow.parquet as pq

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default_dir = REPO_ROOT.parent / "shared" / "data" / "imagenet-sample"
    data_dir = Path(args.data_dir or os.environ.get("EXTREMA_IMAGENET_SAMPLE_DIR", default_dir))
    files = sorted(data_dir.glob("*.parquet"))
    if not files:
        raise SystemExit(f"No Parquet files in {data_dir}; pass --data_dir or set EXTREMA_IMAGENET_SAMPLE_DIR.")
    jpegs = [cell["bytes"] for f in files for cell in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
    jpegs = jpegs[: args.num_images]
    args.image_size = args.image_size or 224
    transform = build_train_transform(args.augmentation, args.image_size)
    on_device = build_train_transform(args.augmentation, args.image_size, color_on_device=True)
    # a view is (uint8 image, colour parameters) only for the augmentations that have a colour part
    has_color = isinstance(on_device(decode_image(jpegs[0]))[0], tuple)
    print(f"{len(jpegs)} JPEGs from {data_dir} (mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB)")
    print(f"data_extrema.build_train_transform({args.augmentation!r}, {args.image_size}), one thread per worker")
    print(f"load average before: {load_average()}")

    stages = {"decode (PIL, to RGB)": decode_image}
    if transform.student is not None:  # the CPU's share if the per-view colour augmentation moves to the GPU
        stages["decode + shared crop/flip"] = lambda data: transform.shared(decode_image(data))
    if has_color:  # a worker's share with --color_on_device
        stages["decode + crop/flip + colour parameters"] = lambda data: on_device(decode_image(data))
    stages["decode + both views (training)"] = lambda data: transform(decode_image(data))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    for data in jpegs[:20]:  # warm-up: lazy imports and caches
        transform(decode_image(data))
    rates = {}
    for label, stage in stages.items():
        start = time.perf_counter()
        for data in jpegs:
            stage(data)
        rates[label] = len(jpegs) / (time.perf_counter() - start)
        print(f"one worker, {label}: {rates[label]:.0f} images/s")
    # what a training worker really runs per image: the above, with the image's own seed and its mask noise
    config = ExtremaConfig.from_preset(args.model, image_size=args.image_size, mask_ratio=args.mask_ratio,
                                       num_masks=args.num_masks)  # fmt: skip
    # the training loop's stream of this rank: the Parquet shards, read as train_extrema.main reads them
    raw = load_raw_stream(open_dataset(train_dir=data_dir))
    rank_stream = rank_dataset(raw, rank=0, world_size=1, seed=0, buffer_size=0)
    pipeline = on_device if args.color_on_device else transform  # the DataLoader workers' transform
    stream = iter(TrainingStream(rank_stream, pipeline, seed=0, noise_shape=config.mask_noise_shape))
    start = time.perf_counter()
    for _ in jpegs:
        next(stream)
    label = f"TrainingStream ({'crop/flip + colour parameters' if args.color_on_device else 'both views'}, "
    label += "per-image seed, mask noise)"
    rates[label] = len(jpegs) / (time.perf_counter() - start)
    print(f"one worker, {label}: {rates[label]:.0f} images/s")

    if has_color:
        torch.set_num_threads(threads)  # the training process's threads, not a worker's
        rate = color_on_device_rate(on_device, jpegs, args, device)
        size = f"batch {args.color_batch_size} at {args.image_size} px"
        print(f"device_views (copy, colour, normalise) on {describe_device(device)}, {size}: {rate:.0f} images/s")
        torch.set_num_threads(1)

    colour = ("colour on the device" if args.color_on_device else "colour in the workers") if has_color else "no colour"
    for workers in args.workers:
        # every worker makes 8 timed batches (the images repeat if needed) after its first, which includes start-up
        dataset = JpegPairs(jpegs, pipeline, length=max(len(jpegs), 32 * 9 * max(workers, 1)))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=32, num_workers=workers, shuffle=True, pin_memory=device.type == "cuda"
        )
        batches = iter(loader)
        for _ in range(max(workers, 1)):
            next(batches)
        start, count = time.perf_counter(), 0
        for batch in batches:
            device_views(batch, device)  # as the training step gets it: copied, and coloured with --color_on_device
            count += len(batch["pixel_values"])
        synchronize(device)
        rate = count / (time.perf_counter() - start)
        per_worker = rate / max(workers, 1)
        print(f"DataLoader, {workers} worker(s), batch 32, {colour}: {rate:.0f} images/s ({per_worker:.0f} per worker)")
        rate, workers = training_loader_rate(rank_stream, pipeline, config.mask_noise_shape, workers, device)
        per_worker = rate / max(workers, 1)
        print(f"training_batches (the training loop's loader: Parquet stream, TrainingStream), {workers} worker(s), "
              f"batch 32, {colour}: {rate:.0f} images/s ({per_worker:.0f} per worker)")  # fmt: skip
    print(f"load average after: {load_average()}")
    for label, rate in list(rates.items())[1:]:
        cores = math.ceil(20000 / rate)
        print(f"8 GPUs at ~20,000 images/s with '{label}' on the CPU: ~{cores} worker cores ({cores / 8:.0f} per GPU)")


def training_loader_rate(dataset, transform, noise_shape, workers: int, device) -> tuple[float, int]:
    """Images/s of the training loop's own loader (`data_extrema.training_batches` over `dataset`, a rank's raw
    stream), each batch made ready by `device_views`: 8 timed batches per worker after each worker's first. Returns the
    rate and the workers used (at most one per shard)."""
    workers = min(workers, dataset.num_shards)
    batches = training_batches(
        dataset, transform, noise_shape, StreamPosition(), device, batch_size=32, num_workers=workers, seed=0
    )
    for _ in range(max(workers, 1)):
        next(batches)
    start, count = time.perf_counter(), 0
    for _ in range(8 * max(workers, 1)):
        batch = next(batches)
        device_views(batch, device)
        count += len(batch["noise"])
    synchronize(device)
    rate = count / (time.perf_counter() - start)
    del batches  # stops the workers
    return rate, workers


def color_on_device_rate(on_device, jpegs: list[bytes], args, device) -> float:
    """Images/s of `device_views` on a loader-like batch: pinned uint8 crops + colour parameters -> model inputs.

    The batch is built from the JPEGs (repeated up to --color_batch_size) with the training transform, collated as
    the DataLoader does; each timed call copies it to the device and colour-augments and normalises both views.
    """
    torch.manual_seed(0)
    samples = [view_fields(*on_device(decode_image(jpegs[i % len(jpegs)]))) for i in range(args.color_batch_size)]
    batch = torch.utils.data.default_collate(samples)
    if device.type == "cuda":
        batch = {key: value.pin_memory() for key, value in batch.items()}
    repeats = 20 if device.type == "cuda" else 2
    device_views(batch, device)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        device_views(batch, device)
    synchronize(device)
    return args.color_batch_size * repeats / (time.perf_counter() - start)


class JpegPairs(torch.utils.data.Dataset):
    """JPEG bytes -> a sample's image fields (`data_extrema.view_fields`), as the training stream makes them."""

    def __init__(self, jpegs: list[bytes], transform, length: int):
        self.jpegs, self.transform, self.length = jpegs, transform, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return view_fields(*self.transform(decode_image(self.jpegs[index % len(self.jpegs)])))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("model", "data"), default="model")
    parser.add_argument("--model", default="vit-small-patch16", choices=sorted(PRESETS), help="ExtreMA preset")
    parser.add_argument("--image_size", type=int, default=None, help="default: the preset's (224; tiny: 32)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--mask_ratio", type=float, default=0.8)
    parser.add_argument("--num_masks", type=int, default=5)
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=("float32", "bfloat16"),
        help="ExtreMA precisions to time (bfloat16 = autocast)",
    )
    parser.add_argument(
        "--peer_precision",
        nargs="+",
        default=None,
        choices=("float32", "bfloat16", "none"),
        help="ViTMAE precisions (default: float32 on CPU, bfloat16 on CUDA; none skips the peer)",
    )
    parser.add_argument(
        "--attn_implementation",
        nargs="+",
        default=None,
        choices=("sdpa", "eager"),
        help="ExtreMA attention kernels to time (default: eager on CPU, sdpa on CUDA); the peer uses sdpa",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds; each runs every configuration in turn")
    parser.add_argument("--steps_per_round", type=int, default=1, help="steps per configuration and round")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--peak_tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: known GPUs)")
    parser.add_argument("--data_dir", default=None, help="Parquet image dataset (data mode)")
    parser.add_argument("--augmentation", default="shared_crop_color", help="train_extrema augmentation (data mode)")
    parser.add_argument("--num_images", type=int, default=1000, help="JPEGs to decode (data mode)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts (data mode)")
    parser.add_argument(
        "--color_batch_size", type=int, default=256, help="batch of the colour-on-the-device timing (data mode)"
    )
    parser.add_argument(
        "--color_on_device",
        action="store_true",
        help="DataLoader runs with the colour on the device, as train_extrema.py --color_on_device (data mode)",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "data":
        benchmark_data(args)
    else:
        benchmark_model(args)


if __name__ == "__main__":
    main()
