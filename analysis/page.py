"""The report as documents: a list of sections rendered to Markdown and to one HTML page.

The HTML page carries its images inline (base64 PNG, or GIF for animations), so it is a single
file a person can mail or open without a server; the Markdown links the image files beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .plots import Figure
from .tables import markdown_table


@dataclass
class Text:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Code:
    text: str
    language: str = ""
    folded: str | None = None  # shown folded under this line (HTML and Markdown <details>)


@dataclass
class Table:
    frame: pd.DataFrame
    highlight_column: str | None = None  # rows with a non-empty value here are emphasised


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)


def render_markdown(title: str, sections: list[Section], folder: Path) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Text):
                lines += [block.text, ""]
            elif isinstance(block, Bullets):
                lines += [f"- {item}" for item in block.items] + [""]
            elif isinstance(block, Code):
                fence = [f"```{block.language}", block.text.rstrip(), "```", ""]
                lines += fence if block.folded is None else \
                    [f"<details><summary>{html.escape(block.folded, quote=False)}</summary>", "", *fence, "</details>", ""]
            elif isinstance(block, Table):
                lines += [markdown_table(block.frame), ""]
            elif isinstance(block, Figure):
                lines += [f"### {block.title}", ""]
                if block.path is not None:
                    lines += [f"![{block.title}]({block.path.relative_to(folder).as_posix()})", ""]
                    lines += [f"*{block.caption}*", ""] if block.caption else []
                else:
                    lines += [f"*Not drawn: {block.skipped}.*", ""]
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: center; }
tr.best td { background: #fff4cc; font-weight: 600; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #eee; } figcaption { color: #555; font-size: 0.9em; }
.skipped { color: #885; font-style: italic; } .table-wrap { overflow-x: auto; }
summary { cursor: pointer; color: #335; }
"""


def _html_table(table: Table) -> str:
    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in table.frame.columns)
    rows = []
    for _, row in table.frame.iterrows():
        marked = table.highlight_column is not None and str(row[table.highlight_column]).strip() != ""
        cells = "".join(f"<td>{html.escape(str(value))}</td>" for value in row)
        opening = '<tr class="best">' if marked else "<tr>"
        rows.append(f"{opening}{cells}</tr>")
    return f'<div class="table-wrap"><table><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _html_figure(figure: Figure) -> str:
    heading = f"<h3>{html.escape(figure.title)}</h3>"
    if figure.path is None:
        return f'{heading}<p class="skipped">Not drawn: {html.escape(figure.skipped or "")}.</p>'
    encoded = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    kind = "gif" if figure.path.suffix.lower() == ".gif" else "png"
    caption = f"<figcaption>{html.escape(figure.caption)}</figcaption>" if figure.caption else ""
    return (f'{heading}<figure><img alt="{html.escape(figure.title)}" '
            f'src="data:image/{kind};base64,{encoded}">{caption}</figure>')


def render_html(title: str, sections: list[Section]) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Text):
                parts.append(f"<p>{html.escape(block.text)}</p>")
            elif isinstance(block, Bullets):
                parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.items) + "</ul>")
            elif isinstance(block, Code):
                code = f"<pre>{html.escape(block.text)}</pre>"
                parts.append(code if block.folded is None else
                             f"<details><summary>{html.escape(block.folded)}</summary>{code}</details>")
            elif isinstance(block, Table):
                parts.append(_html_table(block))
            elif isinstance(block, Figure):
                parts.append(_html_figure(block))
    parts.append("</body></html>")
    return "\n".join(parts)
