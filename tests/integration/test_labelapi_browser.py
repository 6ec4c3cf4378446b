"""The reviewer page in headless Chromium: enter a token, answer with the keyboard,
see the next cell."""

from __future__ import annotations

import base64
import hashlib
import tempfile
from collections.abc import Iterator

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from bmcell import tls
from tests.integration import test_labelapi as shared
from tests.integration.test_labelapi import Seeder

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
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def test_review_with_the_keyboard(
    browser: webdriver.Chrome, seed: Seeder, db: psycopg.Connection, api_url: str
) -> None:
    lab_id, code = seed.lab("web")
    cells = seed.cells(lab_id, 2)
    rnd = seed.round(number=2)
    tasks = seed.tasks(cells, kind="cst", round_id=rnd)
    _, token = seed.user("web", "reviewer", [code])
    wait = WebDriverWait(browser, 20)

    browser.get(api_url + "/")
    field = wait.until(lambda d: d.find_element(By.ID, "token-input"))
    field.send_keys(token, Keys.ENTER)

    def shown_task(d: webdriver.Chrome) -> str | bool:
        el = d.find_element(By.ID, "task")
        img = d.find_element(By.ID, "cell-image")
        loaded = d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
        return el.is_displayed() and loaded and el.get_attribute("data-task-id")

    assert wait.until(shown_task) == str(tasks[0])
    assert "MB" in browser.find_element(By.ID, "suggestion").text
    buttons = browser.find_elements(By.CSS_SELECTOR, "#classes button")
    assert len(buttons) == 17 and "PCEB" in buttons[1].text and "2" in buttons[1].text
    wait.until(lambda d: "0/2 done" in d.find_element(By.ID, "progress").text)

    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.ENTER)  # confirm the suggestion
    wait.until(lambda d: shown_task(d) == str(tasks[1]))
    wait.until(lambda d: "1/2 done" in d.find_element(By.ID, "progress").text)

    body.send_keys("2")  # the second class of the taxonomy: PCEB
    wait.until(lambda d: d.find_element(By.ID, "empty").is_displayed())
    assert "2/2 done" in browser.find_element(By.ID, "progress").text

    got = db.execute(
        "SELECT cell_id, class_code FROM labels WHERE cell_id = ANY(%s) ORDER BY cell_id",
        (cells,),
    ).fetchall()
    assert got == [
        {"cell_id": cells[0], "class_code": "MB"},
        {"cell_id": cells[1], "class_code": "PCEB"},
    ]
    # The token lives in this tab only.
    stored = browser.execute_script("return sessionStorage.getItem('bmcell-token')")
    assert stored == token
