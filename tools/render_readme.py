"""README.md from docs/README.template.md: every figure is read from a results JSON, none typed.

A placeholder is `{{FILE:PATH|FORMAT}}`: FILE names `bench/results/FILE.json`, PATH is a
dotted path into it (list items by index; a key that holds dots is written in single quotes),
FORMAT one of FORMATS below. `{{table:NAME}}` is a whole table built by a function of TABLES.
`tests/test_readme.py` renders the template again and fails when README.md differs.

    python tools/render_readme.py           # writes README.md
    python tools/render_readme.py --check   # exit 1 if README.md is not what the files say
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "docs" / "README.template.md"
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
PLACEHOLDER = re.compile(r"\{\{([a-z_]+):([^|}]+)(?:\|([a-z0-9_]+))?\}\}")
SEGMENT = re.compile(r"'([^']*)'|([^.]+)")


def _sci(v: float) -> str:
    mantissa, exponent = f"{v:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"  # 7e-8, not 7e-08


FORMATS: dict[str, Callable[[float], str]] = {
    "pct0": lambda v: f"{100 * v:.0f} %",
    "pct1": lambda v: f"{100 * v:.1f} %",
    "pts1": lambda v: f"{100 * v:+.1f}",  # a difference of two rates, in points
    "ptsneg1": lambda v: f"{-100 * v:+.1f}",  # a loss in points, shown as the change
    "int": lambda v: f"{v:,.0f}",
    "f1": lambda v: f"{v:.1f}",
    "f2": lambda v: f"{v:.2f}",
    "x1": lambda v: f"{v:.1f}×",
    "x2": lambda v: f"{v:.2f}×",
    "ms0": lambda v: f"{1000 * v:.0f}",  # seconds → milliseconds
    "bn2": lambda v: f"{v / 1e9:.2f} B",  # a count in billions
    "mn1": lambda v: f"{v / 1e6:.1f} M",  # a count in millions
    "sci0": _sci,
    "str": str,
}


@cache
def results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def lookup(name: str, path: str) -> object:
    value: object = results(name)
    for quoted, plain in SEGMENT.findall(path):
        key = quoted or plain
        value = value[int(key)] if isinstance(value, list) else value[key]  # type: ignore[index]
    return value


ERRORS_HEADER = "errors (early EOS / too long / wrong characters)"


def _figures(r: dict) -> str:
    """Exact match (per kind, sorted by name) | TPF | repeated 3-grams | error classes: one
    model's columns (a TPF never without its repetition: a stuttering decoder looks fast)."""
    kinds = " / ".join(f"{100 * v:.0f}" for _, v in sorted(r["per_task"].items()))
    e = r["errors"]
    return (
        f"{100 * r['accuracy']:.1f} % ({kinds}) | {r['tokens_per_forward']:.2f} | "
        f"{100 * r['repeated_3gram_share']:.1f} % | "
        f"{e['early_eos']} / {e['too_long']} / {e['wrong_characters']}"
    )


FIGURES_HEADER = f"TPF | repeated 3-grams | {ERRORS_HEADER}"


def decode_models() -> str:
    """The decode bench's models, in the order of its `table`."""
    d = results("decode")
    kinds = " / ".join(sorted(d["setup"]["kinds"]))
    rows = [f"| model | decode | exact match ({kinds}) | {FIGURES_HEADER} |", "|---" * 6 + "|"]
    for key, label, how in d["table"]:
        rows.append(f"| {label} | {how} | {_figures(d['results'][key])} |")
    return "\n".join(rows)


def editing_modes() -> str:
    """bench/editing.py: each model (trained with or without editing) in each decoding mode."""
    d = results("editing")
    kinds = " / ".join(sorted(d["setup"]["kinds"]))
    rows = [f"| trained with | decode | exact match ({kinds}) | {FIGURES_HEADER} | edits | "
            "edit-only forwards per block (mean / p99) |", "|---" * 8 + "|"]  # fmt: skip
    for key, trained, how in d["table"]:
        r = d["results"][key]
        post = f"{r['post_edit_forwards_mean']:.2f} / {r['post_edit_forwards_p99']:.0f}"
        rows.append(f"| {trained} | {how} | {_figures(r)} | {r['edits']} | {post} |")
    return "\n".join(rows)


def targets(bench: str) -> str:
    """A bench's `targets`, one row each."""
    rows = ["| target | value | goal | met |", "|---|---|---|---|"]
    for name, t in results(bench)["targets"].items():
        value = "–" if t["value"] is None else f"{t['value']:.3f}"
        sign = "≥ " if t["higher_is_better"] else "≤ "
        goal = "reported" if t["goal"] is None else f"{sign}{t['goal']}"
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        rows.append(f"| `{name}` | {value} | {goal} | {met} |")
    return "\n".join(rows)


def levers() -> str:
    """bench/levers.py: each variant's models beside the base's (`cpt_1x`)."""
    d = results("levers")
    kinds = " / ".join(sorted(d["kinds"]))
    rows = [f"| lever | CPT tokens | stage | exact match ({kinds}) | {FIGURES_HEADER} |",
            "|---" * 7 + "|"]  # fmt: skip
    for r in d["rows"]:
        rows.append(f"| {r['lever']} | {r['cpt_tokens']:,} | {r['stage']} | {_figures(r)} |")
    return "\n".join(rows)


TABLES: dict[str, Callable[[], str]] = {
    "decode_models": decode_models,
    "decode_targets": lambda: targets("decode"),
    "editing_modes": editing_modes,
    "editing_targets": lambda: targets("editing"),
    "levers": levers,
}


def render(template: str) -> str:
    def one(m: re.Match) -> str:
        name, path, fmt = m.group(1), m.group(2), m.group(3) or "str"
        if name == "table":
            return TABLES[path]()
        return FORMATS[fmt](lookup(name, path))  # type: ignore[arg-type]

    return PLACEHOLDER.sub(one, template)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args()
    rendered = render(TEMPLATE.read_text())
    if args.check:
        if README.read_text() != rendered:
            print("README.md differs from its template and bench/results: run "
                  "python tools/render_readme.py", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    README.write_text(rendered)
    print(f"wrote {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
