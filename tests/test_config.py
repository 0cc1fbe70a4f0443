import pytest

import hiap
from hiap import HiAPConfig


def test_defaults_follow_the_design():
    cfg = HiAPConfig()
    assert (cfg.tau0, cfg.tau_min, cfg.kd_alpha, cfg.kd_temperature) == (2.0, 0.5, 0.7, 4.0)
    assert cfg.lambda_macro / cfg.lambda_micro == pytest.approx(2.0)
    assert cfg.dim_group == 0 and cfg.neuron_group == 0 and cfg.hard  # hardware-aligned groups


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(tau0=0.5, tau_min=1.0), "tau_min"),
        (dict(target=0.0), "target"),
        (dict(target=1.5), "target"),
        (dict(lambda_macro=-0.1), "lambda_macro"),
        (dict(lambda_micro=-1.0), "lambda_micro"),
        (dict(tau0=0.0), "temperatures"),
        (dict(dim_group=-1), "dim_group"),
        (dict(neuron_group=2.5), "neuron_group"),
        (dict(min_dim_fraction=1.5), "min_dim_fraction"),
        (dict(budget="lagrange"), "budget"),
        (dict(kd_alpha=float("nan")), "kd_alpha"),
        (dict(seed=-1), "seed"),
        (dict(retire_below=0.6), "retire_below"),
        (dict(retire_below=float("nan")), "retire_below"),
        (dict(retire_every=0), "retire_every"),
        (dict(retire_every=2.5), "retire_every"),
    ],
)
def test_out_of_range_values_are_rejected_with_the_field_name(fields, message):
    with pytest.raises(ValueError, match=message):
        HiAPConfig(**fields)


def test_round_trip_through_a_dict_and_unknown_fields():
    cfg = HiAPConfig(target=0.5, dim_group=8)
    assert HiAPConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields"):
        HiAPConfig.from_dict({"tau": 1.0})


def test_temperature_schedule_anneals_exponentially():
    assert hiap.temperature_at(0, 100) == pytest.approx(2.0)
    assert hiap.temperature_at(100, 100) == pytest.approx(0.5)
    assert hiap.temperature_at(50, 100) == pytest.approx(1.0)
    assert hiap.temperature_at(500, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        hiap.temperature_at(0, 0)


def test_configs_saved_before_neuron_group_keep_their_per_dim_gates():
    from hiap.method.gates import resolve_groups

    old = HiAPConfig.from_dict({"dim_group": 1})  # a first-release config: dim_group covered neurons too
    assert resolve_groups(old.dim_group, old.neuron_group, 64, 1536) == (1, 1)
    assert resolve_groups(8, 0, 64, 1536) == (8, 8)
    assert resolve_groups(0, 0, 64, 1536) == (16, 128)  # DeiT-S: q/k, v widths in 16s, FFN widths in 128s
    assert resolve_groups(0, 0, 64, 768) == (16, 64)  # ViT-Ti: twelve FFN groups at least
    assert resolve_groups(0, 0, 16, 256) == (4, 16)  # the digits ViT
    assert resolve_groups(0, 0, 16, 256) == (4, 16)  # the digits ViT: small heads keep four gates each
    assert resolve_groups(0, 32, 64, 1536) == (16, 32)
