"""Anchor losses vs plain cross-entropy on scikit-learn's digits: test accuracy and how tightly classes cluster.

Run from the repository root::

    python benchmarks/experiments/anchor_digits.py                 # 11 runs, about 30 s on a quiet 2-core CPU
    python benchmarks/experiments/anchor_digits.py --epochs 200 --seed 1

Data: ``sklearn.datasets.load_digits`` (1,797 8×8 images, 10 classes), pixels / 16, one fixed stratified split
``train_test_split(test_size=0.25, random_state=0, stratify=y)`` (1,347 train, 450 test).

Model: the same MLP for every run, 64 → 128 → ReLU → 128 → ReLU → D (D = 32, no activation on the embedding), the
same seed (so the same initial weights and batch order), Adam (lr 1e-3), batch 64, the same epochs. Runs:

- ``CE``: a trainable linear head D → 10 on the embedding, ``F.cross_entropy``; predicts with the head's argmax.
- ``anchor``: ``ppml.AnchorLoss(10, D, kind=..., radius=1, metric=..., scale=γ, pull=λ)`` on the embedding, fixed
  anchors of both principles — ``simplex`` (pairwise cosine −1/9) and an orthogonal set (``onehot``, or ``hadamard``
  with ``--orthogonal hadamard``); predicts with the nearest anchor (``AnchorLoss.predict``). Metrics: ``sqeuclidean``
  with pull (γ = 16, λ = 0.1), ``euclidean`` (γ = 8) and ``cosine`` (γ = 16), both without pull.
- Two controls: ``sqeuclidean`` without pull, and what it equals with equal-norm anchors, cross-entropy through a
  frozen linear head γA (``F.cross_entropy(f @ (γA).T, y)``, written in plain PyTorch), predicting with its argmax.

Columns: test accuracy; ``intra/inter`` = the mean of ‖f_i − f_j‖ over all pairs i < j of test samples of the same
class divided by its mean over all pairs of different classes, f = the D-dimensional embedding (the penultimate output,
the head's input, for CE) — lower is tighter clusters; ``intra/inter (unit f)`` = the same on f / ‖f‖ (the geometry
the cosine metric sees, comparable across runs whatever the feature norms); the mean test ‖f‖; the final training
loss (on the whole training set); the wall time of the run (training + evaluation). The Markdown table goes to
stdout, a progress line per run to stderr.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import ppml

NUM_CLASSES, DIM = 10, 32
LR, BATCH = 1e-3, 64


@dataclass(frozen=True)
class Run:
    """One training run: ``metric`` None is plain cross-entropy with a trainable linear head; ``frozen_head``: the
    control, cross-entropy through the fixed linear layer γA (no bias) in plain PyTorch."""

    name: str
    metric: str | None = None
    kind: str | None = None
    scale: float = 1.0
    pull: float = 0.0
    frozen_head: bool = False

    @property
    def label(self) -> str:
        return self.name if self.metric is None else f"{self.name} · {self.kind}"


def runs(orthogonal: str) -> list[Run]:
    out = [Run("CE (linear head)")]
    for name, metric, scale, pull in (
        ("sqeuclidean + pull", "sqeuclidean", 16.0, 0.1),
        ("euclidean", "euclidean", 8.0, 0.0),
        ("cosine", "cosine", 16.0, 0.0),
        ("control: sqeuclidean, no pull", "sqeuclidean", 16.0, 0.0),
    ):
        for kind in ("simplex", orthogonal):
            out.append(Run(name, metric, kind, scale, pull))
    for kind in ("simplex", orthogonal):
        out.append(Run("control: CE, frozen head γA", "sqeuclidean", kind, 16.0, 0.0, frozen_head=True))
    return out


def load_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(Xtr), as_y(ytr), as_x(Xte), as_y(yte)


def backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, DIM))


def distance_ratio(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ‖f_i − f_j‖ over pairs i < j of the same class / mean over pairs of different classes (float64)."""
    f = features.double()
    dist = torch.cdist(f, f)
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(1)
    return (dist[same & upper].mean() / dist[~same & upper].mean()).item()


