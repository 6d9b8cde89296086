"""``ppml show``: a figure of what the encryptions hide, one row per image.

Columns: the plain image | RS with p=32 | RS with p=16 | RS with p=8 | MI (p=16, g=2, upscaled ×g with nearest so every
cell has the same size). RS shuffles each image's p×p patches with a fresh random permutation per image and column;
MI replaces each p×p patch by the mean of its g×g sub-patches, rounded to uint8 with round-half-even
(``torch.round``) and clamped to 0..255.

    ppml show skimage:astronaut skimage:coffee --out docs/ciphertext_grid.png --seed 0
    ppml show path/to/photo.jpg --out grid.png
    ppml show path/to/image_folder --count 6 --out grid.png
    ppml show digits --size 64 --out digits.png
    ppml show enc/ --keys enc.key --out enc.png        # an encrypted dataset: ciphertext | decrypted

Library use: :func:`load_inputs` (image file, folder, ``digits`` or ``skimage:NAME`` → uint8 ``[B, 3, S, S]``) and
:func:`make_grid_image` (uint8 images → ``PIL.Image``). PIL is needed; scikit-image only for ``skimage:NAME`` inputs,
scikit-learn only for ``digits``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

_CMD = "ppml show"
_GRID = "ppml.show.make_grid_image"
_LOAD = "ppml.show.load_inputs"

#: Width in pixels of the white lines between cells (and between the header and the first row).
SEPARATOR = 4

#: Extensions read from folders (those of torchvision's ImageFolder).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: The scikit-image photos ``skimage:NAME`` accepts (bundled with scikit-image, no download).
SKIMAGE_NAMES = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "checkerboard",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)


# ---- the grid ----------------------------------------------------------------------------------------------------


def header_height(size: int) -> int:
    """Height in pixels of the title row of a grid whose cells are ``size`` pixels wide (the separator excluded)."""
    font_size = _font_size(size)
    return font_size + 2 * max(3, font_size // 3)


def _font_size(size: int) -> int:
    return max(10, min(24, size // 12))


def _load_font(size: int):
    """PIL's default font at ``size`` points (FreeType build), else PIL's fixed-size bitmap default font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # pragma: no cover - Pillow without FreeType, or older than 10.1
        return ImageFont.load_default()


def column_titles(
    rs_patches: Sequence[int] = (32, 16, 8), mi_patch: int = 16, mi_grid: int = 2, *, short: bool = False
) -> list[str]:
    """The header texts of :func:`make_grid_image`'s columns (``short=True``: the compact form for narrow cells)."""
    if short:
        return ["plain", *(f"RS{p}" for p in rs_patches), f"MI{mi_patch}/{mi_grid}"]
    return ["plain", *(f"RS p={p}" for p in rs_patches), f"MI p={mi_patch} g={mi_grid}"]


