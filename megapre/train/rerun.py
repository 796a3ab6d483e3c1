"""Megatron's rerun state machine (`--rerun-mode validate_results`): attribute a suspicious
result (NaN/Inf loss or grad norm, a loss spike) to a transient fault, a faulty machine, or the
data and model themselves, by running the same step again.

1. The step's result is rejected: the step runs again in place, with the same micro-batches and
   the same random streams.
2. The re-run differs: a transient fault ("possible transient error"); the job exits 17 without
   updating the weights (resume from the last checkpoint).
3. The re-run reproduces it: a checkpoint is saved *before* the update and the job exits 16, to be
   restarted on other hardware. There the step runs a third time: a different result points at
   the first machine ("possible persistent error"), the same result at the input or the model
   ("correct result, possible application error"); both exit 17. Restarted on the same node and
   device, it exits 16 again and keeps the checkpoint.
Non-fatal checks (loss spikes, large gradients) only report and training goes on. The first step
of a job is not checked: no checkpoint can precede its update. `--rerun-mode report_stats` runs
every step twice and reports how far the results differ (non-determinism). `--error-injection-*`
fakes each kind of fault to test the path. Exit codes and the tracker-file format are Megatron's.
"""
from __future__ import annotations

import datetime
import enum
import math
import os
import random
import socket
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

EXIT_RESUME_TO_DISAMBIGUATE = 16  # restart from the saved checkpoint, on other hardware
EXIT_FAILED_VALIDATION = 17       # the attribution is complete (or the fault was transient)
SPIKE_FACTOR = 10.0               # a loss (grad norm) >= 10x the largest of the first 100 is a spike
SPIKE_SAMPLES = 100
MODES = ("disabled", "validate_results", "report_stats")
INJECTION_TYPES = ("correct_result", "transient_error", "persistent_error")
_INJECTION_NAMES = {"correct_result": "Expected result", "transient_error": "Transient error",
                    "persistent_error": "Persistent error"}
MISMATCH = math.inf


class Phase(enum.IntEnum):
    """Where the current step is in the attribution (Megatron's RerunState numbering)."""

    IDLE = 0
    INITIAL = 1
    IN_PLACE = 2
    WILL_RERUN_FROM_CHECKPOINT = 3
    FROM_CHECKPOINT = 4
    AGAIN_FROM_CHECKPOINT = 5


@dataclass(frozen=True)
class RerunConfig:
    mode: str = "disabled"
    check_nan_inf: bool = True          # --no-check-for-nan-in-loss-and-grad turns it off
    check_spiky_loss: bool = False
    check_large_grads: bool = False
    injection_rate: int = 0             # inject once in about N validations (0: never)
    injection_type: str = "transient_error"
    tracker_file: str | None = None     # --result-rejected-tracker-filename


@dataclass(frozen=True)
class Halt:
    """The step must not update the weights: save a checkpoint first if `checkpoint`, then exit
    with `exit_code`."""

    exit_code: int
    checkpoint: bool
    message: str


class RerunExit(SystemExit):
    """Raised by the training loop after a Halt (and its checkpoint): the process exits with
    Megatron's code."""

    def __init__(self, halt: Halt) -> None:
        super().__init__(halt.exit_code)
        self.halt = halt


def relative_difference(a: float, b: float) -> float:
    """0 for equal results (NaN equals NaN), inf when only one is finite or NaN."""
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
        return MISMATCH
    return abs((a - b) / (a + b) * 2) if a + b else MISMATCH


