"""Write the suite's results: results.json, results.md (markdown tables) and PNG plots (matplotlib, optional)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

STAGE_LABELS = {
    "preprocess": "preprocess", "encoder": "encoder", "transformer": "transformer",
    "density_grid": "density grid", "marching_cubes": "marching cubes", "vertex_colors": "vertex colours",
    "export": "GLB export",
}
E2E_STAGES = list(STAGE_LABELS)


def write_all(results: Dict[str, Any], out: Path, plots: bool = True, log: Callable[[str], None] = print) -> List[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    if plots:
        try:
            written += write_plots(results, out)
        except ImportError:
            results.setdefault("notes", []).append("plots skipped: matplotlib is not installed (pip install matplotlib)")
            log("   plots skipped: matplotlib is not installed (pip install matplotlib)")
    for name, text in (("results.json", json.dumps(results, indent=1, default=str) + "\n"),
                       ("results.md", markdown(results))):
        (out / name).write_text(text)
        written.insert(0, out / name)
    log(f"wrote {', '.join(str(x) for x in written)}")
    return written


# --------------------------------------------------------------------------------------------- text

def fmt_ms(seconds: Optional[float], approx: bool = False) -> str:
    if seconds is None or (isinstance(seconds, float) and not math.isfinite(seconds)):
        return "–"
    ms = seconds * 1000
    text = f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"
    return f"~{text}\\*" if approx else text


def _t(row: Dict[str, Any], key: str, stat: str = "median") -> str:
    if row["status"] not in ("ok", "extrapolated"):
        return "–"
    v = (row.get("timings") or {}).get(key)
    return fmt_ms(None if v is None else v.get(stat), row["status"] == "extrapolated")


def _status(row: Dict[str, Any]) -> str:
    st = row["status"]
    if st == "ok":
        return "ok"
    if st == "extrapolated":
        return "extrapolated\\*"
    return f"**{st}**"


def _speedup(row: Dict[str, Any]) -> str:
    sp = row.get("speedup_vs_baseline")
    if sp is None:
        return "baseline" if _is_baseline(row) else "–"
    text = f"{sp:.1f}×" if sp >= 1 else f"{sp:.2g}×"
    return text + ("\\*" if row.get("speedup_note") else "")


def _is_baseline(row: Dict[str, Any]) -> bool:
    return row.get("network_backend", "torch-fp32") == "torch-fp32" and row.get("field_backend", "torch") == "torch"


def _check(row: Dict[str, Any], name: str, fmt: str = "{:.2g}") -> str:
    for c in (row.get("parity") or {}).get("checks", []):
        if c["check"].startswith(name) and c["value"] is not None:
            return fmt.format(c["value"]) if not isinstance(c["value"], str) else c["value"]
    return "–"


def _mb(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:,.0f}"


def _table(header: List[str], rows: List[List[str]], text_cols: int = 1) -> List[str]:
    """Markdown table: the first ``text_cols`` columns left-aligned (names), the rest right-aligned (numbers)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if i < text_cols else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def markdown(res: Dict[str, Any]) -> str:
    m = res["machine"]
    s = res["settings"]
    lib = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    thr = m["threads"]
    L = [f"# lrm_rt benchmark — `{m['slug']}`", ""]
    L += [f"Command: `{res['command'].strip()}`  ",
          f"Date: {res['created']}, git {m.get('git_revision') or 'unknown'}, suite wall time {res['wall_seconds']} s  ",
          f"CPU: {m['cpu']}, {m['usable_cores']} usable cores of {m['cpu_count']} ({', '.join(m['cpu_flags']) or 'no SIMD flags read'}; "
          f"torch capability {m['torch_cpu_capability']}), {m.get('memory_gb')} GB RAM  ",
          f"Threads: torch intra-op {thr['torch_intra_op']}, inter-op {thr['torch_inter_op']}, "
          f"OMP_NUM_THREADS={thr.get('OMP_NUM_THREADS') or 'unset'}  "]
    if res.get("interrupted"):
        L.append(f"**Interrupted** during {res['interrupted']}: only the rows that finished are here.  ")
    if m.get("gpu"):
        L.append(f"GPU: {m['gpu']}, driver {m.get('gpu_driver', '?')}, CUDA {m.get('cuda_runtime')}, {m.get('gpu_memory', '')}  ")
    L += [f"Libraries: {lib}  ",
          f"Device: {m['device']}; timed repeats {s['repeats']} (baseline {s['baseline_repeats']}), {s['warmup']} untimed "
          f"warm-up run(s) first, the parity run included (a baseline run of >= 10 s is timed itself); times are "
          f"medians in ms unless marked p90.", "",
          f"**Baseline** = {res['baseline']}. Every other path is timed only after passing the parity gate "
          "against it (tolerances in results.json); a path that does not is listed as **FAILING**, untimed.", ""]
    if any(r["status"] == "extrapolated" for k in ("extraction", "end_to_end") for r in res[k]):
        L += ["\\* **extrapolated**: the dense baseline was not run at this grid (above `--baseline-max-resolution`); "
              "its time is a power law fitted to the measured grids (see `reason` in results.json), and speedups "
              "against it are marked \\*.", ""]
    for mi in res["models"]:
        surf = mi.get("surface", {})
        fam = mi["family"] if mi["version"] == mi["family"] else f"{mi['family']} {mi['version']}"
        L.append(f"- **{mi['name']}** ({fam}, shape {mi.get('shape') or 'custom'}, {mi.get('parameters', 0) / 1e6:.1f} M parameters, "
                 f"{mi['source']}, input {mi['input_size']} px, triplane {mi.get('triplane_shape')}, level {mi['mc_threshold']}): "
                 f"surface = {surf.get('description', '?')}" + (f" — {surf['note']}" if surf.get("note") else ""))
    L.append("")

    L += ["## Targets", ""]
    L += _table(["target", "measured", "required", "met", "path", "note"],
                [[t["description"], t["measured"] or "–", t["required"],
                  {True: "**met**", False: "**not met**", None: "n/a"}[t["met"]], t.get("path") or "–", t.get("note") or ""]
                 for t in res["targets"]], text_cols=6)
    L.append("")

    if res["end_to_end"]:
        L += ["## End to end: image → GLB", "",
              "Per stage (ms, summed over the batch), `total` = wall time of the whole chain (median, p90), "
              "`per image` = total / batch.", ""]
        rows = []
        for r in res["end_to_end"]:
            rows.append([r["model"], r["network_backend"], r["field_backend"], r.get("mc_backend", ""), r["batch"], r["resolution"],
                         *[_t(r, k) for k in E2E_STAGES], _t(r, "total"), _t(r, "total", "p90"), _t(r, "per_image"),
                         _speedup(r), _mb(r.get("peak_rss_mb")), _mb(r.get("peak_gpu_mb")),
                         _check(r, "chamfer_voxels"), _check(r, "face_count_diff", "{:.0f}"), _status(r)])
        L += _table(["model", "network", "field", "MC", "batch", "R", *[STAGE_LABELS[k] for k in E2E_STAGES], "total",
                     "total p90", "per image", "speedup", "peak RSS MB", "peak GPU MB", "chamfer (vox)", "Δfaces", "status"], rows, 4)
        L.append("")

    if res["network"]:
        L += ["## Network: image → triplane", ""]
        rows = [[r["model"], r["network_backend"], r["precision"], r["batch"], _t(r, "preprocess"), _t(r, "encoder"),
                 _t(r, "transformer"), _t(r, "network"), _t(r, "network", "p90"), _speedup(r),
                 _check(r, "triplane_rel_err"), _mb(r.get("peak_rss_mb")), _mb(r.get("peak_gpu_mb")), _status(r)]
                for r in res["network"]]
        L += _table(["model", "backend", "precision", "batch", "preprocess", "encoder", "transformer", "network",
                     "network p90", "speedup", "triplane rel err", "peak RSS MB", "peak GPU MB", "status"], rows, 3)
        L.append("")

    if res["extraction"]:
        L += ["## Mesh extraction: triplane → mesh (one object)", "",
              "`extraction` = density grid + marching cubes + vertex colours; GLB export listed separately.", ""]
        rows = [[r["model"], r["field_backend"], r.get("mc_backend", ""), r["resolution"], _t(r, "density_grid"),
                 _t(r, "marching_cubes"), _t(r, "vertex_colors"), _t(r, "extraction"), _t(r, "extraction", "p90"),
                 _t(r, "export"), _speedup(r), (r.get("mesh") or {}).get("faces", "–"), _check(r, "chamfer_voxels"),
                 _check(r, "grid_sign_mismatch", "{:.0f}"), _mb(r.get("peak_rss_mb")), _status(r)]
                for r in res["extraction"]]
        L += _table(["model", "field", "MC", "R", "density grid", "marching cubes", "vertex colours", "extraction",
                     "extraction p90", "GLB export", "speedup", "faces", "chamfer (vox)", "sign mismatches",
                     "peak RSS MB", "status"], rows, 3)
        L.append("")

    if res["render"]:
        L += ["## Novel-view rendering", ""]
        rows = [[r["model"], r["field_backend"], f"{r['views']} × {r['size']}²", _t(r, "render"), _t(r, "render", "p90"),
                 _speedup(r), _check(r, "render_max_abs_err"), _mb(r.get("peak_rss_mb")), _status(r)] for r in res["render"]]
        L += _table(["model", "field", "views", "render", "render p90", "speedup", "max abs err", "peak RSS MB", "status"], rows, 3)
        L.append("")

    if res["scaling"]:
        L += ["## Extraction scaling", "", "Least-squares slope of log(extraction time) vs log(R): 3 = dense, 2 = surface-bound.", ""]
        L += _table(["model", "field", "grids", "slope"],
                    [[f["model"], f["field_backend"], ", ".join(map(str, f["resolutions"])) + f" ({f['window']})",
                      "–" if f["slope"] is None else f"{f['slope']:.2f}"] for f in res["scaling"]], 3)
        L.append("")

    bad = [r for k in ("network", "extraction", "render", "end_to_end") for r in res[k] if r["status"] in ("FAILING", "error")]
    if bad:  # reasons in full: the tables only show the status
        L += ["## FAILING / errors", ""]
        for r in bad:
            what = "/".join(x for x in (r.get("network_backend"), r.get("field_backend")) if x)
            where = ", ".join(f"{k} {r[k]}" for k in ("batch", "resolution") if r.get(k) is not None)
            L.append(f"- {r['kind']} {r['model']} {what} ({where}): **{r['status']}** — {r.get('reason', '')}")
        L.append("")
    if res.get("model_errors"):
        L += ["## Models that could not be benchmarked", ""]
        L += [f"- {e['model']}: {e['error']}" for e in res["model_errors"]]
        L.append("")
    if res["unavailable"]:
        L += ["## Unavailable on this machine", ""]
        L += [f"- {u['kind']} backend `{u['name']}`: unavailable: {u['reason']}" for u in res["unavailable"]]
        L.append("")
    return "\n".join(L)


