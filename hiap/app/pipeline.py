"""The HiAP pipeline behind ``hiap prune`` and ``hiap compare``: on a session (``session.py``: settings, cached dense
teacher, data), gating, one single-stage HiAP run, extraction, evaluation, report; and the baselines trained at the
same budget.

Every function here runs on every rank of a ``torchrun`` job (training and evaluation are collective); only rank 0
writes files.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import asdict, replace
from typing import Iterator

import torch
import torch.nn as nn

from hiap.app.baselines import apply_baseline
from hiap.app.checkpoint import JsonlLog, check_resume, read_checkpoint
from hiap.app.run_folder import RunFolder
from hiap.app.data import eval_loader
from hiap.app.evaluation import summarize
from hiap.app.jobs import DistillJob, HiAPJob
from hiap.app.peers import PEERS, apply_torch_pruning
from hiap.app.report import gate_probabilities, layer_structure, write_prune_report
from hiap.app.runtime import (
    DistContext,
    InputError,
    is_rank0,
    atomic_write_json,
    describe_machine,
    gather_floats,
    log_line,
)
from hiap.app.session import (
    PipelineSettings,
    Session,
    _fingerprint_key,
    prepare_session,
    teacher_fingerprint,
    with_tokens,
)
from hiap.app.train import fit
from hiap.backend import use_triton_kernels
from hiap.config import HiAPConfig
from hiap.files import RunFolderBusy, RunFolderLock, remove_stale_temporaries
from hiap.method.convert import HiAPViT, gate_vit, order_units_by_magnitude
from hiap.method.cost import count_macs, dense_macs
from hiap.method.extract import extract, save_pruned
from hiap.method.budget import TOLERANCE, settle_budget
from hiap.method.gates import resolve_groups
from hiap.method.pruner import Pruner, fixed_structure
from hiap.tokens import schedule_for


def _check_resume(settings: PipelineSettings, folder: RunFolder) -> None:
    """A --resume whose settings differ from the checkpoint's is refused before anything is trained."""
    if settings.resume and folder.checkpoint.exists():
        saved = read_checkpoint(folder.checkpoint, phase="hiap")["fingerprint"]
        check_resume(folder.checkpoint, saved, run_fingerprint(settings, None, "hiap"))


# --------------------------------------------------------------------------------------------------------------------
# HiAP and baselines
# --------------------------------------------------------------------------------------------------------------------

def _try_triton(model: nn.Module, session: Session) -> str:
    if session.device.type != "cuda":
        return "reference"
    try:
        use_triton_kernels(model)
        return "triton"
    except RuntimeError as error:
        log_line(f"[kernels] Triton unavailable ({error}); using the PyTorch reference path", session.ctx)
        return "reference"


def gate_checksums(gated: HiAPViT) -> list[float]:
    """Two numbers that differ when any gate logit differs: plain and position-weighted sums (float64)."""
    flat = torch.cat([p.detach().double().flatten() for p in gated.gate_logits().values()])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    return [float(flat.sum()), float((flat * weights).sum())]


def _summaries(session: Session, models: dict[str, nn.Module], settings: PipelineSettings) -> dict[str, dict]:
    loader = eval_loader(session.data.val, settings.eval_batch_size, rank=session.ctx.rank,
                         world_size=session.ctx.world_size, workers=settings.workers)
    return summarize(models, loader, session.device, amp=settings.amp, ctx=session.ctx,
                     latency_batch=settings.latency_batch, latency_rounds=settings.latency_repeats,
                     compile=settings.compile, show_progress=settings.show_progress)


def run_fingerprint(settings: PipelineSettings, session: Session | None, method: str) -> dict:
    """The settings that shape a run's training; a resume must match them (computable before any training)."""
    teacher_key = session.teacher_key if session is not None else _fingerprint_key(teacher_fingerprint(settings))
    return {"method": method, "hiap": settings.hiap.to_dict(), "teacher": teacher_key,
            "epochs": settings.epochs, "batch_size": settings.batch_size, "weight_decay": settings.weight_decay,
            **settings.data_fingerprint()}


