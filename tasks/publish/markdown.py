"""Text from outside the pipeline (batch file names, reasons that quote them, ``source`` values, keys and run ids
read from the store) placed in markdown: the summary artifact the Prefect UI renders, and the report's
``index.md``. Every such string goes through ``md_text``, so it reads as the characters it holds and never as
markup: no raw HTML (a raw ``<img>`` is rendered by both Prefect UIs), no image, link, emphasis, heading or table
cell boundary, and no line break.
"""

from __future__ import annotations

HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
# every ASCII punctuation character CommonMark and GitHub's extensions give a meaning to (emphasis, code, links and
# images, headings, lists, tables, strike-through, autolinks): a backslash makes each a literal character
MARKDOWN_ACTIVE = frozenset("\\`*_{}[]()#+-.!|~:@$")


def md_text(value: object) -> str:
    """``value`` as literal text in markdown (a table cell, a paragraph, a quote), on one line.

    HTML's special characters become entities, markdown's punctuation is backslash-escaped, and line breaks and
    other control characters become spaces, in one pass over the characters (nothing is escaped twice)."""
    out = []
    for char in str(value):
        if char in HTML_ENTITIES:
            out.append(HTML_ENTITIES[char])
        elif char in MARKDOWN_ACTIVE:
            out.append("\\" + char)
        elif char < " " or char == "\x7f" or char in "\u2028\u2029\x85":
            out.append(" ")
        else:
            out.append(char)
    return "".join(out)
