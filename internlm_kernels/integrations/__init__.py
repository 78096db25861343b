"""Integrations with other libraries; each module imports its library lazily, on use.

``internlm_kernels.integrations.transformers``: ``register()`` makes ``attn_implementation="internlm_kernels"``
available to Hugging Face transformers models.
"""
