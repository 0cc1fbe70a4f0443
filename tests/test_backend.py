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
