"""AccelCache behaves like transformers' DynamicCache where it must, and better where it should."""
import torch
from transformers.cache_utils import DynamicCache

from accel.cache import AccelCache

from .conftest import tiny_config


def _steps(seed=0, B=2, H=2, D=8, sizes=(37, 1, 1, 5, 1, 30, 1)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)) for n in sizes]


def test_same_states_as_dynamic_cache_full_and_sliding():
    cfg = tiny_config("gemma3_text")  # layers 0-2 sliding (window 16), layer 3 full
    ours, ref = AccelCache(cfg), DynamicCache(config=cfg)
    for k, v in _steps():
        for layer in range(4):
            assert ours.get_mask_sizes(k.shape[2], layer) == ref.get_mask_sizes(k.shape[2], layer)
            ko, vo = ours.update(k, v, layer)
            kr, vr = ref.update(k, v, layer)
            assert torch.equal(ko, kr) and torch.equal(vo, vr)
        assert ours.get_seq_length() == ref.get_seq_length()


def test_appends_in_place_with_geometric_growth():
    cache = AccelCache(num_layers=1)
    k = torch.randn(1, 2, 100, 16)
    cache.update(k, k, 0)
    ptrs = set()
    for _ in range(2000):
        t = torch.randn(1, 2, 1, 16)
        cache.update(t, t, 0)
        ptrs.add(cache.layers[0].k_buf.data_ptr())
    assert cache.get_seq_length() == 2100
    # 2100 tokens from a 256-token start with x1.5 growth: a handful of reallocations, not 2000
    assert cache.num_reallocations <= 7 and len(ptrs) <= 8


def test_reserve_avoids_reallocation_and_bytes_are_reported():
    cache = AccelCache(num_layers=2, reserve=600)
    k = torch.randn(1, 3, 500, 64)
    for layer in range(2):
        cache.update(k, k, layer)
    for _ in range(100):
        t = torch.randn(1, 3, 1, 64)
        for layer in range(2):
            cache.update(t, t, layer)
    assert cache.num_reallocations == 0
    assert cache.nbytes() == 2 * 3 * 600 * 64 * 4 * 2
    assert cache.layers[0].head_lengths.tolist() == [[600, 600, 600]]


def test_crop_and_batch_ops():
    cache = AccelCache(num_layers=1)
    k = torch.randn(3, 2, 10, 4)
    cache.update(k, k, 0)
    cache.crop(-4)
    assert cache.get_seq_length() == 6 and torch.equal(cache.layers[0].keys, k[:, :, :6])
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(cache.layers[0].keys, k[[2, 0], :, :6])
