"""Numerical floors every layer of the anchor loss shares (reference, ops, C++ twins, Triton kernels).

A leaf module (imports nothing from ppml), so that kernels take their constants from here and never from
ppml.reference, which is the test oracle and must stay free to change.
"""

# Smallest norm a feature or anchor is divided by in the cosine metric (as F.normalize): a zero feature gives finite
# logits (all 0), never NaN.
COS_EPS = 1e-12
# Smallest squared distance the non-squared Euclidean metric takes a square root of: finite gradients at the anchor.
DIST2_EPS = 1e-12
