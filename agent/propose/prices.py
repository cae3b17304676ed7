"""What an LLM call costs: list prices in USD per million tokens, and the cost of one call's usage.

Prices are the providers' published list prices (late 2025; the Claude 5 models as of November 2026); a config may override or add models with
`prices={"model": {"input": 3, "output": 15, ...}}`. A model with no price costs 0 and the proposer says so:
a self-hosted OpenAI-compatible server is free, a new hosted model needs an entry.
"""
import re
from dataclasses import dataclass

from agent.propose.base import Usage

ANTHROPIC_CACHE_READ = 0.1    # Anthropic bills cache hits at 10% of the input price ...
ANTHROPIC_CACHE_WRITE = 1.25  # ... and 5-minute cache writes at 125%
# dated snapshots and aliases that share their base model's price: "claude-sonnet-4-5-20250929",
# "gpt-5-mini-2025-08-07", "claude-3-5-haiku-latest", Vertex's "claude-sonnet-4-5@20250929"
SNAPSHOT_SUFFIX = re.compile(r"(-\d{8}|-\d{4}-\d{2}-\d{2}|-latest|@\d{8})$")


class PriceError(ValueError):
    """A price override that is not a mapping of non-negative numbers."""


@dataclass(frozen=True)
class Price:
    input: float        # USD per million uncached input tokens
    output: float       # USD per million output tokens (reasoning tokens included)
    cache_read: float   # USD per million input tokens read from the prompt cache
    cache_write: float  # USD per million input tokens written to the cache (OpenAI: plain input, no surcharge)

    @classmethod
    def parse(cls, model: str, value: "Price | dict") -> "Price":
        """A Price from a config entry {"input", "output", optional "cache_read", "cache_write"};
        a missing cache price defaults to the input price (no discount assumed)."""
        if isinstance(value, Price):
            return value
        try:
            price = cls(input=float(value["input"]), output=float(value["output"]),
                        cache_read=float(value.get("cache_read", value["input"])),
                        cache_write=float(value.get("cache_write", value["input"])))
        except (TypeError, KeyError, ValueError, AttributeError) as e:
            raise PriceError(f"prices[{model!r}] = {value!r}: expected {{'input': USD/M, 'output': USD/M, "
                             "optional 'cache_read', 'cache_write'}}") from e
        if min(price.input, price.output, price.cache_read, price.cache_write) < 0:
            raise PriceError(f"prices[{model!r}] = {value!r}: prices must be >= 0")
        return price

    def cost(self, usage: Usage) -> float:
        return (usage.input_tokens * self.input + usage.output_tokens * self.output
                + usage.cache_read_tokens * self.cache_read + usage.cache_write_tokens * self.cache_write) / 1e6


def _anthropic(input: float, output: float) -> Price:
    return Price(input, output, input * ANTHROPIC_CACHE_READ, input * ANTHROPIC_CACHE_WRITE)


def _openai(input: float, output: float, cached: float) -> Price:
    return Price(input, output, cached, input)


PRICES: dict[str, Price] = {
    "claude-opus-5-5": _anthropic(4, 20),
    "claude-opus-5": _anthropic(5, 25),
    "claude-sonnet-5-5": _anthropic(2, 10),
    "claude-sonnet-5": _anthropic(2, 10),
    "claude-sonnet-4-6": _anthropic(3, 15),
    "claude-opus-4-5": _anthropic(5, 25),
    "claude-opus-4-1": _anthropic(15, 75),
    "claude-opus-4": _anthropic(15, 75),
    "claude-sonnet-4-5": _anthropic(3, 15),
    "claude-sonnet-4": _anthropic(3, 15),
    "claude-haiku-4-5": _anthropic(1, 5),
    "claude-3-5-haiku": _anthropic(0.8, 4),
    "gpt-5": _openai(1.25, 10, 0.125),
    "gpt-5-mini": _openai(0.25, 2, 0.025),
    "gpt-5-nano": _openai(0.05, 0.4, 0.005),
    "gpt-4.1": _openai(2, 8, 0.5),
    "gpt-4.1-mini": _openai(0.4, 1.6, 0.1),
    "gpt-4.1-nano": _openai(0.1, 0.4, 0.025),
    "gpt-4o": _openai(2.5, 10, 1.25),
    "gpt-4o-mini": _openai(0.15, 0.6, 0.075),
    "o3": _openai(2, 8, 0.5),
    "o4-mini": _openai(1.1, 4.4, 0.275),
}


def price_for(model: str, overrides: dict | None = None) -> Price | None:
    """The model's price: an override by exact name first, then the table by name without a snapshot suffix."""
    overrides = overrides or {}
    if model in overrides:
        return Price.parse(model, overrides[model])
    base = SNAPSHOT_SUFFIX.sub("", model)
    if base in overrides:
        return Price.parse(base, overrides[base])
    return PRICES.get(base)
