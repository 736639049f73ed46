"""Sampling and evaluation jobs on this machine, with PyTorch peers for the metric networks, in one run.

  bash benchmarks/sampling_jobs.sh                  # trains the demo first if runs/demo/txt2img is missing
  .venv/bin/python benchmarks/sampling_jobs.py --workdir=runs/demo/txt2img [--out=/tmp/ldm_jax_sampling_jobs_bench]

1. ``ldm_jax.sample`` on the demo model, ``--prompts_file=configs/demo_prompts.txt --num_per_prompt=N``, with 1 fake
   CPU device (``--per_device_batch=32``) and 8 (``--per_device_batch=4``): the same global batch of 32. Reads each
   job's ``summary.json`` (images/s with and without the first batch, which includes the compile). Then the 8-device
   job again into a new folder, killed with SIGKILL once a third of its images exist, and rerun: its
   ``done_before`` / ``made_this_run`` and whether its files equal the uninterrupted job's byte for byte.
2. A 1,002-image job (167 per demo prompt, 8 devices) is the sample set of ``ldm_jax.evaluate --samples`` on 8 fake
   devices against 1,000 images of the demo dataset (``shapes.generate_example``, the records the demo trains on,
   written as PNGs), with random FID Inception weights (``tests/metric_weights.write_fid_inception``) and a random
   transformers ``CLIPModel`` of OpenAI's ViT-B/16 shape (``save_pretrained``): one run with ``fid,kid,is`` and one
   with ``clip_score``, ``JAX_LOG_COMPILES=1`` so that the scorer's trace + lowering + XLA compile time can be taken
   out of the steady state.
3. Peers in the reference environment (``.venv-ref``, ``torch.set_num_threads(2)``): pytorch-fid's InceptionV3
   pool3 (``tests/reference/fid_oracle.py``'s module, the same weights from the .npz) and transformers
   ``CLIPModel.get_image_features`` (``CLIPImageProcessorPil``) + ``get_text_features`` (our token ids) from the same
   folder, on the same sample set (or its first ``--peer_images``), batch 50, after checking their features
   against ours on the first 16.

Runs itself in other roles as subprocesses (``--role``): ``setup`` and ``parity`` in ``.venv`` (jax),
``clip_weights`` and ``peer`` in ``.venv-ref`` (torch; no jax there). Prints a table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = "configs/demo_prompts.txt"
PARITY_IMAGES = 16
PEER_BATCH = 50


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--role", default="driver", choices=["driver", "setup", "parity", "clip_weights", "peer"])
    p.add_argument("--workdir", default="runs/demo/txt2img", help="A trained txt2img workdir (the demo's).")
    p.add_argument("--out", default="/tmp/ldm_jax_sampling_jobs_bench", help="Scratch folder (reused weights).")
    p.add_argument("--python", default=".venv/bin/python")
    p.add_argument("--ref_python", default=".venv-ref/bin/python")
    p.add_argument("--num_per_prompt", type=int, default=48, help="Throughput jobs: images per demo prompt (x6).")
    p.add_argument("--metric_per_prompt", type=int, default=167, help="Metric sample set: images per prompt (x6).")
    p.add_argument("--reference_images", type=int, default=1000)
    p.add_argument(
        "--peer_images",
        type=int,
        default=0,
        help="Images of the sample set the peers time (0: all of them; fewer to save time: the ratio compares "
        "steady-state images/s).",
    )
    p.add_argument("--skip", default="", help="Comma-separated parts to skip: sampling, resume, metrics, peers.")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ helpers


def _xla(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONPATH=ROOT)


def _run(cmd, env, log_path, kill_when=None):
    """Runs ``cmd`` from the repository root with output to ``log_path``; returns (rc, wall seconds, log text).
    ``kill_when()``: polled every 20 ms; when true, the process gets SIGKILL."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        killed = False
        if kill_when is not None:
            while p.poll() is None:
                if kill_when():
                    p.send_signal(signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.02)
        rc = p.wait()
    wall = time.perf_counter() - t0
    with open(log_path) as f:
        text = f.read()
    if rc != 0 and not killed:
        sys.stderr.write(text[-4000:])
        raise SystemExit(f"{' '.join(cmd)}: exit {rc} (log {log_path})")
    return rc, wall, text


