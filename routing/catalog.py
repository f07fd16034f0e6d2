"""The model catalog: which Mistral models the gateway may call, what they cost, and how
to route between them (strategies, downgrade chains, fallbacks).

It is read from YAML (settings.MODEL_CATALOG_PATH) and checked as a whole at load, so a
bad edit stops start-up with every problem listed, instead of surfacing later as a
wrong charge or a routing loop. Prices are converted to integer nanodollars per token
once, here; nothing downstream sees a decimal price.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from budgets.money import InvalidAmount, Prices, price_per_million_to_nanos

AS_REQUESTED = "as-requested"
COST_OPTIMIZED = "cost-optimized"
QUALITY = "quality"
STRATEGIES = (AS_REQUESTED, COST_OPTIMIZED, QUALITY)

CAPABILITIES = frozenset({"chat", "tools", "vision", "json", "code", "reasoning"})

CATALOG_KEYS = {
    "required": ("models",),
    "optional": ("default_strategy", "downgrades", "fallbacks"),
}
MODEL_KEYS = {
    "required": (
        "id",
        "input_usd_per_million",
        "output_usd_per_million",
        "price_source",
        "price_date",
        "context_window",
        "max_output_tokens",
        "capabilities",
        "quality",
    ),
    "optional": ("aliases", "upstream_name", "cached_input_usd_per_million"),
}
PRICE_DATE = re.compile(r"\d{4}-\d{2}(-\d{2})?")


class CatalogError(ImproperlyConfigured):
    """The catalog file is missing, unreadable or wrong; one problem per line."""


class UnknownModel(ValueError):
    def __init__(self, name: str, allowed: Iterable[str]) -> None:
        self.name = name
        self.allowed = sorted(allowed)
        super().__init__(f"unknown model {name!r}; allowed: {', '.join(self.allowed)}")


class UnknownStrategy(ValueError):
    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        super().__init__(
            f"unknown routing strategy {strategy!r}; expected one of: {', '.join(STRATEGIES)}"
        )


class NoCapableModel(ValueError):
    def __init__(self, required: frozenset[str]) -> None:
        self.required = required
        unknown = sorted(required - CAPABILITIES)
        hint = f" ({', '.join(unknown)}: not a known capability)" if unknown else ""
        super().__init__(f"no model in the catalog has {', '.join(sorted(required))}{hint}")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    aliases: tuple[str, ...]
    upstream_name: str  # what Mistral is asked for
    prices: Prices  # nanodollars per token
    cached_input_nanos: int | None
    # The prices as written in the catalog, for display only.
    input_usd_per_million: Decimal
    output_usd_per_million: Decimal
    cached_input_usd_per_million: Decimal | None
    context_window: int
    max_output_tokens: int
    capabilities: frozenset[str]
    quality: int
    price_source: str
    price_date: str

    def supports(self, capabilities: Iterable[str]) -> bool:
        return self.capabilities.issuperset(capabilities)

    @property
    def cost_rank(self) -> int:
        """What `cost-optimized` compares: the input plus the output price of one token.
        Weighting them by a typical call would favour one workload over another."""
        return self.prices.input_nanos + self.prices.output_nanos


@dataclass(frozen=True)
class Catalog:
    path: str
    models: dict[str, ModelSpec]  # by id, in catalog order
    names: dict[str, str]  # every id and alias -> model id
    downgrades: dict[str, str]  # model id -> its next step down
    fallback_ids: dict[str, tuple[str, ...]]
    default_strategy: str = AS_REQUESTED

    def resolve(self, name: str) -> ModelSpec:
        """A model by id or alias."""
        model_id = self.names.get(name)
        if model_id is None:
            raise UnknownModel(name, self.names)
        return self.models[model_id]

    def downgrade_chain(
        self, model_id: str, *, required_capabilities: Iterable[str] = frozenset()
    ) -> list[ModelSpec]:
        """The models below this one, next step first, cheapest last."""
        required = frozenset(required_capabilities)
        chain = []
        current = self.downgrades.get(self.resolve(model_id).id)
        while current is not None:
            chain.append(self.models[current])
            current = self.downgrades.get(current)
        return [model for model in chain if model.supports(required)]

    def next_down(
        self, model_id: str, *, required_capabilities: Iterable[str] = frozenset()
    ) -> ModelSpec | None:
        chain = self.downgrade_chain(model_id, required_capabilities=required_capabilities)
        return chain[0] if chain else None

    def fallbacks(
        self, model_id: str, *, required_capabilities: Iterable[str] = frozenset()
    ) -> list[ModelSpec]:
        required = frozenset(required_capabilities)
        alternatives = self.fallback_ids.get(self.resolve(model_id).id, ())
        return [self.models[a] for a in alternatives if self.models[a].supports(required)]

    def choose(
        self,
        strategy: str,
        requested_id: str,
        required_capabilities: Iterable[str] = frozenset(),
    ) -> ModelSpec:
        """The model a strategy picks for a request.

        `as-requested` trusts the caller and returns the requested model as is. The
        others pick among every model having the required capabilities: the lowest
        `cost_rank` (ties: higher quality), or the highest quality (ties: cheaper)."""
        if strategy not in STRATEGIES:
            raise UnknownStrategy(strategy)
        requested = self.resolve(requested_id)
        if strategy == AS_REQUESTED:
            return requested
        required = frozenset(required_capabilities)
        capable = [model for model in self.models.values() if model.supports(required)]
        if not capable:
            raise NoCapableModel(required)
        if strategy == COST_OPTIMIZED:
            return min(capable, key=lambda m: (m.cost_rank, -m.quality, m.id))
        return min(capable, key=lambda m: (-m.quality, m.cost_rank, m.id))


def load_catalog(path: str | Path) -> Catalog:
    """Read and check a catalog file; CatalogError lists every problem found."""
    document = _read_yaml(path)
    problems: list[str] = []
    catalog = _build_catalog(str(path), document, problems)
    if problems or catalog is None:
        raise CatalogError("\n".join(f"{path}: {problem}" for problem in problems))
    return catalog


def get_catalog() -> Catalog:
    """The catalog named by settings, read once per process (and per path, so a test
    that points the setting elsewhere gets that file)."""
    return _cached_catalog(str(settings.MODEL_CATALOG_PATH))


@functools.lru_cache(maxsize=8)
def _cached_catalog(path: str) -> Catalog:
    return load_catalog(path)


def clear_catalog_cache() -> None:
    _cached_catalog.cache_clear()


def _read_yaml(path: str | Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read the model catalog: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: the model catalog is not UTF-8 text: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CatalogError(f"{path}: {where}not valid YAML: {problem}") from exc


def _build_catalog(path: str, document: Any, problems: list[str]) -> Catalog | None:
    if not isinstance(document, dict):
        problems.append(f"catalog: expected a mapping with a 'models' list, got {_kind(document)}")
        return None
    _check_keys(document, CATALOG_KEYS, "catalog", problems)

    default_strategy = document.get("default_strategy", AS_REQUESTED)
    if default_strategy not in STRATEGIES:
        problems.append(
            f"default_strategy: unknown strategy {default_strategy!r}; "
            f"expected one of: {', '.join(STRATEGIES)}"
        )

    entries = document.get("models")
    if entries is not None and (not isinstance(entries, list) or not entries):
        problems.append(f"models: expected a non-empty list of models, got {_kind(entries)}")
        entries = None
    names: dict[str, str] = {}
    models: dict[str, ModelSpec] = {}
    for index, entry in enumerate(entries or [], start=1):
        model = _parse_model(index, entry, names, problems)
        if model is not None:
            models[model.id] = model

    downgrades = _parse_downgrades(document.get("downgrades"), names, models, problems)
    fallbacks = _parse_fallbacks(document.get("fallbacks"), names, problems)
    if problems:
        return None
    return Catalog(
        path=path,
        models=models,
        names=names,
        downgrades=downgrades,
        fallback_ids=fallbacks,
        default_strategy=default_strategy,
    )


def _parse_model(
    index: int, entry: Any, names: dict[str, str], problems: list[str]
) -> ModelSpec | None:
    """One model entry; its names go into `names` even when other fields are wrong, so
    that chains naming it are not also reported as naming an unknown model."""
    if not isinstance(entry, dict):
        problems.append(f"model #{index}: expected a mapping of keys, got {_kind(entry)}")
        return None
    before = len(problems)
    model_id = entry.get("id")
    if _is_name(model_id):
        where = f"model {model_id!r}"
        _register(model_id, model_id, "id", names, where, problems)
    else:
        where = f"model #{index}"
        if model_id is not None:
            problems.append(f"{where}: id must be a name without spaces, got {model_id!r}")
    _check_keys(entry, MODEL_KEYS, where, problems)

    aliases = _names_list(entry, "aliases", where, problems)
    if _is_name(model_id):
        for alias in aliases:
            if alias == model_id:
                problems.append(f"{where}: alias {alias!r} repeats the model's own id")
            elif names.get(alias) == model_id:
                problems.append(f"{where}: alias {alias!r} is listed twice")
            else:
                _register(alias, model_id, "alias", names, where, problems)

    upstream_name = entry.get("upstream_name")
    if upstream_name is not None and not _is_name(upstream_name):
        problems.append(
            f"{where}: upstream_name must be a name without spaces, got {upstream_name!r}"
        )
    input_price = _price(entry, "input_usd_per_million", where, problems)
    output_price = _price(entry, "output_usd_per_million", where, problems)
    cached_price = _price(entry, "cached_input_usd_per_million", where, problems)
    if cached_price and input_price and cached_price[1] > input_price[1]:
        problems.append(
            f"{where}: cached_input_usd_per_million {str(cached_price[0])!r} is more than "
            f"input_usd_per_million {str(input_price[0])!r}"
        )
    price_source = _text(entry, "price_source", where, problems)
    price_date = _price_date(entry, where, problems)
    context_window = _positive_int(entry, "context_window", where, problems)
    max_output_tokens = _positive_int(entry, "max_output_tokens", where, problems)
    if context_window and max_output_tokens and max_output_tokens > context_window:
        problems.append(
            f"{where}: max_output_tokens {max_output_tokens} is larger than "
            f"context_window {context_window}"
        )
    capabilities = _capabilities(entry, where, problems)
    quality = entry.get("quality")
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int)):
        problems.append(
            f"{where}: quality must be a whole number (higher is better), got {quality!r}"
        )

    if len(problems) > before:
        return None
    # Every required key was checked above, so none of these is None here.
    assert input_price and output_price and price_source and price_date
    assert context_window and max_output_tokens and capabilities
    return ModelSpec(
        id=model_id,
        aliases=tuple(aliases),
        upstream_name=upstream_name or model_id,
        prices=Prices(input_nanos=input_price[1], output_nanos=output_price[1]),
        cached_input_nanos=cached_price[1] if cached_price else None,
        input_usd_per_million=input_price[0],
        output_usd_per_million=output_price[0],
        cached_input_usd_per_million=cached_price[0] if cached_price else None,
        context_window=context_window,
        max_output_tokens=max_output_tokens,
        capabilities=capabilities,
        quality=quality,
        price_source=price_source,
        price_date=price_date,
    )


def _parse_downgrades(
    chains: Any, names: dict[str, str], models: dict[str, ModelSpec], problems: list[str]
) -> dict[str, str]:
    if chains is None:
        return {}
    if not isinstance(chains, list):
        problems.append(
            f"downgrades: expected a list of chains such as [mistral-large, mistral-small], "
            f"got {_kind(chains)}"
        )
        return {}
    next_down: dict[str, str] = {}
    for index, chain in enumerate(chains, start=1):
        if not isinstance(chain, list) or len(chain) < 2 or not all(_is_name(m) for m in chain):
            problems.append(
                f"downgrade chain {index}: expected a list of at least two model ids, got {chain!r}"
            )
            continue
        where = f"downgrade chain {index} ({' -> '.join(chain)})"
        if not _all_model_ids(chain, names, where, problems):
            continue
        for upper, lower in itertools.pairwise(chain):
            earlier = next_down.setdefault(upper, lower)
            if earlier != lower:
                problems.append(
                    f"{where}: {upper!r} already steps down to {earlier!r} in an earlier chain; "
                    "a model has one next step down"
                )
            else:
                _check_step_is_cheaper(models.get(upper), models.get(lower), where, problems)
    for cycle in _cycles(next_down):
        problems.append(
            f"downgrades: cycle {' -> '.join(cycle)}; every chain must end at a cheapest model"
        )
    return next_down


def _check_step_is_cheaper(
    upper: ModelSpec | None, lower: ModelSpec | None, where: str, problems: list[str]
) -> None:
    # A degraded budget is stepped down to spend less; a step that raises either price
    # would make some calls cost more than the model they replace.
    if upper is None or lower is None:
        return
    if (
        lower.prices.input_nanos > upper.prices.input_nanos
        or lower.prices.output_nanos > upper.prices.output_nanos
    ):
        problems.append(
            f"{where}: {lower.id!r} ({lower.input_usd_per_million}/{lower.output_usd_per_million}) "
            f"costs more than {upper.id!r} ({upper.input_usd_per_million}/"
            f"{upper.output_usd_per_million}) per million tokens; a step down must not raise "
            "the input or the output price"
        )


def _cycles(next_down: dict[str, str]) -> list[list[str]]:
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in next_down:
        path = [start]
        current = next_down.get(start)
        while current is not None and current not in path:
            path.append(current)
            current = next_down.get(current)
        if current is not None:
            cycle = path[path.index(current) :]
            if frozenset(cycle) not in seen:
                seen.add(frozenset(cycle))
                cycles.append([*cycle, current])
    return cycles


def _parse_fallbacks(
    fallbacks: Any, names: dict[str, str], problems: list[str]
) -> dict[str, tuple[str, ...]]:
    if fallbacks is None:
        return {}
    if not isinstance(fallbacks, dict):
        problems.append(
            "fallbacks: expected a mapping of model id to a list of model ids, "
            f"got {_kind(fallbacks)}"
        )
        return {}
    result: dict[str, tuple[str, ...]] = {}
    for model_id, alternatives in fallbacks.items():
        where = f"fallbacks of {model_id!r}"
        if not isinstance(alternatives, list) or not alternatives:
            problems.append(
                f"{where}: expected a non-empty list of model ids, got {_kind(alternatives)}"
            )
            continue
        if not _all_model_ids([model_id, *alternatives], names, where, problems):
            continue
        if model_id in alternatives:
            problems.append(f"{where}: a model cannot fall back to itself")
        for repeated in sorted({a for a in alternatives if alternatives.count(a) > 1}):
            problems.append(f"{where}: {repeated!r} is listed twice")
        result[model_id] = tuple(alternatives)
    return result


def _all_model_ids(
    items: list[Any], names: dict[str, str], where: str, problems: list[str]
) -> bool:
    ok = True
    for item in items:
        if not _is_name(item):
            problems.append(f"{where}: expected a model id, got {item!r}")
            ok = False
        elif item not in names:
            problems.append(f"{where}: unknown model {item!r}")
            ok = False
        elif names[item] != item:
            # One spelling per model in chains keeps them easy to read and compare.
            problems.append(f"{where}: {item!r} is an alias; use the model id {names[item]!r}")
            ok = False
    return ok


def _register(
    name: str, model_id: str, kind: str, names: dict[str, str], where: str, problems: list[str]
) -> None:
    owner = names.get(name)
    if owner is None:
        names[name] = model_id
    elif owner == name:
        problems.append(f"{where}: {kind} {name!r} is already the id of another model")
    else:
        problems.append(f"{where}: {kind} {name!r} is already an alias of model {owner!r}")


def _check_keys(
    mapping: dict[Any, Any], keys: dict[str, tuple[str, ...]], where: str, problems: list[str]
) -> None:
    known = (*keys["required"], *keys["optional"])
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}: unknown key {key!r}{hint}")
    for key in keys["required"]:
        if mapping.get(key) is None:
            problems.append(f"{where}: missing required key {key!r}")


def _price(
    entry: dict[str, Any], key: str, where: str, problems: list[str]
) -> tuple[Decimal, int] | None:
    """(the price as written, nanodollars per token), or None if absent or wrong."""
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, float):
        problems.append(
            f'{where}: {key} is the YAML float {value!r}, which is inexact; quote it: "{value}"'
        )
        return None
    if not isinstance(value, str):
        problems.append(
            f'{where}: {key} must be a quoted decimal string such as "0.15", got {value!r}'
        )
        return None
    try:
        nanos = price_per_million_to_nanos(value)
    except InvalidAmount as exc:
        problems.append(f"{where}: {key} {exc}")
        return None
    return Decimal(value.strip()), nanos


def _text(entry: dict[str, Any], key: str, where: str, problems: list[str]) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: {key} must be text, got {value!r}")
        return None
    return value.strip()


def _price_date(entry: dict[str, Any], where: str, problems: list[str]) -> str | None:
    value = entry.get("price_date")
    if isinstance(value, date):  # an unquoted 2026-11-05 is read as a date
        return value.isoformat()
    if value is not None and not (isinstance(value, str) and PRICE_DATE.fullmatch(value)):
        problems.append(f'{where}: price_date must be "YYYY-MM" or "YYYY-MM-DD", got {value!r}')
        return None
    return value


def _positive_int(entry: dict[str, Any], key: str, where: str, problems: list[str]) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        problems.append(f"{where}: {key} must be a positive whole number of tokens, got {value!r}")
        return None
    return value


def _names_list(entry: dict[str, Any], key: str, where: str, problems: list[str]) -> list[str]:
    value = entry.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_name(item) for item in value):
        problems.append(f"{where}: {key} must be a list of names without spaces, got {value!r}")
        return []
    return value


def _capabilities(entry: dict[str, Any], where: str, problems: list[str]) -> frozenset[str] | None:
    value = entry.get("capabilities")
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        problems.append(f"{where}: capabilities must be a non-empty list, got {value!r}")
        return None
    unknown = [c for c in value if c not in CAPABILITIES]
    for capability in unknown:
        close = difflib.get_close_matches(capability, sorted(CAPABILITIES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.append(
            f"{where}: unknown capability {capability!r} "
            f"({hint}known: {', '.join(sorted(CAPABILITIES))})"
        )
    return None if unknown else frozenset(value)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and not any(c.isspace() for c in value)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str | int | float):
        return repr(value)
    return f"a {type(value).__name__}"
