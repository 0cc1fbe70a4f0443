import pytest

import hiap
from hiap import HiAPConfig


def test_defaults_follow_the_design():
    cfg = HiAPConfig()
    assert (cfg.tau0, cfg.tau_min, cfg.kd_alpha, cfg.kd_temperature) == (2.0, 0.5, 0.7, 4.0)
    assert cfg.lambda_macro / cfg.lambda_micro == pytest.approx(2.0)
    assert cfg.dim_group == 1 and cfg.hard


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(tau0=0.5, tau_min=1.0), "tau_min"),
        (dict(target=0.0), "target"),
        (dict(target=1.5), "target"),
        (dict(lambda_macro=-0.1), "lambda_macro"),
        (dict(lambda_micro=-1.0), "lambda_micro"),
        (dict(tau0=0.0), "temperatures"),
        (dict(dim_group=0), "dim_group"),
        (dict(min_dim_fraction=1.5), "min_dim_fraction"),
        (dict(budget="lagrange"), "budget"),
        (dict(kd_alpha=float("nan")), "kd_alpha"),
        (dict(seed=-1), "seed"),
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
