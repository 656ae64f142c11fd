"""The edge runtime on real-world files: alpha, 16-bit, ICC/EXIF, animations, colour fix, folder
runs (skip-existing, dry-run), and a fuzz corpus through ``mordasr-run`` as a subprocess."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mordasr.errors import ImageError
from mordasr.runtime.cli import main as run_main
from mordasr.runtime.color import adain, color_fix, wavelet
from mordasr.runtime.images import read_image, read_image_full, write_image
from mordasr.runtime.png import decode_png16, encode_png

RNG = np.random.default_rng(7)
FAKE_ICC = b"\0\0\0\x18mordasr-test-icc-profile"


def _png16_filtered(pixels: np.ndarray, filters: list[int]) -> bytes:
    """A 16-bit PNG whose rows use the given filter types (a reference encoder for the test)."""
    h, w, c = pixels.shape
    bpp = 2 * c
    rows = [pixels[y].astype(">u2").tobytes() for y in range(h)]
    out = b""
    prev = bytes(len(rows[0]))
    for y, row in enumerate(rows):
        kind = filters[y % len(filters)]
        enc = bytearray()
        for i, byte in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            cc = prev[i - bpp] if i >= bpp else 0
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = a
            elif kind == 2:
                pred = b
            elif kind == 3:
                pred = (a + b) // 2
            else:
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else cc)
            enc.append((byte - pred) & 0xFF)
        out += bytes([kind]) + bytes(enc)
        prev = row

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(out)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 4])
def test_png16_decoder_handles_every_row_filter(tmp_path, channels):
    pixels = RNG.integers(0, 65536, (6, 5, channels), dtype=np.uint16)
    path = tmp_path / "f.png"
    path.write_bytes(_png16_filtered(pixels, [0, 1, 2, 3, 4]))
    decoded, icc = decode_png16(path.read_bytes())
    assert np.array_equal(decoded, pixels) and icc is None


def test_16bit_png_stays_16bit_with_alpha_and_icc(tmp_path):
    pixels = RNG.integers(0, 65536, (9, 7, 4), dtype=np.uint16)
    path = tmp_path / "in.png"
    path.write_bytes(encode_png(pixels, FAKE_ICC))
    decoded = read_image_full(path)
    assert decoded.bit_depth == 16 and decoded.icc_profile == FAKE_ICC
    assert np.array_equal(np.round(decoded.rgb * 65535).astype(np.uint16), pixels[..., :3])
    assert np.array_equal(np.round(decoded.alpha * 65535).astype(np.uint16), pixels[..., 3])
    out = tmp_path / "out.png"
    write_image(out, decoded.rgb, decoded.alpha, 16, decoded.icc_profile)
    again, icc = decode_png16(out.read_bytes())
    assert np.array_equal(again, pixels) and icc == FAKE_ICC
    # composited view for the network: over white
    flat = read_image(path)
    a = pixels[..., 3:] / 65535.0
    assert np.allclose(flat, pixels[..., :3] / 65535.0 * a + 1 - a, atol=1e-6)


def test_exif_orientation_applied_and_reset(tmp_path):
    pixels = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    exif[0x010F] = "mordasr-test-camera"
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100, icc_profile=FAKE_ICC)
    decoded = read_image_full(path)
    assert decoded.rgb.shape == (6, 4, 3) and decoded.icc_profile == FAKE_ICC
    out = tmp_path / "out.jpg"
    write_image(out, decoded.rgb, exif=decoded.exif, icc_profile=decoded.icc_profile)
    with Image.open(out) as written:
        assert written.getexif()[0x0112] == 1 and written.getexif()[0x010F] == "mordasr-test-camera"
        assert written.info["icc_profile"] == FAKE_ICC and written.size == (4, 6)


def test_alpha_goes_where_the_format_allows(tmp_path):
    rgb = RNG.uniform(0, 1, (5, 5, 3)).astype(np.float32)
    alpha = np.linspace(0, 1, 25, dtype=np.float32).reshape(5, 5)
    write_image(tmp_path / "a.png", rgb, alpha)
    write_image(tmp_path / "a.jpg", rgb, alpha)
    assert Image.open(tmp_path / "a.png").mode == "RGBA" and Image.open(tmp_path / "a.jpg").mode == "RGB"


def test_animation_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    decoded = read_image_full(tmp_path / "anim.gif")
    assert decoded.frames == 2 and decoded.rgb[0, 0, 0] > 0.9


def test_color_fixes_pull_toward_the_input():
    lr = RNG.uniform(0.3, 0.7, (16, 16, 3)).astype(np.float32)
    out = np.clip(np.kron(lr, np.ones((4, 4, 1))) * 0.6 + 0.3, 0, 1).astype(np.float32)  # colour shifted
    for method in ("adain", "wavelet"):
        fixed = color_fix(out, lr, method)
        assert fixed.shape == out.shape and np.isfinite(fixed).all()
        ref = np.kron(lr, np.ones((4, 4, 1)))
        assert np.abs(fixed.mean(axis=(0, 1)) - ref.mean(axis=(0, 1))).max() < \
            np.abs(out.mean(axis=(0, 1)) - ref.mean(axis=(0, 1))).max()
    same = RNG.uniform(0, 1, (32, 32, 3)).astype(np.float32)
    assert np.allclose(adain(same, same), same, atol=1e-4)
    assert np.allclose(wavelet(same, same), same, atol=1e-5)
    assert color_fix(out, lr, "none") is out
    with pytest.raises(ValueError):
        color_fix(out, lr, "histogram")


def _osediff_wavelet(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """OSEDiff's wavelet_color_fix as it is written there: a 3x3 binomial kernel dilated 1..16,
    replicate padding, high frequencies summed level by level."""
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float64) / 16

    def decompose(image):
        high, low = np.zeros_like(image), image
        for level in range(5):
            d = 2 ** level
            padded = np.pad(low, ((d, d), (d, d), (0, 0)), mode="edge")
            h, w = low.shape[:2]
            blurred = sum(kernel[i, j] * padded[i * d:i * d + h, j * d:j * d + w] for i in range(3) for j in range(3))
            high, low = high + (low - blurred), blurred
        return low, high

    return decompose(reference.astype(np.float64))[0] + decompose(output.astype(np.float64))[1]


def test_color_fixes_match_their_definitions_and_any_banding():
    """The wavelet fix equals OSEDiff's 2-D formulation (the runtime's is separable and uses the
    low-pass's linearity) within 1e-5; AdaIN's statistics are float64 (numpy's float32 mean of
    a 12 MP reference came out 0.015-0.04 low per channel, shifting colours by up to 12 levels);
    and both give the same rows bit for bit whatever bands the output arrives in, as a
    streamed restore hands them over, with the reference made a band at a time."""
    from mordasr.runtime.color import color_fix_bands
    from mordasr.runtime.images import Upsampled, resize

    lr = RNG.integers(0, 256, (29, 23, 3), dtype=np.uint8)
    height, width = 4 * 29, 4 * 23
    reference = resize(lr.astype(np.float32) / 255, width, height)
    out = np.clip(reference * 0.7 + 0.2 + RNG.normal(0, 0.05, reference.shape), 0, 1).astype(np.float32)
    assert np.abs(wavelet(out, reference) - _osediff_wavelet(out, reference)).max() < 1e-5
    mean, std = reference.astype(np.float64).mean(axis=(0, 1)), reference.astype(np.float64).std(axis=(0, 1))
    matched = adain(out, reference).astype(np.float64)
    assert np.allclose(matched.mean(axis=(0, 1)), mean, atol=1e-6)
    assert np.allclose(matched.std(axis=(0, 1)), std, atol=1e-4)  # eps = 1e-5 in the gain
    source = Upsampled(lr, width, height)
    for start, stop in ((0, height), (3, 50), (77, height)):
        assert np.array_equal(source.rows(start, stop), reference[start:stop])
    for method in ("adain", "wavelet"):
        whole = color_fix(out, lr, method)
        assert np.array_equal(whole, np.clip((adain if method == "adain" else wavelet)(out, reference), 0, 1))
        for cuts in ([height], [1] * height, [40, 1, 31, 44], [17] * 6 + [14]):
            bands = iter(np.split(out, np.cumsum(cuts)[:-1]))
            streamed = np.concatenate(list(color_fix_bands(bands, lr, method, width, height)))
            assert np.array_equal(streamed, whole), (method, cuts[:4])
        with pytest.raises(ValueError, match="got 100 rows of an image 116 rows high"):
            list(color_fix_bands(iter([out[:100]]), lr, method, width, height))
    # 4 MP: numpy's float32 mean over the image's rows and columns summed sequentially and came out
    # 0.003 low here (0.015-0.04 on a 12 MP output); float64 row sums land within 2e-5
    lr = RNG.integers(140, 167, (512, 512, 3), dtype=np.uint8)
    out = (0.4 + RNG.normal(0, 0.05, (2048, 2048, 3))).astype(np.float32)
    fixed = color_fix(out, lr, "adain").astype(np.float64).mean(axis=(0, 1))
    assert np.abs(fixed - (lr / 255).mean(axis=(0, 1))).max() < 5e-4


def test_folder_run_keeps_alpha_depth_and_resumes(folded_bundle, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(RNG.integers(0, 256, (12, 10, 4), dtype=np.uint8), "RGBA").save(src / "sub" / "a.png")
    (src / "b.png").write_bytes(encode_png(RNG.integers(0, 65536, (8, 8, 3), dtype=np.uint16)))
    out = tmp_path / "out"
    runner = CliRunner()
    dry = runner.invoke(run_main, [str(src), "-o", str(out), "--bundle", str(folded_bundle), "--dry-run"])
    assert dry.exit_code == 0 and "2 to restore" in dry.output and not out.exists()
    result = runner.invoke(run_main, [str(src), "-o", str(out), "--bundle", str(folded_bundle), "-q"])
    assert result.exit_code == 0, result.output
    with Image.open(out / "sub" / "a.png") as a:
        assert a.mode == "RGBA" and a.size == (40, 48)
    assert read_image_full(out / "b.png").bit_depth == 16
    stamp = (out / "b.png").stat().st_mtime_ns
    again = runner.invoke(run_main, [str(src), "-o", str(out), "--bundle", str(folded_bundle), "--skip-existing"])
    assert again.exit_code == 0 and "all 2 outputs exist" in again.output
    assert (out / "b.png").stat().st_mtime_ns == stamp


def test_png_and_jpeg_output_is_streamed_and_the_same_file_as_a_whole_write(folded_bundle, tmp_path, monkeypatch):
    """mordasr-run writes a tiled PNG or JPEG band by band as the tiles finish, and WebP, TIFF and
    BMP from the 8-bit image the bands fill (16-bit PNG too, EXIF and ICC kept, colour-fixed or
    not, alpha kept or composited): the file is byte-for-byte what the whole-image path
    (mordasr-serve's) encodes. A restore that fails after
    its first band leaves no file behind, and an output too large for its format (WebP here) is
    refused before anything is restored."""
    from mordasr.runtime.images import encode_image, upscale_alpha
    from mordasr.runtime.jobs import RestoreOptions, restore_file
    from mordasr.runtime.pipeline import Restorer, RestoreStream
    from mordasr.runtime.tiling import Tiling

    exif = Image.Exif()
    exif[0x010F] = "mordasr test camera"
    src = tmp_path / "photo.png"
    Image.fromarray(RNG.integers(0, 256, (37, 29, 3), dtype=np.uint8)).save(src, icc_profile=FAKE_ICC,
                                                                             exif=exif.tobytes())
    deep = tmp_path / "deep.png"
    deep.write_bytes(encode_png(RNG.integers(0, 65536, (20, 24, 3), dtype=np.uint16)))
    restorer = Restorer(folded_bundle, threads=1)
    options = RestoreOptions(tiling=Tiling(tile=16, overlap=4))
    streamed = []
    real_stream = Restorer.restore_stream
    monkeypatch.setattr(Restorer, "restore_stream", lambda *a, **k: streamed.append(1) or real_stream(*a, **k))
    for path in (src, deep):
        decoded = read_image_full(path)
        whole = restorer.restore(decoded.composited(), tiling=options.tiling).image
        for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("TIFF", ".tif"), ("BMP", ".bmp")):
            out = tmp_path / f"out-{path.stem}{suffix}"
            restored = restore_file(restorer, path, out, options)
            assert restored.image is None
            assert restored.output_size == (4 * decoded.rgb.shape[1], 4 * decoded.rgb.shape[0])
            expected = encode_image(whole, fmt, None, decoded.bit_depth, decoded.icc_profile, decoded.exif)
            assert out.read_bytes() == expected, (path.name, fmt)
    decoded = read_image_full(src)
    whole = restorer.restore(decoded.composited(), tiling=options.tiling).image
    for method in ("adain", "wavelet"):  # colour-fixed band by band (adain through a temporary file)
        out = tmp_path / f"fixed-{method}.jpg"
        restore_file(restorer, src, out, replace(options, color_fix=method))
        fixed = color_fix(whole, decoded.composited(), method)
        assert out.read_bytes() == encode_image(fixed, "JPEG", None, 8, decoded.icc_profile, decoded.exif), method
    rgba = tmp_path / "logo.png"  # kept alpha: a fourth channel in PNG, composited over white in JPEG
    pixels = RNG.integers(0, 256, (26, 21, 4), dtype=np.uint8)
    pixels[:8, :, 3] = 0
    Image.fromarray(pixels, "RGBA").save(rgba)
    decoded = read_image_full(rgba)
    restored_rgb = restorer.restore(decoded.rgb, tiling=options.tiling).image
    for fmt, method in (("PNG", "none"), ("JPEG", "none"), ("PNG", "wavelet"), ("WEBP", "none"), ("BMP", "adain")):
        out = tmp_path / f"logo-{method}.{fmt.lower()}"
        restore_file(restorer, rgba, out, replace(options, color_fix=method))
        fixed = color_fix(restored_rgb, decoded.rgb, method)
        alpha = upscale_alpha(decoded.alpha, 4 * 21, 4 * 26)
        assert out.read_bytes() == encode_image(fixed, fmt, alpha), (fmt, method)
    with Image.open(tmp_path / "logo-none.png") as img:
        assert img.mode == "RGBA" and np.asarray(img)[:28, :, 3].max() == 0
    assert len(streamed) == 17
    for suffix in (".png", ".jpg"):
        with Image.open(tmp_path / f"out-photo{suffix}") as img:
            assert img.info["icc_profile"] == FAKE_ICC and img.getexif()[0x010F] == "mordasr test camera"

    def failing_stream(self, image, bucket=None, tiling=Tiling(), on_tile=None):
        good = real_stream(self, image, bucket, tiling, on_tile)
        first = next(good.bands)
        broken = first.copy()
        broken[0, 0, 0] = np.nan
        return RestoreStream(iter([first, broken]), good.size, good.scores, good.bucket)

    monkeypatch.setattr(Restorer, "restore_stream", failing_stream)
    for suffix in (".png", ".jpg"):
        with pytest.raises(Exception, match="NaN"):
            restore_file(restorer, src, tmp_path / "failed" / f"x{suffix}", options)
    assert list((tmp_path / "failed").iterdir()) == []

    wide = tmp_path / "wide.png"  # 16400 px wide once restored: JPEG stops at 65500, WebP at 16383
    Image.new("RGB", (4100, 1), "gray").save(wide)
    restored_whole = []
    monkeypatch.setattr(Restorer, "restore_batch", lambda *a, **k: restored_whole.append(1))
    with pytest.raises(ImageError, match=r"wide.webp: a 16400x4 image is too large for WEBP \(at most 16383"):
        restore_file(restorer, wide, tmp_path / "wide.webp", options)
    assert restored_whole == [] and not (tmp_path / "wide.webp").exists()


def test_a_server_batch_encodes_large_images_band_by_band(folded_bundle, tmp_path, monkeypatch):
    """mordasr-serve's batch (``encode_restored``): an image large enough to be tiled is restored
    and encoded band by band into memory, the small ones through one ``restore_batch``; every
    payload is byte-for-byte the file mordasr-run writes for the same image and options."""
    from mordasr.runtime.jobs import RestoreOptions, encode_restored, restore_bytes, restore_file
    from mordasr.runtime.pipeline import Restorer
    from mordasr.runtime.tiling import Tiling

    restorer = Restorer(folded_bundle, threads=1)
    options = RestoreOptions(tiling=Tiling(tile=16, overlap=4), color_fix="wavelet")
    paths = []
    for name, size in (("large", (37, 29)), ("small", (12, 10)), ("other", (16, 8))):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(RNG.integers(0, 256, (*size, 3), dtype=np.uint8)).save(paths[-1])
    formats = ["JPEG", "PNG", "WEBP"]
    streamed, batched = [], []
    real_stream, real_batch = Restorer.restore_stream, Restorer.restore_batch
    monkeypatch.setattr(Restorer, "restore_stream", lambda self, image, *a, **k: streamed.append(image.shape)
                        or real_stream(self, image, *a, **k))
    monkeypatch.setattr(Restorer, "restore_batch", lambda self, images, *a, **k: batched.append(len(images))
                        or real_batch(self, images, *a, **k))
    answers = encode_restored(restorer, [(read_image_full(p), f) for p, f in zip(paths, formats)], options)
    assert streamed == [(37, 29, 3)] and batched == [2]
    for path, fmt, (payload, restored) in zip(paths, formats, answers):
        out = tmp_path / f"{path.stem}.{fmt.lower()}"
        restore_file(restorer, path, out, options)
        assert payload == out.read_bytes(), path.name
        assert restored.output_size == Image.open(out).size
    payload, _ = restore_bytes(restorer, paths[0].read_bytes(), options, "JPEG")
    assert payload == answers[0][0]


def test_exif_a_jpeg_cannot_hold_is_dropped_with_a_warning(folded_bundle, tmp_path):
    """EXIF lives in one 64 KiB APP1 segment of a JPEG: a larger block (a long description, a
    maker note) is left out of a JPEG output, said on stderr, and kept in a PNG output."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 70000  # ImageDescription
    src = tmp_path / "described.png"
    Image.fromarray(RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(src, exif=exif.tobytes())
    runner = CliRunner()
    for suffix in (".jpg", ".png"):
        result = runner.invoke(run_main, [str(src), "-o", str(tmp_path / f"out{suffix}"), "--bundle",
                                          str(folded_bundle)])
        assert result.exit_code == 0, result.output
        with Image.open(tmp_path / f"out{suffix}") as img:
            assert (img.getexif().get(0x010E) == "x" * 70000) == (suffix == ".png")
        warned = "mordasr-run: warning: the EXIF block (70046 bytes) is larger than a JPEG holds" in result.stderr
        assert warned == (suffix == ".jpg")
    quiet = runner.invoke(run_main, [str(src), "-o", str(tmp_path / "quiet.jpg"), "--bundle", str(folded_bundle),
                                     "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""


def _fuzz_corpus(folder):
    """Files a phone, a scanner or a broken copy produces; name -> whether it should restore."""
    folder.mkdir()
    good = Image.fromarray(RNG.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    buf = io.BytesIO()
    good.save(buf, format="PNG")
    png = buf.getvalue()
    cases = {}
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    cases["truncated.png"] = False
    (folder / "zero.jpg").write_bytes(b"")
    cases["zero.jpg"] = False
    (folder / "text.png").write_text("not an image")
    cases["text.png"] = False
    (folder / "png_named.jpg").write_bytes(png)
    cases["png_named.jpg"] = True  # decoded by content
    Image.new("RGB", (1, 1), "gray").save(folder / "one.png")
    cases["one.png"] = True
    Image.new("RGB", (300, 2), "gray").save(folder / "wide.png")
    cases["wide.png"] = True
    (folder / "deep.png").write_bytes(encode_png(RNG.integers(0, 65536, (6, 6, 3), dtype=np.uint16)))
    cases["deep.png"] = True
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(folder / "cmyk.jpg")
    cases["cmyk.jpg"] = True
    rotated = Image.new("RGB", (8, 4), "white")
    exif = rotated.getexif()
    exif[0x0112] = 8
    rotated.save(folder / "rotated.jpg", exif=exif)
    cases["rotated.jpg"] = True
    frames = [Image.new("P", (8, 8), i) for i in (1, 2)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    cases["anim.gif"] = True
    # a PNG declaring 100000 x 100000 pixels (a decompression bomb) with a few bytes of data
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    (folder / "bomb.png").write_bytes(bomb)
    cases["bomb.png"] = False
    return cases


def test_fuzz_corpus_through_the_cli(folded_bundle, tmp_path):
    cases = _fuzz_corpus(tmp_path / "fuzz")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "mordasr.runtime.cli", str(tmp_path / "fuzz"), "-o", str(out),
                           "--bundle", str(folded_bundle), "--tile", "64"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr  # some failed, the rest were written
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    summary = proc.stderr[proc.stderr.index("images failed:"):]
    for name, ok in cases.items():
        written = list(out.glob(name.rsplit(".", 1)[0] + ".*"))
        if ok:
            assert written, f"{name} was not restored: {proc.stderr}"
        else:
            assert not written, name
            line = next(ln for ln in summary.splitlines() if name in ln)
            assert line.strip().count(str(tmp_path)) == 1 and len(line) < 300  # one line: path, reason
    assert "exceeds the limit" in summary or "decompression bomb" in summary
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no partial or temp files
    with Image.open(out / "rotated.jpg") as r:
        assert r.size == (16, 32)  # EXIF orientation 8 turned 8x4 into 4x8 before the x4 upscale