class ErrorInjector:
    """`--error-injection-rate N --error-injection-type T`: about one validation in N is
    rejected, and the re-runs then compare as fault T would make them."""

    def __init__(self, rate: int = 0, kind: str = "transient_error") -> None:
        self.rate, self.kind = rate, kind
        self.injected: str | None = None

    def maybe_inject(self, rank: int, log: Callable[[str], None]) -> bool:
        if self.rate <= 0 or self.injected is not None:
            return False
        if (random.randint(0, self.rate - 1) + rank) % self.rate:
            return False
        self.injected = self.kind
        log(f"WARNING: injecting error type {_INJECTION_NAMES[self.kind]}")
        return True

    def comparison(self, phase: Phase) -> float | None:
        """The faked comparison of a re-run with the initial result, or None (compare for real)."""
        if self.injected is None:
            return None
        kind = self.injected
        if phase == Phase.IN_PLACE:
            if kind == "transient_error":
                self.injected = None
                return MISMATCH
            return 0.0
        self.injected = None  # the re-run from the checkpoint settles the injection
        return MISMATCH if kind == "persistent_error" else 0.0

    def state_dict(self) -> dict:
        return {"rate": self.rate, "kind": self.kind, "injected": self.injected}

    def load_state_dict(self, state: dict) -> None:
        self.rate, self.kind, self.injected = state["rate"], state["kind"], state["injected"]


@dataclass
class _Stats:
    """Relative differences between a step's run and its re-run (report_stats)."""

    count: int = 0
    total: float = 0.0
    largest: float = 0.0

    def record(self, diff: float) -> None:
        self.count += 1
        self.total += diff
        self.largest = max(self.largest, diff)


@dataclass
class _Flags:
    """This rank's requests, OR-ed over all ranks before each decision."""

    rerun: bool = False
    checkpoint: bool = False
    restart_again: bool = False
    proceed: bool = False


def local_identity() -> tuple[str, int]:
    """(node, device) of this rank: the re-run from the checkpoint must run elsewhere."""
    import torch

    device = torch.cuda.current_device() if torch.cuda.is_available() else \
        int(os.environ.get("LOCAL_RANK", "0"))
    return socket.gethostname(), device