def run_hiap(settings: PipelineSettings, session: Session, folder: RunFolder, log: JsonlLog,
             dense_summary: dict | None = None) -> dict:
    """One single-stage HiAP run into ``folder``: train (resumable), extract, evaluate, save, report.

    ``dense_summary`` reuses the teacher's numbers (``hiap compare`` measures them once); None measures them here.
    """
    ctx = session.ctx
    steps_per_epoch = len(session.data.train) // settings.batch_size
    try:
        pruner = Pruner(session.teacher, settings.hiap, total_steps=settings.epochs * steps_per_epoch,
                        teacher=session.teacher)
    except ValueError as error:
        raise InputError(str(error)) from error
    gated = pruner.model
    kernels = _try_triton(gated, session)
    result = fit(HiAPJob(pruner), session.data, settings.loop(settings.epochs, settings.hiap.seed), ctx=ctx,
                 device=session.device, checkpoint_path=folder.checkpoint, log=log,
                 fingerprint=run_fingerprint(settings, session, "hiap"), resume=settings.resume)
    gated.eval()
    # A fixed structure was settled when it was fixed (the event says how far) and trained as decided since; with
    # fix_at=1 the settling guard acts after the last step.
    fixed = fixed_structure(result.history)
    settling = pruner.finish()
    pruned = pruner.extract()
    if count_macs(pruned) != count_macs(gated):
        raise RuntimeError("extracted MACs differ from the gated model's decision")
    _try_triton(pruned, session)
    table = getattr(pruner.cost, "table", None)  # a latency budget's table: measure where it was measured
    measured = settings if table is None else replace(settings, latency_batch=table.batch)
    models = {"pruned": pruned} if dense_summary is not None and table is None else \
        {"dense": session.teacher, "pruned": pruned}
    with _threads(None if table is None else table.threads):
        summaries = _summaries(session, with_tokens(models, settings.tokens), measured)
    summaries.setdefault("dense", dense_summary)
    checksums = gather_floats(gate_checksums(gated), ctx, session.device)
    target = pruner.target
    unit = "MACs" if table is None else "latency (table)"
    fraction = summaries["pruned"]["macs"] / dense_macs(gated)
    budget_fraction = fraction if table is None else pruner.decided_fraction()
    if target is not None and abs(budget_fraction / target - 1) > TOLERANCE:
        log_line(f"[hiap] warning: the extracted {unit} is {budget_fraction:.4f} of dense, "
                 f"{100 * (budget_fraction / target - 1):+.1f}% off the {target:.4f} target; more --epochs give the "
                 "budget more time to settle", ctx, logging.WARNING)
    elif settling and settling["steps"]:
        log_line(f"[hiap] budget settling: decided {unit} {settling['before']:.4f} -> {settling['after']:.4f} of "
                 f"dense in {settling['steps']} logit-only steps after the last training step", ctx)
    outcome = {
        "method": "hiap", "budget": settings.hiap.budget, "target": target, "seed": settings.hiap.seed,
        "dense": summaries["dense"], "pruned": summaries["pruned"], "dense_macs": dense_macs(gated),
        "fraction": fraction, "budget_fraction": budget_fraction,
        "target_error": None if target is None else budget_fraction / target - 1, "settling": settling,
        "latency": None if table is None else _latency_outcome(table, target, pruned, summaries,
                                                               settings.hiap.latency_table),
        "fixed_structure": fixed,
        "steps": result.steps, "resumed_from": result.resumed_from, "history": result.history,
        "structure": layer_structure(gated), "gates": gate_probabilities(gated), "kernels": kernels,
        "threads": session.threads,
        "world_size": ctx.world_size, "gate_checksums": checksums,
        "gates_in_sync": all(c == checksums[0] for c in checksums),
        "data": session.data.description, "model": settings.model, "notes": session.notes,
        "settings": settings_record(settings),
        "tokens": None if settings.tokens is None else {
            "schedule": schedule_for(pruned, settings.tokens).describe(),
            "spec": settings.tokens, **{name.removesuffix("+tokens"): summaries[name]
                                        for name in summaries if name.endswith("+tokens")}},
    }
    if ctx.is_main:
        save_pruned(pruned, folder.pruned)
        write_prune_report(folder, outcome, JsonlLog.read(folder.log))
    ctx.barrier()
    return outcome


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the block (None: unchanged)."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _latency_outcome(table, target: float, pruned: nn.Module, summaries: dict, path: str) -> dict:
    """A latency budget's figures side by side: target, the table's prediction for the extracted model, its measured
    latency and the dense model's (measured in the same interleaved rounds), all at the table's batch and threads."""
    dense, measured = summaries["dense"]["latency"], summaries["pruned"]["latency"]
    return {"target_ms": target * table.dense_predicted_ms, "predicted_ms": table.predict(pruned),
            "measured_ms": measured["ms_per_batch"], "measured_quartiles_ms": [measured["q1_ms"], measured["q3_ms"]],
            "dense_ms": dense["ms_per_batch"], "dense_quartiles_ms": [dense["q1_ms"], dense["q3_ms"]],
            "dense_predicted_ms": table.dense_predicted_ms, "table": str(path), "batch": table.batch,
            "threads": table.threads, "device": table.device_name}


