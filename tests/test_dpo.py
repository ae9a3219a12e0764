"""DPO losses and metrics against an independent numpy computation of the formulas.

    .venv/bin/python -m pytest tests/test_dpo.py -q
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from mipo_mlx.dpo import LOSS_TYPES, dpo_losses, dpo_metrics, infonce_losses, initial_loss


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def numpy_dpo(pc, pr, rc, rr, beta, loss_type, smoothing, nc, nr):
    """The DPO family as written in the papers and TRL: per-pair losses and implicit rewards."""
    if loss_type == "ipo":
        pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
    h = (pc - rc) - (pr - rr)
    losses = {
        "sigmoid": -log_sigmoid(beta * h) * (1 - smoothing) - log_sigmoid(-beta * h) * smoothing,
        "robust": (-log_sigmoid(beta * h) * (1 - smoothing) + log_sigmoid(-beta * h) * smoothing) / (1 - 2 * smoothing),
        "hinge": np.maximum(0, 1 - beta * h),
        "ipo": (h - 1 / (2 * beta)) ** 2,
    }[loss_type]
    return losses, beta * (pc - rc), beta * (pr - rr)


def random_logps(n=16, seed=0):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.normal(-30, 5, n) for _ in range(4))
    nc, nr = rng.integers(5, 40, n).astype(float), rng.integers(5, 40, n).astype(float)
    return pc, pr, rc, rr, nc, nr


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize(
    "loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]
)
def test_losses_and_rewards_match_numpy(loss_type, smoothing, beta):
    pc, pr, rc, rr, nc, nr = random_logps()
    ours = dpo_losses(*(mx.array(v) for v in (pc, pr, rc, rr)), beta, loss_type, smoothing, mx.array(nc), mx.array(nr))
    expected = numpy_dpo(pc, pr, rc, rr, beta, loss_type, smoothing, nc, nr)
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


def test_metrics_use_trl_names_and_per_pair_accuracy():
    pc, pr, rc, rr, nc, nr = random_logps(seed=1)
    losses, chosen, rejected = dpo_losses(*(mx.array(v) for v in (pc, pr, rc, rr)), 0.1)
    _, want_chosen, want_rejected = numpy_dpo(pc, pr, rc, rr, 0.1, "sigmoid", 0.0, nc, nr)
    metrics = {k: v.item() for k, v in dpo_metrics(losses, chosen, rejected, mx.array(pc), mx.array(pr)).items()}
    assert set(metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                            "logps/chosen", "logps/rejected"}
    assert metrics["rewards/chosen"] == pytest.approx(want_chosen.mean(), abs=1e-4)
    assert metrics["rewards/rejected"] == pytest.approx(want_rejected.mean(), abs=1e-4)
    assert metrics["rewards/margins"] == pytest.approx((want_chosen - want_rejected).mean(), abs=1e-4)
    assert metrics["rewards/accuracies"] == pytest.approx((want_chosen > want_rejected).mean())
    assert metrics["logps/chosen"] == pytest.approx(pc.mean(), abs=1e-3)
    assert metrics["logps/rejected"] == pytest.approx(pr.mean(), abs=1e-3)


def test_accuracy_counts_pairs_not_the_sign_of_batch_means():
    # One pair wins by a lot, three lose by a little: the batch means say "won", the pairs say 1 in 4.
    zero = mx.zeros((4,))
    pc = mx.array([40.0, -1.0, -1.0, -1.0])
    losses, chosen, rejected = dpo_losses(pc, zero, zero, zero, 0.1)
    metrics = dpo_metrics(losses, chosen, rejected, pc, zero)
    assert metrics["rewards/margins"].item() > 0
    assert metrics["rewards/accuracies"].item() == pytest.approx(0.25)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_initial_loss_is_the_loss_at_policy_equal_to_reference(loss_type):
    beta, smoothing = 0.2, 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    expected = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": 1 / (2 * beta) ** 2}[loss_type]
    assert initial_loss(beta, loss_type, smoothing) == pytest.approx(expected, rel=1e-6)
    logps = mx.array([-12.0, -40.0])
    losses, chosen, rejected = dpo_losses(logps, logps - 3, logps, logps - 3, beta, loss_type, smoothing,
                                          mx.array([4.0, 9.0]), mx.array([5.0, 7.0]))
    np.testing.assert_allclose(np.array(losses), expected, rtol=1e-6)
    assert np.array(chosen).tolist() == [0.0, 0.0] and np.array(rejected).tolist() == [0.0, 0.0]


def test_robust_without_smoothing_is_sigmoid():
    pc, pr, rc, rr, _, _ = (mx.array(v) for v in random_logps(seed=2))
    sigmoid, _, _ = dpo_losses(pc, pr, rc, rr, 0.1, "sigmoid")
    robust, _, _ = dpo_losses(pc, pr, rc, rr, 0.1, "robust")
    np.testing.assert_allclose(np.array(robust), np.array(sigmoid), rtol=1e-6)


def test_label_smoothing_pushes_a_pair_far_ahead_back_towards_the_middle():
    def grad_at(h, loss_type):
        loss = lambda x: dpo_losses(x, mx.zeros((1,)), mx.zeros((1,)), mx.zeros((1,)), 1.0, loss_type, 0.2)[0].sum()
        return mx.grad(loss)(mx.array([h])).item()

    assert grad_at(20.0, "sigmoid") > 0 > grad_at(-20.0, "sigmoid")


def test_unknown_loss_type_is_refused():
    zero = mx.zeros((1,))
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        dpo_losses(zero, zero, zero, zero, 0.1, "kto")


def test_dpop_penalizes_a_chosen_answer_that_falls_below_the_reference_inside_the_sigmoid():
    pc, pr, rc, rr, _, _ = random_logps(seed=3)
    beta, lam = 0.1, 5.0
    losses, chosen, rejected = dpo_losses(*(mx.array(v) for v in (pc, pr, rc, rr)), beta, dpop_lambda=lam)
    h = (pc - rc) - (pr - rr) - lam * np.maximum(0.0, rc - pc)  # Smaug, eq. 3
    np.testing.assert_allclose(np.array(losses), -log_sigmoid(beta * h), rtol=1e-5)
    np.testing.assert_allclose(np.array(chosen), beta * (pc - rc), rtol=1e-5)
    # The same margin costs more when the chosen answer lost likelihood than when it gained it.
    zero, margin = mx.zeros((1,)), mx.array([5.0])
    fell = dpo_losses(zero, -margin - 5.0, margin, zero, beta, dpop_lambda=lam)[0].item()  # pc 5 below rc
    rose = dpo_losses(margin, zero, zero, zero, beta, dpop_lambda=lam)[0].item()
    assert fell > rose == pytest.approx(dpo_losses(margin, zero, zero, zero, beta)[0].item())


@pytest.mark.parametrize("k", [1, 3])
def test_infonce_is_minus_log_softmax_at_the_chosen_answer_and_ln_k_plus_1_at_the_start(k):
    rng = np.random.default_rng(k)
    pc, rc = rng.normal(-30, 5, 8), rng.normal(-30, 5, 8)
    pn, rn = rng.normal(-30, 5, (8, k)), rng.normal(-30, 5, (8, k))
    beta = 0.1
    losses, chosen, negatives = infonce_losses(*(mx.array(v) for v in (pc, pn, rc, rn)), beta)
    rewards = np.concatenate([beta * (pc - rc)[:, None], beta * (pn - rn)], axis=1)
    expected = np.logaddexp.reduce(rewards, axis=1) - rewards[:, 0]
    np.testing.assert_allclose(np.array(losses), expected, rtol=1e-5)
    assert np.array(negatives).shape == (8, k)
    assert initial_loss(beta, "infonce", 0.0, negatives=k) == pytest.approx(math.log(k + 1), rel=1e-6)
    if k == 1:  # with one negative it is sigmoid DPO
        sigmoid, _, _ = dpo_losses(*(mx.array(v) for v in (pc, pn[:, 0], rc, rn[:, 0])), beta)
        np.testing.assert_allclose(np.array(losses), np.array(sigmoid), rtol=1e-5)
