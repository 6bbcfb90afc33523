"""
A sweep's plan: every run of loss type x parameter values x alpha x learning rate x seed, each with
its folder name and the train_net.py opts that select it (tools/sweep.py runs them).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

from ..modeling.losses import ALPHA, LOSS_TYPES

__all__ = ["SweepRun", "plan_sweep"]


@dataclass(frozen=True)
class SweepRun:
    loss_type: str
    params: Tuple[Tuple[str, float], ...]  # (name, value) of the loss parameters it sets
    seed: int
    alpha: Optional[float] = None  # None: the config's
    base_lr: Optional[float] = None  # None: the config's SOLVER.BASE_LR

    @property
    def name(self):
        """'flstar_g0.25_s0', 'ce_a0.75_s1', 'fl_g2_a0.25_s1_lr0.02': the type, the parameters it
        sets, alpha, seed, and the learning rate where the sweep sets one (after the seed, as
        the result folders of docs/results/proxy80_levers/ were named)."""
        entry = LOSS_TYPES[self.loss_type]
        parts = [self.loss_type.lower()] + [f"{entry.param(n).short}{v:g}" for n, v in self.params]
        parts += [f"a{self.alpha:g}"] if self.alpha is not None else []
        parts += [f"s{self.seed}"]
        parts += [f"lr{self.base_lr:g}"] if self.base_lr is not None else []
        return "_".join(parts)

    def opts(self, node="MODEL.RETINANET"):
        """train_net.py opts that select this run's loss, parameters, alpha and seed; ``node`` is
        the config node of the config's detector (d2_focalstar.modeling.loss_config_node)."""
        entry = LOSS_TYPES[self.loss_type]
        opts = ["MODEL.FOCALSTAR.LOSS_TYPE", self.loss_type, "SEED", str(self.seed)]
        for name, value in self.params:
            opts += [entry.param(name).config_key(node), str(float(value))]
        if self.alpha is not None:
            opts += [ALPHA.config_key(node), str(float(self.alpha))]
        if self.base_lr is not None:
            opts += ["SOLVER.BASE_LR", str(float(self.base_lr))]
        return opts


def plan_sweep(loss_types, seeds, values=None, alphas=None, base_lrs=None):
    """
    Every run of loss type x parameter values x alpha x learning rate x seed.

    Args:
        loss_types: names of the loss table.
        seeds: the seeds of every setting.
        values: {(loss type, parameter name): values} to try. Without it, a type tries its
            table entry's ``sweep`` values (FL*: the proposal's gammas), else its first
            parameter's default (FL: g = 2); its other parameters keep the config's value.
        alphas: alphas to try for every type (None: the config's alpha).
        base_lrs: learning rates (SOLVER.BASE_LR) to try for every setting (None: the
            config's). Losses differ in their best rate (on the proxy CE's is 0.005, FL g=2's
            0.02), so a comparison at one shared rate can favour one loss.
    """
    values = {(t.upper(), n): v for (t, n), v in (values or {}).items()}
    runs = []
    for loss_type in (t.upper() for t in loss_types):
        entry = LOSS_TYPES[loss_type]
        grid = [()]
        for i, param in enumerate(entry.params):
            tried = values.get((loss_type, param.name))
            if tried is None and i == 0:
                tried = entry.sweep.get(param.name, (param.default,))
            if tried is not None:
                grid = [g + ((param.name, float(v)),) for g in grid for v in tried]
        runs += [
            SweepRun(
                loss_type,
                g,
                int(s),
                None if a is None else float(a),
                None if lr is None else float(lr),
            )
            for a in (alphas or [None])
            for g in grid
            for lr in (base_lrs or [None])
            for s in seeds
        ]
    return runs
