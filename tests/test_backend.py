import warnings

import pytest
import torch

import hiap
import hiap.backend as backend
from tests.helpers import images, tiny_vit


@pytest.fixture
def kernels_available(monkeypatch):
    real_can_run = backend.load_triton_op("can_run_triton")
    fake_ops = {"can_run_triton": real_can_run}
    monkeypatch.setattr(backend, "load_triton_op", lambda name: fake_ops.get(name, lambda *a, **k: None))


@pytest.fixture
def kernels_missing(monkeypatch):
    def missing(name):
        raise ImportError(f"no module named triton (asked for {name})")

    monkeypatch.setattr(backend, "load_triton_op", missing)


def test_default_backend_is_the_reference():
    assert hiap.kernels_in_use() == "reference"


def test_global_switch_works_as_setter_and_context_manager(kernels_available):
    with hiap.use_triton_kernels():
        assert hiap.kernels_in_use() == "triton"
        with hiap.use_reference_kernels():
            assert hiap.kernels_in_use() == "reference"
        assert hiap.kernels_in_use() == "triton"
    assert hiap.kernels_in_use() == "reference"
    hiap.use_triton_kernels()
    try:
        assert hiap.kernels_in_use() == "triton"
    finally:
        hiap.use_reference_kernels()


def test_switching_one_model_keeps_its_parameters_and_state_dict_keys(kernels_available):
    gated = hiap.gate_vit(tiny_vit())
    other = hiap.gate_vit(tiny_vit())
    keys = list(gated.state_dict())
    params = [id(p) for p in gated.parameters()]
    with hiap.use_triton_kernels(gated):
        assert hiap.kernels_in_use(gated) == "triton"
        assert hiap.kernels_in_use(other) == "reference" and hiap.kernels_in_use() == "reference"
        assert list(gated.state_dict()) == keys and [id(p) for p in gated.parameters()] == params
    assert hiap.kernels_in_use(gated) == "reference"


def test_asking_for_missing_kernels_raises_a_clear_error(kernels_missing):
    with pytest.raises(RuntimeError, match="Triton kernels are not available for: .*GatedAttention"):
        hiap.use_triton_kernels()
    with pytest.raises(RuntimeError, match="PrunedAttention"):
        hiap.use_triton_kernels(hiap.extract(hiap.gate_vit(tiny_vit())))
    assert hiap.kernels_in_use() == "reference"


def test_switch_needs_a_hiap_model():
    with pytest.raises(ValueError, match="no HiAP modules"):
        hiap.use_reference_kernels(tiny_vit())


def test_cpu_tensors_without_the_interpreter_fall_back_with_one_warning(kernels_available, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backend, "_warned_fallback", False)
    gated = hiap.gate_vit(tiny_vit()).eval()
    x = images(gated)
    reference = gated(x)
    with hiap.use_triton_kernels(gated):
        with pytest.warns(RuntimeWarning, match="reference path"):
            out = gated(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gated(x)
    assert torch.equal(out, reference)


def test_bad_backend_names():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        backend._check_backend("cuda")


def test_every_module_with_a_triton_path_names_an_op_of_hiap_kernels():
    import hiap_kernels

    kinds = backend._known_kinds(backend.KernelBackendMixin)
    assert {kind.__name__ for kind in kinds} == {"GatedAttention", "GatedMlp", "PrunedAttention", "PrunedMlp"}
    assert all(kind.triton_op in hiap_kernels.__all__ for kind in kinds)


def test_the_backend_switch_and_the_config_are_leaves():
    import ast
    import inspect

    import hiap.config

    for module in (backend, hiap.config):
        tree = ast.parse(inspect.getsource(module))
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        assert imported <= {"__future__", "torch", "contextlib", "dataclasses", "importlib", "math", "os",
                            "typing", "warnings"}, (module.__name__, imported)


needs_triton = pytest.mark.skipif(not backend.triton_runs_on("cpu") and not torch.cuda.is_available(),
                                  reason="needs Triton (the interpreter on a CPU)")


@needs_triton
def test_a_module_decides_its_kernels_when_switched_and_a_forward_only_reads_them(monkeypatch):
    """The switch resolves every op of a module's table once; a forward looks nothing up (here, a lookup would
    raise), and the table's ops are those hiap_kernels exports."""
    import hiap_kernels

    gated = hiap.gate_vit(tiny_vit()).eval()
    hiap.use_triton_kernels(gated)
    for module in backend.backend_modules(gated):
        assert module.kernels == {name: getattr(hiap_kernels, name) for name in module.kernel_names}

    def no_lookup(name):
        raise AssertionError(f"looked up {name} in a forward")

    monkeypatch.setattr(backend, "load_triton_op", no_lookup)
    with torch.no_grad():
        gated(images(gated))


@needs_triton
def test_a_module_decides_again_when_moved(monkeypatch):
    """Switched where Triton does not run, a model takes the PyTorch path; moved (or cast) where it runs, it takes
    the kernels then, with no second switch."""
    gated = hiap.gate_vit(tiny_vit())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(backend, "_warned_fallback", True)
    hiap.use_triton_kernels(gated)
    assert hiap.kernels_in_use(gated) == "reference"
    assert all(kernel is None for m in backend.backend_modules(gated) for kernel in m.kernels.values())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gated.float()
    assert hiap.kernels_in_use(gated) == "triton"


@needs_triton
def test_the_default_backend_is_read_when_a_module_is_built():
    """As timm reads its fused-attention default in a module's __init__: the default switched without a model applies
    to the models built afterwards, not to one built before."""
    before = hiap.gate_vit(tiny_vit())
    with hiap.use_triton_kernels():
        during = hiap.gate_vit(tiny_vit())
        pruned = hiap.extract(hiap.gate_vit(tiny_vit()).eval())
    after = hiap.gate_vit(tiny_vit())
    assert hiap.kernels_in_use(before) == hiap.kernels_in_use(after) == "reference"
    assert hiap.kernels_in_use(during) == hiap.kernels_in_use(pruned) == "triton"


def test_resolve_kernels_is_the_one_dispatch(kernels_missing):
    """On the reference backend it imports nothing and names no op; on the Triton backend a missing op is one error."""
    assert backend.resolve_kernels(("ragged_attention",), "reference", "cpu") == {"ragged_attention": None}
    with pytest.raises(ValueError, match="unknown kernel backend"):
        backend.resolve_kernels(("ragged_attention",), "cuda", "cpu")
    assert not backend.triton_runs_on("cpu")  # can_run_triton itself is missing here
    assert backend.resolve_kernels(("ragged_attention",), "triton", "cpu") == {"ragged_attention": None}


def test_token_reduction_on_a_timm_model_decides_its_ops_when_patched():
    """A timm attention has no table of its own: the patched block resolves the steps' ops from the default in force
    when it was patched, once per device."""
    model = hiap.reduce_tokens(tiny_vit(depth=2), "m2,m2")
    plan = model.blocks[0].hiap_token_plan
    assert plan.backend == "reference" and list(plan.kernels) == [torch.device("cpu")]
    assert set(plan.kernels[torch.device("cpu")].values()) == {None}
