"""Decoders: one module each, one registry (`REGISTRY`, filled on import)."""

from decoders import beam, full_rank, greedy, hf_beam, medusa, nezha, popularity, speculative  # noqa: F401  (each registers itself)
from decoders.base import REGISTRY, Decoder, DecodeResult, parse_spec

__all__ = ["REGISTRY", "DecodeResult", "Decoder", "parse_spec", "build_decoder"]


def build_decoder(spec: str, catalog, k: int, models: dict) -> Decoder:
    """models: the trained models by role (see each decoder's `needs`)."""
    name, options = parse_spec(spec)
    return REGISTRY[name](catalog, k, {role: models[role] for role in REGISTRY[name].needs}, **options)