def _check_int(value, where: str, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def check_size(height: int, width: int, patches: Sequence[int], where: str, what: str = "image size") -> None:
    """Raises ValueError (naming ``where`` and ``what``) unless every patch size divides ``height`` and ``width``."""
    bad = sorted({p for p in patches if height % p or width % p})
    if bad:
        shape = f"{height}" if height == width else f"{height}×{width}"
        raise ValueError(
            f"{where}: {what} must be divisible by every patch size {tuple(patches)}, got {shape} "
            f"(not divisible by {', '.join(map(str, bad))}; use a multiple of {int(np.lcm.reduce(list(patches)))})"
        )


def to_uint8(images: Tensor) -> Tensor:
    """Images in 0..255 as uint8 for drawing: round-half-even (``torch.round``), clamp (uint8 passes through)."""
    return images if images.dtype == torch.uint8 else torch.round(images.float()).clamp_(0, 255).to(torch.uint8)


def mi_display(mixed: Tensor, grid: int) -> Tensor:
    """MI ciphertext ``[B, C, H/g, W/g]`` (0..255) as uint8 at the plain size: :func:`to_uint8`, nearest ×grid."""
    return to_uint8(mixed).repeat_interleave(grid, dim=2).repeat_interleave(grid, dim=3)


def _mi_cell(images: Tensor, patch_size: int, grid: int) -> Tensor:
    """MI ciphertext as uint8 at the input's size: mean of sub-patches, round-half-even, clamp, nearest ×grid."""
    from . import mix_subpatches

    return mi_display(mix_subpatches(images, patch_size=patch_size, grid=grid), grid)  # float32 0..255 for uint8


def make_grid_image(
    images: Tensor,
    *,
    rs_patches: Sequence[int] = (32, 16, 8),
    mi_patch: int = 16,
    mi_grid: int = 2,
    generator: torch.Generator | None = None,
    labels: bool = True,
):
    """Draws plain images next to their RS and MI ciphertexts, one row per image.

    Cell (row b, column 0) is ``images[b]`` pixel for pixel; column 1 + i is ``shuffle_patches(images,
    rs_patches[i])`` (a fresh key per image and column); the last column is ``mix_subpatches(images, mi_patch,
    mi_grid)`` rounded half-to-even to uint8 (``torch.round``, then clamped to 0..255) and upscaled ×``mi_grid`` by
    repetition (nearest), so that every cell is H×W. Cells are separated by :data:`SEPARATOR` white pixels; with
    ``labels`` a white header row of :func:`header_height` pixels (plus a separator) above holds the column titles in
    PIL's default font.

    Args:
        images (Tensor[B, 3, H, W]): uint8 RGB, B >= 1 (:func:`load_inputs` makes such a batch).
        rs_patches: the RS patch sizes, one column each; every one must divide H and W.
        mi_patch: the MI patch size p (must divide H and W).
        mi_grid: the MI sub-patch grid g (must divide ``mi_patch``).
        generator: seeds the RS keys (a reproducible figure); ``None`` draws them from OS entropy.
        labels: draw the header row.

    Returns:
        PIL.Image.Image: RGB, width ``n·W + (n-1)·SEPARATOR`` for n = len(rs_patches) + 2 columns, height
        ``B·H + (B-1)·SEPARATOR``, plus ``header_height(W) + SEPARATOR`` with ``labels``.

    Raises:
        ValueError: images not uint8 [B, 3, H, W] with B >= 1, a patch size not a positive int, a patch size not
            dividing H and W, or ``mi_grid`` not dividing ``mi_patch``.
    """
    from . import shuffle_patches

    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{_GRID}: images must be a uint8 tensor [B, 3, H, W], got {got}")
    B, _, H, W = images.shape
    if B < 1 or H < 1 or W < 1:
        raise ValueError(f"{_GRID}: images must hold at least one non-empty image, got shape {list(images.shape)}")
    rs_patches = tuple(rs_patches)
    for p in rs_patches:
        _check_int(p, _GRID, "every rs_patches entry")
    _check_int(mi_patch, _GRID, "mi_patch")
    _check_int(mi_grid, _GRID, "mi_grid")
    if mi_patch % mi_grid:
        raise ValueError(f"{_GRID}: mi_grid must divide mi_patch, got mi_grid={mi_grid} for mi_patch={mi_patch}")
    check_size(H, W, (*rs_patches, mi_patch), _GRID, "images' H and W")

    images = images.detach().cpu().contiguous()
    cells = [images]
    for p in rs_patches:
        cells.append(shuffle_patches(images, p, generator=generator)[0])
    cells.append(_mi_cell(images, mi_patch, mi_grid))

    return compose_columns(
        cells, column_titles(rs_patches, mi_patch, mi_grid), column_titles(rs_patches, mi_patch, mi_grid, short=True),
        labels=labels,
    )


def compose_columns(cells: Sequence[Tensor], titles: Sequence[str], short_titles: Sequence[str] | None = None, *,
                    labels: bool = True):
    """Lays out columns of uint8 ``[B, 3, H, W]`` images (one row per image) with :data:`SEPARATOR` white pixels
    between cells and, with ``labels``, a header row of titles (``short_titles[c]`` where ``titles[c]`` is wider
    than a cell). Returns a ``PIL.Image.Image``."""
    from PIL import Image, ImageDraw

    B, _, H, W = cells[0].shape
    n = len(cells)
    short_titles = titles if short_titles is None else short_titles
    sep = SEPARATOR
    top = header_height(W) + sep if labels else 0
    canvas = np.full((top + B * H + (B - 1) * sep, n * W + (n - 1) * sep, 3), 255, dtype=np.uint8)
    for c, cell in enumerate(cells):
        hwc = cell.permute(0, 2, 3, 1).numpy()
        x = c * (W + sep)
        for b in range(B):
            y = top + b * (H + sep)
            canvas[y : y + H, x : x + W] = hwc[b]
    grid = Image.fromarray(canvas)  # uint8 [H, W, 3]: RGB

    if labels:
        font = _load_font(_font_size(W))
        hh = header_height(W)
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        for c in range(n):
            title = titles[c]
            if probe.textbbox((0, 0), title, font=font)[2] > W:
                title = short_titles[c]
            # Each title is drawn on its own cell-wide strip and pasted, so a title too wide is clipped at its column.
            strip = Image.new("RGB", (W, hh), (255, 255, 255))
            draw = ImageDraw.Draw(strip)
            left, t, right, bottom = draw.textbbox((0, 0), title, font=font)
            draw.text(((W - (right - left)) / 2 - left, (hh - (bottom - t)) / 2 - t), title, fill=(0, 0, 0), font=font)
            grid.paste(strip, (c * (W + sep), 0))
    return grid


# ---- inputs ------------------------------------------------------------------------------------------------------


def _to_square(img, size: int, where: str) -> Tensor:
    """PIL image → uint8 [3, size, size]: RGB, shorter side resized to ``size`` (bilinear, antialiased), centre crop.

    Same geometry as torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL images (what ``ppml.data`` uses).
    """
    from PIL import Image

    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # transparent parts on white, not on black
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    img = img.convert("RGB")
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"{where}: empty image ({w}×{h})")
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)  # PIL filters over the scale: antialiased
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _open_image(path: str, size: int, where: str = _LOAD) -> Tensor:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # camera photos upright, as a person sees them
            return _to_square(img, size, f"{where}: {path!r}")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{where}: cannot read {path!r} as an image ({exc})") from exc