def targets_text(res: Dict[str, Any]) -> str:
    lines = ["Targets:"]
    for t in res["targets"]:
        mark = {True: "MET    ", False: "NOT MET", None: "n/a    "}[t["met"]]
        lines.append(f"  [{mark}] {t['description']}: measured {t['measured'] or '–'} (required {t['required']})"
                     + (f" via {t['path']}" if t.get("path") else "") + (f" — {t['note']}" if t.get("note") else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- plots

def write_plots(res: Dict[str, Any], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: List[Path] = []
    colors = plt.get_cmap("tab10").colors
    for mi in res["models"]:
        rows = [r for r in res["end_to_end"] if r["model"] == mi["name"] and r["status"] in ("ok", "extrapolated")
                and r["batch"] == min(x["batch"] for x in res["end_to_end"] if x["model"] == mi["name"])]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(10.5, 0.5 * len(rows) + 1.8))
        labels = [f"{r['network_backend']} + {r['field_backend']}" + (" (extrap.)" if r["status"] == "extrapolated" else "")
                  for r in rows]
        left = [0.0] * len(rows)
        for si, st in enumerate(E2E_STAGES):
            vals = [((r["timings"].get(st) or {}).get("median") or 0.0) * 1000 for r in rows]
            ax.barh(labels, vals, left=left, color=colors[si % len(colors)], label=STAGE_LABELS[st])
            left = [a + b for a, b in zip(left, vals)]
        for i, r in enumerate(rows):
            ax.text(left[i], i, f" {r['timings']['total']['median'] * 1000:,.0f} ms", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("milliseconds (median, batch %d)" % rows[0]["batch"])
        ax.set_title(f"{mi['name']}: image → GLB at R={rows[0]['resolution']} per stage ({res['machine']['slug']})")
        ax.set_xlim(0, max(left) * 1.25 or 1)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        p = out / f"stages_{mi['name']}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    models = [mi["name"] for mi in res["models"] if any(r["model"] == mi["name"] for r in res["extraction"])]
    if models:
        fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
        for ax, model in zip(axes[0], models):
            backends = []
            for r in res["extraction"]:
                if r["model"] == model and r["field_backend"] not in backends:
                    backends.append(r["field_backend"])
            anchor = None
            for bi, fb in enumerate(backends):
                pts = sorted((r["resolution"], r["timings"]["extraction"]["median"], r["status"]) for r in res["extraction"]
                             if r["model"] == model and r["field_backend"] == fb and r["status"] in ("ok", "extrapolated"))
                if not pts:
                    continue
                c = colors[bi % len(colors)]
                ax.plot([p[0] for p in pts], [p[1] * 1000 for p in pts], "-", color=c, label=fb)
                for rr, tt, st in pts:
                    ax.plot(rr, tt * 1000, "o", color=c, mfc="none" if st == "extrapolated" else c)
                anchor = anchor or (pts[0][0], pts[0][1] * 1000)
            if anchor:
                rs = sorted({r["resolution"] for r in res["extraction"] if r["model"] == model})
                r0, t0 = anchor
                for k, ls in ((2, ":"), (3, "--")):
                    ax.plot(rs, [t0 * (x / r0) ** k for x in rs], ls, color="grey", lw=1, label=f"∝ R{'²' if k == 2 else '³'}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ticks = sorted({r["resolution"] for r in res["extraction"] if r["model"] == model})
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("marching-cubes resolution R")
            ax.set_ylabel("extraction ms (grid + MC + colours)")
            ax.set_title(model)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Extraction time vs resolution ({res['machine']['slug']}); hollow = extrapolated", fontsize=9)
        fig.tight_layout()
        p = out / "extraction_scaling.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written
