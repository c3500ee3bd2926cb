"""A real headless ComfyUI server (``main.py --cpu``) on 127.0.0.1 with this pack installed.

Each server gets its own base directory (models, custom_nodes, input, output, user), so tests
and the demo never touch the user's ComfyUI folders.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .comfy_env import REPO, comfy_path, pack_link

TESTKIT = REPO / "devtools" / "comfy_testkit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(
        self,
        base_dir: Path,
        testkit: bool = True,
        extra_args: tuple[str, ...] = (),
        tiny_prompts: int | None = None,
        settings: dict | None = None,
    ):
        """``tiny_prompts`` = N: the testkit rewrites every queued prompt for the tiny stand-ins at N px
        (so workflows queued unchanged from the browser run). ``settings``: the frontend's user settings."""
        self.base = Path(base_dir)
        self.tiny_prompts = tiny_prompts
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.testkit = testkit
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"

    # --- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> ComfyServer:
        for d in ("models/diffusion_models", "models/loras", "models/vae", "input", "output", "user", "temp"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        if self.settings is not None:
            user = self.base / "user" / "default"
            user.mkdir(parents=True, exist_ok=True)
            (user / "comfy.settings.json").write_text(json.dumps(self.settings, indent=1))
        custom = self.base / "custom_nodes"
        pack_link(custom)
        if self.testkit and not (custom / "glance_testkit").exists():
            (custom / "glance_testkit").symlink_to(TESTKIT, target_is_directory=True)
        cmd = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("GLANCE_TESTKIT_TINY_PROMPTS", None)
        if self.tiny_prompts:
            env["GLANCE_TESTKIT_TINY_PROMPTS"] = str(self.tiny_prompts)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=comfy_path(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- HTTP ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, timeout: float = 60.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return json.loads(raw) if r.headers.get_content_type() == "application/json" else raw

    def get(self, path: str, timeout: float = 60.0):
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, body) -> tuple[int, dict]:
        """(status, JSON body), also for 4xx answers."""
        try:
            return 200, self._request("POST", path, body)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"raw": raw.decode(errors="replace")}

    def queue(self, prompt: dict, workflow: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": uuid.uuid4().hex}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        status, answer = self.post("/prompt", body)
        if status != 200 or answer.get("node_errors"):  # ComfyUI runs the valid outputs and drops the rest
            raise PromptRejected(answer)
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The history entry of a finished prompt (success or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if (
                entry
                and entry.get("status", {}).get("completed") is not None
                and (entry["status"].get("status_str") in ("success", "error"))
            ):
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")

    def run(self, prompt: dict, workflow: dict | None = None, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(prompt, workflow), timeout)

    def object_info(self) -> dict:
        return self.get("/object_info")


class PromptRejected(RuntimeError):
    def __init__(self, answer: dict):
        super().__init__(json.dumps(answer)[:2000])
        self.answer = answer


def error_message(entry: dict) -> str:
    """The execution_error message of a failed history entry ('' if none)."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""