def _folder_images(root: str) -> list[str]:
    """Image files under ``root`` (flat, or an ImageFolder tree), sorted by path components (ImageFolder's order)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    found.sort(key=lambda rel: rel.split(os.sep))
    return [os.path.join(root, rel) for rel in found]


def _skimage(name: str, size: int, where: str = _LOAD) -> Tensor:
    from PIL import Image

    available = ", ".join(f"skimage:{n}" for n in SKIMAGE_NAMES)
    try:
        import skimage.data
    except ImportError as exc:
        raise ValueError(
            f"{where}: INPUT 'skimage:{name}' needs scikit-image (pip install scikit-image), which is not installed; "
            f"it would offer {available}"
        ) from exc
    if name not in SKIMAGE_NAMES:
        raise ValueError(f"{where}: unknown scikit-image photo 'skimage:{name}'; expected one of {available}")
    try:
        arr = np.asarray(getattr(skimage.data, name)())
    except Exception as exc:  # a photo that needs an optional download, or a scikit-image that lacks it
        raise ValueError(
            f"{where}: scikit-image could not load 'skimage:{name}' ({type(exc).__name__}: {exc})"
        ) from exc
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return _to_square(Image.fromarray(arr), size, f"{where}: 'skimage:{name}'")


def _digits(size: int, count: int, where: str = _LOAD) -> Tensor:
    from .data import load_digits

    if size < 8:
        raise ValueError(f"{where}: INPUT 'digits' needs size >= 8 (the digits are 8×8), got {size}")
    x = load_digits(size).train_x[:count]  # float [N, 3, S, S] in [0, 1], bilinearly upscaled from 8×8
    return (x * 255).round_().clamp_(0, 255).to(torch.uint8)


def load_inputs(input: str, *, size: int = 224, count: int = 4, op: str = _LOAD) -> Tensor:
    """Loads the images to show as a uint8 batch.

    Args:
        input: one of
            - an image file (one image);
            - a folder: a flat folder of images or an ImageFolder tree (``class/image.jpg``); the first ``count``
              images in sorted path order (by class folder, then file name);
            - ``digits``: the first ``count`` training images of :func:`ppml.data.load_digits` (scikit-learn's 8×8
              digits, bilinearly upscaled to ``size``);
            - ``skimage:NAME``: a photo bundled with scikit-image, NAME one of :data:`SKIMAGE_NAMES`
              (e.g. ``skimage:astronaut``).
        size: side S of the output; photos are converted to RGB (transparency on white, EXIF orientation applied),
            the shorter side resized to S (bilinear, antialiased) and centre-cropped to S×S.
        count: how many images a folder or ``digits`` yields at most.
        op: the function or command that errors name (default ``ppml.show.load_inputs``; ``ppml show`` and
            ``ppml attack`` name themselves).

    Returns:
        Tensor[B, 3, S, S] uint8 (B = 1 for a file or a scikit-image photo, else min(count, available)).

    Raises:
        FileNotFoundError: ``input`` is neither an existing file or folder nor ``digits`` / ``skimage:NAME``.
        ValueError: a bad ``size`` or ``count``, an unreadable image file, a folder without images, an unknown
            scikit-image name or scikit-image missing.
    """
    where = op
    _check_int(size, where, "size")
    _check_int(count, where, "count")
    if not isinstance(input, str) or not input:
        raise ValueError(f"{where}: INPUT must be a non-empty string, got {input!r}")
    if input.startswith("skimage:"):
        return _skimage(input[len("skimage:") :], size, where).unsqueeze(0)
    if input == "digits" and not os.path.exists(input):
        return _digits(size, count, where)
    if os.path.isdir(input):
        paths = _folder_images(input)
        if not paths and os.path.isfile(os.path.join(input, "job.json")):
            raise ValueError(f"{where}: folder {input!r} is an unfinished `ppml encrypt` output (no manifest.json); "
                             "finish it by re-running the same `ppml encrypt` command")
        if not paths:
            raise ValueError(
                f"{where}: folder {input!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
            )
        return torch.stack([_open_image(p, size, where) for p in paths[:count]])
    if os.path.isfile(input):
        return _open_image(input, size, where).unsqueeze(0)
    raise FileNotFoundError(
        f"{where}: INPUT {input!r} is not an existing image file or folder, 'digits' or 'skimage:NAME' "
        f"(e.g. skimage:astronaut)"
    )


# ---- encrypted datasets ------------------------------------------------------------------------------------------


def encrypted_grid(dst: str, *, count: int = 4, keys: str | None = None, labels: bool = True):
    """The first ``count`` images of an encrypted dataset DST (``ppml encrypt`` output), one row each: the ciphertext
    as stored (RS: uint8 as is; MI: :func:`mi_display`, ×g nearest) and, with ``keys`` (RS only, DST's key file), the
    decrypted image. Returns ``(PIL.Image, column titles, rows)``."""
    from . import unshuffle_patches
    from .data.encrypted import load_samples, sample_permutations

    x, idx, _, manifest = load_samples(dst, count)
    p = manifest["patch_size"]
    if manifest["scheme"] == "rs":
        cipher, titles, short = x, [f"RS p={p}"], [f"RS{p}"]
    else:
        g = manifest["grid"]
        cipher, titles, short = mi_display(x, g), [f"MI p={p} g={g}"], [f"MI{p}/{g}"]
    cells = [cipher]
    if keys is not None:
        cells.append(unshuffle_patches(x, sample_permutations(dst, keys, manifest, idx, _CMD), p))
        titles, short = [*titles, "decrypted"], [*short, "plain"]
    return compose_columns(cells, titles, short, labels=labels), titles, x.shape[0]


# ---- the command -------------------------------------------------------------------------------------------------


def add_show_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``show`` on an argparse subparsers object (``parser.add_subparsers()``); returns its parser."""
    p = subparsers.add_parser(
        "show",
        help="draw plain images next to their RS and MI ciphertexts (a PNG grid)",
        description=(
            "Draw one row per image: plain | RS p=32 | RS p=16 | RS p=8 | MI (p=16, g=2, shown upscaled ×2). "
            "The RS keys are random per image and column (OS entropy unless --seed)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "input",
        nargs="+",
        metavar="INPUT",
        help="an image file, a folder (flat or ImageFolder tree: the first --count images), 'digits' (the first "
        f"--count built-in digits) or 'skimage:NAME' (a scikit-image photo: {', '.join(SKIMAGE_NAMES)}); "
        "several INPUTs stack their rows. Or an encrypted dataset DST (`ppml encrypt` output, alone): its first "
        "--count ciphertexts as stored (any scheme, at the dataset's size), and with --keys their decryption",
    )
    p.add_argument("--out", required=True, help="the PNG to write (parent folders are created)")
    p.add_argument("--size", type=int, default=224, help="image side S; a multiple of 32")
    p.add_argument("--count", type=int, default=4, help="images taken from a folder or 'digits'")
    p.add_argument("--seed", type=int, default=None, help="seed the RS keys (reproducible figure; default: OS entropy)")
    p.add_argument(
        "--colors",
        type=int,
        default=None,
        help="store the PNG with an adaptive palette of this many colours (2..256): a much smaller file whose pixels "
        "are approximate (default: exact RGB)",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument(
        "--keys",
        default=None,
        help="with an encrypted dataset DST as the INPUT (`ppml encrypt` output): its RS key file, to add a column "
        "of the decrypted images (default: none, the ciphertexts alone)",
    )
    p.set_defaults(func=run_show)
    return p


def run_show(args: argparse.Namespace) -> int:
    """Runs ``ppml show``: loads ``args.input``, draws the grid and writes ``args.out``; prints the path and size.

    Returns:
        0 on success (errors raise ValueError / FileNotFoundError / FileExistsError naming the argument).
    """
    inputs = [args.input] if isinstance(args.input, str) else list(args.input)
    out, size, count = args.out, args.size, args.count
    seed, force = getattr(args, "seed", None), getattr(args, "force", False)
    colors = getattr(args, "colors", None)
    if not inputs:
        raise ValueError(f"{_CMD}: INPUT expected an image file, folder, 'digits' or 'skimage:NAME', got none")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{_CMD}: --size must be a positive int, got {size!r}")
    check_size(size, size, (32, 16, 8, 16), _CMD, "--size")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{_CMD}: --count must be a positive int, got {count!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"{_CMD}: --seed must be an int >= 0, got {seed!r}")
    if colors is not None and (isinstance(colors, bool) or not isinstance(colors, int) or not 2 <= colors <= 256):
        raise ValueError(f"{_CMD}: --colors must be an int in 2..256 (or left out for exact RGB), got {colors!r}")
    if not isinstance(out, str) or not out.lower().endswith(".png"):
        raise ValueError(f"{_CMD}: --out must name a .png file (the grid is written as PNG), got {out!r}")
    if os.path.isdir(out):
        raise FileExistsError(f"{_CMD}: --out {out!r} is a directory; expected a .png file path")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{_CMD}: --out {out!r} already exists; pass --force to overwrite it")

    from .data.encrypted import is_encrypted_dataset

    keys = getattr(args, "keys", None)
    encrypted = [i for i in inputs if os.path.isdir(i) and is_encrypted_dataset(i)]
    if encrypted and len(inputs) > 1:
        raise ValueError(f"{_CMD}: an encrypted dataset ({encrypted[0]!r}) must be the only INPUT (its columns differ)")
    if keys is not None and not encrypted:
        raise ValueError(f"{_CMD}: --keys needs an encrypted dataset (`ppml encrypt` output) as the INPUT")
    if encrypted:
        grid, titles, rows = encrypted_grid(encrypted[0], count=count, keys=keys)
    else:
        images = torch.cat([load_inputs(i, size=size, count=count, op=_CMD) for i in inputs])
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        grid = make_grid_image(images, generator=generator)
        titles, rows = column_titles(), images.shape[0]

    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if colors is not None:
        from PIL import Image

        grid = grid.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)  # one palette for the whole figure
    grid.save(out, format="PNG", optimize=True)
    pixels = f"{colors}-colour palette" if colors is not None else "exact RGB"
    print(
        f"wrote {out}: {grid.width}×{grid.height} px, {rows} row(s) × {len(titles)} columns "
        f"({', '.join(titles)}), {pixels}, {os.path.getsize(out):,} bytes"
    )
    return 0
