import json
import signal
import subprocess
import time

import pytest
import torch

import hiap
from hiap.app.checkpoint import JsonlLog, config_difference, read_checkpoint
from hiap.app.runtime import InputError, atomic_torch_save
from hiap.method.losses import budget_cost
from tests.cli_runs import TINY, cli_command, run_cli, subprocess_env, warm_run  # noqa: F401
from tests.helpers import randomize_logits, tiny_vit


def test_target_budget_sees_the_decided_macs_with_the_expected_gradient():
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(target=0.5))
    randomize_logits(gated, torch.Generator().manual_seed(0), scale=1.0)
    cost = budget_cost(gated)
    assert float(cost.total.detach()) == pytest.approx(hiap.count_macs(gated), rel=1e-12)
    assert float(cost.total.detach()) != pytest.approx(float(hiap.expected_macs(gated).detach()), rel=1e-3)
    cost.total.backward()
    straight_through = {k: p.grad.clone() for k, p in gated.gate_logits().items()}
    gated.zero_grad()
    hiap.expected_macs(gated).backward()
    for name, logit in gated.gate_logits().items():
        assert torch.equal(straight_through[name], logit.grad)
    penalty = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(budget="penalty"))
    assert float(budget_cost(penalty).total.detach()) == pytest.approx(float(hiap.expected_macs(penalty).detach()))


def test_checkpoint_reader_rejects_corrupt_foreign_and_mismatched_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(InputError, match="corrupt"):
        read_checkpoint(corrupt)
    foreign = atomic_torch_save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="not a hiap training checkpoint"):
        read_checkpoint(foreign)
    teacher = atomic_torch_save({"format": "hiap-train-checkpoint", "version": 1, "phase": "teacher"},
                                tmp_path / "teacher.pt")
    with pytest.raises(InputError, match="teacher"):
        read_checkpoint(teacher, phase="hiap")
    assert not list(tmp_path.glob("*.tmp"))


def test_config_difference_names_the_first_changed_setting():
    saved = {"epochs": 3, "hiap": {"target": 0.5, "seed": 0}}
    assert config_difference(saved, json.loads(json.dumps(saved))) is None
    assert config_difference(saved, {"epochs": 3, "hiap": {"target": 0.6, "seed": 0}}) == "hiap.target: 0.5 -> 0.6"


