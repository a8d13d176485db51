"""``report.json`` and a self-contained ``report.html`` from the demo's step results.

The HTML's first screen answers what a reader asks first: what was quantized, how accurate it is on each backend,
how big and how fast it is. Everything else (tables, lowering, sensitivity, activation figures, gallery) follows.
Images are embedded as data URIs so the file can be mailed or attached to an issue as is.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from quantize.atomic import write_atomic

from .figures import text_streams_label

__all__ = ["accuracy_rows", "render_html", "write_report"]

PRECISIONS = ("Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9")


def _val_set(parity: dict) -> dict | None:
    return next((r for name, r in parity.get("sets", {}).items() if name != "natural photographs"), None)


def _photo_set(parity: dict) -> dict | None:
    return parity.get("sets", {}).get("natural photographs")


def accuracy_rows(results: dict[str, dict], bits: str, compare_bits: str) -> list[dict[str, Any]]:
    """One row per backend: metrics on the val pairs it ran, and for deployed backends their agreement with the
    simulated model and the simulated model's mIoU on the very same pairs."""
    rows = [
        {"backend": "float (PyTorch)", "kind": "reference", **_metrics(results["float"])},
        {
            "backend": f"simulated {bits.upper()} (fake-quant, PyTorch)",
            "kind": "simulated",
            # The simulated model's scores on the .pte parity pairs (the first ``limit`` of val, as for float).
            **_metrics(_val_set(results["parity_pte"])["simulated"]),
        },
    ]
    deployed = (
        ("parity_pte", f"{bits.upper()} .pte, ExecuTorch XNNPACK (x86 host)", "x86 .pte"),
        ("parity_coreml", f"{bits.upper()} .mlpackage, Core ML (MIL interpreter)", "Core ML"),
        ("parity_arm", f"{bits.upper()} .pte, emulated ARM (qemu cortex-a76)", "ARM .pte"),
    )
    for step, label, short in deployed:
        parity = results.get(step, {})
        val = _val_set(parity)
        if val is None:
            rows.append(
                {"backend": label, "short": short, "kind": "deployed", "skipped": parity.get("skipped", "not run")}
            )
            continue
        photos = _photo_set(parity)
        row = {
            "backend": label,
            "short": short,
            "kind": "deployed",
            **_metrics(val["deployed"]),
            "mask_agreement": val["mask_agreement"],
            "max_logit_diff_lsb": val["max_logit_diff_lsb"],
            "simulated_mIoU_same_pairs": val["simulated"]["mIoU"],
            "photo_mask_agreement": photos["mask_agreement"] if photos else None,
        }
        if "arm_vs_x86" in val:
            row["arm_vs_x86_lsb"] = val["arm_vs_x86"]["max_diff_lsb"]
        rows.append(row)
    rows.append(
        {
            "backend": f"simulated {compare_bits.upper()} (fake-quant, PyTorch)",
            "kind": "simulated",
            **_metrics(results["simulated_compare"]),
        }
    )
    return rows


def _metrics(result: dict) -> dict:
    keys = ("pairs", "mIoU", "oIoU", *PRECISIONS, "mIoU_by_kind")
    return {k: result[k] for k in keys if k in result}


def _size_summary(results: dict[str, dict], float_parameters: int | None = None) -> dict[str, Any]:
    pte = results["export_pte"]["bytes"]
    packages = results["export_coreml"]["packages"]
    out = {
        "pte_int8_bytes": pte["int8"],
        "pte_float_bytes": pte["float"],
        "pte_ratio": pte["int8"] / pte["float"],
        "coreml_int8_weight_bytes": packages["full"]["weight_bytes"],
    }
    if "float" in packages:
        out["coreml_float_weight_bytes"] = packages["float"]["weight_bytes"]
    elif float_parameters:
        out["coreml_float_weight_bytes"] = 2 * float_parameters  # what an fp16 float package stores
    if "coreml_float_weight_bytes" in out:
        out["coreml_ratio"] = packages["full"]["weight_bytes"] / out["coreml_float_weight_bytes"]
    return out


def _latency_summary(bench: dict) -> dict[str, Any]:
    out = {}
    for key, stats in bench.items():
        if key.startswith("threads="):
            out[key] = {
                "float_ms": stats["float"]["median_ms"],
                "int8_ms": stats["int8"]["median_ms"],
                "ratio": stats["int8"]["median_ms"] / stats["float"]["median_ms"],
            }
    return out


