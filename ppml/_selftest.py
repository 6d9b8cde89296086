"""Does a C++ error raised by ppml._C reach Python as the documented ValueError?

It does when ppml._C and torch share one C++ runtime (see ppml/_toolchain.py). setup.py runs this file in a child
process right after building (``python ppml/_selftest.py PACKAGE_ROOT``) and fails the build when it does not;
``python -m ppml._selftest`` checks the ppml that is installed. Exit status: 0 passed, 3 ppml._C not loaded (nothing to
test), 4 no ValueError or one whose message lost its content; a crash shows as the signal that killed the process.
"""

from __future__ import annotations

import os
import sys

# (op call, what its message must contain). A message whose numbers went missing means _C formatted it with a C++
# runtime of its own: seen with a statically linked libstdc++, whose iostreams are never initialised in this process.
_CASES = (
    ("shuffle_patches", "permutation of 0..3 (N=(H/p)*(W/p)=4)"),
    ("anchor_loss", "with C=3, got 3"),
)


def _call(op: str) -> None:
    import torch

    if op == "shuffle_patches":
        torch.ops.ppml.shuffle_patches(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, dtype=torch.long), 4)
    else:
        features, anchors, labels = torch.zeros(4, 8), torch.zeros(3, 8), torch.tensor([0, 1, 3, 0])
        torch.ops.ppml.anchor_loss(features, anchors, labels, "cosine", 1.0, 0.0, True)


def main(package_root: str | None = None) -> int:
    if package_root is not None:
        # Run as a script: import the package beside the new _C, not this file's folder as a top-level namespace.
        sys.path[:] = [package_root] + [p for p in sys.path if os.path.abspath(p) != os.path.dirname(__file__)]
    import ppml  # noqa: F401  (loads ppml._C)
    from ppml import _extension

    if not _extension.native_loaded():
        print(_extension.load_reason())
        return 3
    for op, expected in _CASES:
        try:
            _call(op)
        except ValueError as e:
            if expected in str(e):
                print(f"{op}: ValueError as documented")
                continue
            print(f"{op}: the message lost its content: expected {expected!r} in {str(e).splitlines()[0]!r}")
            return 4
        print(f"{op}: bad input raised no ValueError")
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
