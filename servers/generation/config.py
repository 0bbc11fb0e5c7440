"""The generation service's section of the settings model (servers/common/settings.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from servers.common.settings import parse, setting, validate
from servers.generation.llm import LLMSettings


@dataclass(frozen=True, slots=True)
class GenerationConfig:
    """LLM providers. A provider is offered to tenants once it has a key or a base URL (a
    local OpenAI-compatible server needs no key); the extractive answerer is always there."""

    openai_api_key: str | None = setting(None, env="OPENAI_API_KEY", secret=True, doc="Key for OpenAI.")
    openai_base_url: str | None = setting(None, env="OPENAI_BASE_URL",
                                          doc="An OpenAI-compatible server (vLLM, Ollama, llama.cpp) instead of "
                                              "OpenAI's.")
    openai_model: str = setting("gpt-4o-mini", env="OPENAI_MODEL",
                                doc="Model used for tenants on the openai provider that name none.")
    anthropic_api_key: str | None = setting(None, env="ANTHROPIC_API_KEY", secret=True, doc="Key for Anthropic.")
    anthropic_base_url: str | None = setting(None, env="ANTHROPIC_BASE_URL",
                                             doc="Anthropic's API base URL (tests point it at a local fake).")
    anthropic_model: str = setting("claude-sonnet-4-5", env="ANTHROPIC_MODEL",
                                   doc="Model used for tenants on the anthropic provider that name none.")
    llm_timeout_s: float = setting(30.0, env="COPILOT_LLM_TIMEOUT_S", low=0.1, high=600,
                                   doc="Timeout of one provider call (also bounded by the caller's deadline).")
    llm_max_retries: int = setting(2, env="COPILOT_LLM_MAX_RETRIES", low=0, high=10,
                                   doc="Retries of a failed provider call (the SDK's, with backoff).")

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GenerationConfig:
        return parse(cls, environ)

    @property
    def openai(self) -> LLMSettings:
        return LLMSettings(api_key=self.openai_api_key, base_url=self.openai_base_url,
                           default_model=self.openai_model, timeout_s=self.llm_timeout_s,
                           max_retries=self.llm_max_retries)

    @property
    def anthropic(self) -> LLMSettings:
        return LLMSettings(api_key=self.anthropic_api_key, base_url=self.anthropic_base_url,
                           default_model=self.anthropic_model, timeout_s=self.llm_timeout_s,
                           max_retries=self.llm_max_retries)
