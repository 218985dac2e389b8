"""Rendering ``bench.json``'s results: the targets summary, markdown tables and the console.

Everything here reads the results dict alone (sections and targets travel in it), so a saved
``bench.json`` can be rendered again.
"""

from __future__ import annotations

import math
import sys

import numpy as np

METHODOLOGY = """\
Each workload is one gradient computation compiled twice with `jax.jit(...).lower().compile()`:
**hand** uses handgrad's `custom_vjp` ops, **autodiff** runs the same model or op from
`handgrad.reference` (plain JAX) and lets `jax.grad`/`jax.vjp` differentiate it (PyTorch eager
is a third column only when `torch` is importable). "Fast paths" says whether handgrad's faster
evaluations of the same formulas were allowed (`on`, the default) or every formula used its
textbook evaluation (`off`: `handgrad.fast_paths(False)`); each conv row names the evaluation
of forward/dx/dw (`handgrad.ops.fast.describe`; docs/performance.md). Compilation (its time is
the "compile" column) and two warm-up runs are excluded. Before anything is timed, every
variant's first result is compared with hand's, leaf by leaf: a variant off by more than 1e-3
of the largest magnitude fails its workload instead of being timed, so a ratio always compares
two computations of the same gradient (`max_rel_diff_vs_hand` in bench.json). Each variant is
compiled several times ("executables per variant"): the same program compiled twice can run at
persistently different speeds within a process (docs/performance.md), which one executable per
variant would put into the ratio as a random bias. The executables are timed in interleaved
rounds — hand#0, autodiff#0, hand#1, autodiff#1, …, then the reverse order — in one process,
so that load from other processes hits both alike; each sample is the mean over enough
back-to-back calls (each ended by `jax.block_until_ready`) to last `--sample-ms`, and a
round's sample of a variant is the median over its executables. Times are medians over the
rounds with the interquartile range in parentheses; ratios are ratios of the medians, with the
IQR of the per-round (paired) ratios; a target is "within noise" when its threshold lies
inside that IQR. The conv sweep times the VJP w.r.t. (x, w, b) (the forward is dead code there
and XLA removes it); `conv-dw-g8` asks for the weight gradient only. Pool "fwdbwd" is the VJP
of the pool applied to a cotangent, forward included; "bwd" applies the VJP function of a
precomputed forward. Residual memory is the sum of `nbytes` of the leaves of
`jax.vjp(f, params)[1]` (deduplicated; "inputs excluded" drops the ones that are the
parameters/inputs themselves, and the memory target is judged on it: a reference to an array
the caller holds anyway allocates nothing); "XLA temp" is
`jax.jit(grad).lower(...).compile().memory_analysis().temp_size_in_bytes`. On a shared machine
(see the load average), read ratios near a threshold with their IQR."""


