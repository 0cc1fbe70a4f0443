import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch

import hiap
from hiap.method.cost import expected_cost
from hiap.method.losses import BudgetLoss, feasibility_loss
from tests.helpers import images, randomize_logits, tiny_vit


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
    cfg = hiap.HiAPConfig(budget="target", target=0.5)
    gated = hiap.gate_vit(tiny_vit(), cfg)
    budget = BudgetLoss(cfg)
    optimizer = torch.optim.Adam(list(gated.gate_logits().values()), lr=0.1)
    fractions, lambda1 = [], []
    for _ in range(300):
        optimizer.zero_grad()
        terms = budget(expected_cost(gated))
        terms["budget"].backward()
        optimizer.step()
        fractions.append(terms["expected_fraction"].item())
        lambda1.append(budget.lambda1.item())
    # Plain ascent: l1 grows by lagrangian_lr * gap while the cost is above the target, l2 by lagrangian_lr * gap^2.
    assert lambda1[0] == pytest.approx(cfg.lagrangian_lr * (fractions[0] - 0.5), rel=1e-6)
    assert budget.lambda2.item() > cfg.gap_weight
    assert fractions[0] > 0.9 and abs(fractions[-1] - 0.5) < 0.01


def test_the_ascent_stops_outside_training_and_when_the_owner_stops_it():
    cfg = hiap.HiAPConfig(budget="target", target=0.5)
    gated = hiap.gate_vit(tiny_vit(), cfg)
    budget = BudgetLoss(cfg)
    with torch.no_grad():
        budget(expected_cost(gated))
    budget.eval()(expected_cost(gated))
    budget.train().ascending = False
    budget(expected_cost(gated))
    assert budget.lambda1.item() == 0.0 and budget.lambda2.item() == cfg.gap_weight
    budget.set_target(1.0)  # a ramped target: the gap is measured against it
    budget.ascending = True
    terms = budget(expected_cost(gated))
    assert budget.lambda1.item() == pytest.approx(terms["expected_fraction"].item() - 1.0, rel=1e-6)


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


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten ops; ``syncs`` are those that make the host wait for the device."""

    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero"}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        if func._schema.name in self.SYNCING:
            self.syncs.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _on_backend(gated, backend: str):
    """Route ``gated`` through ``backend``; skip the Triton one where it cannot run."""
    from hiap_kernels import interpreter_active

    if backend == "triton":
        if not (torch.cuda.is_available() or interpreter_active()):
            pytest.skip("needs a GPU or the Triton interpreter")
        hiap.use_triton_kernels(gated)
    return gated


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("budget", ["target", "penalty"])
def test_the_objective_is_the_same_handful_of_ops_at_any_depth(budget, backend):
    """Expected cost, decided MACs, feasibility and the budget: a fixed number of ops (the layers' logits are stacked
    once per kind; on the Triton path one op computes the rest). Only the backward's hand-over of each layer's gradient to its own logit parameters scales with
    depth: two ops per parameter, as for every other parameter of the model."""
    counts = {}
    for depth in (4, 12):
        gated = _on_backend(hiap.gate_vit(tiny_vit(depth=depth), hiap.HiAPConfig(budget=budget)).train(), backend)
        randomize_logits(gated, torch.Generator().manual_seed(0))
        objective = hiap.HiAPObjective(gated)
        logits, teacher = torch.randn(2, 10), torch.randn(2, 10)
        targets = torch.tensor([1, 2])
        with _AtenOps() as forward:
            terms = objective(gated, logits, teacher, targets)
        with _AtenOps() as backward:
            terms.total.backward()
        counts[depth] = (forward.count, backward.count)
        assert forward.syncs == [] and backward.syncs == []
    assert counts[4][0] == counts[12][0], counts
    assert counts[12][1] - counts[4][1] == 2 * 5 * (12 - 4), counts


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_training_step_never_waits_for_the_device(backend):
    """Forward, objective, backward and the optimizer step (fused AdamW, as the training loop builds it)."""
    from hiap.app.train import build_optimizer

    teacher = tiny_vit()
    gated = _on_backend(hiap.gate_vit(teacher).train(), backend)
    objective = hiap.HiAPObjective(gated)
    optimizer = build_optimizer([{"params": list(gated.weight_parameters().values()), "lr": 1e-4},
                                 {"params": list(gated.gate_logits().values()), "lr": 0.05}])
    x, targets = images(gated, batch=4), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        teacher_logits = teacher(x)

    def step(tau):
        gated.set_temperature(tau)
        terms = objective(gated, gated(x), teacher_logits, targets)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()

    step(1.0)  # the first step creates the optimizer state
    with _AtenOps() as ops:
        step(0.9)
        step(0.8)
    assert ops.syncs == []


def test_once_the_structure_is_fixed_the_objective_is_the_task_alone_with_zero_logit_gradients():
    """The gate terms are constants of logits that no longer move: the step skips the cost model (a few ops instead of
    ~100 at depth 2) and every logit still gets a gradient, zero, as DDP expects."""
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig()).train()
    randomize_logits(gated, torch.Generator().manual_seed(3))
    objective = hiap.HiAPObjective(gated)
    logits, teacher, targets = torch.randn(2, 10, requires_grad=True), torch.randn(2, 10), torch.tensor([1, 2])
    with _AtenOps() as sampled:
        objective(gated, logits, teacher, targets)
    gated.fix_structure()
    with _AtenOps() as fixed:
        terms = objective(gated, logits, teacher, targets)
    terms.total.backward()
    task = hiap.distillation_loss(logits, teacher, targets, gated.cfg.kd_alpha, gated.cfg.kd_temperature)
    assert terms.total.item() == task.item() and terms.budget.item() == terms.feasibility.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in gated.gate_logits().values())
    assert fixed.count < sampled.count / 3, (fixed.count, sampled.count)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_whole_objective_compiles_into_one_graph_for_a_run_with_a_moving_target(backend):
    """Multipliers that ascend in place and a target lowered every step (device buffers) reuse one graph; on the
    Triton path the gate terms are one custom op inside it."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from hiap_kernels import interpreter_active

    if backend == "triton" and not (torch.cuda.is_available() or interpreter_active()):
        pytest.skip("needs a GPU or the Triton interpreter")
    gated = hiap.gate_vit(tiny_vit(depth=2), hiap.HiAPConfig(budget="target", target=0.6)).train()
    randomize_logits(gated, torch.Generator().manual_seed(3))
    if backend == "triton":
        hiap.use_triton_kernels(gated)
    student, targets = torch.randn(2, 10), torch.tensor([3, 4])
    eager, compiled = hiap.HiAPObjective(gated), hiap.HiAPObjective(gated)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda: compiled(gated, student, None, targets).total, backend="aot_eager", fullgraph=True)
    for target in (0.9, 0.8, 0.7):
        eager.budget.set_target(target)
        compiled.budget.set_target(target)
        expected = eager(gated, student, None, targets).total
        torch.testing.assert_close(step(), expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(compiled.budget.lambda1, eager.budget.lambda1)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
