"""CLIP (InfoNCE) loss and the STRUCTURE regulariser R_S (METHOD.md §2, §3, §3.1).

Everything here runs inside the training loop, so nothing calls ``.item()``,
``.cpu()`` or branches in Python on a tensor's value: option checks happen on
Python values, and the one data-dependent choice of the official code
(``safe_norm``'s "already unit norm?" test) is a ``torch.where``.

Faithful to the official STRUCTURE code (commit 4c94706) unless an option says
otherwise. The two documented departures are opt-in:

* ``divergence="js"``: the textbook Jensen–Shannon divergence. The official
  code computes ``½[KL(M‖Q)+KL(M‖P)]`` instead (§3 step 5, §13.1), and the
  published λ=10 is tuned to that form.
* ``paper_sum=True``: sum the image and text R_S terms like the paper's
  objective, instead of averaging them like the code (§3, §13.2).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from trials._checks import check_choice, check_int, check_number
from trials.loss_options import CENTERINGS, DISTANCES, DIVERGENCES, LOSS_DEFAULTS, WEIGHTINGS, LossOptions

EPS = 1e-12  # R_S's eps inside every log and on M, and normalize's floor (§1, §3)
UNIT_NORM_TOL = 1e-6  # safe_norm leaves rows alone within this of norm 1 (§1)
RBF_GAMMA = 1.0  # structure_reg's gamma; CLIPLoss never sets it (§3 step 2)

Extra = Optional[Tuple[torch.Tensor, torch.Tensor]]


def _check_structure_options(levels, temperature, weighting, centering, distance, divergence) -> None:
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("centering", centering, CENTERINGS)
    check_choice("distance", distance, DISTANCES)
    check_choice("divergence", divergence, DIVERGENCES)
    check_int("levels", levels, 1)
    check_number("temperature", temperature, 0, strict=True)


def safe_normalize(x: torch.Tensor, eps: float = EPS, *, stacked: bool = False) -> torch.Tensor:
    """``safe_norm`` of METHOD.md §1: unchanged if every row is already unit norm, else L2 rows.

    The official code branches in Python; ``torch.where`` on a mask keeps the
    same values and gradients without a host sync. ``stacked``: ``x`` is a
    pack of trials [P, n, d], each member tested on its own rows.
    """
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    close = (norms - 1).abs() < UNIT_NORM_TOL
    already_unit = close.all(dim=-2, keepdim=True) if stacked else close.all()
    return torch.where(already_unit, x, F.normalize(x, p=2, dim=-1, eps=eps))


def center(x: torch.Tensor, centering: str) -> torch.Tensor:
    """Column centring C over the batch rows (§3 step 1, the second-last axis: per member of a
    stack); ``standard`` uses the unbiased std."""
    if centering == "none":
        return x
    centred = x - x.mean(-2, keepdim=True)
    if centering == "mean":
        return centred
    return centred / x.std(-2, keepdim=True)


def similarity(x: torch.Tensor, distance: str, temperature: float, gamma: float) -> torch.Tensor:
    """Similarity matrix S of §3 step 2 (cosine / rbf / spearman)."""
    if distance == "cosine":
        return (x @ x.T) / temperature
    if distance == "rbf":
        # no temperature here, exactly as in the official code
        return torch.exp(-gamma * torch.cdist(x, x, p=2).pow(2))
    # spearman: float32 ranks over the feature axis; argsort has no gradient
    ranks = F.normalize(x.argsort(dim=-1).argsort(dim=-1).float(), p=2, dim=-1)
    return (ranks @ ranks.T) / temperature


def _kl_batchmean(log_q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.kl_div(log_q, target, reduction="batchmean")``: Σ target·(log target − log_q) / n."""
    return F.kl_div(log_q, target, reduction="batchmean")


def official_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The official "JS": ½[KL(M+ε‖Q+ε) + KL(M+ε‖P+ε)], mean over rows (§3 step 5).

    Not the Jensen–Shannon divergence and unbounded; kept because λ=10 is tuned to it.
    The aligned term comes first, as in the official code (same float summation order).
    """
    m = 0.5 * (p + q)
    return 0.5 * (_kl_batchmean((q + eps).log(), m + eps) + _kl_batchmean((p + eps).log(), m + eps))


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Textbook Jensen–Shannon ½[KL(P‖M) + KL(Q‖M)], mean over rows. DEPARTURE from the code.

    Bounded by log 2. ε only guards the logs against exact zeros (one-hot rows).
    """
    m = 0.5 * (p + q)
    log_m = (m + eps).log()
    kl_pm = (p * ((p + eps).log() - log_m)).sum() / p.shape[0]
    kl_qm = (q * ((q + eps).log() - log_m)).sum() / q.shape[0]
    return 0.5 * (kl_pm + kl_qm)