def fmt_ms(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def fmt_ratio(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _mark(target: dict | None, markdown: bool = True) -> str:
    if target is None:
        return ""
    sign = ("✅" if target["met"] else "❌") if markdown else ("met" if target["met"] else "MISS")
    return sign + (" (within noise)" if target.get("within_noise") else "")


def summarize_targets(results: dict) -> list[dict]:
    """One line per target (in the order the catalogue first uses it): the measured value,
    the worst over the workloads that share the target."""
    groups: dict[str, list[dict]] = {}
    for record in results["workloads"] + results["memory"]:
        if "error" not in record and record.get("target"):
            groups.setdefault(record["target"]["key"], []).append(record)
    lines = []
    for key, hits in groups.items():
        target = hits[0]["target"]
        values = [r["target"]["value"] for r in hits]
        worst = hits[int(np.argmax(values) if target["op"] == "<=" else np.argmin(values))]
        n_met = sum(r["target"]["met"] for r in hits)
        lines.append({
            "key": key, "label": target["label"], "target": target["text"],
            "metric": target["metric"], "op": target["op"], "threshold": target["threshold"],
            "measured": worst["target"]["value"], "worst": worst["name"],
            "met": n_met == len(hits), "met_count": n_met, "count": len(hits),
            "missed": [r["name"] for r in hits if not r["target"]["met"]],
            "within_noise": [r["name"] for r in hits if r["target"].get("within_noise")],
        })
    return lines


def _time_cell(v: dict) -> str:
    return f"{fmt_ms(v['median_ms'])} ({fmt_ms(v['q1_ms'])}–{fmt_ms(v['q3_ms'])})"


def timing_rows(records: list[dict], with_torch: bool, markdown: bool) -> tuple[list, list]:
    headers = ["workload", "hand ms (IQR)", "autodiff ms (IQR)", "hand/autodiff (paired IQR)",
               "autodiff/hand", "compile ms hand / autodiff", "rounds"]
    headers += ["torch ms (IQR)", "hand/torch"] if with_torch else []
    headers.append("target")
    rows = []
    for rec in records:
        name = f"`{rec['name']}`" if markdown else rec["name"]
        if "error" in rec:
            rows.append([name, "error: " + rec["error"], *[""] * (len(headers) - 2)])
            continue
        t, r = rec["variants"], rec["ratios"]
        row = [name, _time_cell(t["hand"]), _time_cell(t["autodiff"]),
               f"{fmt_ratio(r['hand_over_autodiff'])} "
               f"({fmt_ratio(r['paired_hand_over_autodiff_q1'])}–"
               f"{fmt_ratio(r['paired_hand_over_autodiff_q3'])})",
               fmt_ratio(r["autodiff_over_hand"]) + "×",
               " / ".join(fmt_ms(t[n]["compile_ms"]) for n in ("hand", "autodiff")),
               str(min(v["rounds"] for v in t.values()))]
        if with_torch:
            row += ([_time_cell(t["torch"]), fmt_ratio(r["hand_over_torch"])] if "torch" in t
                    else ["–", "–"])
        target = rec.get("target")
        row.append("" if target is None else f"{_mark(target, markdown)} {target['text']}")
        rows.append(row)
    return headers, rows


def memory_rows(records: list[dict], markdown: bool) -> tuple[list, list]:
    headers = ["model", "residuals hand", "residuals autodiff", "hand/autodiff",
               "residuals hand / autodiff, inputs excluded", "XLA temp hand / autodiff",
               "target"]
    rows = []
    for rec in records:
        name = f"`{rec['name']}`" if markdown else rec["name"]
        if "error" in rec:
            rows.append([name, "error: " + rec["error"], "", "", "", "", ""])
            continue
        h, a = rec["variants"]["hand"], rec["variants"]["autodiff"]
        target = rec.get("target")
        rows.append([
            f"{name} ({rec['description']})",
            f"{fmt_bytes(h['residual_bytes'])} ({h['residual_leaves']} arrays)",
            f"{fmt_bytes(a['residual_bytes'])} ({a['residual_leaves']} arrays)",
            fmt_ratio(rec["residual_hand_over_autodiff"]),
            f"{fmt_bytes(h['residual_bytes_excluding_inputs'])} / "
            f"{fmt_bytes(a['residual_bytes_excluding_inputs'])}",
            f"{fmt_bytes(h['temp_bytes'])} / {fmt_bytes(a['temp_bytes'])}",
            "" if target is None else f"{_mark(target, markdown)} {target['text']}",
        ])
    return headers, rows


def _md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _text_table(headers, rows) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line("-" * w for w in widths), *map(line, rows)])


def _measured_text(line: dict) -> str:
    value = fmt_ratio(line["measured"]) + ("×" if line["metric"] == "autodiff/hand" else "")
    if line["count"] > 1:
        return f"worst {value} (`{line['worst']}`), {line['met_count']}/{line['count']} met"
    return value


def _load_text(load) -> str:
    return "n/a" if not load else " / ".join(f"{v:.1f}" for v in load)


def _sections(results: dict):
    """(title, records) of each report section that has timed workloads, in catalogue order."""
    for section, title in results["sections"].items():
        records = [r for r in results["workloads"] if r["section"] == section]
        if records:
            yield title, records


SWEEP_PREFIX = "memory-flash-T"
SWEEP_PLOT = "attention_memory.png"


def attention_sweep(results: dict) -> list[tuple[int, int, int]]:
    """(T, flash temporary bytes, autodiff's) of the attention memory sweep, by T."""
    rows = []
    for rec in results["memory"]:
        if rec["name"].startswith(SWEEP_PREFIX) and "error" not in rec:
            rows.append((int(rec["name"][len(SWEEP_PREFIX):]),
                         rec["variants"]["hand"]["temp_bytes"],
                         rec["variants"]["autodiff"]["temp_bytes"]))
    return sorted(rows)


def plot_attention_sweep(results: dict, path) -> bool:
    """Log-log plot of the sweep (flash ∝ T, autodiff ∝ T²); False when there is none."""
    rows = attention_sweep(results)
    if len(rows) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ts = [t for t, _, _ in rows]
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.loglog(ts, [f / 2**20 for _, f, _ in rows], "o-", label="flash_attention (hand)",
              base=2)
    ax.loglog(ts, [a / 2**20 for _, _, a in rows], "s--", label="autodiff of the textbook",
              base=2)
    ax.set(xlabel="sequence length T", ylabel="compiled temporary memory (MiB)",
           title="attention gradient, causal: temporaries vs T")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _sweep_markdown(results: dict) -> list[str]:
    rows = attention_sweep(results)
    if not rows:
        return []
    table = [[t, fmt_bytes(f), fmt_bytes(a), fmt_ratio(f / a) if a else "n/a",
              f"{f / rows[0][1]:.1f}× / {a / rows[0][2]:.1f}×" if rows[0][1] and rows[0][2]
              else "n/a"] for t, f, a in rows]
    return ["## Attention memory: temporaries of the jitted gradient as T grows", "",
            "`memory_analysis().temp_size_in_bytes` of the jitted gradient w.r.t. q, k, v "
            "(causal): flash's grows like T (its accumulators and a few tiles), autodiff's like "
            "T² (the T×T scores, probabilities and their gradients).", "",
            _md_table(["T", "flash", "autodiff", "flash/autodiff",
                       f"growth since T = {rows[0][0]} (flash / autodiff)"], table), "",
            f"![temporary memory vs T]({SWEEP_PLOT})", ""]


