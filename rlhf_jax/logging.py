"""Run logging: `metrics.jsonl`, TensorBoard, optional Weights & Biases, a tqdm progress bar,
compact console lines, tables of sample completions, and PNG plots of the training curves.

Only the main process writes (`RunLogger(enabled=sharding.is_main_process())`). `metrics.jsonl`
holds one JSON object per iteration with exactly the run's metrics (no wall-clock values), so two
runs that compute the same numbers write identical files; timings go to TensorBoard, W&B and the
console only.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jax.config import LoggingConfig
from rlhf_jax.host import compile_seconds

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"

# (file stem, title, metric keys) of the plots; keys missing from a run are skipped.
PLOT_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("score", "Score", ("objective/scores", "objective/raw_scores", "objective/rlhf_reward")),
    ("kl", "KL to the reference", ("objective/kl", "policy/approxkl_avg")),
    ("kl_coef", "KL coefficient", ("objective/kl_coef",)),
    ("entropy", "Entropy", ("objective/entropy", "policy/entropy_avg")),
    ("losses", "Losses", ("loss/policy_avg", "loss/value_avg", "loss/total")),
    ("clipfrac", "Clip fractions", ("policy/clipfrac_avg", "val/clipfrac_avg")),
    ("length", "Response length", ("response/length_mean",)),
)

# (metric key, short name) of the compact console line.
LINE_METRICS: tuple[tuple[str, str], ...] = (
    ("objective/scores", "score"),
    ("objective/kl", "kl"),
    ("objective/entropy", "ent"),
    ("loss/policy_avg", "pg"),
    ("loss/value_avg", "vf"),
    ("policy/clipfrac_avg", "clip"),
    ("response/length_mean", "len"),
    ("lr", "lr"),
)


def _format_value(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4g}"


def format_metrics_line(
    iteration: int, total: int, metrics: Mapping[str, float], seconds: float | None = None
) -> str:
    """`it 10/100 | score 0.12 | kl 0.034 | ...` from the metrics present."""
    parts = [f"it {iteration}/{total}"]
    parts += [
        f"{short} {_format_value(metrics[key])}" for key, short in LINE_METRICS if key in metrics
    ]
    if seconds is not None:
        parts.append(f"{seconds:.2f}s/it")
    return " | ".join(parts)


class IterationClock:
    """Times one training iteration from its creation, and the part of it spent compiling.

    `timings(tokens)` gives the `perf/` scalars for `RunLogger.log`: `iteration_seconds` (wall
    clock), `compile_seconds` (tracing, lowering and XLA compilation inside the iteration; only
    when there was any, normally the first iteration) and `tokens_per_second` over the time not
    spent compiling, so the first iteration's throughput is comparable with the rest.
    """

    def __init__(self) -> None:
        self._compile0 = compile_seconds()
        self._start = time.perf_counter()
        self._stopped: tuple[float, float] | None = None

    def stop(self) -> None:
        """Ends the iteration now (the first call counts): `timings` then measure up to here.
        Loops that log an iteration only after dispatching the next one (so the device never
        waits for the host) stop its clock when the next iteration starts: `iteration_seconds`
        is then the time between iteration starts, and they add up to the run's wall time."""
        if self._stopped is None:
            self._stopped = (time.perf_counter(), compile_seconds())

    def timings(self, tokens: float | None = None) -> dict[str, float]:
        now, compiled = self._stopped or (time.perf_counter(), compile_seconds())
        seconds = now - self._start
        compiling = compiled - self._compile0
        out = {"iteration_seconds": seconds}
        if compiling > 0:
            out["compile_seconds"] = compiling
        if tokens is not None:
            out["tokens_per_second"] = tokens / max(seconds - compiling, 1e-9)
        return out


# Compilation after the first logged iteration is reported on the console from this many seconds.
RECOMPILE_REPORT_SECONDS = 1.0


