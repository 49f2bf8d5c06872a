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
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrpfx.compiler.patterns import known_pattern
from lrpfx.errors import RuleSetError
from lrpfx.relevance.rules import Rule, rule_class

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
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RuleSetError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}). "
                               "Hint: a rule set is a TOML file.") from None
        except OSError as e:
            raise RuleSetError(f"cannot read rule set file {str(path)!r}: {e.strerror or e}.") from None
        return cls.from_toml(text, source=str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<string>") -> RuleSet:
        """Parse TOML text; errors name the source, the line or the binding."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RuleSetError(f"{source}: invalid TOML: {e}. Hint: see docs/rules.md for the format.") from e
        except RecursionError:  # tomllib recurses once per nested array or inline table
            raise RuleSetError(f"{source}: invalid TOML: arrays or tables nested too deeply for the parser. "
                               "Hint: see docs/rules.md for the format.") from None
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
        for key, kind in (("name", str), ("description", str), ("top", str), ("options", Mapping), ("c3", Mapping)):
            if key in data and not isinstance(data[key], kind):
                example = {"options": 'options = { batchnorm = "fold" }', "c3": "[c3] followed by key = value lines"}
                what = f"a table ({example[key]})" if kind is Mapping else "a string"
                raise RuleSetError(f"{source}: `{key}` must be {what}, got {data[key]!r}.")
        bindings = tuple(_binding(b, i, source) for i, b in enumerate(binds))
        try:
            return cls(name=data.get("name", source), bindings=bindings, top=data.get("top", "logit"),
                       description=data.get("description", ""), options=dict(data.get("options", {})),
                       c3=dict(data.get("c3", {})))
        except RuleSetError as e:
            raise RuleSetError(f"{source}: {e}") from None

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
    for key in ("pattern", "rule"):
        if not isinstance(entry[key], str):
            raise RuleSetError(f"{where}: `{key}` must be a string, got {entry[key]!r}.")
    where = f"{where} ({entry['pattern']} -> {entry['rule']})"
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in entry.items() if k not in ("pattern", "rule")}
    if not known_pattern(str(entry["pattern"])):
        raise RuleSetError(f"{where}: unknown pattern {entry['pattern']!r}. Hint: see lrpfx.registered_patterns().")
    try:
        cls = rule_class(str(entry["rule"]))
    except RuleSetError as e:
        raise RuleSetError(f"{where}: {e}") from None
    check_params(cls, params, where)
    try:
        rule = cls(**params)
    except TypeError as e:
        names = [f.name for f in dataclasses.fields(cls)]
        raise RuleSetError(f"{where}: rule {entry['rule']!r} does not take {sorted(params)}; "
                           f"its parameters are {names}.") from e
    except (RuleSetError, ValueError) as e:
        raise RuleSetError(f"{where}: {e}") from None
    return Binding(str(entry["pattern"]), rule)


#: parameters that must be >= 0 (stabilizers, epsilon, gamma, the alpha/beta weights) and > 0
_NON_NEGATIVE = frozenset({"eps", "stabilizer", "gamma", "alpha", "beta"})
_POSITIVE = frozenset({"std", "kernel"})


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(key: str, value: Any, kinds: list[str]) -> str | None:
    """Why ``value`` does not fit the annotation alternatives ``kinds``, or None if it does."""
    def number(v: Any) -> str | None:
        if not _is_real(v):
            return "number"
        if not math.isfinite(v):
            return "finite number"
        if key in _POSITIVE and v <= 0:
            return "number > 0"
        if key in _NON_NEGATIVE and v < 0:
            return "number >= 0"
        return None

    wanted: list[str] = []
    for kind in kinds:
        if kind == "float":
            why = number(value)
            why = why and f"a {why}"
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and number(value) is None
            sign = " > 0" if key in _POSITIVE else " >= 0" if key in _NON_NEGATIVE else ""
            why = None if ok else f"an integer{sign}"
        elif kind == "bool":
            why = None if isinstance(value, bool) else "true or false"
        elif kind == "str":
            why = None if isinstance(value, str) else "a string"
        elif kind.startswith("tuple[") and kind.endswith("...]"):
            if not isinstance(value, tuple) or not value:
                why = "a non-empty list of numbers"
            else:
                why = next(("a list of " + w.replace("number", "numbers") for w in map(number, value) if w), None)
        elif kind == "None":
            continue  # TOML has no null
        else:
            return None  # an annotation this check does not know (a user's rule): the rule decides
        if why is None:
            return None
        wanted.append(why)
    return " or ".join(dict.fromkeys(wanted)) if wanted else None


def check_params(cls: type[Rule], params: Mapping[str, Any], where: str) -> None:
    """Check rule hyperparameters from a rule file against the rule's field types, before building it.

    Numbers must be finite and not booleans; epsilon, stabilizers, gamma, alpha and beta must be
    >= 0, std and kernel > 0; a z^B box needs low <= high. Errors name ``where`` and the key.
    """
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    for key, value in params.items():
        if key not in types:
            continue  # an unknown key: the rule's constructor reports it with the list of parameters
        why = _check_value(key, value, [k.strip() for k in types[key].split("|")])
        if why:
            raise RuleSetError(f"{where}: {key} = {_show(value)} is not valid: it must be {why}.")
    low, high = params.get("low"), params.get("high")
    if low is not None and high is not None:
        lows = low if isinstance(low, tuple) else None
        highs = high if isinstance(high, tuple) else None
        if lows is not None and highs is not None and len(lows) != len(highs):
            raise RuleSetError(f"{where}: low has {len(lows)} value(s) but high has {len(highs)}.")
        n = len(lows or highs or (0,))
        pairs = zip(lows or (low,) * n, highs or (high,) * n)
        if any(a > b for a, b in pairs):
            raise RuleSetError(f"{where}: the box is empty: low = {_show(low)} must be <= high = {_show(high)} "
                               "(per channel).")


def _show(v: Any) -> str:
    """A value as it is written in TOML."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return "[" + ", ".join(map(_show, v)) + "]"
    return repr(v) if not isinstance(v, str) else '"' + v.replace('"', '\\"') + '"'


def builtin_names() -> list[str]:
    """Names of the built-in rule sets."""
    root = importlib.resources.files("lrpfx.rulesets")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))
