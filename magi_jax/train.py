"""Training and fine-tuning the DiT: an optax loop around the objective (objective.py).

    python -m magi_jax.train_data --videos clips/ --out data/ --config_file 4.5B_base ...
    python -m magi_jax.train --config_file 4.5B_base --dit_ckpt W --data data/ --out run/ \
        --lora_rank 16 --steps 2000

What a step does: the batch (B clips, split into `grad_accum` micro-batches) is noised per
chunk and scored by `objective.clip_loss`; gradients are averaged over the micro-batches
(a `lax.scan`, so memory holds one micro-batch), clipped by global norm, and AdamW with
linear warmup and cosine decay updates the trainable parameters. The step is one jitted
function whose train state is donated (updated in place).

Trainable parameters: the LoRA adapters (`--lora_rank` > 0; the base weights are frozen
and never copied) or every parameter (full fine-tune). `master_dtype`: "float32" keeps a
float32 master copy of the trainable parameters and float32 optimizer state, casting to the
model's `params_dtype` (bf16 for the released models) for each forward; "param" keeps both
in the parameter dtype (half the optimizer memory, for bf16 models less precise updates).

Sharding: parameters follow sharding.RULES on the mesh (tensor-parallel over `model`), the
batch is split over `data` (data parallel), and XLA inserts the gradient all-reduce; the
step equals the single-device step up to reduction order.

Checkpoints: every `save_every` steps the whole train state (step, trainable parameters,
optimizer state, RNG key) is written as an orbax folder `<out>/step_<n>` under a temporary
name and renamed, so a killed run resumes from the last complete one (`--resume`), and the
resumed steps are bit-identical to the uninterrupted run: the batch and the noise of step s
are functions of (seed, s) only. The frozen base weights are not part of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from magi_jax import checkpoint, sharding
from magi_jax.config import ConfigError, MagiConfig
from magi_jax.lora import LoRAConfig, LoRAParam, apply_lora
from magi_jax.objective import Clip, ObjectiveConfig, clip_loss

f32 = jnp.float32
STATE_META = "train_state.json"
STATE_ARRAYS = "arrays"


class TrainError(ValueError):
    """A training option or input that cannot work; the message says what to change."""


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 100
    total_steps: int = 1000  # length of the cosine schedule (and of the run by default)
    end_lr_ratio: float = 0.1  # final learning rate / peak
    weight_decay: float = 0.01  # decoupled (AdamW), on kernels and adapters only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm
    batch_size: int = 1  # clips per step (over all devices)
    grad_accum: int = 1  # micro-batches per step (batch_size must divide)
    master_dtype: str = "float32"  # "float32" or "param" (see module doc)
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    remat: bool = True  # recompute each layer in the backward pass (activations: one layer's, not all)
    objective: ObjectiveConfig = ObjectiveConfig()
    lora: LoRAConfig | None = None  # None: full fine-tune

    def check(self, config: MagiConfig):
        problems = []
        if self.batch_size % self.grad_accum:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.master_dtype not in ("float32", "param"):
            problems.append(f"master_dtype {self.master_dtype!r}: use float32 or param")
        if self.warmup_steps < 0 or self.total_steps < 1:
            problems.append("warmup_steps must be >= 0 and total_steps >= 1")
        if config.engine.distill and not self.objective.shortcut:
            problems.append("a distilled model trains with the shortcut loss: pass --shortcut")
        if self.objective.shortcut and not config.engine.distill:
            problems.append("the shortcut loss needs a distilled model (engine_config.distill: true)")
        if config.engine.fp8_quant:
            problems.append("fp8 (quant) models cannot be trained; fine-tune the bf16 variant")
        if problems:
            raise TrainError("; ".join(problems))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    step: jax.Array  # () int32: steps taken
    params: nnx.State  # trainable parameters (master copy)
    opt_state: optax.OptState
    key: jax.Array  # (2,) uint32: the run's base key (step s uses fold_in(key, s))


def lr_schedule(tcfg: TrainConfig):
    warm = max(tcfg.warmup_steps, 0)
    return optax.warmup_cosine_decay_schedule(
        0.0, tcfg.learning_rate, warm, max(tcfg.total_steps, warm + 1), tcfg.learning_rate * tcfg.end_lr_ratio
    )


def _decays(params):
    """Weight decay on matrices (kernels, adapters), not on norms, biases or embeddings."""

    def rule(path, _):
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return bool(names & {"kernel", "lora_a", "lora_b"})

    return jax.tree_util.tree_map_with_path(rule, params)


def optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tcfg.grad_clip),
        optax.adamw(lr_schedule(tcfg), tcfg.b1, tcfg.b2, tcfg.eps, weight_decay=tcfg.weight_decay, mask=_decays),
    )


class Trainer:
    """Holds the model split into (graphdef, trainable, frozen) and the compiled step.

    model: a DiT (with adapters applied when tcfg.lora is set); mesh: sharding.make_mesh or None.
    """

    def __init__(self, model, config: MagiConfig, tcfg: TrainConfig, mesh=None):
        tcfg.check(config)
        self.config, self.tcfg, self.mesh = config, tcfg, mesh
        if tcfg.lora is not None and not nnx.state(model, LoRAParam):
            apply_lora(model, tcfg.lora, seed=tcfg.seed)
        for segment in model.segments:
            segment.remat = tcfg.remat
        if mesh is not None:
            model = sharding.place(model, mesh)
        trainable_filter = LoRAParam if tcfg.lora is not None else nnx.Param
        self.graphdef, trainable, self.frozen = nnx.split(model, trainable_filter, ...)
        self.param_dtypes = jax.tree.map(lambda a: a.dtype, trainable)
        self.tx = optimizer(tcfg)
        self.schedule = lr_schedule(tcfg)
        self._trainable = trainable  # the model's own arrays: the first state is cast from them
        self._step = jax.jit(self._train_step, donate_argnums=0)
        self._pinned = False  # on a mesh: the step's output layout is pinned at the first step

    # -- state ---------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        with self._mesh():
            # a jitted cast returns fresh buffers: steps donate the state, the model keeps its arrays
            master = f32 if self.tcfg.master_dtype == "float32" else None
            params = jax.jit(lambda t: jax.tree.map(lambda a: a.astype(master or a.dtype), t))(self._trainable)
            opt_state = jax.jit(self.tx.init)(params)
            key = jax.random.PRNGKey(self.tcfg.seed)
            state = TrainState(jnp.int32(0), params, opt_state, key)
        if self.mesh is not None:  # every leaf on the mesh (scalars replicated): see `step`
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

            def on_mesh(a):
                return a if isinstance(a.sharding, jax.sharding.NamedSharding) else jax.device_put(a, replicated)

            state = jax.tree.map(on_mesh, state)
        return state

    def _mesh(self):
        import contextlib

        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # -- the step --------------------------------------------------------------------------
    def _forward_params(self, params):
        return jax.tree.map(lambda p, d: p.astype(d), params, self.param_dtypes)

    def _train_step(self, state: TrainState, frozen, batch: Clip):
        tcfg, ocfg = self.tcfg, self.tcfg.objective
        key = jax.random.fold_in(state.key, state.step)
        steps = jnp.asarray(ocfg.shortcut_steps, jnp.int32)
        steps_n = steps[state.step % len(ocfg.shortcut_steps)]

        def loss_of(params, micro: Clip, mkey):
            fwd = self._forward_params(params)
            keys = jax.random.split(mkey, micro.latents.shape[0])
            per_clip = jax.vmap(
                lambda clip, k: clip_loss(self.graphdef, fwd, frozen, self.config, ocfg, clip, k, steps_n),
                in_axes=(0, 0),
            )
            losses, aux = per_clip(micro, keys)
            return jnp.mean(losses), aux

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def micro_step(carry, xs):
            g_sum, l_sum = carry
            micro, i = xs
            (loss, _), g = grad_fn(state.params, micro, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + loss), None

        micro = jax.tree.map(lambda a: a.reshape(tcfg.grad_accum, -1, *a.shape[1:]), batch)
        micro = jax.tree.map(lambda a: sharding.constrain(a, (None, "batch") + (None,) * (a.ndim - 2)), micro)
        (g_sum, l_sum), _ = jax.lax.scan(micro_step, (zeros, f32(0)), (micro, jnp.arange(tcfg.grad_accum)))
        grads = jax.tree.map(lambda g: g / tcfg.grad_accum, g_sum)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, state.params)
        metrics = {
            "loss": l_sum / tcfg.grad_accum,
            "grad_norm": optax.tree.norm(grads),
            "lr": self.schedule(state.step),
        }
        return TrainState(state.step + 1, params, opt_state, state.key), metrics

    def place_batch(self, batch: Clip) -> Clip:
        """Host arrays -> device arrays, clips split over the mesh's `data` axis."""
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        return jax.tree.map(
            lambda a: jax.device_put(
                a, sharding.array_sharding(("batch",) + (None,) * (a.ndim - 1), a.shape, self.mesh)
            ),
            batch,
        )

    def step(self, state: TrainState, batch: Clip) -> tuple[TrainState, dict]:
        n = batch.latents.shape[0]
        if n != self.tcfg.batch_size:
            raise TrainError(f"batch has {n} clips, the config says batch_size {self.tcfg.batch_size}")
        if self.mesh is not None and not self._pinned:
            # the new state keeps the layout of the state it came from: left to XLA, a model axis
            # gives some outputs another sharding, and the second step would compile again
            layout = jax.tree.map(lambda a: a.sharding, state)
            self._step = jax.jit(self._train_step, donate_argnums=0, out_shardings=(layout, None))
            self._pinned = True
        with self._mesh():
            return self._step(state, self.frozen, self.place_batch(batch))

    def model(self, state: TrainState):
        """The DiT with the state's parameters (in the model dtype)."""
        return nnx.merge(self.graphdef, self._forward_params(state.params), self.frozen)

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, state: TrainState, out: str | os.PathLike) -> Path:
        """Writes the whole train state to `<out>/step_<n>` atomically; keeps the newest few."""
        import orbax.checkpoint as ocp

        out = Path(out).resolve()  # orbax refuses relative paths (`--out run/` from the command line)
        out.mkdir(parents=True, exist_ok=True)
        step = int(jax.device_get(state.step))
        final = out / f"step_{step:08d}"
        leaves, paths = _leaves(state)
        with checkpoint.atomic_folder(final, out / f".step_{step:08d}.tmp-{os.getpid()}") as tmp:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp / STATE_ARRAYS, {f"leaf_{i:05d}": a for i, a in enumerate(leaves)})
                ckptr.wait_until_finished()
            meta = {
                "step": step,
                "paths": paths,
                "train_config": _config_dict(self.tcfg),
                "model_config": self.config.to_dict()["model_config"],
            }
            (tmp / STATE_META).write_text(json.dumps(meta, indent=1) + "\n")
        for old in checkpoints(out)[: -max(self.tcfg.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self, path: str | os.PathLike) -> TrainState:
        """The train state saved at `path` (a step_<n> folder), placed like a fresh one."""
        import orbax.checkpoint as ocp

        path = Path(path).resolve()
        meta_file = path / STATE_META
        if not meta_file.exists():
            raise TrainError(f"{path} is not a train-state checkpoint (no {STATE_META})")
        meta = json.loads(meta_file.read_text())
        template = self.init_state()  # shapes, dtypes and shardings of the state to restore
        leaves, paths = _leaves(template)
        if meta["paths"] != paths:
            raise TrainError(
                f"{path} holds another train state (trainable parameters or optimizer differ); "
                "resume with the options it was written with"
            )
        target = {
            f"leaf_{i:05d}": jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for i, a in enumerate(leaves)
        }
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path / STATE_ARRAYS, target)
        treedef = jax.tree.structure(template)
        return jax.tree.unflatten(treedef, [restored[f"leaf_{i:05d}"] for i in range(len(leaves))])


