"""The README's walkthrough shows the effect of each change it makes (issue 18, item 8):
every `route apply`, `route delete` or `inject-fault` is followed by a curl that shows
what changed, before the next change. (Run for real: tests/e2e/test_istio_tasks.py.)"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[2] / "README.md"


def walkthrough() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Using it"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no sh block under 'Using it'"
    lines, cont = [], ""
    for line in block.group(1).splitlines():
        line = cont + line.strip()
        cont = line[:-1] + " " if line.endswith("\\") else ""
        if not cont and line and not line.startswith("#"):
            lines.append(line)
    return lines


def is_change(line: str) -> bool:
    return bool(re.search(r"meshctl (route (apply|delete)|inject-fault (?!list)\S)", line))


def test_each_change_in_the_walkthrough_is_followed_by_a_look_at_its_effect():
    lines = walkthrough()
    changes = [i for i, line in enumerate(lines) if is_change(line)]
    assert len(changes) >= 5
    for n, i in enumerate(changes):
        until = changes[n + 1] if n + 1 < len(changes) else len(lines)
        between = lines[i + 1:until]
        if "inject-fault clear" in lines[i] or "route delete" in lines[i]:
            continue  # undoing a change: the next step shows the mesh without it
        assert any(line.startswith(("curl", "time curl")) for line in between), (
            f"README: {lines[i]!r} changes the mesh, but no curl shows the effect before {lines[until] if until < len(lines) else 'the end'!r}")


def test_the_abort_task_is_not_hidden_behind_an_injected_delay():
    lines = walkthrough()
    abort = next(i for i, line in enumerate(lines) if "ratings-test-abort" in line)
    delay = next(i for i, line in enumerate(lines) if "inject-fault ratings --delay" in line)
    cleared = [i for i, line in enumerate(lines) if "inject-fault clear" in line]
    # the abort is applied when no injected delay is in force on ratings
    assert abort < delay or any(delay < c < abort for c in cleared)
