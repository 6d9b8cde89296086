"""Attacks on the encryptions and the metrics that score them.

- :func:`solve_jigsaw`: a jigsaw-puzzle solver against RS (random patch shuffling) on the known grid.
- :func:`direct_comparison`, :func:`neighbor_comparison`, :func:`perfect_reconstruction`: how much of the key an
  attack recovered; :func:`psnr`, :func:`ssim`: how close a reconstruction is to the plaintext.
"""

from .jigsaw import solve_jigsaw
from .metrics import direct_comparison, neighbor_comparison, perfect_reconstruction, psnr, ssim

__all__ = ["direct_comparison", "neighbor_comparison", "perfect_reconstruction", "psnr", "solve_jigsaw", "ssim"]
