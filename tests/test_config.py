"""kdlib.config: dataclasses from dicts with clear errors, plain-data dicts, YAML reading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from kdlib.config import check_choice, check_range, from_dict, load_yaml, read_yaml, to_dict
from kdlib.errors import ConfigError


@dataclass(frozen=True)
class Demo:
    size: int = 8
    names: tuple[str, ...] = ("a", "b")
    where: Path = Path("x/y")


def test_from_dict_builds_and_rejects_unknown_keys_listing_the_valid_ones():
    assert from_dict(Demo, {"size": 3}) == Demo(size=3)
    assert from_dict(Demo, None) == Demo()
    with pytest.raises(ConfigError) as err:
        from_dict(Demo, {"size": 3, "colour": "red"}, "demo.yaml")
    assert "unknown setting(s) ['colour'] in demo.yaml" in str(err.value)
    assert "valid settings: ['size', 'names', 'where']" in str(err.value)


def test_to_dict_gives_plain_yaml_data():
    assert to_dict(Demo()) == {"size": 8, "names": ["a", "b"], "where": "x/y"}


def test_check_choice_and_range_name_the_setting():
    check_choice("mode", "a", ["a", "b"])
    with pytest.raises(ConfigError, match=r"mode='c' is not valid; choose one of \['a', 'b'\]"):
        check_choice("mode", "c", ["a", "b"])
    check_range("p", 0.5, 0, 1)
    with pytest.raises(ConfigError, match=r"p=2 must lie in \[0, 1\]"):
        check_range("p", 2, 0, 1)
    with pytest.raises(ConfigError, match=r"k=-1 must lie in \[0, None\]"):
        check_range("k", -1, 0)


def test_read_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a YAML mapping of settings, got list"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}
    (tmp_path / "ok.yaml").write_text("epochs: 3\n")
    assert read_yaml(tmp_path / "ok.yaml") == {"epochs": 3}


def test_load_yaml_gives_what_safe_load_gives():
    """libyaml's parser (when present) reads kdlib's files to the same data as PyYAML's."""
    root = Path(__file__).resolve().parent.parent
    texts = [p.read_text() for p in sorted((root / "profiles").glob("*.yaml"))]
    texts.append("a: 1e-4\nb: 0.003\nc: [1, 4, null]\nd: {x: yes, y: ~}\ne: '0.5'\nf: 2026-01-01\n")
    assert texts and all(load_yaml(t) == yaml.safe_load(t) for t in texts)
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: !!python/object/apply:os.system ['true']\n")  # safe: no Python objects