_DIVERGENCE_FNS = {"official": official_divergence, "js": js_divergence}


def _prepare(x: torch.Tensor, centering: str, center_first: bool) -> torch.Tensor:
    """§3 step 1: safe_norm and centring, in the order ``center_first`` selects (a [P, n, d]
    stack: per member)."""
    stacked = x.ndim == 3
    if center_first:
        return safe_normalize(center(x, centering), stacked=stacked)
    return center(safe_normalize(x, stacked=stacked), centering)


def structure_regularizer(
    original: torch.Tensor,
    aligned: torch.Tensor,
    *,
    levels: int = LOSS_DEFAULTS.structure_levels,
    temperature: float = LOSS_DEFAULTS.temperature,
    weighting: str = LOSS_DEFAULTS.structure_weighting,
    margin: float = LOSS_DEFAULTS.structure_margin,
    centering: str = LOSS_DEFAULTS.structure_centering,
    center_first: bool = LOSS_DEFAULTS.structure_center_first,
    distance: str = LOSS_DEFAULTS.structure_distance,
    gamma: float = RBF_GAMMA,
    divergence: str = LOSS_DEFAULTS.structure_divergence,
) -> torch.Tensor:
    """R_S(X, A) exactly as the official ``structure_reg`` (METHOD.md §3), as a 0-d tensor.

    ``original`` X [n, d_x] are the raw frozen features, ``aligned`` A [n, d]
    the head outputs. Runs in the inputs' dtype with autocast off. With
    ``distance="spearman"`` the result has no gradient (argsort), like the code.
    Defaults are those CLIPLoss passes (``LossOptions``: L=1, T=0.05, "none"),
    not ``structure_reg``'s own Python defaults (L=3, T=0.1, "inverse").
    """
    _check_structure_options(levels, temperature, weighting, centering, distance, divergence)
    if original.ndim != 2 or aligned.ndim != 2 or original.shape[0] != aligned.shape[0]:
        raise ValueError(f"original and aligned must be [n, d] with the same n, got "
                         f"{tuple(original.shape)} and {tuple(aligned.shape)}")
    with torch.autocast(device_type=original.device.type, enabled=False):
        s_x = similarity(_prepare(original, centering, center_first), distance, temperature, gamma)
        s_a = similarity(_prepare(aligned, centering, center_first), distance, temperature, gamma)
        p, q = F.softmax(s_x, dim=-1), F.softmax(s_a, dim=-1)
        return _multi_hop(p, q, levels, weighting, margin, _DIVERGENCE_FNS[divergence])


def _multi_hop(p, q, levels, weighting, margin, divergence_fn) -> torch.Tensor:
    """§3 steps 4, 6, 7: (1/L) Σ_l w_l · max(D(P^l, Q^l) − margin, 0)."""
    total, p_l, q_l = 0.0, p, q
    for level in range(1, levels + 1):
        if level > 1:  # P^l = P^(l-1) P: rows stay stochastic
            p_l, q_l = p_l @ p, q_l @ q
        d_l = F.relu(divergence_fn(p_l, q_l) - margin)
        total = total + (d_l if weighting == "none" else d_l * (1.0 / level))
    return total / levels


