"""Drawing a comparison report: report.md, report.png, learning curves and the artifact table.

Each takes a `ComparisonReport` or its JSON form (a report read from disk draws as the run that wrote it):
`render_markdown(report)`, `plot_report(report, path)`, `plot_learning_curves(report, path)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from kaggle_utils.evaluate.comparison_report import ComparisonReport


def _serialised(report: ComparisonReport | dict) -> dict:
    """The JSON form the drawing functions read (a report read from disk draws as the run that wrote it)."""
    return report.to_dict() if isinstance(report, ComparisonReport) else report


def _fmt(stat: dict | None, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
    if stat is None:
        return "n/a"
    mean = stat["mean"] / scale
    text = f"{mean:.{digits}f}"
    if stat.get("std"):  # None (one seed) or 0 (a count that cannot vary) shows no spread
        text += f" ± {stat['std'] / scale:.{digits}f}"
    return text + unit


def render_markdown(report: ComparisonReport | dict) -> str:
    """report.md: the decision, the comparison table, what ships, definitions and the per-fold table."""
    report = _serialised(report)
    setup, env = report["setup"], report["environment"]
    lines = [
        "# Fine-tune → quantize vs quantize → fine-tune",
        "",
        f"**{report['decision']['statement']}**",
        "",
        *[f"Skipped `{name}`: {why}" for name, why in report.get("skipped_variants", {}).items()],
        *([""] if report.get("skipped_variants") else []),
        f"Device: {env['device']}. {setup['rows']} training rows, folds {setup['folds_trained']} of "
        f"`{Path(setup['folds_file']).name}` (sha256 {setup['folds_file_hash'][:12]}…), "
        f"seeds {setup['seeds']}, "
        f"base `{Path(setup['base_model']).name}`, max length {setup['max_length']}, "
        f"LoRA r{setup['lora']['r']}/α{setup['lora']['alpha']}, quant {setup['quant']['scheme']}, "
        f"swap TTA {'on' if setup['tta_swap'] else 'off'}. Total time {report['total_time_s']:.0f} s.",
        *([f"Base weights: {setup['base_model_note']}."] if setup.get("base_model_note") else []),
        "",
        f"Common reference: {report.get('common_reference', {}).get('note', 'n/a')}.",
        "",
        "| variant | CV log loss shipped | QiD vs common reference | own 16-bit reference "
        "| shipped − own reference "
        "| accuracy (shipped) | eval in training at the shipped step "
        "| train wall time (s) | train tokens/s | peak RSS (MB) | peak CUDA (MB) | trainable params "
        "| artifact (MB) | inference rows/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_variant_row(v) for v in report["variants"]]
    lines += _metric_lines(report)
    priors = sorted({round(run["prior_log_loss"], 4) for run in report["runs"]})
    lines += [
        "",
        f"Class-prior log loss on the same held-out rows: {', '.join(map(str, priors))} (uniform: 1.0986).",
        "",
        "Own 16-bit reference of each variant:",
        "",
        *[f"- `{v['variant']}`: {v.get('own_reference') or 'n/a'}" for v in report["variants"]],
        "",
        "## What ships",
        "",
        *_ship_lines(report),
        "## Definitions",
        "",
        *[f"- `{key}`: {text}" for key, text in report["definitions"].items()],
        "",
        *_per_fold_lines(report),
        *_provenance_lines(report),
    ]
    return "\n".join(lines)


def _variant_row(v: dict) -> str:
    """One variant's row of the comparison table."""
    return (
        f"| {v['variant']} | {_fmt(v['cv_log_loss_quantized'])} | {_fmt(v.get('qid_vs_common'))} "
        f"| {_fmt(v['cv_log_loss_16bit'])} | {_fmt(v.get('gap_vs_own_reference'))} "
        f"| {_fmt(v['accuracy_quantized'], 3)} | {_fmt(v['train_time_eval_log_loss'])} "
        f"| {_fmt(v['train_wall_time_s'], 1)} | {_fmt(v['train_tokens_per_s'], 0)} "
        f"| {_fmt(v['peak_rss_bytes'], 0, 1e6)} | {_fmt(v['peak_cuda_bytes'], 0, 1e6)} "
        f"| {_fmt(v['trainable_params'], 0)} | {_fmt(v['artifact_bytes'], 2, 1e6)} "
        f"| {_fmt(v['inference_rows_per_s'], 1)} |"
    )


