"""One training objective per run kind: what a micro-batch costs. Pure torch (no Ray).

`model` is whatever the strategy wrapped (DDP, FSDP, a DeepSpeed engine) around a DiffusionLM,
called with the keyword inputs of `model.adapter`; `gen` seeds every random draw (t, masks) so a
step is a pure function of (seed, run, step, rank, micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llada_ray.config import (
    ArPretrainStage,
    CapStage,
    CptStage,
    DpoStage,
    EditingConfig,
    PipelineConfig,
    SftStage,
)
from llada_ray.diffusion.losses import (
    ElboLoss,
    cap_confidence_loss,
    dpo_elbo_loss,
    editing_loss,
    elbo_loss,
    masked_token_nll,
    sequence_elbo,
    token_nll,
)
from llada_ray.diffusion.masks import position_ids_for
from llada_ray.diffusion.noise import (
    Substituted,
    complementary_pairs,
    forward_mask,
    reach_of,
    sample_mask_rates,
    substitute,
)
from llada_ray.model.adapter import block_diffusion_inputs, causal_inputs, stable_inputs
from llada_ray.train.batches import ChatBatch, PackedBatch, dpo_batch, packed_batch, sft_batch
from llada_ray.train.plan import Unit

Model = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class StepLoss:
    loss: torch.Tensor  # scalar to minimise
    metrics: dict[str, float]  # detached figures for logging (summed over ranks as means)
    tokens: int  # real tokens in the micro-batch (throughput)


@dataclass(frozen=True)
class Editing:
    """A run's T2T stream: the settings and the vocabulary substitutions are drawn from."""

    config: EditingConfig
    vocab_size: int
    mask_id: int

    def corrupt(
        self, xt: torch.Tensor, visible: torch.Tensor, doc: torch.Tensor, block_size: int,
        gen: torch.Generator,
    ) -> Substituted:  # fmt: skip
        """The masked stream's input with a share of its visible maskable tokens replaced."""
        reach = reach_of(doc, block_size) if self.config.substitution == "in_sequence" else None
        rate = self.config.substitution_rate
        return substitute(xt, visible, rate, self.vocab_size, self.mask_id, gen, reach)

    def term(
        self,
        m2t: ElboLoss,
        nll: torch.Tensor,
        visible: torch.Tensor,
        edited: Substituted,
        metrics: dict[str, float],
    ) -> torch.Tensor:
        """weight · T2T, to add to the loss; records each stream's loss on its own."""
        t2t = editing_loss(nll, visible, edited.substituted)
        metrics |= {
            "m2t_loss": m2t.loss.item(),
            "t2t_loss": t2t.loss.item(),
            "t2t_substituted_loss": t2t.substituted.item(),
            "t2t_kept_loss": t2t.kept.item(),
            "substituted_ratio": (edited.substituted.sum() / visible.sum().clamp(min=1)).item(),
        }
        return self.config.loss_weight * t2t.loss


def ar_loss(
    model: Model, batch: PackedBatch, restart_positions: bool, completion_only: bool = False
) -> StepLoss:
    """Next-token cross-entropy inside each document (the AR model CPT converts); with
    `completion_only`, on the completion tokens of prompt/completion documents only."""
    positions = position_ids_for(batch.doc_ids, restart_positions)
    logits = model(**causal_inputs(batch.input_ids, batch.doc_ids, positions))
    same_doc = batch.doc_ids[:, 1:] == batch.doc_ids[:, :-1]
    keep = same_doc & batch.valid[:, 1:]
    if completion_only:
        keep &= batch.completion[:, 1:]
    loss = masked_token_nll(logits[:, :-1], batch.input_ids[:, 1:], keep).sum() / keep.sum().clamp(
        min=1
    )
    return StepLoss(loss, {"loss": loss.item()}, batch.tokens)


def ar_sft_loss(model: Model, batch: ChatBatch, eos_id: int) -> StepLoss:
    """Next-token cross-entropy on the response, up to and including its first EOS: the AR
    baseline trained on the very rows SFT trains on (the EOS padding after it is not a target)."""
    positions = position_ids_for(batch.doc_ids, True)
    logits = model(**causal_inputs(batch.input_ids, batch.doc_ids, positions))
    targets = batch.input_ids[:, 1:]
    response = batch.maskable[:, 1:]
    is_eos = (targets == eos_id) & response
    earlier = torch.cumsum(is_eos, 1) - is_eos.long()  # response EOS before each target
    keep = response & (earlier == 0)
    loss = masked_token_nll(logits[:, :-1], targets, keep).sum() / keep.sum().clamp(min=1)
    return StepLoss(loss, {"loss": loss.item()}, batch.tokens)


