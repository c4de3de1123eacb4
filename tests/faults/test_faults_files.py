"""Hostile configs and files: YAML and `--set` are data only, weights load without pickle,
checkpoints fail safe on a full disk or a foreign job, and services bind 127.0.0.1.

Already covered elsewhere: a half-written or corrupted checkpoint is ignored with a warning
and `latest` falls back (tests/test_checkpoint.py::test_half_written_checkpoint_is_detected_and_skipped),
an unwritable RUN_DIR (test_unwritable_run_dir_is_a_clear_error_and_keeps_the_previous),
resuming another job's run refused before any work (test_train_refuses_an_incompatible_run_before_starting),
credentials masked in loader logs (tests/test_stream.py::test_credentials_are_masked_in_urls_and_logs).
"""

from __future__ import annotations

import ast
import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch


from models.config import ConfigError
from trainer.checkpoint import Checkpoints, CheckpointError, resume_problem, validate
from tests.helpers import TINY_DECODER, TINY_PRIOR, merged, write_job

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "trainer", "data_pipeline", "launch")


class Payload:
    """Unpickling this runs `open(marker, "w")`: proof that a loader executed code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------- configs

def test_yaml_object_tags_are_refused_and_never_run(tmp_path):
    from launch.config_files import load_config

    marker = tmp_path / "pwned"
    for tag in (f"!!python/object/apply:os.system ['touch {marker}']",
                f"!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
                "!!python/name:os.system"):
        path = tmp_path / "evil.yaml"
        path.write_text(f"stage: prior\nname: {tag}\n")
        with pytest.raises(ConfigError, match="evil.yaml"):
            load_config(path)
    assert not marker.exists()


def test_set_values_are_yaml_data_never_objects(tmp_path):
    from launch.config_files import apply_override, load_config

    data: dict = {}
    for assignment, value in [("a.b=3", 3), ("a.c=1e-4", 1e-4), ("a.d=[1, 2]", [1, 2]), ("a.e=true", True),
                              ("a.f=os.system('x')", "os.system('x')"), ("a.g=", ""), ("a.h=__import__('os')", "__import__('os')")]:
        apply_override(data, assignment)
        key = assignment.split("=", 1)[0].split(".")[1]
        assert data["a"][key] == value and type(data["a"][key]) is type(value)
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError, match="--set a.x"):
        apply_override(data, f"a.x=!!python/object/apply:os.system ['touch {marker}']")
    assert not marker.exists()
    # through the CLI: a hostile --set is a usage error (exit 2) before any work
    from launch.cli import main

    config = write_job(tmp_path / "prior.yaml", TINY_PRIOR)
    code = main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run"), "--set",
                 f"train.steps=!!python/object/apply:os.system ['touch {marker}']"])
    assert code == 2 and not marker.exists() and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(config, ["train.steps=[1, 2]"])  # data, but the wrong type: named


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_no_unsafe_deserialisation_in_the_code():
    """Every torch.load passes weights_only=True; no pickle/yaml.load/unsafe np.load anywhere."""
    problems = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node, owner, name in _calls(tree):
                kw = {k.arg: k.value for k in node.keywords}
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if owner == "torch" and name == "load":
                    flag = kw.get("weights_only")
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
                if owner in ("pickle", "cPickle", "dill", "marshal") and name in ("load", "loads"):
                    problems.append(f"{where}: {owner}.{name}")
                if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                    loader = kw.get("Loader")
                    safe = isinstance(loader, ast.Name) and loader.id in ("_Loader", "SafeLoader", "CSafeLoader")
                    if not safe and not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                        problems.append(f"{where}: yaml.{name} without a safe Loader")
                if owner == "np" and name == "load":
                    flag = kw.get("allow_pickle")
                    if not (isinstance(flag, ast.Constant) and flag.value is False):
                        problems.append(f"{where}: np.load without allow_pickle=False")
    assert problems == []


# DeepSpeed entry points that read its checkpoint files with torch.load(weights_only=False)
_DEEPSPEED_READERS = ("load_checkpoint", "get_fp32_state_dict_from_zero_checkpoint",
                      "load_state_dict_from_zero_checkpoint", "convert_zero_checkpoint_to_fp32_state_dict")


def test_deepspeed_checkpoint_reads_in_the_code_are_weights_only():
    """Every call of a DeepSpeed checkpoint reader sits inside `with weights_only_loads()`, and
    DeepSpeed's converter is only ever run through trainer/safe_load.py."""
    problems, calls = [], 0
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT)
            tree = ast.parse(path.read_text(), str(path))
            guarded: set[int] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value == "deepspeed.checkpoint.ds_to_universal" and (
                        where != Path("trainer/safe_load.py")):
                    problems.append(f"{where}:{node.lineno}: runs ds_to_universal itself")
                if isinstance(node, ast.With) and any(
                    isinstance(item.context_expr, ast.Call)
                    and getattr(item.context_expr.func, "id", "") == "weights_only_loads"
                    for item in node.items
                ):
                    guarded.update(id(inner) for inner in ast.walk(node))
            for node, _, name in _calls(tree):
                if name in _DEEPSPEED_READERS:
                    calls += 1
                    if id(node) not in guarded:
                        problems.append(f"{where}:{node.lineno}: {name} outside `with weights_only_loads()`")
    assert calls >= 1  # Checkpoints.load_engine: the scan sees the call it guards
    assert problems == []


