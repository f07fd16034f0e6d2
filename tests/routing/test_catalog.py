from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from routing.catalog import (
    STRATEGIES,
    CatalogError,
    NoCapableModel,
    UnknownModel,
    UnknownStrategy,
    clear_catalog_cache,
    get_catalog,
    load_catalog,
)

SHIPPED = Path(settings.BASE_DIR) / "routing" / "catalog.yaml"

# Prices from FACTS.md, USD per million tokens: (input, output).
FACTS_PRICES = {
    "mistral-large-latest": ("0.50", "1.50"),
    "mistral-medium-latest": ("0.40", "2.00"),
    "mistral-small-latest": ("0.15", "0.60"),
    "ministral-8b-latest": ("0.15", "0.15"),
    "ministral-3b-latest": ("0.10", "0.10"),
    "codestral-latest": ("0.30", "0.90"),
    "magistral-medium-latest": ("2.00", "5.00"),
    "pixtral-large-latest": ("2.00", "6.00"),
}


def model(model_id: str, input_price: Any, output_price: Any, **fields: Any) -> dict[str, Any]:
    entry = {
        "id": model_id,
        "aliases": [f"{model_id}-latest"],
        "input_usd_per_million": input_price,
        "output_usd_per_million": output_price,
        "price_source": "a test",
        "price_date": "2026-11",
        "context_window": 131072,
        "max_output_tokens": 8192,
        "capabilities": ["chat", "tools"],
        "quality": 50,
    }
    entry.update(fields)
    return entry


BASE: dict[str, Any] = {
    "models": [
        model("big", "1.00", "3.00", quality=90, capabilities=["chat", "tools", "vision"]),
        model("mid", "0.50", "1.00", quality=50),
        model("tiny", "0.10", "0.10", quality=10, capabilities=["chat"]),
    ],
    "downgrades": [["big", "mid", "tiny"]],
    "fallbacks": {"big": ["mid"], "mid": ["big", "tiny"]},
}


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_catalog_cache()
    yield
    clear_catalog_cache()


