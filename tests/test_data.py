import pytest
import torch
from PIL import Image

from hiap.app.data import ShardedBatchSampler, build_datasets, check_imagefolder, num_classes_of
from hiap.app.models import create_dense_model
from hiap.app.runtime import InputError


def test_digits_split_is_deterministic_stratified_and_shaped_for_the_model():
    model = create_dense_model("digits_vit", 10, model_args={"depth": 1})
    bundle = build_datasets(None, model, val_fraction=0.2, split_seed=0)
    again = build_datasets("digits", model, val_fraction=0.2, split_seed=0)
    assert len(bundle.train) + len(bundle.val) == 1797 and len(bundle.val) == 360
    assert torch.equal(bundle.val.labels, again.val.labels) and torch.equal(bundle.val.cached, again.val.cached)
    image, label = bundle.train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32 and 0 <= int(label) < 10
    counts = torch.bincount(bundle.val.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 of each digit
    other = build_datasets(None, model, val_fraction=0.2, split_seed=1)
    assert not torch.equal(other.val.labels, bundle.val.labels)


def test_digits_follow_a_three_channel_model_input():
    model = create_dense_model("vit_tiny_patch16_224", 10, model_args={"img_size": 32, "patch_size": 8, "depth": 1})
    image, _ = build_datasets(None, model).val[3]
    assert image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[2])  # the gray digit repeated over the channels


def test_batch_order_is_sharded_per_rank_and_resumable_mid_epoch():
    full = ShardedBatchSampler(100, 16, seed=3)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == full.steps_per_epoch == 6 and all(len(b) == 16 for b in batches)
    full.set_epoch(2, start_step=4)
    assert list(full) == batches[4:]
    full.set_epoch(3)
    assert list(full) != batches
    ranks = [ShardedBatchSampler(100, 16, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    for step, (first, second) in enumerate(zip(*ranks)):
        assert len(first) == len(second) == 8 and first + second == batches[step]


def test_sampler_rejects_batches_that_do_not_fit():
    with pytest.raises(InputError, match="not divisible"):
        ShardedBatchSampler(100, 15, seed=0, world_size=2)
    with pytest.raises(InputError, match="larger than the training set"):
        ShardedBatchSampler(10, 16, seed=0)


def _write_tree(root, splits=("train", "val"), classes=("cat", "dog")):
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for item in range(2):
                Image.new("RGB", (20, 20), color=(40 * index, 10 * item, 90)).save(folder / f"{item}.png")


def test_imagefolder_tree_uses_timm_transforms(tmp_path):
    _write_tree(tmp_path)
    assert num_classes_of(str(tmp_path)) == 2
    model = create_dense_model("vit_tiny_patch16_224", 2, model_args={"img_size": 32, "patch_size": 8, "depth": 1})
    bundle = build_datasets(str(tmp_path), model)
    image, label = bundle.val[0]
    assert image.shape == (3, 32, 32) and label in (0, 1)
    assert len(bundle.train) == 4 and bundle.num_classes == 2


def test_missing_or_malformed_dataset_paths_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_imagefolder(tmp_path / "absent")
    _write_tree(tmp_path / "partial", splits=("train",))
    with pytest.raises(InputError, match="no val/ folder"):
        check_imagefolder(tmp_path / "partial")


class _UnreadableDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise InputError(f"image {index}.png is not a readable image (UnidentifiedImageError)")


def test_an_input_error_in_a_loader_worker_stays_one_line():
    from hiap.app.data import eval_loader

    with pytest.raises(InputError) as caught:
        next(iter(eval_loader(_UnreadableDataset(), 2, workers=1)))
    assert str(caught.value) == "image 0.png is not a readable image (UnidentifiedImageError)"


def test_mnist1d_is_generated_without_download_split_like_the_digits_and_leaves_the_random_state():
    import random

    import numpy as np

    from hiap.app.data import MNIST1D

    pytest.importorskip("mnist1d")
    model = create_dense_model("mnist1d_vit", 10)
    numpy_before, python_before = np.random.get_state()[1].copy(), random.getstate()
    bundle = build_datasets(MNIST1D, model)
    assert np.array_equal(np.random.get_state()[1], numpy_before) and random.getstate() == python_before
    assert (len(bundle.train), len(bundle.val), bundle.num_classes) == (9600, 2400, 10)
    signal, label = bundle.val[0]
    assert signal.shape == (1, 1, 40) and signal.dtype == torch.float32 and 0 <= int(label) < 10
    with torch.no_grad():
        assert model(signal[None]).shape == (1, 10)
    labels = torch.stack([bundle.val[i][1] for i in range(len(bundle.val))])
    assert torch.bincount(labels, minlength=10).tolist() == [240] * 10  # stratified
    with pytest.raises(InputError, match="mnist1d_vit"):
        build_datasets(MNIST1D, create_dense_model("digits_vit", 10))


def test_the_paper_table3_preset_is_the_six_block_vit_tiny():
    import hiap

    model = create_dense_model("paper_table3_vit", 10)
    assert (len(model.blocks), model.embed_dim, model.blocks[0].attn.num_heads) == (6, 192, 3)
    linear_macs = 6 * 65 * 12 * 192 * 192 + 64 * 192 * 48 + 192 * 10  # what the paper's 174 M counts
    assert round(linear_macs / 1e6) == 173
    assert hiap.count_macs(model) == linear_macs + 6 * 2 * 65 * 65 * 192  # plus the attention matrices
