"""Fault-handling pieces without Ray: configs, the checkpoint directory, resume of a directory."""

from __future__ import annotations

import json

import pytest

from emulator import faults
from emulator.config import load_config
from emulator.faults import (
    CheckpointDir,
    Supervisor,
    checkpoint_step,
    deadlines,
    newest_checkpoint,
    remove_spill_dir,
)
from emulator.train import resolve_resume


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("runtime.health_timeout_s", 0),
        ("runtime.rpc_timeout_s", -1.0),
        ("runtime.min_bandwidth_bytes_per_s", float("inf")),
        ("runtime.max_restarts", -1),
    ],
)
def test_bad_runtime_liveness_settings_name_the_field(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(overrides={key: value})


def test_deadlines_come_from_runtime():
    config = load_config(
        overrides={"runtime.rpc_timeout_s": 5.0, "runtime.min_bandwidth_bytes_per_s": 1000.0}
    )
    assert deadlines(config.runtime).for_bytes(0) == 5.0
    assert deadlines(config.runtime).for_bytes(2000) == 7.0
    assert deadlines(config.runtime).for_layer(1000) == config.runtime.layer_timeout_s + 1.0


def test_periodic_checkpoints_need_a_directory():
    with pytest.raises(ValueError, match=r"checkpoint\.every_steps = 5 needs checkpoint\.dir"):
        load_config(overrides={"checkpoint.every_steps": 5})
    with pytest.raises(ValueError, match=r"checkpoint\.keep = 0"):
        load_config(overrides={"checkpoint.keep": 0})


def test_unwritable_checkpoint_dir_is_caught_up_front(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = load_config(overrides={"checkpoint.dir": str(blocker / "sub")})
    with pytest.raises(ValueError, match=r"checkpoint\.dir = .* is not a writable directory"):
        CheckpointDir(config.checkpoint).check_writable()
    ok = load_config(overrides={"checkpoint.dir": str(tmp_path / "new" / "dir")})
    CheckpointDir(ok.checkpoint).check_writable()
    assert (tmp_path / "new" / "dir").is_dir()


def test_checkpoints_are_due_every_n_steps_from_the_first():
    config = load_config(overrides={"checkpoint.every_steps": 3, "checkpoint.dir": "unused"})
    due = [s for s in range(10, 20) if CheckpointDir(config.checkpoint).due(s, first_step=10)]
    assert due == [12, 15, 18]


def _run_dir(tmp_path, steps, final_step):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for step in steps:
        (directory / f"step-{step:08d}.pt").write_bytes(b"")
    (directory / ".step-00000099.pt.tmp").write_bytes(b"")  # a save that never finished
    (directory / "run.json").write_text(json.dumps({"final_step": final_step, "seed": 0}))
    return directory


def test_newest_checkpoint_and_the_steps_left(tmp_path):
    directory = _run_dir(tmp_path, [4, 8], final_step=20)
    path, final_step = newest_checkpoint(directory)
    assert checkpoint_step(path) == 8 and final_step == 20
    config = resolve_resume(load_config(overrides={"resume": str(directory), "num_steps": 20}))
    assert config.resume == path and config.num_steps == 12
    auto = resolve_resume(
        load_config(overrides={"resume": "auto", "checkpoint.dir": str(directory)})
    )
    assert auto.resume == path and auto.num_steps == 12


def test_resume_of_a_finished_or_empty_run_dir_says_so(tmp_path):
    directory = _run_dir(tmp_path, [20], final_step=20)
    with pytest.raises(ValueError, match="already finished"):
        resolve_resume(load_config(overrides={"resume": str(directory)}))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="without checkpoints"):
        resolve_resume(load_config(overrides={"resume": str(empty)}))
    with pytest.raises(ValueError, match=r"resume = 'auto' needs checkpoint\.dir"):
        resolve_resume(load_config(overrides={"resume": "auto"}))


def test_cli_prints_one_paragraph_keeps_the_report_and_exits_1(tmp_path, monkeypatch, capsys):
    import emulator.train
    from emulator.cli import main
    from emulator.faults import RunFailed

    def fails(config, progress, stop=None, final_weights=True):
        failed = RunFailed(
            "node-1 was lost during step 2 (refused), and the run has already replaced 0 "
            "components, runtime.max_restarts = 0; raise runtime.max_restarts.",
            component="node-1",
            step=2,
            cause="refused",
        )
        failed.partial = {"completed": False, "steps": [{"step": 0}, {"step": 1}]}
        failed.checkpoint = str(tmp_path / "step-00000002.pt")
        raise failed

    monkeypatch.setattr(emulator.train, "train", fails)
    report = tmp_path / "report.json"
    status = main(["train", "--quiet", "--json", str(report)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "node-1" in err and "step 2" in err and "step-00000002.pt" in err
    assert json.loads(report.read_text())["steps"] == [{"step": 0}, {"step": 1}]


def test_a_probe_asks_one_component_per_process(monkeypatch):
    # The process is the fault unit: with many nodes to a process, a probe costs an RPC per
    # process, not per node (else the probes of a step would grow as N squared).
    asked = []

    class Health:
        def __init__(self, address, security):
            self.address = address

        def start_check(self, timeout_s):
            asked.append(self.address)
            return self

        def problem(self):
            return "health check failed: UNAVAILABLE" if self.address == "n:1" else None

    class Cluster:
        security = None
        processes = {"memoryx": object(), "node-0": object()}
        processes["node-1"] = processes["node-2"] = processes["node-0"]
        processes["swarmx-0-0"] = processes["swarmx-0-1"] = object()
        addresses = {name: f"{name[0]}:{i}" for i, name in enumerate(processes)}

        def handle(self, name):
            return self.processes[name]

    monkeypatch.setattr(faults, "HealthClient", Health)
    monkeypatch.setattr(Supervisor, "_ray_verdict", lambda self, name: "Ray reports it dead")
    config = load_config()
    supervisor = Supervisor(
        cluster=Cluster(), runtime=config.runtime, checkpoints=CheckpointDir(config.checkpoint)
    )
    problems = supervisor.probe()
    assert asked == ["m:0", "n:1", "s:4"]
    # The member asked names the lost process (recover replaces every member with it).
    assert problems == {"node-0": "health check failed: UNAVAILABLE; Ray reports it dead"}


def test_a_lost_servers_spill_directory_is_removed_only_inside_the_spill_root(tmp_path):
    root, elsewhere = tmp_path / "spill", tmp_path / "elsewhere"
    lost = root / "memoryx-1-4242-abcd"
    (lost / "layers").mkdir(parents=True)
    (lost / "layers" / "0.safetensors").write_bytes(b"x")
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"x")
    (lost / "link").symlink_to(elsewhere)  # a symlink inside is unlinked, never followed
    assert remove_spill_dir(lost, root)
    assert not lost.exists() and (elsewhere / "keep").exists()
    # A symlink named like a spill directory, a directory outside the root, and one the
    # server did not name: all left alone.
    outside = tmp_path / "memoryx-0-1-x"
    outside.mkdir()
    (root / "memoryx-0-2-y").symlink_to(outside)
    (root / "user-data").mkdir()
    assert not remove_spill_dir(root / "memoryx-0-2-y", root)
    assert not remove_spill_dir(outside, root)
    assert not remove_spill_dir(root / "user-data", root)
    assert not remove_spill_dir(root / "memoryx-9-missing", root)
    assert outside.is_dir() and (root / "user-data").is_dir()


def test_a_full_checkpoint_disk_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    import shutil

    from emulator import preflight
    from emulator.prepare import check_memoryx, prepare_layers

    config = load_config(
        overrides={
            "model.name": "mlp-digits",
            "checkpoint.every_steps": 1,
            "checkpoint.dir": str(tmp_path / "ckpt"),
            "save_checkpoint": str(tmp_path / "final.pt"),
        }
    )
    layers, _ = prepare_layers(config)
    check_memoryx(config, layers)  # this disk has room
    (tmp_path / "ckpt").mkdir()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(
        ValueError, match=r"checkpoint\.dir = .* 1000 bytes free, but one checkpoint"
    ):
        check_memoryx(config, layers)
    config = load_config(
        overrides={"model.name": "mlp-digits", "save_checkpoint": str(tmp_path / "final.pt")}
    )
    with pytest.raises(ValueError, match=r"save_checkpoint = .* 1000 bytes free"):
        check_memoryx(config, layers)


def test_ray_that_cannot_start_ends_the_run_in_one_paragraph(monkeypatch, capsys):
    from emulator import cli, runtime, train

    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "shutdown", lambda: None)

    def overloaded(**kwargs):
        raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.setattr(runtime.ray, "init", overloaded)
    with pytest.raises(RuntimeError, match=r"Ray could not start on this machine \(The current"):
        runtime.ensure_ray(None)

    def no_cluster(*args, **kwargs):
        runtime.ensure_ray(None)

    monkeypatch.setattr(train, "launch", no_cluster)
    status = cli.main(["train", "--model", "mlp-digits", "--steps", "1", "--nodes", "2", "--quiet"])
    out, err = capsys.readouterr()
    assert status == 1, out + err
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1
    assert err.startswith("wafer train: error: the cluster did not start: Ray could not start")
