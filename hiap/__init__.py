"""HiAP: hierarchical auto-pruning of Vision Transformers (arXiv 2603.12222).

Learnable Gumbel-Sigmoid gates on whole heads and FFN blocks (macro) and on head dims and neurons (micro), trained in
one run against an analytic MAC budget; the smaller physical network is then extracted with no fine-tuning.

    import hiap, timm
    gated = hiap.gate_vit(timm.create_model("deit_small_patch16_224"), hiap.HiAPConfig(target=2 / 3))
    ...train with hiap.HiAPObjective...
    pruned = hiap.extract(gated)
    hiap.save_pruned(pruned, "deit_s_pruned.safetensors")
"""

from hiap.architecture import UnsupportedModelError, build_vit, describe_vit
from hiap.config import HiAPConfig, kernels_in_use, use_reference_kernels, use_triton_kernels
from hiap.convert import HiAPViT, gate_vit
from hiap.cost import count_macs, dense_macs, expected_cost, expected_macs
from hiap.extract import extract, load_pruned, pruned_layout, read_layout, save_pruned
from hiap.gates import temperature_at
from hiap.losses import BudgetLoss, HiAPObjective, distillation_loss, feasibility_loss
from hiap.modules import GatedAttention, GatedMlp
from hiap.pruned import PrunedAttention, PrunedMlp

__version__ = "0.1.0"

__all__ = [
    "BudgetLoss",
    "GatedAttention",
    "GatedMlp",
    "HiAPConfig",
    "HiAPObjective",
    "HiAPViT",
    "PrunedAttention",
    "PrunedMlp",
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
    "pruned_layout",
    "read_layout",
    "save_pruned",
    "temperature_at",
    "use_reference_kernels",
    "use_triton_kernels",
]
