import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from hiap.app.evaluation import evaluate_accuracy, evaluate_classifier


def test_accuracy_and_loss_cover_every_sample_of_uneven_batches():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(37, 5, generator=generator)
    labels = torch.randint(0, 3, (37,), generator=generator)
    model = nn.Linear(5, 3).train()
    loader = DataLoader(TensorDataset(features, labels), batch_size=8)  # 4 batches of 8 and one of 5
    result = evaluate_classifier(model, loader, torch.device("cpu"), show_progress=False)
    with torch.no_grad():
        logits = model(features)
    assert result["accuracy"] == int((logits.argmax(-1) == labels).sum()) / 37
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    assert evaluate_accuracy(model, loader, torch.device("cpu"), show_progress=False) == result["accuracy"]
    assert model.training


def test_latencies_are_interleaved_medians_with_their_spread_and_leave_the_models_untouched():
    import hiap
    from hiap.app.evaluation import measure_latencies
    from hiap.app.report import latency_sentence
    from tests.helpers import randomize_logits, tiny_vit

    dense = tiny_vit()
    gated = hiap.gate_vit(dense)
    randomize_logits(gated, torch.Generator().manual_seed(0))
    pruned = hiap.extract(gated)
    dense.train()
    calls = []
    hooks = [model.register_forward_hook(lambda module, args, out: calls.append(id(module)))
             for model in (dense, pruned)]
    latencies = measure_latencies({"dense": dense, "pruned": pruned}, (3, 32, 32), torch.device("cpu"), batch=2,
                                  warmup=2, rounds=5)
    for hook in hooks:
        hook.remove()
    # Timed on prepared copies (their hooks came along), never on the caller's models, which keep mode and grads.
    assert len(calls) == 2 * 7 and not {id(dense), id(pruned)} & set(calls)
    assert dense.training and all(p.requires_grad for p in dense.parameters())
    for latency in latencies.values():
        assert latency.rounds == 5 and latency.min_ms <= latency.q1_ms <= latency.ms_per_batch <= latency.q3_ms
        assert latency.q3_ms <= latency.max_ms and latency.images_per_second > 0
    assert latencies["pruned"].paths.startswith("attention: sdpa")
    summaries = {name: {"latency": vars(latency)} for name, latency in latencies.items()}
    sentence = latency_sentence(summaries["dense"], summaries["pruned"])
    assert "median (quartiles) of 5 timed forwards" in sentence and "interleaved" in sentence
