"""Proposers: where edits come from. `make_proposer` is the one place that maps a CLI choice to a class."""
import os

from agent.propose.base import Context, Proposal, Proposer, SmokeResult, Usage

KINDS = ("catalog", "anthropic", "openai")


def make_proposer(kind: str, model: str | None = None, base_url: str | None = None, tools: bool = True,
                  hardware: str | None = None, api_key_env: str = "", price: dict | None = None,
                  thinking: str = "auto") -> Proposer:
    """`price`: {"input", "output"} USD per million tokens for the model (prices.py), over the built-in table's."""
    if kind == "catalog":
        from agent.propose.catalog import CatalogProposer
        return CatalogProposer(hardware) if hardware else CatalogProposer()
    cls = _llm_class(kind)
    model = model or cls.model  # the class's default model
    return cls(model=model, base_url=base_url, tools=tools, api_key_env=api_key_env, thinking=thinking,
               prices={model: price} if price else None)


def _llm_class(kind: str) -> type:
    """The LLM proposer's class, its SDK imported only when it is chosen."""
    if kind == "anthropic":
        from agent.propose.anthropic_proposer import AnthropicProposer
        return AnthropicProposer
    if kind == "openai":
        from agent.propose.openai_proposer import OpenAIProposer
        return OpenAIProposer
    raise ValueError(f"unknown proposer {kind!r} (choose from {', '.join(KINDS)})")


def default_kind() -> str:
    """With no choice made: an LLM if its key is set, else the offline catalog."""
    if os.environ.get("ANTHROPIC_API_KEY"):
        return "anthropic"
    if os.environ.get("OPENAI_API_KEY"):
        return "openai"
    return "catalog"


__all__ = ["Context", "Proposal", "Proposer", "SmokeResult", "Usage", "make_proposer", "default_kind", "KINDS"]
