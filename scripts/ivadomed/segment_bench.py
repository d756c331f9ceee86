"""Seconds per volume of ivadomed's own `ivadomed.inference.segment_volume` on the cases of `ivado bench segment`.

The cases mirror runtime/src/bench_segment.rs:
  2d      ivadomed's default 2D U-Net (`models.Unet`, depth 3, 64 filters) on axial slices, batch 16
  2d_tta  the same, `--tta` passes with a random flip (ivadomed's `RandomReverse`, undone on the prediction)
  3d      ivadomed's 3D U-Net (`models.Unet(is_2d=False)`, depth 3, 16 filters) on 128x128x32 subvolumes
          (stride 128x128x32), batch 16
  3d_tta  the same with `--tta` flipped passes
  2d_unc, 3d_unc  the TTA rows plus ivadomed's uncertainty maps, as `ivadomed --test` makes them: each pass
          saved as `<stem>_pred_<i>.nii.gz`, then `uncertainty.run_uncertainty` on the folder (the `_pred` and
          `_soft` combination, `_unc-vox`, and the structure-wise `_unc-iou`, `_unc-cv`, `_unc-avgUnc`)
on a random float32 volume of 256x256x64 (1 mm isotropic, identity affine), no other preprocessing and no
postprocessing, like ivado's bench.

segment_volume has no test-time augmentation of its own: ivadomed's TTA is the aleatoric uncertainty of
`ivadomed --test` (testing.py), which runs the whole inference `n_it` times with the random transforms of the
testing set and averages the predictions. The TTA rows do the same through segment_volume: a model folder whose
testing transforms include RandomReverse, segmented `--tta` times, predictions averaged.

Run with the venv made by setup.sh:
  ~/.cache/ivado/ivadomed-venv/bin/python scripts/ivadomed/segment_bench.py [--repeats 1] [--warmup 1] [--tta 2]
The last line is the `ivado bench segment --ivadomed ...` arguments to paste.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

# torch >= 2.6 loads with weights_only=True by default; ivadomed saves and loads whole pickled models
# (torch.save(model) / torch.load(path) in inference.get_preds), so the old default is restored for this process.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from loguru import logger  # noqa: E402

import ivadomed.inference as imed_inference  # noqa: E402
import ivadomed.models as imed_models  # noqa: E402
import ivadomed.uncertainty as imed_uncertainty  # noqa: E402

CASES = {
    # label: (is_2d, n_filters, subvolume length or None, uses TTA, writes the uncertainty maps)
    "2d": (True, 64, None, False, False),
    "2d_tta": (True, 64, None, True, False),
    "2d_unc": (True, 64, None, True, True),
    "3d": (False, 16, [128, 128, 32], False, False),
    "3d_tta": (False, 16, [128, 128, 32], True, False),
    "3d_unc": (False, 16, [128, 128, 32], True, True),
}
BATCH_SIZE = 16  # ivado's bench segments with batch_size 16


class Timer:
    """Accumulates seconds spent in wrapped callables."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def cpu_seconds():
    """User + system CPU seconds of this process (all its threads)."""
    times = os.times()
    return times.user + times.system


def write_volume(path, shape, seed):
    """A uniform [0, 1) float32 volume, 1 mm isotropic, identity affine: what `ivado bench segment` generates."""
    data = np.random.default_rng(seed).random(shape, dtype=np.float32)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_zooms((1.0, 1.0, 1.0))
    nib.save(image, str(path))


def write_model_folder(root, label, is_2d, n_filters, length_3d, tta):
    """An ivadomed model folder (FOLDER/FOLDER.pt + FOLDER/FOLDER.json) as segment_volume reads it."""
    folder = Path(root, f"bench_{label}")
    folder.mkdir(parents=True, exist_ok=True)
    model = imed_models.Unet(in_channel=1, out_channel=1, depth=3, n_filters=n_filters, is_2d=is_2d)
    model.eval()
    torch.save(model, folder / f"{folder.name}.pt")
    transformation = {"NumpyToTensor": {}}
    if tta:
        # Random flips at test time, as ivadomed's aleatoric uncertainty applies the testing-set transforms.
        transformation = {"RandomReverse": {"dataset_type": ["testing"]}, "NumpyToTensor": {}}
    config = {
        "loader_parameters": {
            "target_suffix": ["_seg"],
            "slice_axis": "axial",
            "slice_filter_params": {"filter_empty_mask": False, "filter_empty_input": False},
        },
        "default_model": {"name": "Unet", "depth": 3, "n_filters": n_filters, "is_2d": is_2d},
        "training_parameters": {"batch_size": BATCH_SIZE},
        "transformation": transformation,
        "postprocessing": {},
    }
    if length_3d is not None:
        # kernel_3D comes from default_model.is_2d = false; the subvolume size is read from this section.
        config["Modified3DUNet"] = {"applied": False, "length_3D": length_3d, "stride_3D": length_3d}
    with open(folder / f"{folder.name}.json", "w") as handle:
        json.dump(config, handle, indent=2)
    return folder


def segment_once(folder, volume, passes, uncertainty_dir=None):
    """One end-to-end segmentation: `passes` calls of segment_volume, averaged when more than one. With
    `uncertainty_dir`, each pass is saved there and ivadomed's run_uncertainty computes and writes its maps."""
    predictions = []
    if uncertainty_dir is not None:
        # run_uncertainty skips a subject whose maps exist: start from an empty folder.
        shutil.rmtree(uncertainty_dir, ignore_errors=True)
        uncertainty_dir.mkdir(parents=True)
    for index in range(passes):
        nib_predictions, _ = imed_inference.segment_volume(str(folder), [str(volume)], gpu_id=-1)
        predictions.append(np.asarray(nib_predictions[0].dataobj, dtype=np.float32))
        if uncertainty_dir is not None:
            # run_uncertainty reads [X, Y, Z, class] predictions, as `ivadomed --test` writes them.
            image = nib_predictions[0]
            with_class = nib.Nifti1Image(predictions[-1][..., None], image.affine, image.header)
            nib.save(with_class, str(uncertainty_dir / f"bench_pred_{index}.nii.gz"))
    if uncertainty_dir is not None:
        imed_uncertainty.run_uncertainty(str(uncertainty_dir))
    return np.mean(predictions, axis=0) if len(predictions) > 1 else predictions[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="256,256,64", help="volume shape X,Y,Z (default 256,256,64)")
    parser.add_argument("--tta", type=int, default=2, help="passes of the TTA rows (default 2, as ivado's bench)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per case (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case before them (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--workdir", help="where the volume and model folders go (default: a temporary folder)")
    args = parser.parse_args()

    shape = tuple(int(s) for s in args.shape.split(","))
    labels = args.cases.split(",")
    unknown = [label for label in labels if label not in CASES]
    if unknown:
        sys.exit(f"--cases: unknown case(s) {unknown}; known: {list(CASES)}")
    torch.set_num_threads(args.threads)
    # ivadomed logs lines per call (INFO, and a WARNING that no ROI was given); keep the table readable.
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    warnings.filterwarnings("ignore", message=".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.*")

    # Model forward time (inside get_preds, which also torch.load()s the model for every batch).
    forward_timer, get_preds_timer = Timer(), Timer()
    imed_models.Unet.forward = forward_timer.wrap(imed_models.Unet.forward)
    imed_inference.get_preds = get_preds_timer.wrap(imed_inference.get_preds)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ivadomed_segment_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    volume = workdir / "generated_{}x{}x{}.nii".format(*shape)
    write_volume(volume, shape, seed=0)
    start = time.perf_counter()
    nib.load(str(volume)).get_fdata()
    read_seconds = time.perf_counter() - start

    print(
        f"ivadomed segment_volume on a generated {'x'.join(map(str, shape))} volume, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    print(f"(reading the uncompressed NIfTI once: {read_seconds:.2f} s, included below, as ivado's bench includes reading its .nii.gz)")
    print("forward: Unet.forward; load+fwd: inference.get_preds (torch.load of the model per batch + forward);")
    print("rest: s/volume - load+fwd (reading, slicing, transforms, undo, reassembly); CPU s: this process, user+sys")
    print(f"{'case':<8} {'passes':>6} {'s/volume':>10} {'CPU s':>8} {'forward s':>10} {'load+fwd s':>11} {'rest s':>8}")
    medians = {}
    for label in labels:
        is_2d, n_filters, length_3d, tta, uncertainty = CASES[label]
        passes = args.tta if tta else 1
        uncertainty_dir = workdir / f"uncertainty_{label}" if uncertainty else None
        folder = write_model_folder(workdir, label, is_2d, n_filters, length_3d, tta)
        runs = []
        for run in range(args.warmup + args.repeats):
            forward_timer.seconds = get_preds_timer.seconds = 0.0
            start, cpu_start = time.perf_counter(), cpu_seconds()
            prediction = segment_once(folder, volume, passes, uncertainty_dir)
            elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
            if prediction.shape != shape:
                sys.exit(f"{label}: prediction shape {prediction.shape} != volume shape {shape}")
            if run >= args.warmup:
                runs.append((elapsed, cpu, forward_timer.seconds, get_preds_timer.seconds))
        total, cpu, forward, get_preds = sorted(runs)[len(runs) // 2]
        medians[label] = total
        print(
            f"{label:<8} {passes:>6} {total:>10.2f} {cpu:>8.2f} {forward:>10.2f} {get_preds:>11.2f} "
            f"{total - get_preds:>8.2f}"
        )
        sys.stdout.flush()
    print("summary: " + " ".join(f"--ivadomed {label}={seconds:.2f}" for label, seconds in medians.items()))


if __name__ == "__main__":
    main()
