"""Worker for tests/test_tpla.py::test_distributed_ranks_equal_simulated_shards (run under torchrun, 2 ranks,
gloo): TPLA with one rank per shard gives the simulated shards' logits, each rank holds one shard's cache
bytes and a share of the weights, and remove() restores every weight exactly."""
import torch

import accel
from tests.conftest import decode_logits, tiny_mla
from tests.conftest import mla_prompt as prompt

torch.set_num_threads(1)
rank, world = accel.tpla.init_distributed("gloo")
for version, q_lora in ((3, 48), (2, None)):
    m = tiny_mla(version, q_lora)
    ids, mask = prompt(pad=3)
    ref_state = {k: v.clone() for k, v in m.state_dict().items()}
    full_params = sum(p.numel() for p in m.parameters())
    def mlp_params(model):  # MLP / expert weights; the MoE router ("gate") is replicated on every rank
        return sum(p.numel() for layer in model.model.layers for n, p in layer.mlp.named_parameters()
                   if not n.startswith("gate."))

    mlp_full = mlp_params(m)
    for kw in ({"transform": "hadamard"}, {"transform": "identity", "reduce": "logits"},
               {"transform": "hadamard", "rope_mode": "split"}, {"transform": "hadamard", "exact_layers": [1]},
               {"transform": "hadamard", "attn_weights": "split"}, {"reduce": "logits", "attn_weights": "split"}):
        sim_kw = {k: v for k, v in kw.items() if k != "attn_weights"}
        with accel.patch(m, "tpla", shards=world, **sim_kw) as h:
            sim = decode_logits(m, ids, mask)
            sim_bytes = h.shard_nbytes()
            with torch.no_grad():
                g_sim = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        with accel.patch(m, "tpla", shards=world, execution="distributed", **kw) as h:
            got = decode_logits(m, ids, mask)
            assert h.shard_nbytes() == sim_bytes[rank:rank + 1], (h.shard_nbytes(), sim_bytes)
            assert mlp_params(m) * world == mlp_full
            assert sum(p.numel() for p in m.parameters()) < full_params
            with torch.no_grad():
                g = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        err = float((got - sim).abs().max())
        assert err < 1e-5, (version, kw, err)
        assert torch.equal(g, g_sim), (version, kw)
    assert all(torch.equal(v, ref_state[k]) for k, v in m.state_dict().items())
if rank == 0:
    print("TPLA_DIST_OK")
