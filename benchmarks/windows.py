"""Which HU window lets a linear patch embedding see a finding? Cross-validated logistic regression on the model
scale's patch means (what a linear patch embedding averaged over its voxels can carry), per window.

  python benchmarks/windows.py --site SITE_DIR [--task emphysema] [--window=-1300,150 --window=-1000,-900 ...]

Written for issue 14: emphysema (LAA-950, a per-voxel threshold) is invisible to patch means in the wide lung
window and plain in a window that clips at the threshold (m3fm/tasks.py LOW_ATTENUATION_WINDOW). A measurement.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from client.site import load_site
from m3fm.data.datasets import QADataset, SiteData, crop_of
from m3fm.model.configs import get_config
from m3fm.tasks import REGION_SCALE, HUWindow, get_task

def patch_means(x: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """x: (S, H, W) -> the mean of each (ps, ph, pw) patch, flattened."""
    (S, H, W), (ps, ph, pw) = x.shape, patch
    return x.reshape(S // ps, ps, H // ph, ph, W // pw, pw).mean((1, 3, 5)).ravel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", type=Path, required=True, help="an ingested site folder")
    ap.add_argument("--task", default="emphysema", help="a yes/no task on the chest or heart crop")
    ap.add_argument("--window", action="append", help="LOW,HIGH in HU (write --window=-1300,150); repeatable; "
                    "default: the lung window, a mid one, the low-attenuation one, and the task's own")
    args = ap.parse_args()
    site = load_site(args.site)
    data = SiteData(site.database_url, site.work_dir, get_config(site.model_config))
    task = get_task(args.task)
    scale = data.cfg.scale(REGION_SCALE[task.region])
    ds = QADataset(data, None, tasks=[task.name], train=False)  # every split: this measures the input, not a model
    items = [(ds[i]["exam_id"], ds[i]["answer"] == 0) for i in range(len(ds))]
    y = np.array([b for _, b in items])
    rows = []
    windows = [HUWindow(*(float(v) for v in w.split(","))) for w in args.window or ["-1300,150", "-1100,-500", "-1000,-900"]]
    for window in dict.fromkeys([*windows, task.hu_window]):
        X = np.array([patch_means(data.image(data.series[e][0], crop_of(task.region), window)[0][0], scale.patch)
                      for e, _ in items])
        auc = cross_val_score(LogisticRegression(max_iter=2000, C=10), X, y, cv=5, scoring="roc_auc")
        rows.append({"window (HU)": f"{window.lo:.0f} to {window.hi:.0f} ({window.encoding})", "patches": X.shape[1],
                     "AUC (5-fold, mean)": round(float(auc.mean()), 3), "AUC (min fold)": round(float(auc.min()), 3),
                     "in use": "yes" if window == task.hu_window else ""})
    common.report(f"windows-{task.name}", f"{site.site_id}: {task.name} from the {scale.name} scale's patch means "
                  f"({len(y)} exams, {int(y.sum())} positive)", rows, {"site": site.site_id, "task": task.name})


if __name__ == "__main__":
    main()