def test_exported_weights_load_through_safetensors_only(tmp_path):
    from models.loading import load_stage

    marker = tmp_path / "pwned"
    fake = tmp_path / "prior.safetensors"
    torch.save({"w": torch.zeros(1), "evil": Payload(marker)}, fake)  # a pickle wearing a safetensors name
    with pytest.raises(Exception) as err:
        load_stage(fake)
    assert not marker.exists(), f"loading {fake} ran code"
    assert "prior.safetensors" in str(err.value) or "header" in str(err.value).lower()


def _planted(path: Path, marker: Path, size: int = 0) -> Path:
    """A protocol-2 pickle whose unpickling creates `marker`, padded with zeros to `size` bytes
    (pickle stops at its STOP opcode; torch's legacy reader unpickles it as the file's header)."""
    data = pickle.dumps(Payload(marker), protocol=2)
    path.write_bytes(data + b"\0" * max(size - len(data), 0))
    return path


def test_deepspeed_shards_of_a_checkpoint_are_not_unpickled_unsafely(tmp_path, monkeypatch):
    """The engine `build_engine` returns reads DeepSpeed's shard files as weights only."""
    import deepspeed
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from launch.config_files import load_config
    from trainer.engine import build_engine
    from trainer.safe_load import UnsafeFileError

    class Engine:  # what deepspeed.initialize returns, as far as checkpoint loading goes
        checkpoint_engine, _config = TorchCheckpointEngine(), None

    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: (Engine(), None, None, None))
    engine, _ = build_engine(torch.nn.Linear(2, 2), load_config(write_job(tmp_path / "p.yaml", TINY_PRIOR)), 1, "cpu")
    marker = tmp_path / "pwned"
    shards = [tmp_path / "mp_rank_00_model_states.pt", tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    torch.save({"module": {"w": torch.zeros(1)}, "evil": Payload(marker)}, shards[0])  # torch's zip format
    _planted(shards[1], marker, size=4096)  # a bare pickle, torch's legacy format
    for shard in shards:
        # the call Checkpoints.load_engine -> engine.load_checkpoint makes for each shard
        with pytest.raises(UnsafeFileError, match=f"{shard.name}: refused by a weights-only load: .*GLOBAL io.open"):
            engine.checkpoint_engine.load(str(shard), map_location="cpu")
    assert not marker.exists(), "resuming from a checkpoint unpickled arbitrary objects"


def test_deepspeed_direct_torch_loads_are_weights_only_while_a_checkpoint_loads(tmp_path):
    """DeepSpeed's universal-checkpoint reader calls torch.load(weights_only=False) itself."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    from trainer.safe_load import UnsafeFileError, weights_only_loads

    marker = tmp_path / "pwned"
    (tmp_path / "universal" / "zero").mkdir(parents=True)
    planted = _planted(tmp_path / "universal" / "zero" / "optimizer_state.pt", marker)
    real_load, env = torch.load, os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    with weights_only_loads():
        with pytest.raises(UnsafeFileError, match=f"{planted}: refused"):
            # the universal path of engine.load_checkpoint (ZeRO 1/2 optimizers) starts with this
            ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir(object(), "lp", str(tmp_path / "universal"))
    assert not marker.exists(), "DeepSpeed's universal reader unpickled arbitrary objects"
    assert torch.load is real_load and os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == env  # only while loading


def test_the_allow_list_is_deepspeed_numbers_only(tmp_path):
    """What DeepSpeed stores loads back equal; the same classes carrying a callable, or a torn
    file, are refused naming the file."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from trainer.safe_load import UnsafeFileError, load_weights_only

    dynamic = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                consecutive_hysteresis=False, dtype=torch.float16)  # fp16 (GPU only)
    state = {"optimizer_state_dict": {
        "loss_scaler": LossScaler(1.0), "dynamic": dynamic, "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=128, start=0)}], "exp_avg": torch.arange(3.0),
    }}
    torch.save(state, tmp_path / "optim.pt")
    loaded = load_weights_only(tmp_path / "optim.pt")["optimizer_state_dict"]
    assert vars(loaded["loss_scaler"]) == {"cur_scale": 1.0, "dynamic": False}
    assert vars(loaded["dynamic"]) == vars(dynamic)
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(128, 0)
    assert torch.equal(loaded["exp_avg"], torch.arange(3.0))

    scaler = LossScaler(1.0)
    scaler.backward = torch._utils._rebuild_tensor_v2  # allowed to unpickle, but not to be called by DeepSpeed
    torch.save({"loss_scaler": scaler}, tmp_path / "callable.pt")
    with pytest.raises(UnsafeFileError, match="callable.pt: a LossScaler whose 'backward' is a function"):
        load_weights_only(tmp_path / "callable.pt")
    torn = tmp_path / "torn.pt"
    torn.write_bytes((tmp_path / "optim.pt").read_bytes()[:300])
    with pytest.raises(UnsafeFileError, match="torn.pt: unreadable"):
        load_weights_only(torn)


