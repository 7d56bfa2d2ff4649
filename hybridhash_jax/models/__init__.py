"""The HybridHash model and its presets."""

from hybridhash_jax.models.hybridhash import (
    PRESETS, HybridHash, abstract_params, from_config, hybridhash_paper, hybridhash_tiny32, hybridhash_tiny112,
    model_config)

__all__ = ["PRESETS", "HybridHash", "abstract_params", "from_config", "hybridhash_paper", "hybridhash_tiny32",
           "hybridhash_tiny112", "model_config"]
