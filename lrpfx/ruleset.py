"""RuleSet: ordered bindings pattern -> rule, loaded from TOML (built-in or a user's file).

A TOML rule set::

    name = "epsilon_plus_flat"
    description = "..."
    top = "logit"                     # or "softmax"
    bind = [
      { pattern = "first_layer", rule = "flat" },
      { pattern = "conv", rule = "zplus", stabilizer = 1e-6 },
      ...
    ]

Every key of a binding other than ``pattern`` and ``rule`` is a rule hyperparameter.
The first binding whose pattern matches a node wins. TOML runs no code, so a user's
rule set is safe to load.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpfx.errors import RuleSetError
from lrpfx.rules import Rule, rule_class

_TOP_MODES = ("logit", "softmax")
#: rule-set options and their allowed values
_OPTIONS: dict[str, tuple[str, ...]] = {"batchnorm": ("fold", "pass")}


@dataclass(frozen=True)
class Binding:
    """Bind ``rule`` to every node that ``pattern`` matches."""

    pattern: str
    rule: Rule


@dataclass(frozen=True)
class RuleSet:
    """An ordered list of bindings plus the choice of output relevance."""

    name: str
    bindings: tuple[Binding, ...]
    top: str = "logit"
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    c3: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.top not in _TOP_MODES:
            raise RuleSetError(f"rule set {self.name!r}: top={self.top!r} is not one of {_TOP_MODES}.")
        unknown = set(self.options) - set(_OPTIONS)
        if unknown:
            raise RuleSetError(f"rule set {self.name!r}: unknown option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}.")
        for key, allowed in _OPTIONS.items():
            if key in self.options and self.options[key] not in allowed:
                raise RuleSetError(f"rule set {self.name!r}: options.{key} = {self.options[key]!r} is not one of "
                                   f"{allowed}.")

    @classmethod
    def ensure(cls, value: RuleSet | str | Path) -> RuleSet:
        """A RuleSet from a RuleSet, a built-in name, or the path of a TOML file."""
        if isinstance(value, RuleSet):
            return value
        if isinstance(value, Path) or (isinstance(value, str) and value.endswith(".toml")):
            return cls.from_file(Path(value))
        if isinstance(value, str):
            return cls.builtin(value)
        raise RuleSetError(f"rules must be a RuleSet, a built-in name or a .toml path, got {type(value).__name__}.")

    @classmethod
    def builtin(cls, name: str) -> RuleSet:
        """A built-in rule set (``rules/<name>.toml``, installed as ``lrpfx.rulesets``)."""
        resource = importlib.resources.files("lrpfx.rulesets") / f"{name}.toml"
        if not resource.is_file():
            raise RuleSetError(f"unknown rule set {name!r}. Built-in rule sets: {', '.join(builtin_names())}. "
                               "Hint: pass a path to your own .toml file or a RuleSet object.")
        return cls.from_toml(resource.read_text(), source=f"built-in rule set {name!r}")

    @classmethod
    def from_file(cls, path: Path) -> RuleSet:
        """Load a rule set from a TOML file."""
        if not path.is_file():
            raise RuleSetError(f"rule set file {str(path)!r} does not exist.")
        return cls.from_toml(path.read_text(), source=str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>") -> RuleSet:
        """Parse TOML text; errors name the source, the line or the binding."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RuleSetError(f"{source}: invalid TOML: {e}. Hint: see docs/rulesets.md for the format.") from e
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> RuleSet:
        """Build a rule set from parsed TOML."""
        unknown = set(data) - {"name", "description", "top", "bind", "options", "c3"}
        if unknown:
            raise RuleSetError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: name, description, top, "
                               "bind, options, c3.")
        binds = data.get("bind")
        if not isinstance(binds, list) or not binds:
            raise RuleSetError(f"{source}: needs a non-empty list `bind = [{{ pattern = ..., rule = ... }}, ...]`.")
        bindings = tuple(_binding(b, i, source) for i, b in enumerate(binds))
        return cls(name=str(data.get("name", source)), bindings=bindings, top=str(data.get("top", "logit")),
                   description=str(data.get("description", "")), options=dict(data.get("options", {})),
                   c3=dict(data.get("c3", {})))

    def with_bindings(self, bindings: Sequence[Binding] | Mapping[str, Rule], name: str | None = None) -> RuleSet:
        """A copy with ``bindings`` placed first (they win over the set's own)."""
        if isinstance(bindings, Mapping):
            bindings = [Binding(p, r) for p, r in bindings.items()]
        return dataclasses.replace(self, bindings=tuple(bindings) + self.bindings, name=name or self.name)

    def __str__(self) -> str:
        lines = [f"RuleSet {self.name!r} (top={self.top})"]
        lines += [f"  {b.pattern:<14} -> {b.rule}" for b in self.bindings]
        return "\n".join(lines)


def _binding(entry: Any, index: int, source: str) -> Binding:
    where = f"{source}: bind[{index}]"
    if not isinstance(entry, Mapping) or "pattern" not in entry or "rule" not in entry:
        raise RuleSetError(f"{where} must be a table with `pattern` and `rule`, got {entry!r}.")
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in entry.items() if k not in ("pattern", "rule")}
    from lrpfx.match import known_pattern  # late: match imports this module
    if not known_pattern(str(entry["pattern"])):
        raise RuleSetError(f"{where}: unknown pattern {entry['pattern']!r}. Hint: see lrpfx.registered_patterns().")
    try:
        cls = rule_class(str(entry["rule"]))
    except RuleSetError as e:
        raise RuleSetError(f"{where}: {e}") from None
    try:
        rule = cls(**params)
    except TypeError as e:
        names = [f.name for f in dataclasses.fields(cls)]
        raise RuleSetError(f"{where}: rule {entry['rule']!r} does not take {sorted(params)}; "
                           f"its parameters are {names}.") from e
    return Binding(str(entry["pattern"]), rule)


def builtin_names() -> list[str]:
    """Names of the built-in rule sets."""
    root = importlib.resources.files("lrpfx.rulesets")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))