@pytest.mark.slow
def test_a_planted_deepspeed_shard_stops_the_resume_naming_it_and_loses_nothing(tmp_path):
    """A real run: a payload in place of an optimizer shard (same size, so only loading it could
    tell) fails the resume, and the universal conversion a new world size would need, with one
    clear line naming the file; nothing runs and every checkpoint stays as it was."""
    from trainer.checkpoint import convert_to_universal
    from tests.helpers import explain, latest_step, train

    job = merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": 4}, checkpoint={"every_steps": 2, "keep_last": 5})
    config = write_job(tmp_path / "prior.yaml", job)
    run_dir = tmp_path / "run"
    done = train(config, run_dir, nproc=1)
    assert done.returncode == 0, explain(done)
    ckpts = run_dir / "checkpoints"
    before = {p: p.read_bytes() for p in sorted(ckpts.rglob("*")) if p.is_file()}
    shard = ckpts / "step_0000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    _planted(shard, marker, size=len(before[shard]))
    assert validate(shard.parent) is None  # sizes match: the checkpoint looks complete
    named = f"{shard}: refused by a weights-only load: Unsupported global: GLOBAL io.open"

    refused = train(config, run_dir, "--set", "train.steps=6", nproc=1)
    assert refused.returncode == 1, explain(refused)
    assert not marker.exists(), f"resuming ran code from {shard}"
    line = next(line for line in refused.stderr.splitlines() if "cannot resume from" in line)
    assert named in line and "every checkpoint is left as it is" in line, line
    assert "Traceback" not in refused.stderr, explain(refused)
    # what a resume at another world size runs first (ds_to_universal reads every shard)
    problem = convert_to_universal(shard.parent, ckpts / "universal" / shard.parent.name)
    assert problem.startswith(f"cannot convert {shard.parent} to a universal checkpoint: {named}"), problem
    assert not marker.exists(), f"the universal conversion ran code from {shard}"
    assert latest_step(run_dir) == 4
    assert all(p.read_bytes() == data for p, data in before.items() if p != shard)  # nothing lost