@pytest.fixture
def catalog_file(tmp_path):
    """Writes a catalog (BASE unless given) and returns its path."""

    def write(document: Any = None, text: str | None = None) -> Path:
        path = tmp_path / "catalog.yaml"
        if text is None:
            text = yaml.safe_dump(BASE if document is None else document, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return write


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(CatalogError) as excinfo:
        load_catalog(path)
    lines = str(excinfo.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)
    return lines


# --- the shipped catalog ------------------------------------------------------------


def test_the_shipped_catalog_loads_from_settings():
    catalog = get_catalog()
    assert Path(catalog.path) == Path(settings.MODEL_CATALOG_PATH) == SHIPPED
    assert catalog.default_strategy == "as-requested"
    assert set(catalog.models) >= {"mistral-large", "mistral-small", "ministral-3b"}


def test_it_converts_every_shipped_price_exactly():
    catalog = load_catalog(SHIPPED)
    for name, (input_price, output_price) in FACTS_PRICES.items():
        spec = catalog.resolve(name)
        assert spec.input_usd_per_million == Decimal(input_price)
        assert spec.output_usd_per_million == Decimal(output_price)
        assert spec.prices.input_nanos == Decimal(input_price) * 1000
        assert spec.prices.output_nanos == Decimal(output_price) * 1000
        assert spec.price_date == "2026-11"
        assert "FACTS.md" in spec.price_source
    small = catalog.resolve("mistral-small-latest").prices
    assert (small.input_nanos, small.output_nanos) == (150, 600)
    assert small.cost_nanos(1_000_000, 1_000_000) == 750_000_000  # USD 0.75


def test_it_keeps_the_shipped_limits_sane():
    for spec in load_catalog(SHIPPED).models.values():
        assert spec.max_output_tokens <= spec.context_window
        assert spec.context_window >= 131072
        assert "chat" in spec.capabilities
        assert spec.upstream_name == f"{spec.id}-latest"


def test_every_shipped_downgrade_step_is_cheaper():
    catalog = load_catalog(SHIPPED)
    for model_id in catalog.models:
        upper = catalog.models[model_id]
        for lower in catalog.downgrade_chain(model_id):
            assert lower.prices.input_nanos <= upper.prices.input_nanos
            assert lower.prices.output_nanos <= upper.prices.output_nanos
            upper = lower


# --- queries --------------------------------------------------------------------------


def test_aliases_resolve_to_the_model():
    catalog = load_catalog(SHIPPED)
    assert catalog.resolve("mistral-large").id == "mistral-large"
    assert catalog.resolve("mistral-large-latest").id == "mistral-large"
    assert catalog.resolve("mistral-large-2512").id == "mistral-large"
    assert catalog.resolve("mistral-large").aliases == (
        "mistral-large-latest",
        "mistral-large-2512",
    )


def test_it_refuses_an_unknown_model_with_the_allowed_names():
    catalog = load_catalog(SHIPPED)
    with pytest.raises(UnknownModel) as excinfo:
        catalog.resolve("gpt-4o")
    assert isinstance(excinfo.value, ValueError)
    assert excinfo.value.name == "gpt-4o"
    assert excinfo.value.allowed == sorted(excinfo.value.allowed)
    assert {"mistral-small", "mistral-small-latest", "ministral-3b-2512"} <= set(
        excinfo.value.allowed
    )
    assert "unknown model 'gpt-4o'" in str(excinfo.value)


def test_the_downgrade_chain_goes_down_in_order():
    catalog = load_catalog(SHIPPED)
    chain = [m.id for m in catalog.downgrade_chain("mistral-large")]
    assert chain == ["mistral-small", "ministral-8b", "ministral-3b"]
    assert [m.id for m in catalog.downgrade_chain("pixtral-large-latest")] == [
        "mistral-large",
        *chain,
    ]
    assert catalog.next_down("mistral-medium").id == "mistral-small"
    assert catalog.downgrade_chain("ministral-3b") == []
    assert catalog.next_down("ministral-3b") is None


def test_the_downgrade_chain_can_skip_models_lacking_capabilities(catalog_file):
    catalog = load_catalog(catalog_file())
    assert [m.id for m in catalog.downgrade_chain("big", required_capabilities={"tools"})] == [
        "mid"
    ]
    assert catalog.next_down("mid", required_capabilities={"tools"}) is None
    assert catalog.next_down("big", required_capabilities={"vision"}) is None


def test_it_lists_fallbacks_in_order():
    catalog = load_catalog(SHIPPED)
    assert [m.id for m in catalog.fallbacks("mistral-large")] == ["mistral-medium", "mistral-small"]
    assert [m.id for m in catalog.fallbacks("ministral-3b-latest")] == ["ministral-8b"]


def test_a_model_without_fallbacks_has_none(catalog_file):
    catalog = load_catalog(catalog_file())
    assert catalog.fallbacks("tiny") == []
    assert [m.id for m in catalog.fallbacks("mid", required_capabilities={"tools"})] == ["big"]


# --- strategies -----------------------------------------------------------------------


def test_it_names_the_strategies():
    assert STRATEGIES == ("as-requested", "cost-optimized", "quality")


def test_as_requested_returns_the_requested_model():
    catalog = load_catalog(SHIPPED)
    assert catalog.choose("as-requested", "mistral-small-latest").id == "mistral-small"
    chosen = catalog.choose("as-requested", "codestral", frozenset({"chat", "code"}))
    assert chosen.id == "codestral"


def test_cost_optimized_picks_the_cheapest_capable_model():
    catalog = load_catalog(SHIPPED)
    assert catalog.choose("cost-optimized", "mistral-large", {"chat"}).id == "ministral-3b"
    assert catalog.choose("cost-optimized", "mistral-large", {"chat", "code"}).id == "codestral"
    assert catalog.choose("cost-optimized", "mistral-large", {"reasoning"}).id == "magistral-medium"
    # Input plus output per token: large 0.50 + 1.50 is below medium 0.40 + 2.00.
    assert catalog.choose("cost-optimized", "mistral-small", {"vision", "code"}).id == (
        "mistral-large"
    )


def test_cost_optimized_breaks_a_price_tie_by_quality(catalog_file):
    document = base()
    document["models"].append(model("twin", "0.10", "0.10", quality=40, capabilities=["chat"]))
    catalog = load_catalog(catalog_file(document))
    assert catalog.choose("cost-optimized", "big", {"chat"}).id == "twin"


def test_cost_optimized_respects_required_vision(catalog_file):
    catalog = load_catalog(catalog_file())
    assert catalog.choose("cost-optimized", "tiny", {"chat"}).id == "tiny"
    assert catalog.choose("cost-optimized", "tiny", {"chat", "vision"}).id == "big"


def test_quality_picks_the_best_capable_model():
    catalog = load_catalog(SHIPPED)
    assert catalog.choose("quality", "ministral-3b", {"chat"}).id == "mistral-large"
    assert catalog.choose("quality", "ministral-3b", {"chat", "vision"}).id == "mistral-large"
    assert catalog.choose("quality", "ministral-3b", {"reasoning"}).id == "magistral-medium"


def test_quality_breaks_a_rank_tie_by_price(catalog_file):
    document = base()
    document["models"].append(model("cheap-big", "0.50", "0.50", quality=90))
    catalog = load_catalog(catalog_file(document))
    assert catalog.choose("quality", "tiny", {"chat"}).id == "cheap-big"


def test_it_refuses_an_unknown_strategy():
    catalog = load_catalog(SHIPPED)
    with pytest.raises(UnknownStrategy, match="unknown routing strategy 'cheapest'"):
        catalog.choose("cheapest", "mistral-small")


def test_it_refuses_when_no_model_has_the_capabilities(catalog_file):
    catalog = load_catalog(catalog_file())
    with pytest.raises(NoCapableModel, match="no model in the catalog has code, vision"):
        catalog.choose("quality", "big", {"vision", "code"})
    with pytest.raises(NoCapableModel, match="vison: not a known capability"):
        catalog.choose("cost-optimized", "big", {"vison"})


def test_choose_refuses_an_unknown_requested_model():
    with pytest.raises(UnknownModel):
        load_catalog(SHIPPED).choose("quality", "gpt-4o")


# --- caching --------------------------------------------------------------------------


def test_get_catalog_reads_the_setting_once(catalog_file, settings):
    settings.MODEL_CATALOG_PATH = catalog_file()
    catalog = get_catalog()
    assert set(catalog.models) == {"big", "mid", "tiny"}
    assert get_catalog() is catalog
    clear_catalog_cache()
    assert get_catalog() is not catalog


# --- validation -----------------------------------------------------------------------


def test_the_base_test_catalog_is_valid(catalog_file):
    catalog = load_catalog(catalog_file())
    assert catalog.resolve("mid-latest").prices.output_nanos == 1000


def test_a_catalog_error_is_improperly_configured():
    assert issubclass(CatalogError, ImproperlyConfigured)


def test_it_refuses_an_unknown_model_in_a_chain(catalog_file):
    document = base()
    document["downgrades"] = [["big", "mdi", "tiny"]]
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: downgrade chain 1 (big -> mdi -> tiny): unknown model 'mdi'"
    ]


