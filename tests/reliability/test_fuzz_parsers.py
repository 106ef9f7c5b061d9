"""Property-based fuzzing of the configuration parsers and the mapping-file parser.

Every parser takes text a user typed. The property throughout: it returns a
well-formed value (checked against an independent expectation where one
exists), or raises its own error type with a message naming the source, never
anything else. Examples are derandomized, so CI runs the same cases each time.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracediff.align.mapfile import (
    TOP_LEVEL_KEYS,
    MappingSpec,
    parse_mapping,
    read_table_file,
    resolve_mapping,
)
from tracediff.config import (
    ENV_ACTIVATIONS,
    ENV_LAYERS,
    ENV_OUTPUT,
    ENV_SAMPLE_SIZE,
    ENV_STATS,
    ENV_STEPS,
    KNOWN_STATS,
    MAX_LISTED_STEPS,
    TraceConfig,
    names_predicate,
    parse_bool,
    parse_sample_size,
    parse_stats,
    parse_steps,
)
from tracediff.errors import AlignmentError, TraceConfigError

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# -- env-var parsers ---------------------------------------------------------------------------

switch_words = st.sampled_from(["1", "0", "true", "False", " on ", "OFF", "yes", "no", "", "2", "enable", "tru"])
step_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="0123456789,- ", max_size=30),
    st.lists(st.one_of(st.integers(0, 50).map(str), st.tuples(st.integers(0, 50), st.integers(0, 50)).map(
        lambda r: f"{r[0]}-{r[1]}")), max_size=6).map(",".join),
)
stat_text = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from([*KNOWN_STATS, "", " ", "abs-mean", "median", "SUM"]), max_size=8).map(",".join),
)


@FUZZ
@given(value=st.one_of(st.none(), switch_words, st.text(max_size=12)))
def test_parse_bool(value, tally) -> None:
    tally["fuzz_env"] += 1
    try:
        result = parse_bool(value, source="SWITCH")
    except TraceConfigError as exc:
        assert str(exc).startswith(f"SWITCH={value!r}")
        return
    assert isinstance(result, bool)
    lowered = (value or "").strip().lower()
    assert result == (lowered in {"1", "true", "yes", "on"})


@FUZZ
@given(value=st.one_of(st.none(), stat_text))
def test_parse_stats(value, tally) -> None:
    tally["fuzz_env"] += 1
    names = [] if value is None else [item.strip() for item in value.split(",") if item.strip()]
    try:
        result = parse_stats(value, source="STATS")
    except TraceConfigError as exc:
        unknown = [name for name in names if name not in KNOWN_STATS]
        assert unknown and repr(unknown[0]) in str(exc) and str(exc).startswith("STATS=")
        return
    assert all(name in KNOWN_STATS for name in result) and len(set(result)) == len(result)
    if names:
        assert list(result) == list(dict.fromkeys(names))


def _expected_steps(value: str) -> frozenset[int] | None:
    """An independent reading of the steps syntax: comma items, each N or an ascending N-M."""
    if not value.strip():
        return None
    steps: set[int] = set()
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        low, sep, high = item.partition("-")
        low, high = low.strip(), high.strip()
        if not (low.isascii() and low.isdigit()) or (sep and not (high.isascii() and high.isdigit())):
            raise ValueError(item)
        top = int(high) if sep else int(low)
        if top < int(low) or top - int(low) + 1 + len(steps) > MAX_LISTED_STEPS:
            raise ValueError(item)
        steps.update(range(int(low), top + 1))
    return frozenset(steps)


@FUZZ
@given(value=st.one_of(st.none(), step_text))
def test_parse_steps(value, tally) -> None:
    tally["fuzz_env"] += 1
    try:
        expected = None if value is None else _expected_steps(value)
    except ValueError:
        expected = "error"
    try:
        result = parse_steps(value, source="STEPS")
    except TraceConfigError as exc:
        assert expected == "error", (value, str(exc))
        assert str(exc).startswith(f"STEPS={value!r}")
        return
    assert result == expected, value


@FUZZ
@given(steps=st.frozensets(st.integers(0, 10_000), max_size=20))
def test_parse_steps_reads_back_a_written_list(steps, tally) -> None:
    tally["fuzz_env"] += 1
    text = ",".join(map(str, sorted(steps)))
    assert parse_steps(text) == (frozenset(steps) if steps else None)
    assert parse_steps(sorted(steps)) == (frozenset(steps) if steps else None)


def test_parse_steps_refuses_a_range_too_large_to_hold() -> None:
    """A typo like '0-10000000000' must not try to build ten billion step numbers."""
    with pytest.raises(TraceConfigError, match=r"0-10000000000.*more than 1,000,000 steps"):
        parse_steps("0-10000000000")


@FUZZ
@given(value=st.one_of(st.none(), st.text(max_size=12), st.integers(-5, 10**6)))
def test_parse_sample_size(value, tally) -> None:
    tally["fuzz_env"] += 1
    try:
        size = parse_sample_size(value, source="SIZE")
    except TraceConfigError as exc:
        assert str(exc).startswith(f"SIZE={value!r}")
        return
    assert isinstance(size, int) and size >= 1


regex_text = st.one_of(st.text(max_size=20), st.text(alphabet="()[]{}*+?|\\^$.ab0\\d", max_size=30))


@FUZZ
@given(pattern=regex_text, names=st.lists(st.text(max_size=20), max_size=5))
def test_layer_regex(pattern, names, tally) -> None:
    tally["fuzz_env"] += 1
    try:
        predicate = names_predicate(pattern, source="LAYERS")
    except TraceConfigError as exc:
        assert str(exc).startswith(f"LAYERS={pattern!r}")
        return
    for name in names:  # the predicate itself never raises
        assert isinstance(predicate(name), bool)


env_values = {
    ENV_ACTIVATIONS: st.one_of(switch_words, st.text(max_size=5)),
    ENV_LAYERS: regex_text,
    ENV_STATS: stat_text,
    ENV_STEPS: step_text,
    ENV_OUTPUT: st.text(max_size=30),
    ENV_SAMPLE_SIZE: st.one_of(st.integers(-3, 5000).map(str), st.text(max_size=5)),
}


@FUZZ
@given(environ=st.fixed_dictionaries({}, optional=env_values))
def test_config_from_env(environ, tally) -> None:
    tally["fuzz_env"] += 1
    try:
        config = TraceConfig.from_env(environ)
    except TraceConfigError as exc:
        named = [name for name in environ if str(exc).startswith(f"{name}=")]
        assert named, str(exc)
        return
    assert isinstance(config.enabled, bool) and config.sample_size >= 1
    assert config.steps is None or all(isinstance(s, int) and s >= 0 for s in config.steps)


# -- mapping files ------------------------------------------------------------------------------

names = st.sampled_from(["", "embed", "blocks.0", "blocks.0.fc", "blocks.1", "blocks.1.fc", "head", "nope"])
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=8), names)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(names, st.text(max_size=6)), inner, max_size=4)),
    max_leaves=12)
mapping_data = st.dictionaries(
    st.one_of(st.sampled_from(TOP_LEVEL_KEYS), st.text(max_size=6)),
    st.one_of(
        json_value,
        st.dictionaries(names, names, max_size=4),  # pairs
        st.dictionaries(st.sampled_from([r"blocks\.(\d+)", r"blocks\.(\d+)\.fc", "(", "head"]),
                        st.sampled_from([r"blocks.\1", r"blocks.\1.fc", r"\2", "head"]), max_size=3),  # rules
        st.fixed_dictionaries({}, optional={"upstream": st.lists(st.sampled_from(["head", "nope", "["]), max_size=2),
                                            "port": st.lists(st.sampled_from(["head", "embed"]), max_size=2)}),
        st.lists(st.fixed_dictionaries({"upstream": st.lists(names, max_size=3),
                                        "port": st.lists(names, max_size=2)}), max_size=2),  # groups
    ),
    max_size=5,
)
MODULES = ["", "embed", "blocks.0", "blocks.0.fc", "blocks.1", "blocks.1.fc", "head"]


@FUZZ
@given(data=mapping_data)
def test_mapping_parser(data, tally) -> None:
    tally["fuzz_mapping"] += 1
    try:
        spec = parse_mapping(data, origin="map.toml")
    except AlignmentError as exc:
        assert str(exc).startswith("map.toml: ")
        return
    assert isinstance(spec, MappingSpec)
    for pattern, _ in spec.rules:
        re.compile(pattern)  # a spec only ever holds rules that compile
    try:
        resolved = resolve_mapping(spec, MODULES, MODULES)
    except AlignmentError as exc:
        assert str(exc).startswith("map.toml: ")
        return
    ports = [port for _, port, _ in resolved.pairs]
    assert len(ports) == len(set(ports))  # one port module takes one upstream module
    assert all(up in MODULES and port in MODULES for up, port, _ in resolved.pairs)


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mapfiles")


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                         st.sampled_from([b'[pairs]\n"a" = "b"\n', b'{"pairs": {"a": "b"}}', b"[rules\n", b"\xff{"])),
       suffix=st.sampled_from([".toml", ".json"]))
def test_mapping_file_reader(table_dir, content, suffix, tally) -> None:
    tally["fuzz_mapping"] += 1
    path = table_dir / f"map{suffix}"
    path.write_bytes(content)
    try:
        data = read_table_file(path, what="mapping file")
    except AlignmentError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc).strip()
        return
    assert isinstance(data, dict)
