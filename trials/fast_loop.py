"""The fast path of a trial's training loop: the same loop, the fused loss terms.

:func:`trials.train.train_alignment` runs the loop of :mod:`trials.train`
either with the caller's :class:`~trials.losses.AlignmentLoss` (the reference
path, the oracle of the tests) or with its :class:`FusedAlignmentLoss` twin
(this module), which computes the same numbers with the fused terms of
:mod:`trials.fused_loss` and reuses its scratch matrices across steps. Two
things about the frozen features are computed once per trial instead of once
per batch:

* the frozen-space half of R_S on the validation batches (:meth:`~FusedAlignmentLoss.cache_frozen`);
* where the options allow it and it pays (:func:`wants_gram`), the Gram
  matrix of the training rows (:meth:`~FusedAlignmentLoss.cache_gram`): a
  training batch's frozen similarity is then gathered from it by row index,
  which the loop passes on (:meth:`~FusedAlignmentLoss.training_batch`),
  instead of recomputed as an n×n×d product.

Everything else (batch order, λ schedule, optimiser, clipping, FuseMix,
extras, early stopping) is the one loop, so both paths see the same batches
in the same order.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from trials._checks import check_choice
from trials.frozen_gram import GRAM_CENTERINGS, FrozenGram, frozen_side_from_gram
from trials.fused_loss import FrozenSide, Workspace, frozen_side, fused_clip_loss, fused_structure_regularizer
from trials.loss_options import LOSS_DEFAULTS, LossOptions
from trials.losses import AlignmentLoss
from trials.train_options import TrainConfig

# The frozen half of R_S on the validation batches is cached up to this size
# per trial (2·L n×n matrices per batch and modality); batches beyond it are
# recomputed every epoch. 20,000 validation pairs at L=1 take ~1.3 GB.
VALIDATION_CACHE_BYTES = 2 * 1024**3

FROZEN_GRAMS = ("auto", "on", "off")  # train_alignment's frozen_gram: see wants_gram
# frozen_gram="auto" keeps the training Grams (two N×N, float32) and their n×N gather scratch up
# to this size per trial: 20,000 rows at a batch of 4096 take 3.5 GB.
GRAM_CACHE_BYTES = 4 * 1024**3
# ... and builds them only for config.epochs > GRAM_PAYBACK·N/batch_size. Building one costs N²·d,
# as many FLOPs as N/n epochs of the batch products it replaces; the gather that replaces them
# costs a quarter to half of one (n = 4096, d = 768, CPU), so the break-even is later than N/n.
GRAM_PAYBACK = 2.0


def unsupported(loss_fn) -> list[str]:
    """Why the fused loss cannot stand in for ``loss_fn`` (empty: it can)."""
    if type(loss_fn) is not AlignmentLoss:
        return [f"loss_fn is a {type(loss_fn).__name__}, not a trials.losses.AlignmentLoss"]
    reasons = []
    options = loss_fn.structure_options
    if options["distance"] != "cosine":
        reasons.append(f"structure_distance={options['distance']!r} (fused: 'cosine')")
    if options["divergence"] != "official":
        reasons.append(f"structure_divergence={options['divergence']!r} (fused: 'official')")
    return reasons


class FusedAlignmentLoss(AlignmentLoss):
    """:class:`~trials.losses.AlignmentLoss` with fused CLIP and R_S terms.

    Same options, schedule and outputs; the frozen half of R_S is looked up in
    a cache for batches registered with :meth:`cache_frozen` (the validation
    batches), read from the training Grams for the batch announced with
    :meth:`training_batch`, and computed per call otherwise.
    """

    def __init__(self, options: LossOptions = LOSS_DEFAULTS, **overrides):
        super().__init__(options, **overrides)
        self.workspace = Workspace()
        self._frozen: dict[tuple, tuple[torch.Tensor, FrozenSide]] = {}
        self._frozen_bytes = 0
        self._grams: Optional[tuple[FrozenGram, FrozenGram]] = None
        self._batch: Optional[_TrainingBatch] = None
        self._whole: dict[int, FrozenSide] = {}  # modality -> frozen side of every training row

    @classmethod
    def twin_of(cls, loss_fn: AlignmentLoss) -> "FusedAlignmentLoss":
        """A fused loss in the same state as ``loss_fn`` (options, λ schedule, unimodal switch)."""
        twin = cls(loss_fn.options)
        twin.steps = loss_fn.steps
        twin.use_only_unimodal = loss_fn.use_only_unimodal
        return twin

    def clip_term(self, image_aligned, text_aligned):
        return fused_clip_loss(image_aligned, text_aligned, self.temperature, self.workspace)

    def structure_term(self, original, aligned):
        batch = self._batch
        if batch is not None and (original is batch.image or original is batch.text):
            modality = 0 if original is batch.image else 1
            frozen = self._frozen_from_gram(modality, batch.rows)
            # P is of the rows in sorted order; R_S is invariant to a permutation of both sides
            return fused_structure_regularizer(None, aligned.index_select(0, batch.order), frozen=frozen,
                                               workspace=self.workspace, **self.structure_options)
        cached = self._frozen.get(_content_key(original))
        return fused_structure_regularizer(original, aligned, frozen=None if cached is None else cached[1],
                                           workspace=self.workspace, **self.structure_options)

    def cache_gram(self, train_image: torch.Tensor, train_text: torch.Tensor) -> None:
        """Build the Gram matrix of each modality's training rows (:class:`~trials.frozen_gram.FrozenGram`)."""
        self._grams = tuple(FrozenGram(x, self.structure_options["centering"]) for x in (train_image, train_text))

    def _frozen_from_gram(self, modality: int, rows: torch.Tensor) -> FrozenSide:
        """The frozen side of the sorted training ``rows``. A batch of every training row (N at
        most the batch size) is the same sorted rows every epoch: made once, then kept."""
        if modality in self._whole:
            return self._whole[modality]
        gram, whole = self._grams[modality], len(rows) == len(self._grams[modality].matrix)
        frozen = frozen_side_from_gram(gram, rows, levels=self.structure_options["levels"],
                                       temperature=self.structure_options["temperature"],
                                       workspace=None if whole else self.workspace)
        if whole:
            self._whole[modality] = frozen
        return frozen

    @property
    def has_gram(self) -> bool:
        return self._grams is not None

    def training_batch(self, image: torch.Tensor, text: torch.Tensor, rows: torch.Tensor) -> None:
        """The next call's originals ``image``, ``text`` are the training rows ``rows``: R_S reads
        their frozen S from the Grams. Held by identity until the next batch (no copy, no sync)."""
        order = torch.argsort(rows)  # sorted rows: the gather reads G in order, ~2x faster
        self._batch = _TrainingBatch(image, text, rows[order], order)

    def cache_frozen(self, original: torch.Tensor, budget: int = VALIDATION_CACHE_BYTES) -> bool:
        """Compute the frozen half of R_S for ``original`` once; later calls on the same view reuse it.

        Returns False (and caches nothing) when it would pass ``budget`` bytes.
        """
        n, levels = len(original), self.structure_options["levels"]
        size = 2 * levels * n * n * original.element_size()
        if self._frozen_bytes + size > budget:
            return False
        options = {k: self.structure_options[k] for k in ("levels", "temperature", "centering", "center_first")}
        # the view is kept: its memory cannot be reused while the entry lives
        self._frozen[_content_key(original)] = (original, frozen_side(original, **options))
        self._frozen_bytes += size
        return True


