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
