"""Tolerances for comparing training runs whose float32 sums differ in order.

Two runs of the same maths on different device layouts (8 vs 4 devices, one
vs two processes) reduce float32 partial results in another order; each SGD
step carries the difference on and can amplify it (measured on this project's
2-core CPU machine: 0 to 3e-7 relative in 6 steps at lr 0.01; another machine
of the same kind saw 8e-5). No fixed rtol holds on every machine, and none is
needed to catch what such a comparison is for: a wrong batch, step, data
position or restored state moves a step's loss by as much as two different
batches differ. So the runs are held to a tenth of the smallest relative
change between consecutive steps of the reference run; the exact parts
(restored state, sampled classes, same-layout resumes) are asserted bit for
bit elsewhere.
"""


def batch_change_rtol(losses: dict) -> float:
    """A tenth of the smallest relative loss change between consecutive steps."""
    steps = sorted(losses)
    assert len(steps) >= 2, losses
    return 0.1 * min(abs(losses[b] - losses[a]) / abs(losses[b])
                     for a, b in zip(steps, steps[1:]))
