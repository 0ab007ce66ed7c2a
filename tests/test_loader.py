"""accel's loader: misaligned (memory-mapped) parameters get their own aligned memory, ties kept; named models and
folders resolve to the folder from_pretrained takes."""
import pytest
import torch

import accel
from accel.models.loader import _own_weights, local_path

from .conftest import tiny_model


def test_misaligned_parameters_get_aligned_memory_and_stay_tied():
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, one Parameter
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():  # views 4 bytes into a buffer: what an 8-byte-aligned safetensors offset gives
        buf = torch.empty(p.numel() + 1, dtype=p.dtype)
        view = buf[1:].view_as(p)
        view.copy_(p.data)
        p.data = view
    assert all(p.data_ptr() % 64 for p in model.parameters())
    _own_weights(model)
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(p, values[n]) for n, p in model.named_parameters())


def test_local_path_resolves_folders_and_refuses_unknown_names(tmp_path):
    assert local_path(str(tmp_path)) == tmp_path
    with pytest.raises(accel.AccelError, match="neither a named model .* nor an existing folder"):
        local_path("no-such-model")
