"""Tiling: every pixel covered, an identity model reproduced, seams invisible, and the tiled
pipeline close to the untiled one where the image fits in one piece."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mordasr.runtime import Restorer
from mordasr.runtime.tiling import TiledBlend, Tiling, tile_starts, tiled_apply, window


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 400), tile_units=st.integers(1, 40), overlap_frac=st.floats(0, 0.9),
       multiple=st.sampled_from([1, 2, 4, 8]))
def test_tiles_cover_everything_with_the_overlap(length, tile_units, overlap_frac, multiple):
    tile = tile_units * multiple
    overlap = int(overlap_frac * tile) if tile > 1 else 0
    overlap = min(overlap, tile - 1)
    starts = tile_starts(length, tile, overlap, multiple)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert all(s % multiple == 0 for s in starts)
    covered = np.zeros(max(length, starts[-1] + tile), bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered[:length].all()  # every pixel is covered
    for a, b in zip(starts, starts[1:]):  # neighbours overlap by at least the request (rounded to the grid)
        assert a + tile - b >= min(overlap, tile - multiple) // multiple * multiple
    assert starts[-1] < length


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 70), width=st.integers(1, 70), tile_units=st.integers(1, 8),
       overlap_units=st.integers(0, 4), factor=st.sampled_from([1, 2, 4]),
       multiple=st.sampled_from([1, 2, 4]), kind=st.sampled_from(["gaussian", "linear"]))
def test_identity_model_is_reproduced(height, width, tile_units, overlap_units, factor, multiple, kind):
    """With fn = nearest upsampling by ``factor``, blending returns exactly the upsampled input."""
    tile = tile_units * multiple * 2
    overlap = min(overlap_units * multiple, tile - multiple)
    rng = np.random.default_rng(height * 100 + width)
    x = rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)
    seen = []

    def upsample(t, origin):
        seen.append(origin)
        assert t.shape[-2] % multiple == 0 and t.shape[-1] % multiple == 0
        return t.repeat(factor, axis=2).repeat(factor, axis=3)

    out = tiled_apply(upsample, x, tile, overlap, factor, multiple, kind)
    expected = x.repeat(factor, axis=2).repeat(factor, axis=3)
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= 1e-6  # float rounding of w*x/w only
    assert len(seen) == len(set(seen))


def test_blending_holds_one_output_sized_buffer():
    """Tracked numpy allocations while blending 121 tiles into a 2048x2048 RGB output: the float32
    output (12 bytes a pixel) plus tile-sized temporaries, no second full-size buffer (the summed
    blend weights are the outer product of two vectors)."""
    import tracemalloc

    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 512, 512)).astype(np.float32)
    output_bytes = 3 * 2048 * 2048 * 4
    tracemalloc.start()
    try:
        out = tiled_apply(lambda t, origin: t.repeat(4, axis=2).repeat(4, axis=3), x, 64, 16, 4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (1, 3, 2048, 2048)
    assert peak < output_bytes * 1.15, peak / output_bytes


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 90), width=st.integers(1, 40), tile_units=st.integers(1, 6),
       overlap_units=st.integers(0, 3), factor=st.sampled_from([1, 2, 4]), multiple=st.sampled_from([1, 2, 4]),
       kind=st.sampled_from(["gaussian", "linear"]))
def test_bands_are_the_blended_output_bit_for_bit(height, width, tile_units, overlap_units, factor, multiple, kind):
    """The finished rows handed over band by band, top to bottom, are exactly the rows of the
    one-buffer blend (same additions in the same order), and cover it once."""
    tile = tile_units * multiple * 2
    overlap = min(overlap_units * multiple, tile - multiple)
    x = np.random.default_rng(height * 100 + width).uniform(0, 1, (1, 3, height, width)).astype(np.float32)

    def model(t, origin):  # not an identity: each tile's output depends on where it lies
        return np.sin(3 * t.repeat(factor, axis=2).repeat(factor, axis=3) + origin[0] - origin[1])

    whole = tiled_apply(model, x, tile, overlap, factor, multiple, kind)
    bands = [band.copy() for band in TiledBlend(model, x, tile, overlap, factor, multiple, kind).bands()]
    assert all(len(band[0, 0]) for band in bands)
    assert np.array_equal(np.concatenate(bands, axis=2), whole)


def test_bands_hold_two_rows_of_tiles_however_tall_the_image():
    """Tracked numpy allocations while taking a 512 px wide output band by band: the same peak
    for 2048 and 8192 rows (one row of tiles' output, 256 rows, and tile-sized temporaries)."""
    import tracemalloc

    def peak(lr_height: int) -> int:
        x = np.random.default_rng(0).uniform(0, 1, (1, 3, lr_height, 128)).astype(np.float32)
        blend = TiledBlend(lambda t, origin: t.repeat(4, axis=2).repeat(4, axis=3), x, 64, 16, 4)
        tracemalloc.start()
        try:
            rows = sum(len(band[0, 0]) for band in blend.bands())
            _, top = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert rows == 4 * lr_height
        return top

    short, tall = peak(512), peak(2048)
    tall_output_bytes = 3 * 8192 * 512 * 4
    assert tall < 1.05 * short and tall < 0.2 * tall_output_bytes, (short, tall)


def test_windows_are_positive_and_peak_in_the_middle():
    for kind in ("gaussian", "linear"):
        w = window(16, 10, kind)
        assert w.shape == (16, 10) and (w > 0).all()
        assert w[8, 5] == w.max() and w[0, 0] < w[8, 5]
    with pytest.raises(ValueError):
        window(4, 4, "box")


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory):
    """The shipped, trained tiny base (adapters at their zero init), exported gated."""
    from mordasr.export.buckets import grid_buckets
    from mordasr.export.bundle import export_bundle
    from mordasr.model.io import base_path, load_checkpoint

    model, _ = load_checkpoint(base_path("tiny"), adapter="mor")
    path = tmp_path_factory.mktemp("base") / "bundle"
    export_bundle(model, path, "gated", grid_buckets(1, [p[0] for p in model.config.prompts]))
    return path


