"""Dynamic batch loading's update rule (Sheared-LLaMA, arXiv 2310.06694, Algorithm 1): new mixture weights from each
domain's validation loss and its reference.

    delta_i = max(loss_i - reference_i, 0)            how far domain i lags its reference (clipped, as the paper)
    alpha   = softmax(log w + eta * delta)            multiplicative weights: a lagging domain gains exp(eta * delta)
    w'      = (1 - c) * alpha + c / k                 smoothing c over the k sampled domains: none starves

Only the domains the mixture samples (weight > 0) take part; one it does not sample stays at 0. Plain Python floats in
a fixed order, so every rank that applies the rule to the same losses gets the same weights, bit for bit.
"""
from __future__ import annotations

import math
from typing import Mapping


def updated_weights(weights: Mapping[str, float], losses: Mapping[str, float], reference: Mapping[str, float],
                    eta: float, smoothing: float) -> dict[str, float]:
    """The weights after one update, every source of `weights` named (in its order); `losses` and `reference` must
    name every sampled source."""
    sampled = [source for source, weight in weights.items() if weight > 0]
    logits = [math.log(weights[s]) + eta * max(losses[s] - reference[s], 0.0) for s in sampled]
    top = max(logits)  # softmax shifted by its max: exp() of a large lag would overflow
    exps = [math.exp(logit - top) for logit in logits]
    total = sum(exps)
    new = {s: (1 - smoothing) * e / total + smoothing / len(sampled) for s, e in zip(sampled, exps)}
    return {source: new.get(source, 0.0) for source in weights}
