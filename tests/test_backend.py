import warnings

import pytest
import torch

import hiap
import hiap.modules as hiap_modules
from tests.helpers import images, tiny_vit


@pytest.fixture
def kernels_available(monkeypatch):
    monkeypatch.setattr(hiap_modules, "_import_ok", lambda name: True)


@pytest.fixture
def kernels_missing(monkeypatch):
    monkeypatch.setattr(hiap_modules, "_import_ok", lambda name: False)


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
    monkeypatch.setattr(hiap_modules, "_warned_fallback", False)
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
    from hiap.config import _check_backend

    with pytest.raises(ValueError, match="unknown kernel backend"):
        _check_backend("cuda")
