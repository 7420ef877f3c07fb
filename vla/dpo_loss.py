"""The DPO objective as small pure functions, in TRL v0.7's shape: ``sequence_logps`` -> ``dpo_loss`` ->
``dpo_metrics``, plus ``chosen_shift``, the per-token drift of the chosen trajectories that the collapse guard reads.

``vla.dpo`` feeds them summed log-probs of judged rollout pairs; nothing here knows about models or files.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vla.inputs import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Summed log-probs of the labelled tokens of each row: logits (B, L, V), labels (B, L) -> (B,).

    ``build_inputs``' convention: ``logits[:, t]`` scores ``labels[:, t + 1]``; labels equal to IGNORE_INDEX (-100)
    and positions where ``mask`` (B, L) is false do not count.
    """
    labels = labels[:, 1:]  # (B, L - 1)
    keep = labels != IGNORE_INDEX
    if mask is not None:
        keep = keep & mask[:, 1:].bool()
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L - 1, V)
    picked = logps.gather(2, torch.where(keep, labels, 0).unsqueeze(2)).squeeze(2)  # (B, L - 1)
    return torch.where(keep, picked, 0.0).sum(dim=1)


# z = (log pi_c - log pi_r) - (log ref_c - log ref_r), the policy's log-ratio margin over the reference's
LOSSES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "sigmoid": lambda z, beta: -F.logsigmoid(beta * z),  # DPO (Rafailov et al. 2023)
    "hinge": lambda z, beta: torch.relu(1 - beta * z),  # SLiC (Zhao et al. 2023)
    "ipo": lambda z, beta: (z - 1 / (2 * beta)) ** 2,  # IPO (Azar et al. 2023)
}


def dpo_loss(
    pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
    beta: float, loss_type: str = "sigmoid", dpop_lambda: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-pair losses (P,) and implicit rewards ``beta * (log pi - log ref)`` of chosen and rejected (P,), the
    rewards detached. Inputs are summed log-probs (P,) of the policy and the reference.

    ``dpop_lambda > 0`` is DPO-Positive (Pal et al. 2024, "Smaug"): the margin becomes
    ``z - dpop_lambda * max(0, log ref_c - log pi_c)``, so a pair whose chosen trajectory has become less likely
    than under the reference pays for it, and the loss can no longer fall by lowering both sides (plain DPO's
    failure when chosen and rejected share most of their steps); the paper uses 50.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {sorted(LOSSES)}")
    z = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    if dpop_lambda:
        z = z - dpop_lambda * torch.relu(ref_chosen - pi_chosen)
    chosen_rewards = beta * (pi_chosen - ref_chosen).detach()
    rejected_rewards = beta * (pi_rejected - ref_rejected).detach()
    return LOSSES[loss_type](z, beta), chosen_rewards, rejected_rewards


def dpo_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Means over pairs, named as TRL names them."""
    return {
        "loss": losses.mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
    }


def chosen_shift(pi_chosen: torch.Tensor, ref_chosen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean change, in nats per scored token, of the chosen examples' log-probability against the reference:
    ``mean((log pi_c - log ref_c) / tokens_c)`` over (P,) examples. DPO's collapse shows here first: the margin
    grows while the chosen trajectories become less likely, token by token."""
    return ((pi_chosen - ref_chosen) / tokens.clamp(min=1)).mean()
