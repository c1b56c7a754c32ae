"""MkDocs hook: links from a docs page to repository files outside ``docs/``.

Pages such as ``capture.md`` link to ``../examples/custom_recurrence.py`` so that the link
works when the Markdown is read on a code host. The built site does not contain those files,
and ``mkdocs build --strict`` would fail on the dangling link. This hook rewrites every
relative link that leaves ``docs/`` to ``{repo_url}/blob/main/<path>`` when ``repo_url`` is
set in ``mkdocs.yml``, and otherwise to the path in code style (the link text is kept). Links
inside ``docs/`` are left alone and still checked by MkDocs.
"""

from __future__ import annotations

import posixpath
import re

_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    page_dir = posixpath.dirname(page.file.src_uri)
    repo_url = (config.get("repo_url") or "").rstrip("/")

    def rewrite(match: re.Match[str]) -> str:
        text, target, anchor = match.group(1), match.group(2), match.group(3) or ""
        path = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if not path.startswith("../") and not path.startswith("docs/"):
            if repo_url:
                return f"[{text}]({repo_url}/blob/main/{path}{anchor})"
            return text if text.startswith("`") else f"{text} (`{path}`)"
        return match.group(0)

    return _LINK.sub(rewrite, markdown)
