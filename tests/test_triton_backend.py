"""Whole models on the Triton path against the reference path (interpreter on CPU, real kernels on a GPU)."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import hiap
from hiap_kernels import interpreter_active
from tests.helpers import LaunchingOps, randomize_logits

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreter_active()), reason="needs a GPU or the Triton interpreter"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def deit_tiny_sized(img_size: int = 16, patch_size: int = 8) -> VisionTransformer:
    """DeiT-Tiny widths and depth (192 wide, 12 blocks, 3 heads of 64) on a tiny image so the interpreter copes."""
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=192, depth=12, num_heads=3,
                             num_classes=10).to(DEVICE)


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def test_a_training_step_gives_the_same_loss_and_gradients_on_both_paths():
    teacher = deit_tiny_sized().eval()
    cfg = hiap.HiAPConfig(init_logit=0.5)
    gated = hiap.gate_vit(teacher, cfg).train()
    randomize_logits(gated, torch.Generator().manual_seed(0), scale=1.0)
    objective = hiap.HiAPObjective(gated)
    objective.budget.ascending = False  # the same multipliers in both steps (each training call ascends once)
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    targets = torch.tensor([1, 7], device=DEVICE)
    with torch.no_grad():
        teacher_logits = teacher(images)

    def step():
        gated.zero_grad(set_to_none=True)
        gated.gate_step.zero_()  # same step -> same seed -> same gates on both paths
        terms = objective(gated, gated(images), teacher_logits, targets)
        terms.total.backward()
        return terms.total.detach(), _grads(gated)

    loss_reference, grads_reference = step()
    with hiap.use_triton_kernels(gated):
        loss_triton, grads_triton = step()
    assert loss_triton.item() == pytest.approx(loss_reference.item(), rel=1e-4)
    assert grads_triton.keys() == grads_reference.keys()
    for name, expected in grads_reference.items():
        assert _relative_error(grads_triton[name], expected) < 1e-3, name


def test_an_extracted_model_gives_the_same_logits_on_both_paths():
    gated = hiap.gate_vit(deit_tiny_sized(), hiap.HiAPConfig(min_heads=0, min_dim_fraction=0.0))
    randomize_logits(gated, torch.Generator().manual_seed(1))
    pruned = hiap.extract(gated)
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    with torch.no_grad():
        reference = pruned(images)
        with hiap.use_triton_kernels(pruned):
            triton = pruned(images)
    assert _relative_error(triton, reference) < 1e-4


def test_eval_mode_gated_model_matches_on_both_paths():
    gated = hiap.gate_vit(deit_tiny_sized(), hiap.HiAPConfig(dim_group=8)).eval()
    randomize_logits(gated, torch.Generator().manual_seed(2))
    images = torch.randn(2, 3, 16, 16, device=DEVICE)
    with torch.no_grad():
        reference = gated(images)
        with hiap.use_triton_kernels(gated):
            triton = gated(images)
    assert _relative_error(triton, reference) < 1e-4


def test_a_loaded_and_compiled_pruned_model_keeps_working_on_the_triton_path(tmp_path):
    gated = hiap.gate_vit(deit_tiny_sized(), hiap.HiAPConfig(dim_group=8))
    randomize_logits(gated, torch.Generator().manual_seed(3))
    pruned = hiap.extract(gated)
    images = torch.randn(1, 3, 16, 16, device=DEVICE)
    loaded = hiap.load_pruned(hiap.save_pruned(pruned, tmp_path / "pruned.safetensors"), device=DEVICE)
    with torch.no_grad():
        reference = pruned(images)
        with hiap.use_triton_kernels(loaded):
            assert _relative_error(loaded(images), reference) < 1e-4
            compiled = torch.compile(loaded, backend="aot_eager")
            assert _relative_error(compiled(images), reference) < 1e-4


def _launching_ops(model) -> tuple[int, int]:
    """Launching ops of one training-mode forward and its backward."""
    from tests.helpers import images

    x = images(model).to(DEVICE)
    with LaunchingOps() as forward:
        out = model(x)
    with LaunchingOps() as backward:
        out.sum().backward()
    return forward.count, backward.count


def _ops_beyond_dense(depth: int, fixed: bool = False) -> tuple[int, int]:
    """Launching ops of a gated model on the Triton path (structure sampled or fixed), forward and backward, minus
    those of the same dense timm model."""
    from tests.helpers import tiny_vit

    dense = _launching_ops(tiny_vit(depth=depth).to(DEVICE).train())
    gated = hiap.gate_vit(tiny_vit(depth=depth), hiap.HiAPConfig()).to(DEVICE).train()
    randomize_logits(gated, torch.Generator().manual_seed(0))
    hiap.use_triton_kernels(gated)
    for module in gated.gated_modules():  # the masks on the weights (a GPU would otherwise time both paths first)
        module.training_path = "weights"
    if fixed:
        gated.fix_structure()
    ops = _launching_ops(gated)
    return ops[0] - dense[0], ops[1] - dense[1]


def test_on_the_triton_path_a_gated_layer_costs_one_op_forward_and_one_backward():
    """Sampling, masking and the gates' gradients of a layer are one fused op each way (``gated_qkv_weight``,
    ``gated_fc2_weight``), around the GEMMs a dense block runs anyway: two blocks more cost four ops more forward and
    four more backward (the reference path's chain of torch ops: 80 and 52)."""
    shallow, deep = _ops_beyond_dense(2), _ops_beyond_dense(4)
    assert (deep[0] - shallow[0], deep[1] - shallow[1]) == (4, 4)


def test_a_fixed_structure_steps_alike_on_both_paths_with_one_gather_per_weight():
    """Once the structure is fixed, each weight's kept rows or columns are one ``gather_weight`` op each way: the same
    loss and gradients as the reference path's index_select, and two blocks more cost eight ops more forward (qkv,
    proj, fc1 and fc2 of each) and eight more backward."""
    from tests.helpers import images, tiny_vit

    gated = hiap.gate_vit(tiny_vit(depth=2), hiap.HiAPConfig()).to(DEVICE).train()
    randomize_logits(gated, torch.Generator().manual_seed(4))
    gated.fix_structure()
    x = images(gated).to(DEVICE)
    results = []
    for path in ("reference", "triton"):
        gated.zero_grad(set_to_none=True)
        with hiap.use_triton_kernels(gated) if path == "triton" else hiap.use_reference_kernels(gated):
            loss = gated.vit(x).square().mean()
            loss.backward()
        results.append((loss.detach(), _grads(gated)))
    (loss_reference, grads_reference), (loss_triton, grads_triton) = results
    assert torch.equal(loss_triton, loss_reference)
    assert grads_triton.keys() == grads_reference.keys()
    for name, expected in grads_reference.items():
        torch.testing.assert_close(grads_triton[name], expected, rtol=1e-5, atol=1e-6, msg=name)

    shallow, deep = _ops_beyond_dense(2, fixed=True), _ops_beyond_dense(4, fixed=True)
    assert (deep[0] - shallow[0], deep[1] - shallow[1]) == (8, 8)


def test_a_whole_training_step_launches_under_1_35x_a_dense_steps_ops_and_a_fixed_one_under_1_3x():
    """Forward, the HiAP objective, backward and fused AdamW at depth 12 against a dense timm step (CE + KD): the count
    a launch-bound step (DeiT-S at batch 64 on an H100) pays for. Measured: 524 and 513 against 404 (1,483 on the
    reference path)."""
    from hiap.app.train import build_optimizer
    from tests.helpers import images, tiny_vit

    x, targets = images(tiny_vit()).to(DEVICE), torch.tensor([1, 2], device=DEVICE)
    teacher_logits = torch.randn(2, 10, device=DEVICE)

    def launches(step) -> int:
        step()  # the first step also creates the optimizer's state
        with LaunchingOps() as ops:
            step()
        return ops.count

    dense = tiny_vit(depth=12).to(DEVICE).train()
    dense_optimizer = build_optimizer([{"params": list(dense.parameters()), "lr": 1e-4}])

    def dense_step():
        dense_optimizer.zero_grad(set_to_none=True)
        hiap.distillation_loss(dense(x), teacher_logits, targets).backward()
        dense_optimizer.step()

    gated = hiap.gate_vit(tiny_vit(depth=12), hiap.HiAPConfig()).to(DEVICE).train()
    randomize_logits(gated, torch.Generator().manual_seed(0))
    hiap.use_triton_kernels(gated)
    objective = hiap.HiAPObjective(gated).to(DEVICE)
    optimizer = build_optimizer([{"params": list(gated.weight_parameters().values()), "lr": 1e-4},
                                 {"params": list(gated.gate_logits().values()), "lr": 0.05, "weight_decay": 0.0}])

    def hiap_step():
        optimizer.zero_grad(set_to_none=True)
        objective(gated, gated.vit(x), teacher_logits, targets).total.backward()
        optimizer.step()

    dense_ops, sampled_ops = launches(dense_step), launches(hiap_step)
    gated.fix_structure()
    fixed_ops = launches(hiap_step)
    assert sampled_ops < 1.35 * dense_ops and fixed_ops < 1.3 * dense_ops, (dense_ops, sampled_ops, fixed_ops)


@pytest.mark.parametrize("budget", ["target", "penalty"])
def test_the_objective_is_one_op_on_the_triton_path_with_the_reference_paths_terms_gradients_and_multipliers(budget):
    """Three steps of the whole objective on each path: the same terms, logit gradients and multipliers, while the
    Triton path's gate terms are one ``gate_objective`` op."""
    from tests.helpers import images, tiny_vit

    gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig(budget=budget)).to(DEVICE).train()
    randomize_logits(gated, torch.Generator().manual_seed(2))
    x, targets = images(gated).to(DEVICE), torch.tensor([1, 2], device=DEVICE)
    teacher_logits = torch.randn(2, 10, device=DEVICE)
    runs = {}
    for path in ("reference", "triton"):
        objective = hiap.HiAPObjective(gated).to(DEVICE)
        steps = []
        with hiap.use_triton_kernels(gated) if path == "triton" else hiap.use_reference_kernels(gated):
            for _ in range(3):
                gated.zero_grad(set_to_none=True)
                student = gated.vit(x)
                with LaunchingOps() as ops:
                    terms = objective(gated, student, teacher_logits, targets)
                terms.total.backward()
                grads = {name: p.grad.clone() for name, p in gated.gate_logits().items()}
                steps.append((terms.as_floats(), grads, objective.budget.lambda1.clone(),
                              objective.budget.lambda2.clone(), ops.count))
        runs[path] = steps
    for reference, triton in zip(runs["reference"], runs["triton"]):
        for name, value in reference[0].items():
            assert triton[0][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        for name, expected in reference[1].items():
            torch.testing.assert_close(triton[1][name], expected, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(triton[2], reference[2], rtol=1e-12, atol=0)
        torch.testing.assert_close(triton[3], reference[3], rtol=1e-12, atol=0)
        # The task loss (14 ops), the stacking of the logits (6) and the op; the reference's: 87 (penalty), 137.
        assert triton[4] <= 22 < 80 < reference[4], (triton[4], reference[4])


def test_each_gated_layer_runs_the_training_path_that_measures_faster_and_both_draw_the_same_gates():
    """The fused gated GEMMs (gated_qkv, gated_fc1) against the masks on the weights: the choice follows the timings
    (injected here; a GPU times both at a layer's first sampling step), and either path gives the same outputs and
    gradients, gates included."""
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10).to(DEVICE)
    gated = hiap.gate_vit(vit, hiap.HiAPConfig(init_logit=0.5)).train()
    randomize_logits(gated, torch.Generator().manual_seed(3), scale=1.0)
    attn, mlp = gated.vit.blocks[0].attn, gated.vit.blocks[0].mlp
    x = torch.randn(2, 5, 32, device=DEVICE)

    def outputs(module):
        for p in module.parameters():
            p.grad = None
        probe = x.clone().requires_grad_(True)
        out = module(probe)
        out.square().sum().backward()
        return out.detach(), probe.grad, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    # The reference backend has no fused op: the masks on the weights, untimed.
    assert attn.choose_training_path(x, timer=lambda run: pytest.fail("timed without a fused op")) == "weights"
    with hiap.use_triton_kernels(gated):
        for module in (attn, mlp):
            module.training_path = None
            module(x)  # unchosen: the masks on the weights, and a forward does not choose (a compiled graph stays)
            assert module.training_path is None
            calls = iter([3.0, 1.0])  # the weights' path timed first, then the fused op
            assert module.choose_training_path(x, timer=lambda run: (run(), next(calls))[1]) == "fused"
            assert module.training_path_times == {"weights": 3.0, "fused": 1.0}
            fused = outputs(module)
            calls = iter([1.0, 3.0])
            assert module.choose_training_path(x, timer=lambda run: (run(), next(calls))[1]) == "weights"
            weights = outputs(module)
            assert _relative_error(fused[0], weights[0]) < 1e-4 and _relative_error(fused[1], weights[1]) < 1e-4
            assert fused[2].keys() == weights[2].keys()
            for name, grad in weights[2].items():
                assert _relative_error(fused[2][name], grad) < 1e-3, name
    # The model times every layer on its own input, the gate step unmoved; a pruner does it once, on a GPU only.
    step = int(gated.gate_step)
    with hiap.use_triton_kernels(gated):
        order = iter([2.0, 1.0, 1.0, 2.0])  # attention: fused faster; FFN: the weights faster
        chosen = gated.choose_training_paths(torch.randn(2, 3, 16, 16, device=DEVICE),
                                             timer=lambda run: (run(), next(order))[1])
    assert chosen == {"blocks.0.attn": "fused", "blocks.0.mlp": "weights"} and int(gated.gate_step) == step
    if DEVICE == "cpu":  # the interpreter's timings say nothing of speed: the weights, untimed
        pruner = hiap.Pruner(vit, hiap.HiAPConfig(), total_steps=4)
        assert set(pruner.choose_training_paths(torch.randn(2, 3, 16, 16)).values()) == {"weights"}