def clip_loss(a_img: torch.Tensor, a_txt: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of §2: ½[CE(Z, diag) + CE(Zᵀ, diag)], Z = A_img A_txtᵀ / T.

    Takes the embeddings as given; ``AlignmentLoss`` applies ``safe_norm`` first.
    """
    logits = (a_img @ a_txt.T) / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class AlignmentLoss(torch.nn.Module):
    """The official ``CLIPLoss`` (§2): CLIP loss + λ·½[R_S(image) + R_S(text)], λ warmed up (§3.1).

    Built from a :class:`~trials.loss_options.LossOptions` (its defaults when
    none is given), with keyword overrides of its fields:
    ``AlignmentLoss(structure_lambda=0.0)``.

    Call ``step()`` before every training batch. λ is ``structure_lambda``
    before the first ``step()``, then λ_base·min(1, b/warmup_steps) on the
    b-th batch (0-based), so the first batch has λ=0 and skips R_S.
    ``steps`` (the number of ``step()`` calls) is the whole schedule state; it
    travels in ``state_dict()`` and can be set directly.

    Departures, all opt-in: ``structure_divergence="js"`` (textbook JS) and
    ``paper_sum=True`` (sum the two modality terms, the paper's form: the
    code's λ=10 equals λ=5 there). ``warmup_steps=0`` means no warm-up
    (the official code would divide by zero).
    """

    def __init__(self, options: LossOptions = LOSS_DEFAULTS, **overrides):
        super().__init__()
        options = dataclasses.replace(options, **overrides)  # replace() re-runs the checks
        self.temperature = options.temperature
        self.normalize_latents = options.normalize_latents
        self.warmup_steps = options.warmup_steps
        self.lambda_base = float(options.structure_lambda)
        self.paper_sum = options.paper_sum
        self.use_only_unimodal = options.structure_use_only_unimodal
        self.options = options  # the resolved options, so a fused twin can be built from them
        self.structure_options = dict(
            levels=options.structure_levels, temperature=options.temperature,
            weighting=options.structure_weighting, margin=options.structure_margin,
            centering=options.structure_centering, distance=options.structure_distance,
            center_first=options.structure_center_first, divergence=options.structure_divergence,
        )
        self.steps = 0

    @property
    def structure_lambda(self) -> float:
        """λ in effect now (§3.1): λ_base before any step(), else λ_base·min(1, (steps−1)/warmup)."""
        if self.steps == 0 or self.warmup_steps <= 0:
            return self.lambda_base
        return self.lambda_base * min(1.0, (self.steps - 1) / self.warmup_steps)

    def step(self) -> None:
        """Advance the λ schedule by one training batch (call before the batch)."""
        self.steps += 1

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = int(state["steps"])

    def clip_term(self, image_aligned: torch.Tensor, text_aligned: torch.Tensor) -> torch.Tensor:
        """The CLIP term on the (normalised) embeddings; ``trials.fast_loop`` overrides it."""
        return clip_loss(image_aligned, text_aligned, self.temperature)

    def structure_term(self, original: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
        """R_S of one modality; ``trials.fast_loop`` overrides it with the fused version."""
        return structure_regularizer(original, aligned, **self.structure_options)

    def _regularizer_inputs(self, original, aligned, extra: Extra):
        """Add extra unimodal (original, aligned) rows for R_S only (§3 'Which original embeddings')."""
        if extra is None:
            return original, aligned
        extra_original, extra_aligned = extra
        if self.normalize_latents:
            extra_aligned = safe_normalize(extra_aligned)
        if self.use_only_unimodal:
            return extra_original, extra_aligned
        return torch.cat([original, extra_original]), torch.cat([aligned, extra_aligned])

    def forward(
        self,
        image_aligned: torch.Tensor,
        text_aligned: torch.Tensor,
        image_original: torch.Tensor,
        text_original: torch.Tensor,
        extra_image: Extra = None,
        extra_text: Extra = None,
    ) -> dict:
        """Loss terms as 0-d tensors: ``clip_loss``, ``overall_loss`` and, when λ>0,
        ``structure_loss_wo_lambda`` (the combined R_S) and ``structure_loss`` (λ times it)."""
        if self.normalize_latents:
            image_aligned, text_aligned = safe_normalize(image_aligned), safe_normalize(text_aligned)
        out = {"clip_loss": self.clip_term(image_aligned, text_aligned)}
        lam = self.structure_lambda
        if lam > 0:  # exactly 0 skips R_S entirely, as in the code
            r_img = self.structure_term(*self._regularizer_inputs(image_original, image_aligned, extra_image))
            r_txt = self.structure_term(*self._regularizer_inputs(text_original, text_aligned, extra_text))
            structure = r_img + r_txt if self.paper_sum else (r_img + r_txt) / 2
            out["structure_loss_wo_lambda"] = structure
            out["structure_loss"] = lam * structure
            out["overall_loss"] = out["clip_loss"] + lam * structure
        else:
            out["overall_loss"] = out["clip_loss"]
        return out
