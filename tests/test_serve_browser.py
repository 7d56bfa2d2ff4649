"""The page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

`/?id=N` renders N's hits in the API's order; clicking a hit, the random button, the radius control
and an upload each search and render what the API returns; an error shows in the page. Screenshots at 360 px and at a
desktop width are saved under the test's tmp dir, and copied to $HYBRIDHASH_ARTIFACTS when set.
"""

import os
import shutil

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from hybridhash_jax import webapp
from tests.helpers import serving

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
WIDTHS = {"phone": (360, 1100), "desktop": (1280, 900)}


@pytest.fixture(scope="module")
def url(served):
  with serving(webapp.create_app(served.index, served.encoder, max_batch=4)) as base:
    yield base


def _browser(width: int, height: int) -> webdriver.Chrome:
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={max(width, 500)},{height}"):
    options.add_argument(arg)
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
  # Chromium's windows are at least 500 px wide: emulate the phone's viewport instead.
  driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500})
  return driver


def _rendered(driver, query: str) -> list[dict]:
  """Waits until the page shows the results of `query` (text of #query-name), then reads the grid."""
  wait = WebDriverWait(driver, 30)
  wait.until(lambda d: d.find_element(By.ID, "query-name").text.startswith(query)
             and not d.find_element(By.ID, "status").text.startswith("searching"))
  wait.until(lambda d: d.execute_script(  # lazy images below the fold stay unloaded
      "return [...document.images].every((i) => i.complete || i.getBoundingClientRect().top > innerHeight)"))
  return [{"id": int(li.get_attribute("data-id")), "rank": int(li.get_attribute("data-rank")),
           "distance": int(li.get_attribute("data-distance")), "text": li.text}
          for li in driver.find_elements(By.CSS_SELECTOR, "#hits .hit")]


def _api(url: str, **body) -> dict:
  return httpx.post(f"{url}/api/search", json=body).json()


def _same(grid: list[dict], result: dict) -> None:
  assert [(g["id"], g["rank"], g["distance"]) for g in grid] == [
      (h["id"], h["rank"], h["distance"]) for h in result["hits"]]
  for g, h in zip(grid, result["hits"]):
    assert f"#{h['rank']} · d {h['distance']}" in g["text"] and h["path"] in g["text"] and h["label"] in g["text"]


def _screenshot(driver, tmp_path, name: str) -> None:
  path = tmp_path / f"{name}.png"
  assert driver.save_screenshot(str(path)) and path.stat().st_size > 0
  if os.environ.get("HYBRIDHASH_ARTIFACTS"):
    os.makedirs(os.environ["HYBRIDHASH_ARTIFACTS"], exist_ok=True)
    shutil.copy(path, os.environ["HYBRIDHASH_ARTIFACTS"])


@pytest.mark.parametrize("device", [pytest.param("phone", marks=pytest.mark.slow), "desktop"])
def test_link_click_random_and_upload(url, served, tmp_path, device):
  driver = _browser(*WIDTHS[device])
  try:
    driver.get(f"{url}/?id=4&k=8")
    result = _api(url, id=4, k=8)
    grid = _rendered(driver, "item 4:")
    assert len(grid) == 8 and len({g["distance"] for g in grid}) > 1  # an order to get wrong
    _same(grid, result)
    header = driver.execute_script(
        "return [...document.querySelectorAll('#info dt, #info dd')].map((e) => e.textContent)")
    assert header == ["items", "18", "bits", "16", "model", "img_size 16, embed_dims 8/16/16, depths 1/1/1",
                      "step", "7"]
    code = driver.find_element(By.ID, "query-code").text
    assert code.replace(" ", "") == result["query"]["code"] and len(code.split()) == 2  # 16 bits, bytes apart
    _screenshot(driver, tmp_path, f"search_{device}")
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= WIDTHS[device][0], f"the page scrolls sideways at {WIDTHS[device][0]} px"

    target = grid[2]["id"]  # clicking a hit searches from it, and the URL follows
    driver.find_elements(By.CSS_SELECTOR, "#hits .hit a")[2].click()
    _same(_rendered(driver, f"item {target}:"), _api(url, id=target, k=8))
    assert driver.current_url.endswith(f"/?id={target}&k=8")

    driver.find_element(By.ID, "random").click()  # the URL names the random item at once
    shown = int(driver.execute_script("return new URLSearchParams(location.search).get('id')"))
    _same(_rendered(driver, f"item {shown}:"), _api(url, id=shown, k=8))

    driver.find_element(By.ID, "radius").send_keys("3", Keys.TAB)  # the radius control reruns the search
    WebDriverWait(driver, 30).until(lambda d: "within radius 3" in d.find_element(By.ID, "status").text)
    _same(_rendered(driver, f"item {shown}:"), _api(url, id=shown, radius=3))
    assert driver.current_url.endswith(f"/?id={shown}&radius=3")

    path = served.index.item_path(11)  # an upload through the file picker, still within radius 3
    driver.find_element(By.ID, "file").send_keys(path)
    grid = _rendered(driver, "upload: 005.png")
    with open(path, "rb") as f:
      expected = httpx.post(f"{url}/api/search", files={"image": ("005.png", f)}, data={"radius": "3"}).json()
    _same(grid, expected)
    assert "id=" not in driver.current_url
    _screenshot(driver, tmp_path, f"upload_{device}")
  finally:
    driver.quit()


def test_errors_show_in_the_page(url):
  driver = _browser(*WIDTHS["phone"])
  try:
    driver.get(f"{url}/?id=999")
    WebDriverWait(driver, 30).until(lambda d: "404" in d.find_element(By.ID, "status").text)
    assert "no item 999" in driver.find_element(By.ID, "status").text
    assert not driver.find_elements(By.CSS_SELECTOR, "#hits .hit")
  finally:
    driver.quit()