def run_baseline(method: str, settings: PipelineSettings, session: Session, folder: RunFolder, seed: int,
                 dense_summary: dict) -> dict:
    """Baseline ``method`` at ``settings.hiap.target``: fixed gates, extraction, then the HiAP run's KD budget."""
    ctx = session.ctx
    log = _run_log(folder, settings, ctx)
    if method in PEERS:
        # Its own choice of single dims and neurons: a per-dim gated copy without hard minimums records it exactly;
        # its widths are rounded to HiAP's groups so that both methods leave equally aligned layers.
        dense_block = session.teacher.blocks[0]
        round_to, _ = resolve_groups(settings.hiap.dim_group, settings.hiap.neuron_group, dense_block.attn.head_dim,
                                     dense_block.mlp.fc1.out_features)
        per_dim = replace(settings.hiap, dim_group=1, neuron_group=1, min_heads=0, min_dim_fraction=0.0,
                          min_neuron_fraction=0.0)
        gated = gate_vit(session.teacher, per_dim).eval()
        choice = apply_torch_pruning(gated, session.teacher, settings.hiap.target, round_to)
    else:
        gated = gate_vit(session.teacher, settings.hiap).eval()
        if settings.hiap.order_units:  # the units in the order HiAP's gates see them
            order_units_by_magnitude(gated)
        choice = apply_baseline(method, gated, settings.hiap.target)
    pruned = extract(gated)
    pruned.pretrained_cfg = getattr(session.teacher, "pretrained_cfg", None)
    cfg = settings.hiap
    job = DistillJob(pruned.train(), session.teacher, lr=cfg.lr, alpha=cfg.kd_alpha, temperature=cfg.kd_temperature,
                     phase=method)
    fingerprint = {**run_fingerprint(settings, session, method), "seed": seed}
    result = fit(job, session.data, settings.loop(settings.epochs, seed), ctx=ctx, device=session.device,
                 checkpoint_path=folder.checkpoint, log=log, fingerprint=fingerprint, resume=settings.resume)
    pruned.eval()
    _try_triton(pruned, session)
    summary = _summaries(session, {"pruned": pruned}, settings)["pruned"]
    outcome = {"method": method, "target": cfg.target, "seed": seed, "dense": dense_summary, "pruned": summary,
               "dense_macs": dense_macs(gated), "fraction": summary["macs"] / dense_macs(gated), "choice": choice,
               "steps": result.steps, "history": result.history, "structure": layer_structure(gated)}
    if ctx.is_main:
        save_pruned(pruned, folder.pruned)
        atomic_write_json(outcome, folder.result)
    ctx.barrier()
    return outcome


def settings_record(settings: PipelineSettings) -> dict:
    record = asdict(settings)
    record["hiap"] = settings.hiap.to_dict()
    return record


def _run_log(folder: RunFolder, settings: PipelineSettings, ctx: DistContext | None = None) -> JsonlLog:
    """The run's JSONL log. A fresh (not resumed) run starts with an empty log and no checkpoint, so a later
    ``--resume`` can never pick up what an older run into the same folder left behind."""
    log = JsonlLog(folder.log, enabled=ctx.is_main if ctx is not None else is_rank0())
    if not settings.resume and log.enabled:
        log.path.unlink(missing_ok=True)
        folder.checkpoint.unlink(missing_ok=True)
    return log


