"""Experiment: training clips cut to their first k chunks (k uniform in 1..R), so a chunk's
duration token means what it means at generation (chunks left in *this* video)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout
from magi_jax import train_data, world_model
from magi_jax.objective import Clip
from magi_jax.special_tokens import caption_side


class Trunc(train_data.ClipData):
    def cut(self, i, k):
        m, rt = self.config.model, self.config.runtime
        with np.load(self.folder / self.items[i]["file"]) as z:
            lat, tok = z["latents"].astype(np.float32), z["caption"].astype(np.float32)
        L = m.caption_max_length
        emb = np.zeros((1, 1, L, m.caption_channels), np.float32)
        mask = np.zeros((1, L), np.float32)
        n = min(len(tok), L)
        emb[0, 0, :n], mask[0, :n] = tok[:n], 1
        null = np.zeros((1, L, m.caption_channels), np.float32)
        cap, cm = caption_side(emb, mask, null, k, 0, rt, self.table, max_len=L)
        return lat[:, : k * rt.chunk_width], cap[0], cm[0]

    def batch(self, step, size):
        k = int(np.random.default_rng([7, step]).integers(1, self.chunks + 1))
        rows = [self.cut(i, k) for i in self.indices(step, size)]
        return Clip(*(np.stack([r[j] for r in rows]) for j in range(3)))


train_data.ClipData = Trunc
config = world_model.with_bundled_weights(world_model.load_config("tiny"), Path("/tmp/trunc/out"))
rep = world_model.train_dit(
    config, world_model.Recipe(), Path("/tmp/trunc/out/dit"), Path("/tmp/trunc/work"), lambda m: print(m, flush=True)
)
print(rep)