def _per_fold_lines(report: dict) -> list[str]:
    """The per-fold table: each run's folds, both log losses, QiD vs common, the shipped step, the extras."""
    lines = [
        "## Per fold",
        "",
        "| variant | seed | fold | log loss own 16-bit reference | log loss shipped | QiD vs common "
        "| shipped step | extras |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        for fold in run["per_fold"]:
            extras = "; ".join(
                f"{k}: log loss {x['log_loss']:.4f}, largest probability change vs shipped "
                f"{x['max_abs_prob_diff_vs_shipped']:.4f}"
                for k, x in fold["extras"].items()
            )
            common = fold.get("qid_vs_common")
            lines.append(
                f"| {run['variant']} | {run['seed']} | {fold['fold']} | {fold['log_loss_16bit']:.4f} "
                f"| {fold['log_loss_quantized']:.4f} | {'n/a' if common is None else f'{common:+.4f}'} "
                f"| {fold['best_step']} | {extras or '-'} |"
            )
    return lines


def _provenance_lines(report: dict) -> list[str]:
    """The library versions, machine and (when described) the base model's identity."""
    env = report["environment"]
    lines = [
        "",
        f"Versions: torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env.get('peft', '?')}, bitsandbytes {env.get('bitsandbytes', '?')}; {env['date']}"
        + (
            f"; {env['cpu']} ({env['cores']} cores, {env['torch_threads']} torch threads)"
            if "cpu" in env
            else ""
        )
        + ".",
        "",
    ]
    model = report["setup"].get("model")
    if model:
        hashes = ", ".join(f"{name} {digest[:12]}" for name, digest in model["weights_sha256"].items())
        lines += [
            f"Model: {model['model_type']}, {model['parameters']:,} parameters, vocabulary "
            f"{model['vocab_size']:,}, stored {model['stored_dtype']}; weights sha256 {hashes}; "
            f"{model['origin']}.",
            "",
        ]
    return lines


def _ship_lines(report: dict) -> list[str]:
    ship = report.get("ship")
    if not ship:
        return ["No ship decision in this report.", ""]
    lines = [
        "Every candidate on the same OOF rows; calibrations and blend weights scored cross-fitted (fitted on "
        "the other prompt-group splits of the OOF rows), so no figure is the in-sample one its fit "
        "optimised.",
        "",
        "| rank | candidate | kind | complexity | CV log loss | note |",
        "|---|---|---|---|---|---|",
    ]
    for rank, candidate in enumerate(ship["ranking"], 1):
        complexity = candidate.get("complexity", "-")
        lines.append(
            f"| {rank} | {candidate['name']} | {candidate['kind']} | {complexity} "
            f"| {candidate['cv_log_loss']:.4f} | {candidate['note']} |"
        )
    if ship.get("selection_rule"):
        lines += ["", f"Rule: {ship['selection_rule']}."]
    return [
        *lines,
        "",
        f"**{ship['statement']}**; shipped: `{ship['artifact']}`.",
        "",
        f"![reliability]({ship.get('reliability_png', 'reliability.png')})",
        "",
    ]


def _metric_lines(report: dict) -> list[str]:
    """The competition metric per variant, when the dialect's metric is not log loss (WSDM: accuracy)."""
    dialect = report.get("dialect") or {}
    if not dialect or dialect.get("metric") == "log_loss":
        return []
    better = "higher" if dialect.get("higher_is_better") else "lower"
    lines = [
        "",
        f"Competition metric ({dialect['name']}): {dialect['metric']}, {better} is better "
        "(the winner above is chosen by log loss).",
        "",
        f"| variant | {dialect['metric']} shipped | {dialect['metric']} own 16-bit reference "
        "| secondary (shipped) |",
        "|---|---|---|---|",
    ]
    for v in report["variants"]:
        secondary = {}
        for run in report["runs"]:
            if run["variant"] == v["variant"]:
                for name, value in (run.get("cv_secondary_quantized") or {}).items():
                    secondary.setdefault(name, []).append(value)
        text = ", ".join(f"{name} {np.mean(values):.4f}" for name, values in secondary.items()) or "-"
        lines.append(
            f"| {v['variant']} | {_fmt(v.get('cv_metric_quantized'))} | {_fmt(v.get('cv_metric_16bit'))} "
            f"| {text} |"
        )
    return lines


def plot_report(report: ComparisonReport | dict, path: str | Path) -> Path:
    """Bar chart: CV log loss (16-bit vs quantized, ± std over seeds), QiD, training time, artifact size."""
    report = _serialised(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = [v["variant"] for v in variants]
    x = np.arange(len(names))

    def series(metric: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        means = np.array([(v.get(metric) or {}).get("mean", np.nan) / scale for v in variants], dtype=float)
        stds = np.array([((v.get(metric) or {}).get("std") or 0.0) / scale for v in variants], dtype=float)
        return means, stds

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    m16, s16 = series("cv_log_loss_16bit")
    mq, sq = series("cv_log_loss_quantized")
    axes[0].bar(x - 0.2, m16, 0.4, yerr=s16, label="own 16-bit reference", color="#4C72B0")
    axes[0].bar(x + 0.2, mq, 0.4, yerr=sq, label="quantized (shipped)", color="#DD8452")
    priors = [run["prior_log_loss"] for run in report["runs"]]
    axes[0].axhline(float(np.mean(priors)), color="grey", linestyle="--", label="class prior")
    low = np.nanmin(np.concatenate([m16 - s16, mq - sq, [np.mean(priors)]]))
    high = np.nanmax(np.concatenate([m16 + s16, mq + sq, [np.mean(priors)]]))
    axes[0].set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
    axes[0].set_title("CV log loss (lower is better)")
    axes[0].legend(fontsize=8)
    has_common = any(v.get("qid_vs_common") for v in variants)
    qid_metric, qid_title = (
        ("qid_vs_common", "QiD vs common 16-bit reference")
        if has_common
        else ("gap_vs_own_reference", "shipped - own 16-bit reference")
    )
    for axis, metric, title, scale in (
        (axes[1], qid_metric, qid_title, 1.0),
        (axes[2], "train_wall_time_s", "training wall time (s)", 1.0),
        (axes[3], "artifact_bytes", "artifact size (MB)", 1e6),
    ):
        means, stds = series(metric, scale)
        axis.bar(x, means, 0.6, yerr=stds, color="#55A868")
        axis.set_title(title)
        axis.axhline(0, color="black", linewidth=0.5)
    for axis in axes:
        axis.set_xticks(x)
        axis.set_xticklabels(names, rotation=15, fontsize=8)
    fig.suptitle(f"{report['decision']['statement']}\n{report['environment']['device']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(report: ComparisonReport | dict, path: str | Path) -> Path:
    """Held-out log loss at each evaluation step, one line per run and fold, against the class prior: shows
    whether a run was still improving when it stopped, or over-fitting. One run: titled with its variant."""
    report = _serialised(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    single = len(runs) == 1
    fig, axis = plt.subplots(figsize=(7, 4))
    for run in runs:
        for fold in run["per_fold"]:
            steps = [point["step"] for point in fold["history"]]
            losses = [point["eval_loss"] for point in fold["history"]]
            label = (
                f"fold {fold['fold']}"
                if single
                else f"{run['variant']} seed {run['seed']} fold {fold['fold']}"
            )
            axis.plot(steps, losses, marker="o", label=label)
    axis.axhline(runs[0]["prior_log_loss"], color="grey", linestyle="--", label="class prior")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("held-out log loss")
    if single:
        axis.set_title(f"{runs[0]['variant']}: evaluation during training")
        axis.legend()
    else:
        axis.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def artifact_table(report: ComparisonReport | dict) -> pl.DataFrame:
    """The shipped artifacts, one row per trained fold: fold, the artifact's held-out log loss, its folder."""
    report = _serialised(report)
    return pl.DataFrame(
        [
            {
                "fold": fold["fold"],
                "log_loss_quantized": fold["log_loss_quantized"],
                "artifact_dir": fold["artifact_dir"],
            }
            for run in report["runs"]
            for fold in run["per_fold"]
        ]
    )
