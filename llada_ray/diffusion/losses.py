"""Training objectives: the masked-diffusion ELBO, the CAP confidence term, and DPO on the ELBO.

Conventions. `logits` [batch, L, vocab] are read at the same positions as `targets` [batch, L]
(no next-token shift, LLaDA2; callers that keep the AR shift shift both before calling).
`masked` [batch, L] marks the positions that were replaced by the mask token in xt; only they
carry loss. `t` [batch] is each row's mask rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Weighting = Literal["inv_t", "uniform"]
Normalization = Literal["maskable", "masked"]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at every position, [batch, L], computed in fp32."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), reduction="none"
    ).view_as(targets)


def masked_token_nll(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy at masked positions, 0 elsewhere; [batch, L], computed in fp32."""
    return token_nll(logits, targets) * masked


@dataclass(frozen=True)
class ElboLoss:
    loss: torch.Tensor  # scalar to minimise
    per_sequence: torch.Tensor  # [batch] weighted NLL sum of each row (the negative ELBO estimate)
    masked_tokens: torch.Tensor  # scalar count


def elbo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    *,
    maskable: torch.Tensor | None = None,
    weighting: Weighting = "inv_t",
    normalization: Normalization = "maskable",
    nll: torch.Tensor | None = None,
) -> ElboLoss:
    """Negative ELBO, L = E_t E_xt [ w(t) * sum_i 1[xt_i = MASK] * CE_i ].

    weighting: "inv_t" is w = 1/t, the linear schedule's -alpha'_t / (1 - alpha_t) (report;
      CPT default); "uniform" is w = 1 (dFactory SFT).
    normalization: how the per-row sum becomes a per-token figure.
      "maskable": each row's weighted sum divided by its number of maskable tokens, then the mean
        over rows. With w = 1/t this is an unbiased estimate of the NLL bound per token (original
        LLaDA: sequence length in pre-training, answer length in SFT).
      "masked": the batch's weighted sum divided by the batch's number of masked tokens (dFactory).
    `nll`: `token_nll(logits, targets)` when the caller has it already (token editing).
    """
    weights = 1.0 / t if weighting == "inv_t" else torch.ones_like(t)
    nll = token_nll(logits, targets) if nll is None else nll
    per_sequence = (nll * masked).sum(-1) * weights
    n_masked = masked.sum()
    if normalization == "maskable":
        if maskable is None:
            maskable = torch.ones_like(masked)
        loss = (per_sequence / maskable.sum(-1).clamp(min=1)).mean()
    else:
        loss = per_sequence.sum() / n_masked.clamp(min=1)
    return ElboLoss(loss, per_sequence, n_masked)


def cap_confidence_loss(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor
) -> torch.Tensor:
    """CAP term: mean full-vocabulary entropy over masked positions predicted correctly.

    Minimising it sharpens predictions the model already gets right, so more tokens clear the
    decoding threshold per step. Zero (with a gradient path) when no masked prediction is correct.
    """
    logits = logits.float()
    correct = masked & (logits.argmax(-1) == targets)
    log_p = logits.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (entropy * correct).sum() / correct.sum().clamp(min=1)


@dataclass(frozen=True)
class EditLoss:
    loss: torch.Tensor  # scalar: mean cross-entropy over the visible positions
    substituted: torch.Tensor  # scalar: mean cross-entropy where a token was replaced
    kept: torch.Tensor  # scalar: mean cross-entropy where the visible token is the original


def editing_loss(nll: torch.Tensor, visible: torch.Tensor, substituted: torch.Tensor) -> EditLoss:
    """The T2T stream from `token_nll` [batch, L] (the original tokens as targets): the
    original token at every visible (unmasked) position of the noised input, replaced or not.
    Supervising only the replaced ones would reward never predicting the token in the input,
    which a decoder then "edits" everywhere; the kept positions teach it to leave a right token
    alone. The model cannot tell which is which but from context."""
    nll = nll * visible
    kept = visible & ~substituted
    return EditLoss(
        nll.sum() / visible.sum().clamp(min=1),
        (nll * substituted).sum() / substituted.sum().clamp(min=1),
        (nll * kept).sum() / kept.sum().clamp(min=1),
    )


def sequence_elbo(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """One-sample ELBO of each row's maskable tokens, log p >= -(1/t) sum_masked CE; [batch]."""
    return -masked_token_nll(logits, targets, masked).sum(-1) / t


@dataclass(frozen=True)
class DpoLoss:
    loss: torch.Tensor
    reward_margin: torch.Tensor  # mean of beta * (chosen gain - rejected gain)
    accuracy: torch.Tensor  # share of pairs whose chosen gain exceeds the rejected gain


def dpo_elbo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> DpoLoss:
    """DPO with ELBOs in place of log-likelihoods (LLaDA 1.5 / LLaDA2):
    L = -log sigmoid(beta * [(B_pi(yw) - B_ref(yw)) - (B_pi(yl) - B_ref(yl))]).

    Draw (t, mask) once per response and evaluate policy and reference on that same xt: the
    shared noise cancels in the differences (VRPO's variance reduction, at no cost).
    """
    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return DpoLoss(
        -F.logsigmoid(margin).mean(), margin.mean().detach(), (margin > 0).float().mean()
    )
