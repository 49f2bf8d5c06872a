"""Rule files are checked when they are loaded: every bad value is an error naming the file and the binding."""
from __future__ import annotations

from pathlib import Path

import pytest

from lrpfx.cli import commands as cli
from lrpfx.errors import RuleSetError
from lrpfx.relevance.ruleset import RuleSet, builtin_names


def _one(rule: str, params: str) -> str:
    return f'bind = [\n  {{ pattern = "conv", rule = "{rule}", {params} }},\n]\n'


@pytest.mark.parametrize("rule,params,message", [
    ("epsilon", "eps = -1", "eps = -1 is not valid: it must be a number >= 0"),
    ("epsilon", "eps = inf", "eps = inf is not valid: it must be a finite number"),
    ("epsilon", "eps = nan", "eps = nan is not valid: it must be a finite number"),
    ("epsilon", "eps = true", "eps = true is not valid: it must be a number"),
    ("epsilon", 'eps = "big"', 'eps = "big" is not valid: it must be a number'),
    ("epsilon", "eps = [1e-6]", "eps = [1e-06] is not valid: it must be a number"),
    ("epsilon", "zero_bias = 1", "zero_bias = 1 is not valid: it must be true or false"),
    ("zplus", "stabilizer = -1e-6", "stabilizer = -1e-06 is not valid: it must be a number >= 0"),
    ("gamma", "gamma = -5", "gamma = -5 is not valid: it must be a number >= 0"),
    ("gamma", 'gamma = "0.25"', 'gamma = "0.25" is not valid: it must be a number'),
    ("alpha_beta", "alpha = inf, beta = 1", "alpha = inf is not valid: it must be a finite number"),
    ("alpha_beta", "alpha = 1, beta = -1", "beta = -1 is not valid: it must be a number >= 0"),
    ("alpha_beta", "alpha = 3, beta = 1", "alpha - beta = 1"),  # the rule's own check, with the file named
    ("zbox", "low = 1, high = 0", "the box is empty: low = 1 must be <= high = 0"),
    ("zbox", "low = [0, 0, 1], high = [1, 1, 0.5]", "low = [0, 0, 1] must be <= high = [1, 1, 0.5]"),
    ("zbox", "low = [0, 0], high = [1, 1, 1]", "low has 2 value(s) but high has 3"),
    ("zbox", 'low = ["a"], high = [1]', 'low = ["a"] is not valid: it must be a list of numbers'),
    ("zbox", "std = [0.2, 0, 0.2]", "std = [0.2, 0, 0.2] is not valid: it must be a list of numbers > 0"),
    ("avg_substitute", "kernel = 0", "kernel = 0 is not valid: it must be an integer > 0"),
    ("avg_substitute", "kernel = 2.5", "kernel = 2.5 is not valid: it must be an integer > 0"),
    ("eccv", "split = 3", "split = 3 is not valid: it must be a string"),
    ("epsilon", "epsilon = 1e-6", "does not take ['epsilon']"),
])
def test_bad_rule_values_name_the_file_and_binding(tmp_path: Path, rule: str, params: str, message: str) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(_one(rule, params))
    with pytest.raises(RuleSetError) as e:
        RuleSet.from_file(path)
    assert str(e.value).startswith(f"{path}: bind[0] (conv -> {rule}): ") and message in str(e.value), str(e.value)


@pytest.mark.parametrize("params", ["eps = 0", "eps = 1", "eps = 1e-9, zero_bias = true"])
def test_good_values_load(params: str) -> None:
    RuleSet.from_toml(_one("epsilon", params), "ok.toml")


def test_good_box_and_alpha_beta_load() -> None:
    RuleSet.from_toml(_one("zbox", "low = -2, high = 2.5"), "ok.toml")
    RuleSet.from_toml(_one("zbox", "low = [-2, -2, -2], high = [2, 2, 2]"), "ok.toml")
    RuleSet.from_toml(_one("alpha_beta", "alpha = 1, beta = 0"), "ok.toml")


def test_every_builtin_rule_set_passes_the_checks() -> None:
    for name in builtin_names():
        RuleSet.builtin(name)


@pytest.mark.parametrize("head,message", [
    ('c3 = "x"\n', '`c3` must be a table'),
    ("options = 3\n", "`options` must be a table"),
    ("top = 1\n", "`top` must be a string"),
    ('top = "probability"\n', "top='probability' is not one of"),
    ('options = { batchnorm = "drop" }\n', "options.batchnorm = 'drop' is not one of"),
    ("name = [1]\n", "`name` must be a string"),
])
def test_bad_tables_and_keys_name_the_file(tmp_path: Path, head: str, message: str) -> None:
    path = tmp_path / "set.toml"
    path.write_text(head + _one("epsilon", "eps = 1e-6"))
    with pytest.raises(RuleSetError) as e:
        RuleSet.from_file(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_bad_binding_shapes(tmp_path: Path) -> None:
    with pytest.raises(RuleSetError, match=r"x\.toml: bind\[0\]: `pattern` must be a string, got 1"):
        RuleSet.from_toml('bind = [{ pattern = 1, rule = "epsilon" }]', "x.toml")
    with pytest.raises(RuleSetError, match=r"x\.toml: bind\[1\] must be a table"):
        RuleSet.from_toml('bind = [{ pattern = "conv", rule = "epsilon" }, "flat"]', "x.toml")


def test_deep_nesting_is_a_rule_set_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RuleSetError, match=r"deep\.toml: invalid TOML: .*nested too deeply"):
        RuleSet.from_file(path)


def test_syntax_errors_give_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\nbind = [\n  { pattern = "conv" rule = "epsilon" },\n]\n')
    with pytest.raises(RuleSetError, match=r"broken\.toml: invalid TOML: .*line 3"):
        RuleSet.from_file(path)


def test_a_binary_file_is_a_rule_set_error(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(RuleSetError, match=r"bin\.toml: not a UTF-8 text file"):
        RuleSet.from_file(path)


def test_the_command_reports_a_bad_rule_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "neg.toml"
    path.write_text(_one("epsilon", "eps = -1"))
    assert cli.main(["inspect", "torchvision:resnet18", "--rules", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lrpfx: error: {path}: bind[0] (conv -> epsilon): eps = -1 is not valid: it must be a number >= 0."