def render_markdown(results: dict) -> str:
    env, run = results["environment"], results["run"]
    with_torch = env["torch"] is not None
    parts = [
        "# Benchmarks: hand-written backward vs XLA autodiff", "",
        f"Generated by `{run['command']}` on {run['started']} — do not edit by hand, rerun it. "
        "Raw numbers: `bench.json`, beside `bench.md` in the run's `--out` directory.", "",
        "| | |", "|---|---|",
        f"| device | {env['device']} ({env['device_kind']}, platform `{env['platform']}`) |",
        f"| jax / jaxlib | {env['jax']} / {env['jaxlib']} |",
        f"| numpy / python | {env['numpy']} / {env['python']} |",
        f"| PyTorch | {env['torch'] or 'not installed (no torch column)'} |",
        f"| CPU cores (usable) | {env['cpu_count']} ({env['cpu_usable']}), {env['machine']} |",
        f"| XLA_FLAGS | `{env['xla_flags'] or '(none)'}` |",
        f"| fast paths | {run['fast_paths']} |",
        f"| load average (1/5/15 min) at start → end | {_load_text(run['loadavg_start'])} → "
        f"{_load_text(run['loadavg_end'])} |",
        f"| rounds | up to {run['rounds']} (at least {run['min_rounds']}, budget "
        f"{run['budget_s']:g} s per workload) |",
        f"| executables per variant | {run['executables']} (each round's sample: their median) |",
        f"| wall time | {run['wall_seconds']:.0f} s |", "", "## Targets", "",
    ]
    target_rows = [[line["label"], line["target"], _measured_text(line),
                    ("✅" if line["met"] else "❌")
                    + (" (within noise: " + ", ".join(f"`{n}`" for n in line["within_noise"])
                       + ")" if line["within_noise"] else "")]
                   for line in results["targets"]]
    parts += [_md_table(["target", "goal", "measured", ""], target_rows)
              if target_rows else "(no target among the selected workloads)", ""]
    for title, records in _sections(results):
        parts += [f"## {title}", "", _md_table(*timing_rows(records, with_torch, True)), ""]
        parts += [f"- `{r['name']}`: {r['description']}; {r['shape']}" for r in records]
        parts.append("")
    if results["memory"]:
        parts += ["## Memory: residuals saved for the backward pass", "",
                  _md_table(*memory_rows(results["memory"], markdown=True)), ""]
    parts += _sweep_markdown(results)
    return "\n".join([*parts, "## Methodology", "", METHODOLOGY, ""])


def print_report(results: dict, stream=sys.stdout) -> None:
    env = results["environment"]
    with_torch = env["torch"] is not None
    print(f"\nhandgrad benchmarks — {env['device']} ({env['platform']}), jax {env['jax']}, "
          f"{env['cpu_count']} CPUs, torch {env['torch'] or 'absent'}, fast paths "
          f"{results['run']['fast_paths']}", file=stream)
    for title, records in _sections(results):
        print(f"\n{title}", file=stream)
        print(_text_table(*timing_rows(records, with_torch, markdown=False)), file=stream)
    if results["memory"]:
        print("\nMemory: residuals saved for the backward pass", file=stream)
        print(_text_table(*memory_rows(results["memory"], markdown=False)), file=stream)
    print("\nTargets", file=stream)
    rows = [[line["label"], line["target"], _measured_text(line).replace("`", ""),
             "met" if line["met"] else "MISSED"] for line in results["targets"]]
    print(_text_table(["target", "goal", "measured", ""], rows), file=stream)
    missed = [line for line in results["targets"] if not line["met"]]
    print("\nMISSED TARGETS:" if missed else "\nAll targets met.", file=stream)
    for line in missed:
        print(f"  ✗ {line['label']} ({line['target']}): measured "
              f"{_measured_text(line).replace('`', '')}; missed by: "
              f"{', '.join(line['missed'])}", file=stream)
    errors = [r["name"] for r in results["workloads"] + results["memory"] if "error" in r]
    if errors:
        print(f"\nFAILED WORKLOADS: {', '.join(errors)}", file=stream)
