"""Integrations with agent frameworks and gateways (litellm callback, OpenAI wrapper, LangChain)."""
