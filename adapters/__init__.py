"""LLM backends: ``base`` (the protocol), ``transformers`` (local, white-box), ``litellm``."""
