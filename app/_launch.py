"""Launching the explorer: the ``streamlit run`` command line and ``explore`` (``saetune explore``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from saetune.errors import SaetuneError

ENV = "SAETUNE_RUN_DIR"
HOME = Path(__file__).resolve().parent / "explorer.py"


def streamlit_command(host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The ``streamlit run`` command line: headless, no usage statistics, no file watcher."""
    return [sys.executable, "-m", "streamlit", "run", str(HOME),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.address", host, "--server.port", str(int(port)),
            "--server.fileWatcherType", "none", "--server.runOnSave", "false", "--client.toolbarMode", "viewer"]


def explore(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8501, replace_process: bool = False) -> int:
    """Serve the explorer on ``run_dir`` (a run dir or a pipeline dir) until interrupted.

    Binds to ``host`` (local only by default). With ``replace_process`` (the CLI) Streamlit
    replaces this process, so signals reach it directly; otherwise it runs as a child and this
    returns its exit code.
    """
    p = Path(run_dir).expanduser()
    if not p.is_dir():
        raise SaetuneError(f"run dir {str(run_dir)!r} does not exist; pass a run dir (runs/<stage>-…) or a "
                           "pipeline dir (runs/demo-…)")
    if not 0 < int(port) < 65536:
        raise SaetuneError(f"port {port} is not a valid TCP port (1…65535)")
    env = dict(os.environ, **{ENV: str(p.resolve())})
    print(f"saetune explorer on http://{host}:{port}  (run dir {p}); Ctrl-C stops it", flush=True)
    cmd = streamlit_command(host, port)
    if replace_process:
        sys.stdout.flush()
        os.execve(cmd[0], cmd, env)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
