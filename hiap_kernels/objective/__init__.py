"""The gate terms of the HiAP loss for training: expected and decided MACs, the budget and the feasibility penalties.

    reference.py   ``gate_objective_reference`` and its parts (``expected_gate_macs``, ``feasibility_shortfall``,
                   ``decided_gate_macs``, ``lagrangian_budget``): torch ops on every layer's logits stacked by kind;
                   ``hiap``'s cost model and reference-path objective are built from them
    kernel.py      ``gate_objective``: the same terms and their gradient with respect to every logit in one launch,
                   backward one multiply
"""

from hiap_kernels.objective.reference import (
    GateLayout,
    ObjectiveConstants,
    decided_gate_macs,
    expected_gate_macs,
    feasibility_shortfall,
    gate_objective_reference,
    lagrangian_budget,
)

__all__ = ["GateLayout", "ObjectiveConstants", "decided_gate_macs", "expected_gate_macs", "feasibility_shortfall",
           "gate_objective_reference", "lagrangian_budget"]
