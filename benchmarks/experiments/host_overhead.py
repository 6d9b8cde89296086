"""Host cost of one op call at tiny sizes: what the Python layers around the kernels cost, measured on CPU.

At sizes where the kernel itself takes a few µs (B = 1 on a GPU, or the anchor loss at C = 1000 on an H200), a call
is bound by what the host does before and after the launch: argument checks, the backend choice, torch.library's
dispatch and autograd wrapper. This script times, per call and on CPU tensors small enough that the kernels cost
next to nothing:

* shuffle (B = 1, 3 × 32 × 32, p = 16) and MI (same images, g = 2): the public function (``ppml.shuffle_patches``,
  ``ppml.mix_subpatches``), the registered op called directly (``torch.ops.ppml.<op>``), and the eager PyTorch a user
  would write (the reference's reshape + gather, the reshape + mean);
* the anchor loss forward + backward (B = 4, D = 8, C = 10, squared Euclidean, mean): ``ppml.anchor_loss``,
  ``torch.ops.ppml.anchor_loss`` directly, and eager PyTorch (frozen-linear logits + ``F.cross_entropy``);

then a cProfile breakdown of where one ppml call's time goes (the functions with the most own time).

Providers are interleaved (round-robin over repeats); each repeat times ``--calls`` calls, and the best repeat is
reported (on a shared machine the other repeats measure the neighbours: host costs only ever grow under load), with
the median beside it.

    PYTHONPATH=$PWD python benchmarks/experiments/host_overhead.py [--reps 15] [--calls 300] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import platform
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

import ppml
from ppml import reference


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cases():
    """{case: {provider: callable}}; each callable makes one complete call (anchor: forward + backward)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=gen)
    perm = ppml.random_permutations(1, 4, generator=gen)
    weights = ppml.random_mixing_weights(1, 4, 2, generator=gen)

    def eager_mix(images, p, g, w=None):
        B, C, H, W = images.shape
        q = p // g
        sub = images.reshape(B, C, H // p, g, q, W // p, g, q)
        if w is None:
            return sub.mean(dim=(3, 6))
        w = w.reshape(B, 1, H // p, W // p, g, g).permute(0, 1, 2, 4, 3, 5)  # [B, 1, th, i, tw, j]
        return (sub * w.reshape(B, 1, H // p, g, 1, W // p, g, 1)).sum(dim=(3, 6))

    f = torch.randn(4, 8, generator=gen, requires_grad=True)
    anchors = torch.randn(10, 8, generator=gen)
    labels = torch.randint(0, 10, (4,), generator=gen)
    a_sq = anchors.square().sum(1)

    def anchor_public():
        ppml.anchor_loss(f, anchors, labels).backward()

    def anchor_op():
        torch.ops.ppml.anchor_loss(f, anchors, labels, "sqeuclidean", 1.0, 0.0, True)[0].mean().backward()

    def anchor_eager():
        # the frozen linear layer a user would write: u_c = γ f·a_c − (γ/2)‖a_c‖², cross-entropy over u (‖a_c‖² kept)
        F.cross_entropy(f @ anchors.T - 0.5 * a_sq, labels).backward()

    def anchor_eager_norms():
        # the same with ‖a_c‖² computed in the call, as a loss function that takes the anchors would
        F.cross_entropy(f @ anchors.T - 0.5 * anchors.square().sum(1), labels).backward()

    return {
        "shuffle B=1 3x32x32 p=16": {
            "ppml.shuffle_patches": lambda: ppml.shuffle_patches(x, 16, perm),
            "torch.ops.ppml.shuffle_patches": lambda: torch.ops.ppml.shuffle_patches(x, perm, 16),
            "eager (reshape + gather)": lambda: reference.shuffle_patches(x, perm, 16),
        },
        "MI mean B=1 3x32x32 p=16 g=2": {
            "ppml.mix_subpatches": lambda: ppml.mix_subpatches(x, 16, 2),
            "torch.ops.ppml.mix_subpatches": lambda: torch.ops.ppml.mix_subpatches(x, 16, 2, None),
            "eager (reshape + mean)": lambda: eager_mix(x, 16, 2),
        },
        "MI keyed B=1 3x32x32 p=16 g=2": {
            "ppml.mix_subpatches": lambda: ppml.mix_subpatches(x, 16, 2, weights),
            "torch.ops.ppml.mix_subpatches": lambda: torch.ops.ppml.mix_subpatches(x, 16, 2, weights),
            "eager (reshape + weighted sum)": lambda: eager_mix(x, 16, 2, weights),
        },
        "anchor fwd+bwd B=4 D=8 C=10": {
            "ppml.anchor_loss": anchor_public,
            "torch.ops.ppml.anchor_loss": anchor_op,
            "eager (linear + cross_entropy)": anchor_eager,
            "eager, ‖a‖² in the call": anchor_eager_norms,
        },
    }


def launcher_cases():
    """The Triton launchers' own host cost at B = 1 (ppml.kernels, Python only): Triton's launch is replaced by a
    stub that does nothing, so what remains is what ppml's code does around it (layout, allocation, geometry, grid).
    Triton's own launch path is not included (it needs a GPU); it does not depend on ppml."""
    import ppml.kernels.mix_subpatches as km
    import ppml.kernels.shuffle_patches as ks

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    ks._shuffle_patches_kernel = km._mix_subpatches_kernel = Stub()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=gen)
    perm = ppml.random_permutations(1, 4, generator=gen)
    weights = ppml.random_mixing_weights(1, 4, 2, generator=gen)
    return {
        "Triton launchers B=1 3x32x32 (launch stubbed)": {
            "shuffle_patches_triton": lambda: ks.shuffle_patches_triton(x, perm, 16),
            "mix_subpatches_triton": lambda: km.mix_subpatches_triton(x, 16, 2),
            "mix_subpatches_triton keyed": lambda: km.mix_subpatches_triton(x, 16, 2, weights),
        }
    }


def time_case(providers: dict, reps: int, calls: int) -> dict[str, tuple[float, float]]:
    """(best, median) µs per call of each provider over the repeats, the providers interleaved repeat by repeat."""
    for fn in providers.values():  # warm-up: first-call caches, lazy imports
        for _ in range(20):
            fn()
    samples = {name: [] for name in providers}
    for _ in range(reps):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: (min(s), statistics.median(s)) for name, s in samples.items()}


def profile_call(fn, calls: int, top: int) -> str:
    """The `top` functions by own time over `calls` calls of `fn` (cProfile), µs per call."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = f"{path.split('site-packages/')[-1].split('/ppml/')[-1]}:{line}({name})"
        rows.append((tottime, cumtime, ncalls, where))
    rows.sort(reverse=True)
    lines = ["| own µs/call | cum µs/call | calls/call | function |", "|---:|---:|---:|---|"]
    for tottime, cumtime, ncalls, where in rows[:top]:
        lines.append(f"| {tottime / calls * 1e6:.1f} | {cumtime / calls * 1e6:.1f} | {ncalls / calls:g} | `{where}` |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="also print a cProfile breakdown of each ppml call")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors: keep thread-pool wake-ups out of the host cost
    print(
        f"CPU: {_cpu_name()} ({torch.get_num_threads()} torch thread); torch {torch.__version__}; "
        f"ppml._C loaded: {ppml.backend_info()['native'] is None}"
    )
    print()
    print("| case | provider | µs / call (best) | median | best × direct op | best × eager |")
    print("|---|---|---:|---:|---:|---:|")
    all_cases = cases()
    for case, providers in all_cases.items():
        us = time_case(providers, args.reps, args.calls)
        _, direct, eager = (us[n][0] for n in list(providers)[:3])
        for name, (best, median) in us.items():
            print(f"| {case} | {name} | {best:.1f} | {median:.1f} | {best / direct:.2f} | {best / eager:.2f} |")
    for case, providers in launcher_cases().items():
        for name, (best, median) in time_case(providers, args.reps, args.calls).items():
            print(f"| {case} | {name} | {best:.1f} | {median:.1f} | | |")
    if args.profile:
        for case, providers in all_cases.items():
            name, fn = next(iter(providers.items()))
            print(f"\n{case}: `{name}`, cProfile (own time, µs per call; profiling inflates every figure)\n")
            print(profile_call(fn, args.calls * 4, args.top))


if __name__ == "__main__":
    main()
