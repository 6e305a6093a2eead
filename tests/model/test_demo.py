"""Tests of the end-to-end demo (``python -m segnext_kernels.demo``), run in-process.

Without a CUDA device the fused model runs the Triton kernels in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1), so the input is kept tiny.
"""
import pytest
from PIL import Image

from segnext_kernels import demo


@pytest.mark.slow
def test_demo_runs_and_writes_png(tmp_path, capsys):
    out = tmp_path / "x.png"
    rc = demo.main(["--size", "40", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert out.is_file()
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert "MSCA modules fused: 13" in printed
    assert "argmax class-map agreement" in printed
    assert "RANDOM" in printed and "meaningless" in printed  # no checkpoint: says the class map means nothing


def test_demo_missing_image_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no_such_photo.jpg"
    out = tmp_path / "x.png"
    rc = demo.main(["--image", str(missing), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--image" in err and "no such file" in err and str(missing) in err
    assert not out.exists()


def test_demo_unreadable_image_and_bad_size(tmp_path, capsys):
    bogus = tmp_path / "not_an_image.jpg"
    bogus.write_text("plain text")
    assert demo.main(["--image", str(bogus), "--out", str(tmp_path / "x.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert demo.main(["--size", "16", "--out", str(tmp_path / "x.png")]) == 2
    assert "at least 32" in capsys.readouterr().err


def test_preprocess_keeps_aspect_and_normalises():
    img = Image.new("RGB", (90, 60), color=(123, 116, 103))
    x = demo._preprocess(img, 40)
    assert tuple(x.shape) == (1, 3, 40, 60)
    assert x.abs().max().item() < 0.02  # the official mean maps to ~0