def _leaves(state) -> tuple[list, list[str]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return [a for _, a in flat], [jax.tree_util.keystr(p) for p, _ in flat]


def _config_dict(tcfg: TrainConfig) -> dict:
    d = dataclasses.asdict(tcfg)
    return json.loads(json.dumps(d, default=list))


def checkpoints(out) -> list[Path]:
    """Complete train-state checkpoints under `out`, oldest first."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p for p in out.glob("step_*") if (p / STATE_META).exists())


def fit(trainer: Trainer, data, out, steps: int, resume: bool = True, log=None) -> TrainState:
    """Trains to `steps` total steps, saving every save_every steps; resumes from `out`."""
    from tqdm import tqdm

    state = None
    if resume and checkpoints(out):
        state = trainer.restore(checkpoints(out)[-1])
    if state is None:
        state = trainer.init_state()
    start = int(jax.device_get(state.step))
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", file=sys.stderr, disable=None)
    t0 = time.time()
    for s in range(start, steps):
        state, metrics = trainer.step(state, data.batch(s, trainer.tcfg.batch_size))
        bar.update(1)
        if log is not None or (s + 1) % 10 == 0 or s + 1 == steps:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
            if log is not None:
                log(s, m)
        if (s + 1) % trainer.tcfg.save_every == 0 or s + 1 == steps:
            trainer.save(state, out)
    bar.close()
    print(f"trained steps {start}..{steps} in {time.time() - t0:.1f}s", file=sys.stderr)
    return state


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m magi_jax.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config_file", default=None, help="variant name or upstream JSON (default: tiny, random weights)")
    ap.add_argument("--dit_ckpt", default=None, help="base DiT weights (magi-jax checkpoint or upstream folder)")
    ap.add_argument("--data", required=True, help="folder written by python -m magi_jax.train_data")
    ap.add_argument("--out", required=True, help="run folder: train-state checkpoints and the result")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--grad_accum", type=int, default=1)
    ap.add_argument("--grad_clip", type=float, default=1.0)
    ap.add_argument("--weight_decay", type=float, default=0.01)
    ap.add_argument("--master_dtype", default="float32", choices=("float32", "param"))
    ap.add_argument("--save_every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--caption_dropout", type=float, default=0.1)
    ap.add_argument("--clean_context_prob", type=float, default=0.3)
    ap.add_argument("--shortcut", action="store_true", help="shortcut-distillation loss (distilled models)")
    ap.add_argument(
        "--prefixes",
        action="store_true",
        help="cut each step's clips to their first k chunks (k drawn per step), captioned as k-chunk videos",
    )
    ap.add_argument("--lora_rank", type=int, default=16, help="0: full fine-tune")
    ap.add_argument("--lora_alpha", type=float, default=None, help="default: the rank")
    ap.add_argument("--lora_targets", default="attn,cross,mlp")
    ap.add_argument(
        "--mesh", default=None, help="'data=2,model=4' (default: clips over the devices batch_size divides)"
    )
    ap.add_argument("--no_resume", action="store_true", help="start over even if --out has checkpoints")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from magi_jax.config import load_config
    from magi_jax.lora import LoRAError, save_lora
    from magi_jax.train_data import ClipData, DataError

    args = parse_args(argv)
    try:
        config = load_config(args.config_file or "tiny")
        lcfg = None
        if args.lora_rank > 0:
            alpha = float(args.lora_alpha if args.lora_alpha is not None else args.lora_rank)
            lcfg = LoRAConfig(args.lora_rank, alpha, LoRAConfig.parse_targets(args.lora_targets))
        tcfg = TrainConfig(
            learning_rate=args.lr,
            warmup_steps=args.warmup,
            total_steps=args.steps,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            master_dtype=args.master_dtype,
            seed=args.seed,
            save_every=args.save_every,
            objective=ObjectiveConfig(
                caption_dropout=args.caption_dropout, clean_context_prob=args.clean_context_prob, shortcut=args.shortcut
            ),
            lora=lcfg,
        )
        tcfg.check(config)
        data = ClipData(args.data, config, seed=args.seed, prefixes=args.prefixes)
        mesh = None
        if args.mesh:
            sizes = sharding.parse_mesh(args.mesh)
            mesh = sharding.make_mesh(sizes)
        elif jax.device_count() > 1:
            # default: clips over as many devices as the batch divides (a batch of 1 on 8 devices
            # runs on one, rather than refusing); --mesh or a larger batch uses them all
            sizes = {"data": math.gcd(args.batch_size, jax.device_count())}
            if sizes["data"] < jax.device_count():
                print(
                    f"note: training on {sizes['data']} of {jax.device_count()} devices (batch_size "
                    f"{args.batch_size}); pass --mesh or a batch_size that is a multiple of the device count",
                    file=sys.stderr,
                )
            mesh = sharding.make_mesh(sizes, jax.devices()[: sizes["data"]])
        if mesh is not None:
            if args.batch_size % sizes["data"]:
                raise TrainError(
                    f"batch_size ({args.batch_size}) must be a multiple of the data axis ({sizes['data']})"
                )
        if args.dit_ckpt:
            from magi_jax.dit_weights import load_dit

            model = load_dit(args.dit_ckpt, config.replace(runtime={"load": args.dit_ckpt}), mesh)
        else:
            from magi_jax.dit import DiT

            print("note: no --dit_ckpt: training a randomly initialised model", file=sys.stderr)
            model = DiT(
                config.model, fp8_quant=config.engine.fp8_quant, distill=config.engine.distill, rngs=nnx.Rngs(0)
            )
        trainer = Trainer(model, config, tcfg, mesh)
        state = fit(trainer, data, args.out, args.steps, resume=not args.no_resume)
        out = Path(args.out)
        if lcfg is not None:
            final = save_lora(trainer.model(state), lcfg, config, out / "adapter.lora", overwrite=True)
            print(f"wrote {out / 'adapter.lora'} ({final['parameters']} adapter parameters)", file=sys.stderr)
        else:
            merged = trainer.model(state)
            flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(merged))}
            checkpoint.save(flat, out / "dit.magi_jax", "dit", config.to_dict(), overwrite=True)
            print(f"wrote {out / 'dit.magi_jax'}", file=sys.stderr)
    except (TrainError, ConfigError, LoRAError, DataError, sharding.MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
