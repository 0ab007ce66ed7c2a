"""TPLA: tensor-parallel latent attention for MLA models (DeepSeek-V2/V3); see ``accel.tpla.policy``."""
from .calibrate import calibrate_pca, load_pca, plan_tpla, save_pca  # noqa: F401
from .mla import mla_reference, tpla_decode  # noqa: F401


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Initialise ``torch.distributed`` from torchrun's environment (gloo on CPU, NCCL when CUDA is
    available) if it is not already; returns ``(rank, world_size)``."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return dist.get_rank(), dist.get_world_size()
