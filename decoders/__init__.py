"""Decoders: one module each, one registry (`REGISTRY`, filled on import)."""

from bench.errors import BenchError
from decoders import beam, full_rank, greedy, hf_beam, medusa, nezha, popularity, speculative  # noqa: F401  (each registers itself)
from decoders.base import REGISTRY, Decoder, DecodeResult, ModelRequest, option_names, parse_spec, register
from models.backbones import ITEM, backbone_kind

__all__ = [
    "REGISTRY",
    "DecodeResult",
    "Decoder",
    "ModelRequest",
    "parse_spec",
    "register",
    "build_decoder",
    "plan",
    "with_constraint",
]


def plan(spec: str, settings) -> tuple[str, object, dict[str, ModelRequest]]:
    """A decoder spec -> (name, options, the models it requests by role), refusing a
    backbone the decoder cannot use before anything is trained."""
    from models.module import check_pairing
    from models.objectives import OBJECTIVES

    name, options = parse_spec(spec)
    cls = REGISTRY[name]
    requests = cls.requests(options, settings)
    for request in requests.values() if cls.backbone_kinds else ():
        kind = backbone_kind(request.settings.backbone)
        if request.objective == "next_item" and ITEM not in cls.backbone_kinds:
            continue  # an item model beside the backbone (speculative's item draft) generates no SID
        if kind not in cls.backbone_kinds:
            raise BenchError(
                f"decoder '{name}' cannot run on {request.settings.backbone} ({kind}): it needs a "
                f"{' or '.join(cls.backbone_kinds)} backbone; "
                f"{cls.kind_reason or 'it decodes SID tokens with a generative backbone'}"
            )
    for request in requests.values():  # settings a backbone cannot be trained with, here or in a starting model
        for model in (request, *request.starts()):
            if model.objective in OBJECTIVES:
                check_pairing(model.objective, model.settings)
    return name, options, requests


def with_constraint(spec: str) -> str:
    """--constrained: add ':constrained' to every decoder that takes the option and lacks it."""
    name, *parts = spec.split(":")
    takes = name in REGISTRY and "constrained" in option_names(name)
    has = any(part.partition("=")[0] == "constrained" for part in parts)
    return spec + ":constrained" if takes and not has else spec


def build_decoder(spec: str, catalog, k: int, models: dict) -> Decoder:
    """models: the trained models by role (see each decoder's `requests`)."""
    name, options = parse_spec(spec)
    return REGISTRY[name](catalog, k, models, options)
