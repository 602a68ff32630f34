"""The explorer page (`knnlm neighbors --html`) in a real browser: headless Chromium from
the distribution's packages, driven by Selenium (`make test` installs both). A click shows
a token's neighbours, the sliders recompute the perplexity the CLI gives at those
settings, a hostile corpus renders as text, and the page of 2,000 tokens with 64
neighbours each opens and updates fast (measured, printed, not asserted)."""
import json
import math
import shutil
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
webdriver = pytest.importorskip("selenium.webdriver")

import knnlm
from knnlm.cli import run
from test_hf import hf_databin, hf_tokenizer_dir, tiny_llama  # noqa: F401  (fixtures)

HOSTILE = ['<script>alert("x")</script> and </div> "quoted" {{ braces }}',
           "Enter the king, and his train, with <b>bold</b> & sweet music."]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.fail("headless Chromium and chromedriver are missing: `make test` installs "
                    "them (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def setup(hf_databin, hf_tokenizer_dir, corpus_dir, tmp_path_factory):  # noqa: F811
    """A tiny random Llama, a datastore of 200 corpus lines plus hostile ones."""
    root = tmp_path_factory.mktemp("explore")
    model, tok, _ = tiny_llama(hf_databin.vocab_size, hf_tokenizer_dir, root / "model")
    lines = (corpus_dir / "train.txt").read_text().splitlines()[:200]
    texts = ["\n".join(lines[i:i + 10]) for i in range(0, 200, 10)] + HOSTILE * 5
    ds = knnlm.Datastore.build(model, tok, texts, out=root / "ds", tokens_per_sample=64,
                               index=None, quiet=True)
    return root, ds


def page(setup, tmp_path, text: str, k: int = 8, extra=()):
    root, ds = setup
    out = tmp_path / "page.html"
    argv = ["neighbors", str(ds.data_bin), "--hf-model", str(root / "model"),
            "--dstore-filename", str(ds.path), "--exact-search", "--k", str(k), "--lmbda",
            "0.25", "--knn-temp", "1", "--text", text, "--html", str(out), "--json"]
    return argv, out


def open_page(browser, path):
    t0 = time.perf_counter()
    browser.get(path.as_uri())
    for _ in range(200):
        if browser.execute_script("return document.body.dataset.ready") == "1":
            break
        time.sleep(0.02)
    return time.perf_counter() - t0


def set_value(browser, element_id: str, value) -> None:
    browser.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input'));", element_id, str(value))


def cli_ppl(rows, lmbda: float) -> float:
    logs = [math.log((1 - lmbda) * r["lm_prob"] + lmbda * r["knn_prob"]) if r["neighbors"]
            else math.log(r["lm_prob"]) for r in rows]
    return math.exp(-sum(logs) / len(logs))


def test_click_slide_and_the_clis_numbers(setup, browser, tmp_path, capsys):
    text = "Enter the king, and my lady, with sweet music. What say you?"
    argv, out = page(setup, tmp_path, text)
    assert run(argv) == 0
    rows = json.loads(capsys.readouterr().out)["positions"]
    open_page(browser, out)
    shown = float(browser.find_element("id", "ppl-knnlm").text)
    assert shown == pytest.approx(cli_ppl(rows, 0.25), rel=2e-4)
    assert float(browser.find_element("id", "ppl-lm").text) == pytest.approx(
        math.exp(-sum(math.log(r["lm_prob"]) for r in rows) / len(rows)), rel=2e-4)
    spans = browser.find_elements("css selector", "#text span")
    assert "".join(s.text for s in spans).replace("\n", "") == "".join(
        r["target_text"] for r in rows).replace("\n", "")
    i = 5
    spans[i].click()
    table = browser.find_element("id", "neighbours")
    trs = table.find_elements("css selector", "tr")[1:]
    assert len(trs) == len(rows[i]["neighbors"])
    first = rows[i]["neighbors"][0]
    assert first["value_text"].strip() in trs[0].text
    assert f"{first['distance']:.3f}" in trs[0].text
    # the sliders: the page's numbers are the CLI's at those settings
    set_value(browser, "temp", 3)
    set_value(browser, "lambda", 0.7)
    argv2 = [a if a not in ("0.25", "1") else {"0.25": "0.7", "1": "3"}[a] for a in argv]
    argv2[argv2.index("--html") + 1] = str(tmp_path / "other.html")
    assert run(argv2) == 0
    rows2 = json.loads(capsys.readouterr().out)["positions"]
    assert float(browser.find_element("id", "ppl-knnlm").text) == pytest.approx(
        cli_ppl(rows2, 0.7), rel=2e-4)
    probs = browser.find_element("id", "probs").text
    assert f"{rows2[i]['knn_prob']:.5g}"[:5] in probs
    browser.save_screenshot(str(tmp_path / "shot.png"))
    assert (tmp_path / "shot.png").stat().st_size > 5000


def test_a_hostile_corpus_renders_as_text(setup, browser, tmp_path, capsys):
    argv, out = page(setup, tmp_path, HOSTILE[0] + " " + HOSTILE[1])
    assert run(argv) == 0
    capsys.readouterr()
    open_page(browser, out)
    from selenium.common.exceptions import NoAlertPresentException
    with pytest.raises(NoAlertPresentException):     # the corpus' script never ran
        browser.switch_to.alert.text
    assert browser.execute_script("return document.querySelectorAll('script').length") == 2
    assert browser.execute_script("return document.querySelectorAll('#text b').length") == 0
    body = browser.find_element("id", "text").text
    assert '<script>alert("x")</script>' in body and "{{ braces }}" in body
    spans = browser.find_elements("css selector", "#text span")
    spans[3].click()
    panel = browser.find_element("id", "panel").text
    assert browser.execute_script("return document.querySelectorAll('#panel b').length") == 0
    assert any(s in panel for s in ("</div>", "<script>", "<b>", "{{"))   # shown as text


def test_a_long_page_opens_and_updates_fast(setup, browser, tmp_path, capsys, corpus_dir):
    """2,000 tokens with 64 neighbours each: open and slider times (printed for the notes)."""
    text = (corpus_dir / "valid.txt").read_text()
    root, ds = setup
    databin = knnlm.data.preprocess.DataBin(ds.data_bin)
    ids = databin.vocab.encode_text(text)[:2000]
    text = databin.vocab.decode(ids)
    argv, out = page(setup, tmp_path, text, k=64)
    # the tiny model reads 128 positions: score the text in a model with a longer window
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model")
    model.config.max_position_embeddings = 4096
    model.save_pretrained(tmp_path / "long")
    transformers.AutoTokenizer.from_pretrained(root / "model").save_pretrained(tmp_path / "long")
    argv[argv.index("--hf-model") + 1] = str(tmp_path / "long")
    rc = run(argv)
    capsys.readouterr()
    if rc != 0:
        pytest.skip("the long text did not score")
    opened = open_page(browser, out)
    set_value(browser, "lambda", 0.6)
    slider_ms = float(browser.execute_script("return document.body.dataset.refreshMs"))
    n = browser.execute_script("return document.querySelectorAll('#text span').length")
    print(f"\nexplorer: {n} tokens x 64 neighbours, {out.stat().st_size / 2**20:.1f} MiB; "
          f"opened in {opened:.2f} s, slider update {slider_ms:.0f} ms")
    assert n == len(ids)


@pytest.fixture()
def server(setup):
    """`knnlm explore` on a free port, in a thread."""
    import threading
    from knnlm.explore.server import ExploreConfig, ExploreServer
    from knnlm.neighbors import Inspector
    from knnlm.util import parse_config
    root, ds = setup
    cfg = parse_config(ExploreConfig, [str(ds.data_bin), "--hf-model", str(root / "model"),
                                       "--dstore-filename", str(ds.path), "--exact-search",
                                       "--k", "8", "--lmbda", "0.25", "--knn-temp", "1",
                                       "--port", "0", "--max-chars", "300", "--quiet"],
                       prog="knnlm explore")
    srv = ExploreServer(cfg, Inspector(cfg))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def fetch(url: str, data: bytes | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, data=data, timeout=60) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def test_the_server_answers_pages_and_bad_requests(server, browser, monkeypatch):
    from urllib.parse import quote, urlencode
    srv, base = server
    status, body = fetch(base + "/")
    assert status == 200 and 'action="/page"' in body
    status, body = fetch(base + "/page?text=" + quote("Enter the king, and my lady"))
    assert status == 200 and "application/json" in body and "knnlm explorer" in body
    for url, code, needle in [("/page?text=", 400, "type a text"),
                              ("/page?text=" + "a" * 400, 400, "at most 300"),
                              ("/../../etc/passwd", 404, "no such page"),
                              ("/assets/page.html", 404, "no such page")]:
        status, body = fetch(base + url)
        assert status == code and needle in body, url
    status, body = fetch(base + "/page", urlencode({"text": "a <script>x</script>"}).encode())
    assert status == 200 and "<script>x" not in body
    # a failure while computing a page: a 500 page, and the server goes on
    monkeypatch.setattr(srv.inspector, "page", lambda ids: 1 / 0)
    status, body = fetch(base + "/page?text=hello")
    assert status == 500 and "division by zero" in body
    monkeypatch.undo()
    assert fetch(base + "/page?text=hello")[0] == 200
    # in the browser: type, submit, get the page
    browser.get(base + "/")
    browser.find_element("id", "text").send_keys("What say you, my lord?")
    browser.find_element("id", "go").click()
    for _ in range(200):
        if browser.execute_script("return document.body.dataset.ready") == "1":
            break
        time.sleep(0.05)
    assert browser.find_elements("css selector", "#text span")