def write_report(cfg, paths: dict[str, Path], results: dict[str, dict], seconds: float, reused: list[str]) -> dict:
    """Assemble the report from the step results (plus the figures it draws now) and write both files."""
    from quantize.calibration.artifact import load_quantized
    from quantize.calibration.sensitivity import plot_sensitivity

    from .figures import activation_figures, capture_activations, save_png

    figures = paths["figures"]
    figures.mkdir(parents=True, exist_ok=True)
    model, recipe, config = load_quantized(paths["artifact"])
    compare, compare_recipe, _ = load_quantized(paths["compare"])

    sens_png = plot_sensitivity(
        results["sensitivity"], figures / "sensitivity.png", f"{compare_recipe.method} {compare_recipe.bits}"
    )
    from quantize.calibration.calibrate import calibration_batch
    from quantize.data import open_split

    train = open_split(cfg.data, "shapesref", "unc", "train", model.config)
    pairs = calibration_batch(train, 8)
    activations = {}
    for label, net in ((cfg.compare_bits, compare), (cfg.bits, model)):
        for kind, (png, stats) in activation_figures(
            capture_activations(net, pairs.images, pairs.input_ids, pairs.attention_mask)
        ).items():
            path = save_png(png, figures / f"{kind}-{label}.png")
            activations[f"{kind}-{label}"] = {"kind": kind, "bits": label, "png": path.name, **stats}

    gallery = _gallery(cfg, paths, results, model, compare)
    bench = _bench(getattr(cfg, "bench", None))
    if bench is not None and (Path(cfg.bench) / "bench.png").is_file():
        save_png((Path(cfg.bench) / "bench.png").read_bytes(), figures / "bench.png")
    report = {
        "title": f"lavt-tiny quantized with PTQ4RIS ({recipe.method}, {recipe.bits.upper()})",
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": config.get("model", "lavt-tiny"),
        "recipe": {"method": recipe.method, "bits": recipe.bits, "compare_bits": cfg.compare_bits},
        "quantized_layers": results["calibrate"]["sites"],
        "calibration": config.get("calibration", {}),
        "accuracy": accuracy_rows(results, cfg.bits, cfg.compare_bits),
        "sizes": _size_summary(results, sum(p.numel() for p in model.parameters())),
        "latency": _latency_summary(results["benchmark"]),
        "lowering": results["export_pte"]["lowering"]["programs"],
        "coreml": {k: v for k, v in results["export_coreml"].items() if k != "packages"}
        | {
            "packages": {
                n: {k: v for k, v in p.items() if k != "ops"} for n, p in results["export_coreml"]["packages"].items()
            }
        },
        "sensitivity": {
            k: results["sensitivity"][k] for k in ("float_mIoU", "quantized_mIoU", "modalities", "pairs_for_miou")
        }
        | {"png": sens_png.name, "bits": cfg.compare_bits},
        "activations": activations,
        "bench": bench,
        "gallery": [
            {"caption": r.caption, "kind": r.kind, "cells": [(c, cap) for c, _, cap in r.cells]} for r in gallery
        ],
        "files": {k: str(paths[k]) for k in ("pte", "pte_float", "coreml", "artifact", "compare")},
        "run": {
            "seconds": round(seconds, 1),
            "steps_seconds": {k: v.get("step_seconds") for k, v in results.items() if isinstance(v, dict)},
            "reused_steps": reused,
            "settings": {
                "limit": cfg.limit,
                "coreml_limit": cfg.coreml_limit,
                "arm_limit": cfg.arm_limit,
                "arm": cfg.arm,
                "seed": cfg.seed,
            },
        },
    }
    out = Path(cfg.out)
    write_atomic(out / "report.json", json.dumps(report, indent=1, default=str).encode())
    images = {p.name: p.read_bytes() for p in figures.glob("*.png")}
    write_atomic(out / "report.html", render_html(report, images, gallery).encode())
    return report


