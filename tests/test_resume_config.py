"""A run resumed under another config: changes to what the steps compute are refused by field, the others pass, and
``--allow_config_change`` resumes while keeping the old config (training/resume_config.py)."""

import copy
import json
import os
import shutil
import sys

import pytest
from cli import run_module, two_process_job, wait_for

from ldm_jax import config_lib
from ldm_jax.training import resume_config


def test_changes_are_the_fields_both_configs_hold_with_other_values():
    saved = {"data": {"global_batch_size": 64, "source": ""}, "optim": {"lr": 1e-3}, "old_field": 1, "seed": 0}
    current = {
        "data": {"global_batch_size": 32, "source": "latents:x"},
        "optim": {"lr": 0.001},
        "new_field": 2,
        "seed": 0,
    }
    # 1e-3 and 0.001 are one float; a field only one side holds comes from another version of the code.
    assert resume_config.changes(saved, current) == [
        ("data.global_batch_size", 64, 32),
        ("data.source", "", "latents:x"),
    ]


MAY_CHANGE = "train.num_steps train.preview_every data.data_dir sample.guidance_scale eval.every mesh.fsdp init_from"
MAY_NOT = (
    "data.global_batch_size data.source optim.lr unet.block_out_channels seed task train.grad_accum_steps "
    "diffusion.prediction_type first_stage.workdir samples data.data_dir_x"
)


def test_which_fields_may_change():
    assert all(resume_config.may_change(name) for name in MAY_CHANGE.split())
    assert not any(resume_config.may_change(name) for name in MAY_NOT.split())


def test_num_steps_may_change_under_a_constant_rate_not_under_a_cosine_schedule(tmp_path):
    """The cosine decay runs over train.num_steps: resuming a 1500-step run to 3000 would jump from its final rate
    back to about half the peak."""
    import ml_collections

    def config(schedule, steps):
        return ml_collections.ConfigDict({"optim": {"schedule": schedule}, "train": {"num_steps": steps}})

    for schedule, refused in (("constant", False), ("cosine", True)):
        (tmp_path / "config.json").write_text(config(schedule, 1500).to_json())
        if refused:
            with pytest.raises(config_lib.ConfigError, match=r"train\.num_steps 1500 -> 3000 \(the cosine schedule"):
                resume_config.check(config(schedule, 3000), str(tmp_path), 1500, allow_change=False)
        found = resume_config.check(config(schedule, 3000), str(tmp_path), 1500, allow_change=refused)
        assert found == [("train.num_steps", 1500, 3000)]


@pytest.fixture
def finished_run(txt2img_workdir, tmp_path):
    """A copy of the session's finished tiny txt2img run (its checkpoints, config.json and previews)."""
    work = str(tmp_path / "run")
    shutil.copytree(txt2img_workdir, work)
    return work


def _read(path):
    with open(path) as f:
        return json.load(f)


def _snapshot(work):
    """Every file under ``work``, by path, with its bytes."""
    out = {}
    for root, _, files in os.walk(work):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), work)] = f.read()
    return out


