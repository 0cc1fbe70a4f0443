"""The application around the method: what ``hiap prune / compare / extract / eval / export`` run.

    cli.py          the commands and main: one-line errors with exit status 2
    flags.py        the flags (every HiAPConfig field generated as one) and the up-front checks of their values
    session.py      settings, the cached dense teacher, data, the checks that run before any training
    pipeline.py     teacher (cached) -> gate -> HiAP training -> extract -> evaluate -> report; baselines alike
    train.py        one resumable, DDP-aware training loop and the jobs it runs (teacher, HiAP, KD fine-tuning)
    checkpoint.py   the JSONL run log and the atomic, strictly read training checkpoint
    data.py         digits (ships with scikit-learn), MNIST-1D (generated, no download) or an ImageFolder tree;
                    deterministic sharded batch order
    models.py       dense models by timm name, the presets (digits_vit, mnist1d_vit, paper_table3_vit), local weights
    evaluation.py   accuracy, loss, MACs, parameters, latency
    baselines.py    uniform-ratio and l1-structured pruning at a MAC budget
    peers.py        Torch-Pruning's ViT recipe at a MAC budget (the [peers] extra)
    report.py       report.md / report.json, compare.md / compare.json, the console tables
    plots.py        the plots they embed: structure, gates and MACs over training, accuracy vs MACs
    export.py       ONNX export checked with onnxruntime
    runtime.py      devices, threads, distributed setup, atomic writes, progress bars, InputError
"""
