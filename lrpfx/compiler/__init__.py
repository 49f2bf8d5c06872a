"""The compiler: trace -> canonicalize -> match -> (analysis) -> emit.

Each stage is one module: :mod:`~lrpfx.compiler.trace`, :mod:`~lrpfx.compiler.canonicalize`,
:mod:`~lrpfx.compiler.patterns` (the op table and single-op patterns), :mod:`~lrpfx.compiler.blocks`
(residual-block subgraphs), :mod:`~lrpfx.compiler.match` (the Plan), :mod:`~lrpfx.compiler.emit`.
"""
