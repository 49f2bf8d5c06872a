"""Stage lines for the commands that take a while: ``compiling the C3-LRP explainer… 1.2 s``.

Written to standard error (standard output keeps the results), one line per stage, with a
bar for stages made of counted steps. On a terminal the bar redraws in place; in a log file
it is written once, when the stage ends, so logs stay readable.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO


class Stages:
    """Names each stage as it runs and how long it took; :meth:`total` gives the elapsed time."""

    def __init__(self, stream: IO[str] | None = None, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.start = time.perf_counter()

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """``with stages.stage("compiling…"):`` prints the name, then the seconds it took."""
        t = time.perf_counter()
        if not self.quiet:
            print(f"  {name}…", end="", file=self.stream, flush=True)
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(" failed", file=self.stream, flush=True)
            raise
        if not self.quiet:
            print(f" {time.perf_counter() - t:.1f} s", file=self.stream, flush=True)

    @contextmanager
    def bar(self, name: str, total: int) -> Iterator["_Bar"]:
        """A stage of ``total`` steps: ``with stages.bar("RISE", 4) as bar: ... bar.step()``."""
        b = _Bar(self, name, total)
        try:
            yield b
        except BaseException:
            if not self.quiet:
                print(" failed", file=self.stream, flush=True)
            raise
        b.finish()

    def total(self) -> float:
        return time.perf_counter() - self.start


class _Bar:
    WIDTH = 20

    def __init__(self, stages: Stages, name: str, total: int) -> None:
        self.stages, self.name, self.total, self.done = stages, name, max(total, 1), 0
        self.t = time.perf_counter()
        self.live = not stages.quiet and getattr(stages.stream, "isatty", lambda: False)()
        self._draw()

    def step(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        self._draw()

    def _line(self) -> str:
        filled = round(self.WIDTH * self.done / self.total)
        return f"  {self.name} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total}"

    def _draw(self) -> None:
        if self.live:
            print("\r" + self._line(), end="", file=self.stages.stream, flush=True)

    def finish(self) -> None:
        if self.stages.quiet:
            return
        line = self._line() + f" {time.perf_counter() - self.t:.1f} s"
        print(("\r" if self.live else "") + line, file=self.stages.stream, flush=True)
