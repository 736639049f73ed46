"""PyTorch reference side of the sampler parity tests: runs diffusers schedulers the way their pipelines do.

  python tests/reference/scheduler_oracle.py spec.json

``spec.json`` holds ``{"cases": [{"name", "scheduler", "config", "num_steps", "step_kwargs"}], "inputs": npz,
"outputs": npz}``. The inputs hold ``x_T`` [B, H, W, C] and, per case, ``noise_<name>`` [S, B, H, W, C]: the noise
each stochastic step draws (every ``randn_tensor`` call inside the scheduler module returns the current step's
slice). The model is ``toy_model`` below, a fixed function of (x_t, t) that the jax test implements identically.
Outputs: ``traj_<name>`` [S, B, H, W, C], the sample after every step, and ``t_<name>``, the timesteps.

``"schedules": [{"name", "config"}]`` also writes, per DDPMScheduler config, ``betas_<name>``,
``alphas_cumprod_<name>``, and ``add_noise_<name>`` / ``velocity_<name>`` of the inputs ``x0``, ``noise``, ``t``.
"""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import torch

torch.set_grad_enabled(False)

MODULES = {
    "DDPMScheduler": "diffusers.schedulers.scheduling_ddpm",
    "DDIMScheduler": "diffusers.schedulers.scheduling_ddim",
    "PNDMScheduler": "diffusers.schedulers.scheduling_pndm",
    "DPMSolverMultistepScheduler": "diffusers.schedulers.scheduling_dpmsolver_multistep",
    "EulerDiscreteScheduler": "diffusers.schedulers.scheduling_euler_discrete",
    "EulerAncestralDiscreteScheduler": "diffusers.schedulers.scheduling_euler_ancestral_discrete",
}


def toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Keep in sync with tests/test_samplers.py::toy_model."""
    t = t.to(torch.float32)
    return 0.8 * torch.tanh(x) + 0.05 * x * (t / 1000.0) + 0.1 * torch.cos(t / 200.0)


def run_case(case: dict, x_T: np.ndarray, noise: np.ndarray | None):
    module = importlib.import_module(MODULES[case["scheduler"]])
    step_noise = {"i": 0}

    def fake_randn(shape, generator=None, device=None, dtype=None, **_):
        z = torch.from_numpy(np.ascontiguousarray(noise[step_noise["i"]]).transpose(0, 3, 1, 2).copy())
        assert tuple(z.shape) == tuple(shape), (z.shape, shape)
        return z.to(dtype or torch.float32)

    module.randn_tensor = fake_randn
    sched = getattr(module, case["scheduler"]).from_config(case["config"])
    sched.set_timesteps(case["num_steps"])
    latents = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()) * sched.init_noise_sigma
    traj = []
    for i, t in enumerate(sched.timesteps):
        step_noise["i"] = i
        inp = sched.scale_model_input(latents, t)
        out = toy_model(inp, t.expand(inp.shape[0]).reshape(-1, 1, 1, 1))
        latents = sched.step(out, t, latents, **case.get("step_kwargs", {})).prev_sample
        traj.append(latents.numpy().transpose(0, 2, 3, 1))
    return np.stack(traj), sched.timesteps.numpy().astype(np.float32)


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    inputs = dict(np.load(spec["inputs"]))
    out = {}
    for case in spec["cases"]:
        name = case["name"]
        traj, ts = run_case(case, inputs["x_T"], inputs.get(f"noise_{name}"))
        out[f"traj_{name}"], out[f"t_{name}"] = traj, ts
    from diffusers import DDPMScheduler

    for sched_spec in spec.get("schedules", []):
        name = sched_spec["name"]
        sched = DDPMScheduler.from_config(sched_spec["config"])
        x0, noise = (torch.from_numpy(inputs[k].transpose(0, 3, 1, 2).copy()) for k in ("x0", "noise"))
        t = torch.from_numpy(inputs["t"]).long()
        out[f"betas_{name}"] = sched.betas.numpy()
        out[f"alphas_cumprod_{name}"] = sched.alphas_cumprod.numpy()
        out[f"add_noise_{name}"] = sched.add_noise(x0, noise, t).numpy().transpose(0, 2, 3, 1)
        out[f"velocity_{name}"] = sched.get_velocity(x0, noise, t).numpy().transpose(0, 2, 3, 1)
    np.savez(spec["outputs"], **out)


if __name__ == "__main__":
    main(sys.argv[1])