def test_it_refuses_an_unknown_model_in_fallbacks(catalog_file):
    document = base()
    document["fallbacks"] = {"big": ["mid", "huge"], "ghost": ["tiny"]}
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: fallbacks of 'big': unknown model 'huge'",
        f"{path}: fallbacks of 'ghost': unknown model 'ghost'",
    ]


def test_it_refuses_an_alias_where_a_model_id_is_expected(catalog_file):
    document = base()
    document["downgrades"] = [["big", "mid-latest"]]
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: downgrade chain 1 (big -> mid-latest): 'mid-latest' is an alias; "
        "use the model id 'mid'"
    ]


def test_it_refuses_a_negative_price(catalog_file):
    document = base()
    document["models"][1]["output_usd_per_million"] = "-1"
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: model 'mid': output_usd_per_million '-1': a price cannot be negative"
    ]


def test_it_refuses_an_inexact_price(catalog_file):
    document = base()
    document["models"][2]["input_usd_per_million"] = "0.0001"
    path = catalog_file(document)
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: model 'tiny': input_usd_per_million '0.0001' ")
    assert "not a whole number of nanodollars per token" in problem


def test_it_refuses_a_float_price(catalog_file):
    path = catalog_file(text=yaml.safe_dump(base()).replace("'0.50'", "0.50"))
    assert problems_of(path) == [
        f"{path}: model 'mid': input_usd_per_million is the YAML float 0.5, which is inexact; "
        'quote it: "0.5"'
    ]


