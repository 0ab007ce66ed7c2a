"""TPLA: tensor-parallel latent attention for MLA models (DeepSeek-V2/V3); see ``accel.tpla.policy``."""
from .calibrate import calibrate_pca, load_pca, save_pca  # noqa: F401
from .mla import mla_reference, tpla_decode  # noqa: F401