def train_and_eval(run: Run, data, epochs: int, seed: int) -> dict:
    Xtr, ytr, Xte, yte = data
    torch.manual_seed(seed)
    net = backbone()  # created first, so every run starts from the same backbone weights
    if run.metric is None:
        head = nn.Linear(DIM, NUM_CLASSES)
        params = list(net.parameters()) + list(head.parameters())
        criterion = lambda f, y: F.cross_entropy(head(f), y)  # noqa: E731
        predict = lambda f: head(f).argmax(1)  # noqa: E731
    elif run.frozen_head:
        weight = run.scale * ppml.make_anchors(NUM_CLASSES, DIM, run.kind, 1.0)
        params = list(net.parameters())
        criterion = lambda f, y: F.cross_entropy(f @ weight.T, y)  # noqa: E731
        predict = lambda f: (f @ weight.T).argmax(1)  # noqa: E731
    else:
        loss_mod = ppml.AnchorLoss(
            NUM_CLASSES, DIM, kind=run.kind, radius=1.0, metric=run.metric, scale=run.scale, pull=run.pull
        )
        params = list(net.parameters())
        criterion = loss_mod
        predict = loss_mod.predict
    opt = torch.optim.Adam(params, lr=LR)
    order_gen = torch.Generator().manual_seed(seed)
    n = Xtr.shape[0]
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=order_gen).split(BATCH):
            loss = criterion(net(Xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        f_tr, f_te = net(Xtr), net(Xte)
        train_loss = criterion(f_tr, ytr).item()
        acc = (predict(f_te) == yte).double().mean().item()
        ratio = distance_ratio(f_te, yte)
        ratio_unit = distance_ratio(F.normalize(f_te, dim=1), yte)
        norm = f_te.norm(dim=1).mean().item()
    return {"acc": acc, "ratio": ratio, "ratio_unit": ratio_unit, "train_loss": train_loss, "norm": norm}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60, help="training epochs of every run (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batch order (default: 0)")
    parser.add_argument(
        "--orthogonal",
        choices=("onehot", "hadamard"),
        default="onehot",
        help="the orthogonal anchors (default: onehot)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: 1; a 128-wide MLP gains nothing from more, and 2 OpenMP threads on a 2-core "
        "machine shared with other processes run several times slower)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.threads < 1:
        parser.error("--epochs and --threads must be >= 1")
    torch.set_num_threads(args.threads)

    t_total = time.perf_counter()
    data = load_split()
    plan = runs(args.orthogonal)
    results = []
    for i, run in enumerate(plan, 1):
        t0 = time.perf_counter()
        res = train_and_eval(run, data, args.epochs, args.seed)
        res["seconds"] = time.perf_counter() - t0
        results.append((run, res))
        print(
            f"[{i}/{len(plan)}] {run.label}: test acc {res['acc']:.4f}, intra/inter {res['ratio']:.3f}, "
            f"{res['seconds']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    total = time.perf_counter() - t_total

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    print("# Anchor losses on sklearn digits\n")
    print(f"command: `{command}`")
    print(
        f"torch {torch.__version__} · {torch.get_num_threads()} torch threads · {os.cpu_count()} cores · "
        f"python {platform.python_version()} · MLP 64→128→128→{DIM}, Adam lr {LR:g}, batch {BATCH}, "
        f"{args.epochs} epochs, seed {args.seed} · split 1347 train / 450 test (test_size=0.25, random_state=0, "
        "stratified)\n"
    )
    print(
        "| loss | anchors | γ | pull | test acc | intra/inter | intra/inter (unit f) | mean ‖f‖ | train loss | wall s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run, r in results:
        anchors = "— (linear head)" if run.metric is None else run.kind
        gamma = "—" if run.metric is None else f"{run.scale:g}"
        pull = "—" if run.metric is None or run.frozen_head else f"{run.pull:g}"
        print(
            f"| {run.name} | {anchors} | {gamma} | {pull} | {r['acc']:.4f} | {r['ratio']:.3f} | "
            f"{r['ratio_unit']:.3f} | {r['norm']:.3g} | {r['train_loss']:.4g} | {r['seconds']:.1f} |"
        )
    print(
        "\nintra/inter: mean ‖f_i − f_j‖ over same-class test pairs / mean over different-class test pairs "
        "(f = the embedding; for CE the head's input); unit f: the same on f/‖f‖. Anchor runs predict with the "
        "nearest anchor, CE with the head's argmax."
    )
    diverged = [run.label for run, r in results if not (r["train_loss"] < 10.0)]
    if diverged:
        print(f"\ndiverged (final training loss >= 10 or not finite): {'; '.join(diverged)}")
    print(f"\ntotal wall time {total:.1f} s ({len(plan)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
