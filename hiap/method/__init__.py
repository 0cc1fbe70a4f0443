"""The HiAP method, independent of any training pipeline.

    pruner.py         hiap.Pruner: the whole search for a user's loop (gate optimizer and schedule, anneal, target
                      ramp, controller, landing, structure fix, retirement, state, extraction)
    budget.py         landing the decided cost on the target in logit order, and the settling guard
    latency.py        the latency table (its predictions) and the latency budget read from it
    profile.py        measuring that table on a device (hiap profile), fitted; the device's name for records

    gates.py          the one home of the gates: per-layer gate objects (logits, decision, keep probabilities, draw),
                      the model's gate schedule (temperature, step seed), offsets, the temperature anneal
    gated.py          GatedAttention / GatedMlp: timm's Attention / Mlp with gates; masks on the weights or the fused
                      gated GEMM, whichever a layer measures faster; the gate sampler per backend
    convert.py        gate_vit: a timm VisionTransformer -> HiAPViT (the gated model)
    architecture.py   which timm ViTs are supported, their skeleton as JSON (describe_vit / build_vit), and the timm
                      pretrained_cfg of the data a model reads (data_pretrained_cfg)
    cost.py           the analytic MAC model: count_macs (hard decisions), the differentiable expectation, MacBudget
    token_overhead.py what a token-reduction step adds to the MACs, read by cost.py and by hiap.tokens
    losses.py         the HiAP objective: task + distillation, budget (penalty, MAC or latency target), feasibility
    pruned.py         PrunedAttention / PrunedMlp: the physical modules extraction leaves
    extract.py        extract, and the pruned-model file format (save_pruned / load_pruned)
    layout.py         the pruned layout's schema (and its stored pretrained_cfg's), checked with bounds before anything
                      is allocated
    inference.py      hiap.optimize: the fastest path per layer, measured on the device; torch.compile
"""
