"""The rerun state machine's decisions (megapre/train/rerun.py), driven as the training step
drives it, with one rank: each fault kind leads to Megatron's diagnosis and exit code."""
from __future__ import annotations

import math

import pytest

from megapre.errors import ConfigError
from megapre.train.rerun import (EXIT_FAILED_VALIDATION, EXIT_RESUME_TO_DISAMBIGUATE, Phase,
                                 RerunConfig, RerunMachine, relative_difference)


class Streams:
    """A stand-in for the random streams: capture/restore must bracket every re-run."""

    def __init__(self) -> None:
        self.value, self.captured, self.restored = 0, 0, 0

    def capture(self) -> int:
        self.captured += 1
        return self.value

    def restore(self, value: int) -> None:
        self.restored += 1
        self.value = value


def _machine(logs: list[str], identity=("node-a", 0), streams: Streams | None = None,
             **cfg) -> RerunMachine:
    streams = streams or Streams()
    return RerunMachine(RerunConfig(**{"mode": "validate_results", **cfg}), 0, list,
                        streams.capture, streams.restore, logs.append, identity)


def _step(machine: RerunMachine, losses, streams: Streams | None = None):
    """One training step: each run checks the next loss; returns (runs, halt)."""
    values = iter(losses)
    runs = 0
    for _ in machine.runs():
        if streams is not None:
            streams.value += 1  # the run draws from the streams
        machine.check_loss(next(values))
        runs += 1
    return runs, machine.halt()


def test_finite_losses_run_once_and_update():
    logs: list[str] = []
    m = _machine(logs)
    assert _step(m, [2.0]) == (1, None)
    assert _step(m, [1.9]) == (1, None)
    assert any("result validation enabled" in x for x in logs)


def test_the_first_step_of_a_job_is_not_checked():
    m = _machine([])
    assert _step(m, [math.nan]) == (1, None)  # no checkpoint could precede its update


def test_reproducible_nan_checkpoints_then_a_second_device_says_correct():
    logs: list[str] = []
    streams = Streams()
    m = _machine(logs, streams=streams)
    _step(m, [2.0], streams)
    runs, halt = _step(m, [math.nan, math.nan], streams)
    assert runs == 2 and halt.exit_code == EXIT_RESUME_TO_DISAMBIGUATE and halt.checkpoint
    assert m.phase == Phase.WILL_RERUN_FROM_CHECKPOINT
    # the re-run and the checkpoint start from the streams the step started from
    assert streams.value == 1 and streams.restored == 2
    saved = m.state_dict()
    assert saved["iteration"] == 2 and saved["initial_result"] == "nan"

    logs2: list[str] = []
    other = _machine(logs2, identity=("node-b", 3))
    other.load_state_dict(saved)
    runs, halt = _step(other, [math.nan])
    assert runs == 1 and halt.exit_code == EXIT_FAILED_VALIDATION and not halt.checkpoint
    assert any("correct result (but possible application error)" in x for x in logs2), logs2


def test_a_different_result_on_the_second_device_is_a_persistent_error():
    m = _machine([])
    _step(m, [2.0])
    _step(m, [math.inf, math.inf])
    logs: list[str] = []
    other = _machine(logs, identity=("node-b", 0))
    other.load_state_dict(m.state_dict())
    _, halt = _step(other, [1.8])
    assert halt.exit_code == EXIT_FAILED_VALIDATION
    assert any("possible persistent error!" in x and "node node-b" in x for x in logs), logs


def test_restarting_on_the_same_device_asks_for_other_hardware_again():
    m = _machine([])
    _step(m, [2.0])
    _step(m, [math.nan, math.nan])
    logs: list[str] = []
    same = _machine(logs, identity=("node-a", 0))
    same.load_state_dict(m.state_dict())
    _, halt = _step(same, [math.nan])
    assert halt.exit_code == EXIT_RESUME_TO_DISAMBIGUATE and not halt.checkpoint
    assert same.phase == Phase.AGAIN_FROM_CHECKPOINT


