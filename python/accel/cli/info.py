"""`accel info`: versions, kernel backends (and why one is unavailable), policies, models."""
from __future__ import annotations


def run(args) -> int:
    import torch

    from ..models.loader import NAMED_MODELS, converted_path
    from ..models.registry import supported_model_types
    from ..ops.attention import backend_report
    from ..perf import machine_facts
    from ..policies.registry import list_calibratable, list_policies

    facts = machine_facts()
    print(f"accel {facts['accel']}  torch {facts['torch']}  transformers {facts['transformers']}")
    print(f"cpu: {facts['cpu']}  threads: {facts['threads']}  cuda available: {torch.cuda.is_available()}")
    print("\nkernel backends (decode attention):")
    for name, reason in backend_report().items():
        print(f"  {name:7s} {'available' if not reason else 'unavailable: ' + reason}")
    print(f"\npolicies: {', '.join(list_policies())}")
    print(f"calibratable (accel plan --policy NAME, accel.calibrate): {', '.join(list_calibratable())}")
    print(f"architectures: {', '.join(supported_model_types())}")
    from ..vlm.adapters import supported_vlm_types

    print(f"VLM architectures (visual-token pruning): {', '.join(supported_vlm_types())}")
    from ..tpla.adapters import supported_mla_types
    from ..research.mla_models import RANDOM_MODELS

    print(f"MLA architectures (tpla): {', '.join(supported_mla_types())}; random test configs: "
          f"{', '.join(RANDOM_MODELS)}")
    print("\nnamed models:")
    for n, desc in NAMED_MODELS.items():
        cached = (converted_path(n) / "config.json").exists()
        print(f"  {n:14s} {desc} [{'converted' if cached else 'not converted yet'}]")
    return 0
