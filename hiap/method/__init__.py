"""The HiAP method, independent of any training pipeline.

    gates.py          the one home of the gates: per-layer gate objects (logits, decision, keep probabilities, draw),
                      the model's gate schedule (temperature, step seed), offsets, the temperature anneal
    gated.py          GatedAttention / GatedMlp: timm's Attention / Mlp with gates; masks on the weights, the gate
                      sampler per backend (PyTorch twin or Triton)
    convert.py        gate_vit: a timm VisionTransformer -> HiAPViT (the gated model)
    architecture.py   which timm ViTs are supported, their skeleton as JSON (describe_vit / build_vit), and the timm
                      pretrained_cfg of the data a model reads (data_pretrained_cfg)
    cost.py           the analytic MAC model: count_macs (hard decisions) and the differentiable expectation
    token_overhead.py what a token-reduction step adds to the MACs, read by cost.py and by hiap.tokens
    losses.py         the HiAP objective: task + distillation, MAC budget (penalty or target), feasibility
    pruned.py         PrunedAttention / PrunedMlp: the physical modules extraction leaves
    extract.py        extract, and the pruned-model file format (save_pruned / load_pruned)
    layout.py         the pruned layout's schema (and its stored pretrained_cfg's), checked with bounds before anything
                      is allocated
    inference.py      hiap.optimize: the fastest path per layer, measured on the device; torch.compile
"""
