"""Time one training step (train.Trainer) and compare its FLOP rate to the device's matmul rate.

    python bench/train_step.py                                   # 4.5B shape, 2 layers, LoRA 16
    python bench/train_step.py --layers 4 --size 256x448 --chunks 4 --lora_rank 0   # full fine-tune

Prints the device, the step time (compiled, warmed up, best of a few), the step's matmul
FLOPs from the config, the achieved FLOP/s, a large matmul's FLOP/s in the parameter dtype
measured in the same run, their ratio, the memory plan's per-device estimate and the peak
memory. FLOPs of a step: one forward of the clip (dit.forward_flops, block-causal keys),
plus the backward: 2x the forward for the activation gradients, and for a full fine-tune
another 1x for the weight gradients (LoRA's adapter gradients are counted as negligible);
per-layer remat recomputes each layer's forward once more (+1x). Weights are random.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import device_name, fmt_bytes, matmul_flops, peak_memory_bytes  # noqa: E402
from flax import nnx  # noqa: E402

from magi_jax.config import load_config  # noqa: E402
from magi_jax.dit import DiT, forward_flops  # noqa: E402
from magi_jax.lora import LoRAConfig  # noqa: E402
from magi_jax.memory_plan import plan_training_memory  # noqa: E402
from magi_jax.objective import Clip, ObjectiveConfig  # noqa: E402
from magi_jax.train import TrainConfig, Trainer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="4.5B_base")
    ap.add_argument("--layers", type=int, default=2, help="num_layers of the big shape (0: the config's)")
    ap.add_argument("--size", default="128x224", help="HEIGHTxWIDTH in pixels")
    ap.add_argument("--chunks", type=int, default=2, help="chunks per clip")
    ap.add_argument("--batch", type=int, default=1, help="clips per step")
    ap.add_argument("--lora_rank", type=int, default=16, help="0: full fine-tune")
    ap.add_argument("--dtype", default=None, help="params dtype (default: the config's)")
    ap.add_argument("--no_remat", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    h, w = (int(v) for v in args.size.lower().split("x"))
    cfg = load_config(args.config)
    model_changes = {"params_dtype": args.dtype} if args.dtype else {}
    if args.layers:
        model_changes["num_layers"] = args.layers
    cfg = cfg.replace(model=model_changes, runtime=dict(video_size_h=h, video_size_w=w))
    m, rt = cfg.model, cfg.runtime
    lora = LoRAConfig(rank=args.lora_rank) if args.lora_rank else None
    tcfg = TrainConfig(
        batch_size=args.batch,
        lora=lora,
        remat=not args.no_remat,
        objective=ObjectiveConfig(shortcut=cfg.engine.distill, clean_context_prob=0.0),
    )
    trainer = Trainer(DiT(m, distill=cfg.engine.distill, rngs=nnx.Rngs(0)), cfg, tcfg)
    rng = np.random.default_rng(0)
    hh, ww = h // 8, w // 8
    r, length = args.chunks, m.caption_max_length
    mask = np.zeros((args.batch, r, length), np.float32)
    mask[..., :128] = 1  # a typical prompt plus special tokens
    batch = Clip(
        rng.standard_normal((args.batch, m.latent_channels, r * rt.chunk_width, hh, ww)).astype(np.float32),
        rng.standard_normal((args.batch, r, length, m.caption_channels)).astype(np.float32),
        mask,
    )
    state = trainer.init_state()
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - t0)

    tokens = rt.chunk_width // m.t_patch_size * (hh // m.patch_size) * (ww // m.patch_size)
    visible = (r + 1) / 2 * tokens  # mean keys per query, block-causal over the clip
    fwd = forward_flops(m, r, tokens, int(visible), 128) * args.batch
    factor = (3 if lora else 4) - (0 if tcfg.remat else 1)
    if tcfg.objective.shortcut:
        factor += 2  # the teacher's two forwards on coarse steps
    flops = fwd * factor
    ref = matmul_flops(m.dtype)
    plan = plan_training_memory(cfg, r, lora=lora, clips_per_device=args.batch, remat=tcfg.remat)
    kind = f"LoRA rank {args.lora_rank}" if lora else "full fine-tune"
    print(f"device           {device_name()}")
    print(f"config           {args.config}: {m.num_layers} layers, hidden {m.hidden_size}, {m.params_dtype}, {kind}")
    print(f"clip             {args.batch} x {r} chunks x {tokens} tokens ({rt.chunk_width} latent frames {hh}x{ww})")
    print(f"step             {best * 1e3:.1f} ms (compile {compile_s:.1f} s), {flops / 1e9:.1f} GFLOP ({factor}x fwd)")
    print(f"achieved         {flops / best / 1e12:.3f} TFLOP/s")
    print(f"matmul {m.params_dtype:9s} {ref / 1e12:.3f} TFLOP/s (same device, same run)")
    print(f"ratio            {flops / best / ref:.3f}")
    print(f"memory plan      {plan.describe()}")
    print(f"peak memory      {fmt_bytes(peak_memory_bytes())}")
    print(f"loss             {float(metrics['loss']):.4f}")


if __name__ == "__main__":
    main()