def test_tiled_restore_matches_untiled(base_bundle):
    """An image 4x the tile side, tiled vs in one piece. The tiny UNet has self-attention over
    the whole latent, so tiles see less context and the agreement is close, not exact. Stated
    tolerance (measured 31 dB): PSNR(tiled, untiled) above 28 dB, and no visible seam."""
    from mordasr.data.samples import load_sample_image

    image = np.ascontiguousarray(load_sample_image("astronaut")[::4, ::4][:128, :128], dtype=np.float32)
    restorer = Restorer(base_bundle)
    whole = restorer.restore(image, tiling=Tiling(tile=0)).image
    tiled = restorer.restore(image, tiling=Tiling(tile=32, overlap=16)).image
    assert tiled.shape == whole.shape == (512, 512, 3)
    mse = float(np.mean((tiled - whole) ** 2))
    psnr = 10 * np.log10(1.0 / max(mse, 1e-12))
    assert psnr > 28, psnr
    # no seam: the error on rows and columns where tiles meet is not far above the average
    err_rows = np.abs(tiled - whole).mean(axis=(1, 2))
    err_cols = np.abs(tiled - whole).mean(axis=(0, 2))
    seams = [4 * (16 * k + 8) for k in range(1, 7)]  # centres of the LR overlaps, in output pixels
    assert err_rows[seams].mean() < 2 * err_rows.mean() and err_cols[seams].mean() < 2 * err_cols.mean()


def test_streamed_restore_is_the_restore_in_bands(gated_bundle):
    """``restore_stream`` hands over the rows ``restore`` returns, bit for bit: tiled (odd sizes,
    cropped) and in one piece."""
    image = np.random.default_rng(3).uniform(0, 1, (70, 45, 3)).astype(np.float32)
    restorer = Restorer(gated_bundle)
    for tiling in (Tiling(tile=16, overlap=4), Tiling(tile=0)):
        expected = restorer.restore(image, tiling=tiling)
        stream = restorer.restore_stream(image, tiling=tiling)
        rows = np.concatenate([band.copy() for band in stream.bands])
        assert stream.size == (280, 180) and np.array_equal(rows, expected.image)
        assert np.array_equal(stream.scores, expected.scores) and stream.bucket == expected.bucket


def test_tiled_restore_holds_one_output_sized_buffer(gated_bundle):
    """A tiled restore hands out a view of its one blend buffer: tracked numpy allocations peak
    near the float32 output (12 bytes a pixel) plus one tile's graph outputs, not twice it."""
    import tracemalloc

    image = np.random.default_rng(2).uniform(0, 1, (192, 192, 3)).astype(np.float32)
    restorer = Restorer(gated_bundle)
    restorer.restore(image[:32, :32])  # sessions opened outside the measurement
    tracemalloc.start()
    try:
        out = restorer.restore(image, tiling=Tiling(tile=32, overlap=8)).image
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    output_bytes = out.size * 4
    assert out.shape == (768, 768, 3)
    assert peak < output_bytes * 1.25, peak / output_bytes


def test_tile_routing_and_default_tile(gated_bundle, folded_bundle):
    restorer = Restorer(folded_bundle)
    assert restorer.default_tile() == 512 // 4  # profile max output / scale (tiny preset)
    image = np.random.default_rng(1).uniform(0, 1, (40, 24, 3)).astype(np.float32)
    per_tile = restorer.restore(image, tiling=Tiling(tile=16, per_tile_routing=True))
    assert per_tile.bucket is None and per_tile.image.shape == (160, 96, 3)
    gated = Restorer(gated_bundle).restore(image, tiling=Tiling(tile=16, overlap=4, window="linear"))
    assert np.isfinite(gated.image).all() and gated.image.shape == (160, 96, 3)


_RSS = """
import json, sys, numpy as np
from mordasr.runtime import Restorer
from mordasr.runtime.tiling import Tiling
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
r = Restorer(sys.argv[1])
image = np.random.default_rng(0).uniform(0, 1, (int(sys.argv[2]), int(sys.argv[2]), 3)).astype(np.float32)
r.restore(image, bucket=0, tiling=Tiling(tile=int(sys.argv[3])))
print(json.dumps({"peak_mib": hwm() / 1024}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_peak_memory_is_bounded_by_the_tile(folded_bundle, capsys):
    def peak(side: int, tile: int) -> float:
        proc = subprocess.run([sys.executable, "-c", _RSS, str(folded_bundle), str(side), str(tile)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-500:]
        return json.loads(proc.stdout.splitlines()[-1])["peak_mib"]

    untiled, tiled, tiled_large = peak(96, 0), peak(96, 32), peak(384, 32)
    with capsys.disabled():
        print(f"\npeak RSS: 96 px LR untiled {untiled:.0f} MiB, tiled (32 px) {tiled:.0f} MiB; "
              f"384 px LR (1536 px out) tiled {tiled_large:.0f} MiB")
    assert tiled < untiled
    # 16x the pixels, nearly the same peak: the tile bounds the working memory (the full-size
    # latent and output accumulators are the only parts that grow)
    assert tiled_large < tiled + 300
