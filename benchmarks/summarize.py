"""One summary table from a pytest-benchmark JSON file (and optionally the GPU tests' JUnit XML).

usage: python benchmarks/summarize.py BENCH_JSON [BENCH_JSON ...] [--tests JUNIT_XML] [--markdown OUT_MD]
                                     [--merged OUT_JSON]

Rows are grouped by ``extra_info.group``; within a group every implementation is listed with its figure, and
ours (``internlm_kernels``) gets its ratio against each peer measured in the same run. A higher-is-better metric
(TFLOP/s, GB/s, tokens/s) compares values; ``ms`` compares inverse times.
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

OURS = "internlm_kernels"


def load_rows(data: dict) -> list[dict]:
    """The recorded rows (extra_info of benchmarks that called benchmarks.common.record) of one JSON document."""
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "group" not in info or "value" not in info:
            continue
        rows.append(info | {"test": b.get("fullname", b.get("name"))})
    return rows


def ratio_text(ours: dict, peer: dict) -> str:
    if ours["metric"] == "ms":
        r = peer["value"] / ours["value"]
    else:
        r = ours["value"] / peer["value"] if peer["value"] else float("inf")
    return f"{r:.2f}x vs {peer['impl']}"


def table(rows: list[dict]) -> list[str]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    lines = ["| group | impl | figure | ms | ours vs peer |", "|---|---|---|---|---|"]
    for group, members in groups.items():
        ours = next((m for m in members if m["impl"] == OURS), None)
        for m in sorted(members, key=lambda m: m["impl"] != OURS):
            ratios = ""
            if ours is not None and m is ours:
                ratios = "; ".join(ratio_text(ours, p) for p in members if p is not ours) or "no peer in this run"
            extra = f" ({m['note']})" if m.get("note") else ""
            lines.append(f"| {group} | {m['impl']}{extra} | {m['value']:.4g} {m['metric']} | {m['ms']:.4g} | {ratios} |")
    return lines


def test_summary(path: str) -> str:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    return (f"GPU tests: {passed} passed, {tot['failures']} failed, {tot['errors']} errors, "
            f"{tot['skipped']} skipped")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_json", nargs="+", help="pytest-benchmark JSON files of one run")
    ap.add_argument("--tests", help="JUnit XML of the GPU test run")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--merged", help="also write all benchmarks of the given files into one JSON file")
    args = ap.parse_args(argv)
    machine, rows, merged = {}, [], None
    for path in args.bench_json:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        rows += load_rows(data)
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data.get("benchmarks", [])
    if args.merged and merged is not None:
        with open(args.merged, "w") as f:
            json.dump(merged, f, indent=1)
    cards = sorted({r.get("card", "?") for r in rows})
    out = [f"Card: {', '.join(cards) or 'unknown'}; python {machine.get('python_version', '?')}", ""]
    if args.tests:
        out += [test_summary(args.tests), ""]
    out += table(rows) if rows else ["(no benchmark rows recorded)"]
    text = "\n".join(out)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
