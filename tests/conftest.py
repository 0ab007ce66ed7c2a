import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("ACCEL_CACHE_DIR", os.path.expanduser("~/.cache/accel"))



def pytest_report_header(config):
    import transformers

    return f"transformers {transformers.__version__} ({transformers.__file__})"


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]


def tiny_config(arch: str):
    """2-4 layer random models with GQA (G=2) built from configs: no download."""
    import transformers as T

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return T.LlamaConfig(num_hidden_layers=2, **common)
    if arch == "mistral":  # sliding window on every layer, small enough to be exercised
        return T.MistralConfig(num_hidden_layers=2, sliding_window=16, **common)
    if arch == "qwen2":
        return T.Qwen2Config(num_hidden_layers=2, **common)
    if arch == "qwen3":
        return T.Qwen3Config(num_hidden_layers=2, head_dim=16, **common)
    if arch == "gemma3_text":
        return T.Gemma3TextConfig(num_hidden_layers=4, head_dim=16, sliding_window=16,
                                  layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                               "full_attention"], query_pre_attn_scalar=16, **common)
    if arch == "phi3":
        return T.Phi3Config(num_hidden_layers=2, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa", dtype=dtype)
    return m.eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param