def _pngs(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.endswith(".png") and n != "grid.png")


def _same_files(a: str, b: str, names) -> tuple[int, int]:
    equal = 0
    for n in names:
        with open(os.path.join(a, n), "rb") as fa, open(os.path.join(b, n), "rb") as fb:
            equal += fa.read() == fb.read()
    return equal, len(names)


_COMPILE = re.compile(
    r"Finished (tracing|jaxpr to MLIR module conversion|XLA compilation)(?: of)? (\S+)(?: for jit)? in ([0-9.]+) sec"
)


def _compile_seconds(log: str, name: str = "fn") -> tuple[list[float], float]:
    """JAX_LOG_COMPILES lines: per compilation of the function ``name`` (trace + lowering + XLA compile, in order of
    the XLA compiles), and the sum over every function of the process."""
    per, pending, total = [], 0.0, 0.0
    for stage, fun, secs in _COMPILE.findall(log):
        secs = float(secs)
        total += secs
        if fun.replace("jit(", "").rstrip(")").removeprefix("jit_") != name:
            continue
        pending += secs
        if stage == "XLA compilation":
            per.append(pending)
            pending = 0.0
    return per, total


# ------------------------------------------------------------------------------------------------ roles (jax)


def role_setup(a):
    """FID Inception random weights (.npz, pytorch-fid's layout) and the reference PNGs (demo dataset records)."""
    import numpy as np

    from ldm_jax.data import shapes
    from ldm_jax.imaging import save_png
    from tests.metric_weights import write_fid_inception

    fid_path = os.path.join(a.out, "fid_inception.npz")
    if not os.path.exists(fid_path):
        write_fid_inception(fid_path + ".tmp.npz", seed=0)
        os.replace(fid_path + ".tmp.npz", fid_path)
    ref = os.path.join(a.out, "reference")
    if len(_pngs(ref)) != a.reference_images:
        os.makedirs(ref, exist_ok=True)
        for i in range(a.reference_images):
            image = np.asarray(shapes.generate_example("train", i, 32, 0)["image"])
            save_png(os.path.join(ref, f"{i:05d}.png"), image)


def role_parity(a):
    """Our features of the sample set's first images (FID pool3, CLIP image and text embeddings) and the CLIP token
    ids of every caption, for the peers to compare with and to use."""
    import jax
    import numpy as np

    from ldm_jax import jax_setup
    from ldm_jax.evaluation import clip_score, fid, image_sets

    jax_setup.configure()
    images = image_sets.open_image_set(os.path.join(a.out, "samples_1k"))
    items = [images.item(i) for i in range(len(images))]
    first = np.stack([im for im, _ in items[:PARITY_IMAGES]])
    captions = [p for _, p in items]
    params = fid.load_fid_inception(os.path.join(a.out, "fid_inception.npz"))
    t0 = time.perf_counter()
    feats = np.asarray(fid.inception_features(params, first))
    t_fid = time.perf_counter() - t0
    scorer = clip_score.load_clip_scorer(os.path.join(a.out, "clip_vit_b16"))
    pixels = scorer.preprocess(first)
    tokens = scorer.tokenizer(captions)
    t0 = time.perf_counter()
    e_img = np.asarray(jax.jit(scorer.image_embeddings)(scorer.params, pixels))
    e_txt = np.asarray(jax.jit(scorer.text_embeddings)(scorer.params, tokens[:PARITY_IMAGES]))
    t_clip = time.perf_counter() - t0
    np.savez(
        os.path.join(a.out, "ours_parity.npz"),
        fid_features=feats,
        clip_pixels=pixels,
        clip_image=e_img,
        clip_text=e_txt,
        tokens=np.asarray(tokens, np.int64),
    )
    print(json.dumps(dict(first_call_fid_s=round(t_fid, 2), first_call_clip_s=round(t_clip, 2))))


# ------------------------------------------------------------------------------------------------ roles (torch)


def _torch_setup():
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
    import clip_oracle  # sets one thread and deterministic algorithms at import, undone below
    import fid_oracle

    # The peers as users run them: two threads (this machine's cores), torch's default algorithms.
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    return torch, clip_oracle, fid_oracle


