"""Integrations with other libraries (optional dependencies, imported on demand).

- :mod:`moe_offload.integrations.transformers`: Hugging Face transformers (>= 5.0).
"""
