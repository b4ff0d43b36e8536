"""The MIDMs training objective: the loss terms of one batch in the warm-up or the end-to-end phase.

Warm-up (the paper's first phase): the UNet is frozen and no diffusion step runs; the output is
Decode(R0) and the GT path Decode(softwarp(z_gt, C_gt)). End-to-end (second phase): the interleaved
loop is unrolled with gradients into the UNet and back into the correspondence networks, beside a
GT trajectory and a one-step diffusion-loss branch. Losses and weights as the official code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from midms_cli import losses
from midms_cli.diffusion.ddim import predict_x0
from midms_cli.diffusion.schedule import q_sample
from midms_cli.matching import back_warp, soft_warp
from midms_cli.models.midm import MIDM, ConditionFeatures, ExemplarFeatures, interleaved_trajectory

PHASES = ("warmup", "e2e")


# --------------------------------------------------------------------------------------------
# Small pieces of the forward pass


@dataclass
class Matches:
    """The initial matches of one batch (Algorithm 1's first step)."""

    condition: ConditionFeatures  # c↓, D_x, f_x
    exemplar: ExemplarFeatures  # z_y, D_y, f_y
    ground_truth: ExemplarFeatures  # z_gt, D_gt, f_gt (matched with the condition's own map)
    warped: Tensor  # R0 = softwarp(z_y, C0)
    warped_gt: Tensor  # R_gt = softwarp(z_gt, C_gt)


def initial_matches(model: MIDM, batch: dict[str, Tensor]) -> Matches:
    """Encode exemplar and GT (detached), match both against the condition, warp both latents."""
    tau = model.config.sampling.tau
    condition = model.condition_features(batch["cond"])
    exemplar = model.encode_exemplar(batch["ref"], batch["ref_cond"])
    ground_truth = model.encode_exemplar(batch["image"], batch["cond"])
    warped = soft_warp(exemplar.latent, condition.matching, exemplar.matching, tau)
    warped_gt = soft_warp(ground_truth.latent, condition.matching, ground_truth.matching, tau)
    return Matches(condition, exemplar, ground_truth, warped, warped_gt)


def diffusion_branch(model: MIDM, z_gt: Tensor, position: int, space: str) -> Tensor:
    """Diffusion-loss branch: one DDIM step on a fresh q-sample of the clean GT latent at position k*.

    The latent is noised at the grid point before the step (official off-by-one, with
    noise_offset "previous") and the UNet is queried at the step's own timestep. Returns
    MSE(x0_pred, z_gt) (space "x0", official) or MSE(eps_pred, eps) (space "eps", Eq. 17).
    """
    plan = interleaved_trajectory(model.config.sampling, model.alphas_cumprod)
    step = plan.steps[position]
    if model.config.sampling.noise_offset == "previous":
        t_noise = plan.t_noise if position == 0 else plan.steps[position - 1].t
    else:
        t_noise = step.t
    noise = torch.randn_like(z_gt)
    z_t = q_sample(z_gt, t_noise, noise, model.alphas_cumprod)
    eps = model.eps(model.unet, z_t, step.t)
    if space == "eps":
        return losses.diffusion_loss_eps(eps, noise)
    return losses.diffusion_loss_x0(predict_x0(z_t, eps, step.a_t), z_gt)


def segmentation_term(model: MIDM, matches: Matches, batch: dict[str, Tensor]) -> Tensor:
    """LSUN warped-segmentation loss: warp the exemplar's one-hot with C0."""
    exemplar_onehot = model.to_latent_grid(batch["ref_cond"], tuple(matches.warped.shape[-2:]))
    warped = soft_warp(exemplar_onehot, matches.condition.matching, matches.exemplar.matching,
                       model.config.sampling.tau)
    labels = matches.condition.condition.argmax(dim=1)
    return losses.warped_segmentation_loss(warped, labels, exemplar_onehot)


# --------------------------------------------------------------------------------------------
# The objective (the module DDP wraps)


class MIDMsObjective(nn.Module):
    """forward(batch) -> the loss terms of one phase ("warmup" or "e2e") and their total."""

    def __init__(self, model: MIDM, feature_net: nn.Module, phase: str) -> None:
        super().__init__()
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}")
        self.model = model
        self.feature_net = feature_net.requires_grad_(False)
        self.phase = phase
        self.weights = model.config.training.losses

    def _features(self, image: Tensor, layers: tuple[str, ...]) -> dict[str, Tensor]:
        return self.feature_net(image, layers)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        w, model = self.weights, self.model
        matches = initial_matches(model, batch)
        z_y, z_gt = matches.exemplar.latent, matches.ground_truth.latent
        terms: dict[str, Tensor] = {}
        # Eq. 12 and the initial cycle (Eq. 13), both phases.
        terms["domain"] = w.domain * losses.domain_alignment_loss(
            matches.condition.features, matches.ground_truth.features, matches.exemplar.features)
        cycle = losses.cycle_consistency_loss(
            back_warp(
                matches.warped,
                matches.condition.matching,
                matches.exemplar.matching,
                model.config.sampling.tau,
            ),
            z_y,
        )
        twice = self.phase == "warmup" and w.warmup_cycle_twice  # as the official code
        terms["cycle"] = w.cycle * cycle * (2.0 if twice else 1.0)
        if self.phase == "warmup":
            output, source_output = model.decode(matches.warped), model.decode(matches.warped_gt)
            terms["diffusion"] = w.diffusion * losses.self_warp_reconstruction_loss(matches.warped_gt, z_gt)
            if w.segmentation > 0:
                terms["segmentation"] = w.segmentation * segmentation_term(model, matches, batch)
        else:
            output, source_output = self._recurrent(matches, terms)
        # Eq. 14 and 15 on the feature net; Eq. 16 after warm-up only.
        layers = tuple(
            dict.fromkeys(
                (
                    *w.source_vgg_layers,
                    w.perceptual_layer,
                    *(w.contextual_layers if self.phase == "e2e" and w.contextual > 0 else ()),
                )
            )
        )
        target = self._features(batch["image"], layers)
        source = self._features(source_output, tuple(w.source_vgg_layers))
        terms["source"] = w.source_vgg * losses.source_condition_loss(
            source, target, w.source_vgg_layers, w.source_vgg_weights
        )
        produced = self._features(output, layers)
        terms["perceptual"] = w.perceptual * losses.perceptual_loss(
            produced[w.perceptual_layer], target[w.perceptual_layer]
        )
        if self.phase == "e2e" and w.contextual > 0:
            exemplar = self._features(batch["ref"], tuple(w.contextual_layers))
            terms["contextual"] = w.contextual * losses.contextual_style_loss(
                produced,
                exemplar,
                w.contextual_layers,
                w.contextual_weights,
                w.contextual_pool,
                w.contextual_h,
                w.contextual_mode,
                w.contextual_wta,
            )
        terms["loss"] = torch.stack(list(terms.values())).sum()
        return terms

    def _recurrent(self, matches: Matches, terms: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The end-to-end pass: exemplar trajectory (re-warps fed back), GT trajectory (re-warps only for the
        cycle loss), iterative cycle losses (2b) and the diffusion-loss branch (6)."""
        w, model, tau = self.weights, self.model, self.model.config.sampling.tau
        z_y, z_gt = matches.exemplar.latent, matches.ground_truth.latent
        ref = model.interleaved_loop(
            matches.warped, matches.condition, matches.exemplar, torch.randn_like(z_y)
        )
        src = model.interleaved_loop(
            matches.warped_gt,
            matches.condition,
            matches.ground_truth,
            torch.randn_like(z_gt),
            feed_back=False,
        )
        cycles = []
        for result, original in ((ref, z_y), (src, z_gt)):
            for step in result.steps:
                if step.rewarp is not None:
                    back = back_warp(step.rewarp.warped, step.rewarp.query, step.rewarp.key, tau)
                    cycles.append(losses.cycle_consistency_loss(back, original))
        if cycles:
            terms["cycle_iterative"] = w.cycle * torch.stack(cycles).sum()
        position = random.randrange(len(ref.steps))  # k* uniform over the loop positions
        terms["diffusion"] = w.diffusion * diffusion_branch(model, z_gt, position, w.diffusion_space)
        return model.decode(ref.x0), model.decode(src.x0)
