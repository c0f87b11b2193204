"""Serve one adapter of a finished `bench/loop.py` home (in a copy) and measure it as the bench does.

    .venv/bin/python -m bench.probe_adapter HOME VERSION OUT.json [--model DIR]

For an adapter the gate refused: the copy force-promotes it (`assistant admin promote --force`), starts
`assistant serve`, runs the bench's user session (like rate) and its examiners (grounded with retrieval)
with the same seeds, and writes the answers to OUT.json: what a refused candidate, or a variant retrained
in a copy of a run's home, would have done for the users. The original home is not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.loop import QA_FILE, Api, examine, share, user_session
from bench.server_process import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("home", type=Path)
    ap.add_argument("version")
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default=str(Path(tempfile.gettempdir()) / "assistant-bench-models" / "models"
                                          / "smollm2-135m-instruct"))
    args = ap.parse_args()
    from assistant.config import Settings
    from memory.store import Store

    work = Path(tempfile.mkdtemp(prefix="assistant-probe-"))
    home = work / "home"
    shutil.copytree(args.home, home)
    exe = Path(sys.executable).parent / "assistant"
    subprocess.run([str(exe), "admin", "promote", args.version, "--force", "--home", str(home)], check=True)
    store = Store.open(Settings.load(env={}, home=home).db_url)
    keys = {u.username.removeprefix("loop-"): store.create_api_key(u.id) for u in store.list_users()}
    store.close()
    qa = json.loads(QA_FILE.read_text(encoding="utf-8"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    port = free_port()
    proc = start_server(home, args.model, port, env)
    try:
        apis = {k: Api(f"http://127.0.0.1:{port}", v) for k, v in keys.items()}
        ns = argparse.Namespace(per_user=8, max_tokens=40, like_words=30)
        t0 = time.perf_counter()
        session = user_session(apis, qa, 9, ns)
        rag = examine(apis["open-book"], "open-book", qa, ns)
        result = {"version": args.version, "like_rate": share([t.liked for t in session]),
                  "grounded_rag": share([t.correct for _, t in rag]),
                  "examiner": [(g, t.question, t.answer, t.correct) for g, t in rag],
                  "users": [(t.question, t.answer, t.liked) for t in session]}
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"{args.version}: like rate {result['like_rate']} %, grounded with retrieval {result['grounded_rag']} % "
              f"({time.perf_counter() - t0:.0f} s)")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
