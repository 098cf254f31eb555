"""What a Claude call costs: list prices in dollars per million tokens, and `dollars(model, usage)`.

Prices change; the table is a best effort at the list prices of the standard tier. A model the table
does not know is charged at the most expensive rates, so the running total errs high, never low.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens. `cache_write` is the 5-minute ephemeral write (1.25x input)."""

    input: float
    output: float
    cache_write: float
    cache_read: float

    @property
    def cache_write_1h(self) -> float:
        return 2.0 * self.input


def _price(inp: float, out: float) -> Price:
    return Price(inp, out, cache_write=1.25 * inp, cache_read=0.1 * inp)


# Keys are model-id prefixes; the longest matching prefix wins ("claude-opus-4-5" before "claude-opus-4").
# Models not listed (newer families among them) fall to DEFAULT.
PRICES: dict[str, Price] = {
    "claude-mythos": _price(25.0, 125.0),
    "claude-opus-4-6": _price(5.0, 25.0),
    "claude-opus-4-5": _price(5.0, 25.0),
    "claude-opus-4": _price(15.0, 75.0),  # 4.0 and 4.1; later 4.x until listed
    "claude-sonnet-4": _price(3.0, 15.0),  # 4.0, 4.5, 4.6
    "claude-haiku-4": _price(1.0, 5.0),  # 4.5
    "claude-3-opus": _price(15.0, 75.0),
    "claude-3-7-sonnet": _price(3.0, 15.0),
    "claude-3-5-sonnet": _price(3.0, 15.0),
    "claude-3-5-haiku": _price(0.8, 4.0),
    "claude-3-haiku": Price(0.25, 1.25, cache_write=0.30, cache_read=0.03),
}
DEFAULT = _price(25.0, 125.0)  # unknown models: the most expensive rates in the table


def price(model: str) -> Price:
    """The price of `model`, by longest prefix; Bedrock/Vertex spellings are accepted."""
    name = model.lower()
    if "claude-" in name:  # "us.anthropic.claude-sonnet-4-5-20250929-v1:0" -> "claude-sonnet-4-5-..."
        name = name[name.index("claude-"):]
    best = ""
    for key in PRICES:
        if len(key) > len(best) and (name == key or name.startswith((key + "-", key + "@", key + ":"))):
            best = key
    return PRICES[best] if best else DEFAULT


def _get(usage: Any, name: str) -> int:
    value = usage.get(name) if isinstance(usage, dict) else getattr(usage, name, None)
    return int(value or 0)


def dollars(model: str, usage: Any) -> float:
    """The cost of one response's `usage` (the SDK's Usage object or its dict form).

    The API reports cache reads and writes apart from `input_tokens`, so the four are summed.
    Writes to the one-hour cache cost twice the input price when the usage breaks them out.
    """
    p = price(model)
    write = _get(usage, "cache_creation_input_tokens")
    creation = usage.get("cache_creation") if isinstance(usage, dict) else getattr(usage, "cache_creation", None)
    write_1h = min(write, _get(creation, "ephemeral_1h_input_tokens")) if creation is not None else 0
    total = (
        _get(usage, "input_tokens") * p.input
        + _get(usage, "output_tokens") * p.output
        + (write - write_1h) * p.cache_write
        + write_1h * p.cache_write_1h
        + _get(usage, "cache_read_input_tokens") * p.cache_read
    )
    return total / 1e6
