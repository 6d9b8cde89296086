"""Throughput of `ppml encrypt`: images/s end to end and the share of the time spent in the encryption ops.

Run from the repository root::

    python benchmarks/experiments/encrypt_throughput.py              # about a minute on a 2-core CPU

Inputs: the built-in digits (1,797 8×8 images, upscaled to the output size: decoding is nearly free) and a folder of
larger photos — the scikit-image bundled photos (astronaut, coffee, chelsea, rocket, …, 300-512 px), each saved as
JPEG (quality 95) under several crops and flips until there are ``--photos`` files in two class folders. Each is
encrypted with RS (p = 16) and MI (p = 16, g = 2) at 224 px. The Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import torch

import ppml
from ppml.data.encrypted import encrypt_dataset


def bundled_colour_photos() -> list:
    """scikit-image's bundled colour photos (those this version has), as H×W×3 uint8 arrays."""
    import numpy as np
    import skimage.data

    names = ["astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "retina", "hubble_deep_field"]
    photos = []
    for n in names:
        try:
            arr = getattr(skimage.data, n)()
        except Exception:  # noqa: BLE001 - a photo this skimage lacks
            continue
        if arr.ndim == 3 and arr.shape[2] >= 3:
            photos.append(np.ascontiguousarray(arr[..., :3]))
    return photos


def photo_variant(arr, v: int):
    """Variant v of a photo: a crop shifted by (7v, 5v) pixels (within the first eighth), mirrored for odd v."""
    import numpy as np

    h, w = arr.shape[:2]
    crop = arr[(v * 7) % max(1, h // 8) :, (v * 5) % max(1, w // 8) :]
    return np.ascontiguousarray(crop[:, ::-1] if v % 2 else crop)


def make_photo_folder(root: str, count: int) -> str:
    from PIL import Image

    photos = bundled_colour_photos()
    for i in range(count):
        crop = photo_variant(photos[i % len(photos)], i // len(photos))
        cls = os.path.join(root, f"class{i % 2}")
        os.makedirs(cls, exist_ok=True)
        Image.fromarray(crop).save(os.path.join(cls, f"{i:05d}.jpg"), quality=95)
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_photo_folder(os.path.join(tmp, "photos"), args.photos)
        sources = (("digits (1,797, 8×8 → upscaled)", "digits"), (f"photos ({args.photos} JPEGs, 300-512 px)", folder))
        for label, src in sources:
            for scheme in ("rs", "mi"):
                dst = os.path.join(tmp, f"{scheme}-{len(rows)}")
                s = encrypt_dataset(src, dst, scheme=scheme, patch_size=16, grid=2, size=args.size,
                                    device=args.device, progress=False)
                print(f"[encrypt_throughput] {label} {scheme}: {s}", file=sys.stderr)
                rows.append((label, scheme, s))
    dev = rows[0][2]["device"]
    print(f"\n`ppml encrypt`, {args.size} px, p = 16 (MI g = 2), batch 256, on {dev}: {platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"ppml {ppml.__version__}\n")
    print("| source | scheme | images | seconds | images/s | decode + resize | encryption op | writing "
          "| encryption share |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, scheme, s in rows:
        print(f"| {label} | {scheme.upper()} | {s['images']} | {s['seconds']:.2f} | {s['images_per_s']:.0f} | "
              f"{s['decode_s']:.2f} s | {s['encrypt_s']:.2f} s | {s['write_s']:.2f} s | {s['encrypt_share']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
