"""Cost of usage from a price table in config (JSON): per model, a price per request and
per 1,000 input and output tokens, in micros (millionths) of one currency; "*" prices any
model not listed. Integer arithmetic throughout, so totals add up exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from servers.metering.usage.domain import ModelUsage

DEFAULT_TABLE = Path(__file__).with_name("prices.json")


@dataclass(frozen=True)
class Price:
    request: int
    input_per_1k: int
    output_per_1k: int


@dataclass(frozen=True)
class PriceTable:
    currency: str
    models: dict[str, Price]

    @classmethod
    def load(cls, path: str | Path | None = None) -> PriceTable:
        raw = json.loads(Path(path or DEFAULT_TABLE).read_text())
        models = {name: Price(int(p.get("request", 0)), int(p.get("input_per_1k", 0)), int(p.get("output_per_1k", 0)))
                  for name, p in raw["models"].items()}
        for name, price in models.items():
            if min(price.request, price.input_per_1k, price.output_per_1k) < 0:
                raise ValueError(f"price table: negative price for {name!r}")
        return cls(currency=str(raw.get("currency", "usd")).lower(), models=models)

    def price(self, model: str) -> Price:
        return self.models.get(model) or self.models.get("*") or Price(0, 0, 0)

    def cost_micros(self, usage: ModelUsage) -> int:
        p = self.price(usage.model)
        # Token prices are per 1,000: round the sum up to a whole micro, never down.
        tokens = usage.input_tokens * p.input_per_1k + usage.output_tokens * p.output_per_1k
        return usage.requests * p.request + -(-tokens // 1000)
