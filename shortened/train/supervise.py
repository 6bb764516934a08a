"""A launcher's supervisor: a stop signal returns only once every rank's preemption checkpoint is complete.

    python launch/supervise.py -- deepspeed --num_gpus 8 launch/cpt.py --config RECIPE [key=value ...]
    python launch/supervise.py -- torchrun --nproc_per_node 8 ... launch/cpt.py --config RECIPE [key=value ...]

Why it exists: SLURM, `docker stop` and Kubernetes end a job by signalling its command (or its process group),
then kill whatever is left once the command has returned or the grace period is over. Alone, `deepspeed` dies
of that SIGTERM at once (exit 143) while its ranks are still writing the checkpoint; DeepSpeed's per-node
launcher and `torchrun` SIGKILL ranks that are still saving 30 s after a SIGTERM reaches them, and exit 1.

What it does:
- the launcher runs in a session of its own, ignoring the stop signals (torchrun is told not to handle them),
  so a signal to this command's process group reaches neither the launcher nor the ranks;
- on SIGTERM / SIGUSR1 / SIGINT it sends SIGTERM to each rank directly, once the rank's own handler is
  installed (StopRequest: save at the next step boundary, exit 0), and freezes DeepSpeed's per-node launchers
  (SIGSTOP) so a signal that reaches them anyway cannot start their SIGKILL timer;
- it returns when the ranks are gone, the launcher has exited and rank 0's run-dir lock is free (rank 0 may
  run on another node), with 0 when a checkpoint completed after the stop signal (or the run finished);
- a second SIGINT abandons the checkpoint and kills the job.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Sequence

import psutil

from shortened.train.signals import STOP_SIGNALS

POLL_S = 0.2
# Requests to stop that the supervisor answers; SIGINT too, so Ctrl-C in a terminal also saves.
REQUESTS = (*STOP_SIGNALS, signal.SIGINT)
FORWARDED = signal.SIGTERM
# DeepSpeed's per-node launcher: on SIGTERM it kills the ranks' process trees, SIGKILL after 30 s, no setting.
DEEPSPEED_NODE_LAUNCHER = "deepspeed.launcher.launch"
# The torchrun agent handles these by shutting its workers down (SIGKILL after --shutdown-timeout); told to
# handle only these instead, it leaves the stop signals ignored.
TORCHRUN_HANDLED = "SIGHUP,SIGQUIT"
LOCK_FILE = ".train.lock"  # shortened.train.checkpoint.LOCK_FILE, held by rank 0 for its life
MARKER = "complete.json"
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class SuperviseError(RuntimeError):
    """The supervisor cannot run the command as given."""


# ---------------------------------------------------------------------------------------------- the command


def trainer_args(command: Sequence[str]) -> tuple[str | None, list[str]]:
    """The trainer's `--config` and its `key=value` overrides in a launcher command line.

    Overrides are looked for only after the training script, because launcher options before it can take
    key=value values too (torchrun --rdzv_conf timeout=900).
    """
    script = next((i for i, arg in enumerate(command) if arg.endswith(".py")), None)
    if script is None:
        raise SuperviseError("no training script (launch/cpt.py) in the command")
    args = list(command[script + 1:])
    config = None
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            config = args[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    overrides = [arg for i, arg in enumerate(args) if _OVERRIDE.match(arg) and (i == 0 or args[i - 1] != "--config")]
    return config, overrides


def run_dir_of(command: Sequence[str]) -> Path:
    """The run directory the trainer will use: its config and overrides, resolved as the trainer does."""
    from shortened.config import RunConfig, load_config

    config, overrides = trainer_args(command)
    return Path(load_config(RunConfig, config, overrides).run_dir).resolve()


def start_launcher(command: Sequence[str]) -> subprocess.Popen:
    """The launcher in its own session with the stop signals ignored (ranks install their own handler)."""
    env = dict(os.environ)
    env.setdefault("PET_SIGNALS_TO_HANDLE", TORCHRUN_HANDLED)  # torchrun's --signals-to-handle

    def ignore_requests() -> None:
        for signum in REQUESTS:
            signal.signal(signum, signal.SIG_IGN)

    try:
        return subprocess.Popen(list(command), env=env, start_new_session=True, preexec_fn=ignore_requests)
    except OSError as err:
        raise SuperviseError(f"cannot start {command[0]}: {err.strerror}") from None


# ---------------------------------------------------------------------------------------------- the processes


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}


def alive(processes: Sequence[psutil.Process]) -> list[psutil.Process]:
    found = []
    for proc in processes:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def tree(root: int) -> list[psutil.Process]:
    """`root` and its live descendants (torchrun's workers, in sessions of their own, included)."""
    try:
        top = psutil.Process(root)
        return alive([top, *top.children(recursive=True)])
    except psutil.NoSuchProcess:
        return []


def ranks(processes: Sequence[psutil.Process]) -> list[psutil.Process]:
    """Training processes: a launcher gave them a RANK their parent does not have (DataLoader workers inherit
    their rank's)."""
    found = []
    for proc in processes:
        rank = _environ(proc).get("RANK")
        parent = _parent(proc)
        if rank is not None and parent is not None and _environ(parent).get("RANK") != rank:
            found.append(proc)
    return found


def catches(pid: int, signum: int) -> bool:
    """Whether `pid` has a handler installed for `signum` (a signal sent earlier would kill or miss it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)
    return mask is not None and bool(int(mask.group(1), 16) >> (signum - 1) & 1)


def send(proc: psutil.Process, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


# ---------------------------------------------------------------------------------------------- the run dir


def lock_holder(run_dir: Path) -> str | None:
    """Who holds rank 0's run-dir lock ("pid N on HOST"), or None when nobody does.

    Probing takes the lock for an instant, so it is only done once this node's ranks are gone.
    """
    path = run_dir / LOCK_FILE
    try:
        handle = open(path)
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def checkpoint_after(run_dir: Path, since: float) -> Path | None:
    """The newest checkpoint whose completion marker was written at or after `since` (wall clock)."""
    newest = None
    for marker in sorted((run_dir / "checkpoints").glob(f"step_*/{MARKER}")):
        try:
            written = float(json.loads(marker.read_text())["time"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if written >= since:
            newest = marker.parent
    return newest


# ---------------------------------------------------------------------------------------------- supervising


class Supervisor:
    def __init__(self, command: Sequence[str], run_dir: Path) -> None:
        self.command = list(command)
        self.run_dir = run_dir
        self.launcher: subprocess.Popen  # started by run(), after the signal handlers are in place
        self.request: str | None = None
        self.requested_at = 0.0
        self.interrupts = 0
        self.ranks: dict[int, psutil.Process] = {}  # every rank seen, so an orphaned one is still waited for
        self.told: set[int] = set()
        self.frozen: dict[int, psutil.Process] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        if self.request is None:
            self.request = signal.Signals(signum).name
            self.requested_at = time.time()
            say(f"{self.request}: every rank saves a checkpoint at its next step boundary; waiting for it "
                "(a second Ctrl-C abandons it)")

    def run(self) -> int:
        for signum in REQUESTS:
            signal.signal(signum, self._handle)
        self.launcher = start_launcher(self.command)
        while self.launcher.poll() is None or (self.request and alive([*self.ranks.values()])):
            if self.interrupts > 1:
                return self._abandon()
            self._watch()
            if self.request:
                self._stop_ranks()
            time.sleep(POLL_S)
        if self.request is None:
            return self.launcher.returncode
        return self._outcome()

    def _watch(self) -> None:
        for proc in ranks(tree(self.launcher.pid)):
            self.ranks.setdefault(proc.pid, proc)

    def _stop_ranks(self) -> None:
        """Tell each rank once, as soon as its handler is in place; freeze DeepSpeed's node launchers above
        them until no rank is left, then let the launchers exit."""
        live = alive([*self.ranks.values()])
        for proc in live:
            if proc.pid not in self.told and catches(proc.pid, FORWARDED):
                send(proc, FORWARDED)
                self.told.add(proc.pid)
            parent = _parent(proc)
            if parent is not None and parent.pid not in self.frozen \
                    and DEEPSPEED_NODE_LAUNCHER in " ".join(_cmdline(parent)):
                send(parent, signal.SIGSTOP)
                self.frozen[parent.pid] = parent
        if not live:
            for proc in self.frozen.values():
                send(proc, signal.SIGCONT)
            self.frozen.clear()

    def _outcome(self) -> int:
        """After a stop: wait for rank 0 (maybe on another node) to let go of the run dir, then judge."""
        holder = lock_holder(self.run_dir)
        if holder is not None and not self._ours(holder):
            say(f"{self.run_dir} is locked by another job ({holder}), not waiting for it")
            holder = None
        while holder is not None and self.interrupts < 2:
            time.sleep(POLL_S)
            if lock_holder(self.run_dir) != holder:  # released, or a newer job has it
                break
        saved = checkpoint_after(self.run_dir, self.requested_at)
        if saved is not None:
            say(f"stopped by {self.request}: {saved} is complete; run the same command again to resume")
            return 0
        if self.launcher.returncode == 0:
            return 0  # the run reached its end as the signal came
        say(f"error: stopped by {self.request}, but no checkpoint was completed after it (the launcher exited "
            f"{self.launcher.returncode}); resume=auto continues from the newest complete one")
        return self.launcher.returncode or 1

    def _ours(self, holder: str) -> bool:
        """Whether a lock holder ("pid N on HOST") can be this job's rank 0: one of its ranks here, or on
        another node."""
        match = re.fullmatch(r"pid (\d+) on (\S+)", holder)
        return match is None or match.group(2) != socket.gethostname() or int(match.group(1)) in self.ranks

    def _abandon(self) -> int:
        say("second interrupt: killing the job without its checkpoint")
        for proc in [*tree(self.launcher.pid), *alive([*self.ranks.values()])]:
            send(proc, signal.SIGKILL)
        self.launcher.wait()
        return 130


def _parent(proc: psutil.Process) -> psutil.Process | None:
    try:
        return proc.parent()
    except psutil.NoSuchProcess:
        return None


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def say(message: str) -> None:
    print(f"supervise: {message}", file=sys.stderr, flush=True)


def supervise_main(argv: Sequence[str] | None = None) -> int:
    """The supervised command's exit status; bad input (a mistyped key, a missing config, a command that is not
    there) is one `error:` line and exit 2, as the trainer's own, so a requeue script does not retry it as if a rank
    had been lost (1)."""
    import argparse

    from shortened import cli
    from shortened.config import ConfigError

    parser = cli.ArgumentParser(
        description="Run a training launcher (deepspeed, torchrun) so that a stop signal (SIGTERM, SIGUSR1, "
                    "Ctrl-C) returns only after every rank's checkpoint is complete, with exit 0.",
        usage="%(prog)s [--run-dir DIR] -- LAUNCHER ... launch/cpt.py --config RECIPE [key=value ...]")
    parser.add_argument("--run-dir", default=None,
                        help="the run's directory (default: from the command's --config and overrides)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launcher command line, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to supervise; put it after --")

    def supervise() -> int:
        run_dir = Path(args.run_dir).resolve() if args.run_dir else run_dir_of(command)
        return Supervisor(command, run_dir).run()

    return cli.run(supervise, (SuperviseError, ConfigError))
