"""Stochastic gradient descent with the Polyak step size, a baseline for Sven.

The Polyak step moves by ``eta = (L - f_star) / ||g||^2`` along ``-g``: the step at which the
linearised loss reaches the target value ``f_star``. On a mini-batch ``L`` and ``g`` are the
batch's mean loss and its gradient, and the step is capped by a maximum learning rate,
because ``||g||`` can be tiny where the loss is not.
"""

from __future__ import annotations

import math

import torch


class PolyakSGD(torch.optim.Optimizer):
    """SGD whose step size is the capped Polyak step ``min((L - f_star) / ||g||^2, lr)``.

    The gradient norm is taken over every parameter of every group, so all groups share one
    Polyak step (with the first group's ``f_star``); each group caps it with its own ``lr``. A
    loss at or below ``f_star`` (or a zero gradient) gives no step.

    Args:
        params: parameters to optimise, or param-group dicts (which may set their own ``lr``).
        lr: the maximum step size (the cap on the Polyak step). Stored as ``group["lr"]`` so
            ``torch.optim.lr_scheduler`` schedules the cap.
        f_star: the loss value the step aims for (a lower bound of the loss; 0 for losses such
            as squared errors and cross-entropy that can reach 0).

    Attributes:
        last_info: after each step, ``loss`` (the closure's value), ``grad_norm_sq`` and
            ``step_size`` (the uncapped Polyak step; each group moved by ``min(step_size, lr)``).

    Example::

        opt = sven_ext.PolyakSGD(model.parameters(), lr=1.0)
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)   # the batch's mean loss
            loss.backward()
            return loss
        opt.step(closure)
    """

    def __init__(self, params, lr: float = 1.0, f_star: float = 0.0):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if isinstance(f_star, bool) or not isinstance(f_star, (int, float)) or not math.isfinite(f_star):
            raise ValueError(f"f_star must be a finite number, got {f_star!r}")
        super().__init__(params, dict(lr=lr, f_star=f_star))
        self.last_info: dict = {}

    @torch.no_grad()
    def step(self, closure):
        """One Polyak step.

        Args:
            closure: callable with no arguments that zeroes the gradients, computes the mean
                loss, calls ``backward()`` on it and returns it (as for ``torch.optim.LBFGS``).

        Returns:
            The loss the closure returned (before the step).
        """
        if closure is None or not callable(closure):
            raise ValueError("PolyakSGD.step needs a closure that returns the loss after calling backward() on it")
        with torch.enable_grad():
            loss = closure()
        value = float(loss.detach())
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # One norm over all parameters, accumulated in float64: ||g||^2 of a nearly fitted
        # batch can underflow float32's precision relative to its terms.
        grad_norm_sq = sum(float(g.double().square().sum()) for g in grads)
        f_star = self.param_groups[0]["f_star"]
        excess = value - f_star
        # A NaN loss fails ``excess > 0`` and gives no step; an infinite ratio is capped below.
        step_size = excess / grad_norm_sq if grad_norm_sq > 0 and excess > 0 else 0.0
        for group in self.param_groups:
            size = min(step_size, group["lr"])
            if size == 0.0:
                continue
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=size)
        self.last_info = {"loss": value, "grad_norm_sq": grad_norm_sq, "step_size": step_size}
        return loss
