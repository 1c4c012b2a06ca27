"""`flextron report`: a run's JSON (demo results.json, train eval.json, `eval --out` files) as
markdown tables and PNG plots — quality against size for every series, the original marked."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from flextron.errors import FlextronError
from flextron.fsutil import atomic_write, check_target
from flextron.results import EvalRow

RUN_FILES = ("results.json", "eval.json")


def _is_row(x: object) -> bool:
    return isinstance(x, dict) and {"budget", "subnet", "cost", "params_fraction"} <= x.keys()


def _is_series(x: object) -> bool:
    """One eval row, or a list of them."""
    return _is_row(x) or (isinstance(x, list) and bool(x) and _is_row(x[0]))


def _typed(key: str, value: object) -> object:
    """A series (or the router rows, `routes`) as `EvalRow`s; anything else as it is."""
    if _is_row(value):
        return EvalRow.from_dict(value)
    if _is_series(value) or (key == "routes" and isinstance(value, list)):
        return [EvalRow.from_dict(r) for r in value]
    return value


def _table_rows(value: object) -> list[EvalRow]:
    """The rows of a series: one row or a list of rows, with costs."""
    rows = value if isinstance(value, list) else [value]
    return rows if rows and all(isinstance(r, EvalRow) and r.cost is not None for r in rows) else []


def read_run(path: str | Path) -> tuple[dict, Path]:
    """The run's JSON (any flextron version's), its series and router rows as `EvalRow`s; and the
    directory it lives in."""
    path = Path(path)
    file = next((path / f for f in RUN_FILES if (path / f).is_file()), None) if path.is_dir() else path
    if file is None or not file.is_file():
        raise FlextronError(f"{path} holds no {' or '.join(RUN_FILES)}; pass a demo or training run directory, "
                            "or a JSON file written by `flextron eval --out`")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise FlextronError(f"cannot read {file}: {e}") from None
    if isinstance(data, list):
        data = {"eval": data}
    if not any(_is_series(v) for v in data.values()):
        raise FlextronError(f"{file} holds no evaluation rows (budget, sub-network, cost); nothing to report")
    try:
        return {k: _typed(k, v) for k, v in data.items()}, file.parent
    except (KeyError, TypeError, ValueError, FlextronError) as e:
        raise FlextronError(f"cannot read the rows of {file}: {e}") from None


def widths_cell(values: list[int]) -> str:
    """A sub-network's choices of one kind: the width where all layers share it, else the range."""
    return str(values[0]) if len(set(values)) == 1 else f"{min(values)}-{max(values)}"


def _label(key: str) -> str:
    return key.replace("_eval", "").replace("_", " ")


def _groups(data: dict) -> dict[str, list[EvalRow]]:
    """Every series of eval rows but the router rows (`routes`, tabled on their own); single rows (the
    original, an export) as one-row groups. With an original, sizes are fractions of it (an export
    evaluated alone is 100% of itself)."""
    groups = {_label(k): rows for k, v in data.items() if k != "routes" and (rows := _table_rows(v))}
    original = data.get("original")
    return shares_of(groups, original) if isinstance(original, EvalRow) else groups


def shares_of(groups: dict[str, list[EvalRow]], original: EvalRow) -> dict[str, list[EvalRow]]:
    """Every row's `params_fraction` as its share of `original`'s non-embedding parameters (an export
    evaluated alone is otherwise 100% of itself)."""
    full = original.cost["params_nonembed"]
    return {name: [replace(r, params_fraction=r.cost["params_nonembed"] / full) for r in rows]
            for name, rows in groups.items()}


def task_cell(m: dict) -> str:
    """acc (acc_norm), or for LAMBADA-style tasks acc (ppl N)."""
    return f"{m['acc']:.1%} ({m['acc_norm']:.1%})" if "acc_norm" in m else f"{m['acc']:.1%} (ppl {m['ppl']:.1f})"


CHAT_COLUMNS = ("same 1st sentence", "same answer", "KL")


def chat_cells(chat: dict | None) -> list[str]:
    """A row's chat behaviour (`flextron.behaviour.compare`) as the cells of `CHAT_COLUMNS`."""
    if not chat:
        return ["-"] * len(CHAT_COLUMNS)
    return [f"{chat['agree_sentence']:.0%}", f"{chat['agree_tokens']:.0%}", f"{chat['kl']:.3f}"]


def size_cell(r: EvalRow) -> str:
    """A row's non-embedding parameters and their share; for adaptive routing (each request sized by its
    routers), the realised share of the budget's metric."""
    if r.cost is None:
        return f"adaptive, {r.realised_fraction:.0%} of the {r.metric}"
    return f"{r.cost['params_nonembed'] / 1e6:.1f} M ({r.params_fraction:.0%})"


def chat_note(groups: dict[str, list[EvalRow]]) -> str | None:
    """What the chat columns measure, on how many prompts and tokens (None without them)."""
    chat = next((r.chat for rows in groups.values() for r in rows if r.chat), None)
    if chat is None:
        return None
    return (f"Chat: on {chat['n']} prompts, the share whose greedy answer has the original's first sentence, the "
            f"share whose first {chat['new_tokens']} tokens are the original's (same answer), and the mean "
            "KL(original || model) of the next token over the original's answers (nats).")


