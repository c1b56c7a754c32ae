"""The HTML report: self-contained (no outside reference), pictures present, rendered by a
real headless browser; the PNG writer and the best-of marks against closed forms."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import zlib

import numpy as np
import pytest
from report_runs import shared_runs

from gradwatch._report.cli import EXIT_OK, main
from gradwatch._report.svg import png_rgb
from gradwatch._report.table import best_marks


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    runs = shared_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("html") / "report.html"
    dirs = [str(runs[k].logdir) for k in ("vanishing", "healthy", "monitor")]
    assert main(["report", *dirs, "--html", str(out)]) == EXIT_OK
    return out, out.read_text("utf-8")


def test_page_has_no_outside_reference(page):
    _, text = page
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(script|link|iframe|object|embed)\b", text)
    refs = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', text)
    refs += re.findall(r"url\(([^)]*)\)", text)
    assert refs and all(r.startswith(("data:", "#")) for r in refs)


def test_page_has_the_pictures_of_every_module(page):
    _, text = page
    # per module (one lane each): heatmap, profile, propagation, gain, horizon, verdict
    for module in ("rnn l0d0", "GRU l0d0"):
        assert f"{module}: log10 ||dL/dh_t|| over training" in text
        assert f"{module}: propagation at step 6" in text
    assert text.count("data:image/png;base64,") == 3  # one heatmap per run
    # + the clipping chart (healthy run) and the parameter-norm charts of the two Lightning
    # runs (GradWatch logs its cheap signals; the Monitor + PanelWriter loop did not)
    assert text.count("<svg") == 3 * 6 + 1 + 2
    assert "Comparison (last capture of each run)" in text


def decode_png(data: bytes) -> np.ndarray:
    """RGB pixels of a PNG written without filters (what `png_rgb` writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = np.frombuffer(data[16:24], dtype=">u4")
    idat = data.index(b"IDAT")
    length = int.from_bytes(data[idat - 4 : idat], "big")
    raw = zlib.decompress(data[idat + 4 : idat + 4 + length])
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


def test_png_writer_round_trips_through_matplotlib():
    mpl_image = pytest.importorskip("matplotlib.image")
    import io

    pixels = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    data = png_rgb(pixels)
    assert (decode_png(data) == pixels).all()
    read = mpl_image.imread(io.BytesIO(data), format="png")  # an independent decoder
    assert (np.round(read[..., :3] * 255).astype(np.uint8) == pixels).all()


def test_best_marks_closed_form():
    assert best_marks([0.5, 0.98, 1.5], kind="gain") == [False, True, False]
    # |log 0.5| = |log 2|: a tie, both marked
    assert best_marks([0.5, 2.0, math.nan], kind="gain") == [True, True, False]
    assert best_marks([3.0, math.inf, math.nan], kind="horizon") == [False, True, False]
    assert best_marks([math.nan], kind="horizon") == [False]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_page_renders_in_a_headless_browser(page, tmp_path):
    mpl_image = pytest.importorskip("matplotlib.image")
    path, _ = page
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1400,2400", f"--screenshot={shot}", path.as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    pixels = np.round(mpl_image.imread(str(shot))[..., :3] * 255).astype(int)
    assert pixels.shape[:2] == (2400, 1400)
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 200  # text, charts and the heatmap, not a blank or error page
    # the verdict colours of the summary tables are on the screen
    for rgb in ((0x1A, 0x7F, 0x37), (0xB3, 0x59, 0x00)):  # healthy, vanishing
        assert (np.abs(pixels - rgb).sum(-1) < 40).any(), rgb
    dom = subprocess.run(
        [*cmd[:-2], "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert dom.count("<svg") == 21 and "small_recurrent_weight" in dom