def cpt_loss(
    model: Model,
    batch: PackedBatch,
    stage: CptStage,
    block_size: int,
    mask_id: int,
    gen: torch.Generator,
    *,
    restart_positions: bool,
    embed_noise_std: float = 0.0,
    editing: Editing | None = None,
) -> StepLoss:
    """Block-diffusion ELBO at `block_size`; at block = L the stable phase (xt alone).

    With `shift_labels` (Dream / Fast-dLLM v2 style) the logits at position i predict token i+1,
    which is the one masked in the input; targets never cross a document boundary.
    """
    x0, doc = batch.input_ids, batch.doc_ids
    maskable = batch.valid.clone()
    if stage.loss_on == "completion":
        maskable &= batch.completion
    if stage.shift_labels:
        maskable[:, 0] = False
        maskable[:, 1:] &= doc[:, 1:] == doc[:, :-1]
    t = sample_mask_rates(
        len(x0), t_min=stage.t_min, antithetic=stage.antithetic, generator=gen, device=x0.device
    )
    noised = forward_mask(x0, t, maskable, mask_id, gen)
    xt, visible = noised.xt, maskable & ~noised.masked
    if editing is not None:  # config refuses editing with shift_labels
        edited = editing.corrupt(xt, visible, doc, block_size, gen)
        xt = edited.xt
    positions = position_ids_for(doc, restart_positions)
    if block_size == x0.shape[1]:
        inputs = stable_inputs(xt, doc, positions)
    else:
        inputs = block_diffusion_inputs(xt, x0, doc, positions, block_size)
    logits = model(**inputs, embed_noise_std=embed_noise_std)
    targets, masked = x0, noised.masked
    if stage.shift_labels:
        logits, targets = logits[:, :-1], x0[:, 1:]
        masked, maskable = masked[:, 1:], maskable[:, 1:]
    nll = token_nll(logits, targets)
    elbo = elbo_loss(logits, targets, masked, t, maskable=maskable, weighting=stage.weighting,
                     nll=nll)  # fmt: skip
    metrics = {"masked_ratio": (masked.sum() / maskable.sum().clamp(min=1)).item()}
    loss = elbo.loss
    if editing is not None:
        loss = loss + editing.term(elbo, nll, visible, edited, metrics)
    metrics["loss"] = loss.item()
    return StepLoss(loss, metrics, batch.tokens)


def sft_loss(
    model: Model,
    batch: ChatBatch,
    stage: SftStage,
    mask_id: int,
    gen: torch.Generator,
    editing: Editing | None = None,
) -> StepLoss:
    """Response-only BD ELBO with t in [t_min, t_max]; complementary pairs side by side.

    For CAP, plus λ · the entropy of the masked predictions that are already right. With
    `editing`, plus the T2T stream on each row's visible response tokens.
    """
    x0, doc, maskable = batch.input_ids, batch.doc_ids, batch.maskable
    t = sample_mask_rates(
        len(x0), t_min=stage.t_min, t_max=stage.t_max, generator=gen, device=x0.device
    )
    if stage.complementary:
        noised = complementary_pairs(x0, t, maskable, mask_id, gen)
        x0, doc, maskable = (x.repeat_interleave(2, 0) for x in (x0, doc, maskable))
    else:
        noised = forward_mask(x0, t, maskable, mask_id, gen)
    xt, visible = noised.xt, maskable & ~noised.masked
    if editing is not None:
        edited = editing.corrupt(xt, visible, doc, stage.block_size, gen)
        xt = edited.xt
    positions = position_ids_for(doc, True)
    logits = model(**block_diffusion_inputs(xt, x0, doc, positions, stage.block_size))
    nll = token_nll(logits, x0)
    elbo = elbo_loss(
        logits,
        x0,
        noised.masked,
        noised.t,
        maskable=maskable,
        weighting=stage.weighting,
        normalization=stage.normalization,
        nll=nll,
    )
    loss = elbo.loss
    metrics = {
        "elbo": elbo.loss.item(),
        "masked_ratio": (noised.masked.sum() / maskable.sum().clamp(min=1)).item(),
    }
    if isinstance(stage, CapStage):
        entropy = cap_confidence_loss(logits, x0, noised.masked)
        loss = loss + stage.cap_lambda * entropy
        metrics["cap_entropy"] = entropy.item()
    if editing is not None:
        loss = loss + editing.term(elbo, nll, visible, edited, metrics)
    metrics["loss"] = loss.item()
    return StepLoss(loss, metrics, batch.tokens)