@dataclass
class RerunMachine:
    """One per rank. The step drives it:

        for _ in machine.runs():        # once, or again after a rejected result
            ... forward, backward ...   # machine.check_loss(...), machine.check_grad_norm(...)
        halt = machine.halt()           # None: update the weights; else save/exit as it says

    `any_rank([flags]) -> [flags]` ORs booleans over all ranks (a collective); `capture()` and
    `restore(state)` save and restore every random stream, so a re-run draws the same dropout.
    """

    cfg: RerunConfig
    rank: int
    any_rank: Callable[[list[bool]], list[bool]]
    capture: Callable[[], Any]
    restore: Callable[[Any], None]
    log: Callable[[str], None] = print
    identity: tuple[str, int] = field(default_factory=lambda: local_identity())
    phase: Phase = Phase.IDLE
    iteration: int = 0  # the step being validated (1-based once running)

    def __post_init__(self) -> None:
        self.injector = ErrorInjector(self.cfg.injection_rate, self.cfg.injection_type)
        self.flags = _Flags()
        self.first_step_done = False
        self.announced = False
        self.saved_rng: Any = None
        self.calls: dict[str, int] = defaultdict(int)
        self.failed_call: tuple[str, int] | None = None
        self.initial_result: float | None = None
        self.suspect: tuple[str, int] | None = None
        self.spike_counts: dict[str, int] = {}
        self.spike_max: dict[str, float] = {}
        self.results: dict[tuple[str, int], float] = {}
        self.stats: dict[str, _Stats] = defaultdict(_Stats)
        if self.cfg.tracker_file is not None:
            try:
                with open(self.cfg.tracker_file, "a"):
                    pass
            except OSError as e:
                from megapre.errors import ConfigError

                raise ConfigError(f"--result-rejected-tracker-filename {self.cfg.tracker_file}: "
                                  f"cannot append to it ({e.strerror}); give a writable path"
                                  ) from None

    @property
    def mode(self) -> str:
        return self.cfg.mode

    # -- driving the step ----------------------------------------------------------------
    def runs(self) -> Iterator[int]:
        """Yields once per run of the step's forward and backward."""
        n = 0
        while self._run_again():
            yield n
            n += 1

    def _run_again(self) -> bool:
        self.calls = defaultdict(int)
        if self.phase == Phase.IDLE:
            return self._start()
        if self.phase == Phase.INITIAL:
            return self._after_initial()
        if self.phase == Phase.IN_PLACE:
            return self._after_rerun_in_place()
        if self.phase == Phase.WILL_RERUN_FROM_CHECKPOINT:  # resumed from the saved checkpoint
            self.phase = Phase.FROM_CHECKPOINT
            return True
        if self.phase == Phase.FROM_CHECKPOINT:
            again, proceed = self.any_rank([self.flags.restart_again, self.flags.proceed])
            if again:
                self.log("WARNING: the job restarted on the node and device that reproduced the "
                         "result; resume it again from the same checkpoint on other hardware")
                self.phase = Phase.AGAIN_FROM_CHECKPOINT
            elif proceed:
                self.log("WARNING: the failed validation was not fatal; training goes on")
                self.phase = Phase.IDLE
            return False
        raise RuntimeError(f"rerun state machine: unexpected phase {self.phase!r}")

    def _start(self) -> bool:
        self.iteration += 1
        self.phase = Phase.INITIAL
        if self.mode != "disabled":
            self.saved_rng = self.capture()
            self.flags = _Flags()
            self.results = {}
        return True

    def _after_initial(self) -> bool:
        if self.mode == "disabled":
            self.phase = Phase.IDLE
            return False
        (again,) = self.any_rank([self.flags.rerun])
        if not again:
            self.phase = Phase.IDLE
            return False
        if self.mode == "validate_results" and self.rank == 0:
            self.log("WARNING: re-running the step to check whether its result reproduces")
        self.phase = Phase.IN_PLACE
        self.restore(self.saved_rng)
        return True

    def _after_rerun_in_place(self) -> bool:
        if self.mode == "report_stats":
            self.phase = Phase.IDLE
            return False
        proceed, checkpoint = self.any_rank([self.flags.proceed, self.flags.checkpoint])
        if proceed:
            self.log("WARNING: the failed validation was not fatal; training goes on")
            self.phase = Phase.IDLE
            return False
        if checkpoint:
            self.phase = Phase.WILL_RERUN_FROM_CHECKPOINT
        # the checkpoint (if any) must hold the random streams the step started from
        self.restore(self.saved_rng)
        return False

    def halt(self) -> Halt | None:
        """After the runs: may the step update the weights?"""
        self.first_step_done = True
        if self.mode != "validate_results":
            return None
        if self.phase == Phase.IN_PLACE:
            return Halt(EXIT_FAILED_VALIDATION, False, "exiting without updating the weights; "
                        "the job can resume from its last checkpoint")
        if self.phase == Phase.WILL_RERUN_FROM_CHECKPOINT:
            return Halt(EXIT_RESUME_TO_DISAMBIGUATE, True,
                        "saving a checkpoint of the state before this step and exiting; resume "
                        "the job from it on other hardware to re-run the step and settle the "
                        "diagnosis")
        if self.phase == Phase.FROM_CHECKPOINT:
            return Halt(EXIT_FAILED_VALIDATION, False, "exiting; the checkpoint before this step "
                        "is kept for examination")
        if self.phase == Phase.AGAIN_FROM_CHECKPOINT:
            return Halt(EXIT_RESUME_TO_DISAMBIGUATE, False,
                        "exiting; resume the job from the same checkpoint on other hardware")
        return None

    # -- the checks ------------------------------------------------------------------------
    def check_loss(self, loss: float) -> None:
        """A micro-batch's loss on this rank (as Megatron's loss function checks it)."""
        if self.mode == "report_stats":
            self.validate(loss, _never, "loss")
            return
        if self.cfg.check_nan_inf:
            self.validate(loss, math.isnan, "found NaN in local forward loss calculation")
            self.validate(loss, math.isinf, "found Inf in local forward loss calculation")
        if self.cfg.check_spiky_loss:
            self.validate(loss, lambda v: self.unexpectedly_large(v, "loss"), "Spiky loss",
                          fatal=False)

    def check_grad_norm(self, norm: float) -> None:
        """The step's gradient norm (0.1% tolerance: backward kernels may be non-deterministic)."""
        if self.mode == "report_stats":
            self.validate(norm, _never, "grad norm")
            return
        if self.cfg.check_nan_inf:
            self.validate(norm, math.isnan, "found NaN in the gradient norm", tolerance=1e-3)
            self.validate(norm, math.isinf, "found Inf in the gradient norm", tolerance=1e-3)
        if self.cfg.check_large_grads:
            self.validate(norm, lambda v: self.unexpectedly_large(v, "grads"),
                          "found unexpectedly large gradients", tolerance=1e-3, fatal=False)

    def unexpectedly_large(self, value: float, context: str) -> bool:
        """The first 100 values set the scale; later ones >= 10x its maximum are rejected."""
        value = abs(value)
        if math.isnan(value) or math.isinf(value):
            return False  # the NaN/Inf checks own those
        seen = self.spike_counts.get(context, 0)
        if seen < SPIKE_SAMPLES:
            self.spike_counts[context] = seen + 1
            self.spike_max[context] = max(self.spike_max.get(context, 0.0), value)
            return False
        return value >= self.spike_max[context] * SPIKE_FACTOR

    def validate(self, result: float, reject: Callable[[float], bool], message: str,
                 tolerance: float = 0.0, fatal: bool = True) -> None:
        """Check one result; the n-th call with a message in a re-run is compared with the n-th
        of the initial run (the step's control flow must not depend on the results)."""
        if self.mode == "disabled":
            return
        result = float(result)
        self.calls[message] += 1
        call = (message, self.calls[message])
        if self.mode == "report_stats":
            self._record_stats(call, result)
            return
        if not self.announced:
            self.announced = True
            if self.rank == 0:
                self.log("WARNING: result validation enabled (--rerun-mode validate_results)")
        if self.phase == Phase.INITIAL and not self.flags.rerun:
            self._first_check(call, result, reject, message)
        elif self.phase in (Phase.IN_PLACE, Phase.FROM_CHECKPOINT) and call == self.failed_call:
            diff = self.injector.comparison(self.phase)
            diff = relative_difference(self.initial_result, result) if diff is None else diff
            if self.phase == Phase.IN_PLACE:
                self._judge_in_place(diff > tolerance, result, message, fatal)
            else:
                self._judge_from_checkpoint(diff > tolerance, result, message, fatal)

    def _first_check(self, call: tuple[str, int], result: float,
                     reject: Callable[[float], bool], message: str) -> None:
        if not self.first_step_done:
            return
        if self.injector.maybe_inject(self.rank, self.log) or reject(result):
            self.failed_call, self.initial_result = call, result
            self.flags.rerun = True
            self._track("initial_run", result, message)
            self.log(f"ERROR: unexpected result {result} on rank {self.rank} at iteration "
                     f"{self.iteration} invocation {call[1]} (message='{message}')")

    def _judge_in_place(self, differs: bool, result: float, message: str, fatal: bool) -> None:
        if differs:
            self.flags.proceed = self.flags.proceed or not fatal
            self._track("first_rerun_not_reproducible", result, message)
            self._failure(f"first re-run: the unexpected result does not reproduce ({result} != "
                          f"{self.initial_result})", fatal)
            self._failure("possible transient error!", fatal)
            return
        if fatal:
            self.flags.checkpoint = True
        else:
            self.flags.proceed = True
        self.suspect = self.identity
        self._track("first_rerun_reproducible", result, message)
        self._failure(f"first re-run: the unexpected result reproduces ({result} = "
                      f"{self.initial_result}); re-running on other hardware to tell a faulty "
                      "device from a correct result", fatal)

    def _judge_from_checkpoint(self, differs: bool, result: float, message: str,
                               fatal: bool) -> None:
        if tuple(self.identity) == tuple(self.suspect or ()):
            self.log(f"ERROR: restarted on the same node and device {self.suspect}; resume again "
                     "from the same checkpoint on other hardware")
            self.flags.restart_again = True
            return
        if differs:
            self._track("second_rerun_not_reproducible", result, message)
            self.log(f"WARNING: second re-run on other hardware differs ({result} != "
                     f"{self.initial_result}): the first device likely computed it wrongly")
            self._failure("possible persistent error!", True)
        else:
            self._track("second_rerun_reproducible", result, message)
            self.log(f"WARNING: second re-run on other hardware reproduces the result ({result} "
                     f"= {self.initial_result}): it is likely correct")
            self._failure(f"correct result (but possible application error) ({message})", True)
        self.flags.proceed = self.flags.proceed or not fatal

    def _failure(self, text: str, fatal: bool) -> None:
        node, device = self.identity
        level = "ERROR" if fatal else "WARNING"
        self.log(f"{level}: rank {self.rank}, node {node}, device {device}, iteration "
                 f"{self.iteration}: {text}")

    def _track(self, status: str, result: float, message: str) -> None:
        """One line per event in --result-rejected-tracker-filename (Megatron's format)."""
        if self.cfg.tracker_file is None:
            return
        node, device = self.identity
        with open(self.cfg.tracker_file, "a") as f:
            f.write(f"ts={datetime.datetime.now()} node={node} device={device} "
                    f"jobID={os.environ.get('SLURM_JOBID', 'N/A')} rank={self.rank} "
                    f"iteration={self.iteration} status={status} result={result} "
                    f"message='{message}'\n")

    # -- report_stats ----------------------------------------------------------------------
    def _record_stats(self, call: tuple[str, int], result: float) -> None:
        if self.phase == Phase.INITIAL:
            self.flags.rerun = True
            self.results[call] = result
        elif self.phase == Phase.IN_PLACE and call in self.results:
            self.stats[call[0]].record(relative_difference(self.results[call], result))

    def take_stats(self) -> dict[str, dict[str, float]]:
        """This rank's determinism statistics since the last call, by check."""
        out = {m: {"count": s.count, "mean": s.total / s.count if s.count else 0.0,
                   "max": s.largest} for m, s in self.stats.items()}
        self.stats = defaultdict(_Stats)
        return out

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state: what a re-run from a checkpoint needs, and the spike scales."""
        return {"phase": int(self.phase), "iteration": self.iteration,
                "flags": vars(self.flags).copy(), "injector": self.injector.state_dict(),
                "failed_call": list(self.failed_call) if self.failed_call else None,
                "initial_result": _json_float(self.initial_result),
                "suspect": list(self.suspect) if self.suspect else None,
                "spike_counts": dict(self.spike_counts), "spike_max": dict(self.spike_max)}

    def load_state_dict(self, state: dict) -> None:
        self.phase = Phase(state["phase"])
        self.iteration = state["iteration"]
        self.flags = _Flags(**state["flags"])
        self.injector.load_state_dict(state["injector"])
        self.failed_call = tuple(state["failed_call"]) if state["failed_call"] else None
        self.initial_result = _from_json_float(state["initial_result"])
        self.suspect = tuple(state["suspect"]) if state["suspect"] else None
        self.spike_counts = dict(state["spike_counts"])
        self.spike_max = dict(state["spike_max"])


def _never(value: float) -> bool:
    return False


def _json_float(value: float | None) -> Any:
    """NaN and Inf as strings: checkpoint metadata is strict JSON."""
    if value is None or math.isfinite(value):
        return value
    return repr(value)


def _from_json_float(value: Any) -> float | None:
    return float(value) if isinstance(value, str) else value
