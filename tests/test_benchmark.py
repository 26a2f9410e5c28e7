"""The analytic FLOP counts of benchmarks/benchmark_throughput.py, and a GPU check that a training step never syncs.

`torch.utils.flop_counter.FlopCounterMode` counts the matmuls and convolutions that actually run in a training
step (forward and backward); the benchmark's closed-form counts must equal it exactly, so its MFU is honest.
Eager attention is used because the counter does not see inside the CPU sdpa kernel. Speed itself is never
asserted here: the benchmark prints it. The CUDA test runs in benchmarks/gpu_check.sh and skips without a GPU.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from benchmark_throughput import extrema_flops, vitmae_flops  # noqa: E402

from configuration_extrema import ExtremaConfig  # noqa: E402
from modeling_extrema import ExtremaForPreTraining  # noqa: E402


def counted_training_flops(model, batch_size: int, **inputs) -> float:
    with FlopCounterMode(display=False) as counter:
        model(**inputs).loss.backward()
    return counter.get_total_flops() / batch_size


def test_extrema_flops_match_flop_counter():
    config = ExtremaConfig.from_preset("tiny", mask_ratio=0.75, num_masks=3, attn_implementation="eager")
    torch.manual_seed(0)
    model = ExtremaForPreTraining(config).train()
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    counted = counted_training_flops(model, 2, pixel_values=pixels, pixel_values_teacher=pixels.flip(-1))
    assert sum(extrema_flops(config).values()) == counted


def test_extrema_flops_scale_with_masks():
    # the teacher forward is paid once per image, the student's forward + backward once per mask
    one, five = (extrema_flops(ExtremaConfig.from_preset("vit-base-patch16", num_masks=m)) for m in (1, 5))
    teacher = "teacher forward (N tokens) + projector"
    assert one[teacher] == five[teacher]
    student = [k for k in one if k.startswith("student encoders")][0]
    assert five[student] == 5 * one[student]
    # the paper's ViT-B/16 at 80% x 5 masks: ~140 GFLOPs per image and step
    assert 135e9 < sum(five.values()) < 145e9


def test_vitmae_flops_match_flop_counter():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=32,
        patch_size=4,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=64,
        mask_ratio=0.75,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(config).train()
    counted = counted_training_flops(model, 2, pixel_values=torch.randn(2, 3, 32, 32))
    assert sum(vitmae_flops(config).values()) == counted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
def test_cuda_training_step_never_waits_for_the_gpu():
    # The whole step (masking, forward, backward, fused AdamW, EMA) only queues GPU work: a host sync in it would
    # stall the pipeline every step. set_sync_debug_mode("error") raises on any synchronising call.
    config = ExtremaConfig.from_preset("tiny", mask_ratio=0.75, num_masks=2)
    model = ExtremaForPreTraining(config).cuda().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    pixels = torch.randn(4, 3, config.image_size, config.image_size, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher(0.99)
        return loss

    step()  # first calls initialise cuBLAS / optimizer state, which may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
