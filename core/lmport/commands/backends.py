"""``lmport backends``: which backend plugins were found, which one is active and why, and its flags."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "backends",
        help="list backend plugins, the active backend and its capability flags",
        description="List discovered lmport plugins, the backend this machine would use and why, "
        "and that backend's capability flags.",
    )
    parser.add_argument("--backend", default=None, help="select this backend, as `lmport launch --backend` would")
    parser.add_argument("--json", action="store_true", help="print one JSON object for machines")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from lmport.capabilities import CapabilityError
    from lmport.plugins import PluginError, PluginHost

    out = out or sys.stdout
    host = PluginHost().load()
    error = None
    try:
        host.select_backend(args.backend)
        host.capabilities()
    except (PluginError, CapabilityError) as exc:
        error = str(exc)
    report = host.report()
    if error:
        report["error"] = error
    if args.json:
        json.dump(report, out, indent=2, default=str)
        out.write("\n")
    else:
        out.write(format_report(report))
    return 1 if error else 0


def format_report(report: dict[str, Any]) -> str:
    lines = ["Plugins:"]
    rows = [("NAME", "GROUP", "DISTRIBUTION", "VERSION", "STATUS")]
    for plugin in report["plugins"]:
        status = "active" if plugin.get("active") else "loaded"
        if plugin["disabled"]:
            status = "disabled"
        elif plugin["error"]:
            status = f"error: {plugin['error']}"
        rows.append(
            (plugin["name"], plugin["group"], plugin["distribution"] or "-", plugin["version"] or "-", status)
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    for row in rows:
        lines.append("  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    active = report.get("active")
    if report.get("error"):
        lines += ["", f"No active backend: {report['error']}"]
    if active:
        backend = active["backend"]
        lines += [
            "",
            f"Active backend: {backend['name']} ({backend['description'] or backend['device_type']})",
            f"  chosen because: {active['reason']}",
            f"  detected: {', '.join(active['detected'])}",
            "",
            "Capabilities:",
        ]
        for key, value in active["capabilities"].items():
            if isinstance(value, list):
                value = ", ".join(map(str, value)) or "-"
            if key != "notes":
                lines.append(f"  {key:<26} {value}")
        for note in active["capabilities"]["notes"]:
            lines.append(f"  note: {note}")
        lines += ["", "Engine plan (what the engine does with these flags):"]
        for flag, action in active.get("engine_plan", []):
            lines.append(f"  {flag:<26} {action}")
    return "\n".join(lines) + "\n"
