"""Evaluation metrics for attribution maps (METHOD_SPEC §5).

* ``insertion_deletion``: the patch Insertion/Deletion protocol of the ECCV 2024 code
  (``protocol="eccv_patch"``, §5.1) and the original RISE protocol (``protocol="rise"``);
  ``ties="random"`` is the tie-robust variant (tied entries enter in random order,
  averaged over several seeds) that the evaluation uses as its headline.
* ``pointing_game`` (§5.2), ``relevance_mass_accuracy`` and ``relevance_rank_accuracy``
  with the channel poolings of CLEVR-XAI (§5.3), ``attended_iou``.
* ``error_type``: the operational IA / OA / WA / OK labels of §5.4.

Maps are tensors (N, H, W) (or (N, C, H, W) where a pooling applies), masks are bool
(N, H, W), images are normalised (N, 3, H, W) tensors. Per-image results are returned so
that callers can average, bootstrap or pick failures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

Protocol = Literal["eccv_patch", "rise"]
Pooling = Literal["sum,pos", "sum", "sum,abs", "max-norm", "l1-norm", "l2-norm", "l2-norm,sq"]
Ties = Literal["together", "random"]
ErrorType = Literal["OK", "IA", "OA", "WA"]


# ------------------------------------------------------------------ insertion / deletion
@dataclass(frozen=True)
class InsDelResult:
    """Per-image scores of an insertion/deletion run.

    Attributes:
        insertion: AUC of the insertion curve, shape (N,).
        deletion: AUC of the deletion curve, shape (N,).
        insertion_curve: p_i of the target class, shape (N, K) (K + 1 points for "rise").
        deletion_curve: the same for deletion.
        step: pixels (patches) added or removed per step.
        insertion_per_seed, deletion_per_seed: with ``ties="random"``, the AUCs of every
            tie-breaking seed, shape (S, N); ``insertion``/``deletion`` are their means.
    """

    insertion: torch.Tensor
    deletion: torch.Tensor
    insertion_curve: torch.Tensor
    deletion_curve: torch.Tensor
    step: int
    insertion_per_seed: torch.Tensor | None = None
    deletion_per_seed: torch.Tensor | None = None

    @property
    def id_score(self) -> torch.Tensor:
        """Insertion minus deletion per image (the ECCV code's "PID"); average it over images."""
        return self.insertion - self.deletion


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area with unit spacing, normalised: (sum p_i - p_0/2 - p_last/2) / (K - 1).

    A single point (K = 1) has no width; its AUC is that point's value.
    """
    k = curve.shape[-1]
    if k == 1:
        return curve[..., 0].clone()
    return (curve.sum(-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / (k - 1)


def default_step(n: int, protocol: Protocol, width: int) -> int:
    """The default step: N/100 rounded for "eccv_patch" (the ECCV code's s = 500 is
    N/100 at 224 x 224), one image row (``width`` pixels, 224 at 224 x 224 as in RISE) for "rise"."""
    return max(1, round(n / 100)) if protocol == "eccv_patch" else max(1, width)


def patch_scores(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """P = max over p x p patches (skimage ``block_reduce(A, (p, p), max)``); a ragged border
    becomes a smaller patch (skimage pads with 0 instead, which only matters for negative maps)."""
    if patch == 1:
        return maps
    return F.max_pool2d(maps[:, None], patch, patch, ceil_mode=True)[:, 0]


def _upsample(m: torch.Tensor, patch: int, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of patch masks (K, h, w) to pixel masks (K, H, W)."""
    if patch > 1:
        m = m.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return m[:, :size[0], :size[1]]


def eccv_masks(p: torch.Tensor, step: int) -> torch.Tensor:
    """Insertion masks of one patch map (h, w): K = ceil(N/s) masks, mask i = [P >= t_i] with
    t_i the value of rank min(s(i+1), N-1): every tie of t_i enters at once."""
    n = p.numel()
    k = math.ceil(n / step)
    ranked = torch.sort(p.flatten(), descending=True).values
    ranks = torch.clamp(step * torch.arange(1, k + 1), max=n - 1)
    return p[None] >= ranked[ranks].view(k, 1, 1)


def random_tie_masks(p: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """The tie-robust counterpart of ``eccv_masks``: the same K = ceil(N/s) points, mask i holds
    exactly min(s(i+1) + 1, N) entries (what ``eccv_masks`` holds when no value is tied), taken
    in descending order of the map with ties broken by a random permutation from ``generator``.

    On a map without ties this equals ``eccv_masks``; on tied entries it is one draw of "the
    ties enter in random order" (the same as adding noise far below the map's resolution).
    """
    n = p.numel()
    k = math.ceil(n / step)
    flat = p.flatten()
    perm = torch.randperm(n, generator=generator)
    order = perm[torch.sort(flat[perm], descending=True, stable=True).indices]
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    counts = torch.clamp(step * torch.arange(1, k + 1) + 1, max=n)
    return (rank[None] < counts[:, None]).view(k, *p.shape)


def tie_generator(seed: int, index: int) -> torch.Generator:
    """The generator of one (tie seed, image index) pair: independent streams, reproducible."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2 ** 63))


def rise_masks(p: torch.Tensor, step: int) -> torch.Tensor:
    """Insertion masks of the RISE protocol: K + 1 masks, mask i holds the top s*i entries of
    a stable descending sort (ties broken by raster index), mask 0 is empty."""
    n = p.numel()
    k = math.ceil(n / step)
    order = torch.sort(p.flatten(), descending=True, stable=True).indices
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    counts = torch.clamp(step * torch.arange(k + 1), max=n)
    return (rank[None] < counts[:, None]).view(k + 1, *p.shape)


def gaussian_blur(x: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Per-channel Gaussian blur with zero padding, as RISE's insertion substrate."""
    r = torch.arange(size, dtype=x.dtype) - size // 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k2 = torch.outer(g, g) / torch.outer(g, g).sum()
    c = x.shape[1]
    return F.conv2d(x, k2.expand(c, 1, size, size), padding=size // 2, groups=c)


class _Batcher:
    """Runs the model over rows of many small requests in full batches.

    ``add(x, target)`` queues the rows of ``x`` (n, 3, H, W) and ``results()`` returns, per
    request in order, softmax(model(x))[:, target] as float64. Requests of consecutive images
    share batches, so the model runs on ``batch_size`` rows however few each image needs.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int) -> None:
        self.model, self.batch_size = model, batch_size
        self.rows: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.pending = 0
        self.sizes: list[int] = []
        self.out: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, target: int) -> None:
        self.rows.append(x)
        self.targets.append(torch.full((len(x),), target, dtype=torch.long))
        self.sizes.append(len(x))
        self.pending += len(x)
        while self.pending >= self.batch_size:
            self._flush(self.batch_size)

    def _flush(self, n: int) -> None:
        x, t = torch.cat(self.rows), torch.cat(self.targets)
        logits = self.model(x[:n])
        self.out.append(logits.softmax(1).gather(1, t[:n, None])[:, 0].to(torch.float64))
        self.rows, self.targets = ([x[n:]], [t[n:]]) if n < len(x) else ([], [])
        self.pending -= n

    def results(self) -> list[torch.Tensor]:
        if self.pending:
            self._flush(self.pending)
        return list(torch.cat(self.out).split(self.sizes)) if self.out else []


def _check_maps(images: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Maps as (N, H, W) at the images' resolution, or a ValueError that says how to fix them."""
    maps = maps[:, 0] if maps.dim() == 4 and maps.shape[1] == 1 else maps
    if maps.dim() != 3 or maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"maps of shape {tuple(maps.shape)} do not match images {tuple(images.shape)}. "
                         "Hint: pass one (H, W) map per image at the image resolution "
                         "(upsample with torch.nn.functional.interpolate).")
    return maps


def _substrates(images: torch.Tensor, protocol: Protocol, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(insertion start, deletion end) per image: black (-mu/sigma) for both in "eccv_patch";
    the blurred image and zeros in "rise"."""
    if protocol == "rise":
        return gaussian_blur(images), torch.zeros_like(images)
    m = torch.as_tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    black = (-m / s).expand_as(images)
    return black, black


def insertion_deletion(model: torch.nn.Module, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor | Sequence[int] | None, *,
                       mean: Sequence[float], std: Sequence[float], protocol: Protocol = "eccv_patch",
                       patch: int = 1, step: int | None = None, batch_size: int = 64,
                       ties: Ties = "together", seeds: Sequence[int] = (0, 1, 2, 3, 4),
                       index_offset: int = 0) -> InsDelResult:
    """Insertion and deletion AUCs of attribution maps (METHOD_SPEC §5.1).

    ``"eccv_patch"`` (the ECCV 2024 code, exactly): P = max-pool of the map over p x p
    patches; K = ceil(N/s) points; point i inserts every patch with P >= t_i (all ties at
    once), t_i being the value of rank min(s(i+1), N-1), so there is no 0-patch point, the
    last insertion point is the full image and the last deletion point the black image.
    Removed pixels are black: x_raw * M normalised, i.e. -mu/sigma.

    ``"rise"`` (Petsiuk et al. 2018): a stable per-entry order, K + 1 points from 0 to N
    entries, insertion starts from the Gaussian-blurred image (kernel 11, sigma 5) and
    deletion ends at zeros (in normalised space, as the RISE code does).

    Args:
        model: classifier on normalised images, returning logits (eval mode is the caller's).
        images: normalised images (N, 3, H, W).
        maps: one attribution map per image, (N, H, W) or (N, 1, H, W), at image resolution.
        targets: class per image (the ground truth in the ECCV protocol); None takes the
            model's prediction on the full image.
        protocol: "eccv_patch" or "rise".
        patch: side of the square patches ranked together (ECCV ``--block_size``).
        step: patches per step; default ``default_step``: N/100 rounded for "eccv_patch"
            (41 at 64 x 64, 502 at 224 x 224; pass 500 for the ECCV setting), the image
            width for "rise" (224 at 224 x 224 as in the paper).
        mean, std: the normalisation of ``images``, which defines black in "eccv_patch"
            (``lrpfx.eval.datasets.MEAN``/``STD`` for the shapes dataset); required so that
            another dataset's constants are never used by default.
        batch_size: images per model call; consecutive images share calls, and a mask that
            equals another of the same image (ties, binary maps, other seeds) runs once.
        ties: ``"together"`` (the protocol as published: every entry tied with the threshold
            enters at once) or ``"random"`` (only with ``"eccv_patch"``; the tie-robust
            variant: the same points, each holding exactly min(s(i+1) + 1, N) entries, tied
            entries taken in a random order, AUCs averaged over ``seeds``). A map without
            ties scores the same under both.
        seeds: tie-breaking seeds of ``ties="random"``; image j uses
            ``tie_generator(seed, index_offset + j)``.
        index_offset: the index of the first image, so that batches of one run draw
            independent tie orders.

    Returns:
        An ``InsDelResult`` of per-image AUCs (float64) and curves.
    """
    maps = _check_maps(images, maps)
    if ties not in ("together", "random"):
        raise ValueError(f"ties={ties!r}. Hint: use 'together' (the published protocol) or 'random' (tie-robust).")
    if ties == "random" and protocol != "eccv_patch":
        raise ValueError("ties='random' applies to protocol='eccv_patch' (the RISE protocol already breaks "
                         "ties, by raster order).")
    seeds = list(seeds) if ties == "random" else [0]
    if not seeds:
        raise ValueError("ties='random' needs at least one seed. Hint: seeds=range(5).")
    with torch.no_grad():
        if targets is None:
            targets = torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
        targets = torch.as_tensor(targets).tolist()
        ins_start, del_end = _substrates(images, protocol, mean, std)
        pooled = patch_scores(maps.to(torch.float64), patch)
        step = step or default_step(pooled[0].numel(), protocol, pooled.shape[-1])
        batcher, inverses = _Batcher(model, batch_size), []
        for j, (x, p, a, b, y) in enumerate(zip(images, pooled, ins_start, del_end, targets)):
            if ties == "random":
                m = torch.cat([random_tie_masks(p, step, tie_generator(s, index_offset + j)) for s in seeds])
            else:
                m = eccv_masks(p, step) if protocol == "eccv_patch" else rise_masks(p, step)
            # equal masks give equal points: each distinct mask runs once (ties, binary maps)
            m, inverse = torch.unique(m.flatten(1).to(torch.uint8), dim=0, return_inverse=True)
            inverses.append(inverse)
            m = _upsample(m.view(-1, *p.shape), patch, x.shape[-2:])[:, None].to(x.dtype)
            batcher.add(torch.cat([m * x + (1 - m) * a, (1 - m) * x + m * b]), int(y))
        ins, dels = [], []
        for probs, inverse in zip(batcher.results(), inverses):
            u = len(probs) // 2
            ins.append(probs[:u][inverse])
            dels.append(probs[u:][inverse])
    ins_c, del_c = torch.stack(ins), torch.stack(dels)
    if ties == "together":
        return InsDelResult(auc(ins_c), auc(del_c), ins_c, del_c, step)
    s_count = len(seeds)
    ins_s = ins_c.view(len(ins_c), s_count, -1).transpose(0, 1)  # (S, N, K)
    del_s = del_c.view(len(del_c), s_count, -1).transpose(0, 1)
    ins_auc, del_auc = auc(ins_s), auc(del_s)
    return InsDelResult(ins_auc.mean(0), del_auc.mean(0), ins_s.mean(0), del_s.mean(0), step, ins_auc, del_auc)


# ------------------------------------------------------------------ localisation
def pool_channels(relevance: torch.Tensor, pooling: Pooling = "sum,pos") -> torch.Tensor:
    """Pool (N, C, H, W) relevance into a non-negative (N, H, W) map (CLEVR-XAI poolings).

    "sum,pos": max(sum_c R, 0) (lrpfx's default); "sum": sum_c R, signed (Quantus' default:
    no ``abs``, and its normalisation by max |R| changes no ratio or order); "sum,abs": |sum_c R|; "max-norm":
    max_c |R|; "l1-norm": sum_c |R|; "l2-norm": sqrt(sum_c R^2); "l2-norm,sq": sum_c R^2.
    A (N, H, W) map is treated as one channel.
    """
    r = relevance[:, None] if relevance.dim() == 3 else relevance
    if pooling == "sum,pos":
        return r.sum(1).clamp(min=0)
    if pooling == "sum":
        return r.sum(1)
    if pooling == "sum,abs":
        return r.sum(1).abs()
    if pooling == "max-norm":
        return r.abs().amax(1)
    if pooling == "l1-norm":
        return r.abs().sum(1)
    if pooling == "l2-norm":
        return r.pow(2).sum(1).sqrt()
    if pooling == "l2-norm,sq":
        return r.pow(2).sum(1)
    raise ValueError(f"unknown pooling {pooling!r}. Hint: use one of sum,pos sum sum,abs max-norm l1-norm l2-norm l2-norm,sq.")


def _check_masks(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masks as bool, with the pooled maps' shape, or a ValueError that says how to fix them."""
    if masks.shape != maps.shape:
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not match pooled maps {tuple(maps.shape)}. "
                         "Hint: pass one bool (H, W) mask per map at the map's resolution.")
    return masks.to(torch.bool)


def relevance_mass_accuracy(relevance: torch.Tensor, masks: torch.Tensor, pooling: Pooling = "sum,pos") -> torch.Tensor:
    """RMA = sum of the pooled map inside the mask / its total, per image.

    With a non-negative pooling (the default R+) the total is 0 only for an all-zero map: NaN.
    With ``pooling="sum"`` (signed, Quantus' convention) the ratio is taken as it is, so it may
    leave [0, 1] (a positive inside and a near-zero total); NaN only for a zero total.
    """
    r = pool_channels(relevance, pooling).to(torch.float64)
    m = _check_masks(r, masks)
    inside = (r * m).flatten(1).sum(1)
    total = r.flatten(1).sum(1)
    ok = total > 0 if pooling != "sum" else total != 0
    return torch.where(ok, inside / total.where(ok, torch.ones_like(total)), torch.nan)


def relevance_rank_accuracy(relevance: torch.Tensor, masks: torch.Tensor, pooling: Pooling = "sum,pos") -> torch.Tensor:
    """RRA = |top-K pixels of the pooled map, K = |mask|, inside the mask| / K, per image.

    The ranking is a stable descending sort (ties go to the lower raster index); NaN for an
    empty mask.
    """
    r = pool_channels(relevance, pooling)
    m = _check_masks(r, masks).flatten(1)
    order = torch.sort(r.flatten(1), dim=1, descending=True, stable=True).indices
    k = m.sum(1)
    ranked_in = m.gather(1, order)
    top = torch.arange(m.shape[1])[None] < k[:, None]
    hits = (ranked_in & top).sum(1).to(torch.float64)
    return torch.where(k > 0, hits / k.clamp(min=1), torch.nan)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: float = 15,
                  ties: Literal["first", "any"] = "first") -> torch.Tensor:
    """Hits of the pointing game (Zhang et al. 2018), per image (bool).

    A hit: the map's maximum (the map is bilinearly upsampled to the mask size first) lies
    within ``tolerance`` pixels (Euclidean) of a mask pixel. ``ties="first"`` takes the first
    maximum in raster order; ``ties="any"`` counts a hit if any tied maximum is close enough
    (with ``tolerance=0`` this is Quantus' ``PointingGame``: a maximum inside the mask). An
    empty mask is a miss. Accuracy = hits.float().mean().
    """
    maps = maps[:, 0] if maps.dim() == 4 else maps
    if maps.shape[-2:] != masks.shape[-2:]:
        maps = F.interpolate(maps[:, None].float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    if ties not in ("first", "any"):
        raise ValueError(f"ties={ties!r}. Hint: use 'first' (raster order) or 'any' (Quantus).")
    w = maps.shape[-1]
    flat = maps.flatten(1)
    hits = []
    for row, mask in zip(flat, masks.to(torch.bool)):
        peaks = (row == row.max()).nonzero()[:, 0] if ties == "any" else row.argmax()[None]
        yx = mask.nonzero().to(torch.float64)
        if not len(yx):
            hits.append(False)
            continue
        py, px = (peaks // w).to(torch.float64), (peaks % w).to(torch.float64)
        d2 = (yx[:, None, 0] - py[None]) ** 2 + (yx[:, None, 1] - px[None]) ** 2
        hits.append(bool(d2.min() <= tolerance ** 2))
    return torch.tensor(hits)


def attended_mask(maps: torch.Tensor) -> torch.Tensor:
    """The attended set of §5.4 when no C3 mask is given: R+ > mean(R+) per image."""
    pos = maps.clamp(min=0)
    return pos > pos.flatten(1).mean(1).view(-1, *([1] * (pos.dim() - 1)))


def attended_iou(maps: torch.Tensor, masks: torch.Tensor, attended: torch.Tensor | None = None) -> torch.Tensor:
    """IoU of the attended set (``attended`` or R+ > mean(R+)) with the mask; NaN if both are empty."""
    a = attended_mask(maps) if attended is None else attended.to(torch.bool)
    m = _check_masks(a, masks)
    inter = (a & m).flatten(1).sum(1).to(torch.float64)
    union = (a | m).flatten(1).sum(1).to(torch.float64)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.nan)


# ------------------------------------------------------------------ error types
@dataclass(frozen=True)
class AttentionStats:
    """Per-image statistics of §5.4: precision P, coverage C, area ratio rho, mass m (RMA of R+)."""

    precision: torch.Tensor
    coverage: torch.Tensor
    area_ratio: torch.Tensor
    mass: torch.Tensor
    attended_pixels: torch.Tensor


def attention_stats(maps: torch.Tensor, masks: torch.Tensor, attended: torch.Tensor | None = None) -> AttentionStats:
    """P = |A & M| / |A|, C = |A & M| / |M|, rho = |A| / |M|, m = RMA(R+); P is NaN for an empty A."""
    a = attended_mask(maps) if attended is None else attended.to(torch.bool)
    m = _check_masks(a, masks)
    if (m.flatten(1).sum(1) == 0).any():
        raise ValueError("a ground-truth mask is empty, so coverage is undefined. "
                         "Hint: drop images without an object before computing error types.")
    na = a.flatten(1).sum(1).to(torch.float64)
    nm = m.flatten(1).sum(1).to(torch.float64)
    inter = (a & m).flatten(1).sum(1).to(torch.float64)
    precision = torch.where(na > 0, inter / na.clamp(min=1), torch.nan)
    return AttentionStats(precision, inter / nm, na / nm, relevance_mass_accuracy(maps, m), na)


def classify_error(precision: float, coverage: float, *, p0: float = 0.5, c0: float = 0.5) -> ErrorType:
    """One label from precision and coverage: OK (C >= c0, P >= p0), IA (P >= p0, C < c0),
    OA (C >= c0, P < p0), WA (both below)."""
    if precision >= p0:
        return "OK" if coverage >= c0 else "IA"
    return "OA" if coverage >= c0 else "WA"


def error_type(maps: torch.Tensor, masks: torch.Tensor, attended: torch.Tensor | None = None, *,
               p0: float = 0.5, c0: float = 0.5, use_mass: bool = False) -> list[ErrorType]:
    """Operational error types of METHOD_SPEC §5.4, one per image.

    Args:
        maps: relevance maps (N, H, W); R+ gives the mass m = RMA(R+) and, without
            ``attended``, the attended set R+ > mean(R+).
        masks: ground-truth object masks (N, H, W), non-empty.
        attended: the attended set A (e.g. a C3 mask at image resolution), optional.
        p0, c0: thresholds on precision and coverage.
        use_mass: use the mass m in place of the precision P (when A is ill-defined).

    Returns:
        "OK", "IA" (on the object, too small), "OA" (covers it and spills over) or "WA"
        (mostly off the object) per image. An empty A is IA if m >= p0, else WA.
    """
    s = attention_stats(maps, masks, attended)
    labels: list[ErrorType] = []
    for p, c, m, n in zip(s.precision.tolist(), s.coverage.tolist(), s.mass.tolist(), s.attended_pixels.tolist()):
        if n == 0:
            labels.append("IA" if m >= p0 else "WA")  # NaN mass (an all-zero map) compares False: WA
        else:
            labels.append(classify_error(m if use_mass else p, c, p0=p0, c0=c0))
    return labels
