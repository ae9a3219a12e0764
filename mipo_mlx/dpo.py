"""DPO losses and TRL-named metrics, as pure functions of summed answer log-probs.

    losses, chosen_rewards, rejected_rewards = dpo_losses(pc, pr, rc, rr, beta=0.1)

pc/pr are the policy's log p(chosen|x) and log p(rejected|x), rc/rr the reference's,
all (B,). The implicit rewards are beta * (policy - reference). Loss types follow TRL:
- sigmoid: -log sigmoid(beta * h), with h = (pc - rc) - (pr - rr); label smoothing mixes
  in the flipped label (cDPO);
- robust: the unbiased version of label-smoothed sigmoid (Chowdhury et al.);
- hinge: relu(1 - beta * h);
- ipo: (h - 1 / (2 beta))^2 on per-token average log-probs (pass token counts).

`dpop_lambda` > 0 is DPO-Positive (Smaug, Pal et al. 2024, eq. 3): h - lambda * max(0,
rc - pc) inside the loss, so that the chosen answer's log-prob cannot fall below the
reference's without cost (plain DPO lets both log-probs fall: likelihood displacement).
mlx-lm-lora's `dpop` adds the penalty outside the sigmoid instead; this is the paper's form.

With k negatives per prompt, `infonce_losses` scores the chosen answer against all k at
once: -log softmax over the k + 1 implicit rewards, at the chosen one (the InfoNCE form,
whose optimum is also the PMI reward; its loss at policy == reference is ln(k + 1)).
"""

import mlx.core as mx
import mlx.nn as nn

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")  # pairwise; "infonce" takes k negatives at once


def dpo_losses(pc, pr, rc, rr, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
               chosen_tokens=None, rejected_tokens=None, dpop_lambda: float = 0.0):
    """Per-pair losses (B,) and the chosen/rejected implicit rewards (B,)."""
    if loss_type == "ipo":
        # IPO works on average per-token log-probs, as in TRL.
        pc, rc = pc / chosen_tokens, rc / chosen_tokens
        pr, rr = pr / rejected_tokens, rr / rejected_tokens
    h = (pc - rc) - (pr - rr)  # (B,)
    if dpop_lambda:
        h = h - dpop_lambda * mx.maximum(rc - pc, 0.0)
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


def infonce_losses(pc, pn, rc, rn, beta: float):
    """Per-prompt losses (B,), chosen rewards (B,) and negative rewards (B, k): pc/rc (B,), pn/rn (B, k)."""
    chosen_rewards, negative_rewards = beta * (pc - rc), beta * (pn - rn)
    rewards = mx.concatenate([chosen_rewards[:, None], negative_rewards], axis=1)  # (B, k + 1), the chosen first
    return mx.logsumexp(rewards, axis=1) - chosen_rewards, chosen_rewards, negative_rewards


def initial_loss(beta: float, loss_type: str, label_smoothing: float, negatives: int = 1) -> float:
    """The loss when policy == reference (every reward 0): ln 2 for sigmoid and robust, ln(k + 1) for InfoNCE."""
    zero = mx.zeros((1,))
    if loss_type == "infonce":
        return infonce_losses(zero, mx.zeros((1, negatives)), zero, mx.zeros((1, negatives)), beta)[0].item()
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
