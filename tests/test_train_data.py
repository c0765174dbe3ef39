"""Training data and the command lines: videos + captions -> cached shards (bad files skipped
by name) -> deterministic shuffled batches -> python -m magi_jax.train (LoRA, resume)."""

import json

import imageio_ffmpeg
import numpy as np
import pytest

from magi_jax.config import load_config
from magi_jax.train_data import ClipData, DataError, find_sources, prepare
from magi_jax.vae import WORLD as VAE

CFG = load_config("tiny")


def _mp4(path, frames, size=(64, 64), seed=0):
    rng = np.random.default_rng(seed)
    writer = imageio_ffmpeg.write_frames(str(path), size, fps=24, macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for i in range(frames):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[:, :] = rng.integers(0, 255, 3)
        frame[8 + i % 40 : 24 + i % 40, 10:30] = 255  # a moving bar
        writer.send(frame)
    writer.close()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    for i, name in enumerate(("walk", "run", "jump")):
        _mp4(d / f"{name}.mp4", 40, seed=i)
        (d / f"{name}.txt").write_text(f"a person doing a {name}\n")
    _mp4(d / "short.mp4", 10)
    (d / "short.txt").write_text("too short")
    _mp4(d / "nocaption.mp4", 40)
    (d / "broken.mp4").write_bytes(b"not a video at all")
    (d / "broken.txt").write_text("broken")
    return d


@pytest.fixture(scope="module")
def prepared(videos, tmp_path_factory):
    from magi_jax.pipeline import text_encoder, vae_model

    out = tmp_path_factory.mktemp("data")
    with text_encoder(CFG, True) as text:
        result = prepare(find_sources(videos), out, CFG, vae_model(CFG, True), text, progress=False)
    return out, result


def test_bad_files_are_reported_by_name_and_skipped(prepared, capsys):
    out, result = prepared
    assert result["clips"] == 3
    skipped = {s.split("/")[-1]: why for s, why in result["skipped"]}
    assert set(skipped) == {"short.mp4", "nocaption.mp4", "broken.mp4"}
    assert "10 frames" in skipped["short.mp4"] and "caption" in skipped["nocaption.mp4"]
    assert (out / "skipped.txt").read_text().count("\n") == 3
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in index) == ["jump", "run", "walk"]
    assert not list(out.glob("clips/*.tmp*"))


def test_batches_are_deterministic_shuffled_epochs(prepared):
    out, _ = prepared
    data = ClipData(out, CFG, seed=1)
    batch = data.batch(0, 2)
    m = CFG.model
    rt = CFG.runtime
    latent_hw = (rt.video_size_h // VAE.patch_size, rt.video_size_w // VAE.patch_size)
    assert batch.latents.shape == (2, m.latent_channels, rt.num_frames // rt.temporal_downsample_factor, *latent_hw)
    assert batch.caption.shape == (2, 4, m.caption_max_length, m.caption_channels)
    assert batch.caption_mask.shape == (2, 4, m.caption_max_length)
    # the sampler's caption format: quality and duration tokens in front of the T5 tokens
    assert batch.caption_mask[0, 0].sum() > 0 and batch.caption_mask[0, 0, :2].all()
    # every epoch is a permutation of the clips; the batch of a step never changes
    seen = [data.indices(s, 1)[0] for s in range(9)]
    for e in range(3):
        assert sorted(seen[3 * e : 3 * e + 3]) == [0, 1, 2]
    assert len({tuple(seen[3 * e : 3 * e + 3]) for e in range(3)}) > 1  # reshuffled
    np.testing.assert_array_equal(ClipData(out, CFG, seed=1).batch(4, 2).latents, data.batch(4, 2).latents)


def test_prefix_batches_are_the_short_videos_the_sampler_makes(prepared):
    """With prefixes, a step's clips are their first k chunks (k seeded per step, every k in
    1..R drawn), captioned as a k-chunk video: the first chunk's duration token says k - 1
    chunks follow, as it does when the generate command makes k chunks."""
    from magi_jax.special_tokens import caption_side, token_table

    out, _ = prepared
    whole, cut = ClipData(out, CFG, seed=1), ClipData(out, CFG, seed=1, prefixes=True)
    rt, width = CFG.runtime, CFG.runtime.chunk_width
    ks = [cut.chunks_at(s) for s in range(40)]
    assert set(ks) == set(range(1, whole.chunks + 1)) and ks == [cut.chunks_at(s) for s in range(40)]
    step = next(s for s, k in enumerate(ks) if k == 2)
    batch, full = cut.batch(step, 2), whole.batch(step, 2)
    assert batch.latents.shape[2] == 2 * width and batch.caption.shape[1] == 2
    np.testing.assert_array_equal(batch.latents, full.latents[:, :, : 2 * width])  # the same clips, cut
    # the duration token in front differs from the whole clip's first chunk, and matches the
    # caption the sampler builds for a 2-chunk video from the same tokens
    assert not np.array_equal(batch.caption[0, 0, 0], full.caption[0, 0, 0])
    np.testing.assert_array_equal(batch.caption[0, 0, 0], full.caption[0, 2, 0])  # 1 chunk left
    np.testing.assert_array_equal(batch.caption[:, :, 1:], full.caption[:, :2, 1:])
    m = CFG.model
    latents, emb, mask, _ = cut._load(cut.indices(step, 2)[0])
    null = np.zeros((1, m.caption_max_length, m.caption_channels), np.float32)
    want, _ = caption_side(
        emb, mask[:, 0], null, 2, 0, rt, token_table(channels=m.caption_channels), m.caption_max_length
    )
    np.testing.assert_array_equal(batch.caption[0], want[0])


def test_dataset_for_another_model_is_refused(prepared):
    out, _ = prepared
    with pytest.raises(DataError, match="caption channels"):
        ClipData(out, CFG.replace(model=dict(caption_channels=48)))
    with pytest.raises(DataError, match="not a prepared dataset"):
        ClipData(out / "clips", CFG)
    with pytest.raises(DataError, match="no .mp4"):
        find_sources(out)


def test_jsonl_sources(tmp_path, videos):
    lines = [{"video": str(videos / "walk.mp4"), "caption": "walking"}, {"video": "rel/run.mp4", "caption": ""}]
    f = tmp_path / "list.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    src = find_sources(f)
    assert [s.caption for s in src] == ["walking", None] and src[1].video == tmp_path / "rel" / "run.mp4"
    f.write_text('{"clip": 1}\n')
    with pytest.raises(DataError, match="list.jsonl:1"):
        find_sources(f)


def test_a_caption_per_chunk(tmp_path, videos, prepared):
    """A JSONL caption may be a list, one per chunk: each chunk's row of a batch holds its own
    caption (a single caption is every chunk's); a list of the wrong length is skipped by name."""
    from magi_jax.pipeline import text_encoder, vae_model

    per_chunk = ["a person stands", "a person walks", "a person walks", "a person sits"]
    lines = [
        {"video": str(videos / "walk.mp4"), "caption": per_chunk},
        {"video": str(videos / "run.mp4"), "caption": per_chunk[:3]},
    ]
    f = tmp_path / "list.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    src = find_sources(f)
    assert src[0].caption == tuple(per_chunk)
    out = tmp_path / "data"
    with text_encoder(CFG, True) as text:
        result = prepare(src, out, CFG, vae_model(CFG, True), text, progress=False)
    assert result["clips"] == 1 and "3 per-chunk captions for 4 chunks" in result["skipped"][0][1]
    cap, mask = ClipData(out, CFG).clip(0)[1:]
    single, single_mask = ClipData(prepared[0], CFG).clip(0)[1:]  # "a person doing a ..."
    assert cap.shape == single.shape and mask.shape == single_mask.shape
    # same words, same row but for the chunks-left token in front; other words, another row
    np.testing.assert_array_equal(cap[1, 1:], cap[2, 1:])
    assert not np.array_equal(cap[0, 1:], cap[1, 1:]) and not np.array_equal(cap[1, 1:], cap[3, 1:])
    # each row is that chunk's caption as the sampler would encode it alone, behind the same
    # special tokens (quality, the chunk's duration) a single caption gets
    with text_encoder(CFG, True) as text:
        emb, emb_mask = text.encode([per_chunk[3]], CFG.model.caption_max_length)
    n, tokens = int(np.asarray(emb_mask[0]).sum()), int(mask[3].sum())
    np.testing.assert_array_equal(cap[3, tokens - n : tokens], np.asarray(emb[0, :n], np.float16).astype(np.float32))
    np.testing.assert_array_equal(cap[:, : tokens - n], single[:, : tokens - n])


@pytest.mark.slow
def test_train_command_writes_an_adapter_and_resumes(prepared, tmp_path, capsys):
    from magi_jax.train import checkpoints, main

    data, _ = prepared
    run = tmp_path / "run"
    args = ["--data", str(data), "--out", str(run), "--lora_rank", "2", "--save_every", "2", "--warmup", "1"]
    assert main([*args, "--steps", "2"]) == 0
    assert (run / "adapter.lora" / "magi_jax.json").exists()
    assert [p.name for p in checkpoints(run)] == ["step_00000002"]
    assert main([*args, "--steps", "3"]) == 0  # picks up at step 2
    err = capsys.readouterr().err
    assert "trained steps 2..3" in err
    assert main([*args, "--steps", "3", "--lora_targets", "ffn"]) == 2
    assert "unknown LoRA target" in capsys.readouterr().err