def test_the_cli_refuses_a_resume_that_changes_the_recipe_and_changes_nothing(finished_run, data_dir,
                                                                             first_stage_workdir):  # fmt: skip
    saved = _read(os.path.join(finished_run, "config.json"))
    before = _snapshot(finished_run)
    batch = saved["data"]["global_batch_size"]
    proc = run_module(
        "ldm_jax.train",
        "--config=configs/txt2img.py:tiny",
        f"--workdir={finished_run}",
        f"--config.data.data_dir={data_dir}",
        f"--config.first_stage.workdir={first_stage_workdir}",
        f"--config.data.global_batch_size={batch * 2}",
        "--config.optim.lr=0.5",
        "--config.train.preview_every=0",  # may change: not named
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err
    assert f"data.global_batch_size {batch} -> {batch * 2}" in err, err[-3000:]
    assert f"optim.lr {json.dumps(saved['optim']['lr'])} -> 0.5" in err, err[-3000:]
    assert "2 field(s) differ" in err and "preview_every" not in err
    assert "--allow_config_change" in err
    # Nothing written: the config, the checkpoints and everything else are as they were.
    assert _snapshot(finished_run) == before


def test_allowed_changes_resume_and_keep_every_previous_config(finished_run, txt2img_config):
    from ldm_jax.training.loop import train_and_evaluate

    saved = _read(os.path.join(finished_run, "config.json"))
    step = saved["train"]["num_steps"]
    config = copy.deepcopy(txt2img_config)
    config.train.preview_every = saved["train"]["preview_every"] + 1  # may change
    config.optim.lr = saved["optim"]["lr"] * 2  # may not
    with pytest.raises(config_lib.ConfigError, match=r"optim\.lr .* -> "):
        train_and_evaluate(config, finished_run)

    config.optim.lr = saved["optim"]["lr"]
    state = train_and_evaluate(config, finished_run)  # a finished run: nothing left to train
    assert int(state.step) == step
    first = os.path.join(finished_run, f"config.before_step{step}.json")
    assert _read(first) == saved
    assert _read(os.path.join(finished_run, "config.json"))["train"]["preview_every"] == (
        saved["train"]["preview_every"] + 1
    )

    config.optim.lr = saved["optim"]["lr"] * 2
    train_and_evaluate(config, finished_run, allow_config_change=True)
    second = os.path.join(finished_run, f"config.before_step{step}.1.json")
    assert _read(first) == saved  # not overwritten by the second resume at the same step
    assert _read(second)["train"]["preview_every"] == saved["train"]["preview_every"] + 1
    assert _read(os.path.join(finished_run, "config.json"))["optim"]["lr"] == saved["optim"]["lr"] * 2

    # The same config again: nothing changed, nothing kept.
    train_and_evaluate(config, finished_run)
    assert not os.path.exists(os.path.join(finished_run, f"config.before_step{step}.2.json"))


def test_a_first_stage_with_other_weights_under_the_same_path_is_refused(finished_run, txt2img_config):
    """The config is the same, the weights behind first_stage.workdir are not (trained on since, or replaced):
    resuming would go on in another latent space. Refused by name unless --allow_config_change; the recorded
    fingerprint is the weights'."""
    import glob

    from ldm_jax.data import latent_cache
    from ldm_jax.training.checkpoint import load_trained_params
    from ldm_jax.training.loop import train_and_evaluate

    newest = max((d for d in os.listdir(os.path.join(finished_run, "checkpoints")) if d.isdigit()), key=int)
    files = glob.glob(os.path.join(finished_run, "checkpoints", newest, "meta", "*"))
    (meta_file,) = [p for p in files if os.path.isfile(p) and "frozen_inputs" in open(p).read()]
    meta = _read(meta_file)
    recorded = meta["frozen_inputs"]["first_stage"]
    fs_params, _, fs_step = load_trained_params(txt2img_config.first_stage.workdir, "ema")
    assert recorded["fingerprint"] == latent_cache.fingerprint(fs_params) and recorded["step"] == fs_step
    meta["frozen_inputs"]["first_stage"]["fingerprint"] = "0" * 64  # as if trained with other first-stage weights
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    before = _snapshot(finished_run)
    with pytest.raises(config_lib.ConfigError, match=r"first_stage\.workdir=.* holds other weights \(step \d+\) than"):
        train_and_evaluate(txt2img_config, finished_run)
    assert _snapshot(finished_run) == before
    train_and_evaluate(txt2img_config, finished_run, allow_config_change=True)  # on purpose: goes on


def test_two_processes_refuse_the_same_changes_and_write_nothing(finished_run, data_dir, first_stage_workdir, tmp_path):
    """Every process compares the configs before any of them restores: both stop with the same message, exit status
    2, and neither writes (the first process to pass would otherwise wait for its peer in the restore forever)."""
    saved = _read(os.path.join(finished_run, "config.json"))
    before = _snapshot(finished_run)
    batch = saved["data"]["global_batch_size"]
    argv = [
        sys.executable, "-m", "ldm_jax.train", "--config=configs/txt2img.py:tiny", f"--workdir={finished_run}",
        f"--config.data.data_dir={data_dir}", f"--config.first_stage.workdir={first_stage_workdir}",
        f"--config.data.global_batch_size={batch * 2}",
    ]  # fmt: skip
    procs = two_process_job(argv, str(tmp_path / "job"))
    logs = wait_for(procs, timeout=300, stop_on_failure=False)
    assert [p.returncode for p in procs] == [2, 2], logs
    for log in logs:
        assert f"data.global_batch_size {batch} -> {batch * 2}" in log, log[-3000:]
    assert _snapshot(finished_run) == before
