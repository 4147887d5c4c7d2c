"""Darknet's learning-rate policies (network.c get_current_rate) and its SGD parameter groups."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from torch import nn

POLICIES = {"constant", "step", "steps", "exp", "poly", "random", "sigmoid"}


@dataclass
class Schedule:
    learning_rate: float = 0.001
    policy: str = "constant"
    burn_in: int = 0
    power: float = 4.0
    step: int = 1
    scale: float = 1.0
    steps: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    gamma: float = 1.0
    max_batches: int = 0

    @classmethod
    def from_net(cls, net) -> Schedule:
        """Read the [net] section (detkit.cfg.Section) with darknet's defaults."""
        policy = net.get_str("policy", "constant")
        if policy not in POLICIES:
            raise net.error(f"policy={policy} is not one of {sorted(POLICIES)}", "policy")
        schedule = cls(
            learning_rate=net.get_float("learning_rate", 0.001), policy=policy,
            burn_in=net.get_int("burn_in", 0), power=net.get_float("power", 4.0),
            step=net.get_int("step", 1), scale=net.get_float("scale", 1.0),
            steps=net.get_ints("steps", []), scales=net.get_floats("scales", []),
            gamma=net.get_float("gamma", 1.0), max_batches=net.get_int("max_batches", 0))
        if policy == "steps" and len(schedule.steps) != len(schedule.scales):
            raise net.error("policy=steps needs as many 'scales' as 'steps'", "steps")
        return schedule

    def rate(self, iteration: int) -> float:
        """The learning rate darknet uses for the update after `iteration` batches."""
        lr = self.learning_rate
        if iteration < self.burn_in:
            return lr * (iteration / self.burn_in) ** self.power
        if self.policy == "step":
            return lr * self.scale ** (iteration // self.step)
        if self.policy == "steps":
            for boundary, factor in zip(self.steps, self.scales, strict=True):
                if boundary > iteration:
                    break
                lr *= factor
            return lr
        if self.policy == "exp":
            return lr * self.gamma ** iteration
        if self.policy == "poly":
            return lr * (1 - iteration / max(1, self.max_batches)) ** self.power
        if self.policy == "random":
            return lr * random.random() ** self.power
        if self.policy == "sigmoid":
            return lr / (1 + math.exp(self.gamma * (iteration - self.step)))
        return lr


def parameter_groups(model: nn.Module, decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: darknet decays no biases and no BN scales."""
    decayed, plain = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_weight = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            (decayed if is_weight else plain).append(param)
    return [{"params": decayed, "weight_decay": decay}, {"params": plain, "weight_decay": 0.0}]
