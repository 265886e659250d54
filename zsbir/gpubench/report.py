"""The two reports of `bench gpu`: report.json (everything) and report.md (for people).

Both are written atomically (temporary file + rename), so a run killed at any moment
leaves the last complete version of each.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

JSON_NAME, MARKDOWN_NAME = "report.json", "report.md"


def write_reports(report: dict, out_dir: Path) -> None:
    _write_atomic(Path(out_dir) / JSON_NAME, json.dumps(report, indent=2, default=str) + "\n")
    _write_atomic(Path(out_dir) / MARKDOWN_NAME, render_markdown(report))


def render_markdown(report: dict) -> str:
    env = _environment(report)
    mode = "dry run (CPU, tiny sizes: checks the command, measures no goal)" if report.get("dry_run") else "GPU run"
    state = (f"finished in {report['seconds']} s" if report.get("finished")
             else f"interrupted ({report['interrupted']})" if report.get("interrupted") else "in progress or cut short")
    lines = [
        "# GPU acceptance report (`python -m zsbir.bench gpu`)", "",
        f"- mode: {mode}; budget {report.get('budget_s')} s; {state}",
        f"- started {report.get('started')}, last written {report.get('updated')}",
        f"- command: `{report.get('command')}`; commit {report.get('commit')}",
        f"- machine: {report.get('host')}, {env.get('cpu', report.get('cpu', '?'))}",
        f"- device: {env.get('device', 'not recorded yet')}; driver {env.get('driver', '?')}; "
        f"torch {env.get('torch', '?')} (CUDA {env.get('cuda', '?')}); python {report.get('python')}",
        f"- weights: {report.get('weights_note', '')}", "",
        "## Goals", "",
        "| section | goal | target | measured | verdict |",
        "|---|---|---|---|---|",
    ]
    for section in report["sections"]:
        for row in section["goals"]:
            lines.append(f"| {section['key']} | {row['goal']} | {row['target']} | {_cell(row['measured'])} | "
                         f"{row['verdict']} |")
    for section in report["sections"]:
        lines += ["", f"## {section['key']}. {section['title']}", "",
                  f"status: **{section['status']}**" + (f", {section['seconds']} s of a {section['cap_s']} s cap"
                                                        if section.get("cap_s") is not None else "")]
        for item in section["items"]:
            lines.append("")
            lines.append(f"- **{item['name']}**: {item['status']}" + _item_detail(item))
            for name, value in item.get("records", {}).items():
                lines.append(f"  - {name}: {_cell(value)}")
            if item.get("log_tail"):
                lines += ["", "  ```", *("  " + line for line in item["log_tail"].splitlines()), "  ```"]
    return "\n".join(lines) + "\n"


def _environment(report: dict) -> dict:
    for section in report["sections"]:
        for item in section["items"]:
            if "environment" in item.get("records", {}):
                return item["records"]["environment"]
    return {}


def _item_detail(item: dict) -> str:
    parts = []
    if item.get("seconds") is not None:
        parts.append(f"{item['seconds']} s" + (f" of a {item['cap_s']} s cap" if item.get("cap_s") else "")
                     + (f", {item['cpu_s']} CPU s" if item.get("cpu_s") is not None else ""))
    for key in ("reason", "error"):
        if item.get(key):
            parts.append(f"{key}: {item[key]}")
    return (" (" + "; ".join(parts) + ")") if parts else ""


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value).replace("|", "/").replace("\n", " ")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
