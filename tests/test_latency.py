"""Latency as the budget: the measured table (``hiap profile``), its predictions, and a search that lands on it."""

import json

import pytest
import torch

import hiap
from hiap.method.architecture import describe_vit
from hiap.method.cost import token_count
from hiap.method.latency import LatencyBudget, LatencyTable
from hiap.method.profile import profile_latency
from tests.cli_runs import TINY, run_cli, warm_run  # noqa: F401
from tests.helpers import images, tiny_vit


def synthetic_table(vit, *, per_dim: float = 0.01, per_head: float = 0.05, per_neuron: float = 0.002,
                    fixed: float = 1.0) -> LatencyTable:
    """A table whose times follow a known formula: ``per_head`` per head plus ``per_dim`` per q/k or v dim, and
    ``per_neuron`` per FFN neuron (0 for an empty block), so predictions can be checked exactly."""
    attn, mlp = vit.blocks[0].attn, vit.blocks[0].mlp
    heads, head_dim, width = attn.num_heads, attn.head_dim, mlp.fc1.out_features
    qk, v, ffn = list(range(0, head_dim + 1, 4)), list(range(4, head_dim + 1, 4)), list(range(0, width + 1, 16))
    attention = [[[h * (per_head + per_dim * (q + w)) for w in v] for q in qk] for h in range(heads + 1)]
    depth = len(vit.blocks)
    dense = fixed + depth * (heads * (per_head + per_dim * 2 * head_dim) + per_neuron * width)
    return LatencyTable(model="tiny", architecture=describe_vit(vit), device="cpu", device_name="test", dtype="float32",
                        batch=2, threads=1, compiled=False, torch_version=torch.__version__, tokens=token_count(vit),
                        embed_dim=vit.embed_dim, num_heads=heads, head_dim=head_dim, ffn_width=width, depth=depth,
                        heads=list(range(heads + 1)), qk_widths=qk, v_widths=v, attention_ms=attention,
                        ffn_widths=ffn, ffn_ms=[per_neuron * w for w in ffn], fixed_ms=fixed, dense_ms=dense,
                        rounds=1)


def test_the_table_interpolates_its_measurements_and_predicts_a_pruned_model_from_its_widths(tmp_path):
    vit = tiny_vit()
    table = synthetic_table(vit)
    assert table.dense_predicted_ms == pytest.approx(table.dense_ms)
    assert table.predict(vit) == pytest.approx(table.dense_ms)
    f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # Exact on the grid, linear between its points, flat beyond its ends, differentiable.
    assert table.attention(f64(2.0), f64(8.0), f64(12.0)).item() == pytest.approx(2 * (0.05 + 0.01 * 20))
    assert table.attention(f64(1.5), f64(8.0), f64(8.0)).item() == pytest.approx(1.5 * (0.05 + 0.16))
    heads = f64(2.5).requires_grad_()
    table.attention(heads, f64(6.0), f64(16.0)).backward()
    assert heads.grad.item() == pytest.approx(0.05 + 0.01 * 22)
    assert table.ffn(f64(500.0)).item() == pytest.approx(0.002 * 192)
    gated = hiap.gate_vit(vit, hiap.HiAPConfig())
    with torch.no_grad():
        gated.gate_logits()["blocks.0.attn.gates.head"][1] = -3.0  # one head gone
        gated.gate_logits()["blocks.1.mlp.gates.neuron"][:4] = -3.0  # 64 neurons gone
        gated.gate_logits()["blocks.0.attn.gates.v"][0, :2] = -3.0  # head 0 keeps 8 v dims
    pruned = hiap.extract(gated)
    expected = (1.0 + (2 * 0.05 + 0.01 * (32 + 24)) + 0.002 * 192 + (3 * 0.05 + 0.01 * 96) + 0.002 * 128)
    assert table.predict(pruned) == pytest.approx(expected)
    cost = LatencyBudget(table, gated)
    assert cost.fraction(gated) == pytest.approx(expected / table.dense_ms)
    assert float(cost.decided(gated, hiap.method.cost.StackedGates.of(gated))) == pytest.approx(expected)
    # The file: written atomically, read back equal, refused in one line when it is not a table.
    path = table.save(tmp_path / "table.json")
    assert LatencyTable.load(path).attention_ms == table.attention_ms
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    for bad, message in ((tmp_path / "absent.json", "does not exist"), (tmp_path / "bad.json", "not a latency table")):
        with pytest.raises(ValueError, match=message):
            LatencyTable.load(bad)
    broken = json.loads(path.read_text())
    broken["ffn_ms"] = broken["ffn_ms"][:-1]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="malformed"):
        LatencyTable.load(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="embed_dim"):
        table.check_model(tiny_vit(embed_dim=96, num_heads=6))


