"""Processes forked from a warm interpreter, so a test's command line does not pay the imports of a cold one.

Each `python launch/...` a test starts spends ~9 CPU-s importing torch and transformers (and DeepSpeed's engine
~3 s more, importing torch.compile's machinery for a Muon check) before it does any work: half or more of a tiny
2-rank job. A multiprocessing forkserver, started once per test process with those libraries imported (and nothing
of this project's, so our own modules still import fresh in every child), forks each child instead. The child then
runs the script as `python` would — argv, `__main__`, the script's folder first on sys.path, the environment, a
session of its own, stdout and stderr to a file, atexit handlers at the end — and its exit status comes back as a
Popen-style return code. This is how DeepSpeed's and PyTorch's own distributed tests start their ranks (forked
workers, not a launcher per test). Tests of the launchers themselves (`deepspeed`, `torchrun`, `srun`, the
supervisor) still start them cold.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What the forkserver imports once: the heavy third-party graph, not this project's modules.
PRELOAD = ["torch", "torch.distributed", "transformers.models.llama.modeling_llama", "transformers.modeling_utils",
           "deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.muon.muon_optimizer", "numpy",
           "sentencepiece", "yaml", "tqdm"]

# DeepSpeed picks its accelerator once, at import, in the forkserver: every test runs on the CPU one.
FORKSERVER_ENV = {"DS_ACCELERATOR": "cpu"}

_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """The per-test-process forkserver, started on first use with the environment its imports must see."""
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.update(FORKSERVER_ENV)
        try:
            from multiprocessing import forkserver
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _context = context
    return _context


def _run_script(argv: list[str], environ: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the forked child: become `python argv...` with this environment, writing stdout to `out` and stderr to
    `err` (appending, so the ranks of a job can share one file as they share a launcher's output)."""
    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    for path, target in ((out, 1), (err, 2)):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, line_buffering=True,
                                  errors="backslashreplace")
    import torch
    # OpenMP read OMP_NUM_THREADS when the forkserver imported torch; set the child's own, as a cold start would.
    torch.set_num_threads(int(environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    script = str(Path(argv[0]).resolve())
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # a real interpreter runs them at exit; multiprocessing's child would skip them
        sys.stdout.flush()
        sys.stderr.flush()


class WarmProcess:
    """A forked child with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, argv: list, environ: dict[str, str], cwd: Path, out: Path, err: Path | None = None) -> None:
        if environ.get("DS_ACCELERATOR", "cpu") != "cpu":
            raise ValueError("warm processes run DeepSpeed's CPU accelerator, chosen when the forkserver imported it")
        context = _forkserver()
        self._process = context.Process(target=_run_script,
                                        args=([str(a) for a in argv], environ, str(cwd), str(out), str(err or out)))
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self._process.name, timeout)
        return self._process.exitcode


class WarmGroup:
    """The ranks of one job, waited on as one process, as a launcher does: the first rank to fail ends the others
    and gives the job's status (a clean finish is 0)."""

    def __init__(self, ranks: list[WarmProcess]) -> None:
        self.ranks = ranks
        self.pid = ranks[0].pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            codes = [rank.poll() for rank in self.ranks]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                self.kill()
                self.returncode = failed[0]
            elif all(code == 0 for code in codes):
                self.returncode = 0
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("ranks", timeout)
            time.sleep(0.05)
        return self.returncode

    def kill(self) -> None:
        for rank in self.ranks:
            try:
                os.killpg(rank.pid, signal.SIGKILL)  # each rank leads a session: it and its DataLoader workers
            except ProcessLookupError:
                pass
        for rank in self.ranks:
            rank.wait()


def run(argv: list, *, env: dict[str, str], timeout: float, cwd: Path | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """subprocess.run([python, *argv], capture_output=True, text=True, ...) for a script, forked warm."""
    with tempfile.TemporaryDirectory(prefix="warm_run_") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = WarmProcess(argv, env, cwd or Path.cwd(), out, err)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        result = subprocess.CompletedProcess(argv, code, out.read_text(errors="replace"),
                                             err.read_text(errors="replace"))
    if check:
        result.check_returncode()
    return result