class _TrainingBatch(NamedTuple):
    image: torch.Tensor
    text: torch.Tensor
    rows: torch.Tensor  # the batch's training row indices, sorted
    order: torch.Tensor  # rows = batch indices[order]


def _content_key(t: torch.Tensor) -> tuple:
    """Same storage, offset, shape, strides and version counter: same contents."""
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride(), t._version)


def fused_twin(loss_fn, impl: str) -> Optional[FusedAlignmentLoss]:
    """The fused twin ``impl`` asks for: None for the reference path ("reference", or "auto" where
    the fused terms do not cover the options); "fast" on options it does not cover raises."""
    if impl == "reference":
        return None
    reasons = unsupported(loss_fn)
    if reasons and impl == "fast":
        raise ValueError("impl='fast' does not cover " + "; ".join(reasons) + "; use impl='reference'")
    return None if reasons else FusedAlignmentLoss.twin_of(loss_fn)


def cache_validation(loss_fn: FusedAlignmentLoss, val_image: torch.Tensor, val_text: torch.Tensor,
                     batch_size: int) -> None:
    """The frozen half of R_S on every validation batch (as ``trials.train._validate`` slices them)."""
    if loss_fn.lambda_base <= 0:
        return  # R_S never runs
    for start in range(0, len(val_image), batch_size):
        for features in (val_image, val_text):
            loss_fn.cache_frozen(features[start:start + batch_size])


def wants_gram(choice: str, fused: Optional[FusedAlignmentLoss], loss_fn, config: TrainConfig,
               n_rows: int, *, impl: str, extras: bool) -> bool:
    """Whether ``frozen_gram=choice`` builds the training Grams. "off": never; "auto": where the
    options allow it and it pays (:func:`gram_pays`); "on": where the options allow it, and
    raises where they do not, naming them."""
    check_choice("frozen_gram", choice, FROZEN_GRAMS)
    if choice == "off":
        return False
    reasons = gram_unsupported(fused, loss_fn, config, impl=impl, extras=extras)
    if reasons and choice == "on":
        raise ValueError("frozen_gram='on' does not cover " + "; ".join(reasons)
                         + "; use frozen_gram='auto' or 'off'")
    return not reasons and (choice == "on" or gram_pays(config, n_rows))


def gram_unsupported(fused: Optional[FusedAlignmentLoss], loss_fn, config: TrainConfig, *,
                     impl: str, extras: bool) -> list[str]:
    """Why a training batch's frozen S cannot be read from a Gram of the training rows (empty: it can)."""
    if fused is None:  # the reference path never uses it
        return ["impl='reference'"] if impl == "reference" else unsupported(loss_fn)
    options, reasons = fused.structure_options, []
    if fused.lambda_base <= 0:
        reasons.append(f"structure_lambda={fused.lambda_base!r} (R_S never runs)")
    if options["centering"] not in GRAM_CENTERINGS:
        reasons.append(f"structure_centering={options['centering']!r} (Gram: 'none' or 'mean')")
    if options["center_first"]:
        reasons.append("structure_center_first=True (Gram: False)")
    if config.mixup_alpha > 0:
        reasons.append(f"mixup_alpha={config.mixup_alpha!r} (FuseMix mixes the rows)")
    if config.fixed_structure:
        reasons.append("fixed_structure=True (R_S reads another batch)")
    if extras:
        reasons.append("extra_image/extra_text (unpaired rows join R_S's batch)")
    return reasons


def gram_pays(config: TrainConfig, n_rows: int) -> bool:
    """"auto"'s cost rules: more than GRAM_PAYBACK·N/batch_size epochs, and both float32 Grams
    with their gather scratch within GRAM_CACHE_BYTES."""
    batch = min(config.batch_size, n_rows)
    size = (2 * n_rows * n_rows + batch * n_rows) * 4
    return config.epochs > GRAM_PAYBACK * n_rows / config.batch_size and size <= GRAM_CACHE_BYTES