def markdown(data: dict, groups: dict[str, list[EvalRow]], plots: list[str]) -> str:
    """Tables of every series of `groups` (budget, widths, size, perplexity, perplexity on the user's text,
    chat behaviour, task scores), the routers of `data` and the plots. Beside an original, single rows
    show no budget."""
    every = [r for rows in groups.values() for r in rows]
    tasks = next((list(r.tasks) for r in every if r.tasks), [])
    data_ppl = any(r.ppl_data is not None for r in every)
    chat = chat_note(groups)
    head = ["model", "budget", "MLP width", "attn units", "non-emb params", "ppl", *(["ppl data"] if data_ppl else []),
            *(CHAT_COLUMNS if chat else ()), *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    relative = isinstance(data.get("original"), EvalRow)
    for name, rows in groups.items():
        for r in rows:
            cells = [name, "-" if relative and len(rows) == 1 else str(r.budget), widths_cell(r.subnet.mlp),
                     widths_cell(r.subnet.attn), size_cell(r), f"{r.ppl:.2f}" if r.ppl is not None else "-"]
            cells += [f"{r.ppl_data:.2f}" if r.ppl_data is not None else "-"] if data_ppl else []
            cells += chat_cells(r.chat) if chat else []
            cells += [task_cell(r.tasks[t]) if t in (r.tasks or {}) else "-" for t in tasks]
            lines.append("| " + " | ".join(cells) + " |")
    if data_ppl:
        lines += ["", "ppl data: perplexity on the text file passed to `eval --ppl-data`."]
    if chat:
        lines += ["", chat]
    if tasks:
        lines += ["", "Tasks: accuracy (length-normalised accuracy); LAMBADA: greedy accuracy (perplexity)."]
    routes = data.get("routes")
    if routes:
        lines += ["", f"Routers (budgets in {data.get('router_metric', 'the routers metric')}): realised cost / "
                  "target, and held-out perplexity of the routed vs the largest uniform sub-network within it; "
                  "kept: what a check on held-out training rows chose (router, uniform, or the lower budget's).", "",
                  "| budget | cost/target | routed ppl | uniform ppl | kept |", "|---|---|---|---|---|"]
        lines += [f"| {r.budget} | {r.cost_ratio:.3f} | {r.ppl:.2f} | {r.uniform_ppl:.2f} | {r.kept or '-'} |"
                  for r in routes]
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines)


def plot_ppl_vs_size(series: dict[str, tuple[list[float], list[float]]], out: Path, title: str,
                     original: float | None = None, points: dict[str, tuple[list[float], list[float]]] | None = None,
                     xlabel: str = "fraction of non-embedding parameters") -> Path:
    """Held-out perplexity (log scale) against model size (a fraction of the full model), as a PNG.

    `series` are drawn as lines, `points` as separate markers; `original` as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (label, (xs, ys)), marker in zip(series.items(), "osD^v"):
        ax.plot(xs, ys, marker=marker, label=label)
    for label, (xs, ys) in (points or {}).items():
        ax.scatter(xs, ys, marker="*", s=150, color="k", label=label, zorder=5)
    if original is not None:
        ax.axhline(original, color="gray", ls="--", label="original")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120))  # never through a symlink, FIFO or device
    plt.close(fig)
    return out


def plot_tasks(groups: dict[str, list[EvalRow]], out: Path, title: str) -> Path:
    """Accuracy against size, one panel per task, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = next(list(r.tasks) for rows in groups.values() for r in rows if r.tasks)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, rows in groups.items():
            pts = sorted((r.params_fraction, r.tasks[task]["acc"]) for r in rows if task in (r.tasks or {}))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_title(task)
        ax.set_xlabel("fraction of non-embedding params")
        ax.set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110))  # never through a symlink, FIFO or device
    plt.close(fig)
    return out


def report(run: str | Path, title: str | None = None, into: Path | None = None, section: str = "report"
           ) -> tuple[Path, str]:
    """Write report.md, pareto.png (perplexity) and tasks.png (when tasks were scored) beside the
    run's JSON; returns the markdown's path and text. With `into` (e.g. docs/results.md), the tables
    also replace its `section` and the plots are copied to img/ beside it."""
    if into is not None:
        check_target(Path(into))  # before writing anything
    data, folder = read_run(run)
    title = title or f"{folder.name}: quality vs size"
    groups = _groups(data)
    original = groups.get("original", [None])[0]
    series = {n: rows for n, rows in groups.items() if n != "original"}
    plots = []
    lines = {n: rows for n, rows in series.items() if len(rows) > 1 and rows[0].ppl is not None}
    points = {n: rows for n, rows in series.items() if len(rows) == 1 and rows[0].ppl is not None}
    if lines or points:
        def xy(rows: list[EvalRow]) -> tuple[list[float], list[float]]:
            return [r.params_fraction for r in rows], [r.ppl for r in rows]

        plot_ppl_vs_size({n: xy(rows) for n, rows in lines.items()}, folder / "pareto.png", title,
                         original.ppl if original else None, {n: xy(rows) for n, rows in points.items()})
        plots.append("pareto.png")
    if any(r.tasks for rows in series.values() for r in rows):
        plots.append(plot_tasks(groups, folder / "tasks.png", title).name)
    text = f"# {title}\n\n" + markdown(data, groups, plots) + "\n"
    atomic_write(folder / "report.md", lambda f: f.write_text(text))
    if into is not None:
        img = Path(into).parent / "img"
        for plot in plots:
            atomic_write(img / f"{section}-{plot}", lambda p, plot=plot: shutil.copyfile(folder / plot, p))
        update_section(Path(into), section, markdown(data, groups, [f"img/{section}-{p}" for p in plots]))
    return folder / "report.md", text


def update_section(md: Path, name: str, text: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in `md` (append if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = md.read_text() if md.exists() else "# Results\n"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    atomic_write(md, lambda p: p.write_text(new))
