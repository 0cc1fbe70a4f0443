import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import hiap
from hiap.app.cli import build_parser, hiap_config_from_args
from hiap.app.export import export_onnx
from tests.cli_runs import TINY, run_cli, warm_run  # noqa: F401
from tests.helpers import randomize_logits, tiny_vit


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"hiap {command}: error: ")
    return last


def test_every_hiap_config_field_is_a_flag_with_its_default():
    args = build_parser().parse_args(["prune"])
    assert hiap_config_from_args(args) == hiap.HiAPConfig()
    args = build_parser().parse_args(["prune", "--no-hard", "--budget", "penalty", "--tau-min", "0.25", "--dim-group", "8"])
    cfg = hiap_config_from_args(args)
    assert (cfg.hard, cfg.budget, cfg.tau_min, cfg.dim_group) == (False, "penalty", 0.25, 8)


@pytest.mark.parametrize("target", ["0", "1.5", "-0.2"])
def test_budget_outside_zero_one_is_a_one_line_error(capsys, target):
    assert run_cli("prune", "--target", target) == 2
    assert "--target must lie in (0, 1]" in _one_line_error(capsys, "prune")


def test_compare_checks_every_budget(capsys):
    assert run_cli("compare", "--targets", "0.5", "1.2") == 2
    assert "every budget must lie in (0, 1]" in _one_line_error(capsys, "compare")


