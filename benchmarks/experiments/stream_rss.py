"""Peak resident memory of `ppml train`: streaming (DataLoader workers, bounded shuffle buffer) vs. holding the data
in memory, on real 224 px photos encrypted with RS.

Run from the repository root::

    python benchmarks/experiments/stream_rss.py                  # 3,000 images, 8 steps per run: ~10 min on 2 cores

The images: scikit-image's bundled photos (astronaut, coffee, chelsea, rocket, retina, ..., the 22 that need no
download; grey ones repeated over RGB) and the 200 25×25 ``skimage.data.lfw_subset`` images (100 faces, 100 not),
turned into ``--images`` distinct images by random crops (20-100 % of the side, aspect 3:4..4:3), horizontal flips and
resizes to 224-288 px; the class is the source photo (faces and non-faces one class each: 24 classes). They are
written as a folder of JPEGs (quality 90, ``CLASS/NNNNN.jpg``) and, resized and centre-cropped to 224 as ``ppml
encrypt`` does, RS-encrypted (p = 16, one random key per image) into a ``ppml-wds`` DST (lossless PNG per sample in
tar shards of 250, written here per the format's spec).

Five runs of ``ppml train`` (pevit_tiny_patch16_224, batch 32, RS owner mode, ``--stop-after`` steps, 2 DataLoader
workers, default shuffle buffer 1000), each in its own process: the folder streamed (the workers decode and encrypt),
the folder in memory (decoded and encrypted up front, as before streaming), the DST streamed, the DST in memory
(``--no-stream``), and the DST with its shards listed ``--repeat`` (4) times, streamed: a dataset 4 times as large.
Peak RSS: ``getrusage(RUSAGE_SELF).ru_maxrss`` of the training process, and the largest
``VmHWM`` (/proc/PID/status, polled every 0.1 s) among its DataLoader workers (not RUSAGE_CHILDREN: importing torch
and timm runs helper processes of 400-700 MB that it would report). The Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

PHOTOS = ["astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
          "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page",
          "retina", "rocket", "text"]  # fmt: skip


def _sources():
    import skimage.data
    from skimage.util import img_as_ubyte

    out = []
    for name in PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a photo this scikit-image lacks (or would download)
            continue
        arr = img_as_ubyte(arr)  # some are bool (horse) or float
        arr = np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]
        out.append([np.ascontiguousarray(arr)])
    faces = skimage.data.lfw_subset()  # 200 × 25 × 25 floats in [0, 1]: the first 100 are faces
    to_rgb = lambda a: np.repeat((a * 255).round().astype(np.uint8)[..., None], 3, axis=2)  # noqa: E731
    out.append([to_rgb(a) for a in faces[:100]])
    out.append([to_rgb(a) for a in faces[100:]])
    return out


def make_folder(root: str, count: int, seed: int = 0) -> str:
    """``count`` JPEGs in ``root/cls_XX/``: random crops, flips and resizes of the bundled photos and faces."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = _sources()
    for i in range(count):
        cls = int(rng.integers(len(sources)))
        group = sources[cls]
        arr = group[int(rng.integers(len(group)))]
        h, w = arr.shape[:2]
        side = rng.uniform(0.2, 1.0) * min(h, w)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = max(8, min(h, int(side / np.sqrt(aspect)))), max(8, min(w, int(side * np.sqrt(aspect))))
        y, x = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        crop = arr[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out = int(rng.integers(224, 289))
        img = Image.fromarray(np.ascontiguousarray(crop)).resize((out, out * ch // cw or 1), Image.BILINEAR)
        os.makedirs(os.path.join(root, f"cls_{cls:02d}"), exist_ok=True)
        img.save(os.path.join(root, f"cls_{cls:02d}", f"{i:05d}.jpg"), quality=90)
    return root


def make_dst(folder: str, dst: str, *, size: int = 224, patch: int = 16, shard: int = 250, seed: int = 0) -> dict:
    """The folder's images resized and centre-cropped to ``size`` (``ppml encrypt``'s code), RS-encrypted with one
    random key each, as a ppml-wds DST: ``shard-NNNNNN.tar`` of ``<id>.png`` + ``<id>.cls``, and manifest.json."""
    import torch
    from PIL import Image

    import ppml
    from ppml.data.encrypted import load_source_image, scan_source

    items, classes = scan_source(folder)
    gen = torch.Generator().manual_seed(seed)
    os.makedirs(dst, exist_ok=True)
    shards, png_bytes = [], 0
    for s0 in range(0, len(items), shard):
        name = f"shard-{s0 // shard:06d}.tar"
        chunk = items[s0 : s0 + shard]
        x = torch.stack([load_source_image(folder, it, size) for it in chunk])
        enc = ppml.shuffle_patches(x, patch, generator=gen)[0]
        with tarfile.open(os.path.join(dst, name), "w", format=tarfile.USTAR_FORMAT) as tf:
            for it, img in zip(chunk, enc, strict=True):
                key = hashlib.sha256(f"{seed}:{it.path}".encode()).hexdigest()[:32]
                buf = io.BytesIO()
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
                png_bytes += buf.tell()
                for member, data in ((f"{key}.png", buf.getvalue()), (f"{key}.cls", str(it.label).encode())):
                    ti = tarfile.TarInfo(member)
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        with open(os.path.join(dst, name), "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        shards.append({"name": name, "count": len(chunk), "sha256": digest})
    manifest = {"format": "ppml-wds", "version": 1, "scheme": "rs", "patch_size": patch, "image_size": size,
                "channels": 3, "count": len(items), "num_classes": len(classes), "shards": shards}  # fmt: skip
    with open(os.path.join(dst, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    return {"png_mean_bytes": png_bytes / len(items)}


def repeat_dst(dst: str, out: str, times: int) -> str:
    """``dst`` with its shards listed ``times`` over (hard links): a dataset ``times`` as large, to show that the
    streamed run's memory does not grow with it."""
    with open(os.path.join(dst, "manifest.json")) as fh:
        m = json.load(fh)
    os.makedirs(out, exist_ok=True)
    shards = []
    for _ in range(times):
        for s in m["shards"]:
            name = f"shard-{len(shards):06d}.tar"
            if not os.path.exists(os.path.join(out, name)):
                os.link(os.path.join(dst, s["name"]), os.path.join(out, name))
            shards.append({**s, "name": name})
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump({**m, "shards": shards, "count": m["count"] * times}, fh)
    return out


def _vm_hwm_kib(pid) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def _watch_forks(peaks: dict, stop) -> None:
    """Every 0.1 s: the VmHWM of each running child that is a fork of this process (same command line: the
    DataLoader workers; tools that imports spawn are left out)."""
    me = str(os.getpid())
    with open("/proc/self/cmdline", "rb") as fh:
        cmdline = fh.read()
    while not stop.wait(0.1):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    ppid = fh.read().rsplit(")", 1)[1].split()[1]
                if ppid != me:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if fh.read() != cmdline:
                        continue
                peaks[pid] = max(peaks.get(pid, 0), _vm_hwm_kib(pid))
            except (OSError, StopIteration, IndexError):
                continue  # it ended meanwhile


def _child(spec: str) -> int:
    """One training run; prints the peak RSS (MiB) of this process and of its largest DataLoader worker."""
    import threading

    from ppml.train import TrainConfig, run

    kw = json.loads(spec)
    stop_after = kw.pop("stop_after")
    peaks, stop = {}, threading.Event()
    watcher = threading.Thread(target=_watch_forks, args=(peaks, stop), daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    res = run(TrainConfig(**kw), stop_after=stop_after)
    wall = time.perf_counter() - t0
    stop.set()
    watcher.join()
    print(json.dumps({"self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
                      "workers_mib": max(peaks.values(), default=0) / 1024, "workers_seen": len(peaks),
                      "wall_s": wall, "stopped": res.get("stopped")}))  # fmt: skip
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=8, help="training steps per run (--stop-after)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=4, help="also stream the DST with its shards listed this many times")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # comma-separated run indices, to redo some
    ap.add_argument("--workdir", default=None, help="keep the data here (default: a temporary folder)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child)
    import torch

    import ppml

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        folder, dst = os.path.join(work, "photos"), os.path.join(work, "photos-rs")
        t0 = time.perf_counter()
        if not os.path.isdir(folder):
            make_folder(folder, args.images)
        facts = make_dst(folder, dst) if not os.path.isdir(dst) else {"png_mean_bytes": float("nan")}
        jpg = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs) / args.images
        print(
            f"[stream_rss] data made in {time.perf_counter() - t0:.0f} s: {args.images} JPEGs (mean {jpg / 1e3:.0f} "
            f"kB), DST PNGs mean {facts['png_mean_bytes'] / 1e3:.0f} kB",
            file=sys.stderr,
        )
        common = dict(encryption="rs", mode="owner", model="pevit_tiny_patch16_224", img_size=224, patch_size=16,
                      batch_size=args.batch_size, epochs=1, workers=args.workers, key_seed=0,
                      shuffle_buffer=args.shuffle_buffer, stop_after=args.steps)  # fmt: skip
        runs = [
            ("folder (JPEG)", "streamed", folder, True),
            ("folder (JPEG)", "in memory", folder, False),
            ("DST (RS PNG shards)", "streamed", dst, True),
            ("DST (RS PNG shards)", "in memory", dst, False),
        ]
        if args.repeat > 1:
            big = repeat_dst(dst, os.path.join(work, f"photos-rs-x{args.repeat}"), args.repeat)
            runs.append(
                (f"DST, shards listed {args.repeat}× ({args.repeat * args.images} samples)", "streamed", big, True)
            )
        rows = []
        only = {int(i) for i in args.only.split(",")} if args.only else None
        for k, (label, how, data, stream) in enumerate(runs):
            if only is not None and k not in only:
                continue
            spec = json.dumps({**common, "data": data, "stream": stream, "out": os.path.join(work, f"run{k}")})
            res = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
            if res.returncode:
                sys.stderr.write(res.stderr[-3000:])
                return res.returncode
            row = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"[stream_rss] {label} {how}: {row}", file=sys.stderr)
            rows.append((label, how, row))
    print(
        f"\n`ppml train`, {args.images} images at 224 px, RS owner mode, pevit_tiny_patch16_224, batch "
        f"{args.batch_size}, {args.steps} steps, {args.workers} DataLoader workers, shuffle buffer "
        f"{args.shuffle_buffer}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, ppml {ppml.__version__}\n"
    )
    print("| data | read | peak RSS, training process | peak RSS, largest worker | wall s |")
    print("|---|---|---:|---:|---:|")
    for label, how, r in rows:
        worker = f"{r['workers_mib']:.0f} MiB ({r['workers_seen']} seen)" if r["workers_seen"] else "—"
        print(f"| {label} | {how} | {r['self_mib']:.0f} MiB | {worker} | {r['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
