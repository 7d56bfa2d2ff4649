"""The HybridHash model and its presets."""

from hybridhash_jax.models.hybridhash import (
    ARCHITECTURE_FIELDS, CHOICES, CONFIG_FIELDS, DTYPES, PRESETS, TOKEN_LAYOUTS, HybridHash, abstract_params,
    for_host, from_config, hybridhash_paper, hybridhash_tiny32, hybridhash_tiny112, model_config)

__all__ = ["ARCHITECTURE_FIELDS", "CHOICES", "CONFIG_FIELDS", "DTYPES", "PRESETS", "TOKEN_LAYOUTS", "HybridHash",
           "abstract_params", "for_host", "from_config", "hybridhash_paper", "hybridhash_tiny32", "hybridhash_tiny112",
           "model_config"]