def test_profiling_times_every_part_on_the_grid_and_keeps_the_table_monotone():
    vit = tiny_vit(depth=1)
    table = profile_latency(vit, name="tiny", batch_size=2, rounds=2, warmup=1, show_progress=False)
    assert table.heads == [0, 1, 2, 3] and table.qk_widths == [0, 4, 8, 12, 16] and table.v_widths == [4, 8, 12, 16]
    assert table.ffn_widths == list(range(0, 193, 16)) and table.tokens == 17 and table.batch == 2
    grid = torch.tensor(table.attention_ms)
    assert grid.shape == (4, 5, 4) and torch.all(grid[0] == 0) and torch.all(grid[1:] > 0)
    for axis in range(3):
        assert torch.all(grid.diff(dim=axis) >= 0)
    assert all(b >= a for a, b in zip(table.ffn_ms, table.ffn_ms[1:]))
    assert table.fixed_ms > 0 and table.dense_ms > 0 and table.seconds >= 0
    with pytest.raises(ValueError, match="batch_size"):
        profile_latency(vit, batch_size=0)


def test_a_latency_budget_lands_the_table_s_prediction_on_its_target(tmp_path):
    vit = tiny_vit()
    table = synthetic_table(vit)
    path = str(table.save(tmp_path / "table.json"))
    generator = torch.Generator().manual_seed(0)
    batches = [(images(vit, 4, generator), torch.randint(0, 10, (4,), generator=generator)) for _ in range(20)]
    cfg = hiap.HiAPConfig(budget="latency", latency_table=path, target=0.6, gate_lr=0.5)
    pruner = hiap.Pruner(vit, cfg, total_steps=20)
    optimizer = torch.optim.AdamW(pruner.param_groups(lr=1e-3))
    for x, y in batches:
        loss = pruner.loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
    fixed = next(e for e in pruner.history if e["event"] == "fix_structure")
    assert abs(fixed["before"] / 0.6 - 1) <= 0.01 and fixed["steps"] == 0
    pruned = pruner.extract()
    assert table.predict(pruned) / table.dense_ms == pytest.approx(pruner.decided_fraction())
    assert abs(pruner.decided_fraction() / 0.6 - 1) <= 0.01
    assert pruner.log_values()["target"] == 0.6 and 0 < pruner.log_values()["macs_fraction"] < 1
    # In milliseconds instead; below the floor, or above the dense latency, refused in one line.
    in_ms = hiap.Pruner(vit, hiap.HiAPConfig(budget="latency", latency_table=path, target_ms=0.5 * table.dense_ms),
                        total_steps=10)
    assert in_ms.target == pytest.approx(0.5)
    with pytest.raises(ValueError, match="below .* the floor"):
        hiap.Pruner(vit, hiap.HiAPConfig(budget="latency", latency_table=path, target=0.1), total_steps=10)
    with pytest.raises(ValueError, match="above the dense model"):
        hiap.Pruner(vit, hiap.HiAPConfig(budget="latency", latency_table=path, target_ms=2 * table.dense_ms),
                    total_steps=10)
    with pytest.raises(ValueError, match="latency_table"):
        hiap.HiAPConfig(budget="latency")
    with pytest.raises(ValueError, match="target_ms needs"):
        hiap.HiAPConfig(target_ms=3.0)


def test_hiap_profile_writes_a_table_reuses_it_and_prune_searches_on_it(warm_run, tmp_path, capsys):
    from hiap.app.models import DIGITS_VIT, create_dense_model

    measured = tmp_path / "measured.json"
    profile = ["profile", "--model-args", "depth=2", "embed_dim=32", "--batch-size", "8", "--rounds", "1",
               "--no-progress", "-o", measured]
    assert run_cli(*profile) == 0
    assert "wrote" in capsys.readouterr().out and LatencyTable.load(measured).batch == 8
    assert run_cli(*profile) == 0 and "reusing" in capsys.readouterr().out
    assert run_cli(*[a if a != "8" else "4" for a in profile]) == 2
    assert "other settings (batch)" in capsys.readouterr().err
    # The search on a table of known times (a measured one of a model this small is mostly noise).
    dense = create_dense_model(DIGITS_VIT, 10, model_args={"depth": 2, "embed_dim": 32})
    known = synthetic_table(dense)
    known.batch = 8
    table = known.save(tmp_path / "table.json")
    output = tmp_path / "run"
    code = run_cli("prune", "-o", output, "--cache-dir", warm_run.cache, *TINY, "--budget", "latency",
                   "--latency-table", table, "--target", "0.8")
    assert code == 0
    report = json.loads((output / "report.json").read_text())
    latency = report["latency"]
    assert set(latency) >= {"target_ms", "predicted_ms", "measured_ms", "dense_ms", "table"}
    assert latency["table"] == str(table) and latency["batch"] == 8
    assert abs(latency["predicted_ms"] / latency["target_ms"] - 1) <= 0.01
    assert "of the dense latency" in (output / "report.md").read_text()
    # A table of another model is refused before any training.
    assert run_cli("prune", "-o", tmp_path / "other", "--cache-dir", warm_run.cache, *TINY, "--model-args",
                   "depth=3", "--budget", "latency", "--latency-table", table) == 2
    assert "--latency-table" in capsys.readouterr().err