def dpo_loss(
    model: Model,
    reference: Model,
    batch: ChatBatch,
    stage: DpoStage,
    mask_id: int,
    gen: torch.Generator,
) -> StepLoss:
    """ELBO-DPO: `batch` holds b chosen then b rejected sequences. Policy and frozen reference
    see the same (t, mask) draws (VRPO), averaged over `elbo_samples` draws."""
    x0, doc, maskable = batch.input_ids, batch.doc_ids, batch.maskable
    positions = position_ids_for(doc, True)
    policy, ref = 0.0, 0.0
    for _ in range(stage.elbo_samples):
        t = sample_mask_rates(len(x0), generator=gen, device=x0.device)
        noised = forward_mask(x0, t, maskable, mask_id, gen)
        inputs = block_diffusion_inputs(noised.xt, x0, doc, positions, stage.block_size)
        policy = policy + sequence_elbo(model(**inputs), x0, noised.masked, t)
        with torch.no_grad():
            ref = ref + sequence_elbo(reference(**inputs), x0, noised.masked, t)
    policy, ref = policy / stage.elbo_samples, ref / stage.elbo_samples
    b = len(x0) // 2
    out = dpo_elbo_loss(policy[:b], policy[b:], ref[:b], ref[b:], stage.beta)
    metrics = {
        "loss": out.loss.item(),
        "reward_margin": out.reward_margin.item(),
        "reward_accuracy": out.accuracy.item(),
    }
    return StepLoss(out.loss, metrics, batch.tokens)


Objective = Callable[[Model, dict[str, list], torch.Generator, int], StepLoss]


def objective_for(
    unit: Unit,
    cfg: PipelineConfig,
    mask_id: int,
    pad_id: int,
    eos_id: int,
    *,
    vocab_size: int,
    reference: Model | None = None,
    embed_noise: Callable[[int], float] = lambda step: 0.0,
    device: torch.device | str = "cpu",
) -> Objective:
    """The run's objective as f(model, stored rows, generator, step) -> StepLoss; batches are
    collated on the CPU and moved to `device` (the generator must live there too)."""
    restart = cfg.data.restart_positions
    stage = unit.stage
    edit_config = cfg.edits(stage.stage)
    editing = Editing(edit_config, vocab_size, mask_id) if edit_config else None
    if unit.objective == "ar":
        assert isinstance(stage, ArPretrainStage)
        completion_only = stage.loss_on == "completion"
        return lambda model, rows, gen, step: ar_loss(
            model, packed_batch(rows).to(device), restart, completion_only
        )
    if unit.objective in ("bd", "stable"):
        assert isinstance(stage, CptStage) and unit.block_size is not None
        block_size = unit.block_size

        def cpt(model: Model, rows: dict[str, list], gen: torch.Generator, step: int) -> StepLoss:
            return cpt_loss(
                model,
                packed_batch(rows).to(device),
                stage,
                block_size,
                mask_id,
                gen,
                restart_positions=restart,
                embed_noise_std=embed_noise(step),
                editing=editing,
            )

        return cpt
    if unit.objective == "ar_sft":
        return lambda model, rows, gen, step: ar_sft_loss(
            model, sft_batch(rows, pad_id).to(device), eos_id
        )
    if unit.objective in ("sft", "cap"):
        assert isinstance(stage, SftStage)
        return lambda model, rows, gen, step: sft_loss(
            model, sft_batch(rows, pad_id).to(device), stage, mask_id, gen, editing
        )
    if unit.objective == "dpo":
        assert isinstance(stage, DpoStage) and reference is not None
        return lambda model, rows, gen, step: dpo_loss(
            model, reference, dpo_batch(rows, pad_id).to(device), stage, mask_id, gen
        )
    raise ValueError(f"run {unit.name!r} ({unit.objective}) does not train")
