"""What the Chromium tests share: Debian's chromium driven by Playwright, the
artefacts directory (kept by CI), logging in, and the layout checks every
page goes through (nothing wider than the screen, no table cell's word
broken mid-word, no serious or critical axe-core finding). The browser_page
fixture (a logged-out page in a fresh Chromium) is in tests/conftest.py."""

from django.contrib.auth.models import User
from playwright.sync_api import expect

from tests.helpers import PROJECT_ROOT, user_with_role

ARTIFACTS = PROJECT_ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def log_in(page, live_server, role="administrator"):
    """Log in as a user named after their role: these tests press every
    button, live failover and sources included (tests/test_roles.py checks
    what each role may not press)."""
    if not User.objects.filter(username=role).exists():  # a second browser context logs in again
        user_with_role(role, role)
    page.goto(f"{live_server.url}/")
    assert "/login/" in page.url
    page.fill("#id_username", role)
    page.fill("#id_password", "s3cret-pass")
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Replication dashboard")


def error_beside(page, field: str):
    """The .invalid-feedback beside a form field, by the field's name."""
    return page.locator(f'[data-error="{field}"]')


PHONE = {"width": 390, "height": 844}
SCREENS = ARTIFACTS / "screens"
DESKTOP = {"width": 1280, "height": 900}

# Elements that stick out of the viewport, outside any box that scrolls or
# clips them (a .table-responsive scrolls its table: that is its job).
WIDER_THAN_THE_VIEWPORT = """() => {
  const vw = document.documentElement.clientWidth, out = [];
  const describe = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
    (el.className && typeof el.className === "string" ? "." + el.className.trim().split(/\\s+/).join(".") : "");
  for (const el of document.body.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.width <= 1 || (r.left >= -0.5 && r.right <= vw + 0.5)) continue;  // 1 px: visually hidden
    let p = el.parentElement, inside = false;
    for (; p && p !== document.body; p = p.parentElement) {
      if (getComputedStyle(p).overflowX !== "visible") { inside = true; break; }
    }
    if (!inside) out.push(`${describe(el)} spans ${Math.round(r.left)}..${Math.round(r.right)} px`);
  }
  return out;
}"""

# Words of table cells broken mid-word ("Compl|eted"): a word (split at
# spaces and at the places a browser may break: hyphens, slashes) whose text
# lies on more than one line, or is wider than its cell's box.
WORDS_BROKEN_IN_CELLS = """() => {
  const out = [];
  for (const cell of document.querySelectorAll("main td, main th")) {
    const box = cell.getBoundingClientRect();
    if (!cell.getClientRects().length || box.width <= 1) continue;  // 1 px: visually hidden (a stacked head)
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (node.parentElement.closest(".visually-hidden")) continue;  // read out, never seen
      const words = /[^\\s\\-\\/]+/g;
      for (let m = words.exec(node.data); m; m = words.exec(node.data)) {
        const range = document.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const rects = Array.from(range.getClientRects()).filter((r) => r.width > 0);
        if (!rects.length) continue;
        const lines = new Set(rects.map((r) => Math.round(r.bottom)));
        const width = rects.reduce((sum, r) => sum + r.width, 0);
        if (lines.size > 1 || width > box.width + 0.5) {
          out.push(`"${m[0]}" (${Math.round(width)} px, cell ${Math.round(box.width)} px, ${lines.size} line(s)) in ` +
                   `"${cell.textContent.trim().replace(/\\s+/g, " ").slice(0, 80)}"`);
        }
      }
    }
  }
  return out;
}"""

# Tables that scroll sideways at a desktop width: a column the operator has
# to scroll to find.
TABLES_THAT_SCROLL = """() => Array.from(document.querySelectorAll("main .table-responsive"))
  .filter((box) => box.scrollWidth > box.clientWidth + 1)
  .map((box) => `${box.querySelector("th") ? box.querySelector("thead").textContent.trim().replace(/\\s+/g, " ")
    .slice(0, 60) : "a table"}: ${box.scrollWidth} px in ${box.clientWidth} px`)"""


def axe_violations(page, live_server=None):
    """axe-core (from node_modules, on the tests' static path) run in the page:
    its serious and critical findings."""
    origin = live_server.url if live_server else page.evaluate("location.origin")
    page.add_script_tag(url=f"{origin}/static/axe-core/axe.min.js")
    results = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
    return [f"{v['id']} ({v['impact']}): {v['help']} at " + ", ".join(" ".join(n["target"]) for n in v["nodes"][:3])
            for v in results["violations"] if v["impact"] in ("serious", "critical")]


def layout_findings(page, width, mid_word=True) -> list[str]:
    """What sticks out of a `width` px screen, and (mid_word) the table
    cells' words broken mid-word."""
    found = [f"wider than {width} px: {e}" for e in page.evaluate(WIDER_THAN_THE_VIEWPORT)]
    scroll = page.evaluate("document.documentElement.scrollWidth")
    if scroll > width:
        found.append(f"the page is {scroll} px wide")
    if mid_word:
        found += [f"broken mid-word: {e}" for e in page.evaluate(WORDS_BROKEN_IN_CELLS)]
    return found


def check_page(page, live_server, name, width, findings):
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(SCREENS / f"{name}-{width}.png"), full_page=True)
    found = layout_findings(page, width)
    if width >= DESKTOP["width"]:
        found += [f"scrolls sideways: {e}" for e in page.evaluate(TABLES_THAT_SCROLL)]
    found += [f"axe: {e}" for e in axe_violations(page, live_server)]
    findings += [f"{name} at {width} px: {e}" for e in found]


def at_both_widths(page, name):
    """The page as it stands at 1280 and at 390 px: a screenshot of each into
    test-artifacts/screens/, the overflow and mid-word checks and axe-core
    (no serious or critical finding) at each;
    the viewport is set back to what it was. Asserts nothing is found."""
    SCREENS.mkdir(parents=True, exist_ok=True)
    was = page.viewport_size
    findings = []
    try:
        for viewport in (DESKTOP, PHONE):
            page.set_viewport_size(viewport)
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(SCREENS / f"{name}-{viewport['width']}.png"), full_page=True)
            found = layout_findings(page, viewport["width"]) + [f"axe: {e}" for e in axe_violations(page)]
            findings += [f"{name} at {viewport['width']} px: {e}" for e in found]
    finally:
        page.set_viewport_size(was)
    assert not findings, "\n".join(findings)
