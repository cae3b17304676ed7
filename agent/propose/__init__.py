"""Proposers: where edits come from. `make_proposer` is the one place that maps a CLI choice to a class."""
import os

from agent.propose.base import Context, Proposal, Proposer, SmokeResult, Usage

KINDS = ("catalog", "anthropic", "openai")


def make_proposer(kind: str, model: str | None = None, base_url: str | None = None, tools: bool = True,
                  hardware: str | None = None) -> Proposer:
    if kind == "catalog":
        from agent.propose.catalog import CatalogProposer
        return CatalogProposer(hardware) if hardware else CatalogProposer()
    if kind == "anthropic":
        from agent.propose.anthropic_proposer import AnthropicProposer
        return AnthropicProposer(**({"model": model} if model else {}), base_url=base_url, tools=tools)
    if kind == "openai":
        from agent.propose.openai_proposer import OpenAIProposer
        return OpenAIProposer(**({"model": model} if model else {}), base_url=base_url, tools=tools)
    raise ValueError(f"unknown proposer {kind!r} (choose from {', '.join(KINDS)})")


def default_kind() -> str:
    """With no choice made: an LLM if its key is set, else the offline catalog."""
    if os.environ.get("ANTHROPIC_API_KEY"):
        return "anthropic"
    if os.environ.get("OPENAI_API_KEY"):
        return "openai"
    return "catalog"


__all__ = ["Context", "Proposal", "Proposer", "SmokeResult", "Usage", "make_proposer", "default_kind", "KINDS"]
