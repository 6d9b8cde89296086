"""YOLOS-style detectors on plain, MI and RS images: a plain ViT, learnable detection tokens, MLP heads.

YOLOS (Fang et al., 2021) appends Q learnable ``[DET]`` tokens to a ViT's patch tokens (no class token) and reads one
object (or "no object") from each after the last block. ppml builds the ViT with timm and swaps the backbone:

- ``vit_*`` (plain images), ``mivit_*`` (MI ciphertext: the MI patch embedding, position embeddings kept — the paper's
  PEYOLOS): the YOLOS **box head** (class MLP + box MLP, boxes cxcywh in [0, 1] of the padded input canvas).
- ``pevit_*`` (RS ciphertext): no position embedding, so the network is permutation-equivariant over patch tokens and
  cannot know where a token came from. A box regressed from a [DET] token therefore cannot locate anything (the
  control ``head="box"`` measures that). The **membership head** predicts instead, for every [DET] slot, which patch
  tokens belong to its object (a bilinear score between the slot and each token) and where inside each such patch the
  object lies (four fractions). Both are per token, so they move with the tokens: the *owner*, who keeps the RS
  permutation, puts them back on the patch grid and reads the box off as the union of the member patches' extents
  (:func:`membership_to_boxes`), in plain-image coordinates. Neither the trainer's targets nor its loss need the key.
  What the trainer does learn from the targets: which ciphertext tokens belong to one object and where an object's
  edge crosses each of them — a grouping hint about the layout, though not the layout itself.

The membership head also works on plain and MI tokens (they stay in place: decoding needs no key), which gives a
like-for-like comparison of the three encryptions.

**Spatial prior** (``det_prior="gaussian"``, the default for the box head on ``vit_*`` / ``mivit_*``). YOLOS starts
from DeiT weights; from scratch (nothing can be downloaded here) its [DET] tokens' attention stays uniform over the
patches, every slot predicts the same mean box and COCO AP stays at zero (measured:
``benchmarks/experiments/detect_synthetic.py``, README). As in SMCA (Gao et al., 2021) and Anchor / Deformable DETR,
each slot q gets a reference point r_q (learnable,
initialised on a grid over the canvas), the attention logits from [DET] token q to patch token n get the additive bias
``-s_h * |r_q - c_n|^2`` in every block (c_n: the patch centre, canvas fractions; one learnable scale s_h per head,
initialised from 1, nearly global, to 200, about one patch of a 64-token grid), and the box centre is predicted
relative to r_q (``sigmoid(logit(r_q) + offset)``). Everything else — tokens, heads, matcher, losses — is YOLOS's.
The prior needs the tokens' grid positions, so it exists only for backbones with position embeddings (plain and MI,
whose patches stay in place), never for RS; ``det_prior="none"`` is plain YOLOS.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_int, describe

HEADS = ("box", "membership")
PRIORS = ("gaussian", "none")
ENCRYPTIONS = ("none", "mi", "rs")
_BACKBONE_PREFIX = {"none": "vit", "mi": "mivit", "rs": "pevit"}
_WHERE = "ppml.detection"


class MLP(nn.Module):
    """DETR's MLP: ``num_layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class YOLOS(nn.Module):
    """A timm ViT backbone (built with ``num_classes=0, class_token=False, global_pool=''``), Q detection tokens, a
    head.

    Args:
        backbone: a timm ``VisionTransformer`` (``vit_*``, ppml's ``mivit_*`` or ``pevit_*``) without a class token.
        num_classes: C object classes (the class head has C + 1 outputs, the last meaning "no object").
        num_det_tokens: Q, the most objects one image can hold (YOLOS: 100).
        head: ``"box"`` (class + box MLPs) or ``"membership"`` (class MLP + per-token membership and extents).
        membership_dim: width of the slot/token projections of the membership head.
        det_prior: ``"gaussian"`` (reference points and a distance bias on the [DET] tokens' attention, see the
            module docstring; needs a backbone with position embeddings) or ``"none"`` (YOLOS as published).

    Shapes:
        input (Tensor[B, C, H', W']): what the backbone takes (plain images, or the MI / RS ciphertext).
        output: dict with ``pred_logits`` Tensor[B, Q, C+1] and either ``pred_boxes`` Tensor[B, Q, 4] (cxcywh in
        [0, 1] of the plain canvas) or ``pred_masks`` Tensor[B, Q, N] (membership logits, token order) and
        ``pred_extents`` Tensor[B, Q, N, 4] (x0, y0, x1, y1 of the object inside each token's patch, fractions).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_det_tokens: int = 100,
        head: str = "box",
        membership_dim: int = 64,
        det_prior: str = "none",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"{_WHERE}.YOLOS: head must be one of {', '.join(HEADS)}, got {head!r}")
        if det_prior not in PRIORS:
            raise ValueError(f"{_WHERE}.YOLOS: det_prior must be one of {', '.join(PRIORS)}, got {det_prior!r}")
        for name, v in (("num_classes", num_classes), ("num_det_tokens", num_det_tokens),
                        ("membership_dim", membership_dim)):
            check_int(v, f"{_WHERE}.YOLOS", name, 1)
        if getattr(backbone, "cls_token", None) is not None or getattr(backbone, "reg_token", None) is not None:
            raise ValueError(f"{_WHERE}.YOLOS: the backbone must be built with class_token=False and no register "
                             f"tokens (YOLOS drops [CLS]), got {type(backbone).__name__} with a class token")
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.num_det_tokens = num_det_tokens
        d = backbone.embed_dim
        self.grid_size = tuple(backbone.patch_embed.grid_size)
        self.det_token = nn.Parameter(torch.zeros(1, num_det_tokens, d))
        nn.init.trunc_normal_(self.det_token, std=0.02)
        # YOLOS gives the [DET] tokens their own position embedding when the backbone has one.
        self.det_pos_embed = None
        if getattr(backbone, "pos_embed", None) is not None:
            self.det_pos_embed = nn.Parameter(torch.zeros(1, num_det_tokens, d))
            nn.init.trunc_normal_(self.det_pos_embed, std=0.02)
        self.det_prior = det_prior
        if det_prior == "gaussian":
            if self.det_pos_embed is None:
                raise ValueError(f"{_WHERE}.YOLOS: det_prior='gaussian' places the [DET] slots on the patch grid, so "
                                 f"it needs a backbone with position embeddings (vit_*, mivit_*); got "
                                 f"{type(backbone).__name__} without one (RS tokens have no grid position): use "
                                 f"det_prior='none'")
            # Reference points on a ceil(sqrt(Q))-wide grid of cell centres, row-major (logits: the box centres are
            # predicted as offsets in logit space).
            side = math.ceil(math.sqrt(num_det_tokens))
            q = torch.arange(num_det_tokens, dtype=torch.float32)
            ref = torch.stack(((q % side + 0.5) / side, (q // side + 0.5) / math.ceil(num_det_tokens / side)), -1)
            self.det_reference = nn.Parameter(torch.logit(ref))
            heads = backbone.blocks[0].attn.num_heads
            scale = torch.logspace(0.0, math.log10(200.0), heads) if heads > 1 else torch.tensor([14.0])
            self.det_prior_scale = nn.Parameter(scale + torch.log(-torch.expm1(-scale)))  # softplus^-1
        self.class_embed = MLP(d, d, num_classes + 1, 3)
        if head == "box":
            self.bbox_embed = MLP(d, d, 4, 3)
        else:
            self.membership_dim = membership_dim
            # channel 0: membership logit, 1..4: the in-patch extents, each a bilinear form slot × token
            self.slot_embed = MLP(d, d, 5 * membership_dim, 2)
            self.token_embed = nn.Linear(d, 5 * membership_dim)
            self.membership_bias = nn.Parameter(torch.tensor([-2.0, -2.0, -2.0, 2.0, 2.0]))

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward_tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(patch tokens [B, N, D], [DET] tokens [B, Q, D]) after the backbone's last norm."""
        bb = self.backbone
        x = bb._pos_embed(bb.patch_embed(x))
        det = self.det_token.expand(x.shape[0], -1, -1)
        if self.det_pos_embed is not None:
            det = det + self.det_pos_embed
        x = bb.norm_pre(torch.cat([x, det], dim=1))
        if self.det_prior == "none":
            x = bb.blocks(x)
        else:
            # scaled_dot_product_attention wants a float mask in the query's dtype (bf16 / fp16 under autocast).
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            bias = self.det_attention_bias().to(dtype)[None]
            for block in bb.blocks:
                x = block(x, attn_mask=bias)
        x = bb.norm(x)
        return x[:, : -self.num_det_tokens], x[:, -self.num_det_tokens :]

    def det_attention_bias(self) -> Tensor:
        """The spatial prior's additive attention bias, Tensor[H, N + Q, N + Q] (sequence: N patch tokens, then Q
        [DET] tokens): ``-s_h * |r_q - c_n|^2`` from [DET] token q to patch token n, 0 everywhere else."""
        if self.det_prior != "gaussian":
            raise ValueError(f"{_WHERE}.YOLOS.det_attention_bias: the model was built with det_prior="
                             f"{self.det_prior!r}, which has no bias")
        gh, gw = self.grid_size
        n, q = gh * gw, self.num_det_tokens
        dev = self.det_reference.device
        rows, cols = torch.meshgrid(torch.arange(gh, device=dev), torch.arange(gw, device=dev), indexing="ij")
        centres = torch.stack(((cols.reshape(-1) + 0.5) / gw, (rows.reshape(-1) + 0.5) / gh), -1)  # [N, 2] (x, y)
        dist2 = (self.det_reference.float().sigmoid()[:, None, :] - centres[None]).square().sum(-1)  # [Q, N]
        scale = F.softplus(self.det_prior_scale.float())  # [H]
        det_to_patch = -scale[:, None, None] * dist2  # [H, Q, N]
        top = det_to_patch.new_zeros(scale.shape[0], n, n + q)
        bottom = torch.cat((det_to_patch, det_to_patch.new_zeros(scale.shape[0], q, q)), dim=2)
        return torch.cat((top, bottom), dim=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        patches, det = self.forward_tokens(x)
        out = {"pred_logits": self.class_embed(det)}
        if self.head == "box":
            raw = self.bbox_embed(det)
            if self.det_prior == "gaussian":  # the centre is an offset from the slot's reference point
                centre = (raw[..., :2] + self.det_reference).sigmoid()
                out["pred_boxes"] = torch.cat((centre, raw[..., 2:].sigmoid()), dim=-1)
            else:
                out["pred_boxes"] = raw.sigmoid()
            return out
        B, Q, N, k = det.shape[0], det.shape[1], patches.shape[1], self.membership_dim
        slots = self.slot_embed(det).view(B, Q, 5, k)
        tokens = self.token_embed(patches).view(B, N, 5, k)
        scores = torch.einsum("bqck,bnck->bqnc", slots, tokens) / math.sqrt(k) + self.membership_bias
        out["pred_masks"] = scores[..., 0]
        out["pred_extents"] = scores[..., 1:].sigmoid()
        return out


def default_backbone(encryption: str, size: str = "small") -> str:
    """The timm / ppml model name of the backbone for an encryption: ``vit_*`` (none), ``mivit_*`` (mi), ``pevit_*``
    (rs), at a DeiT size (tiny, small, base)."""
    if encryption not in ENCRYPTIONS:
        raise ValueError(f"{_WHERE}.default_backbone: encryption must be one of {', '.join(ENCRYPTIONS)}, "
                         f"got {encryption!r}")
    if size not in ("tiny", "small", "base"):
        raise ValueError(f"{_WHERE}.default_backbone: size must be tiny, small or base, got {size!r}")
    return f"{_BACKBONE_PREFIX[encryption]}_{size}_patch16_224"


def build_detector(
    num_classes: int,
    *,
    encryption: str = "none",
    backbone: str | None = None,
    img_size: int = 512,
    patch_size: int = 16,
    grid: int = 2,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    num_det_tokens: int = 100,
    head: str | None = None,
    drop_path: float = 0.0,
    membership_dim: int = 64,
    det_prior: str | None = None,
    **backbone_kwargs: Any,
) -> YOLOS:
    """Builds a :class:`YOLOS` detector (randomly initialised, nothing downloaded).

    Args:
        num_classes: C object classes.
        encryption: what the input will be: ``none`` (plain images), ``mi`` (``ppml.mix_subpatches(x, patch_size,
            grid)``), ``rs`` (``ppml.shuffle_patches(x, patch_size)``). Picks the default backbone and head.
        backbone: a timm or ppml model name; default ``vit_small`` / ``mivit_small`` / ``pevit_small`` (YOLOS-S's
            ViT-S: width 384, depth 12, 6 heads), the sizes overridable below.
        img_size: the (square) plain canvas side; ``patch_size`` must divide it.
        patch_size, grid: the model's patch (the RS / MI patch) and the MI grid.
        embed_dim, depth, num_heads: override the backbone's size.
        num_det_tokens: Q detection tokens (YOLOS: 100).
        head: ``box`` (default for none / mi) or ``membership`` (default for rs; see the module docstring).
        drop_path: stochastic depth rate of the backbone.
        membership_dim: projection width of the membership head.
        det_prior: ``gaussian`` or ``none`` (see :class:`YOLOS`); default :func:`default_det_prior`.
        **backbone_kwargs: passed to ``timm.create_model`` (e.g. ``rpe=False`` for pevit).
    """
    import timm

    import ppml.models  # noqa: F401  (registers mivit_* / pevit_* with timm)

    if encryption not in ENCRYPTIONS:
        raise ValueError(f"{_WHERE}.build_detector: encryption must be one of {', '.join(ENCRYPTIONS)}, "
                         f"got {encryption!r}")
    if not isinstance(img_size, int) or not isinstance(patch_size, int) or patch_size < 1 or img_size % patch_size:
        raise ValueError(f"{_WHERE}.build_detector: patch_size must divide img_size, got patch_size={patch_size!r}, "
                         f"img_size={img_size!r}")
    name = backbone or default_backbone(encryption)
    # no class token and no pooling (global_pool="" also keeps timm's final norm on the tokens, which the heads read)
    kwargs: dict[str, Any] = dict(img_size=img_size, patch_size=patch_size, num_classes=0, class_token=False,
                                  global_pool="", drop_path_rate=drop_path)
    for key, v in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if v is not None:
            kwargs[key] = v
    if name.startswith("mivit"):
        kwargs["grid"] = grid
    kwargs.update(backbone_kwargs)
    try:
        net = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ValueError(f"{_WHERE}.build_detector: backbone {name!r} could not be built: {exc}") from exc
    if head is None:
        head = "membership" if encryption == "rs" else "box"
    if det_prior is None:
        det_prior = default_det_prior(head, getattr(net, "pos_embed", None) is not None)
    return YOLOS(net, num_classes, num_det_tokens=num_det_tokens, head=head, membership_dim=membership_dim,
                 det_prior=det_prior)


def default_det_prior(head: str, has_pos_embed: bool) -> str:
    """``gaussian`` for the box head on a backbone with position embeddings (plain, MI), else ``none`` (the
    membership head, compared like for like across plain / MI / RS, and any backbone without a grid: RS)."""
    return "gaussian" if head == "box" and has_pos_embed else "none"


def membership_targets(boxes: Tensor, grid_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """What the membership head learns for each object, on the patch grid (tile order, row-major).

    Args:
        boxes (Tensor[K, 4]): cxcywh in [0, 1] of the canvas.
        grid_size: (H/p, W/p).

    Returns:
        (masks, extents): Tensor[K, N] float (1 where the box overlaps the tile with positive area) and
        Tensor[K, N, 4] — the overlap inside each tile as fractions of the tile (x0, y0, x1, y1; 0 off the box).
    """
    from .boxes import box_cxcywh_to_xyxy

    gh, gw = grid_size
    xyxy = box_cxcywh_to_xyxy(boxes.float()) * torch.tensor([gw, gh, gw, gh], dtype=torch.float32)
    r, c = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    x0 = torch.maximum(xyxy[:, None, 0], c) - c
    y0 = torch.maximum(xyxy[:, None, 1], r) - r
    x1 = torch.minimum(xyxy[:, None, 2], c + 1) - c
    y1 = torch.minimum(xyxy[:, None, 3], r + 1) - r
    masks = ((x1 > x0) & (y1 > y0)).float()
    extents = torch.stack((x0, y0, x1, y1), dim=-1).clamp(0, 1) * masks[..., None]
    return masks, extents


def membership_to_boxes(
    pred_masks: Tensor, pred_extents: Tensor, grid_size: tuple[int, int], perm: Tensor | None = None,
    threshold: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """The owner's decoding of the membership head: boxes in plain-canvas coordinates.

    Args:
        pred_masks (Tensor[B, Q, N]): membership logits in token order.
        pred_extents (Tensor[B, Q, N, 4]): in-patch extents in token order.
        grid_size: (H/p, W/p) with N = H/p · W/p.
        perm (Tensor[B, N] int64, optional): the RS keys (token i holds tile ``perm[b, i]``, as
            ``ppml.shuffle_patches`` defines it); None for unshuffled tokens.
        threshold: membership probability above which a token counts (the most likely token always does).

    Returns:
        (boxes, quality): Tensor[B, Q, 4] cxcywh in [0, 1] — the union of the member tiles' extents — and
        Tensor[B, Q], the mean membership probability of the member tokens (multiplies the class score).
    """
    from .boxes import box_xyxy_to_cxcywh

    B, Q, N = pred_masks.shape
    gh, gw = grid_size
    if N != gh * gw or pred_extents.shape != (B, Q, N, 4):
        raise ValueError(f"{_WHERE}.membership_to_boxes: pred_masks must be [B, Q, N={gh * gw}] and pred_extents "
                         f"[B, Q, N, 4], got {describe(pred_masks)} and {describe(pred_extents)}")
    prob, ext = pred_masks.float().sigmoid(), pred_extents.float()
    if perm is not None:
        if perm.shape != (B, N) or perm.dtype != torch.int64:
            raise ValueError(f"{_WHERE}.membership_to_boxes: perm must be int64 [B={B}, N={N}], got {describe(perm)}")
        perm = perm.to(prob.device)
        prob = torch.empty_like(prob).scatter_(2, perm[:, None, :].expand(B, Q, N), prob)
        ext = torch.empty_like(ext).scatter_(2, perm[:, None, :, None].expand(B, Q, N, 4), ext)
    tiles = torch.arange(N, device=prob.device)
    r, c = (tiles // gw).float(), (tiles % gw).float()
    sel = prob > threshold
    sel = sel | (~sel.any(-1, keepdim=True) & F.one_hot(prob.argmax(-1), N).bool())
    inf = torch.tensor(float("inf"), device=prob.device)
    x0 = torch.where(sel, (c + ext[..., 0]) / gw, inf).amin(-1)
    y0 = torch.where(sel, (r + ext[..., 1]) / gh, inf).amin(-1)
    x1 = torch.maximum(torch.where(sel, (c + ext[..., 2]) / gw, -inf).amax(-1), x0)
    y1 = torch.maximum(torch.where(sel, (r + ext[..., 3]) / gh, -inf).amax(-1), y0)
    quality = (prob * sel).sum(-1) / sel.sum(-1)
    return box_xyxy_to_cxcywh(torch.stack((x0, y0, x1, y1), dim=-1)), quality
