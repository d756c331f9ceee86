"""Slices per second of ivadomed's own 2D training-slice loading, on the phantom dataset of `ivado bench loader`.

The path is ivadomed's training loader as `ivadomed --train` builds it (main.py, training.py): BidsDataframe over
the BIDS folder, `loader.load_dataset(..., dataset_type="training")` (a BidsDataset, i.e. an
MRI2DSegmentationDataset), and a torch DataLoader with ivadomed's collate, shuffled, num_workers=0 (one process,
as ivadomed trains). The transforms are those of ivadomed's default config.json, which runtime/src/bench_loader.rs
also uses: Resample 0.75 x 0.75 mm, CenterCrop 128x128, RandomAffine (5 deg, scale 0.1, translate 0.03),
ElasticTransform (alpha 28-30, sigma 3.5-4.5, p 0.1), NormalizeInstance; batches of 32 (ivado's bench default).

Two epochs are timed:
  cold    building the dataset (load_dataset: opening every NIfTI, indexing and filtering the slices) + the
          first epoch; indexing the BIDS folder (BidsDataframe) is printed apart, outside the rate
  cached  the second epoch (ivadomed keeps the decoded volumes in memory, nibabel_cache=True; every transform,
          Resample included, still runs per slice)
Rates per wall second and per CPU-second of this process (what other load on the machine does not lower).

Run with the venv made by setup.sh, on the dataset `ivado bench loader` generated (the same folder):
  ~/.cache/ivado/ivadomed-venv/bin/python scripts/ivadomed/loader_bench.py \
      --data /tmp/ivado-bench-loader-data --subjects 50
"""

import argparse
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from torch.utils.data import DataLoader

from ivadomed import transforms as imed_transforms
from ivadomed.loader import loader as imed_loader
from ivadomed.loader import utils as imed_loader_utils
from ivadomed.loader.bids_dataframe import BidsDataframe

# ivadomed's default config.json transformation section (ivadomed/config/config.json).
TRANSFORMATION = {
    "Resample": {"hspace": 0.75, "wspace": 0.75, "dspace": 1},
    "CenterCrop": {"size": [128, 128]},
    "RandomAffine": {
        "degrees": 5,
        "scale": [0.1, 0.1],
        "translate": [0.03, 0.03],
        "applied_to": ["im", "gt"],
        "dataset_type": ["training"],
    },
    "ElasticTransform": {
        "alpha_range": [28.0, 30.0],
        "sigma_range": [3.5, 4.5],
        "p": 0.1,
        "applied_to": ["im", "gt"],
        "dataset_type": ["training"],
    },
    "NormalizeInstance": {"applied_to": ["im"]},
}


def cpu_seconds():
    """User + system CPU seconds of this process."""
    times = os.times()
    return times.user + times.system


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/tmp/ivado-bench-loader-data", help="BIDS folder of `ivado bench loader`")
    parser.add_argument(
        "--subjects", type=int, default=50, help="first N subjects (sorted) to load (default 50, as ivado's bench)"
    )
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32, as ivado's bench)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, one process)")
    args = parser.parse_args()

    data = Path(args.data)
    if not (data / "dataset_description.json").is_file():
        sys.exit(f"{data}: no dataset_description.json; run `ivado bench loader --data {data}` once to generate it")
    torch.set_num_threads(args.threads)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    logger.remove()  # ivadomed logs per file at INFO
    logger.add(sys.stderr, level="WARNING")
    warnings.filterwarnings("ignore", message=".*pin_memory.*")

    loader_params = {
        "path_data": [str(data)],
        "target_suffix": ["_seg-manual"],
        "extensions": [".nii.gz"],
        "roi_params": {"suffix": None, "slice_filter_roi": None},
        # main.py sets contrast_lst to the training contrasts before building the training set.
        "contrast_params": {"training_validation": ["T2w"], "testing": ["T2w"], "balance": {}, "contrast_lst": ["T2w"]},
        "slice_filter_params": {"filter_empty_mask": False, "filter_empty_input": True},
        "patch_filter_params": {"filter_empty_mask": False, "filter_empty_input": False},
        "slice_axis": "axial",
        "multichannel": False,
        "soft_gt": False,
        "is_input_dropout": False,
        "bids_validate": False,
    }
    model_params = {"name": "Unet", "depth": 3, "is_2d": True}
    path_output = tempfile.mkdtemp(prefix="ivadomed_loader_bench_")

    # Indexing the BIDS folder (pybids over every subject of the folder, not only those loaded) is left out of
    # the rates, as ivado's bench scans its index before timing too; it is printed on its own.
    index_wall = time.perf_counter()
    bids_df = BidsDataframe(loader_params, path_output, derivatives=True)
    index_wall = time.perf_counter() - index_wall
    images = bids_df.df[~bids_df.df["path"].str.contains("derivatives")]
    images = images[images["filename"].str.endswith("_T2w.nii.gz")]
    subjects = sorted(images["participant_id"].unique())[: args.subjects]
    if len(subjects) < args.subjects:
        sys.exit(f"{data} holds only {len(subjects)} subjects with a T2w image, --subjects asks {args.subjects}")
    data_list = sorted(images[images["participant_id"].isin(subjects)]["filename"].tolist())
    train_transforms, _, _ = imed_transforms.get_subdatasets_transforms(TRANSFORMATION)
    cold_wall, cold_cpu = time.perf_counter(), cpu_seconds()
    dataset = imed_loader.load_dataset(
        bids_df,
        **{
            **loader_params,
            "data_list": data_list,
            "transforms_params": train_transforms,
            "dataset_type": "training",
            "model_params": model_params,
        },
    )
    build_wall, build_cpu = time.perf_counter() - cold_wall, cpu_seconds() - cold_cpu
    loader = DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        pin_memory=True,
        collate_fn=imed_loader_utils.imed_collate,
        num_workers=0,
    )

    epochs = []
    for _ in range(2):
        wall, cpu, slices = time.perf_counter(), cpu_seconds(), 0
        for batch in loader:
            if tuple(batch["input"].shape[-2:]) != (128, 128):
                sys.exit(f"batch of shape {tuple(batch['input'].shape)}, expected 128x128 slices")
            slices += batch["input"].shape[0]
        epochs.append((slices, time.perf_counter() - wall, cpu_seconds() - cpu))

    (slices, first_wall, first_cpu), (_, second_wall, second_cpu) = epochs
    cold = slices / (build_wall + first_wall)
    cold_cpu_rate = slices / (build_cpu + first_cpu)
    cached = slices / second_wall
    cached_cpu_rate = slices / second_cpu
    print(
        f"ivadomed 2D training-slice loading, {len(subjects)} subjects of {data}, {slices} slices, "
        f"batches of {args.batch}, 1 process, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    )
    print(f"indexing the BIDS folder (not in the rates): {index_wall:.1f} s wall")
    print(f"building the dataset (load_dataset, in the cold rate): {build_wall:.1f} s wall, {build_cpu:.1f} CPU-s")
    print(f"{'epoch':<8} {'sl/s':>8} {'sl/CPU-s':>9} {'ms/slice':>9}")
    print(f"{'cold':<8} {cold:>8.0f} {cold_cpu_rate:>9.0f} {1000 / cold:>9.2f}")
    print(f"{'cached':<8} {cached:>8.0f} {cached_cpu_rate:>9.0f} {1000 / cached:>9.2f}")
    print(f"summary: --ivadomed-cold {cold:.0f} --ivadomed {cached:.0f}   (slices/s; per CPU-s: "
          f"{cold_cpu_rate:.0f} cold, {cached_cpu_rate:.0f} cached)")


if __name__ == "__main__":
    main()
