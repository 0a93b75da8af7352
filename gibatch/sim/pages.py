"""HTML of the local site, shaped like the course site's pages (site-protocol.md)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape

from gibatch.sim.store import Section, Task, TaskStatus

# What a strict site calls a status (site-protocol.md section 3: other words for waiting
# work; only `Completed` means done).
STRICT_WORDS: Mapping[TaskStatus, str] = {TaskStatus.QUEUED: "Pending"}

_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:70em}"
    "table{border-collapse:collapse;margin-bottom:1em}"
    "td,th{border:1px solid #ccc;padding:.2em .6em}"
    ".gallery img{margin:.3em;border:1px solid #888}.error{color:#b00}"
)


def page(title: str, body: str, script: str = "") -> str:
    head = f"<script>{script}</script>" if script else ""
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style>{head}</head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )


def login_form(csrf: str, next_url: str, error: str = "") -> str:
    err = f"<p class='error'>{escape(error)}</p>" if error else ""
    return page("Log in", (
        f"{err}<form method='post' enctype='multipart/form-data'>"
        # Django's exact markup, double quotes included: scrapers match it literally.
        f'<input type="hidden" name="csrfmiddlewaretoken" value="{escape(csrf)}">'
        f"<input type='hidden' name='next' value='{escape(next_url)}'>"
        "<p><label>Username <input name='username'></label></p>"
        "<p><label>Password <input type='password' name='password'></label></p>"
        "<p><input type='submit' value='Log in'></p></form>"
    ))


def home(base: str, username: str, model_count: int) -> str:
    models = "".join(
        f"<li><a href='{base}/gi/view_data/{n}/'>Model {n}</a></li>"
        for n in range(1, model_count + 1)
    )
    return page("GI Simulator", (
        f"<p>Logged in as {escape(username)}. <a href='{base}/accounts/logout/'>Log out</a></p>"
        f"<p><a href='{base}/gi/view_jobs/'>Your jobs</a></p><ul>{models}</ul>"
    ))


def task_page(title: str, csrf: str) -> str:
    return page(
        title,
        "<p>Submit this task's parameters as JSON with the X-CSRFToken header.</p>",
        script=f'window.CSRF_TOKEN = "{escape(csrf)}";',
    )


def _word(status: TaskStatus, words: Mapping[TaskStatus, str] | None) -> str:
    return (words or {}).get(status, status.value)


def view_jobs(tasks: Iterable[Task], words: Mapping[TaskStatus, str] | None = None) -> str:
    rows = "".join(
        f"<tr><td>{t.job_id}</td><td>{escape(t.job_type)}</td><td>{t.model}</td>"
        f"<td>{_word(t.status, words)}</td><td>{escape(t.submitted)}</td></tr>"
        for t in tasks
    )
    # A Django template table: the course's script climbs th -> tr -> thead -> table and
    # takes that table's <tbody> (html.parser adds no implicit one), so both must be there.
    return page("Jobs", (
        "<table><thead><tr><th>Job ID</th><th>Job Type</th><th>Model Number</th>"
        f"<th>Status</th><th>Submitted</th></tr></thead><tbody>{rows}</tbody></table>"
    ))


def view_data(
    model: int, sections: Iterable[tuple[Section, list[tuple[str, str, int]]]],
    sizes: bool = True, words: Mapping[TaskStatus, str] | None = None,
) -> str:
    """One <h3> and <table> per section; rows hold (link, size in bytes unless not `sizes`)."""
    parts: list[str] = []
    thumbs: list[str] = []
    for section, files in sections:
        rows = "".join(
            f"<tr><td><a href='{escape(url)}'>{escape(name)}</a></td>"
            + (f"<td>{size}</td>" if sizes else "") + "</tr>"
            for name, url, size in files
        )
        parts.append(
            f"<h3>{escape(section.name)} - Status: {_word(section.status, words)}</h3>"
            f"<table>{rows}</table>"
        )
        urls = {name: url for name, url, _ in files}
        if "thumbnail.png" in urls:
            target = urls.get("animation.gif", urls["thumbnail.png"])
            thumbs.append(
                f"<a href='{escape(target)}'><img src='{escape(urls['thumbnail.png'])}' "
                f"alt='{escape(section.name)}' title='{escape(section.name)}'></a>"
            )
    gallery = f"<div class='gallery'>{''.join(thumbs)}</div>" if thumbs else ""
    return page(f"Model {model}", gallery + ("".join(parts) or "<p>No results yet.</p>"))
