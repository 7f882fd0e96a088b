"""The statistics and the report of ``medmamba compare``: per-case metrics of each contender, paired Wilcoxon
signed-rank tests against the first contender, and comparison.md / .json / .csv / .html with two plots.

Per case, a contender's Dice (HD95, NSD) is the mean over the dataset's foreground labels; HD95 is undefined
for a case when it is undefined for any label (an empty prediction or reference), and such cases drop out of the
HD95 test (its ``n`` says how many pairs were left). The Wilcoxon test is scipy's (two-sided, zero differences
dropped, exact distribution for small samples without ties); with fewer than 6 paired cases no two-sided
p-value can fall below 0.05, and the report says so.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from pathlib import Path

__all__ = ["case_metrics", "paired_wilcoxon", "summarise", "write_report", "METRICS"]

METRICS = ("dice", "hd95_mm", "nsd")
_HIGHER_IS_BETTER = {"dice": True, "hd95_mm": False, "nsd": True}


def case_metrics(evaluation: dict, labels: list[int]) -> dict:
    """{case: {"dice", "hd95_mm", "nsd"}} from a ``medmamba evaluate`` summary, averaged over ``labels``;
    cases that were not evaluated (missing, refused, unreadable) are left out."""
    out = {}
    for case, entry in evaluation.get("cases", {}).items():
        if entry.get("status") != "ok":
            continue
        ms = [entry["metrics"].get(str(lab)) for lab in labels]
        if any(m is None for m in ms) or not ms:
            continue
        hd = [m["hd95_mm"] for m in ms]
        out[case] = {"dice": sum(m["dice"] for m in ms) / len(ms),
                     "hd95_mm": None if any(h is None for h in hd) else sum(hd) / len(hd),
                     "nsd": sum(m["nsd"] for m in ms) / len(ms),
                     "per_label_dice": {str(lab): m["dice"] for lab, m in zip(labels, ms)}}
    return out


def paired_wilcoxon(reference: dict, other: dict) -> dict:
    """Two-sided Wilcoxon signed-rank test of ``other - reference`` over the cases both define.

    ``reference``/``other``: {case: value or None}. Returns n (pairs used), the median difference, the statistic
    and p (None when no pair differs)."""
    from scipy.stats import wilcoxon

    pairs = [(reference[c], other[c]) for c in sorted(set(reference) & set(other))
             if reference[c] is not None and other[c] is not None]
    diffs = [b - a for a, b in pairs]
    result = {"n": len(pairs), "median_difference": _median(diffs) if diffs else None, "statistic": None, "p": None}
    if not any(d != 0 for d in diffs):
        result["note"] = "no paired case differs" if pairs else "no paired cases"
        return result
    res = wilcoxon([b for _, b in pairs], [a for a, _ in pairs], zero_method="wilcox", alternative="two-sided")
    result["statistic"], result["p"] = float(res.statistic), float(res.pvalue)
    return result


def _median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _mean_sd(values):
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mean, sd, len(v)


def summarise(contenders: list[dict], labels: list[int]) -> list[dict]:
    """One row per contender (in order) with means, sds and the tests against the first contender that has
    results. ``contenders``: dicts with ``name``, ``status``, ``cases`` (from :func:`case_metrics`), ``train``,
    ``predict`` (the worker results)."""
    ref = next((c for c in contenders if c.get("status") == "ok"), None)
    rows = []
    for c in contenders:
        row = {"contender": c["name"], "trainer": c["trainer"], "plans": c["plans"], "status": c.get("status"),
               "error": c.get("error")}
        if c.get("status") == "ok":
            cases = c["cases"]
            for m in METRICS:
                mean, sd, n = _mean_sd([v[m] for v in cases.values()])
                row[m] = {"mean": mean, "sd": sd, "n": n}
            row["per_label_dice"] = {str(lab): _mean_sd([v["per_label_dice"][str(lab)] for v in cases.values()])[0]
                                     for lab in labels}
            tr, pr = c.get("train") or {}, c.get("predict") or {}
            secs = list((pr.get("seconds_per_case") or {}).values())
            row.update(parameters=tr.get("parameters"), train_seconds=tr.get("train_seconds"),
                       epochs_done=tr.get("epochs_done"), epochs_budget=tr.get("epochs_budget"),
                       iterations_per_epoch=tr.get("iterations_per_epoch"),
                       stopped_by_time_limit=tr.get("stopped_by_time_limit"),
                       peak_memory_train_mb=tr.get("peak_memory_mb"), peak_memory_predict_mb=pr.get("peak_memory_mb"),
                       peak_memory_kind=tr.get("peak_memory_kind"),
                       inference_seconds_per_case=sum(secs) / len(secs) if secs else None,
                       fold_validation_dice=(tr.get("fold_validation") or {}).get("Dice"),
                       n_cases=len(cases), network=c.get("network") or {})
            if ref is not None and c is not ref:
                row["vs_first"] = {m: paired_wilcoxon({k: v[m] for k, v in ref["cases"].items()},
                                                      {k: v[m] for k, v in cases.items()}) for m in METRICS}
        rows.append(row)
    return rows


# -- output files -------------------------------------------------------------------------------------------
def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def _msd(d, fmt="{:.3f}"):
    if not d or d.get("mean") is None:
        return "-"
    return f"{fmt.format(d['mean'])} ± {fmt.format(d['sd'])}"


def _p(row, m):
    t = (row.get("vs_first") or {}).get(m)
    if not t:
        return ""
    return "-" if t["p"] is None else f"{t['p']:.3g} (n={t['n']})"


def _hms(s):
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


_COLUMNS = ["contender", "status", "network (patch x batch)", "Dice", "p Dice", "HD95 mm", "p HD95", "NSD", "p NSD", "params (M)",
            "epochs", "train time", "peak mem train (MB)", "peak mem predict (MB)", "inference s/case",
            "fold val Dice"]


def _table_rows(rows):
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append([r["contender"], f"{r['status']}: {r.get('error') or ''}"] + [""] * (len(_COLUMNS) - 2))
            continue
        epochs = f"{r['epochs_done']}/{r['epochs_budget']} x {r['iterations_per_epoch']}" \
            + (" (time limit)" if r.get("stopped_by_time_limit") else "")
        net = r.get("network") or {}
        arch = "-" if not net else (f"{net.get('network', '?')} ({'x'.join(map(str, net.get('patch_size') or []))} x "
                                    f"{net.get('batch_size', '?')})")
        out.append([r["contender"], "ok", arch, _msd(r["dice"]), _p(r, "dice"), _msd(r["hd95_mm"], "{:.1f}"),
                    _p(r, "hd95_mm"), _msd(r["nsd"]), _p(r, "nsd"),
                    _f(None if r["parameters"] is None else r["parameters"] / 1e6, "{:.2f}"), epochs,
                    _hms(r["train_seconds"]), _f(r["peak_memory_train_mb"], "{:.0f}"),
                    _f(r["peak_memory_predict_mb"], "{:.0f}"), _f(r["inference_seconds_per_case"], "{:.1f}"),
                    _f(r["fold_validation_dice"])])
    return out


def _plots(rows, contenders) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [(r, c) for r, c in zip(rows, contenders) if r["status"] == "ok"]
    pngs = {}
    if not ok:
        return pngs
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(ok), 4))
    data = [[v["dice"] for v in c["cases"].values()] for _, c in ok]
    ax.boxplot(data, showmeans=True)
    for i, d in enumerate(data, 1):
        ax.scatter([i] * len(d), d, s=12, alpha=0.6, zorder=3)
    ax.set_xticks(range(1, len(ok) + 1), [r["contender"] for r, _ in ok], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("Dice per test case (mean over labels)")
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    pngs["dice_boxplot.png"] = fig
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, _ in ok:
        if r["train_seconds"] is not None and r["dice"]["mean"] is not None:
            ax.errorbar(r["train_seconds"] / 60, r["dice"]["mean"], yerr=r["dice"]["sd"], fmt="o", capsize=3)
            ax.annotate(r["contender"], (r["train_seconds"] / 60, r["dice"]["mean"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.margins(x=0.3)   # room for the labels
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("mean Dice on the test cases (± sd)")
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    pngs["dice_vs_training_time.png"] = fig
    out = {}
    for name, fig in pngs.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def _atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(out: str | os.PathLike, meta: dict, contenders: list[dict], labels: list[int]) -> dict:
    """Write comparison.{json,md,csv,html} and the PNGs into ``out``; returns the JSON document.

    ``meta``: the comparison's settings and environment (command, dataset, split, budget, device, versions,
    caveats, what stays random)."""
    out = Path(out)
    rows = summarise(contenders, labels)
    doc = {**meta, "labels": labels, "rows": rows,
           "per_case": {c["name"]: c.get("cases") for c in contenders if c.get("status") == "ok"}}
    _atomic(out / "comparison.json", json.dumps(doc, indent=2) + "\n")
    table = _table_rows(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["contender", "trainer", "plans", "status", "n_cases", "dice_mean", "dice_sd", "dice_p", "hd95_mean",
                "hd95_sd", "hd95_p", "nsd_mean", "nsd_sd", "nsd_p", "parameters", "epochs_done", "epochs_budget",
                "iterations_per_epoch", "train_seconds", "peak_memory_train_mb", "peak_memory_predict_mb",
                "peak_memory_kind", "inference_seconds_per_case", "fold_validation_dice", "error"])
    for r in rows:
        ok = r["status"] == "ok"
        g = (lambda m, k: r[m][k] if ok else None)
        p = (lambda m: ((r.get("vs_first") or {}).get(m) or {}).get("p"))
        w.writerow([r["contender"], r["trainer"], r["plans"], r["status"], r.get("n_cases"),
                    g("dice", "mean"), g("dice", "sd"), p("dice"), g("hd95_mm", "mean"), g("hd95_mm", "sd"),
                    p("hd95_mm"), g("nsd", "mean"), g("nsd", "sd"), p("nsd"), r.get("parameters"),
                    r.get("epochs_done"), r.get("epochs_budget"), r.get("iterations_per_epoch"),
                    r.get("train_seconds"), r.get("peak_memory_train_mb"), r.get("peak_memory_predict_mb"),
                    r.get("peak_memory_kind"), r.get("inference_seconds_per_case"), r.get("fold_validation_dice"),
                    r.get("error") or ""])
    _atomic(out / "comparison.csv", buf.getvalue())
    pngs = _plots(rows, contenders)
    for name, data in pngs.items():
        _atomic(out / name, data)

    first = rows[0]["contender"] if rows else "-"
    label_rows = [[r["contender"]] + [_f(r["per_label_dice"][str(lab)]) for lab in labels]
                  for r in rows if r["status"] == "ok"]
    md = [f"# Comparison: {meta.get('dataset_name', '')}", "",
          f"Command: `{meta.get('command', '')}`", "",
          f"Created {meta.get('created', '')} by medmamba {meta.get('versions', {}).get('medmamba', '')}; "
          f"device {meta.get('device_name', meta.get('device', ''))}.", "",
          f"Data: {meta.get('data_summary', '')}", "",
          f"Budget: {meta.get('budget_summary', '')}", "",
          "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    md += ["| " + " | ".join(x.replace("|", "/") for x in row) + " |" for row in table]
    md += ["", f"Mean ± sd over the test cases (per case: mean over labels {labels}). p: two-sided paired Wilcoxon "
               f"signed-rank test against the first contender ({first}), over the cases both define (n).",
           "Train time: the sum of nnU-Net's epoch times (excluding start-up and the final validation); peak memory: "
           + ("CUDA max allocated." if meta.get("device") == "cuda" else "the process's maximum resident set size (CPU)."),
           "", "Dice per label:", "", "| contender | " + " | ".join(f"label {lab}" for lab in labels) + " |",
           "|---|" + "---|" * len(labels)]
    md += ["| " + " | ".join(row) + " |" for row in label_rows]
    md += ["", "## Caveats", ""] + [f"- {c}" for c in meta.get("caveats", [])]
    md += ["", "## Reproducibility", ""] + [f"- {c}" for c in meta.get("reproducibility", [])]
    md += ["", "Plots: `dice_boxplot.png`, `dice_vs_training_time.png`; per case: `comparison.json`; "
               "each contender's evaluation: `contenders/<name>/evaluation/report.html`.", ""]
    _atomic(out / "comparison.md", "\n".join(md))

    e = html.escape
    imgs = "".join(f"<figure><img src='data:image/png;base64,{base64.b64encode(d).decode()}' alt='{e(n)}'>"
                   f"<figcaption>{e(n)}</figcaption></figure>" for n, d in pngs.items())
    th = "".join(f"<th>{e(c)}</th>" for c in _COLUMNS)
    trs = "".join("<tr" + (" class='bad'" if row[1] != "ok" else "") + ">"
                  + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>" for row in table)
    page = f"""<!doctype html><html><head><meta charset='utf-8'><title>medmamba compare</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 6px;font-size:13px}}tr.bad td{{background:#fdd}}figure{{display:inline-block;margin:1em}}</style>
</head><body><h1>Comparison: {e(str(meta.get('dataset_name', '')))}</h1>
<p><code>{e(str(meta.get('command', '')))}</code></p>
<p>{e(str(meta.get('data_summary', '')))}<br>Budget: {e(str(meta.get('budget_summary', '')))}<br>
Device: {e(str(meta.get('device_name', meta.get('device', ''))))}</p>
<table><tr>{th}</tr>{trs}</table>
<p>Mean ± sd over the test cases. p: two-sided paired Wilcoxon signed-rank test against {e(first)}.</p>
{imgs}<h2>Caveats</h2><ul>{''.join(f'<li>{e(c)}</li>' for c in meta.get('caveats', []))}</ul>
<h2>Reproducibility</h2><ul>{''.join(f'<li>{e(c)}</li>' for c in meta.get('reproducibility', []))}</ul>
</body></html>"""
    _atomic(out / "comparison.html", page)
    return doc
