"""DPO losses and TRL-named metrics, as pure functions of summed answer log-probs.

    losses, chosen_rewards, rejected_rewards = dpo_losses(pc, pr, rc, rr, beta=0.1)

pc/pr are the policy's log p(chosen|x) and log p(rejected|x), rc/rr the reference's,
all (B,). The implicit rewards are beta * (policy - reference). Loss types follow TRL:
- sigmoid: -log sigmoid(beta * h), with h = (pc - rc) - (pr - rr); label smoothing mixes
  in the flipped label (cDPO);
- robust: the unbiased version of label-smoothed sigmoid (Chowdhury et al.);
- hinge: relu(1 - beta * h);
- ipo: (h - 1 / (2 beta))^2 on per-token average log-probs (pass token counts).
"""

import mlx.core as mx
import mlx.nn as nn

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def dpo_losses(pc, pr, rc, rr, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
               chosen_tokens=None, rejected_tokens=None):
    """Per-pair losses (B,) and the chosen/rejected implicit rewards (B,)."""
    if loss_type == "ipo":
        # IPO works on average per-token log-probs, as in TRL.
        pc, rc = pc / chosen_tokens, rc / chosen_tokens
        pr, rr = pr / rejected_tokens, rr / rejected_tokens
    h = (pc - rc) - (pr - rr)  # (B,)
    if loss_type == "sigmoid":
        losses = -nn.log_sigmoid(beta * h) * (1 - label_smoothing) - nn.log_sigmoid(-beta * h) * label_smoothing
    elif loss_type == "robust":
        losses = (-nn.log_sigmoid(beta * h) * (1 - label_smoothing) + nn.log_sigmoid(-beta * h) * label_smoothing) / (
            1 - 2 * label_smoothing
        )
    elif loss_type == "hinge":
        losses = nn.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {LOSS_TYPES}")
    return losses, beta * (pc - rc), beta * (pr - rr)


def initial_loss(beta: float, loss_type: str, label_smoothing: float) -> float:
    """The loss when policy == reference (h = 0): ln 2 for sigmoid and robust."""
    zero = mx.zeros((1,))
    losses, _, _ = dpo_losses(zero, zero, zero, zero, beta, loss_type, label_smoothing, mx.ones((1,)), mx.ones((1,)))
    return losses.item()


def dpo_metrics(losses, chosen_rewards, rejected_rewards, pc, pr) -> dict:
    """TRL's metric names; accuracies are per pair (chosen reward > rejected), then averaged."""
    return {
        "loss": losses.mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }
