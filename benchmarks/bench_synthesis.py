"""MedSynth synthesis benchmark: one run, side by side with a reference, ratios printed.

Reference: one bare fp32 forward of a plain pix2pix-3D generator (MONAI UNet,
channels 32-512, 2 residual units) on a full 240 x 240 x 155 volume (padded to
240 x 240 x 160), on the same threads.  Measured against it:

* end-to-end ``medsynth synthesize`` on a real 240 x 240 x 155 BraTS label map,
  in a fresh process (process start, imports, reading, model load, network,
  writing), with the child's peak resident memory; as users run it (with the
  mirror average) and with one forward pass (``--no-mirror-average``);
* the shipped model's network time alone in fp32 and, on a CPU with native bf16, bf16 (same process);
* the ROI re-render after a typical tumour edit, and its largest difference
  from a full re-synthesis inside the edited region;
* one training step (generator + discriminator) at the shipped configuration;
* the generator proposed for the retraining (``--proposed``, a training config: by default the SPADE
  generator of ``Resources/configs/spade_brats27.json``), with random weights of that architecture
  (speed does not depend on the values): its network in fp32 and bf16 on the brain box, and
  end-to-end ``medsynth synthesize`` with it.

Every time is the best of ``--repeat`` runs: on a shared machine the minimum is the least disturbed one.

Usage::

    .venv/bin/python benchmarks/bench_synthesis.py [--case DIR] [--threads N] [--json OUT] [--repeat N]
        [--proposed CONFIG | --proposed none]

Run it on an otherwise idle machine; the numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def reference_forward(threads: int) -> float:
    from monai.networks.nets import UNet

    torch.set_num_threads(threads)
    net = UNet(3, 7, 4, channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2), num_res_units=2).eval()
    x = torch.zeros(1, 7, 240, 240, 160)
    x[:, 0] = 1
    with torch.inference_mode():
        return best_of(REPEAT, lambda: net(x))


REPEAT = 2


def random_model(config_path: Path, intensity: dict, folder: Path) -> Path:
    """A model folder with random weights of the architecture in a training config."""
    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import Generator
    from MedSynthLib.training.train import TrainConfig

    config = TrainConfig.from_json(json.loads(config_path.read_text()), str(config_path))
    torch.manual_seed(0)
    generator = Generator(config.network, backend="torch")
    state = {k: v.detach().contiguous() for k, v in generator.state_dict().items()}
    return write_model(folder, state, {"name": folder.name, "description": f"random weights, {config_path.name}",
                                       "network": config.network.to_json(), "intensity": intensity})


def end_to_end(labels: Path, model: Path, out: Path, env: dict[str, str],
               extra: tuple[str, ...] = ()) -> tuple[float, dict]:
    """Best wall time of ``medsynth synthesize`` in a fresh process, and the child's own timings."""
    runs = []
    for i in range(REPEAT):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "MedSynthLib", "synthesize", str(labels), "-o", str(out / f"out{i}"),
                        "--model", str(model), *extra], check=True, env=env, stdout=subprocess.DEVNULL)
        runs.append(time.perf_counter() - start)
    return min(runs), json.loads((out / f"out{REPEAT - 1}" / "provenance.json").read_text())["timings_s"]


# The synthesize command in a child that reports its own high-water mark at the end.  The children's
# ru_maxrss cannot be used: Linux carries the parent's peak (this process, after the large reference
# forward) into a forked child across exec, so it would report the parent's memory.
_MEMORY_PROBE = ("import sys\n"
                 "from MedSynthLib.synthesis.runtime import avoid_hugepage_stalls\n"
                 "avoid_hugepage_stalls()  # as the medsynth program does\n"
                 "import MedSynthLib.cli as cli\n"
                 "cli._OWN_SHORT_PROCESS = True  # as the medsynth program sets it for synthesize\n"
                 "status = cli.main(['synthesize'] + sys.argv[1:])\n"
                 "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM:')).split()[1])\n"
                 "sys.exit(status)\n")


