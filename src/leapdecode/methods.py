"""The method registry, in one place: every method's name, its `@variant` options and its promise
(lossless or lossy). The families are declared in `leapdecode.catalog`; this module lists them."""
from __future__ import annotations

from .catalog import core, diverse, layer_skip, trained, trees
from .catalog import reasoning, relaxed
from .catalog.spec import LOSSLESS, LOSSY, MethodBuild, MethodSpec
from .errors import InvalidSettingError, LeapdecodeError

FAMILIES = (core, trees, trained, layer_skip, diverse, relaxed, reasoning)


def _registry() -> dict[str, MethodSpec]:
    registry: dict[str, MethodSpec] = {}
    for family in FAMILIES:
        for spec in family.METHODS:
            if spec.name in registry:
                raise ValueError(f"method {spec.name!r} is declared twice ({family.__name__})")
            registry[spec.name] = spec
    return registry


_REGISTRY: dict[str, MethodSpec] = _registry()


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise InvalidSettingError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_methods() -> list[MethodSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _option_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_options(pairs: list[str] | None) -> dict:
    """`key=value` pairs (`--option` arguments, the parts of a variant) into a dict of method options."""
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise LeapdecodeError(f"--option expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        options[key.strip().replace("-", "_")] = _option_value(value.strip())
    return options


def split_variant(method: str) -> tuple[str, dict]:
    """``ffn-skip@fraction=0.3@warmup_tokens=2`` -> ("ffn-skip", {"fraction": 0.3, "warmup_tokens": 2}):
    one method with its options, so a run can compare several settings of a method."""
    base, *pairs = method.split("@")
    return base, parse_options(pairs)


__all__ = ["LOSSLESS", "LOSSY", "MethodBuild", "MethodSpec", "all_methods", "get_method", "parse_options",
           "split_variant"]
