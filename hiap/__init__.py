"""HiAP: hierarchical auto-pruning of Vision Transformers (arXiv 2603.12222).

Learnable Gumbel-Sigmoid gates on whole heads and FFN blocks (macro) and on head dims and neurons (micro), trained in
one run against an analytic MAC budget; the smaller physical network is then extracted with no fine-tuning.

    import hiap, timm
    gated = hiap.gate_vit(timm.create_model("deit_small_patch16_224"), hiap.HiAPConfig(target=2 / 3))
    ...train with hiap.HiAPObjective...
    pruned = hiap.extract(gated)
    hiap.save_pruned(pruned, "deit_s_pruned.safetensors")

Layout: ``hiap.method`` is the method (gates, gated modules, MAC model, losses, extraction, pruned modules);
``hiap.app`` is the application around it (CLI, pipeline, training loop, data, reports, baselines);
``hiap.tokens`` is the second method, token reduction (RAPID-style prune/merge and the ToMe baseline), which patches
any of the models above; ``hiap.config`` (HiAPConfig) and ``hiap.backend`` (the kernel switch) are leaves all use;
``hiap.presets`` registers the command line's small preset ViTs with timm (``timm.create_model("hiap_digits_vit")``).
"""

from hiap.backend import kernels_in_use, use_reference_kernels, use_triton_kernels
from hiap.config import HiAPConfig
from hiap.method.architecture import UnsupportedModelError, build_vit, describe_vit
from hiap.method.convert import HiAPViT, gate_vit
from hiap.method.cost import count_macs, dense_macs, expected_cost, expected_macs
from hiap.method.extract import extract, load_pruned, pruned_layout, read_layout, save_pruned
from hiap.method.gated import GatedAttention, GatedMlp
from hiap.method.gates import AttentionGates, FfnGates, GateDraw, GateSchedule, temperature_at
from hiap.method.inference import optimize
from hiap.method.latency import LatencyTable
from hiap.method.profile import profile_latency
from hiap.method.losses import BudgetLoss, HiAPObjective, distillation_loss, feasibility_loss
from hiap.method.pruned import PrunedAttention, PrunedMlp
from hiap.method.pruner import Pruner
from hiap.tokens import TokenSchedule, reduce_tokens, restore_tokens

from hiap import presets  # noqa: F401,E402  (registers the presets with timm: timm.create_model("hiap_digits_vit"))

__version__ = "0.1.0"

__all__ = [
    "AttentionGates",
    "BudgetLoss",
    "GatedAttention",
    "GatedMlp",
    "FfnGates",
    "GateDraw",
    "GateSchedule",
    "HiAPConfig",
    "HiAPObjective",
    "HiAPViT",
    "LatencyTable",
    "PrunedAttention",
    "PrunedMlp",
    "Pruner",
    "TokenSchedule",
    "UnsupportedModelError",
    "build_vit",
    "count_macs",
    "dense_macs",
    "describe_vit",
    "distillation_loss",
    "expected_cost",
    "expected_macs",
    "extract",
    "feasibility_loss",
    "gate_vit",
    "kernels_in_use",
    "load_pruned",
    "optimize",
    "profile_latency",
    "pruned_layout",
    "read_layout",
    "reduce_tokens",
    "restore_tokens",
    "save_pruned",
    "temperature_at",
    "use_reference_kernels",
    "use_triton_kernels",
]