def child_peak_memory_gb(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Peak resident memory of ``medsynth synthesize ARGS`` in a fresh process, and how it was measured."""
    if not Path("/proc/self/status").exists():
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2, "ru_maxrss of children (upper bound)"
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *args], check=True, env=env, capture_output=True,
                          text=True)
    return int(done.stdout.strip().splitlines()[-1]) / 1024 ** 2, "VmHWM of the child process"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--case", type=Path, default=data / "brats2021" / "cases" / "BraTS2021_00000")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model", default=None, help="model name or folder (default: the shipped model)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs per measurement")
    parser.add_argument("--proposed", default=str(REPO / "Resources" / "configs" / "spade_brats27.json"),
                        help="training config of the generator proposed for retraining ('none': skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global REPEAT
    REPEAT = max(1, args.repeat)

    from MedSynthLib.cases.anatomy import derive_label_map
    from MedSynthLib.cases.readers import read_case
    from safetensors.torch import load_file

    from MedSynthLib.edits import Translate
    from MedSynthLib.schema.labelmap import write_label_map
    from MedSynthLib.synthesis.inference import brain_box, cpu_has_native_bf16, pick_precision
    from MedSynthLib.synthesis.models import resolve_model
    from MedSynthLib.synthesis.networks import Generator, build_discriminator, one_hot
    from MedSynthLib.synthesis.synthesize import SynthesisEngine
    from MedSynthLib.training.train import TrainConfig, discriminator_loss, generator_adversarial_loss

    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                 "torch": torch.__version__,
                                 "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
    model = resolve_model(args.model)
    results["model"] = {"name": model.name, "sha256": model.sha256}
    # bf16 is measured only where the CPU computes it natively; elsewhere torch emulates it (about 200x slower
    # than fp32 on an AVX2-only CPU) and `auto`, what users get, is fp32.
    native_bf16 = cpu_has_native_bf16()
    auto = pick_precision("auto", torch.device("cpu"))
    precisions = ("fp32", "bf16") if native_bf16 else ("fp32",)
    results["machine"].update(native_bf16=native_bf16, auto_precision=auto)

    print("reference: plain MONAI UNet 32-512, 2 res units, fp32, 240x240x160 ...", flush=True)
    results["reference_fp32_forward_s"] = reference_forward(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        labelmap = derive_label_map(read_case(args.case))
        write_label_map(labelmap, tmp / "labels.nii.gz")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        print("end to end: medsynth synthesize in a fresh process ...", flush=True)
        (tmp / "shipped").mkdir()
        results["end_to_end_s"], results["end_to_end_child_timings_s"] = end_to_end(
            tmp / "labels.nii.gz", model.path, tmp / "shipped", env)
        (tmp / "one_pass").mkdir()
        results["end_to_end_one_pass_s"], results["end_to_end_one_pass_child_timings_s"] = end_to_end(
            tmp / "labels.nii.gz", model.path, tmp / "one_pass", env, ("--no-mirror-average",))
        imports = []
        for _ in range(2):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c",
                            "import MedSynthLib.cli, MedSynthLib.synthesis.synthesize, torch, SimpleITK"],
                           check=True, env=env)
            imports.append(time.perf_counter() - start)
        results["process_start_and_imports_s"] = min(imports)
        results["end_to_end_peak_rss_gb"], results["end_to_end_peak_rss_method"] = child_peak_memory_gb(
            [str(tmp / "labels.nii.gz"), "-o", str(tmp / "out_memory"), "--model", str(model.path)], env)

        for precision in precisions:
            engine = SynthesisEngine(model, "cpu", precision)
            engine.synthesize(labelmap)
            results[f"network_{precision}_s"] = best_of(REPEAT, lambda: engine.synthesize(labelmap))

        if args.proposed != "none":
            proposed_path = Path(args.proposed)
            proposed = resolve_model(random_model(proposed_path, model.config["intensity"], tmp / "proposed_model"))
            results["proposed"] = {"config": proposed_path.name, "network": proposed.config["network"],
                                   "parameters": sum(v.numel() for v in load_file(str(proposed.weights)).values())}
            print(f"proposed generator ({proposed_path.name}), random weights ...", flush=True)
            (tmp / "proposed").mkdir()
            results["proposed"]["end_to_end_s"], results["proposed"]["end_to_end_child_timings_s"] = end_to_end(
                tmp / "labels.nii.gz", proposed.path, tmp / "proposed", env)
            for precision in precisions:
                engine = SynthesisEngine(proposed, "cpu", precision)
                engine.synthesize(labelmap)
                results["proposed"][f"network_{precision}_s"] = best_of(REPEAT, lambda: engine.synthesize(labelmap))
            results["proposed"]["brain_box"] = [s.stop - s.start for s in brain_box(labelmap.array)]

        engine = SynthesisEngine(model, "cpu", auto)
        previous = engine.synthesize(labelmap)
        edited = Translate((10.0, 0.0, 0.0))(labelmap)
        engine.rerender(previous, edited)
        results["rerender_s"] = best_of(3, lambda: engine.rerender(previous, edited))
        partial = engine.rerender(previous, edited)
        full = engine.synthesize(edited)
        changed = edited.array != labelmap.array
        diff = np.abs(partial.normalized[:, changed] - full.normalized[:, changed])
        results["rerender_changed_voxels"] = int(changed.sum())
        results["rerender_max_abs_diff_normalized"] = float(diff.max())
        results["rerender_mean_abs_diff_normalized"] = float(diff.mean())

    config = TrainConfig.from_json(json.loads((REPO / "Resources" / "configs" / "brats21_cpu.json").read_text()))
    net_cfg = config.network
    g, d = Generator(net_cfg), build_discriminator(net_cfg)
    opt_g = torch.optim.Adam(g.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    p = config.patch_size
    labels = torch.randint(0, 7, (1, p, p, p))
    real = torch.rand(1, 4, p, p, p) * 2 - 1

    def train_step() -> None:
        cond = one_hot(labels)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto == "bf16"):
            fake = g(cond)
            scores = d(torch.cat([torch.cat([cond, real], 1), torch.cat([cond, fake.detach()], 1)], 0))[-1].float()
        opt_d.zero_grad()
        discriminator_loss("lsgan", scores[:1], scores[1:]).backward()
        opt_d.step()
        opt_g.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto == "bf16"):
            score = d(torch.cat([cond, fake], 1))[-1].float()
        (100 * (fake.float() - real).abs().mean() + generator_adversarial_loss("lsgan", score)).backward()
        opt_g.step()

    train_step()
    results["train_step_s"] = best_of(3, train_step)
    results["train_patch"] = p

    ref = results["reference_fp32_forward_s"]
    rows = [
        ("reference: plain UNet 32-512 fp32 forward", ref),
        ("end-to-end medsynth synthesize (fresh process)", results["end_to_end_s"]),
        ("the same, one pass (--no-mirror-average)", results["end_to_end_one_pass_s"]),
        ("shipped network, fp32, mirror average", results["network_fp32_s"]),
        *([("shipped network, bf16, mirror average", results["network_bf16_s"])] if native_bf16 else []),
        (f"ROI re-render after a 10 mm move, {auto}", results["rerender_s"]),
        (f"training step G+D, {p}^3 patch, {auto}", results["train_step_s"]),
    ]
    if "proposed" in results:
        proposed = results["proposed"]
        rows += [
            (f"proposed ({proposed['config']}): end-to-end synthesize", proposed["end_to_end_s"]),
            ("proposed network, fp32", proposed["network_fp32_s"]),
            *([("proposed network, bf16", proposed["network_bf16_s"])] if native_bf16 else []),
        ]
    print(f"\n{'measurement':<50}{'seconds':>10}{'x reference':>14}")
    for name, seconds in rows:
        print(f"{name:<50}{seconds:>10.3f}{seconds / ref:>14.3f}")
    child = results["end_to_end_child_timings_s"]
    print(f"\nend to end, of which: process start + imports {results['process_start_and_imports_s']:.2f} s, "
          f"model load {child['load_model']:.2f} s, network {child['network']:.2f} s")
    print(f"end-to-end peak memory: {results['end_to_end_peak_rss_gb']:.2f} GB")
    if native_bf16:
        print(f"bf16 speed-up over fp32 (shipped network): {results['network_fp32_s'] / results['network_bf16_s']:.2f}x")
    else:
        print("bf16 not measured: this CPU has no native bf16 (auto precision is fp32)")
    print(f"re-render vs full re-synthesis inside the {results['rerender_changed_voxels']} changed voxels: "
          f"max |diff| {results['rerender_max_abs_diff_normalized']:.4f}, "
          f"mean {results['rerender_mean_abs_diff_normalized']:.5f} (normalised units, range 2)")
    results["ratios"] = {name: seconds / ref for name, seconds in rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