def test_it_refuses_a_price_that_is_not_a_string(catalog_file):
    document = base()
    document["models"][0]["input_usd_per_million"] = 2
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: model 'big': input_usd_per_million must be a quoted decimal string "
        'such as "0.15", got 2'
    ]


def test_it_refuses_a_cycle(catalog_file):
    document = base()
    document["models"][1].update(input_usd_per_million="0.10", output_usd_per_million="0.10")
    document["downgrades"] = [["big", "mid", "tiny"], ["tiny", "mid"]]
    path = catalog_file(document)
    problems = problems_of(path)
    assert (
        f"{path}: downgrades: cycle mid -> tiny -> mid; every chain must end at a cheapest model"
        in (problems)
    )


def test_it_refuses_a_model_that_steps_down_to_itself(catalog_file):
    document = base()
    document["downgrades"] = [["tiny", "tiny"]]
    path = catalog_file(document)
    assert any("downgrades: cycle tiny -> tiny" in p for p in problems_of(path))


def test_it_refuses_two_next_steps_for_one_model(catalog_file):
    document = base()
    document["downgrades"] = [["big", "mid"], ["big", "tiny"]]
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: downgrade chain 2 (big -> tiny): 'big' already steps down to 'mid' in an "
        "earlier chain; a model has one next step down"
    ]


def test_it_refuses_a_downgrade_that_costs_more(catalog_file):
    document = base()
    document["downgrades"] = [["mid", "big"]]
    path = catalog_file(document)
    [problem] = problems_of(path)
    assert problem.startswith(
        f"{path}: downgrade chain 1 (mid -> big): 'big' (1.00/3.00) costs more"
    )


def test_it_refuses_a_typo_in_a_key(catalog_file):
    document = base()
    entry = document["models"][0]
    entry["input_usd_per_milion"] = entry.pop("input_usd_per_million")
    document["fallback"] = document.pop("fallbacks")
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: catalog: unknown key 'fallback' (did you mean 'fallbacks'?)",
        f"{path}: model 'big': unknown key 'input_usd_per_milion' "
        "(did you mean 'input_usd_per_million'?)",
        f"{path}: model 'big': missing required key 'input_usd_per_million'",
    ]


def test_it_refuses_a_duplicate_alias(catalog_file):
    document = base()
    document["models"][2]["aliases"] = ["tiny-latest", "mid-latest"]
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: model 'tiny': alias 'mid-latest' is already an alias of model 'mid'"
    ]


def test_it_refuses_an_alias_equal_to_another_id(catalog_file):
    document = base()
    document["models"][2]["aliases"] = ["big"]
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: model 'tiny': alias 'big' is already the id of another model"
    ]


def test_it_refuses_an_alias_equal_to_its_own_id(catalog_file):
    document = base()
    document["models"][2]["aliases"] = ["tiny"]
    path = catalog_file(document)
    assert problems_of(path) == [f"{path}: model 'tiny': alias 'tiny' repeats the model's own id"]


def test_it_refuses_a_duplicate_id(catalog_file):
    document = base()
    document["models"].append(model("mid", "0.50", "1.00", aliases=[]))
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: model 'mid': id 'mid' is already the id of another model"
    ]


