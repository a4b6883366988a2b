"""The Compare view part of tests/test_browser.py: pick two runs in its dropdowns and check that the summary,
the per-class chart and the flipped-examples gallery change to the new pair."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

# In the page: the last Compare view (class uvclab-compare); its dropdown values and options, the summary text
# and the src of the per-class chart, gallery and structure images.
JS_COMPARE = """() => {
  const boxes = document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .uvclab-compare');
  const box = boxes[boxes.length - 1];
  if (!box) return null;
  box.setAttribute('data-uvclab-compare', '1');
  const img = c => { const i = box.querySelector('.' + c + ' img'); return i ? i.getAttribute('src') : null; };
  const sel = c => box.querySelector('.' + c + ' select');
  const summary = box.querySelector('.uvclab-compare-summary');
  return {summary: summary ? summary.innerText : null, classes: img('uvclab-compare-classes'),
          gallery: img('uvclab-compare-gallery'), structure: img('uvclab-compare-structure'),
          a: sel('uvclab-compare-a') ? sel('uvclab-compare-a').value : null,
          b: sel('uvclab-compare-b') ? sel('uvclab-compare-b').value : null,
          options: sel('uvclab-compare-a') ? [...sel('uvclab-compare-a').options].map(o => o.textContent) : []};
}"""


def _wait(session, ok, what: str, cap: float) -> dict:
    end = time.monotonic() + session.deadline.left(cap)
    st = None
    while time.monotonic() < end:
        st = session.page.evaluate(JS_COMPARE)
        if st and ok(st):
            return st
        session.page.wait_for_timeout(300)
    raise AssertionError(f"compare view: no {what} within {cap:.0f} s; last state: {st and st['summary']!r}")


def _top1(summary: str, side: str) -> float:
    m = re.search(r"([\d.]+)\s*\n\s*" + side + r" top-1 % \(", summary)
    assert m, f"no {side} top-1 card in the compare summary:\n{summary}"
    return float(m.group(1))


def check_compare_view(session, runs: dict, artifacts: Path, cap: float) -> str:
    """Select A = the magnitude run and B = a UVC run other than the current B; check what changed."""
    ready = lambda s: (s["summary"] and "agreement" in s["summary"] and s["classes"] and s["gallery"]  # noqa: E731
                       and s["structure"])
    before = _wait(session, ready, "comparison shown", cap)
    box = session.page.locator("[data-uvclab-compare]")
    box.scroll_into_view_if_needed(timeout=session.deadline.ms(10))
    box.screenshot(path=str(artifacts / "browser-compare-before.png"), timeout=session.deadline.ms(20))
    plain = lambda text: (text or "").replace("\xa0", " ")   # noqa: E731  ipywidgets shows spaces as nbsp
    by_folder = {name: next(o for o in before["options"] if plain(o).startswith(name + " ")) for name in runs}
    new_a = by_folder["baselines/magnitude_b0.50"]
    new_b = next(o for n, o in by_folder.items() if n.startswith("sweep/") and plain(o) != plain(before["b"]))
    session.log(f"compare view: A {plain(before['a'])!r} -> {plain(new_a)!r}, B {plain(before['b'])!r} -> {plain(new_b)!r}")
    box.locator(".uvclab-compare-a select").select_option(label=new_a, timeout=session.deadline.ms(10))
    box.locator(".uvclab-compare-b select").select_option(label=new_b, timeout=session.deadline.ms(10))
    name_a, name_b = (Path(runs[plain(o).split(" ")[0]]).name for o in (new_a, new_b))
    followed = lambda s: (ready(s) and f"({name_a})" in s["summary"] and f"({name_b})" in s["summary"]  # noqa: E731
                          and s["classes"] != before["classes"] and s["gallery"] != before["gallery"])
    while True:                                            # settled: the same for 1 s (no queued render left)
        after = _wait(session, followed, "per-class chart and gallery of the new pair", cap)
        session.page.wait_for_timeout(1000)
        again = session.page.evaluate(JS_COMPARE)
        if (again["summary"], again["classes"], again["gallery"]) == (after["summary"], after["classes"], after["gallery"]):
            break
    box.screenshot(path=str(artifacts / "browser-compare-after.png"), timeout=session.deadline.ms(20))
    assert (plain(after["a"]), plain(after["b"])) == (plain(new_a), plain(new_b))
    for side, opt in (("A", new_a), ("B", new_b)):         # the cards show the chosen runs' own test accuracy
        report = json.loads((runs[plain(opt).split(" ")[0]] / "report.json").read_text())
        assert abs(_top1(after["summary"], side) - report["top1"]) < 0.006, (side, after["summary"])
    assert after["classes"] != before["classes"] and after["gallery"] != before["gallery"]
    assert after["structure"] != before["structure"], "the structure difference did not follow"
    return (f"A {name_a} {_top1(after['summary'], 'A'):.2f} %, B {name_b} {_top1(after['summary'], 'B'):.2f} %: "
            "summary, per-class chart, gallery and structure figure changed")