def _gallery(cfg, paths, results, model, compare) -> list:
    from mobile_runtime.runtime import load_full_model
    from quantize.data import open_split
    from quantize.deploy.parity_stats import natural_photo_pairs

    from .gallery import gallery_rows

    val = open_split(cfg.data, "shapesref", "unc", "val", model.config)
    worst = [w["pair"] for w in (_val_set(results["parity_pte"]) or {}).get("worst_pairs", [])][:4]
    photos = list(natural_photo_pairs(val.tokenizer, model.config.swin.img_size))
    photo_worst = {w["pair"] for w in (_photo_set(results["parity_pte"]) or {}).get("worst_pairs", [])[:2]}
    chosen_photos = [p for p in photos if p[0] in photo_worst]
    pte = load_full_model(paths["pte"])
    models = {
        "float": cfg.float_model().eval(),
        f"{cfg.bits.upper()} simulated": model.eval(),
        f"{cfg.bits.upper()} .pte": pte,
        f"{cfg.compare_bits.upper()} simulated": compare.eval(),
    }
    return gallery_rows(models, val, worst, chosen_photos)


# --------------------------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 10px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.sub{color:#4a5568;margin:0 0 18px;line-height:1.45}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 14px}
.card h3{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:#5a6472;margin:0 0 6px}
.big{font-size:26px;font-weight:650}.small{font-size:13px;color:#4a5568;line-height:1.4}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0 10px}
th,td{border:1px solid #dde1e7;padding:5px 8px;text-align:right}th{background:#eef1f5}
td:first-child,th:first-child{text-align:left}.skip{color:#8a94a3;font-style:italic}
.figs{display:flex;flex-wrap:wrap;gap:14px}.figs figure{margin:0;background:#fff;border:1px solid #dde1e7;padding:8px}
figcaption{font-size:12px;color:#4a5568;max-width:520px;margin-top:4px}
.gallery td{text-align:center;vertical-align:top;font-size:12px}.gallery img{display:block;image-rendering:pixelated}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}pre{background:#fff;border:1px solid #dde1e7;padding:10px;overflow:auto}
.good{color:#1f7a3a}.bad{color:#b42318}
"""


def _img(data: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}"{size} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _f(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _cards(report: dict) -> str:
    rows = report["accuracy"]
    float_row, sim_row, pte_row = rows[0], rows[1], rows[2]
    sizes, latency = report["sizes"], report["latency"]
    one = latency.get("threads=1", {})
    agreement = " · ".join(
        f"{r['short']} {r['mask_agreement']:.2f}%" for r in rows if r["kind"] == "deployed" and "mask_agreement" in r
    )
    return f"""
<div class="cards">
 <div class="card"><h3>Accuracy on the phone (.pte)</h3><div class="big">{_f(pte_row.get("mIoU"))} mIoU</div>
  <div class="small">float {_f(float_row["mIoU"])} · simulated {_f(sim_row["mIoU"])} · on {pte_row.get("pairs", "–")}
  ShapesRef val pairs</div></div>
 <div class="card"><h3>Same masks as simulated</h3><div class="big">{_f(pte_row.get("mask_agreement"), 2, "%")}</div>
  <div class="small">of mask pixels: {agreement}</div></div>
 <div class="card"><h3>Size</h3><div class="big">{sizes["pte_ratio"]:.2f}× float</div>
  <div class="small">.pte {sizes["pte_int8_bytes"] / 1e6:.1f} MB vs {sizes["pte_float_bytes"] / 1e6:.1f} MB;
  Core ML weights {sizes["coreml_int8_weight_bytes"] / 1e6:.1f} MB{
        f" ({sizes['coreml_ratio']:.2f}× fp16 float)" if "coreml_ratio" in sizes else ""
    }</div></div>
 <div class="card"><h3>Speed (host CPU, 1 thread)</h3><div class="big">{_f(one.get("ratio"))}× float time</div>
  <div class="small">int8 {_f(one.get("int8_ms"), 1)} ms vs float {_f(one.get("float_ms"), 1)} ms per forward,
  XNNPACK, measured interleaved in one run</div></div>
</div>"""


def _accuracy_table(report: dict) -> str:
    head = ("backend", "pairs", "mIoU", "oIoU", *(p.replace("Prec@", "P@") for p in PRECISIONS),
            "mask agreement with simulated %", "max Δlogit (LSB)", "simulated mIoU, same pairs", "photos: agreement %")  # fmt: skip
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in report["accuracy"]:
        if "skipped" in r:
            out.append(f'<tr><td>{html.escape(r["backend"])}</td><td class="skip" colspan="{len(head) - 1}">'
                       f'skipped: {html.escape(r["skipped"])}</td></tr>')  # fmt: skip
            continue
        cells = [r["backend"], str(r["pairs"]), _f(r["mIoU"]), _f(r["oIoU"]), *(_f(r.get(p)) for p in PRECISIONS),
                 _f(r.get("mask_agreement"), 3), _f(r.get("max_logit_diff_lsb"), 1), _f(r.get("simulated_mIoU_same_pairs")),
                 _f(r.get("photo_mask_agreement"), 3)]  # fmt: skip
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    kinds = sorted({k for r in report["accuracy"] for k in r.get("mIoU_by_kind", {})})
    if kinds:
        out.append("<table><tr><th>mIoU by expression kind</th>" + "".join(f"<th>{k}</th>" for k in kinds) + "</tr>")
        for r in report["accuracy"]:
            if "mIoU_by_kind" in r:
                cells = "".join(f"<td>{_f(r['mIoU_by_kind'].get(k))}</td>" for k in kinds)
                out.append(f"<tr><td>{html.escape(r['backend'])}</td>{cells}</tr>")
        out.append("</table>")
    arm = next((r for r in report["accuracy"] if "arm_vs_x86_lsb" in r), None)
    if arm:
        out.append(f"<p class='small'>Emulated ARM against the x86 host runtime, same program and inputs: largest logit "
                   f"difference {arm['arm_vs_x86_lsb']:.2f} LSB of an 8-bit grid over the logits' range.</p>")  # fmt: skip
    return "\n".join(out)


def _lowering(report: dict) -> str:
    out = []
    for name, prog in report["lowering"].items():
        d = prog["delegation"]
        left = ", ".join(f"{k} ×{v}" for k, v in d.get("non_delegated_ops", {}).items()) or "none"
        ways = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in prog.get("lowered_as", {}).items())
        kernels = ", ".join(f"{html.escape(k)} ×{v}" for k, v in (prog.get("kernels") or {}).items())
        out.append(
            f"<h3>{html.escape(name)} program ({prog['bytes'] / 1e6:.1f} MB)</h3>"
            f"<p class='small'>{d['partitions']} XNNPACK partition(s), {d['delegated_nodes']} nodes delegated; left "
            f"outside: {html.escape(left)}.</p>"
            + (
                f"<table><tr><th>how quantized layers were lowered</th><th>layers</th></tr>{ways}</table>"
                if ways
                else ""
            )
            + (f"<p class='small'>XNNPACK kernels seen in an ETDump run: {kernels}</p>" if kernels else "")
        )
    return "\n".join(out)


def _sizes_latency(report: dict) -> str:
    s = report["sizes"]
    rows = [("ExecuTorch .pte, int8", s["pte_int8_bytes"], s["pte_ratio"]), ("ExecuTorch .pte, float", s["pte_float_bytes"], 1.0),
            ("Core ML .mlpackage weights, int8", s["coreml_int8_weight_bytes"], s.get("coreml_ratio"))]  # fmt: skip
    if "coreml_float_weight_bytes" in s:
        rows.append(("Core ML weights of the float model in fp16", s["coreml_float_weight_bytes"], 1.0))
    out = ["<table><tr><th>file</th><th>MB</th><th>× its float</th></tr>"]
    out += [f"<tr><td>{n}</td><td>{b / 1e6:.2f}</td><td>{_f(r, 3)}</td></tr>" for n, b, r in rows]
    out.append(
        "</table><table><tr><th>host latency (median)</th><th>float ms</th><th>int8 ms</th><th>int8 / float</th></tr>"
    )
    for key, v in report["latency"].items():
        out.append(f"<tr><td>{key.replace('threads=', '')} thread(s)</td><td>{v['float_ms']:.2f}</td>"
                   f"<td>{v['int8_ms']:.2f}</td><td>{v['ratio']:.3f}</td></tr>")  # fmt: skip
    out.append("</table><p class='small'>Interleaved runs in one process after warm-up (the ratio is the result; "
               "absolute times depend on this machine's load). A phone's figures come from "
               "<code>python tests/device_parity.py --adb</code>.</p>")  # fmt: skip
    return "\n".join(out)


def _sensitivity(report: dict, images: dict[str, bytes]) -> str:
    s = report["sensitivity"]
    rows = "".join(
        f"<tr><td>{m}</td><td>{v['layers']}</td><td>{v['sqnr_db']:.1f}</td><td>{_f(v['mIoU_lost'])}</td></tr>"
        for m, v in s["modalities"].items()
    )
    return (
        f"<p class='small'>Each part of the {s['bits'].upper()} model quantized alone (the rest float): logit SQNR on "
        f"calibration pairs and mIoU lost on {s['pairs_for_miou']} val pairs. At {s['bits'].upper()} the parts differ "
        f"clearly; at W8A8 every part loses almost nothing.</p>"
        f"<table><tr><th>part</th><th>layers</th><th>logit SQNR dB</th><th>mIoU lost</th></tr>{rows}</table>"
        + _img(images[s["png"]], "sensitivity by layer and modality", 1000)
    )


def _special_grids(act_bits: int) -> str:
    """What the ptq4ris-deploy preset does beyond plain grids at these activation bits (DRQ from A5 up, tier slices
    below A8)."""
    rorq = "range-ordered channel groups (RORQ)" + (" with magnitude tier slices" if act_bits < 8 else "")
    if act_bits >= 5:
        return f"dual-region grids (DRQ) after softmax and GELU and {rorq} on text-encoder inputs"
    return f"{rorq} on text-encoder inputs"


_ACTIVATION_TEXT = {
    "post_softmax": lambda s: (
        f"Attention probabilities ({s['bits']} bits): one uniform grid rounds {s['zeroed_by_uniform_%']:.1f}% of the "
        f"non-zero probabilities to 0, DRQ's low region keeps all but {s['zeroed_by_drq_%']:.1f}%. DRQ has the lower "
        f"error at {s['better_at']} of {s['sites']} post-softmax sites."
    ),
    "post_gelu": lambda s: (
        f"Post-GELU inputs of {s['layer']} ({s['bits']} bits): the negative region (GELU's dip to −0.17) gets its own "
        f"step {s['step_negative']:.3g} instead of the shared {s['step_uniform']:.3g}; MSE {s['mse_drq']:.2e} vs "
        f"{s['mse_uniform']:.2e}. DRQ has the lower error at {s['better_at']} of {s['sites']} post-GELU sites."
    ),
    "text_channels": lambda s: (
        f"Text-encoder Linear input ({s['bits']} bits): the widest channel spans {s['widest_to_median_channel']:.0f}× "
        f"the median one; {text_streams_label(s)} (range-ordered channels; magnitude tiers beyond the first threshold; each "
        "one int8 GEMM once deployed) cut the MSE "
        f"from {s['mse_uniform']:.2e} to {s['mse_groups']:.2e}. Better at {s['better_at']} of {s['sites']} text inputs."
    ),
}


def _activations(report: dict, images: dict[str, bytes]) -> str:
    out = [("<p class='small'>Real activations on calibration pairs, at the site where the calibrated quantizer gains "
           "most over one min-max grid of the same bits; the caption counts the sites where it gains at all.</p>"
           "<div class='figs'>")]  # fmt: skip
    for key, a in report["activations"].items():
        out.append(f"<figure>{_img(images[a['png']], key, 520)}<figcaption>{html.escape(_ACTIVATION_TEXT[a['kind']](a))}"
                   "</figcaption></figure>")  # fmt: skip
    out.append("</div>")
    return "\n".join(out)


def _gallery_html(gallery) -> str:
    if not gallery:
        return "<p class='skip'>no gallery</p>"
    columns = [c for c, _, _ in gallery[0].cells]
    out = [
        "<table class='gallery'><tr><th>expression</th>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        + "</tr>"
    ]
    for row in gallery:
        cells = "".join(f"<td>{_img(png, column)}{html.escape(cap)}</td>" for column, png, cap in row.cells)
        out.append(
            f"<tr><td>“{html.escape(row.caption)}”<br><span class='small'>{html.escape(row.kind)}</span></td>{cells}</tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _everyday(calibration: dict) -> str:
    n = calibration.get("everyday_expressions", 0)
    return f" plus {n} everyday referring expressions paired with the same images" if n else ""


def _bench(folder: Path | None) -> dict | None:
    """The last ``ptq4ris bench`` result in ``folder``, if any: its JSON and the first table of its ``bench.md`` (the
    files it wrote are read, so the report needs nothing of the command line)."""
    if not folder or not (Path(folder) / "bench.json").is_file() or not (Path(folder) / "bench.md").is_file():
        return None
    try:
        bench = json.loads((Path(folder) / "bench.json").read_text())
        table = (Path(folder) / "bench.md").read_text().split("\n\n")[0]
    except (OSError, ValueError):
        return None
    if not isinstance(bench, dict) or not isinstance(bench.get("rows"), list):
        return None
    return {**bench, "table": table}


def _bench_html(report: dict, images: dict[str, bytes]) -> str:
    bench = report.get("bench")
    if not bench:
        return ("<p class='small'>No bench result yet: <code>ptq4ris bench</code> builds ours at W8A8, W4A8 and W4A4 "
                "and the stock XNNPACK/torchao flows and measures them side by side (accuracy, size, latency, "
                "instructions per forward on aarch64 and x86); the next demo run shows its table here.</p>")  # fmt: skip
    lines = bench["table"].splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for line in lines[2:]:
        cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    if "bench.png" in images:
        out.append(_img(images["bench.png"], "accuracy, size and instructions per forward"))
    cfg = bench.get("config", {})
    out.append(f"<p class='small'>From <code>ptq4ris bench --out {html.escape(str(cfg.get('out', '')))}</code> "
               f"({bench.get('seconds', 0) / 60:.0f} min): ShapesRef val, first {cfg.get('pairs', '?')} pairs; "
               "latency interleaved in one process; instructions per forward at one thread (aarch64 under qemu "
               "-cpu cortex-a76, x86 under callgrind). Ratios are to float.</p>")  # fmt: skip
    return "\n".join(out)


def render_html(report: dict, images: dict[str, bytes], gallery) -> str:
    """The report as one HTML page with every image embedded."""
    r = report
    cal = r.get("calibration", {})
    wbits, abits = r["recipe"]["bits"][1:].split("a")
    lines = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(r['title'])}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{html.escape(r['title'])}</h1>",
        (
            "<p class='sub'>A referring image segmentation model (image + sentence → mask; LAVT: Swin encoder with "
            "language fusion, MiniLM text encoder, PWAM, decoder) quantized after training with PTQ4RIS: "
            f"{r['quantized_layers']} layers — every Linear and Conv of the vision, text, fusion and decoder parts and the "
            f"attention matmuls — calibrated on {cal.get('pairs', '?')} {html.escape(str(cal.get('dataset', '')))} "
            f"{html.escape(str(cal.get('split', '')))} pairs{_everyday(cal)}. Weights are {wbits}-bit per output channel; "
            f"activations {abits}-bit, with "
            f"{_special_grids(int(abits))}. "
            "The same calibrated graph became an Android <code>.pte</code> (ExecuTorch, XNNPACK) and an iPhone "
            "<code>.mlpackage</code> (Core ML).</p>"
        ),
        _cards(r),
        "<h2>Accuracy on each backend</h2>",
        (
            "<p class='small'>ShapesRef val, LAVT's protocol (IoU at model resolution). Deployed backends are compared with "
            "the simulated model on the same pairs; emulated ARM and the MIL interpreter are slow, so they run fewer.</p>"
        ),
        _accuracy_table(r),
        "<h2>Size and host speed</h2>",
        _sizes_latency(r),
        "<h2>Ours and the stock flows (ptq4ris bench)</h2>",
        _bench_html(r, images),
        "<h2>Gallery: worst parity cases first</h2>",
        (
            "<p class='small'>The val pairs where the <code>.pte</code> departs most from the simulated model, then the "
            "natural photographs where it departs most (the model was trained on shapes only).</p>"
        ),
        _gallery_html(gallery),
        "<h2>What DRQ and RORQ do</h2>",
        _activations(r, images),
        "<h2>Where the error comes from</h2>",
        _sensitivity(r, images),
        "<h2>Lowering</h2>",
        _lowering(r),
        "<h2>Files and how to reproduce</h2>",
        "<table><tr><th>file</th><th>path</th></tr>"
        + "".join(f"<tr><td>{k}</td><td><code>{html.escape(v)}</code></td></tr>" for k, v in r["files"].items())
        + "</table>",
        (
            f"<pre>ptq4ris demo --out {html.escape(str(Path(r['files']['pte']).parent.parent))}\n"
            f'ptq4ris segment --image photo.jpg --text "the cat" --backend pte --pte {html.escape(r["files"]["pte"])}</pre>'
        ),
        (
            f"<p class='small'>Run took {r['run']['seconds']:.0f} s (steps reused from an earlier run: "
            f"{html.escape(', '.join(r['run']['reused_steps']) or 'none')}); generated {r['generated']}.</p>"
        ),
        "</main></body></html>",
    ]
    return "\n".join(lines)
