import pytest
import torch
import torch.nn.functional as F

import hiap
from hiap.method.cost import expected_cost
from hiap.method.losses import BudgetLoss, feasibility_loss
from tests.helpers import images, tiny_vit


def test_distillation_loss_matches_its_formula():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    targets = torch.tensor([1, 2, 3, 4])
    alpha, temperature = 0.7, 4.0
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean")
    expected = (1 - alpha) * F.cross_entropy(student, targets) + alpha * temperature**2 * kl
    assert hiap.distillation_loss(student, teacher, targets, alpha, temperature).item() == pytest.approx(expected.item(), rel=1e-5)
    assert hiap.distillation_loss(student, None, targets).item() == pytest.approx(F.cross_entropy(student, targets).item())


def test_penalty_mode_weights_macro_and_micro_terms():
    cfg = hiap.HiAPConfig(budget="penalty", lambda_macro=0.9, lambda_micro=0.45)
    gated = hiap.gate_vit(tiny_vit(), cfg)
    cost = expected_cost(gated)
    terms = BudgetLoss(cfg)(cost)
    macro = cost.macro / cost.dense
    micro = (cost.total - cost.static) / cost.dense
    assert terms["budget"].item() == pytest.approx((0.9 * macro + 0.45 * micro).item(), rel=1e-6)
    terms["budget"].backward()
    assert all((p.grad > 0).all() for p in gated.gate_logits().values())  # the penalty pushes every gate shut


def test_target_mode_multipliers_ascend_and_pull_the_cost_toward_the_target():
    cfg = hiap.HiAPConfig(budget="target", target=0.5, lagrangian_lr=0.1)
    gated = hiap.gate_vit(tiny_vit(), cfg)
    budget = BudgetLoss(cfg)
    optimizer = torch.optim.Adam([{"params": list(gated.gate_logits().values()), "lr": 0.1},
                                  {"params": budget.lagrangian_parameters(), "lr": cfg.lagrangian_lr}])
    fractions = []
    for _ in range(300):
        optimizer.zero_grad()
        terms = budget(expected_cost(gated))
        terms["budget"].backward()
        optimizer.step()
        fractions.append(terms["expected_fraction"].item())
    assert budget.lambda2.item() > 1.0  # ascent: the quadratic multiplier only grows
    assert fractions[0] > 0.9 and abs(fractions[-1] - 0.5) < 0.01


def test_feasibility_penalty_is_zero_when_layers_are_well_above_the_minimums_and_grows_below():
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(init_logit=4.0))
    assert feasibility_loss(gated).item() == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        for logit in gated.gate_logits().values():
            logit.fill_(-6.0)
    penalty = feasibility_loss(gated)
    assert penalty.item() > 0.5
    penalty.backward()
    assert (gated.vit.blocks[0].attn.gates.head.grad < 0).all()  # pushes heads back open


def test_objective_combines_every_term_and_rejects_unreachable_targets():
    teacher = tiny_vit()
    gated = hiap.gate_vit(teacher, hiap.HiAPConfig(target=0.6)).train()
    objective = hiap.HiAPObjective(gated)
    x, y = images(gated), torch.tensor([1, 2])
    terms = objective(gated, gated(x), teacher(x), y)
    assert terms.total.requires_grad
    assert set(terms.as_floats()) == {"total", "task", "budget", "feasibility", "expected_fraction"}
    with pytest.raises(ValueError, match="below"):
        hiap.HiAPObjective(hiap.gate_vit(teacher, hiap.HiAPConfig(target=0.01, min_heads=3, min_dim_fraction=1.0)))