def test_the_table_is_fitted_so_noise_leaves_no_plateau_or_dip():
    """Widths on a plane per head count, the FFN on a line: exact planes and lines come back as they are; a noisy
    median above its neighbours (which a running maximum alone would spread into a plateau of free width) is
    averaged away, and a slope that noise makes negative is 0."""
    from hiap.method.profile import _fitted_attention, _fitted_line

    qk, v = [0, 4, 8, 12, 16], [4, 8, 12, 16]
    q_grid, v_grid = torch.meshgrid(torch.tensor(qk, dtype=torch.float64), torch.tensor(v, dtype=torch.float64),
                                    indexing="ij")
    heads = torch.arange(3, dtype=torch.float64)[:, None, None]
    exact = heads * (0.1 + 0.01 * q_grid + 0.02 * v_grid)
    exact[:, 0] = heads[:, 0] * (0.05 + 0.02 * v_grid[0])
    torch.testing.assert_close(_fitted_attention(exact, qk, v), exact)
    widths = list(range(0, 65, 16))
    line = torch.tensor([0.01] + [0.1 + 0.002 * w for w in widths[1:]], dtype=torch.float64)
    torch.testing.assert_close(_fitted_line(widths, line), line)
    noisy = line.clone()
    noisy[1] += 0.05  # width 16 measured as slow as width 48
    fitted = _fitted_line(widths, noisy)
    assert torch.all(fitted[2:].diff() > 0) and fitted[2] > fitted[1]
    flat = torch.tensor([0.0, 0.3, 0.2, 0.2, 0.2], dtype=torch.float64)  # noise with a negative slope
    assert torch.allclose(_fitted_line(widths, flat)[1:], torch.full((4,), 0.225, dtype=torch.float64))


def test_a_latency_gap_counts_as_the_width_it_takes(tmp_path):
    """Fixed parts make the latency fall slower than the widths: the controller's gap is scaled by (1 - k) / (1 - t),
    k the uniform cut the table predicts at the target t, so a search tracks its target as a MAC search does."""
    from hiap_kernels.objective.reference import lagrangian_budget

    vit = tiny_vit()
    table = synthetic_table(vit, fixed=3.0)
    keep = table.uniform_width(0.7)
    uniform = table.layer_ms(3, round(keep * 48), round(keep * 48), round(keep * 192))
    assert (table.fixed_ms + table.depth * uniform) / table.dense_predicted_ms == pytest.approx(0.7, abs=1e-3)
    path = str(table.save(tmp_path / "table.json"))
    pruner = hiap.Pruner(vit, hiap.HiAPConfig(budget="latency", latency_table=path, target=0.7), total_steps=10)
    assert pruner.cost.gap_scale == pytest.approx((1 - keep) / 0.3) and pruner.cost.gap_scale > 1.5
    gates = hiap.method.cost.StackedGates.of(pruner.model)
    assert pruner.cost.expected(pruner.model, gates).gap_scale == pruner.cost.gap_scale
    # ... and the cost the budget term sees (the decided cost with the expected one's gradient) carries it.
    assert hiap.method.losses.budget_cost(pruner.model, gates, pruner.cost).gap_scale == pruner.cost.gap_scale
    assert hiap.Pruner(vit, hiap.HiAPConfig(target=0.7), total_steps=10).cost.gap_scale == 1.0
    terms = [lagrangian_budget(torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.0), static=0.0, dense=1.0,
                               target_mode=True, target=0.7, lambda1=torch.zeros(1, dtype=torch.float64)[0],
                               lambda2=torch.zeros(1, dtype=torch.float64)[0], lagrangian_lr=1.0, lambda_macro=0.0,
                               lambda_micro=0.0, ascend=True, gap_scale=scale)[0] for scale in (1.0, 2.0)]
    # One ascent step: lambda1 = gap, lambda2 = gap^2, so the term is gap^2 + gap^4, at twice the gap.
    assert float(terms[0]) == pytest.approx(0.1**2 + 0.1**4) and float(terms[1]) == pytest.approx(0.2**2 + 0.2**4)


def test_profiling_times_the_parts_as_inference_runs_them(monkeypatch):
    """Without autograd: a part timed with its graph recorded costs more than in a deployed forward (at batch 1 the
    table then over-predicted every layout by about 16 %)."""
    import hiap.method.profile as profile

    modes = []
    timer_call = profile._Timer.__call__

    def spy(self, run):
        modes.append(torch.is_inference_mode_enabled())
        return timer_call(self, run)

    monkeypatch.setattr(profile._Timer, "__call__", spy)
    profile_latency(tiny_vit(depth=1), batch_size=1, rounds=1, warmup=0, show_progress=False)
    assert modes and all(modes)
