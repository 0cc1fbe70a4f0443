"""The gate logits' optimizer: Adam on gradients per MAC, with one second moment for every gate of the model.

Plain Adam normalises each logit by its own gradient history, so every gate moves at about its learning rate whatever
it costs: a gate whose gradient is steady (the budget's push on a costly FFN neuron group) outruns one whose task
gradient is noisy (a q/k group), and the budget is met by whatever moves fastest, not by what matters least per MAC.
Here each gradient is first divided by the MACs its gate controls, and all gates share one second moment, so a gate
moves in proportion to its importance per MAC against the budget's price per MAC: the search closes the least
important MACs first, and a head or FFN block closes whole only when its units are unimportant on average.
"""

from __future__ import annotations

import torch

__all__ = ["CostAwareAdam"]


class CostAwareAdam(torch.optim.Optimizer):
    """Adam over groups of gate logits, each group with the MACs one of its gates controls (``cost``).

    ``m_i = b1 m_i + (1 - b1) g_i / c_i``, ``v = b2 v + (1 - b2) mean_j (g_j / c_j)^2`` over every logit of every group,
    ``a_i -= lr m_i_hat / (sqrt(v_hat) + eps)``. Costs are rescaled by their mean so the typical gate still moves by
    about ``lr`` per step. No host synchronisation: a handful of device ops per step.
    """

    def __init__(self, groups: list[dict], lr: float = 0.05, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        for group in groups:
            if "cost" not in group or not group["cost"] > 0:
                raise ValueError("every group of CostAwareAdam needs the positive MACs of one of its gates as 'cost'")
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps))
        counts = [sum(p.numel() for p in g["params"]) for g in self.param_groups]
        mean_cost = sum(g["cost"] * n for g, n in zip(self.param_groups, counts)) / max(1, sum(counts))
        for group in self.param_groups:
            group["scale"] = mean_cost / group["cost"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        first = self.param_groups[0]["params"][0]
        shared = self.state[first]
        if "second_moment" not in shared:
            shared["second_moment"] = torch.zeros((), dtype=torch.float32, device=first.device)
            shared["step"] = torch.zeros((), dtype=torch.float32, device=first.device)
        beta1, beta2 = self.param_groups[0]["betas"]
        scaled = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    scaled.append((p, p.grad.float() * group["scale"], group))
        count = sum(g.numel() for _, g, _ in scaled)
        mean_square = torch.stack([g.square().sum() for _, g, _ in scaled]).sum() / count
        shared["step"].add_(1)
        shared["second_moment"].mul_(beta2).add_(mean_square, alpha=1 - beta2)
        # Bias corrections as Adam's, from the device step count (no host read).
        correction1 = 1 - beta1 ** shared["step"]
        correction2 = 1 - beta2 ** shared["step"]
        denominator = (shared["second_moment"] / correction2).sqrt()
        for p, gradient, group in scaled:
            state = self.state[p]
            if "first_moment" not in state:
                state["first_moment"] = torch.zeros_like(p, dtype=torch.float32)
            state["first_moment"].mul_(beta1).add_(gradient, alpha=1 - beta1)
            update = state["first_moment"] / correction1 / (denominator + group["eps"])
            p.sub_((group["lr"] * update).to(p.dtype))
        return loss
