"""Gallery linkage: which image of a candidate collection a ciphertext was made from, without solving anything.

RS keeps the multiset of an image's tiles (only their order is secret) and MI with the mean mix is a public
deterministic map, so an attacker who holds candidate images — a public photo collection, a leaked original, a
crawl — can link a ciphertext to its plaintext by comparing it with what each candidate would have become. This is
how NeuraCrypt was broken (Carlini et al., 2021): no key recovery, only matching.

:func:`reidentify` ranks a gallery for each ciphertext; :func:`index_gallery` does the per-gallery work once (tile
hashes, tile descriptors, signatures) so that many ciphertexts, or many calls, reuse it.

RS (``scheme="rs"``):

1. **Exact tiles.** Every tile is hashed from its bytes (two random integer linear forms, exact in float64, reduced
   modulo primes and packed into one int64); for every (ciphertext, gallery image) pair the number of the
   ciphertext's present tiles found in the image, multiset-wise, comes from one sparse join over the hashes (no
   dense pair loop). A ciphertext whose every present tile is found in one image is an exact hit.
2. **Perturbed tiles** (re-encoded, shifted): each p×p tile is described by the means of a ``grid``×``grid`` array of
   cells (C·grid² numbers), so a tile's description survives JPEG noise and a one-pixel shift. Each image gets an
   order-free signature: the quantiles of its tiles' descriptors along fixed random directions (a sliced 1-D
   Wasserstein comparison between tile multisets; quantiles rather than sorted values, so a ciphertext with dropped
   tiles is compared as a sample of the same distribution). The ``shortlist`` gallery images with the closest
   signatures, and those with the most exact tiles, are re-ranked by a two-sided nearest-neighbour (chamfer)
   distance between the tile descriptors — the one-to-one min-cost tile matching with the one-to-one constraint
   relaxed. The reverse side counts only the candidate's best-matched tiles, as many as the ciphertext has present,
   since dropped tiles have no counterpart.
3. **Defences** (:mod:`ppml.attacks.defences`): dropped tiles (all zero, or ``present``) take no part; with a gap the
   attacker, who knows p and the gap, cuts its candidates the same way (``gap=``) before comparing.
4. **A shifted grid** (``align=True``): a ciphertext cropped or padded by a few pixels no longer has its tiles on the
   p-grid. Tile borders are the strongest edges of a shuffled image, so the grid's phase is read from the column and
   row differences folded modulo p and undone; the ciphertext is then matched both as given and moved back, and the
   better reading is kept (an aligned ciphertext whose content happens to have strong edges is not harmed). Tiles
   re-cut this way are exact again except at the image border, so the exact stage applies. MI blocks likewise.
   Exact hits re-rank only their top k, and at most ``max_tiles`` present tiles per ciphertext enter the matching.

MI (``scheme="mi"``; the mixing grid g is ``gallery side / ciphertext side``, or ``mix_grid``):

- **mean mix** (the paper's, ``keyed=False``): MI(candidate) is computed with :func:`ppml.mix_subpatches` and compared
  with the ciphertext after both are described by ``grid``×``grid`` cell means per mixed block (mean squared
  difference). The true candidate scores 0 up to float rounding.
- **keyed mix** (``keyed=True``: unknown convex weights per image and patch): the attacker cannot recompute MI, but
  a mixed block must lie in the affine hull of the candidate's g² sub-patch descriptions whatever the weights; the
  score is the least-squares residual of that fit (an orthonormal basis of the sub-patch differences per block;
  near-null directions dropped), summed over blocks. It needs more numbers per block than weights (C·grid² > g²;
  grid = p/g compares at full resolution), and with few spare numbers (g = 4) it fits JPEG noise too: the plain
  mean-mix comparison (``keyed=False``) links keyed ciphertext as well, since the weights average out in the cell
  means, and is the more robust of the two.

Cost: RS, per call O(M·N + G·N) hashing and describing, one sparse join, an M×G signature distance and
M·shortlist chamfer distances of min(N, max_tiles)×N tiles (batched over the ciphertexts and the shortlist). MI
mean: an M×G distance over descriptors; keyed: O(M·G·H·W·C) multiply-adds, chunked over the gallery.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_int, describe

__all__ = ["GalleryIndex", "Reidentification", "index_gallery", "reidentify"]

_OP = "ppml.attacks.reidentify"
_INDEX_OP = "ppml.attacks.index_gallery"
_SCHEMES = ("rs", "mi")
_PRIMES = (2147483647, 2147483629)  # two primes below 2^31: each reduced hash fits 31 bits, the pair one int64
_PROJECTIONS, _QUANTILES = 16, 16  # signature: quantiles of the tile descriptors along fixed random directions
_ALIGN_MARGIN = 1.5  # a shifted grid's borders must be this much stronger than the edges at phase 0
_CHUNK = 64  # images hashed / described at a time (bounds the float64 byte copies)


class Reidentification(NamedTuple):
    """What :func:`reidentify` found for each of M ciphertexts.

    Attributes:
        index (Tensor[M] int64): the gallery image ranked first.
        candidates (Tensor[M, k] int64): the top k gallery images, best first (k = ``top_k``, at most the gallery
            size).
        scores (Tensor[M, k] float32): their distances, ascending (lower is closer; 0 for an exact match). RS: the
            chamfer distance between tile descriptors, in squared input units per descriptor entry; MI: the mean
            squared difference (mean mix) or mean squared fit residual (keyed) per descriptor entry.
        exact (Tensor[M] float32): RS — the share of the ciphertext's present tiles found bytewise among ``index``'s
            tiles (1.0: an exact hit); MI — 1.0 where ``index``'s score is 0 up to float rounding, else 0.0.
    """

    index: Tensor
    candidates: Tensor
    scores: Tensor
    exact: Tensor


@dataclass
class GalleryIndex:
    """A gallery prepared by :func:`index_gallery` for one scheme and its settings (reusable across calls).

    Attributes:
        scheme, patch_size, grid, gap, mix_grid, keyed: the settings it was built for (``mix_grid`` None for RS).
        size: G, the number of gallery images.
        shape: ``(C, H, W)`` of the ciphertext it expects.
        tiles (Tensor[G, N, C·grid²] float32): RS tile descriptors; MI mean: ``Tensor[G, D]`` block descriptors.
        signature (Tensor[G, S] float32): RS tile-multiset signatures (None for MI).
        keys (Tensor[U] int64), pair_key, pair_image, pair_count (Tensor[P]): RS exact-tile index — the sorted
            distinct tile hashes, and every (hash, image) pair with the tile's count in that image, sorted by hash.
        images (Tensor[G, C, H, W]): keyed MI only, the candidates themselves (their fit is made per ciphertext).
    """

    scheme: str
    patch_size: int
    grid: int
    gap: int
    mix_grid: int | None
    keyed: bool
    size: int
    shape: tuple[int, int, int]
    tiles: Tensor | None = None
    signature: Tensor | None = None
    keys: Tensor | None = None
    pair_key: Tensor | None = None
    pair_image: Tensor | None = None
    pair_count: Tensor | None = None
    images: Tensor | None = None

    def head(self, n: int) -> GalleryIndex:
        """The index of the first ``n`` gallery images (a smaller gallery without indexing it again)."""
        check_int(n, "ppml.attacks.GalleryIndex.head", "n", 1)
        n = min(n, self.size)
        cut = {}
        if self.pair_image is not None:
            keep = self.pair_image < n  # the pairs stay sorted by hash; hashes left without a pair just match nothing
            cut = {"pair_key": self.pair_key[keep], "pair_image": self.pair_image[keep],
                   "pair_count": self.pair_count[keep]}  # fmt: skip
        for name in ("tiles", "signature", "images"):
            if getattr(self, name) is not None:
                cut[name] = getattr(self, name)[:n]
        return dataclasses.replace(self, size=n, **cut)


# ---- argument checks ------------------------------------------------------------------------------------------------


def _check_images(x, op: str, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.is_complex() or x.dtype == torch.bool or x.shape[0] == 0:
        raise ValueError(f"{op}: {name} must be a real tensor [B, C, H, W] with B >= 1, got {describe(x)}")
    return x


def _check_settings(op: str, scheme, patch_size, grid, gap, keyed) -> None:
    if scheme not in _SCHEMES:
        raise ValueError(f"{op}: scheme must be one of {_SCHEMES}, got {scheme!r}")
    check_int(patch_size, op, "patch_size", 1)
    check_int(grid, op, "grid", 1)
    check_int(gap, op, "gap", 0)
    if scheme == "rs" and patch_size % grid:
        raise ValueError(f"{op}: grid must divide patch_size {patch_size} (cells of p/grid pixels), got {grid}")
    if scheme == "mi" and gap:
        raise ValueError(f"{op}: gap is an RS defence; scheme 'mi' takes gap=0, got {gap}")
    if scheme == "rs" and keyed:
        raise ValueError(f"{op}: keyed is an MI setting; scheme 'rs' takes keyed=False")
    if not isinstance(keyed, bool):
        raise ValueError(f"{op}: keyed must be a bool, got {keyed!r}")


def _check_mix_grid(op: str, mix_grid, patch_size: int, grid: int, channels: int, keyed: bool) -> int:
    check_int(mix_grid, op, "mix_grid", 1)
    if patch_size % mix_grid:
        raise ValueError(f"{op}: the mixing grid g must divide patch_size {patch_size}, got g = {mix_grid}")
    block = patch_size // mix_grid
    if block % grid:
        raise ValueError(f"{op}: grid must divide the mixed block side p/g = {block} (cells of p/(g·grid) pixels), "
                         f"got {grid}")  # fmt: skip
    if keyed and channels * grid * grid <= mix_grid * mix_grid:
        raise ValueError(
            f"{op}: keyed MI needs more numbers per block (C·grid² = {channels * grid * grid}) than mixing weights "
            f"(g² = {mix_grid * mix_grid}); raise grid (at most p/g = {block})"
        )
    return mix_grid


# ---- RS: tiles, hashes, descriptors, signatures ---------------------------------------------------------------------


def _tiles(x: Tensor, p: int) -> Tensor:
    """``[B, N, C, p, p]`` row-major tiles of ``x`` [B, C, rows·p, cols·p]."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c, p, p)


