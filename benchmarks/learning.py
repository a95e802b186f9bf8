"""Does federated M3FM learn? Four arms on one compute budget, every site's test split, per-task AUC with DeLong
95% CI, over seeds (issue 14).

  m3fm-sim cohort /tmp/ceval --preset eval --workers 2 && for s in /tmp/ceval/site-*; do m3fm-client ingest $s; done
  python benchmarks/learning.py --cohort /tmp/ceval [--seeds 0 1 2] [--rounds 8] [--local-steps 60]
                                [--pretrain-rounds 2] [--pretrain-steps 20] [--tasks-per-step 1] [--lr 1e-3]
                                [--batch-size 8] [--tasks TASK ...]

The arms are sim/compare.py's (federated, federated-scratch, centralized, local-only); the budget is counted in
micro-batches, so the pooled arm is not slower per step. Writes results/learning.json, learning.md and learning.png
(AUC per headline task and site per arm with CI bars; the federated arm's test AUC over multitask rounds).
A measurement, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import numpy as np

from m3fm.tasks import HEADLINE_TASKS
from sim.compare import ARMS, GROUPS, compare



def auc_of(summary: dict, arm: str, site: str, task: str):
    m = summary["arms"][arm]["sites"].get(site, {}).get(task, {})
    return m.get("auc") if isinstance(m.get("auc"), float) else None


def spread(values: list) -> str:
    v = [x for x in values if isinstance(x, float)]
    if not v:
        return "suppressed"
    return f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else "")


def site_shares(cohort: Path) -> dict[str, float]:
    """Each site's share of the cohort's exams (cohort.json, written by m3fm-sim cohort)."""
    sites = json.loads((cohort / "cohort.json").read_text())["sites"]
    total = sum(s["exams"] for s in sites)
    return {s["site_id"]: s["exams"] / total for s in sites}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = runs[0]
    cells = [(site, task) for site in first["sites"] for task in HEADLINE_TASKS
             if auc_of(first, "federated", site, task) is not None]
    fig, (ax, curve) = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(cells)), 8))
    width = 0.8 / len(ARMS)
    for i, arm in enumerate(ARMS):
        x = np.arange(len(cells)) + (i - (len(ARMS) - 1) / 2) * width
        auc = [auc_of(first, arm, s, t) or np.nan for s, t in cells]
        ci = [first["arms"][arm]["sites"].get(s, {}).get(t, {}).get("auc_ci") or [np.nan, np.nan] for s, t in cells]
        err = np.abs(np.array([[a - c[0], c[1] - a] for a, c in zip(auc, ci)]).T)
        ax.bar(x, auc, width, yerr=err, capsize=2, label=arm)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(cells)), [f"{t}\n{s}" for s, t in cells], rotation=60, fontsize=7)
    ax.set_ylabel(f"test AUC (95% CI), seed {first['seed']}")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=4)
    for g in GROUPS:
        for k, run in enumerate(runs):
            rows = run.get("federated_rounds") or []
            y = [r["groups"][g] if isinstance(r["groups"][g], float) else np.nan for r in rows]
            curve.plot([r["round"] for r in rows], y, marker="o", color=f"C{GROUPS.index(g)}", alpha=1 if k == 0 else 0.4,
                       label=g if k == 0 else None)
    curve.set_xlabel("round (multitask rounds of the federated arm)")
    curve.set_ylabel("mean test AUC over sites")
    curve.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cohort", type=Path, required=True, help="an ingested cohort (site-*/ folders)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=8, help="multitask rounds")
    ap.add_argument("--local-steps", type=int, default=60, help="multitask local steps per round")
    ap.add_argument("--pretrain-rounds", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=20)
    ap.add_argument("--tasks-per-step", type=int, default=1, help="micro-batches (one task each) per step; 0: all")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tasks", nargs="*", default=list(HEADLINE_TASKS),
                    help="the multitask phase's tasks (default: the headline ones; none given: every task)")
    ap.add_argument("--warmup", type=int, default=20, help="warmup steps per phase")
    ap.add_argument("--out", type=Path, default=Path("/tmp/m3fm-learning"))
    ap.add_argument("--reuse", action="store_true", help="take a seed's compare.json from --out when its plan matches")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)  # one thread, as the other training benchmarks, so figures compare across them

    plan = {"pretrain": {"rounds": args.pretrain_rounds, "local_steps": args.pretrain_steps, "lr": args.lr,
                         "warmup_steps": args.warmup, "batch_size": args.batch_size},
            "multitask": {"rounds": args.rounds, "local_steps": args.local_steps, "lr": args.lr,
                          "warmup_steps": args.warmup, "tasks_per_step": args.tasks_per_step,
                          "batch_size": args.batch_size, **({"tasks": args.tasks} if args.tasks else {})}}
    site_dirs = sorted(p for p in args.cohort.glob("site-*") if (p / "site.toml").is_file())
    runs, t0 = [], time.perf_counter()
    for seed in args.seeds:
        done = args.out / f"seed-{seed}" / "compare.json"
        if args.reuse and done.is_file() and json.loads(done.read_text())["plan"] == plan:
            print(f"seed {seed}: reusing {done}")
            runs.append(json.loads(done.read_text()))
            continue
        print(f"seed {seed}: {len(site_dirs)} sites, plan {plan} ({time.perf_counter() - t0:.0f}s so far)", flush=True)
        runs.append(compare(site_dirs, plan, args.out / f"seed-{seed}", seed=seed, curve=True,
                            log=lambda m: print(f"  {m} ({time.perf_counter() - t0:.0f}s)", flush=True)))
    shares = site_shares(args.cohort)
    rows = [{"arm": arm, **{g: spread([r["arms"][arm]["groups"][g] for r in runs]) for g in (*GROUPS, "mean")},
             "seconds": round(float(np.mean([r["seconds"][arm] for r in runs])))} for arm in ARMS]
    tasks = []
    for site in runs[0]["sites"]:
        for task in HEADLINE_TASKS:
            first = runs[0]["arms"]["federated"]["sites"].get(site, {}).get(task)
            if not first or not isinstance(first.get("auc"), float):
                continue
            ci = first.get("auc_ci")  # yes/no tasks; multi-class and risk tasks give the mean of their views
            tasks.append({"site": f"{site} ({shares.get(site, 0):.0%})", "task": task,
                          "test positives": first.get("positives", "-"),
                          "federated (seed 0, 95% CI)": f"{first['auc']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""),
                          **{arm: spread([auc_of(r, arm, site, task) for r in runs]) for arm in ARMS}})
    means = {arm: [r["arms"][arm]["groups"]["mean"] for r in runs] for arm in ARMS}
    ratio = [f / c for f, c in zip(means["federated"], means["centralized"]) if isinstance(f, float) and isinstance(c, float)]
    extra = {"plan": plan, "seeds": args.seeds, "site_shares": shares, "tasks": tasks,
             "federated_over_centralized": ratio, "runs": runs, "seconds": round(time.perf_counter() - t0)}
    common.report("learning", f"mean test AUC per task group ({len(args.seeds)} seed(s), mean ± sd)", rows, extra)
    common.report("learning-tasks", "headline tasks per site: test AUC per arm (mean ± sd over seeds)", tasks)
    print(f"federated / centralized mean AUC: {', '.join(f'{r:.3f}' for r in ratio)}")
    md = ["| arm | " + " | ".join((*GROUPS, "mean")) + " |", "|---" * (len(GROUPS) + 2) + "|"]
    md += [f"| {r['arm']} | " + " | ".join(r[g] for g in (*GROUPS, "mean")) + " |" for r in rows]
    md += ["", "| site | task | test positives | federated (seed 0, 95% CI) | " + " | ".join(ARMS) + " |",
           "|---" * (4 + len(ARMS)) + "|"]
    md += [f"| {t['site']} | {t['task']} | {t['test positives']} | {t['federated (seed 0, 95% CI)']} | "
           + " | ".join(t[a] for a in ARMS) + " |" for t in tasks]
    (common.RESULTS / "learning.md").write_text("\n".join(md) + "\n")
    plot(runs, common.RESULTS / "learning.png")
    print(f"wrote {common.RESULTS / 'learning.md'} and {common.RESULTS / 'learning.png'}")


if __name__ == "__main__":
    main()