def test_missing_or_malformed_dataset_path_is_a_one_line_error(capsys, tmp_path):
    assert run_cli("prune", "--data", tmp_path / "nowhere") == 2
    assert "does not exist" in _one_line_error(capsys, "prune")
    (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
    assert run_cli("prune", "--data", tmp_path / "tree") == 2
    assert "no val/ folder" in _one_line_error(capsys, "prune")


@pytest.mark.parametrize("model, message", [("vit_no_such_model", "unknown model"),
                                            ("resnet18", "cannot be pruned by HiAP")])
def test_unknown_or_unsupported_model_is_a_one_line_error(capsys, tmp_path, model, message):
    assert run_cli("prune", "--model", model, "-o", tmp_path, "--cache-dir", tmp_path) == 2
    assert message in _one_line_error(capsys, "prune")


def test_corrupt_checkpoints_are_one_line_errors(capsys, tmp_path):
    corrupt = tmp_path / "checkpoint.pt"
    corrupt.write_bytes(b"\x80\x04 this is no checkpoint")
    assert run_cli("extract", corrupt) == 2
    assert "corrupt" in _one_line_error(capsys, "extract")
    assert run_cli("eval", corrupt) == 2
    assert "corrupt" in _one_line_error(capsys, "eval")
    assert run_cli("prune", "--checkpoint", corrupt, "-o", tmp_path / "out", "--cache-dir", tmp_path) == 2
    assert "corrupt" in _one_line_error(capsys, "prune")
    assert run_cli("prune", "--checkpoint", tmp_path / "absent.pt") == 2
    assert "does not exist" in _one_line_error(capsys, "prune")
    broken_pruned = tmp_path / "model.safetensors"
    broken_pruned.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert run_cli("export", broken_pruned, "--onnx", tmp_path / "m.onnx") == 2
    assert "not a readable safetensors" in _one_line_error(capsys, "export")


def test_resume_refuses_a_corrupt_checkpoint_or_another_config(capsys, warm_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(warm_run.output, copy)
    args = ["prune", "-o", copy, "--cache-dir", warm_run.cache, *TINY, "--resume"]
    assert run_cli(*args, "--epochs", "3") == 2
    assert "different config (epochs: 2 -> 3)" in _one_line_error(capsys, "prune")
    assert run_cli(*args, "--target", "0.5") == 2
    assert "hiap.target" in _one_line_error(capsys, "prune")
    (copy / "checkpoint.pt").write_bytes((copy / "checkpoint.pt").read_bytes()[:1000])
    assert run_cli(*args) == 2
    assert "corrupt" in _one_line_error(capsys, "prune")


def test_prune_writes_every_artifact(warm_run):
    output = warm_run.output
    for name in ("pruned.safetensors", "checkpoint.pt", "log.jsonl", "report.md", "report.json"):
        assert (output / name).is_file(), name
    for plot in ("structure", "gate_probabilities", "budget", "training", "latency", "accuracy_vs_macs"):
        assert (output / "plots" / f"{plot}.png").stat().st_size > 10_000, plot
    report = json.loads((output / "report.json").read_text())
    pruned = hiap.load_pruned(output / "pruned.safetensors")
    assert hiap.count_macs(pruned) == report["pruned"]["macs"]
    assert report["dense"]["macs"] == report["dense_macs"] and report["pruned"]["latency"]["ms_per_batch"] > 0
    assert [len(layer["qk_widths"]) for layer in report["structure"]] == [4, 4]
    phases = {json.loads(line)["phase"] for line in (output / "log.jsonl").read_text().splitlines()}
    assert phases == {"teacher", "hiap"}
    assert "| dense |" in (output / "report.md").read_text()


def test_extract_rebuilds_the_saved_pruned_model_from_the_checkpoint(warm_run, tmp_path):
    target = tmp_path / "again.safetensors"
    assert run_cli("extract", warm_run.output / "checkpoint.pt", "-o", target) == 0
    saved, again = load_file(warm_run.output / "pruned.safetensors"), load_file(target)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert hiap.read_layout(target) == hiap.read_layout(warm_run.output / "pruned.safetensors")


def test_eval_of_pruned_and_dense_models_matches_the_report(warm_run, tmp_path, capsys):
    report = json.loads((warm_run.output / "report.json").read_text())
    numbers = tmp_path / "pruned.json"
    assert run_cli("eval", warm_run.output / "pruned.safetensors", "--json", numbers, "--latency-repeats", "1") == 0
    pruned = json.loads(numbers.read_text())
    assert pruned["kind"] == "pruned" and pruned["accuracy"] == report["pruned"]["accuracy"]
    assert pruned["macs"] == report["pruned"]["macs"]
    teacher = next(warm_run.cache.glob("teacher-*.safetensors"))
    assert run_cli("eval", teacher, "--model-args", "depth=2", "embed_dim=32", "--json", numbers,
                   "--latency-repeats", "1") == 0
    dense = json.loads(numbers.read_text())
    assert dense["kind"] == "dense" and dense["accuracy"] == report["dense"]["accuracy"]
    assert "accuracy" in capsys.readouterr().out


def test_export_onnx_matches_pytorch_on_the_pruned_run(warm_run, tmp_path, capsys):
    assert run_cli("export", warm_run.output / "pruned.safetensors", "--onnx", tmp_path / "model.onnx") == 0
    assert (tmp_path / "model.onnx").is_file() and "max |diff|" in capsys.readouterr().out


def test_onnx_export_handles_ragged_heads_and_removed_layers(tmp_path):
    gated = hiap.gate_vit(tiny_vit(depth=3), hiap.HiAPConfig(min_heads=0, min_dim_fraction=0.0, min_neuron_fraction=0.0))
    randomize_logits(gated, torch.Generator().manual_seed(1))
    with torch.no_grad():
        gated.gate_logits()["blocks.1.mlp.gates.block"].fill_(-5.0)
        gated.gate_logits()["blocks.2.attn.gates.head"].fill_(-5.0)
    pruned = hiap.extract(gated)
    assert pruned.blocks[1].mlp.hidden_features == 0 and pruned.blocks[2].attn.num_heads == 0
    assert len(set(pruned.blocks[0].attn.qk_widths + pruned.blocks[0].attn.v_widths)) > 1
    check = export_onnx(pruned, tmp_path / "ragged.onnx")
    assert check.max_abs_error < 1e-4


def test_compare_runs_hiap_and_both_baselines_at_one_budget(warm_run, tmp_path, capsys):
    output = tmp_path / "compare"
    assert run_cli("compare", "-o", output, "--cache-dir", warm_run.cache, *TINY, "--epochs", "1") == 0
    report = json.loads((output / "compare.json").read_text())
    assert [run["method"] for run in report["runs"]] == ["hiap", "uniform", "l1"] and report["seeds"] == [0]
    for run in report["runs"][1:]:
        assert abs(run["fraction"] / report["targets"][0] - 1) < 0.02
    assert (output / "plots" / "accuracy_vs_macs.png").is_file() and (output / "compare.md").is_file()
    assert {p.name for p in output.iterdir()} >= {"hiap-t0.667-s0", "uniform-t0.667-s0", "l1-t0.667-s0"}
    for aggregate in report["aggregates"]:
        run = next(r for r in report["runs"] if r["method"] == aggregate["method"])
        assert aggregate["loss_mean"] == run["pruned"]["loss"] > 0 and aggregate["loss_std"] == 0.0
    assert "One validation image is" in (output / "compare.md").read_text()
    assert report["machine"]["device"] == "cpu" and report["machine"]["name"] in (output / "compare.md").read_text()
    hiap_run = report["runs"][0]["pruned"]
    assert [p["baseline"] for p in report["paired"]] == ["uniform", "l1"]
    for pair, run in zip(report["paired"], report["runs"][1:]):
        assert pair["accuracy_difference"] == pytest.approx(hiap_run["accuracy"] - run["pruned"]["accuracy"])
        assert pair["hiap_at_or_above"] == int(hiap_run["accuracy"] >= run["pruned"]["accuracy"])
    out = capsys.readouterr().out
    assert "uniform" in out and "l1" in out and "val loss" in out


def test_dense_checkpoint_as_the_teacher(warm_run, tmp_path):
    teacher = next(warm_run.cache.glob("teacher-*.safetensors"))
    output = tmp_path / "from-checkpoint"
    assert run_cli("prune", "-o", output, "--cache-dir", tmp_path / "cache", *TINY, "--checkpoint", teacher,
                   "--teacher-epochs", "0", "--epochs", "1") == 0
    report = json.loads((output / "report.json").read_text())
    warm = json.loads((warm_run.output / "report.json").read_text())
    assert report["dense"]["accuracy"] == warm["dense"]["accuracy"]
    assert not (tmp_path / "cache").exists()  # nothing to train, nothing cached


def test_prune_and_eval_a_timm_model_on_an_imagefolder_tree(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        for index, name in enumerate(("circle", "square", "cross")):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for item in range(4):
                Image.new("RGB", (24, 24), color=(80 * index, 20 * item, 40)).save(tmp_path / "data" / split / name / f"{item}.png")
    output = tmp_path / "run"
    model = ["--model", "vit_tiny_patch16_224", "--model-args", "img_size=32", "patch_size=8", "depth=1",
             "embed_dim=32", "num_heads=2"]
    assert run_cli("prune", "-o", output, "--cache-dir", tmp_path / "cache", "--data", tmp_path / "data", *model,
                   "--batch-size", "4", "--teacher-epochs", "1", "--epochs", "1", "--no-progress",
                   "--latency-batch", "2", "--latency-repeats", "1") == 0
    report = json.loads((output / "report.json").read_text())
    assert report["model"] == "vit_tiny_patch16_224" and "3 classes" in report["data"]
    assert run_cli("eval", output / "pruned.safetensors", "--data", tmp_path / "data", "--model",
                   "vit_tiny_patch16_224", "--latency-batch", "2", "--latency-repeats", "1") == 0
    assert f"accuracy {100 * report['pruned']['accuracy']:.2f}%" in capsys.readouterr().out


# Token reduction from the command line (hiap.tokens)


def test_eval_with_tokens_reports_both_models_and_bad_schedules_are_one_line(warm_run, tmp_path, capsys):
    numbers = tmp_path / "numbers.json"
    pruned = warm_run.output / "pruned.safetensors"
    assert run_cli("eval", pruned, "--tokens", "rapid:r=2", "--json", numbers, "--latency-repeats", "1") == 0
    record = json.loads(numbers.read_text())
    assert record["tokens"]["spec"] == "rapid:r=2"
    assert record["tokens"]["macs"] < record["macs"]
    assert "with token reduction 'rapid:r=2' (p2,m2)" in capsys.readouterr().out
    for spec, message in (("t9,-", "at most half"), ("rapid:r=2,speed=1", "unknown option"), ("p1", "2 blocks")):
        assert run_cli("eval", pruned, "--tokens", spec) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error


def test_prune_with_tokens_reports_channels_tokens_and_both(warm_run, tmp_path):
    output = tmp_path / "run"
    assert run_cli("prune", "-o", output, "--cache-dir", warm_run.cache, *TINY, "--tokens", "tome:r=3") == 0
    report = json.loads((output / "report.json").read_text())
    tokens = report["tokens"]
    assert tokens["schedule"] == "t3,t3" and set(tokens) >= {"dense", "pruned"}
    assert tokens["pruned"]["macs"] < report["pruned"]["macs"] < report["dense"]["macs"]
    assert tokens["dense"]["macs"] < report["dense"]["macs"]
    markdown = (output / "report.md").read_text()
    assert "## Token reduction `tome:r=3` (per block: t3,t3)" in markdown and "pruned + tokens (both)" in markdown


def test_compare_with_torch_pruning_at_the_same_budget(warm_run, tmp_path):
    pytest.importorskip("torch_pruning")
    output = tmp_path / "compare"
    assert run_cli("compare", "-o", output, "--cache-dir", warm_run.cache, *TINY, "--epochs", "1",
                   "--methods", "torch-pruning") == 0
    report = json.loads((output / "compare.json").read_text())
    run = report["runs"][0]
    assert run["method"] == "torch-pruning" and 0 < run["choice"]["pruning_ratio"] < 1
    assert abs(run["fraction"] / report["targets"][0] - 1) < 0.1
    assert (output / "torch-pruning-t0.667-s0" / "pruned.safetensors").is_file()


def test_status_lines_go_through_logging_and_quiet_keeps_only_warnings(warm_run, tmp_path, capsys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="hiap")
    assert run_cli("prune", "-o", tmp_path / "loud", "--cache-dir", warm_run.cache, *TINY) == 0
    err = capsys.readouterr().err
    assert "[teacher] loaded from cache" in err and err.count("structure fixed after") == 1
    names = {record.name for record in caplog.records}
    assert {"hiap.app", "hiap"} <= names  # the application's lines and the pruner's events, routable as any logging
    caplog.clear()
    assert run_cli("prune", "-o", tmp_path / "quiet", "--cache-dir", warm_run.cache, *TINY, "--quiet") == 0
    assert "[teacher]" not in capsys.readouterr().err