def _hash_coefficients(length: int) -> Tensor:
    """Two fixed random integer vectors < 2^24: a byte (< 2^8) times one, summed over fewer than 2^21 bytes, stays
    below 2^53, so the float64 matrix product is exact whatever order the BLAS sums in."""
    gen = torch.Generator().manual_seed(0x5EED)
    return torch.randint(0, 1 << 24, (length, 2), generator=gen, dtype=torch.int64).double()


def _tile_hashes(x: Tensor, p: int) -> Tensor:
    """``[B, N]`` int64: a hash of each tile's bytes (equal tiles, equal hashes; distinct ones collide with
    probability about 2^-48)."""
    out = []
    for chunk in x.split(_CHUNK):
        t = _tiles(chunk, p).contiguous()
        b, n = t.shape[:2]
        raw = t.reshape(b, n, -1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(b, n, -1)
        if raw.shape[-1] >= 1 << 21:
            raise ValueError(f"{_OP}: tiles of {raw.shape[-1]} bytes are too large to hash exactly (< 2^21)")
        h = (raw.double() @ _hash_coefficients(raw.shape[-1])).to(torch.int64)  # exact integers < 2^53
        out.append((h[..., 0] % _PRIMES[0]) * (1 << 31) + h[..., 1] % _PRIMES[1])
    return torch.cat(out)


def _tile_descriptors(x: Tensor, p: int, grid: int) -> Tensor:
    """``[B, N, C·grid²]`` float32: each tile's grid×grid cell means."""
    out = []
    for chunk in x.split(_CHUNK):
        pooled = F.avg_pool2d(chunk.float(), p // grid)  # [b, C, rows·grid, cols·grid]
        b, c, h, w = pooled.shape
        d = pooled.reshape(b, c, h // grid, grid, w // grid, grid).permute(0, 2, 4, 1, 3, 5)
        out.append(d.reshape(b, (h // grid) * (w // grid), c * grid * grid))
    return torch.cat(out)


def _directions(dim: int) -> Tensor:
    gen = torch.Generator().manual_seed(0xD1EC)
    d = torch.randn(dim, _PROJECTIONS, generator=gen)
    return d / d.norm(dim=0, keepdim=True)


def _signatures(desc: Tensor, present: Tensor | None) -> Tensor:
    """``[B, Q·K]``: the Q quantiles of each image's present tiles along K fixed directions (nearest rank)."""
    proj = desc @ _directions(desc.shape[-1])  # [B, N, K]
    if present is not None:
        proj = proj.masked_fill(~present[..., None], float("inf"))
    srt = proj.sort(dim=1).values
    n = srt.shape[1] if present is None else present.sum(1).clamp_min(1)
    n = torch.as_tensor(n).reshape(-1, 1).expand(srt.shape[0], 1).float()
    levels = (torch.arange(_QUANTILES, dtype=torch.float32) + 0.5) / _QUANTILES
    idx = (levels[None] * (n - 1)).round().long()  # [B, Q]
    q = torch.gather(srt, 1, idx[..., None].expand(-1, -1, srt.shape[2]))  # [B, Q, K]
    return q.reshape(q.shape[0], -1) / math.sqrt(_QUANTILES * _PROJECTIONS)


def _gallery_pairs(keys: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The exact-tile index of a gallery's ``[G, N]`` hashes: (sorted distinct hashes, and per (hash, image) pair
    its hash id, image and count, sorted by hash id)."""
    g, n = keys.shape
    uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)
    packed = inv * g + torch.arange(g).repeat_interleave(n)
    pairs, counts = torch.unique(packed, return_counts=True)  # sorted: by hash id, then image
    return uniq, pairs // g, pairs % g, counts


def _exact_counts(qkeys: Tensor, present: Tensor, index: GalleryIndex) -> Tensor:
    """``[M, G]`` float32: how many of each ciphertext's present tiles each gallery image holds (multiset-wise),
    from one sparse join over the hashes."""
    m = qkeys.shape[0]
    out = torch.zeros(m * index.size)
    uniq = index.keys
    pos = torch.searchsorted(uniq, qkeys).clamp_max(uniq.numel() - 1)
    found = (uniq[pos] == qkeys) & present
    if not bool(found.any()):
        return out.reshape(m, index.size)
    rows = torch.arange(m)[:, None].expand_as(qkeys)[found]
    qpairs, qcounts = torch.unique(pos[found] * m + rows, return_counts=True)
    qid, qimg = qpairs // m, qpairs % m
    start = torch.searchsorted(index.pair_key, qid)
    lens = torch.searchsorted(index.pair_key, qid, right=True) - start
    # Expanding every (ciphertext tile hash, gallery image holding it) pair; bounded by a few entries per
    # ciphertext tile except for tiles shared by many images (flat backgrounds), which are few.
    owner = torch.repeat_interleave(torch.arange(qid.numel()), lens)
    offset = torch.arange(owner.numel()) - torch.repeat_interleave(lens.cumsum(0) - lens, lens)
    g = start[owner] + offset
    hits = torch.minimum(qcounts[owner], index.pair_count[g]).float()
    out.index_add_(0, qimg[owner] * index.size + index.pair_image[g], hits)
    return out.reshape(m, index.size)


def _chamfer(query: Tensor, cands: Tensor) -> Tensor:
    """Two-sided nearest-neighbour distance between ciphertexts' present tile descriptors ``[b, n, d]`` and each of
    their candidates' ``[b, s, N, d]`` → ``[b, s]``: the mean, over the ciphertext's tiles, of the distance to the
    nearest candidate tile, plus the mean over the candidate's n best-matched tiles of the distance to the nearest
    ciphertext tile; halved."""
    b, s, big_n, dim = cands.shape
    n = query.shape[1]
    q = query[:, None].expand(b, s, n, dim).reshape(b * s, n, dim)
    d = torch.cdist(q, cands.reshape(b * s, big_n, dim)).square_() / dim
    forward = d.min(2).values.mean(1)
    reverse = d.min(1).values.topk(min(n, big_n), dim=1, largest=False).values.mean(1)
    return ((forward + reverse) / 2).reshape(b, s)


def _chamfer_all(desc: Tensor, present: Tensor, tiles: Tensor, cand: Tensor, max_tiles: int) -> Tensor:
    """``[M, s]`` chamfer distances, batched over the ciphertexts with the same number of present tiles, in blocks
    of at most ~2^24 tile-pair distances."""
    m, s = cand.shape
    out = torch.empty(m, s)
    counts = present.sum(1)
    for n in counts.unique().tolist():
        rows = (counts == n).nonzero()[:, 0]
        # Past max_tiles, an evenly spaced subset of the present tiles stands for them (the cost is n·N per pair).
        pick = torch.linspace(0, n - 1, min(n, max_tiles)).round().long()
        per = max(1, (1 << 24) // (s * len(pick) * tiles.shape[1]))
        for blk in rows.split(per):
            q = desc[blk][present[blk]].reshape(len(blk), n, -1)[:, pick]
            out[blk] = _chamfer(q, tiles[cand[blk]])
    return out


def _align(x: Tensor, period: int) -> tuple[Tensor, Tensor]:
    """Undoes a shift of each image's tile grid; returns (the images, which were moved).

    The grid's phase is where the mean absolute difference between neighbouring columns (rows), folded modulo the
    tile side, peaks — tiles of a shuffle do not continue each other, so their borders are the strongest edges — and
    the image is moved back by it (phases past half a tile read as shifts the other way), the uncovered border
    repeating the edge pixels. An image is moved only when that peak is 1.5 times the border strength at phase 0;
    :func:`reidentify` still keeps the unmoved reading where it matches better."""
    moved = torch.zeros(x.shape[0], dtype=torch.bool)
    if period < 2 or min(x.shape[-2:]) < 2 * period:  # fewer than two tiles a side: no border to find
        return x, moved
    xf = x.float()
    out = x
    for dim in (-1, -2):
        diff = (xf.narrow(dim, 1, xf.shape[dim] - 1) - xf.narrow(dim, 0, xf.shape[dim] - 1)).abs()
        prof = diff.mean((1, -2 if dim == -1 else -1))  # [M, L − 1]: border strength between line j and j + 1
        length = prof.shape[1] + 1
        folded = torch.zeros(x.shape[0], period)
        phase_of = (torch.arange(1, length) % period)[None].expand_as(prof)  # a border before line j: phase j mod p
        folded.scatter_add_(1, phase_of, prof)
        folded /= torch.bincount(phase_of[0], minlength=period).clamp_min(1)
        best, phase = folded.max(1)
        phase = torch.where(best > _ALIGN_MARGIN * folded[:, 0] + 1e-6, phase, torch.zeros_like(phase))
        shift = torch.where(phase > period // 2, phase - period, phase)  # > 0: content moved forward by `shift`
        if bool((shift == 0).all()):
            continue
        moved |= shift != 0
        out = torch.stack([_move(im, -int(sh), dim) if sh else im for im, sh in zip(out, shift.tolist(), strict=True)])
    return out, moved


def _move(im: Tensor, by: int, dim: int) -> Tensor:
    """``im`` moved by ``by`` lines along ``dim`` (-1 or -2), the uncovered lines repeating the edge."""
    length = im.shape[dim]
    idx = (torch.arange(length) - by).clamp(0, length - 1)
    return im.index_select(dim, idx)


# ---- the public functions -----------------------------------------------------------------------------------------


def index_gallery(
    gallery: Tensor,
    *,
    scheme: str,
    patch_size: int,
    grid: int = 2,
    gap: int = 0,
    mix_grid: int | None = None,
    keyed: bool = False,
) -> GalleryIndex:
    """Prepares candidate images for :func:`reidentify` (the per-gallery work, done once).

    Args:
        gallery (Tensor[G, C, H, W]): the candidates at the plaintext's size, on the ciphertexts' value scale
            (uint8, or the same float range). CPU.
        scheme: ``"rs"`` or ``"mi"``.
        patch_size: p.
        grid: each tile (RS) or mixed block (MI) is described by grid×grid cell means; must divide p (RS) or p/g
            (MI). Coarser survives perturbation better, finer tells similar tiles apart.
        gap: RS only, the gap defence's pixels between patches (the candidates are cut the same way).
        mix_grid: MI only, the mixing grid g (required here; :func:`reidentify` infers it from the shapes).
        keyed: MI only, the ciphertexts were mixed with secret convex weights.

    Returns:
        :class:`GalleryIndex`.
    """
    op = _INDEX_OP
    _check_images(gallery, op, "gallery")
    _check_settings(op, scheme, patch_size, grid, gap, keyed)
    p = patch_size
    c, h, w = gallery.shape[1:]
    if scheme == "rs":
        from .defences import gapped_grid, keep_gapped_patches

        if mix_grid is not None:
            raise ValueError(f"{op}: mix_grid is an MI setting; scheme 'rs' takes mix_grid=None, got {mix_grid!r}")
        if p > h or p > w or (not gap and (h % p or w % p)):
            raise ValueError(f"{op}: patch_size {p} must divide the gallery's H and W (or use a gap), got "
                             f"{describe(gallery)}")  # fmt: skip
        if gap:
            rows, cols = gapped_grid(h, w, p, gap)
            gallery = torch.cat([keep_gapped_patches(ch, p, gap) for ch in gallery.split(_CHUNK)])
        else:
            rows, cols = h // p, w // p
        keys = _tile_hashes(gallery, p)
        uniq, pair_key, pair_image, pair_count = _gallery_pairs(keys)
        desc = _tile_descriptors(gallery, p, grid)
        return GalleryIndex(
            "rs", p, grid, gap, None, False, gallery.shape[0], (c, rows * p, cols * p), tiles=desc,
            signature=_signatures(desc, None), keys=uniq, pair_key=pair_key, pair_image=pair_image,
            pair_count=pair_count,
        )  # fmt: skip
    if mix_grid is None:
        raise ValueError(f"{op}: scheme 'mi' needs mix_grid, the mixing grid g")
    g = _check_mix_grid(op, mix_grid, p, grid, c, keyed)
    if h % p or w % p:
        raise ValueError(f"{op}: patch_size {p} must divide the gallery's H and W, got {describe(gallery)}")
    shape = (c, h // g, w // g)
    if keyed:
        return GalleryIndex("mi", p, grid, 0, g, True, gallery.shape[0], shape, images=gallery)
    from .. import mix_subpatches

    desc = torch.cat([_mi_descriptors(mix_subpatches(ch, p, g), p // g, grid) for ch in gallery.split(_CHUNK)])
    return GalleryIndex("mi", p, grid, 0, g, False, gallery.shape[0], shape, tiles=desc)


def _mi_descriptors(y: Tensor, block: int, grid: int) -> Tensor:
    """``[B, D]``: an MI image's grid×grid cell means per mixed block, flattened."""
    return F.avg_pool2d(y.float(), block // grid).flatten(1)


def reidentify(
    ciphertexts: Tensor,
    gallery: Tensor | GalleryIndex,
    *,
    scheme: str,
    patch_size: int,
    grid: int = 2,
    gap: int = 0,
    mix_grid: int | None = None,
    keyed: bool = False,
    present: Tensor | None = None,
    align: bool = True,
    top_k: int = 5,
    shortlist: int = 32,
    max_tiles: int = 256,
    chunk: int = 256,
) -> Reidentification:
    """For each ciphertext, the gallery image it was made from (see the module doc for the method).

    Args:
        ciphertexts (Tensor[M, C, h, w]): RS ciphertext (``shuffle_patches`` or
            :func:`~ppml.attacks.defences.encrypt_rs_defended` output, possibly re-encoded or shifted) or MI
            ciphertext (``mix_subpatches`` output), on the gallery's value scale. CPU.
        gallery (Tensor[G, C, H, W] or GalleryIndex): the candidates at the plaintext's size (RS: H, W = h, w
            without a gap; MI: g·h, g·w), or an index of them made with the same settings.
        scheme: ``"rs"`` or ``"mi"``.
        patch_size: p.
        grid: how finely a tile (RS) or mixed block (MI) is described: grid×grid cell means (must divide p, or p/g).
        gap: RS, the gap defence's pixels between patches.
        mix_grid: MI, the mixing grid g; default ``gallery H / ciphertext h``.
        keyed: MI, the ciphertexts were mixed with secret convex weights (score: affine-hull fit residual).
        present (Tensor[M, N] bool, optional): RS, which ciphertext tiles carry content; default: the tiles that
            are not all zero (pass it for re-encoded ciphertext, where blank tiles are no longer exactly zero).
        align: first undo a shift of each ciphertext's tile grid (RS tiles, MI blocks): its phase is found from the
            strongest column and row borders modulo the tile side (see ``_align``). Costs one pass over the pixels.
        top_k: candidates returned per ciphertext.
        shortlist: RS, gallery images per ciphertext re-ranked by the tile matching (by signature, plus the
            images holding the most exact tiles).
        max_tiles: RS, the re-ranking compares at most this many of a ciphertext's present tiles (evenly spaced in
            its tile order) with every tile of a candidate; its cost grows with their product.
        chunk: gallery images processed at a time (MI keyed and the dense distances).

    Returns:
        :class:`Reidentification`.

    Raises:
        ValueError: naming the argument, for bad shapes or settings, or an index made with other settings.
    """
    op = _OP
    _check_images(ciphertexts, op, "ciphertexts")
    _check_settings(op, scheme, patch_size, grid, gap, keyed)
    check_int(top_k, op, "top_k", 1)
    check_int(shortlist, op, "shortlist", 1)
    check_int(max_tiles, op, "max_tiles", 1)
    check_int(chunk, op, "chunk", 1)
    c, h, w = ciphertexts.shape[1:]
    if isinstance(gallery, GalleryIndex):
        index = gallery
        want = (scheme, patch_size, grid, gap, keyed)
        have = (index.scheme, index.patch_size, index.grid, index.gap, index.keyed)
        if want != have or (mix_grid is not None and mix_grid != index.mix_grid):
            raise ValueError(f"{op}: gallery index was made for (scheme, patch_size, grid, gap, keyed) = {have}, "
                             f"mix_grid {index.mix_grid}; this call asks for {want}, mix_grid {mix_grid}")  # fmt: skip
    else:
        _check_images(gallery, op, "gallery")
        if gallery.shape[1] != c:
            raise ValueError(f"{op}: gallery and ciphertexts must have the same channels, got {describe(gallery)} "
                             f"and {describe(ciphertexts)}")  # fmt: skip
        if scheme == "mi" and mix_grid is None:
            gh, gw = gallery.shape[2:]
            if gh % h or gw % w or gh // h != gw // w:
                raise ValueError(f"{op}: scheme 'mi': the gallery's side must be g times the ciphertexts' (the "
                                 f"mixing grid g), got {describe(gallery)} and {describe(ciphertexts)}")  # fmt: skip
            mix_grid = gh // h
        index = index_gallery(gallery, scheme=scheme, patch_size=patch_size, grid=grid, gap=gap, mix_grid=mix_grid,
                              keyed=keyed)  # fmt: skip
    if (c, h, w) != index.shape:
        raise ValueError(f"{op}: ciphertexts must be [M, C, H, W] = [M, {', '.join(map(str, index.shape))}] for this "
                         f"gallery and these settings, got {describe(ciphertexts)}")  # fmt: skip
    if not isinstance(align, bool):
        raise ValueError(f"{op}: align must be a bool, got {align!r}")
    k = min(top_k, index.size)
    if scheme == "rs":
        s = min(max(shortlist, k), index.size)
        if present is None:
            n = index.tiles.shape[1]
            present = _tiles(ciphertexts, patch_size).reshape(ciphertexts.shape[0], n, -1).ne(0).any(2)

        def run(x: Tensor, rows: Tensor | None) -> Reidentification:
            return _reidentify_rs(x, index, present if rows is None else present[rows], k, s, max_tiles, op)
    elif present is not None:
        raise ValueError(f"{op}: present is an RS setting (dropped tiles); scheme 'mi' takes present=None")
    else:

        def run(x: Tensor, rows: Tensor | None) -> Reidentification:
            return _reidentify_mi_keyed(x, index, k, chunk) if keyed else _reidentify_mi(x, index, k, chunk)

    found = run(ciphertexts, None)
    if align:
        moved_x, moved = _align(ciphertexts, patch_size if scheme == "rs" else patch_size // index.mix_grid)
        if bool(moved.any()):
            rows = moved.nonzero()[:, 0]
            other = run(moved_x[rows], rows)
            # The reading (as given, or moved back) whose best candidate matches better wins.
            better = (other.exact > found.exact[rows]) | (
                (other.exact == found.exact[rows]) & (other.scores[:, 0] < found.scores[rows, 0])
            )
            rows = rows[better]
            found = Reidentification(
                *(torch.index_put(a, (rows,), b[better]) for a, b in zip(found, other, strict=True))
            )
    return found


def _reidentify_mi(ciphertexts: Tensor, index: GalleryIndex, k: int, chunk: int) -> Reidentification:
    y = _mi_descriptors(ciphertexts, index.patch_size // index.mix_grid, index.grid)
    dist = torch.cat([torch.cdist(y, t).square_() for t in index.tiles.split(chunk)], 1) / y.shape[1]
    # The expanded form cdist uses loses the last digits; the top candidates are rescored from the differences.
    cand = dist.topk(min(index.size, 2 * k), dim=1, largest=False).indices
    dist = (y[:, None] - index.tiles[cand]).square().mean(2)
    return _ranked(dist, k, y.square().mean(1), cand)


def _ranked(dist: Tensor, k: int, scale: Tensor, cand: Tensor | None = None) -> Reidentification:
    scores, pos = dist.topk(k, dim=1, largest=False)
    cand = pos if cand is None else torch.gather(cand, 1, pos)
    exact = (scores[:, 0] <= 1e-6 * scale.clamp_min(1e-12)).float()
    return Reidentification(cand[:, 0], cand, scores, exact)


def _reidentify_rs(x: Tensor, index: GalleryIndex, present: Tensor, k: int, s: int, max_tiles: int, op: str):
    p = index.patch_size
    m, n = x.shape[0], index.tiles.shape[1]
    if not isinstance(present, Tensor) or present.dtype != torch.bool or tuple(present.shape) != (m, n):
        raise ValueError(f"{op}: present must be bool [M, N] = [{m}, {n}], got {describe(present)}")
    present = present.cpu()
    if not bool(present.any(1).all()):
        raise ValueError(f"{op}: every ciphertext needs at least one present (non-blank) tile")
    n_present = present.sum(1).float()
    exact = _exact_counts(_tile_hashes(x, p), present, index) / n_present[:, None]  # [M, G] in [0, 1]
    desc = _tile_descriptors(x, p, index.grid)
    sig = torch.cdist(_signatures(desc, present), index.signature)  # [M, G]
    # Shortlist: the closest signatures, with the images holding many exact tiles moved ahead (a full match first).
    key = sig / sig.amax(1, keepdim=True).clamp_min(1e-12) - 2 * exact
    cand_out = torch.empty(m, k, dtype=torch.int64)
    score_out = torch.empty(m, k)
    # A ciphertext with an exact hit needs only its top k re-scored; the others their whole shortlist.
    solved = exact.amax(1) >= 1
    for rows, width in ((solved.nonzero()[:, 0], k), ((~solved).nonzero()[:, 0], s)):
        if rows.numel() == 0:
            continue
        cand = key[rows].topk(width, dim=1, largest=False).indices  # [r, width]
        scores = _chamfer_all(desc[rows], present[rows], index.tiles, cand, max_tiles)
        hit = torch.gather(exact[rows], 1, cand)
        scores = torch.where(hit >= 1, torch.zeros((), dtype=scores.dtype), scores)  # an exact match is distance 0
        # Order by distance, ties (exact matches) by the share of exact tiles.
        order = torch.argsort(-hit, dim=1, stable=True)
        order = torch.gather(order, 1, torch.argsort(torch.gather(scores, 1, order), dim=1, stable=True))[:, :k]
        cand_out[rows], score_out[rows] = torch.gather(cand, 1, order), torch.gather(scores, 1, order)
    best = torch.gather(exact, 1, cand_out[:, :1])[:, 0]
    return Reidentification(cand_out[:, 0], cand_out, score_out, best)


def _reidentify_mi_keyed(y: Tensor, index: GalleryIndex, k: int, chunk: int) -> Reidentification:
    p, g, grid = index.patch_size, index.mix_grid, index.grid
    block = p // g
    qd = _mi_descriptors(y, block, grid)  # [M, C·rows·grid·cols·grid]
    m, c = y.shape[:2]
    rows, cols = y.shape[2] // block, y.shape[3] // block
    # Per block: [M, N, D] with D = C·grid² (the block's cells), matching the candidates' sub-patch layout below.
    q = qd.reshape(m, c, rows, grid, cols, grid).permute(0, 2, 4, 1, 3, 5).reshape(m, rows * cols, -1)
    dists = []
    for cand in index.images.split(chunk):
        # Any constant taken off both sides leaves the affine fit unchanged; the chunk's mid-range keeps the float32
        # products small.
        mid = (cand.amax().float() + cand.amin().float()) / 2
        s = _subpatch_descriptors(cand, p, g, grid) - mid  # [Gc, N, g², D]
        s0, e = s[:, :, :1], s[:, :, 1:] - s[:, :, :1]  # base sub-patch and the differences, [Gc, N, g² − 1, D]
        # An orthonormal basis of span(E) per block (eigenvectors of the Gram matrix, near-null directions
        # dropped: flat blocks have none), so the fit residual is |Y − S0|² − |Q(Y − S0)|² without an inverse.
        lam, vec = torch.linalg.eigh((e @ e.transpose(-1, -2)).double())
        keep = lam > 1e-6 * lam[..., -1:].clamp_min(1e-6)
        scale = torch.where(keep, lam.clamp_min(1e-30).rsqrt(), torch.zeros((), dtype=lam.dtype))
        basis = (vec * scale[..., None, :]).transpose(-1, -2).float() @ e  # [Gc, N, g² − 1, D], orthonormal rows
        t = torch.einsum("mnd,gnkd->mgnk", q - mid, torch.cat([s0, basis], 2)).double()  # [M, Gc, N, g²]
        qs0 = (basis @ s0.transpose(-1, -2))[..., 0].double()  # Q·S0, [Gc, N, g² − 1]
        qn = (q - mid).square().sum(2).double()  # |Y|², [M, N]
        base = qn[:, None] - 2 * t[..., 0] + s0.square().sum((-1, -2)).double()[None]  # |Y − S0|²
        fit = (t[..., 1:] - qs0[None]).square().sum(-1)
        dists.append(((base - fit).clamp_min(0).sum(2) / qd.shape[1]).float())
    return _ranked(torch.cat(dists, 1), k, qd.square().mean(1))


def _subpatch_descriptors(x: Tensor, p: int, g: int, grid: int) -> Tensor:
    """``[B, N, g², C·grid²]``: the grid×grid cell means of each of the g² sub-patches of each p×p patch."""
    sub = p // g
    pooled = F.avg_pool2d(x.float(), sub // grid)  # [B, C, rows·g·grid, cols·g·grid]
    b, c, h, w = pooled.shape
    rows, cols = h // (g * grid), w // (g * grid)
    t = pooled.reshape(b, c, rows, g, grid, cols, g, grid).permute(0, 2, 5, 3, 6, 1, 4, 7)
    return t.reshape(b, rows * cols, g * g, c * grid * grid)
