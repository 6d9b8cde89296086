"""``ppml show``: the plain | RS | MI grid (layout, exact cell contents, errors) and its input loaders."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import ppml
from ppml.cli import main
from ppml.show import SEPARATOR, add_show_parser, header_height, load_inputs, make_grid_image, run_show

RS = (32, 16, 8)
NCOLS = len(RS) + 2


def _images(b: int = 2, s: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8)


def _cell(grid, row: int, col: int, s: int, labels: bool = True) -> torch.Tensor:
    """Cell (row, col) of a grid image as uint8 [3, s, s]."""
    top = header_height(s) + SEPARATOR if labels else 0
    x, y = col * (s + SEPARATOR), top + row * (s + SEPARATOR)
    arr = np.asarray(grid.convert("RGB"))[y : y + s, x : x + s]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _sorted_patches(img: torch.Tensor, p: int) -> list[bytes]:
    c, h, w = img.shape
    tiles = img.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c * p * p)
    return sorted(t.numpy().tobytes() for t in tiles)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ppml")
    add_show_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["show", *argv])


def _read(path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


def _write_png(path, rgb, size=(40, 24)) -> None:
    Image.new("RGB", size, rgb).save(path)


# ---- the grid ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,s,labels", [(1, 32, True), (3, 64, True), (2, 64, False)])
def test_grid_pixel_size(b, s, labels):
    grid = make_grid_image(_images(b, s), generator=torch.Generator().manual_seed(0), labels=labels)
    assert grid.mode == "RGB"
    assert grid.width == NCOLS * s + (NCOLS - 1) * SEPARATOR
    assert grid.height == b * s + (b - 1) * SEPARATOR + ((header_height(s) + SEPARATOR) if labels else 0)
    arr = np.asarray(grid)
    if labels:  # the header holds dark title text over every column; the separator below it is white
        header = arr[: header_height(s)]
        for c in range(NCOLS):
            assert header[:, c * (s + SEPARATOR) : c * (s + SEPARATOR) + s].min() < 128, c
        assert (arr[header_height(s) : header_height(s) + SEPARATOR] == 255).all()
    for c in range(1, NCOLS):  # white vertical separators
        assert (arr[:, c * (s + SEPARATOR) - SEPARATOR : c * (s + SEPARATOR)] == 255).all()


def test_plain_column_is_the_input():
    x = _images(3, 64)
    grid = make_grid_image(x, generator=torch.Generator().manual_seed(1))
    for b in range(3):
        assert torch.equal(_cell(grid, b, 0, 64), x[b])


def test_rs_columns_permute_patches_and_are_not_the_identity():
    x = _images(2, 64, seed=3)
    grid = make_grid_image(x, generator=torch.Generator().manual_seed(0))
    for i, p in enumerate(RS):
        for b in range(2):
            cell = _cell(grid, b, 1 + i, 64)
            assert _sorted_patches(cell, p) == _sorted_patches(x[b], p), (p, b)
            assert not torch.equal(cell, x[b]), (p, b)


def test_rs_keys_follow_the_generator():
    x = _images(2, 64)
    a = np.asarray(make_grid_image(x, generator=torch.Generator().manual_seed(5)))
    b = np.asarray(make_grid_image(x, generator=torch.Generator().manual_seed(5)))
    c = np.asarray(make_grid_image(x, generator=torch.Generator().manual_seed(6)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_mi_column_is_rounded_upscaled_mix():
    x = _images(2, 64, seed=4)
    grid = make_grid_image(x, generator=torch.Generator().manual_seed(0))
    mixed = torch.round(ppml.mix_subpatches(x, patch_size=16, grid=2)).clamp(0, 255).to(torch.uint8)
    expected = mixed.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    for b in range(2):
        assert torch.equal(_cell(grid, b, NCOLS - 1, 64), expected[b])


def test_mi_rounds_half_to_even():
    # One 16×16 patch per 16 pixels along W; its four 8×8 sub-patches hold (0, 0, 0, v), so the mean is v / 4:
    # v=2 → 0.5 → 0, v=6 → 1.5 → 2, v=10 → 2.5 → 2 (round half up would give 1, 2, 3).
    x = torch.zeros(1, 3, 32, 48, dtype=torch.uint8)
    for j, v in enumerate((2, 6, 10)):
        x[..., 8:16, 16 * j + 8 : 16 * j + 16] = v  # bottom-right sub-patch of patch (0, j)
    assert ppml.mix_subpatches(x, 16, 2)[0, 0, 0, ::8].tolist() == [0.5, 1.5, 2.5]
    grid = make_grid_image(x, rs_patches=(16, 8), generator=torch.Generator().manual_seed(0), labels=False)
    w = 48
    mi = np.asarray(grid)[:32, 3 * (w + SEPARATOR) : 3 * (w + SEPARATOR) + w, 0]
    assert mi[0, ::16].tolist() == [0, 2, 2]
    assert (mi[:16, :16] == 0).all() and (mi[:16, 16:32] == 2).all() and (mi[:16, 32:] == 2).all()


def test_grid_errors():
    with pytest.raises(ValueError, match=r"images' H and W must be divisible .*40.*not divisible by 16"):
        make_grid_image(_images(1, 40))
    with pytest.raises(ValueError, match=r"make_grid_image: images must be a uint8 tensor \[B, 3, H, W\], got "):
        make_grid_image(_images(1, 32).float())
    with pytest.raises(ValueError, match=r"uint8 tensor \[B, 3, H, W\], got torch.uint8 \[1, 1, 32, 32\]"):
        make_grid_image(_images(1, 32)[:, :1])
    with pytest.raises(ValueError, match=r"mi_grid must divide mi_patch, got mi_grid=3 for mi_patch=16"):
        make_grid_image(_images(1, 32), mi_grid=3)
    with pytest.raises(ValueError, match=r"at least one non-empty image"):
        make_grid_image(_images(0, 32))


# ---- the command -------------------------------------------------------------------------------------------------


def test_run_show_writes_png_and_refuses_to_overwrite(tmp_path, capsys):
    _write_png(tmp_path / "red.png", (255, 0, 0))
    _write_png(tmp_path / "green.png", (0, 255, 0))
    out = tmp_path / "figs" / "sub" / "grid.png"
    args = _parse([str(tmp_path / "red.png"), str(tmp_path / "green.png"), "--out", str(out), "--size", "32",
                   "--seed", "0"])
    assert args.func is run_show
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    grid = _read(out)
    assert grid.size == (NCOLS * 32 + (NCOLS - 1) * SEPARATOR, header_height(32) + SEPARATOR + 2 * 32 + SEPARATOR)
    assert str(out) in printed and f"{grid.width}×{grid.height}" in printed
    green = torch.tensor([0, 255, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32)
    assert torch.equal(_cell(grid, 1, 0, 32), green)

    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"ppml show: --out .*grid.png' already exists; pass --force"):
        run_show(args)
    assert out.read_bytes() == before
    forced = _parse([str(tmp_path / "red.png"), "--out", str(out), "--size", "32", "--force"])
    assert run_show(forced) == 0
    assert _read(out).height == header_height(32) + SEPARATOR + 32


def test_run_show_colors_makes_a_palette_png(tmp_path):
    x = _images(1, 64)
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(tmp_path / "noise.png")
    out = tmp_path / "p.png"
    assert run_show(_parse([str(tmp_path / "noise.png"), "--out", str(out), "--size", "64", "--colors", "16"])) == 0
    palette = _read(out)
    assert palette.mode == "P" and len(palette.getcolors()) <= 16


def test_run_show_errors(tmp_path):
    img = tmp_path / "a.png"
    _write_png(img, (1, 2, 3))
    with pytest.raises(ValueError, match=r"ppml show: --size must be divisible by every patch size .*got 100 "):
        run_show(_parse([str(img), "--out", str(tmp_path / "g.png"), "--size", "100"]))
    with pytest.raises(FileNotFoundError, match=r"ppml show: INPUT '.*nope' is not an existing image file or folder"):
        run_show(_parse([str(tmp_path / "nope"), "--out", str(tmp_path / "g.png"), "--size", "32"]))
    with pytest.raises(ValueError, match=r"ppml show: --out must name a .png file.*g.jpg"):
        run_show(_parse([str(img), "--out", str(tmp_path / "g.jpg"), "--size", "32"]))
    with pytest.raises(ValueError, match=r"ppml show: --count must be a positive int, got 0"):
        run_show(_parse([str(img), "--out", str(tmp_path / "g.png"), "--count", "0"]))
    with pytest.raises(ValueError, match=r"ppml show: --colors must be an int in 2..256"):
        run_show(_parse([str(img), "--out", str(tmp_path / "g.png"), "--colors", "300"]))
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(SystemExit):  # --out is required
        _parse([str(img)])


def test_main_reports_errors_with_exit_code_2(tmp_path, capsys):
    assert main(["show", str(tmp_path / "nope"), "--out", str(tmp_path / "g.png"), "--size", "32"]) == 2
    assert "error: ppml show: INPUT '" in capsys.readouterr().err
    _write_png(tmp_path / "a.png", (9, 9, 9))
    assert main(["show", str(tmp_path / "a.png"), "--out", str(tmp_path / "g.png"), "--size", "32", "--seed", "1"]) == 0
    assert (tmp_path / "g.png").is_file()


# ---- inputs ------------------------------------------------------------------------------------------------------


def test_load_inputs_image_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    arr = torch.randint(0, 256, (50, 80, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(arr).save(tmp_path / "photo.png")
    x = load_inputs(str(tmp_path / "photo.png"), size=32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.uint8
    Image.fromarray(arr).convert("L").save(tmp_path / "grey.png")  # greyscale becomes RGB
    y = load_inputs(str(tmp_path / "grey.png"), size=16)
    assert y.shape == (1, 3, 16, 16) and torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])


def test_load_inputs_matches_torchvision_resize_center_crop(tmp_path):
    transforms = pytest.importorskip("torchvision.transforms")
    g = torch.Generator().manual_seed(1)
    for hw in ((50, 80), (90, 45), (33, 33)):
        arr = torch.randint(0, 256, (*hw, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / "p.png")
        ref = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.PILToTensor()])
        assert torch.equal(load_inputs(str(tmp_path / "p.png"), size=32)[0], ref(_read(tmp_path / "p.png")))


def test_load_inputs_flat_folder_and_tree(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name, rgb in (("b.png", (0, 255, 0)), ("a.png", (255, 0, 0)), ("c.png", (0, 0, 255))):
        _write_png(flat / name, rgb)
    (flat / "notes.txt").write_text("not an image")
    x = load_inputs(str(flat), size=16, count=2)
    assert x.shape == (2, 3, 16, 16)
    assert x[:, :, 0, 0].tolist() == [[255, 0, 0], [0, 255, 0]]  # a.png, b.png
    assert load_inputs(str(flat), size=16, count=10).shape[0] == 3

    tree = tmp_path / "tree"
    for cls, rgb in (("dog", (0, 0, 255)), ("cat", (255, 255, 0))):
        (tree / cls).mkdir(parents=True)
        _write_png(tree / cls / "1.png", rgb)
        _write_png(tree / cls / "2.png", rgb)
    y = load_inputs(str(tree), size=16, count=3)
    assert y[:, :, 0, 0].tolist() == [[255, 255, 0], [255, 255, 0], [0, 0, 255]]  # cat/1, cat/2, dog/1

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"folder '.*empty' holds no images"):
        load_inputs(str(tmp_path / "empty"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read '.*bad.png' as an image"):
        load_inputs(str(tmp_path / "bad.png"))


def test_load_inputs_digits():
    pytest.importorskip("sklearn")
    x = load_inputs("digits", size=32, count=3)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8
    assert x.max() > 200 and x.min() == 0  # white strokes on black


def test_load_inputs_skimage():
    pytest.importorskip("skimage")
    x = load_inputs("skimage:astronaut", size=64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.uint8 and x.float().std() > 10
    with pytest.raises(ValueError, match=r"unknown scikit-image photo 'skimage:nope'; expected one of .*:astronaut"):
        load_inputs("skimage:nope")


def test_load_inputs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_inputs: INPUT '.*missing.png' is not an existing image file"):
        load_inputs(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match=r"load_inputs: size must be an int >= 1, got 0"):
        load_inputs("digits", size=0)
    with pytest.raises(ValueError, match=r"load_inputs: count must be an int >= 1, got -1"):
        load_inputs("digits", count=-1)


@pytest.mark.parametrize("scheme", ["rs", "mi"])
def test_show_an_encrypted_dataset_and_its_decryption(tmp_path, capsys, scheme):
    pytest.importorskip("sklearn")
    import ppml.data.encrypted as enc

    dst = str(tmp_path / "enc")
    enc.encrypt_dataset("digits", dst, scheme=scheme, patch_size=4, size=16, key_seed=0, progress=False)
    x, _, ids, manifest = enc.load_shards(dst)
    out = str(tmp_path / "grid.png")
    assert main(["show", dst, "--out", out, "--count", "3"]) == 0
    assert "3 row(s) × 1 columns" in capsys.readouterr().out
    grid = _read(out)
    assert grid.size == (16, header_height(16) + SEPARATOR + 3 * 16 + 2 * SEPARATOR)
    want = x[:3] if scheme == "rs" else ppml.show.mi_display(x[:3], 2)  # the ciphertext as stored (MI shown ×2)
    for r in range(3):
        assert torch.equal(_cell(grid, r, 0, 16), want[r])
    if scheme == "rs":
        keys = dst + ".key"
        out2 = str(tmp_path / "grid2.png")
        assert main(["show", dst, "--keys", keys, "--out", out2, "--count", "2"]) == 0
        grid = _read(out2)
        for r in range(2):
            item = sorted(enc.scan_source("digits")[0], key=lambda it: it.path)[r]  # shards follow the sorted list
            plain = enc.load_source_image("digits", item, 16)
            assert torch.equal(_cell(grid, r, 0, 16), x[r]) and torch.equal(_cell(grid, r, 1, 16), plain)
        other = str(tmp_path / "other")
        enc.encrypt_dataset("digits", other, patch_size=4, size=16, progress=False)
        assert main(["show", dst, "--keys", other + ".key", "--out", str(tmp_path / "g3.png")]) == 2
        assert "is not the key file" in capsys.readouterr().err
    else:
        assert main(["show", dst, "--keys", __file__, "--out", str(tmp_path / "g3.png")]) == 2
        assert "there is no inverse" in capsys.readouterr().err
    assert main(["show", dst, "digits", "--out", str(tmp_path / "g4.png")]) == 2
    assert "must be the only INPUT" in capsys.readouterr().err


def test_show_an_unfinished_encryption_says_so(tmp_path, capsys):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "job.json").write_text("{}")
    assert main(["show", str(tmp_path / "enc"), "--out", str(tmp_path / "g.png")]) == 2
    assert "unfinished `ppml encrypt` output" in capsys.readouterr().err
