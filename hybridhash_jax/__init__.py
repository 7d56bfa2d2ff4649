"""HybridHash deep hashing in JAX/Flax."""

__version__ = "0.1.0"
