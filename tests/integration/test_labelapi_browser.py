"""The reviewer page in headless Chromium, keyboard only: a CST page verified as a
gallery, single cells, skip, undo, the field context and the focused-button rule.

Keystrokes per label are counted by the test (every key it sends) and by the page
(its keydown listener), compared, and printed: gallery against single-cell mode.
With ``BMCELL_DOCS_SCREENSHOTS=1`` the screenshots of both modes are written to
docs/img/ (what docs/labelapi.md shows).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from bmcell import tls
from bmcell.stack.config import REPO
from bmcell.synth import lab_style, render_crop
from bmcell.synth.field import render_field
from bmcell.taxonomy import DEFAULT_TAXONOMY
from tests.integration import test_labelapi as shared
from tests.integration.seed import png
from tests.integration.test_labelapi import Seeder, client

pytestmark = [pytest.mark.integration, pytest.mark.browser]
api_url, db, seed, store = shared.api_url, shared.db, shared.seed, shared.store

CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def _trust_the_stack() -> tuple[str, ...]:
    """Chromium's flag that trusts the stack's server key, and only it: the page is
    served over HTTPS by a certificate of the stack's own CA, which no browser knows."""
    settings = tls.settings()
    if not tls.enabled(settings):
        return ()
    cert = x509.load_pem_x509_certificate(settings.tls_cert.read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    return (f"--ignore-certificate-errors-spki-list={pin}",)


@pytest.fixture
def browser(stack_env) -> Iterator[webdriver.Chrome]:
    with tempfile.TemporaryDirectory(prefix="bmcell-chrome-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        flags = (*CHROME_FLAGS, *_trust_the_stack(), f"--user-data-dir={profile}")
        for flag in (*flags, "--window-size=1200,900"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            yield driver
        finally:
            driver.quit()


KEY_OF = dict(zip(DEFAULT_TAXONOMY.codes, "1234567890qwertyu", strict=True))
SHOTS = REPO / "docs" / "img"


class Waiter(WebDriverWait):
    """WebDriverWait whose timeout says what the page said: its status line and the
    browser console (a script error is otherwise invisible)."""

    def __init__(self, browser: webdriver.Chrome) -> None:
        super().__init__(browser, 60)  # generous: the test machine may be loaded
        self.browser = browser

    def until(self, method, message: str = ""):
        try:
            return super().until(method, message)
        except TimeoutException:
            status = self.browser.find_element(By.ID, "status").text
            console = [e["message"] for e in self.browser.get_log("browser")]
            raise AssertionError(f"page status {status!r}; console {console}") from None


class Page:
    """The reviewer page in one browser: sign in, send keys (counted), read state."""

    def __init__(self, browser: webdriver.Chrome, api_url: str) -> None:
        self.b = browser
        self.url = api_url
        self.wait = Waiter(browser)
        self.sent = 0

    def sign_in(self, token: str) -> None:
        self.b.get(self.url + "/")
        self.b.execute_script("sessionStorage.clear(); localStorage.clear()")
        self.b.get(self.url + "/")
        field = self.wait.until(lambda d: d.find_element(By.ID, "token-input"))
        field.send_keys(token, Keys.ENTER)
        self.wait.until(lambda d: d.find_element(By.ID, "review").is_displayed())

    def keys(self, *keys: str) -> None:
        """Each key to whatever has the focus, as a person would press it."""
        for key in keys:
            ActionChains(self.b).send_keys(key).perform()
            self.sent += 1

    def page_keystrokes(self) -> int:
        return self.b.execute_script("return window.bmcellKeystrokes()")

    def gallery_tiles(self, n: int) -> list:
        def ready(d):
            tiles = d.find_elements(By.CSS_SELECTOR, "#tiles .tile")
            loaded = d.execute_script(
                "return [...document.querySelectorAll('#tiles img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
            shown = d.find_element(By.ID, "gallery").is_displayed()
            return tiles if shown and len(tiles) == n and loaded else False

        return self.wait.until(ready)

    def shown_task(self) -> str:
        def shown(d):
            el = d.find_element(By.ID, "task")
            img = d.find_element(By.ID, "cell-image")
            ok = d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
            return el.is_displayed() and ok and el.get_attribute("data-task-id")

        return self.wait.until(shown)

    def wait_task(self, task_id: int) -> None:
        self.wait.until(lambda d: self.shown_task() == str(task_id))

    def wait_empty(self) -> None:
        self.wait.until(lambda d: d.find_element(By.ID, "empty").is_displayed())

    def status(self) -> str:
        return self.b.find_element(By.ID, "status").text

    def screenshot(self, name: str) -> None:
        if os.environ.get("BMCELL_DOCS_SCREENSHOTS") == "1":
            SHOTS.mkdir(parents=True, exist_ok=True)
            self.b.save_screenshot(str(SHOTS / name))


def _arrows(src: int, dst: int, cols: int) -> list[str]:
    """The fewest arrow presses from tile ``src`` to tile ``dst`` in a grid of ``cols``."""
    rows = dst // cols - src // cols
    across = dst % cols - src % cols
    return [Keys.ARROW_DOWN if rows > 0 else Keys.ARROW_UP] * abs(rows) + [
        Keys.ARROW_RIGHT if across > 0 else Keys.ARROW_LEFT
    ] * abs(across)


def _labels(db: psycopg.Connection, cells: list[int]) -> dict[int, str | None]:
    rows = db.execute(
        """SELECT c.id, coalesce(l.class_code, c.status) AS verdict FROM cells c
             LEFT JOIN labels l ON l.cell_id = c.id WHERE c.id = ANY(%s)""",
        (cells,),
    ).fetchall()
    return {r["id"]: r["verdict"] for r in rows}


def test_gallery_verify_against_single_cell_with_the_keyboard(
    browser: webdriver.Chrome, seed: Seeder, db: psycopg.Connection, api_url: str
) -> None:
    """24 CST cells suggested MB, 3 outliers (PCEB, LY, too difficult), one page, keys
    only; then 6 CST cells one at a time (1 outlier) for the comparison, and a class
    button focused + Enter answering that class (not the suggestion)."""
    lab_id, code = seed.lab("gal")
    rnd = seed.round(number=2)
    cells = seed.cells(lab_id, 24)
    seed.tasks(cells, kind="cst", round_id=rnd)
    _synth_crops(
        seed, cells, ["MB"] * 3 + ["PCEB"] + ["MB"] * 6 + ["LY"] + ["MB"] * 6 + ["ART"] + ["MB"] * 6
    )
    _, token = seed.user("gal", "reviewer", [code])
    page = Page(browser, api_url)
    page.sign_in(token)

    tiles = page.gallery_tiles(24)
    title = browser.find_element(By.ID, "gallery-title").text
    assert "24 CST cells suggested as MB (myeloblast)" in title
    # The suggestion is in the text of every tile, not only in a colour.
    assert all("✓ MB (suggested)" in t.text for t in tiles)
    assert browser.switch_to.active_element == tiles[0]  # the arrows work at once
    # The leases' countdown (BMCELL_LEASE_SECONDS is 300 in the test stack): at most
    # 5:00, and not much less whatever the machine's load.
    countdown = browser.find_element(By.ID, "countdown").text
    assert re.fullmatch(r"lease: (5:00|[34]:[0-5]\d) left", countdown), countdown
    cols = int(browser.find_element(By.ID, "tiles").get_attribute("data-cols"))
    assert 2 <= cols <= 12
    intended = dict.fromkeys(cells, "MB")
    outliers = {3: "PCEB", 10: "LY", 17: None}  # None: too difficult
    before = page.page_keystrokes()
    at = 0
    for index, cls in outliers.items():
        page.keys(*_arrows(at, index, cols))
        page.keys(KEY_OF[cls] if cls else "d")
        at = index
        intended[cells[index]] = cls or "difficult"
    marked = browser.find_elements(By.CSS_SELECTOR, "#tiles .tile")
    assert "✎ PCEB (changed)" in marked[3].text and "✗ too difficult" in marked[17].text
    page.screenshot("reviewer-gallery.png")
    page.keys("a")  # accepts the page: 21 confirmations and the 3 outliers
    page.wait_empty()
    gallery_keys = page.sent
    assert page.page_keystrokes() - before == gallery_keys
    assert _labels(db, cells) == intended
    assert "24 answered" in page.status()

    # The same work one cell at a time: 6 CST cells, the 4th an outlier (PCEB).
    more = seed.cells(lab_id, 7)
    single_tasks = seed.tasks(more, kind="cst", round_id=rnd)
    Select(browser.find_element(By.ID, "kind-picker")).select_by_value("cst-single")
    page.wait_task(single_tasks[0])
    assert "Suggested: MB ★" in browser.find_element(By.ID, "suggestion").text
    buttons = browser.find_elements(By.CSS_SELECTOR, "#classes button")
    assert len(buttons) == 17 and "PCEB" in buttons[1].text and "2" in buttons[1].text
    suggested = browser.find_element(By.CSS_SELECTOR, "#classes button.suggested")
    assert suggested.text.startswith("★ MB") and "(suggested)" in suggested.get_attribute(
        "textContent"
    )
    browser.execute_script("document.activeElement.blur()")
    page.sent, before = 0, page.page_keystrokes()
    for i, task in enumerate(single_tasks[:6]):
        page.wait_task(task)
        page.keys("2" if i == 3 else "a")
        intended[more[i]] = "PCEB" if i == 3 else "MB"
    single_keys = page.sent
    assert page.page_keystrokes() - before == single_keys

    # Focus on a class button + Enter answers that class, not the suggestion.
    page.wait_task(single_tasks[6])
    ly = browser.find_element(By.CSS_SELECTOR, "#classes button[data-code='LY']")
    browser.execute_script("arguments[0].focus()", ly)
    page.keys(Keys.ENTER)
    intended[more[6]] = "LY"
    page.wait_empty()
    assert _labels(db, cells + more) == intended

    per_gallery = gallery_keys / 24
    per_single = single_keys / 6
    print(
        f"\nkeystrokes per CST label: gallery {gallery_keys}/24 = {per_gallery:.3f} "
        f"(the 21 confirmations cost 1 key: {1 / 21:.3f} each; the rest moves to and "
        f"answers the 3 outliers, {cols} tiles a row), single-cell {single_keys}/6 = "
        f"{per_single:.3f}"
    )
    assert per_single == 1.0 and per_gallery < per_single


def test_gallery_page_with_expired_leases_submits_the_rest_and_serves_them_again(
    browser: webdriver.Chrome, seed: Seeder, db: psycopg.Connection, api_url: str
) -> None:
    lab_id, code = seed.lab("exp")
    cells = seed.cells(lab_id, 4)
    tasks = seed.tasks(cells, kind="cst", round_id=seed.round(number=2))
    _, token = seed.user("exp", "reviewer", [code])
    page = Page(browser, api_url)
    page.sign_in(token)
    page.gallery_tiles(4)
    # At 200% zoom (half the CSS width, twice the pixel density) the page reflows: no
    # sideways scrolling, every tile and the accept button still in reach.
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 600, "height": 450, "deviceScaleFactor": 2, "mobile": False},
    )
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth"
    )
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert overflow <= 0
    # A class key changes the focused tile; Backspace takes it back to the suggestion.
    first = browser.find_element(By.CSS_SELECTOR, "#tiles .tile")
    page.keys(KEY_OF["LY"])
    assert "✎ LY (changed)" in first.text
    page.keys(Keys.BACKSPACE)
    assert "✓ MB (suggested)" in first.text
    # Single-key shortcuts turned off (WCAG 2.1.4): "a" accepts nothing; back on, it does.
    toggle = browser.find_element(By.ID, "shortcuts")
    toggle.click()
    first.click()
    page.keys("a")
    time.sleep(1)
    n = db.execute("SELECT count(*) AS n FROM reviews WHERE task_id = ANY(%s)", (tasks,))
    assert n.fetchone()["n"] == 0 and "✓ MB (suggested)" in first.text
    toggle.click()
    first.click()
    # Two of the page's leases run out before the reviewer accepts.
    db.execute(
        "UPDATE review_tasks SET lease_expires_at = now() - interval '1 s' WHERE id = ANY(%s)",
        (tasks[1:3],),
    )
    page.keys("a")
    page.wait.until(lambda d: "2 leases had expired" in page.status())
    tiles = page.gallery_tiles(2)  # served again, with new leases
    assert [t.get_attribute("data-task-id") for t in tiles] == [str(t) for t in tasks[1:3]]
    assert _labels(db, cells) == {
        cells[0]: "MB",
        cells[1]: "pending",
        cells[2]: "pending",
        cells[3]: "MB",
    }
    page.keys("a")
    page.wait_empty()
    assert set(_labels(db, cells).values()) == {"MB"}
    # One review a task: no answer was recorded twice.
    n = db.execute(
        "SELECT count(*) AS n FROM reviews WHERE task_id = ANY(%s)", (tasks,)
    ).fetchone()["n"]
    assert n == 4


def _synth_crops(seed: Seeder, cells: list[int], codes: list[str]) -> None:
    """Each cell's crop replaced by a synthetic cell of the class given (what the
    screenshots show; the queue only cares about the rows)."""
    rng = np.random.default_rng(7)
    lab = lab_style(7, "lab-a")
    for cell, code in zip(cells, codes, strict=True):
        image, _ = render_crop(rng, lab, code, size=96)
        key = f"cells/test-browser/{seed.tag}/{cell}.png"
        seed.store.put(key, png(image), "image/png")
        seed.conn.execute("UPDATE cells SET crop_key = %s WHERE id = %s", (key, cell))


def _synth_field(seed: Seeder, cells: list[int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The cells' field replaced by a synthetic one (0.25 µm a pixel); the first cell
    becomes one of its cells (box and crop cut from it). Returns the field's pixels and
    that cell's box."""
    rng = np.random.default_rng(11)
    sample = render_field(rng, lab_style(11, "lab-a"), {"PMC": 1, "MB": 1, "Seg": 1}, size=384)
    # A cell whose 160 px window fits inside the field (so the window is centred on it).
    inner = next(
        c
        for c in sample.cells
        if all(80 <= (c.bbox[i] + c.bbox[i + 2]) // 2 <= 304 for i in (0, 1))
    )
    x0, y0, x1, y1 = inner.bbox
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    crop = np.full((96, 96, 3), 255, np.uint8)
    part = sample.image[max(cy - 48, 0) : cy + 48, max(cx - 48, 0) : cx + 48]
    crop[: part.shape[0], : part.shape[1]] = part
    key = f"fields/test-browser/{seed.tag}.png"
    seed.store.put(key, png(sample.image), "image/png")
    seed.store.put(key + ".crop.png", png(crop), "image/png")
    conn = seed.conn
    field_id = conn.execute("SELECT field_id FROM cells WHERE id = %s", (cells[0],)).fetchone()
    conn.execute(
        "UPDATE field_images SET object_key = %s, width = 384, height = 384, um_per_px = 0.25 "
        "WHERE id = %s",
        (key, field_id["field_id"]),
    )
    conn.execute(
        "UPDATE cells SET x0 = %s, y0 = %s, x1 = %s, y1 = %s, crop_key = %s WHERE id = %s",
        (x0, y0, x1, y1, key + ".crop.png", cells[0]),
    )
    return sample.image, inner.bbox


def test_al_skip_undo_field_context_and_scale(
    browser: webdriver.Chrome, seed: Seeder, db: psycopg.Connection, api_url: str
) -> None:
    lab_id, code = seed.lab("al")
    cells = seed.cells(lab_id, 2)
    tasks = seed.tasks(cells, kind="al", round_id=seed.round(number=2))
    field, bbox = _synth_field(seed, cells)
    _synth_crops(seed, cells[1:], ["PMC"])
    field_id = db.execute("SELECT field_id FROM cells WHERE id = %s", (cells[0],)).fetchone()[
        "field_id"
    ]
    other_lab, other_code = seed.lab("al-other")
    foreign = seed.cells(other_lab, 1)[0]
    _, token = seed.user("al", "reviewer", [code])
    _, colleague = seed.user("al-2", "reviewer", [code])
    page = Page(browser, api_url)
    page.sign_in(token)

    page.wait_task(tasks[0])
    # AL: nothing preselected, the model's two classes in alphabetical order, no confirm.
    assert browser.find_elements(By.CSS_SELECTOR, "#classes button.suggested") == []
    assert "unsure between MB and PMC" in browser.find_element(By.ID, "suggestion").text
    assert not browser.find_element(By.ID, "confirm").is_enabled()
    morph = browser.find_element(By.ID, "morphometrics").text
    assert "Cell area" in morph and "µm²" in morph and "Nucleus : cell area" in morph
    assert browser.find_element(By.ID, "crop-scale").text.endswith("µm")

    # The field context: the cell's own field, outlined.
    page.keys("f")
    page.wait.until(lambda d: d.find_element(By.ID, "field-view").is_displayed())
    shown = browser.find_element(By.ID, "field-image")
    assert shown.get_attribute("data-cell-id") == str(cells[0])
    assert shown.get_attribute("data-field-id") == str(field_id)
    browser.set_window_size(1200, 1250)  # the whole page in the screenshot
    page.screenshot("reviewer-single.png")
    browser.set_window_size(1200, 900)
    page.keys("=")  # zoom in
    assert "zoom 1.5×" in browser.find_element(By.ID, "zoom-level").text

    # Skip: the page moves on, and a colleague gets the skipped task.
    page.keys("s")
    page.wait_task(tasks[1])
    with client(api_url, colleague) as c:
        assert c.post(f"/v1/tasks/next?lab={code}").json()["task_id"] == tasks[0]
    skip_rows = db.execute(
        "SELECT action FROM audit_log WHERE entity = 'review_task' AND entity_id = %s",
        (str(tasks[0]),),
    ).fetchall()
    assert {"action": "review.skip"} in skip_rows

    # A wrong answer, undone: the label is corrected and the log keeps both.
    page.keys(KEY_OF["PCEB"])
    page.wait_empty()
    assert _labels(db, [cells[1]]) == {cells[1]: "PCEB"}
    page.keys("z")
    page.wait.until(lambda d: d.find_element(By.ID, "correcting").is_displayed())
    assert page.shown_task() == str(tasks[1])
    page.keys(KEY_OF["LY"])
    page.wait.until(lambda d: "corrected to LY" in page.status())
    assert _labels(db, [cells[1]]) == {cells[1]: "LY"}
    history = db.execute(
        "SELECT action, before->>'class_code' AS was, after->>'class_code' AS now "
        "FROM audit_log WHERE entity = 'cell' AND entity_id = %s ORDER BY id",
        (str(cells[1]),),
    ).fetchall()
    assert history == [
        {"action": "label.review", "was": None, "now": "PCEB"},
        {"action": "label.correct", "was": "PCEB", "now": "LY"},
    ]

    # The field route: the cell's own field around it, its box outlined, for this lab;
    # 404 for another lab's cell.
    with client(api_url, token) as c:
        resp = c.get(f"/v1/cells/{cells[0]}/field", params={"size": 160})
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert resp.headers["x-field-id"] == str(field_id)
        wx0, wy0, wx1, wy1 = map(int, resp.headers["x-field-window"].split(","))
        assert (wx1 - wx0, wy1 - wy0) == (160, 160)
        assert wx0 <= bbox[0] - 4 and wy0 <= bbox[1] - 4 and bbox[2] + 4 <= wx1
        assert abs((wx0 + wx1) / 2 - (bbox[0] + bbox[2]) / 2) <= 1
        img = np.asarray(Image.open(io.BytesIO(resp.content)).convert("RGB"))
        ring = np.zeros(img.shape[:2], bool)
        bx0, by0, bx1, by1 = bbox[0] - wx0, bbox[1] - wy0, bbox[2] - wx0, bbox[3] - wy0
        ring[by0 - 4 : by1 + 4, bx0 - 4 : bx1 + 4] = True
        ring[by0 - 2 : by1 + 2, bx0 - 2 : bx1 + 2] = False
        # Pixel for pixel the field's own, but for the outline 3 and 4 px outside the box.
        assert np.array_equal(img[~ring], field[wy0:wy1, wx0:wx1][~ring])
        assert tuple(img[by0 - 3, (bx0 + bx1) // 2]) == (255, 220, 0)
        assert tuple(img[by0 - 4, (bx0 + bx1) // 2]) == (0, 0, 0)
        assert c.get(f"/v1/cells/{foreign}/field").status_code == 404
        assert c.get(f"/v1/cells/{foreign}/image").status_code == 404
        assert c.get(f"/v1/cells/{cells[0]}/field", params={"size": 10}).status_code == 422