@contextlib.contextmanager
def owned_output(folder: RunFolder, settings: PipelineSettings) -> Iterator[None]:
    """Hold ``folder`` for one run: an exclusive lock for its lifetime (a second run gets a one-line error), the
    temporary files an interrupted write left removed, and a fresh run refusing a folder with an earlier run's
    outputs unless ``--overwrite`` (which clears them first, so nothing of the old run mixes in) or ``--resume``."""
    if not is_rank0():
        yield
        return
    root = folder.root
    if root.exists() and not root.is_dir():
        raise InputError(f"--output {root} is a file, not a folder")
    try:
        lock = RunFolderLock(root).__enter__()
    except RunFolderBusy as error:
        raise InputError(f"{error}; wait for it to finish or choose another --output") from None
    try:
        remove_stale_temporaries(root)
        earlier = folder.earlier_outputs()
        if earlier and not settings.resume:
            if not settings.overwrite:
                raise InputError(f"{root} holds the outputs of an earlier run ({', '.join(earlier[:4])}"
                                 f"{', ...' if len(earlier) > 4 else ''}); pass --overwrite to replace them, "
                                 "--resume to continue that run, or choose another --output")
            for name in earlier:
                target = root / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        yield
    finally:
        lock.__exit__(None, None, None)


def prune(settings: PipelineSettings) -> dict:
    """``hiap prune``: the whole pipeline into ``settings.output``; returns the report's content."""
    folder = RunFolder(settings.output)
    with owned_output(folder, settings):
        _check_resume(settings, folder)
        log = _run_log(folder, settings)
        session = prepare_session(settings, log)
        return run_hiap(settings, session, folder, log)


def compare(settings: PipelineSettings, seeds: list[int], targets: list[float], methods: list[str]) -> dict:
    """``hiap compare``: HiAP and the baselines at every target and seed, each in ``output/<method>-t<target>-s<seed>``."""
    folder = RunFolder(settings.output)
    with owned_output(folder, settings):
        return _compare(settings, folder, seeds, targets, methods)


def _compare(settings: PipelineSettings, output: RunFolder, seeds: list[int], targets: list[float],
             methods: list[str]) -> dict:
    from hiap.app.report import write_compare_report

    session = prepare_session(settings, _run_log(output, settings))
    dense_summary = _summaries(session, {"dense": session.teacher}, settings)["dense"]
    runs = []
    for target in targets:
        for seed in seeds:
            run_settings = replace(settings, hiap=replace(settings.hiap, target=target, seed=seed))
            for method in methods:
                folder = output.run(method, target, seed)
                log_line(f"[compare] {method} at {target:.3f} of dense MACs, seed {seed}", session.ctx)
                if method == "hiap":
                    outcome = run_hiap(run_settings, session, folder, _run_log(folder, settings, session.ctx),
                                       dense_summary)
                else:
                    outcome = run_baseline(method, run_settings, session, folder, seed, dense_summary)
                runs.append({k: v for k, v in outcome.items() if k not in ("history", "structure", "gates")})
    report = {"dense": dense_summary, "seeds": seeds, "targets": targets, "methods": methods, "runs": runs,
              "val_size": len(session.data.val), "machine": describe_machine(session.device),
              "data": session.data.description, "model": settings.model, "settings": settings_record(settings)}
    if session.ctx.is_main:
        write_compare_report(output, report)
    return report


def rebuild_gated(payload: dict) -> HiAPViT:
    """The gated model of a HiAP training checkpoint (architecture, config, weights) as ``hiap prune`` extracts it:
    in eval mode, with the same budget settling applied (none once the run has fixed its structure: that was settled
    when it was fixed)."""
    from hiap.method.architecture import build_vit

    try:
        cfg = HiAPConfig.from_dict(payload["hiap_config"])
        gated = gate_vit(build_vit(payload["architecture"]), cfg)
        gated.load_state_dict(payload["model"])
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        raise InputError(f"the checkpoint does not describe a gated model: {error}") from error
    gated.eval()
    if fixed_structure(payload.get("history")) is None:
        settle_budget(gated, TOLERANCE)  # as Pruner.finish() does for a run that has not fixed its structure
    return gated
