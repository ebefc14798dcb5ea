"""Benchmark harness: convergence of Sven against first- and quasi-second-order optimizers, and scaling.

Modules:
    tasks       the problems (1-D regression, a degree-4 polynomial, 8x8 digits as label
                regression and as cross-entropy, the 2-D Poisson problem) behind one interface.
    optimizers  each optimizer with its hyper-parameter grid and its step on a task.
    runner      the grid x seeds loop: progress bars, JSON-lines results, resuming, selection.
    report      Markdown tables computed from a results file.
    plots       loss curves, singular-value spectra and scaling figures (matplotlib).
    scaling     step time and peak memory against parameter count and batch size.
    environment versions and machine recorded with every result; peak resident memory.
    cli         ``python -m sven_ext bench ...``.
    formulations  the seed-0 sweeps that chose Sven's rows on the digits regression and its rtol on the 1-D one
                (``python -m sven_ext.harness.formulations``).
"""
