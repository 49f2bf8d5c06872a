"""The explainer's source, made to read like the math.

``print(explainer.code)`` is documentation. fx writes one statement per node; this pass, run on
every recompile, rewrites fx's text without changing what it computes:

* a parameter fetched for a single use is written at its use (``getattr(self.layer1, "0").conv1.weight``),
  so no line only fetches a weight;
* every relevance statement is preceded by its provenance, from ``node.meta["lrpfx"]``:
  ``# layer1.0 [bottleneck] dense_zplus``;
* long calls are wrapped at their top-level arguments (the ``x = y = None`` that frees values
  after their last use then goes on a line of its own).
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
from torch.fx.graph_module import _forward_from_src

from lrpfx.compiler.diagnostics import smallest_side
from lrpfx.errors import InputError

_WIDTH = 110
_WORD = re.compile(r"\b\w+\b")
_FETCH = re.compile(r'^(\s+)(\w+) = ([\w.", ()]+)$')


class RelevanceNetwork(fx.GraphModule):
    """The compiled explainer: an ``fx.GraphModule`` whose code is formatted by :func:`readable`.

    In eager mode, an input too small for the network (its feature maps would shrink to
    nothing) raises :class:`~lrpfx.errors.InputError` naming the smallest size it takes,
    instead of a shape error deep inside a pooling or a convolution.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or not args or not isinstance(args[0], torch.Tensor) \
                or args[0].dim() < 3:
            return super().__call__(*args, **kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except (RuntimeError, IndexError) as e:  # a shape error deep inside (InputError is a ValueError)
            x = args[0]
            side = smallest_side(self, x)  # probes with the bare forward: no recursion into __call__
            if side is None or side <= min(x.shape[2:]):
                raise
            size = " x ".join(str(int(v)) for v in x.shape[2:])
            raise InputError(f"the input is {size}, smaller than the smallest input this network takes ({side} x "
                             f"{side}): its feature maps would shrink to nothing. Hint: resize the images to at "
                             f"least {side} x {side}.") from e

    def recompile(self) -> Any:
        python_code = super().recompile()
        src = readable(self._code, provenance(self.graph))
        self._code = src
        self._lineno_map = None
        co_fields = self._graph._co_fields if hasattr(self._graph, "_co_fields") else {}
        type(self).forward = _forward_from_src(src, python_code.globals, co_fields)
        return python_code


def provenance(graph: fx.Graph) -> dict[str, str]:
    """``node name -> comment`` for the relevance statements: the forward op, its pattern, its rule."""
    out = {}
    for node in graph.nodes:
        meta = node.meta.get("lrpfx")
        if not meta or "pattern" not in meta:
            continue
        where = meta.get("where") or meta.get("source", "")
        out[node.name] = f"# {where} [{meta['pattern']}] {meta.get('rule_name', meta['rule'])}"
    return out


def readable(src: str, comments: dict[str, str]) -> str:
    """fx's source, with single-use parameter fetches inlined, provenance comments and wrapped lines."""
    lines = src.split("\n")
    fetched: dict[str, str] = {}
    for line in lines:
        m = _FETCH.match(line)
        if m and _is_attribute(m.group(3)):
            fetched[m.group(2)] = m.group(3)
    uses: dict[str, int] = dict.fromkeys(fetched, 0)
    for line in lines:
        if not _fetch(line):
            for word in _WORD.findall(_body(line)):
                if word in uses:
                    uses[word] += 1
    inline = {v: e for v, e in fetched.items() if uses[v] == 1}
    out: list[str] = []
    seen: set[str] = set()
    for line in lines:
        m = _FETCH.match(line)
        if m and m.group(2) in inline and _is_attribute(m.group(3)):
            continue
        body, frees = _split_frees(line)
        if inline:
            body = _WORD.sub(lambda m: inline.get(m.group(0), m.group(0)), body)
        frees = [f for f in frees if f not in inline]
        target = re.match(r"^\s+(\w+) = ", body)
        if target and target.group(1) in comments and target.group(1) not in seen:
            indent = re.match(r"^(\s*)", body).group(1)  # type: ignore[union-attr]
            comment = f"{indent}{comments[target.group(1)]}"
            if out and out[-1] != comment:
                out.append(comment)
            seen.add(target.group(1))
        wrapped = _wrap(body)
        if frees and len(wrapped) == 1:  # fx's own form: free the values after their last use, same line
            wrapped = [f"{body};  {' = '.join(frees)} = None"]
        elif frees:
            indent = re.match(r"^(\s*)", body).group(1)  # type: ignore[union-attr]
            wrapped.append(f"{indent}{' = '.join(frees)} = None")
        out.extend(wrapped)
    return "\n".join(out)


def _fetch(line: str) -> bool:
    m = _FETCH.match(line)
    return bool(m) and _is_attribute(m.group(3))


def _is_attribute(expr: str) -> bool:
    """Whether ``expr`` only reads an attribute of ``self`` (``getattr(self.layer1, "0").conv1.weight``), no call."""
    if not (expr.startswith("self") or expr.startswith("getattr(")):
        return False
    return all(expr[:i].endswith("getattr") for i, c in enumerate(expr) if c == "(")


def _body(line: str) -> str:
    return _split_frees(line)[0]


def _split_frees(line: str) -> tuple[str, list[str]]:
    """(statement, names freed by fx's trailing ``;  a = b = None``)."""
    m = re.match(r"^(.*?);  ((?:\w+ = )+)None$", line)
    if not m:
        return line, []
    return m.group(1), [v for v in m.group(2).split(" = ") if v]


def _wrap(line: str) -> list[str]:
    """A call longer than the width, broken after its top-level commas (inside the outer parentheses)."""
    if len(line) <= _WIDTH or "(" not in line:
        return [line]
    indent = re.match(r"^(\s*)", line).group(1)  # type: ignore[union-attr]
    start = line.index("(") + 1
    depth, parts, last = 0, [], start
    for i in range(start, len(line)):
        c = line[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                parts.append(line[last:i].strip())
                head, tail = line[:start], line[i:]
                if len(parts) == 1 and "," not in parts[0]:
                    return [line]
                return _pack(head, _split_top(", ".join(parts)), tail, indent + "        ")
            depth -= 1
    return [line]


def _pack(head: str, args: list[str], tail: str, indent: str) -> list[str]:
    """``head`` then the arguments, as many per continuation line as fit in the width."""
    lines, current = [head], ""
    for i, a in enumerate(args):
        piece = a + ("," if i < len(args) - 1 else tail)
        if current and len(indent) + len(current) + 1 + len(piece) > _WIDTH:
            lines.append(indent + current)
            current = piece
        else:
            current = f"{current} {piece}" if current else piece
    lines.append(indent + current)
    return lines


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets and strings."""
    parts, depth, last, quote = [], 0, 0, ""
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[last:i].strip())
            last = i + 1
    parts.append(text[last:].strip())
    return [p for p in parts if p]