def test_metrics_server_binds_loopback_unless_asked(tmp_path):
    """The socket the exporter actually listens on, from a job file as the CLI loads it."""
    import socket

    from launch.cli import build_parser
    from launch.train_cmd import load_train_job, metrics_overrides
    from trainer.metrics import Metrics

    config = write_job(tmp_path / "prior.yaml", TINY_PRIOR)
    for flags, host in (([], "127.0.0.1"), (["--metrics-host", "127.0.0.2"], "127.0.0.2")):  # asked: another address
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        args = build_parser().parse_args(["train", "--config", str(config), "--metrics-port", str(port), *flags])
        job = load_train_job(args.config, metrics_overrides(args))
        metrics = Metrics(job.name, job.stage, 0, 1, None, job.metrics, console=False).start()
        try:
            assert metrics.port == port and metrics._server.server_address[:2] == (host, port)
        finally:
            metrics.close()


# ---------------------------------------------------------------------------- checkpoints

class FullDiskEngine:
    """DeepSpeed's save, on a disk that fills up halfway through the first shard."""

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 37)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(root) / tag / "mp_rank_00_model_states.pt"))


class GoodEngine:
    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)


def _save(ckpts: Checkpoints, engine, step: int) -> Path:
    return ckpts.save(engine, step, rank_tensors={"ema/w": torch.ones(3)}, rank_state={"loader": {}},
                      buffers={}, meta={"step": step, "world_size": 1, "config": TINY_PRIOR})


def _full_disk_save(tmp_path):
    ckpts = Checkpoints(tmp_path / "checkpoints", 0, 1, keep_last=3)
    good = _save(ckpts, GoodEngine(), 5)
    try:
        _save(ckpts, FullDiskEngine(), 10)
    except Exception as err:  # noqa: BLE001 - the type is what the xfail below is about
        return ckpts, good, err
    raise AssertionError("a save on a full disk reported success")


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, caplog):
    ckpts, good, _ = _full_disk_save(tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000005"
    assert validate(good) is None and "no meta.json" in validate(tmp_path / "checkpoints" / "step_0000010")
    with caplog.at_level("WARNING"):
        assert ckpts.find_latest() == good  # the half-written step 10 is never picked
    # the next save (disk freed) replaces the partial directory and moves `latest` on
    assert _save(ckpts, GoodEngine(), 10) == tmp_path / "checkpoints" / "step_0000010"
    assert ckpts.find_latest().name == "step_0000010"


def test_disk_full_during_save_is_a_clear_checkpoint_error(tmp_path):
    _, _, err = _full_disk_save(tmp_path)
    assert isinstance(err, CheckpointError)
    assert "No space left on device" in str(err) and "previous checkpoint is intact" in str(err)


def test_a_checkpoint_of_another_stage_is_refused_naming_the_fields(tmp_path):
    problem = resume_problem({"config": TINY_PRIOR, "zero_stage": 2},
                             merged(TINY_DECODER, deepspeed={"zero_stage": 2}), tmp_path / "step_0000010")
    assert "incompatible job" in problem and "stage: checkpoint 'prior', config 'decoder'" in problem
    assert "model.dim: checkpoint 32, config None" in problem and "model.unet: checkpoint None" in problem
    assert "--no-resume" in problem
    same = resume_problem({"config": TINY_PRIOR, "zero_stage": 2},
                          merged(TINY_PRIOR, train={"steps": 99}, optim={"lr": 0.5}), tmp_path)
    assert same is None  # training-only keys may change between restarts


def test_meta_json_that_lies_about_completion_is_not_trusted(tmp_path):
    ckpts = Checkpoints(tmp_path / "checkpoints", 0, 1, keep_last=3)
    good = _save(ckpts, GoodEngine(), 5)
    forged = _save(ckpts, GoodEngine(), 10)
    meta = json.loads((forged / "meta.json").read_text())
    (forged / "rank_00000.safetensors").write_bytes(b"\0" * meta["files"]["rank_00000.safetensors"]["size"])
    assert "sha256" in validate(forged)  # same size, other bytes: the checksum catches it
    (forged / "meta.json").write_text('{"complete": true, "files": ')  # torn meta.json
    assert "unreadable meta.json" in validate(forged)
    assert ckpts.find_latest() == good