def _cell(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, int]]) -> str:
    """A plain-text table; `columns` are `(key, width)`, long cells are cut with an ellipsis
    (prompt cells keep their end, where the question usually is)."""
    header = " | ".join(f"{key:<{width}}" for key, width in columns)
    lines = [header, "-+-".join("-" * width for _, width in columns)]
    for row in rows:
        cells = []
        for key, width in columns:
            value = row.get(key, "")
            if isinstance(value, float):
                value = _format_value(value)
            text = " ".join(str(value).split())
            if key == "prompt" and len(text) > width:
                text = "…" + text[-(width - 1) :]
            cells.append(f"{_cell(text, width):<{width}}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file (an empty list when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: str | Path, max_iteration: int) -> int:
    """Drops the records with `iteration > max_iteration` (after a resume from an earlier
    checkpoint); returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("iteration", 0) <= max_iteration]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


class RunLogger:
    """Writes a run's logs. Every method is a no-op when `enabled` is False.

    Args:
      run_dir: the run directory.
      config: what to write.
      total_iterations: for the progress bar.
      start_iteration: iterations already done (resumed runs); later records in
        metrics.jsonl / samples.jsonl are dropped and TensorBoard purges later events.
      run_config: the resolved config as a dict (for W&B).
      enabled: write at all (True only on the main process).
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: LoggingConfig,
        *,
        total_iterations: int,
        start_iteration: int = 0,
        run_config: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.total = total_iterations
        self.enabled = enabled
        self._first_log = True
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, SAMPLES_FILE):
            truncate_jsonl(self.run_dir / name, start_iteration)
        self._metrics_file = (self.run_dir / METRICS_FILE).open("a")
        self._samples_file = (self.run_dir / SAMPLES_FILE).open("a")
        if config.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                str(self.run_dir / TENSORBOARD_DIR),
                purge_step=start_iteration + 1 if start_iteration else None,
            )
        if config.wandb:
            self._wandb = self._init_wandb(run_config)
        if config.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_iterations,
                initial=start_iteration,
                unit="it",
                dynamic_ncols=True,
                file=sys.stderr,
                desc="train",
            )

    def _init_wandb(self, run_config: Mapping[str, Any] | None) -> Any:
        try:
            import wandb
        except ImportError:
            self.message("logging.wandb is set but wandb is not installed (pip install wandb)")
            return None
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        return wandb.init(
            project=self.config.wandb_project,
            name=self.config.wandb_name or self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            config=dict(run_config or {}),
        )

    def message(self, text: str) -> None:
        """Prints a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def log(
        self,
        iteration: int,
        metrics: Mapping[str, float],
        *,
        timings: Mapping[str, float] | None = None,
    ) -> None:
        """Records one iteration: metrics.jsonl (metrics only), TensorBoard and W&B (metrics and
        `timings`, as `perf/<name>`), the progress bar, and every `log_every` iterations a console
        line. A `compile_seconds` timing (see `IterationClock`) is also reported on the console:
        always for the first iteration logged, later only from `RECOMPILE_REPORT_SECONDS`."""
        if not self.enabled:
            return
        record = {"iteration": int(iteration), **{k: float(v) for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        scalars = {**record, **{f"perf/{k}": float(v) for k, v in (timings or {}).items()}}
        del scalars["iteration"]
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, iteration)
        if self._wandb is not None:
            self._wandb.log(scalars, step=iteration)
        seconds = (timings or {}).get("iteration_seconds")
        compiling = (timings or {}).get("compile_seconds", 0.0)
        if self._first_log and compiling > 0:
            self.message(
                f"iteration {iteration}: {compiling:.1f} s of its {seconds or 0:.1f} s went to "
                "compiling the programs (later iterations reuse them)"
            )
        elif compiling >= RECOMPILE_REPORT_SECONDS:
            self.message(
                f"iteration {iteration}: {compiling:.1f} s compiling new programs (an input's "
                "shape, dtype or sharding changed, or a new program ran)"
            )
        self._first_log = False
        if self._bar is not None:
            self._bar.update(1)
            short = {s: _format_value(metrics[k]) for k, s in LINE_METRICS[:2] if k in metrics}
            self._bar.set_postfix(short, refresh=False)
        if iteration % self.config.log_every == 0 or iteration == self.total:
            self.message(format_metrics_line(iteration, self.total, metrics, seconds))

    def samples(self, iteration: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Prints a table of sample completions (`prompt`, `completion`, `score` keys) and records
        it in samples.jsonl, TensorBoard (text) and W&B (table)."""
        if not self.enabled or not rows:
            return
        table = format_table(rows, (("prompt", 40), ("completion", 60), ("score", 8)))
        self.message(f"samples at iteration {iteration}:\n{table}")
        self._samples_file.write(
            json.dumps({"iteration": int(iteration), "samples": [dict(r) for r in rows]}) + "\n"
        )
        self._samples_file.flush()
        if self._tb is not None:
            markdown = "\n\n".join(
                f"**score {_format_value(float(r['score']))}**  \n"
                f"prompt: {textwrap.shorten(str(r['prompt']), 400)}  \n"
                f"completion: {r['completion']}"
                for r in rows
            )
            self._tb.add_text("samples", markdown, iteration)
        if self._wandb is not None:
            import wandb

            columns = ["prompt", "completion", "score"]
            data = [[r["prompt"], r["completion"], float(r["score"])] for r in rows]
            self._wandb.log({"samples": wandb.Table(columns=columns, data=data)}, step=iteration)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        self._metrics_file.close()
        self._samples_file.close()


def plot_run(run_dir: str | Path) -> list[Path]:
    """Writes PNG curves of `run_dir/metrics.jsonl` to `run_dir/plots`: one file per group of
    `PLOT_GROUPS` present in the run and `summary.png` with all of them. Returns the files.

    Raises:
      FileNotFoundError: the run has no metrics yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / METRICS_FILE)
    if not records:
        raise FileNotFoundError(f"{run_dir / METRICS_FILE} is missing or empty: nothing to plot")
    out_dir = run_dir / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [
        (stem, title, [k for k in keys if any(k in r for r in records)])
        for stem, title, keys in PLOT_GROUPS
    ]
    groups = [g for g in groups if g[2]]

    def draw(ax: Any, title: str, keys: Sequence[str]) -> None:
        for key in keys:
            points = [(r["iteration"], r[key]) for r in records if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")

    written = []
    for stem, title, keys in groups:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, title, keys)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    cols = 3
    rows = max(1, math.ceil(len(groups) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, (_, title, keys) in zip(axes.flat, groups):
        draw(ax, title, keys)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    summary = out_dir / "summary.png"
    fig.savefig(summary, dpi=100)
    plt.close(fig)
    written.append(summary)
    return written