def role_clip_weights(a):
    """A transformers CLIPModel of OpenAI ViT-B/16's shape (149.6M parameters), seeded random weights, saved with
    save_pretrained (safetensors)."""
    torch, clip_oracle, _ = _torch_setup()
    from transformers import CLIPModel

    folder = os.path.join(a.out, "clip_vit_b16")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return
    torch.manual_seed(0)
    model = clip_oracle._random_init(CLIPModel(clip_oracle.hf_openai_config("vit_b16")), seed=1)
    model.save_pretrained(folder + ".tmp")
    os.replace(folder + ".tmp", folder)


def _diff(ours, theirs) -> dict:
    import numpy as np

    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    d = float(np.abs(ours - theirs).max())
    return dict(
        max_abs_diff=d, max_abs=float(np.abs(theirs).max()), relative=d / max(float(np.abs(theirs).max()), 1e-30)
    )


def role_peer(a):
    import numpy as np
    from PIL import Image

    torch, clip_oracle, fid_oracle = _torch_setup()
    from transformers import CLIPImageProcessorPil, CLIPModel

    folder = os.path.join(a.out, "samples_1k")
    with open(os.path.join(folder, "manifest.jsonl")) as f:
        files = [json.loads(line)["file"] for line in f if line.strip()]
    ours = np.load(os.path.join(a.out, "ours_parity.npz"))
    n = a.peer_images or len(files)
    files = files[:n]

    def read(names):
        return [np.asarray(Image.open(os.path.join(folder, x)).convert("RGB")) for x in names]

    result = dict(images=n, batch=PEER_BATCH, threads=torch.get_num_threads(), torch=torch.__version__)

    # pytorch-fid's InceptionV3(output_blocks=[3]) on the same weights.
    t0 = time.perf_counter()
    with torch.device("meta"):
        inception = fid_oracle.FIDInception3()
    inception.to_empty(device="cpu")
    sd = {k: torch.from_numpy(v) for k, v in np.load(os.path.join(a.out, "fid_inception.npz")).items()}
    missing, unexpected = inception.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.endswith("num_batches_tracked")]
    if bad or unexpected:
        raise SystemExit(f"FID weights do not fit the torch module: missing {bad[:5]}, unexpected {unexpected[:5]}")
    for m in inception.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked.zero_()
    net = fid_oracle.InceptionV3(inception, 299).eval()
    result["fid_load_s"] = round(time.perf_counter() - t0, 2)

    def fid_batch(images):
        x = torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))).float() / 255.0
        return net(x)[:, :, 0, 0].numpy()

    result["fid_parity"] = _diff(ours["fid_features"], fid_batch(read(files[:PARITY_IMAGES])))

    # transformers CLIPModel from the folder ldm_jax reads.
    t0 = time.perf_counter()
    clip = CLIPModel.from_pretrained(os.path.join(a.out, "clip_vit_b16")).eval()
    size = clip.config.vision_config.image_size
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    result["clip_load_s"] = round(time.perf_counter() - t0, 2)
    tokens = torch.from_numpy(ours["tokens"])

    def clip_batch(names, lo):
        pixels = processor(images=read(names), return_tensors="pt")["pixel_values"]
        image = clip_oracle._features(clip.get_image_features(pixel_values=pixels))
        text = clip_oracle._features(clip.get_text_features(input_ids=tokens[lo : lo + len(names)]))
        return pixels, image, text

    pixels, image, text = clip_batch(files[:PARITY_IMAGES], 0)
    result["clip_parity"] = dict(
        pixels=_diff(ours["clip_pixels"], pixels.numpy().transpose(0, 2, 3, 1)),
        image=_diff(ours["clip_image"], image),
        text=_diff(ours["clip_text"], text),
    )
    print(json.dumps(result), flush=True)

    def timed(fn):
        times = []
        t0 = time.perf_counter()
        for lo in range(0, n, PEER_BATCH):
            t = time.perf_counter()
            fn(files[lo : lo + PEER_BATCH], lo)
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        first = min(PEER_BATCH, n)
        steady = total - times[0]
        return dict(
            total_s=round(total, 2),
            first_batch_s=round(times[0], 2),
            images_per_s=round(n / total, 2),
            steady_images_per_s=round((n - first) / steady, 2) if n > first else None,
        )

    result["fid"] = timed(lambda names, lo: fid_batch(read(names)))
    print(json.dumps(dict(fid=result["fid"])), flush=True)
    result["clip"] = timed(clip_batch)
    with open(os.path.join(a.out, "peer.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ driver


def driver(a):
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    py, ref_py = a.python, a.ref_python
    me = os.path.join("benchmarks", "sampling_jobs.py")
    skip = set(filter(None, a.skip.split(",")))
    res = dict(workdir=a.workdir, out=out, commands=[])
    t_start = time.perf_counter()

    def note(cmd, devices=None, extra_env=""):
        prefix = f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} " if devices else ""
        res["commands"].append(prefix + extra_env + " ".join(cmd))

    # Set-up (not timed): weights and reference images, reused between runs of this script.
    t0 = time.perf_counter()
    _run([py, me, "--role=setup", f"--out={out}", f"--reference_images={a.reference_images}"], _xla(1),
         f"{out}/setup.log")  # fmt: skip
    _run([ref_py, me, "--role=clip_weights", f"--out={out}"], dict(os.environ), f"{out}/clip_weights.log")
    res["setup_s"] = round(time.perf_counter() - t0, 1)
    print(f"set-up: {res['setup_s']} s", flush=True)

    def sample(name, devices, pdb, per_prompt, kill_at=None):
        outdir = f"{out}/{name}"
        cmd = [py, "-m", "ldm_jax.sample", f"--workdir={a.workdir}", f"--prompts_file={PROMPTS}",
               f"--num_per_prompt={per_prompt}", f"--per_device_batch={pdb}", f"--outdir={outdir}"]  # fmt: skip
        kill = (lambda: len(_pngs(outdir)) >= kill_at) if kill_at else None
        rc, wall, _ = _run(cmd, _xla(devices), f"{outdir}.{'killed' if kill_at else 'run'}.log", kill)
        if kill_at:
            return dict(rc=rc, wall_s=round(wall, 1), pngs_at_kill=len(_pngs(outdir)))
        note(cmd, devices)
        with open(f"{outdir}/summary.json") as f:
            s = json.load(f)
        keep = ("num_images", "done_before", "made_this_run", "missing", "seconds", "first_batch_seconds",
                "images_per_second", "images_per_second_after_first_batch", "devices", "batch_size")  # fmt: skip
        row = {k: s[k] for k in keep}
        row.update(wall_s=round(wall, 1), per_device_batch=pdb, settings={
            k: s["settings"].get(k) for k in ("sampler", "num_steps", "guidance_scale", "image_size", "checkpoint_step")
        })  # fmt: skip
        return row

    total = 6 * a.num_per_prompt
    if "sampling" not in skip:
        for name in ("s1", "s8", "s8_resumed", "samples_1k"):
            subprocess.run(["rm", "-rf", f"{out}/{name}"], check=True)
        res["sample_1dev"] = sample("s1", 1, 32, a.num_per_prompt)
        print(json.dumps(res["sample_1dev"]), flush=True)
        res["sample_8dev"] = sample("s8", 8, 4, a.num_per_prompt)
        print(json.dumps(res["sample_8dev"]), flush=True)
        names = _pngs(f"{out}/s8")
        res["s1_vs_s8_equal_pngs"] = _same_files(f"{out}/s1", f"{out}/s8", names)
        if "resume" not in skip:
            killed = sample("s8_resumed", 8, 4, a.num_per_prompt, kill_at=total // 3)
            resumed = sample("s8_resumed", 8, 4, a.num_per_prompt)
            # grid.png exists for jobs up to 256 images.
            others = [n for n in ("manifest.jsonl", "job.json", "grid.png") if os.path.exists(f"{out}/s8/{n}")]
            res["resume"] = dict(
                killed=killed,
                done_before=resumed["done_before"],
                made_this_run=resumed["made_this_run"],
                missing=resumed["missing"],
                resumed_wall_s=resumed["wall_s"],
                equal_pngs=_same_files(f"{out}/s8", f"{out}/s8_resumed", names),
                equal_other=_same_files(f"{out}/s8", f"{out}/s8_resumed", others),
            )
            print(json.dumps(res["resume"]), flush=True)
        res["sample_1k_8dev"] = sample("samples_1k", 8, 4, a.metric_per_prompt)
        print(json.dumps(res["sample_1k_8dev"]), flush=True)

    if "peers" not in skip:
        _, wall, text = _run([py, me, "--role=parity", f"--out={out}"], _xla(1), f"{out}/parity.log")
        print(text.strip().splitlines()[-1], flush=True)
        cmd = [ref_py, me, "--role=peer", f"--out={out}", f"--peer_images={a.peer_images}"]
        _, wall, _ = _run(cmd, dict(os.environ), f"{out}/peer.log")
        note(cmd)
        with open(f"{out}/peer.json") as f:
            res["peer"] = json.load(f)
        print(json.dumps(res["peer"]), flush=True)

    if "metrics" not in skip:
        common = [py, "-m", "ldm_jax.evaluate", f"--samples={out}/samples_1k", f"--fid_weights={out}/fid_inception.npz",
                  f"--clip_weights={out}/clip_vit_b16", "--reference_cache="]  # fmt: skip
        env = dict(_xla(8), JAX_LOG_COMPILES="1")
        for key, metrics, extra in (
            ("inception", "fid,kid,is", [f"--reference={out}/reference"]),
            ("clip", "clip_score", []),
        ):
            cmd = common + extra + [f"--metrics={metrics}", f"--out={out}/metrics_{key}.json"]
            _, wall, log = _run(cmd, env, f"{out}/metrics_{key}.log")
            note(cmd, 8, "JAX_LOG_COMPILES=1 ")
            with open(f"{out}/metrics_{key}.json") as f:
                m = json.load(f)
            per, all_compiles = _compile_seconds(log)
            row = dict(wall_s=round(wall, 1), seconds=m["seconds"], num_samples=m["num_samples"],
                       num_reference=m["num_reference"], scorer_compiles_s=[round(x, 2) for x in per],
                       all_compiles_s=round(all_compiles, 2),
                       values={k: m[k] for k in ("fid", "kid_mean", "is_mean", "clip_score") if k in m})  # fmt: skip
            # The samples pass compiles the scorer last (the reference pass, when there is one, compiled its own).
            steady = m["seconds"]["samples"] - (per[-1] if per else 0.0)
            row.update(
                samples_steady_s=round(steady, 2), samples_steady_images_per_s=round(m["num_samples"] / steady, 2)
            )
            if m["num_reference"] and len(per) >= 2:
                ref_steady = m["seconds"]["reference"] - per[0]
                row.update(reference_steady_s=round(ref_steady, 2),
                           reference_steady_images_per_s=round(m["num_reference"] / ref_steady, 2))  # fmt: skip
            res[f"metrics_{key}"] = row
            print(json.dumps(row), flush=True)

    res["total_s"] = round(time.perf_counter() - t_start, 1)
    with open(f"{out}/results.json", "w") as f:
        json.dump(res, f, indent=2)
    print_table(res)


def print_table(r):
    def f(x, d=2):
        return "-" if x is None else f"{x:.{d}f}"

    print("\n## Commands")
    for c in r["commands"]:
        print("  " + c)
    if "sample_1dev" in r:
        s1, s8 = r["sample_1dev"], r["sample_8dev"]
        st = s1["settings"]
        print(f"\n## Sampling jobs ({st['sampler']} {st['num_steps']} steps, guidance {st['guidance_scale']}, "
              f"{st['image_size']} px, checkpoint step {st['checkpoint_step']})")  # fmt: skip
        print("| job | devices x per-device batch | images | process wall s | first batch s | images/s | "
              "images/s after first batch |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        rows = [("1 device", s1), ("8 devices", s8), ("8 devices, metric set", r.get("sample_1k_8dev"))]
        for name, s in rows:
            if s:
                print(f"| {name} | {s['devices']} x {s['per_device_batch']} | {s['made_this_run']} | {s['wall_s']} | "
                      f"{f(s['first_batch_seconds'])} | {f(s['images_per_second'])} | "
                      f"{f(s['images_per_second_after_first_batch'])} |")  # fmt: skip
        ratio = s8["images_per_second_after_first_batch"] / s1["images_per_second_after_first_batch"]
        print(f"8 devices / 1 device, steady images/s: {ratio:.2f}x; "
              f"first batch {s8['first_batch_seconds'] / s1['first_batch_seconds']:.2f}x")  # fmt: skip
        print(f"1-device vs 8-device PNGs byte-identical: {r['s1_vs_s8_equal_pngs'][0]}/{r['s1_vs_s8_equal_pngs'][1]}")
        if "resume" in r:
            x = r["resume"]
            print(f"resume: SIGKILL at {x['killed']['pngs_at_kill']} PNGs ({x['killed']['wall_s']} s in); rerun: "
                  f"done_before={x['done_before']} made_this_run={x['made_this_run']} missing={x['missing']} "
                  f"({x['resumed_wall_s']} s); PNGs equal to the uninterrupted job {x['equal_pngs'][0]}/"
                  f"{x['equal_pngs'][1]}, manifest/job/grid equal {x['equal_other'][0]}/{x['equal_other'][1]}")  # fmt: skip
    if "metrics_inception" in r or "peer" in r:
        print("\n## Metrics (ldm_jax.evaluate --samples, 8 fake devices, per-device batch 16) vs PyTorch peers")
        p = r.get("peer", {})
        if p:
            fp, cp = p["fid_parity"], p["clip_parity"]
            print(f"parity on {PARITY_IMAGES} images: FID pool3 max abs diff {fp['max_abs_diff']:.2e} (max |x| "
                  f"{fp['max_abs']:.3g}); CLIP pixels {cp['pixels']['max_abs_diff']:.2e}, image emb "
                  f"{cp['image']['max_abs_diff']:.2e} (max {cp['image']['max_abs']:.3g}), text emb "
                  f"{cp['text']['max_abs_diff']:.2e} (max {cp['text']['max_abs']:.3g})")  # fmt: skip
        print("| network | ours: wall s (process) | ours: pass s | ours: compile s | ours: steady images/s | "
              "peer: s | peer: steady images/s | ours/peer time (steady) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        mi, mc = r.get("metrics_inception"), r.get("metrics_clip")
        if mi:
            comp = mi["scorer_compiles_s"]
            print(f"| FID Inception, reference ({mi['num_reference']} images; fid,kid) | {mi['wall_s']} (whole run) | "
                  f"{mi['seconds']['reference']} | {f(comp[0] if comp else None)} | "
                  f"{f(mi.get('reference_steady_images_per_s'))} | | | |")  # fmt: skip
            pf = p.get("fid", {})
            ratio = (pf["steady_images_per_s"] / mi["samples_steady_images_per_s"]) if pf else None
            print(f"| FID Inception, samples ({mi['num_samples']} images; fid,kid,is) | | {mi['seconds']['samples']} | "
                  f"{f(comp[-1] if comp else None)} | {mi['samples_steady_images_per_s']} | {pf.get('total_s', '-')} | "
                  f"{pf.get('steady_images_per_s', '-')} | {f(ratio)} |")  # fmt: skip
        if mc:
            pc = p.get("clip", {})
            comp = mc["scorer_compiles_s"]
            ratio = (pc["steady_images_per_s"] / mc["samples_steady_images_per_s"]) if pc else None
            print(f"| CLIP ViT-B/16 image + text ({mc['num_samples']} pairs) | {mc['wall_s']} | {mc['seconds']['samples']} "
                  f"| {f(comp[-1] if comp else None)} | {mc['samples_steady_images_per_s']} | {pc.get('total_s', '-')} | "
                  f"{pc.get('steady_images_per_s', '-')} | {f(ratio)} |")  # fmt: skip
        if mi:
            print(f"values (random weights): {mi['values']} {mc['values'] if mc else ''}")
    print(f"\nbenchmark wall time {r['total_s']} s; results in {r['out']}/results.json")


def main():
    a = _args()
    os.chdir(ROOT)
    if a.role != "driver" and ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    {"driver": driver, "setup": role_setup, "parity": role_parity, "clip_weights": role_clip_weights,
     "peer": role_peer}[a.role](a)  # fmt: skip


if __name__ == "__main__":
    main()
