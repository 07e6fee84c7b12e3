"""``so8t-compare``: every run below some folders, side by side.

::

    so8t-compare outputs/                                   # all experiments, runs and sweeps
    so8t-compare outputs/default/sweeps/lr --sort=-reward/mean --plot rewards.png
    so8t-compare outputs/a outputs/b --metric reward/mean --metric kl/mean --format md
    so8t-compare outputs/ --filter status=completed --filter ppo.clip_range=0.2 --format json

A *run folder* is one that holds a ``session.json`` (single runs in
``<experiment>/runs/<run_name>/``, sweep jobs in ``<experiment>/sweeps/<sweep>/<run_name>/``).
The search goes down from each PATH, skipping hidden folders and never descending into a run.
A folder that holds run files but no ``session.json`` (a job that failed before training), a
folder that holds no run at all, and a run whose ``session.json``, ``metrics.jsonl`` or
``.hydra/config.yaml`` cannot be read are reported on stderr and skipped; the command never
crashes on them. A partial last line of ``metrics.jsonl`` (a crash mid-write) is normal and
ignored.

One row per run: experiment, run path, status, steps done / ``max_steps``, step of the last
checkpoint, number of resumes, training time, the config keys whose values differ across the
selected runs, and for each ``--metric`` the last value and the best one with its step. Config
values come from the run's resolved config: the result-shaping keys as recorded in
``session.json`` by the last attempt that trained, the others (hardware, checkpoint …) from
``.hydra/config.yaml``, so changes made by an experiment preset show, not only the overrides
typed. Metrics come from ``metrics.jsonl``, where the last row of each step wins (steps redone
after a resume count once). ``best`` is the maximum, or the minimum for metrics whose name starts
with ``loss`` or ``time/`` or contains ``kl``; force it with ``--metric NAME:min`` / ``NAME:max``.

Options: ``--metric NAME`` (repeatable; default ``reward/mean``), ``--sort KEY`` (a column:
``experiment run status steps max_steps ckpt resumes time``, a config key, a metric name — its
last value — or ``best:METRIC``; ``-KEY`` sorts descending; runs lacking the key sort last),
``--filter KEY=VALUE`` (repeatable, all must match; KEY as for ``--sort``; numbers compare by
value, ``VALUE`` may hold shell wildcards), ``--format table|md|csv|json``, ``--plot FILE.png``
(the metrics' curves of all runs overlaid, labelled by their differing keys), ``--width N``
(table width; default: the terminal's, else 100).

The table drops the experiment column and prints it above the table when all runs share it,
names runs by their path below the folder the runs share, shortens a config key to its last
part when that is unambiguous (``clip_range`` for ``ppo.clip_range``), and elides the middle of
long run names to fit the width.

JSON output (``--format json``), stable; new keys may be added, none renamed or removed::

    {
      "version": 1,
      "metrics": [{"name": "reward/mean", "mode": "max"}],      # mode: which value is "best"
      "differing_keys": ["ppo.clip_range", "seed"],               # sorted dotted config keys
      "runs": [                                                   # in the --sort order
        {
          "experiment": "default",          # config experiment_name (else the folder above runs/ or sweeps/)
          "run": "sweeps/S/seed=1",         # path below the experiment folder (or below PATH)
          "path": "/abs/path/to/run",
          "status": "completed",            # completed | interrupted | failed | running | killed | null
                                            # (killed: session.json says running, no live process holds the run)
          "step": 20, "max_steps": 20,      # updates done, updates asked for (null if unknown)
          "last_checkpoint_step": 20,       # null when none was saved
          "attempts": 2, "resumes": 1,      # processes that trained it; those that resumed a checkpoint
          "training_time": 5.12,            # seconds of training, summed over attempts
          "config": {"ppo.clip_range": 0.1, "seed": 1},   # the differing keys (null: key absent)
          "metrics": {"reward/mean": {"last": 0.31, "last_step": 20, "best": 0.35, "best_step": 18}}
                                            # all four null when the run logged no value
        }
      ],
      "skipped": [{"path": "/abs/path", "reason": "session.json is not valid JSON (...)"}]
    }

Exit status: 0 when at least one run was found (even if ``--filter`` kept none), 1 when none
was, 2 for a usage error (or ``--plot`` without matplotlib).

The table of runs is a pandas DataFrame (:func:`table_frame`, what ``csv`` prints); Markdown is
tabulate's GitHub format, and each block of the terminal table is tabulate's plain format;
``--plot`` draws with matplotlib's object API. What no library does is hand-written: finding
runs, reporting damaged ones, and wrapping a wide terminal table into blocks that fit the width.

One module per job: ``runs`` (finding and reading runs), ``metrics`` (summaries), ``comparison``
(filter, sort, differing keys, the JSON document), ``table`` (the DataFrame), ``render`` (terminal,
Markdown, CSV, JSON), ``plot``, ``cli``.

Importing this module is cheap (no torch, no Hydra, no pandas until a table is printed): it reads
JSON and YAML files only.
"""

from __future__ import annotations

from so8t.compare.cli import main
from so8t.compare.comparison import JSON_VERSION, Comparison, compare, differing_keys
from so8t.compare.metrics import DEFAULT_METRIC, Metric, MetricSummary, summarize
from so8t.compare.plot import plot, plot_labels
from so8t.compare.render import render_csv, render_json, render_markdown, render_table
from so8t.compare.runs import Damaged, Run, Skipped, find_runs, load_run
from so8t.compare.table import table_frame

__all__ = ["Comparison", "Damaged", "DEFAULT_METRIC", "JSON_VERSION", "Metric", "MetricSummary", "Run", "Skipped",
           "compare", "differing_keys", "find_runs", "load_run", "main", "plot", "plot_labels", "render_csv",
           "render_json", "render_markdown", "render_table", "summarize", "table_frame"]