def test_it_refuses_a_missing_field(catalog_file):
    document = base()
    del document["models"][1]["quality"]
    del document["models"][2]["id"]
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: model 'mid': missing required key 'quality'",
        f"{path}: model #3: missing required key 'id'",
        f"{path}: downgrade chain 1 (big -> mid -> tiny): unknown model 'tiny'",
        f"{path}: fallbacks of 'mid': unknown model 'tiny'",
    ]


def test_it_refuses_wrong_types(catalog_file):
    document = base()
    document["models"][0].update(context_window="128k", quality="high", aliases="big-latest")
    document["models"][1].update(max_output_tokens=0, price_date="November")
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: model 'big': aliases must be a list of names without spaces, got 'big-latest'",
        f"{path}: model 'big': context_window must be a positive whole number of tokens, "
        "got '128k'",
        f"{path}: model 'big': quality must be a whole number (higher is better), got 'high'",
        f"{path}: model 'mid': price_date must be \"YYYY-MM\" or \"YYYY-MM-DD\", got 'November'",
        f"{path}: model 'mid': max_output_tokens must be a positive whole number of tokens, got 0",
    ]


def test_it_refuses_more_output_than_the_context_window(catalog_file):
    document = base()
    document["models"][0]["max_output_tokens"] = 200_000
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: model 'big': max_output_tokens 200000 is larger than context_window 131072"
    ]


def test_it_refuses_an_unknown_capability(catalog_file):
    document = base()
    document["models"][0]["capabilities"] = ["chat", "vison"]
    path = catalog_file(document)
    [problem] = problems_of(path)
    assert problem.startswith(
        f"{path}: model 'big': unknown capability 'vison' (did you mean 'vision'? known: chat,"
    )


def test_it_refuses_an_unknown_default_strategy(catalog_file):
    document = base()
    document["default_strategy"] = "cheapest"
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: default_strategy: unknown strategy 'cheapest'; "
        "expected one of: as-requested, cost-optimized, quality"
    ]


def test_it_accepts_a_cached_input_price(catalog_file):
    document = base()
    document["models"][1]["cached_input_usd_per_million"] = "0.05"
    spec = load_catalog(catalog_file(document)).resolve("mid")
    assert spec.cached_input_nanos == 50
    assert spec.cached_input_usd_per_million == Decimal("0.05")
    assert load_catalog(catalog_file()).resolve("mid").cached_input_nanos is None


def test_it_refuses_a_cached_price_above_the_input_price(catalog_file):
    document = base()
    document["models"][1]["cached_input_usd_per_million"] = "0.60"
    path = catalog_file(document)
    assert problems_of(path) == [
        f"{path}: model 'mid': cached_input_usd_per_million '0.60' is more than "
        "input_usd_per_million '0.50'"
    ]


def test_it_reports_every_problem_together(catalog_file):
    document = base()
    document["models"][0]["output_usd_per_million"] = "-3"
    document["models"][1]["capabilities"] = ["chat", "telepathy"]
    document["downgrades"] = [["big", "nope"]]
    path = catalog_file(document)
    problems = problems_of(path)
    assert len(problems) == 3
    assert "model 'big'" in problems[0]
    assert "model 'mid'" in problems[1]
    assert "downgrade chain 1" in problems[2]


def test_it_refuses_a_missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(CatalogError, match="No such file") as excinfo:
        load_catalog(path)
    assert str(excinfo.value).startswith(f"{path}: cannot read the model catalog")


def test_it_refuses_bad_yaml(catalog_file):
    path = catalog_file(text="models:\n  - id: big\n    aliases: [big-latest\n")
    with pytest.raises(CatalogError) as excinfo:
        load_catalog(path)
    assert str(excinfo.value).startswith(f"{path}: line ")
    assert "not valid YAML" in str(excinfo.value)


def test_it_refuses_an_empty_file(catalog_file):
    path = catalog_file(text="")
    assert problems_of(path) == [
        f"{path}: catalog: expected a mapping with a 'models' list, got nothing"
    ]
