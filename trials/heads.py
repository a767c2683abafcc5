"""The code of every alignment head, registered by name (METHOD.md §4).

:data:`HEADS` maps each name of :data:`trials.head_options.HEAD_OPTIONS` to
its code: for a trainable head, a module class ``(in_dim, out_dim, **options)``;
for a head fitted in closed form, its fitting function
``(x_train, y_train, dim, *, seed, **options)``, whose result has
``transform_x``, ``transform_y`` and ``class_vectors``. Registered heads:

- ``linear``: the official ``LinearAlignmentLayer``, an affine map (§4.1).
- ``res_low_rank``: the official ``ResLowRankHead`` used by every "MLP" config
  (§4.3). With ``gate_init=0`` (all configs) its residual branch never trains,
  so it is exactly the bias-free linear map ``x -> P x``; reproduced on purpose.
- ``mlp``: ours. A plain MLP whose hidden layers really train, shaped like the
  official (unused) ``MLPAlignmentLayer`` (§4.2).
- ``csa``: the CSA map ``x -> (x - mean) W`` (§4.4), fitted by
  :func:`trials.csa.fit_csa`; ``build_head`` refuses it.
- ``token_projector``: freeze-align's projector on token features (§4.5),
  registered by its pair module :class:`trials.token_projector.TokenProjector`
  ``(image_dim, text_dim, out_dim, dropout_p)``; built by
  :func:`trials.token_trial.build_token_projector`, ``build_head`` refuses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from trials import csa
from trials.head_options import HEAD_OPTIONS, is_closed_form, needs_tokens, parse_head_options
from trials.registry import Registry
from trials.token_projector import TokenProjector

HEADS = Registry("head")
HEADS.register("csa", csa.fit_csa)  # closed form: registered by its fitting function
HEADS.register("token_projector", TokenProjector)  # reads tokens: both modalities in one module


def list_heads(*, trainable_only: bool = False) -> list[str]:
    """Names of the heads, sorted; ``trainable_only`` leaves out those fitted in closed form."""
    return HEAD_OPTIONS.names(closed_form=False) if trainable_only else HEAD_OPTIONS.names()


def build_head(name: str, in_dim: int, out_dim: int, *, seed: int | None = None,
               **options) -> nn.Module:
    """Build trainable head ``name`` mapping ``in_dim -> out_dim``.

    Missing options take the defaults of the head's options dataclass.
    ``seed`` makes the initialisation deterministic without touching the
    global RNG (it runs under ``torch.random.fork_rng``). Unknown names or
    options raise ValueError listing what is allowed.
    """
    resolved = dataclasses.asdict(parse_head_options(name, options))
    if is_closed_form(name):
        fit = HEADS.get(name)
        raise ValueError(f"head {name!r} is fitted in closed form, not built: "
                         f"use {fit.__module__}.{fit.__qualname__}")
    if needs_tokens(name):
        raise ValueError(f"head {name!r} reads token features, not one pooled vector: "
                         "build it with trials.token_trial.build_token_projector")
    with _seeded(seed):
        return HEADS.get(name)(in_dim, out_dim, **resolved)


@contextlib.contextmanager
def _seeded(seed: int | None):
    """The global RNG seeded with ``seed`` inside, restored after; nothing at all for None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield



@HEADS.register("linear")
class LinearHead(nn.Linear):
    """``x -> W x + b`` with PyTorch's default init (§4.1, ``LinearAlignmentLayer``)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool):
        super().__init__(in_dim, out_dim, bias=bias)


@HEADS.register("res_low_rank")
class ResLowRankHead(nn.Module):
    """``z = P x + sigmoid(logit_a) * W2 Dropout(GELU(W1 x))`` (§4.3).

    P and W1: orthogonal init, no bias; W2: zeros. ``gate_init=0`` sets the
    gate logit to -inf exactly as the official code does, so alpha, its
    gradient and the gradients of W1 and W2 are all 0 for ever: the head is
    the linear map ``P x``. Pass ``0 < gate_init < 1`` for a trainable gate.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int | None, dropout_p: float,
                 gate_init: float):
        super().__init__()
        rank = rank or max(8, out_dim // 4)
        self.P = nn.Linear(in_dim, out_dim, bias=False)
        self.W1 = nn.Linear(in_dim, rank, bias=False)
        self.W2 = nn.Linear(rank, out_dim, bias=False)
        nn.init.orthogonal_(self.P.weight)
        nn.init.orthogonal_(self.W1.weight)
        nn.init.zeros_(self.W2.weight)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout_p)
        # -inf, not a large negative number: that is what makes the official gate stuck
        logit = -math.inf if gate_init == 0.0 else math.log(gate_init / (1 - gate_init))
        self.logit_alpha = nn.Parameter(torch.tensor(logit))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.W2(self.dropout(self.act(self.W1(x))))
        return self.P(x) + self.alpha * delta


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}  # the modules of MLP_ACTIVATIONS


@HEADS.register("mlp")
class MLPHead(nn.Sequential):
    """Ours: ``Linear(in->h)``, then (num_layers-1) x [act, Dropout, ``Linear``], last to ``out``.

    Same shape as the official, unused ``MLPAlignmentLayer`` (§4.2; h = out,
    ReLU, no dropout by default), offered because the official "MLP" head
    (``res_low_rank``) never trains its hidden layer.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None, num_layers: int,
                 activation: str, dropout_p: float):
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = [nn.Linear(dims[0], dims[1])]
        for d_in, d_out in zip(dims[1:-1], dims[2:]):
            layers += [_ACTIVATIONS[activation](), nn.Dropout(dropout_p), nn.Linear(d_in, d_out)]
        super().__init__(*layers)
