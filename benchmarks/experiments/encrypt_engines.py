"""`ppml encrypt` engines on real photos: images/s with 1 process, N worker processes and Ray; bytes per image of the
RS (PNG) and MI (uint16 .npy) shards; and the projection of those figures to ImageNet-1k (1,281,167 images).

Run from the repository root::

    python benchmarks/experiments/encrypt_engines.py --images 400 --rounds 2     # a few minutes on a 2-core CPU

Inputs: scikit-image's bundled colour photos (astronaut, coffee, chelsea, rocket, cat, …, 300-512 px) as JPEG (quality
95) under several crops and flips, alternating with its ``lfw_subset`` faces upscaled to 224 px and saved as PNG, until
there are ``--images`` files in two class folders — a few hundred images made from ~30 sources, so the figures are a
decode/resize/encrypt/PNG-encode rate, not a claim about any photo set. Engines run interleaved (1, N, Ray, 1, N,
Ray, ...) so a shared machine's load spreads over all of them; the Markdown goes to stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from ppml.data.encrypted import encrypt_dataset

IMAGENET = 1_281_167


def make_photo_folder(root: str, count: int) -> str:
    """Even files: the bundled colour photos' crops (encrypt_throughput.py's); odd: lfw_subset faces at 224 px."""
    import numpy as np
    import skimage.data
    from encrypt_throughput import bundled_colour_photos, photo_variant
    from PIL import Image

    photos = bundled_colour_photos()
    faces = skimage.data.lfw_subset()  # 200 grey 25×25 faces, float in [0, 1]
    for i in range(count):
        cls = os.path.join(root, f"class{i % 2}")
        os.makedirs(cls, exist_ok=True)
        v = i // 2
        if i % 2 == 0:
            crop = photo_variant(photos[v % len(photos)], v // len(photos))
            Image.fromarray(crop).save(os.path.join(cls, f"{i:05d}.jpg"), quality=95)
        else:
            face = (faces[v % len(faces)] * 255).round().astype(np.uint8)
            img = Image.fromarray(face).convert("RGB").resize((224, 224), Image.BICUBIC)
            img.save(os.path.join(cls, f"{i:05d}.png"))
    return root


def png_levels(dst: str) -> dict[int, tuple[float, float]]:
    """PNG compress levels on the RS ciphertexts of ``dst``: level -> (KiB/image, ms/image), re-encoded here."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    with tarfile.open(os.path.join(dst, "shard-000000.tar")) as tf:
        imgs = [np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read()))) for m in tf if m.name.endswith(".png")]
    out = {}
    for level in (1, 6):
        t0, total = time.perf_counter(), 0
        for a in imgs:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG", compress_level=level)
            total += buf.tell()
        out[level] = (total / len(imgs) / 1024, (time.perf_counter() - t0) / len(imgs) * 1e3)
    return out


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    engines = [("1 process (decode threads)", dict(workers=1))]
    engines.append((f"{args.workers} processes", dict(workers=args.workers)))
    ray = None
    if not args.no_ray:
        try:
            import ray
        except ImportError:
            print("[encrypt_engines] ray is not installed: its rows are left out", file=sys.stderr)
    if ray is not None:
        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        print(f"[encrypt_engines] ray.init: {time.perf_counter() - t0:.1f} s (not counted below)", file=sys.stderr)
        engines.append((f"Ray, local, {args.workers} CPUs", dict(engine="ray")))
    common = dict(patch_size=16, size=args.size, shard_size=64, device="cpu", progress=False)
    rates: dict[str, list[float]] = {name: [] for name, _ in engines}
    cpu: dict[str, list[float]] = {name: [] for name, _ in engines}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_photo_folder(os.path.join(tmp, "photos"), args.images)
        src_bytes = dir_bytes(os.path.join(folder, "class0")) + dir_bytes(os.path.join(folder, "class1"))
        run = 0
        for r in range(args.rounds):
            for name, kw in engines:
                dst = os.path.join(tmp, f"rs{run}")
                s = encrypt_dataset(folder, dst, scheme="rs", **common, **kw)
                print(f"[encrypt_engines] round {r} {name}: {s}", file=sys.stderr)
                rates[name].append(s["images_per_s"])
                cpu[name].append(s["cpu_s_per_image"])
                if "rs" not in sizes:
                    sizes["rs"] = (dir_bytes(dst), s["images"], os.path.getsize(s["keys"]), os.path.getsize(s["index"]))
                run += 1
        s = encrypt_dataset(folder, os.path.join(tmp, "mi"), scheme="mi", grid=2, **common)
        sizes["mi"] = (dir_bytes(os.path.join(tmp, "mi")), s["images"], 0, 0)
        mi_cpu = s["cpu_s_per_image"]
        png = png_levels(os.path.join(tmp, "rs0"))
    if ray is not None:
        ray.shutdown()

    cpu_name = platform.processor() or platform.machine()
    print(
        f"\n`ppml encrypt` engines, {args.images} images ({args.size} px, RS p = 16), on {cpu_name}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; images/s per round, end to end (process start-up "
        "included, Ray's own start excluded); CPU ms/image: the CPU time of the processes that made the shards\n"
    )
    print("| engine | images/s per round (wall) | best | CPU ms/image per round |")
    print("|---|---|---:|---|")
    for name, vals in rates.items():
        cpus = ", ".join(f"{1e3 * c:.1f}" for c in cpu[name])
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in vals)} | {max(vals):.1f} | {cpus} |")
    rs_b, n, key_b, index_b = sizes["rs"]
    mi_b, n_mi, _, _ = sizes["mi"]
    per_rs, per_mi = rs_b / n, mi_b / n_mi
    print(
        f"\nsource folder: {src_bytes / args.images / 1024:.1f} KiB/image; RS shards (PNG): {per_rs / 1024:.1f} "
        f"KiB/image; MI shards (uint16 .npy): {per_mi / 1024:.1f} KiB/image (tar headers included); key file "
        f"{key_b} bytes; owner-side index {index_b / n:.0f} bytes/image; MI: {1e3 * mi_cpu:.1f} CPU ms/image\n"
    )
    core_rs = statistics.median(cpu[engines[1][0]])
    shards = -(-IMAGENET // 4096)
    print(f"ImageNet-1k projection ({IMAGENET:,} images, 224 px, shards of 4,096):\n")
    print("| quantity | RS | MI |")
    print("|---|---:|---:|")
    print(f"| shards | {shards} | {shards} |")
    print(f"| DST bytes | {IMAGENET * per_rs / 1e9:.0f} GB | {IMAGENET * per_mi / 1e9:.0f} GB |")
    print(f"| key file | {key_b} bytes | {key_b} bytes |")
    print(f"| owner-side index | {IMAGENET * index_b / n / 1e6:.0f} MB | {IMAGENET * index_b / n / 1e6:.0f} MB |")
    print(f"| CPU ms/image used | {1e3 * core_rs:.1f} (median, {args.workers} processes) | {1e3 * mi_cpu:.1f} |")
    print(f"| core-hours | {IMAGENET * core_rs / 3600:.1f} | {IMAGENET * mi_cpu / 3600:.1f} |")
    print(f"| wall hours on 64 cores | {IMAGENET * core_rs / 64 / 3600:.2f} | {IMAGENET * mi_cpu / 64 / 3600:.2f} |")
    print("\nPNG compress level on these RS ciphertexts (one thread):")
    for level, (kib, ms) in png.items():
        print(f"- level {level}: {kib:.1f} KiB/image, {ms:.1f} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
