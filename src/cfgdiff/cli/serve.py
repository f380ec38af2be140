"""`cfgdiff serve`: a local web page over a checkpoint (cfgdiff.serve), served until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cfgdiff.cli.options import UsageError, backend_option, device_options, int_in
from cfgdiff.cli.progress import log


def add_parser(sub) -> None:
    from cfgdiff.serve.jobs import Limits

    d = Limits()
    sv = sub.add_parser(
        "serve", help="a local web page to play with a model (needs: pip install 'cfgdiff[serve]')"
    )
    sv.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint folder, a run folder (its latest checkpoint), or a model file",
    )
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; any other address "
        "lets whoever reaches it use the page, with no login)",
    )
    sv.add_argument(
        "--port", type=int_in(0, 65535), default=8000, help="(default 8000; 0: a free one)"
    )
    device_options(sv)
    backend_option(sv)
    sv.add_argument(
        "--max-images",
        type=int_in(1, 4096),
        default=d.max_images,
        help=f"images one request may ask for; a strip counts each cell (default {d.max_images})",
    )
    sv.add_argument(
        "--max-image-steps",
        type=int_in(1, 10**8),
        default=d.max_image_steps,
        help=f"images x sampler steps one request may ask for (default {d.max_image_steps})",
    )
    sv.add_argument(
        "--queue",
        type=int_in(0, 1000),
        default=d.queue,
        help=f"requests that may wait behind the one running; more are refused with HTTP 503 "
        f"(default {d.queue})",
    )


def run(a: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError(
            "serve needs the web server packages: pip install 'cfgdiff[serve]'"
        ) from None
    from cfgdiff.checkpoint import load_for_sampling
    from cfgdiff.runtime import resolve_device, resolve_precision
    from cfgdiff.serve.app import bind, is_loopback, serve_forever, url_of
    from cfgdiff.serve.jobs import Engine, Limits, Model

    limits = Limits(max_images=a.max_images, max_image_steps=a.max_image_steps, queue=a.queue)
    limits.validate()
    sock = bind(a.host, a.port)  # first: a port in use is said before the model loads
    try:
        device = resolve_device(a.device)
        loaded = load_for_sampling(a.checkpoint, device)
        for s in loaded.skipped:
            log(s.line())
        precision = resolve_precision(a.precision, device)
        engine = Engine(Model.of(loaded), limits, device, precision, a.backend or "auto")
        engine.warm_up()
    except BaseException:
        sock.close()
        raise
    if not is_loopback(a.host):
        print(
            f"cfgdiff: warning: --host {a.host} is not a loopback address: anyone who can reach "
            "this machine can use the page and its processor time (no login, no encryption)",
            file=sys.stderr,
        )
    print(
        f"serving {loaded.path} at {url_of(sock)}  (Ctrl-C to stop; network: "
        f"{engine.backend_words()})",
        flush=True,
    )
    try:
        serve_forever(engine, sock, a.host)
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: not an error
        pass
    print("stopped")
    return 0
