"""Start, stop and inspect the embedded stack.

Each component runs in its own session (process group), so ``down`` can end a
component together with every child it forked (Postgres backends, Ray workers, the
Triton backend stub). The state file records what ``up`` started; ``up`` is
idempotent: a component whose process is alive and ready is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bmcell import tls
from bmcell.errors import ConfigError
from bmcell.stack import accounts
from bmcell.stack import components as comp
from bmcell.stack.config import REPO, StackConfig


@dataclass
class ComponentStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool
    endpoint: str
    log: str

    def to_json(self) -> dict:
        return self.__dict__.copy()


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


class Stack:
    def __init__(
        self, config: StackConfig | None = None, progress: Callable[[str], None] | None = None
    ) -> None:
        self.config = config or StackConfig()
        self.progress = progress or (lambda msg: None)

    # --- state ---------------------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            return json.loads(self.config.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"components": {}}

    def _save_state(self, state: dict) -> None:
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.config.state_file)

    def components(self) -> list[comp.Component]:
        cfg = self.config
        # Optional parts started by an earlier `up --with-prometheus` stay part of the
        # stack, so a plain `status`, `logs` or `down` still sees and stops them.
        if not cfg.with_prometheus and "prometheus" in self._load_state()["components"]:
            cfg = cfg.model_copy(update={"with_prometheus": True})
        return comp.all_components(cfg)

    def env(self) -> dict[str, str]:
        return comp.service_env(self.config)

    # --- up ------------------------------------------------------------------------
    def up(
        self, only: list[str] | None = None, extra_env: dict[str, str] | None = None
    ) -> list[ComponentStatus]:
        """Start what is not running (of ``only``, when given) and return its status.
        ``extra_env`` overrides settings of the components started by this call (an
        experiment points services at another database)."""
        cfg = self.config
        cfg.logs_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tls == "on":
            tls.ensure_local_ca(cfg.tls_dir, [cfg.host])
        state = self._load_state()
        self._write_env_file()
        for c in self.components():
            if only and c.name not in only:
                continue
            rec = state["components"].get(c.name)
            if rec and _alive(rec["pid"]) and c.ready():
                self.progress(f"{c.name}: already running (pid {rec['pid']})")
                continue
            if rec and _alive(rec["pid"]):
                self._stop_pid(c.name, rec["pid"])
            for port_name, port in c.ports.items():
                if comp.port_open(cfg.host, port):
                    raise ConfigError(
                        f"BMCELL_STACK_PORT_BASE={cfg.port_base}: port {port} ({c.name} {port_name}) "
                        "is already in use by another process; stop it or choose another base"
                    )
            if c.prepare:
                c.prepare()
            log_path = cfg.logs_dir / f"{c.name}.log"
            self.progress(f"{c.name}: starting")
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(
                    c.argv,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **c.env, **(extra_env or {})},
                    cwd=str(REPO),
                    start_new_session=True,
                    user=c.user,
                )
            state["components"][c.name] = {"pid": proc.pid, "log": str(log_path), "ports": c.ports}
            self._save_state(state)
            self._wait_ready(c, proc, log_path)
            if c.after_ready:
                c.after_ready()
            self.progress(f"{c.name}: ready ({c.endpoint})")
        return self.status(only)

    def _wait_ready(self, c: comp.Component, proc: subprocess.Popen, log_path: Path) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{c.name} exited with status {proc.returncode} during start; "
                    f"last log lines:\n{_tail(log_path, 20)}"
                )
            if c.ready():
                return
            time.sleep(0.3)
        raise RuntimeError(
            f"{c.name} not ready after {self.config.ready_timeout_s:.0f}s; "
            f"last log lines:\n{_tail(log_path, 20)}"
        )

    def operator_token(self) -> str:
        """The developer's operator token (bmcell.stack.accounts), for the CLI."""
        return accounts.tokens(self.config, [])[accounts.OPERATOR]

    def admin_token(self) -> str:
        """The developer's admin token (people and tokens), for the CLI and tests."""
        return accounts.tokens(self.config, [])[accounts.ADMIN]

    def _write_env_file(self) -> None:
        # The CLI's settings, its operator token and an admin's: the services get
        # neither the tokens nor this file (each has its own account's token).
        env = {
            **self.env(),
            "BMCELL_TOKEN": self.operator_token(),
            "BMCELL_ADMIN_TOKEN": self.admin_token(),
        }
        lines = [f"{k}={v}" for k, v in env.items()]
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.config.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file from before tokens were in it may be world-readable
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")

    # --- down ----------------------------------------------------------------------
    def down(self, timeout_s: float = 30.0) -> None:
        state = self._load_state()
        for c in reversed(self.components()):
            rec = state["components"].pop(c.name, None)
            if rec and _alive(rec["pid"]):
                self.progress(f"{c.name}: stopping (pid {rec['pid']})")
                self._stop_pid(c.name, rec["pid"], min(timeout_s, c.stop_timeout_s))
            self._save_state(state)
        self.config.state_file.unlink(missing_ok=True)

    def stop(self, names: list[str], timeout_s: float = 30.0) -> None:
        """Stop some components (the others keep running)."""
        state = self._load_state()
        for c in reversed(self.components()):
            rec = state["components"].get(c.name)
            if c.name in names and rec and _alive(rec["pid"]):
                self.progress(f"{c.name}: stopping (pid {rec['pid']})")
                self._stop_pid(c.name, rec["pid"], min(timeout_s, c.stop_timeout_s))

    def _stop_pid(self, name: str, pid: int, timeout_s: float = 20.0) -> None:
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            return
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)
        while _alive(pid) and time.monotonic() < deadline + 5:
            time.sleep(0.1)

    # --- status and logs -----------------------------------------------------------
    def status(self, only: list[str] | None = None) -> list[ComponentStatus]:
        """Every component's status, or those named in ``only`` (checking readiness
        costs seconds for some: a service restarted alone need not wait on the rest)."""
        state = self._load_state()
        out = []
        for c in self.components():
            if only and c.name not in only:
                continue
            rec = state["components"].get(c.name, {})
            pid = rec.get("pid")
            running = _alive(pid)
            out.append(
                ComponentStatus(
                    name=c.name,
                    pid=pid if running else None,
                    running=running,
                    healthy=running and c.ready(),
                    endpoint=c.endpoint,
                    log=str(self.config.logs_dir / f"{c.name}.log"),
                )
            )
        return out

    def log_path(self, name: str) -> Path:
        names = [c.name for c in self.components()]
        if name not in names:
            raise ConfigError(f"unknown component {name!r}; expected one of {names}")
        return self.config.logs_dir / f"{name}.log"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"