def test_a_nan_that_does_not_reproduce_is_transient():
    logs: list[str] = []
    m = _machine(logs)
    _step(m, [2.0])
    runs, halt = _step(m, [math.nan, 1.9])
    assert runs == 2 and halt.exit_code == EXIT_FAILED_VALIDATION and not halt.checkpoint
    assert any("possible transient error!" in x for x in logs)


def test_a_spike_is_reported_and_training_goes_on():
    logs: list[str] = []
    m = _machine(logs, check_spiky_loss=True)
    for _ in range(101):
        assert _step(m, [2.0]) == (1, None)
    runs, halt = _step(m, [25.0, 25.0])
    assert runs == 2 and halt is None and m.phase == Phase.IDLE
    assert any("Spiky loss" in x for x in logs)


def test_spike_scale_comes_from_the_first_hundred_values():
    m = _machine([])
    assert not any(m.unexpectedly_large(v, "loss") for v in [1.0, 3.0] + [2.0] * 98)
    assert not m.unexpectedly_large(29.9, "loss")
    assert m.unexpectedly_large(30.0, "loss")
    assert not m.unexpectedly_large(math.nan, "loss")


def test_grad_norm_checks_allow_a_tenth_of_a_percent():
    logs: list[str] = []
    m = _machine(logs)
    _step(m, [2.0])
    values = iter([math.nan, math.nan])
    for _ in m.runs():
        m.check_grad_norm(next(values))
    assert m.halt().exit_code == EXIT_RESUME_TO_DISAMBIGUATE


@pytest.mark.parametrize("kind,first_exit,second_log", [
    ("transient_error", EXIT_FAILED_VALIDATION, None),
    ("persistent_error", EXIT_RESUME_TO_DISAMBIGUATE, "possible persistent error!"),
    ("correct_result", EXIT_RESUME_TO_DISAMBIGUATE, "correct result"),
])
def test_injected_faults_follow_their_path(kind, first_exit, second_log):
    logs: list[str] = []
    m = _machine(logs, injection_rate=1, injection_type=kind)
    _step(m, [2.0])  # not checked: the first step
    runs, halt = _step(m, [1.9, 1.9])
    assert runs == 2 and halt.exit_code == first_exit
    assert any("injecting error type" in x for x in logs)
    if second_log is None:
        assert any("possible transient error!" in x for x in logs)
        return
    logs2: list[str] = []
    other = _machine(logs2, identity=("node-b", 0), injection_rate=1, injection_type=kind)
    other.load_state_dict(m.state_dict())
    _, halt = _step(other, [1.9])
    assert halt.exit_code == EXIT_FAILED_VALIDATION
    assert any(second_log in x for x in logs2), logs2


def test_report_stats_runs_every_step_twice_and_measures_the_difference():
    streams = Streams()
    m = RerunMachine(RerunConfig(mode="report_stats"), 0, list, streams.capture,
                     streams.restore, lambda _: None, ("n", 0))
    assert _step(m, [2.0, 2.0], streams) == (2, None)
    assert _step(m, [1.0, 1.001], streams) == (2, None)
    stats = m.take_stats()["loss"]
    assert stats["count"] == 2 and stats["max"] == pytest.approx(0.001 / 1.0005)
    assert streams.restored == 2  # each re-run drew the same random numbers
    assert m.take_stats() == {}


def test_tracker_file_records_megatron_lines(tmp_path):
    path = tmp_path / "rejected.txt"
    m = _machine([], tracker_file=str(path))
    _step(m, [2.0])
    _step(m, [math.nan, math.nan])
    lines = path.read_text().splitlines()
    assert [x.split(" status=")[1].split()[0] for x in lines] == [
        "initial_run", "first_rerun_reproducible"]
    assert "iteration=2" in lines[0] and "rank=0" in lines[0] and "jobID=" in lines[0]


def test_unwritable_tracker_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--result-rejected-tracker-filename"):
        _machine([], tracker_file=str(tmp_path / "missing-dir" / "x.txt"))


def test_relative_difference():
    assert relative_difference(2.0, 2.0) == 0.0
    assert relative_difference(math.nan, math.nan) == 0.0
    assert relative_difference(1.0, math.nan) == math.inf
    assert relative_difference(math.inf, 1.0) == math.inf
    assert relative_difference(1.0, 3.0) == pytest.approx(1.0)
