"""`knnlm explore`: the explorer page for any text, from a local web server.

    knnlm explore runs/demo/data-bin --path runs/demo/checkpoints/checkpoint_best.pt \\
        --dstore-filename runs/demo/dstore --probe 8 --k 32 [--host 127.0.0.1 --port 8000]

The model, the index and the datastore's text are loaded once; ``/`` is a form, and
``/page?text=...`` (GET, or POST of the form) answers the explorer page of that text
(:mod:`knnlm.explore.page`). The server is the standard library's (a thread per
connection, one page computed at a time), on 127.0.0.1 unless ``--host`` says otherwise. It serves no file: those two paths are all
it answers (anything else: 404). A text that is empty, longer than ``--max-chars`` or than
the model's window, or a request body over ``--max-chars`` (times 4: the form's encoding)
gets the form back with the reason, status 400; an error while computing a page gets a
500 page with its one-line reason, and the server goes on.
"""
from __future__ import annotations

import html
import re
import sys
from dataclasses import dataclass
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from ..neighbors import Inspector, NeighborsConfig
from ..util import UserError, first_line, flag


@dataclass(kw_only=True)
class ExploreConfig(NeighborsConfig):
    host: str = flag("127.0.0.1", "address to listen on (127.0.0.1: this machine only)")
    port: int = flag(8000, "port to listen on (0: any free one)")
    max_chars: int = flag(20_000, "longest text a request may send")
    quiet: bool = flag(False, "no log line per request")

    def __post_init__(self):
        if self.text is None and not self.file:
            self.text = "-"                      # texts come with the requests
        super().__post_init__()
        if not 0 <= self.port < 65536 or self.max_chars <= 0:
            raise UserError("--port must be in 0..65535 and --max-chars > 0")


def form(message: str = "", text: str = "") -> str:
    """The form page, with ``message`` (an error) and ``text`` escaped."""
    page = resources.files("knnlm.explore").joinpath("assets/form.html").read_text("utf-8")
    values = dict(MESSAGE=html.escape(message), TEXT=html.escape(text))
    return re.sub(r"\{\{(MESSAGE|TEXT)\}\}", lambda m: values[m.group(1)], page)  # one pass


class ExploreServer(ThreadingHTTPServer):
    """An HTTP server holding one :class:`Inspector`: a thread per connection (an idle
    browser connection never holds up the others), one page computed at a time."""
    daemon_threads = True

    def __init__(self, cfg: ExploreConfig, inspector: Inspector):
        self.cfg, self.inspector = cfg, inspector
        self.compute = threading.Lock()
        super().__init__((cfg.host, cfg.port), Handler)


class Handler(BaseHTTPRequestHandler):
    server: ExploreServer
    timeout = 30                  # seconds an idle connection is kept

    def log_message(self, fmt, *args):           # one line per request, on stderr
        if not self.server.cfg.quiet:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def _send(self, status: int, body: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/":
            return self._send(200, form())
        if url.path == "/page":
            return self._page(parse_qs(url.query).get("text", [""])[0])
        return self._send(404, form("no such page"))

    def do_POST(self):
        url = urlsplit(self.path)
        if url.path != "/page":
            return self._send(404, form("no such page"))
        n = int(self.headers.get("Content-Length") or 0)
        if n > 4 * self.server.cfg.max_chars + 100:
            return self._send(400, form(f"the request is larger than --max-chars "
                                        f"{self.server.cfg.max_chars:,} allows"))
        body = self.rfile.read(n).decode("utf-8", errors="replace")
        return self._page(parse_qs(body).get("text", [""])[0])

    def _page(self, text: str) -> None:
        cfg, insp = self.server.cfg, self.server.inspector
        if not text.strip():
            return self._send(400, form("type a text to inspect"))
        if len(text) > cfg.max_chars:
            return self._send(400, form(f"the text has {len(text):,} characters; at most "
                                        f"{cfg.max_chars:,} (--max-chars)", text[:cfg.max_chars]))
        try:
            ids = insp.databin.vocab.encode_text(text)
            if not len(ids):
                raise UserError("the text encodes to no tokens")
            with self.server.compute:
                page, _ = insp.page(ids)
        except UserError as exc:
            return self._send(400, form(str(exc), text))
        except Exception as exc:      # a bug must not stop the server: a 500 page instead
            return self._send(500, form(f"error: {first_line(exc)}", text))
        return self._send(200, page)


def main(cfg: ExploreConfig) -> None:
    insp = Inspector(cfg)
    server = ExploreServer(cfg, insp)
    host, port = server.server_address[:2]
    print(f"explorer on http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