def test_log_truncation_drops_redone_steps_and_cut_lines(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    for step in (2, 4, 6):
        log.write({"phase": "hiap", "event": "step", "step": step})
    log.write({"phase": "teacher", "event": "step", "step": 40})
    with log.path.open("a") as handle:
        handle.write('{"phase": "hiap", "st')  # a record cut short by SIGKILL
    log.truncate_after("hiap", 4)
    assert [(r["phase"], r["step"]) for r in JsonlLog.read(log.path)] == [("hiap", 2), ("hiap", 4), ("teacher", 40)]
    # An event that applies from step 4 was raised when step 3 ended, before a checkpoint at step 4: it stays. One
    # that applies from step 5 comes from the step a run resumed at 4 redoes.
    log.write({"phase": "hiap", "event": "fix_structure", "step": 4})
    log.write({"phase": "hiap", "event": "retire", "step": 5})
    log.truncate_after("hiap", 4)
    assert [r["event"] for r in JsonlLog.read(log.path)] == ["step", "step", "step", "fix_structure"]


def _final_state(output):
    payload = read_checkpoint(output / "checkpoint.pt", phase="hiap")
    report = json.loads((output / "report.json").read_text())
    records = [{k: v for k, v in r.items() if k != "time"} for r in JsonlLog.read(output / "log.jsonl")]
    return payload, report, records


def test_resume_after_sigkill_ends_like_an_uninterrupted_run(warm_run, tmp_path):
    args = ["--cache-dir", warm_run.cache, *TINY, "--epochs", "6", "--checkpoint-every", "5"]
    reference = tmp_path / "reference"
    assert run_cli("prune", "-o", reference, *args) == 0

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(cli_command("prune", "-o", interrupted, *args), env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = interrupted / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = read_checkpoint(checkpoint)
    assert 0 < killed_at["step"] < killed_at["total_steps"], "the run must die mid-training"
    assert not (interrupted / "report.json").exists()

    assert run_cli("prune", "-o", interrupted, *args, "--resume") == 0
    expected_payload, expected_report, expected_log = _final_state(reference)
    payload, report, log = _final_state(interrupted)
    assert report["resumed_from"] == killed_at["step"]
    for name, tensor in expected_payload["model"].items():
        assert torch.equal(payload["model"][name], tensor), name
    pruner_state, expected_pruner_state = payload["extra"]["pruner"], expected_payload["extra"]["pruner"]
    assert torch.equal(pruner_state["objective"]["budget.lambda1"], expected_pruner_state["objective"]["budget.lambda1"])
    for key in ("fraction", "history", "structure"):
        assert report[key] == expected_report[key], key
    assert report["pruned"]["accuracy"] == expected_report["pruned"]["accuracy"]
    assert report["pruned"]["macs"] == expected_report["pruned"]["macs"]
    assert log == expected_log


def test_ddp_with_two_gloo_processes_keeps_gates_in_sync_and_only_rank0_writes(warm_run, tmp_path):
    output = tmp_path / "ddp"
    command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hiap.app.cli", "prune",
               "-o", str(output), "--cache-dir", str(warm_run.cache), "--device", "cpu", *TINY]
    done = subprocess.run([cli_command()[0], *command], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((output / "report.json").read_text())
    assert report["world_size"] == 2
    assert len(report["gate_checksums"]) == 2 and report["gates_in_sync"]
    assert report["gate_checksums"][0] == report["gate_checksums"][1]
    records = JsonlLog.read(output / "log.jsonl")
    keys = [(r["phase"], r["event"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), "a second rank wrote to the log"
    assert sorted(p.name for p in output.iterdir()) == [".hiap-run.lock", "checkpoint.pt", "log.jsonl", "plots",
                                                        "pruned.safetensors", "report.json", "report.md"]
    assert done.stdout.count("wrote ") == 1
    pruned = hiap.load_pruned(output / "pruned.safetensors")
    assert hiap.count_macs(pruned) == report["pruned"]["macs"]


def test_jobs_train_every_student_weight_even_when_the_teacher_was_frozen():
    from hiap.app.jobs import DistillJob, HiAPJob

    teacher = tiny_vit().requires_grad_(False)
    pruner = hiap.Pruner(teacher, hiap.HiAPConfig(), total_steps=100)
    groups = HiAPJob(pruner).param_groups(0.05, total_steps=100)
    assert [g["name"] for g in groups] == ["weights", "weights_no_decay"]  # the pruner steps the gates itself
    gates = sum(p.numel() for p in pruner.model.gate_logits().values())
    assert sum(p.numel() for g in groups for p in g["params"]) + gates == sum(
        p.numel() for p in pruner.model.parameters())
    with pytest.raises(ValueError, match="made for 100"):
        HiAPJob(pruner).param_groups(0.05, total_steps=99)
    gated = pruner.model
    with torch.no_grad():
        gated.gate_logits()["blocks.0.mlp.gates.block"].fill_(-5.0)
    pruned = hiap.extract(gated)
    groups = DistillJob(pruned, teacher, lr=1e-4, alpha=0.7, temperature=4.0).param_groups(0.05, total_steps=100)
    trained = sum(p.numel() for g in groups for p in g["params"])
    assert trained == sum(p.numel() for p in pruned.parameters()) > 0
    assert not pruned.blocks[0].mlp.fc1.weight.requires_grad  # zero-sized: nothing to train, and DDP would wait on it


def test_a_fixed_structure_trains_the_network_extraction_keeps_and_skips_what_it_removed():
    from torch.utils.flop_counter import FlopCounterMode

    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig())
    randomize_logits(gated, torch.Generator().manual_seed(1), scale=2.0)
    with torch.no_grad():
        gated.gate_logits()["blocks.1.mlp.gates.block"].fill_(-1.0)  # one FFN block removed
        gated.gate_logits()["blocks.0.attn.gates.head"].copy_(torch.tensor([2.0, -1.0, -1.0]))  # two heads removed
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as masked_flops:
        decided = gated.eval()(x)
    gated.train().fix_structure()
    with FlopCounterMode(display=False) as fixed_flops:
        out = gated(x)
    torch.testing.assert_close(out, decided, rtol=1e-5, atol=1e-5)  # the decision, as in eval mode, not a sample
    torch.testing.assert_close(out, hiap.extract(gated).eval()(x), rtol=1e-5, atol=1e-5)
    # Removed heads, FFN blocks and neurons cost nothing: qkv, SDPA and proj shrink to the live heads, fc1 and fc2
    # to the kept neurons.
    batch, tokens, width, head_dim = 3, 17, 48, 16
    removed = sum(mlp.hidden_features - int(mlp.gates.kept_neurons().sum()) for mlp in gated.ffn_layers())
    removed_heads = sum(attn.num_heads - attn.decided_columns.numel() // head_dim for attn in gated.attention_layers())
    assert gated.ffn_layers()[1].decided_neurons.numel() == 0 and removed > 192 and removed_heads >= 2
    saved = 4 * batch * tokens * width * removed + removed_heads * 2 * batch * tokens * width * head_dim * 4

    def linear_flops(counter) -> int:  # the GEMMs (SDPA's own count differs between torch versions on a CPU)
        return sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op).split(".")[1] in ("mm", "addmm"))

    assert linear_flops(masked_flops) - linear_flops(fixed_flops) == saved
    out.sum().backward()
    assert all(logit.grad is None for logit in gated.gate_logits().values())
    assert gated.vit.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    gated.fix_structure(False)
    assert gated.ffn_layers()[0].decided_neurons is None
    assert not torch.allclose(gated(x), decided)  # sampling again


def test_prune_reports_the_fixed_structure_and_trains_it_unchanged(warm_run):
    report = json.loads((warm_run.output / "report.json").read_text())
    fixed = report["fixed_structure"]
    assert fixed["search_steps"] == round(0.75 * report["steps"]) and fixed["total_steps"] == report["steps"]
    assert report["settling"] is None  # settled when it was fixed, not again after training
    assert report["pruned"]["macs"] / report["dense_macs"] == pytest.approx(fixed["after"], rel=1e-12)
    steps = [r for r in JsonlLog.read(warm_run.output / "log.jsonl")
             if r["phase"] == "hiap" and r.get("event") == "step" and r["step"] > fixed["search_steps"]]
    assert steps
    for record in steps:  # nothing of the structure or the multipliers moves after the fix
        for key in ("decided_fraction", "keep_probability", "lambda1", "lambda2"):
            assert record[key] == steps[0][key], key
    text = (warm_run.output / "report.md").read_text()
    assert "The structure was fixed after" in text and f"(fixed since step {fixed['search_steps']})" in text


def test_a_fixed_layer_without_heads_or_neurons_is_its_projection_bias():
    gated = hiap.gate_vit(tiny_vit(), hiap.HiAPConfig(min_heads=0, min_neuron_fraction=0.0))
    with torch.no_grad():
        gated.gate_logits()["blocks.0.attn.gates.head"].fill_(-1.0)
        gated.gate_logits()["blocks.0.mlp.gates.block"].fill_(-1.0)
    x = torch.randn(2, 3, 32, 32)
    gated.train().fix_structure()
    out = gated(x)
    torch.testing.assert_close(out, hiap.extract(gated).eval()(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    block = gated.vit.blocks[0]
    # Every weight still receives a gradient (zeros where nothing is left), as DDP requires of each step.
    assert block.attn.qkv.weight.grad.abs().sum() == 0 and block.attn.proj.weight.grad.abs().sum() == 0
    assert block.mlp.fc1.weight.grad.abs().sum() == 0 and block.mlp.fc2.bias.grad is not None


def test_a_process_whose_model_runs_triton_kernels_says_its_first_step_compiles_them(tmp_path, capsys, monkeypatch):
    """On a GPU the first step of a process compiles the Triton kernels: the log says so and where Triton keeps them,
    then how long the step took; a model on the reference path, or on a CPU, logs nothing of the kind."""
    import hiap.app.train as train
    from hiap.app.data import digits_datasets
    from hiap.app.jobs import DenseJob
    from hiap.app.models import DIGITS_VIT, create_dense_model
    from hiap.app.runtime import DistContext
    from hiap.backend import runs_triton_kernels
    from hiap_kernels import kernel_cache_dir

    gated = hiap.gate_vit(tiny_vit(depth=1), hiap.HiAPConfig())
    cuda = torch.device("cuda")
    assert not runs_triton_kernels(gated, cuda) and not runs_triton_kernels(gated, "cpu")
    with hiap.use_triton_kernels(gated):
        assert runs_triton_kernels(gated, cuda) and not runs_triton_kernels(gated, "cpu")

    model = create_dense_model(DIGITS_VIT, 10, model_args={"depth": 1, "embed_dim": 32})
    settings = train.LoopSettings(epochs=1, batch_size=256, log_every=5, checkpoint_every=0, show_progress=False,
                                  amp=False)

    def run():
        train.fit(DenseJob(model, lr=1e-3), digits_datasets(model), settings, ctx=DistContext(),
                  device=torch.device("cpu"), checkpoint_path=tmp_path / "checkpoint.pt", log=None, fingerprint={},
                  resume=False)
        return capsys.readouterr().err

    assert "compiles" not in run()
    # As on a GPU with the Triton path (nothing compiles on this machine; the synchronisation is the GPU's).
    monkeypatch.setattr(train, "runs_triton_kernels", lambda model, device: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    (tmp_path / "checkpoint.pt").unlink()
    lines = run().splitlines()
    assert f"[teacher] the first step compiles this model's Triton kernels; Triton keeps them in {kernel_cache_dir()}, " \
           "where a later run on this machine loads them instead" in lines
    assert sum(line.startswith("[teacher] first step: ") and "kernel compilation included" in line
               for line in lines) == 1
