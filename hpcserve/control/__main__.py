"""`python -m hpcserve.control --run-dir DIR --run-id ID --router URL [--host H --port N --api-key-env VAR]`:
the control API as the head node agent starts it (a plan process of kind ``control``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from hpcserve.agent.redis_server import read_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpcserve.control")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--router", required=True, help="the router's base URL on the head node")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the router's bearer key")
    p.add_argument("--point", default=None, help="the sweep point this run dir holds (logged; see plan/router_cmd)")
    ns = p.parse_args(argv)
    api_key = None
    if ns.api_key_env:
        api_key = os.environ.get(ns.api_key_env)
        if not api_key:
            print(f"hpcserve control: error: --api-key-env {ns.api_key_env}: that environment variable is empty "
                  "or unset", file=sys.stderr)
            return 2
    redis_url = read_url(ns.run_dir)
    if not redis_url:
        print(f"hpcserve control: error: no redis.json in {ns.run_dir}; the head agent writes it before "
              "starting the control API", file=sys.stderr)
        return 2
    if ns.point:
        print(f"hpcserve control: sweep point {ns.point} ({ns.run_dir})", file=sys.stderr, flush=True)
    import uvicorn

    from hpcserve.control.app import create_app
    from hpcserve.control.state import Control
    # the address clients use: the node's, as in the router URL (the bind address may be 0.0.0.0)
    host = urlsplit(ns.router).hostname or ns.host
    control = Control(ns.run_dir, ns.run_id, ns.router, api_key, redis_url, f"http://{host}:{ns.port}")
    uvicorn.run(create_app(control, api_key), host=ns.host, port=ns.port, log_level="info", access_log=False,
                loop="uvloop", timeout_graceful_shutdown=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
