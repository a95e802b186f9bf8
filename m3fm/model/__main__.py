"""`python -m m3fm.model`: every configuration with its parameters per component, counted on the meta device."""

from rich.console import Console
from rich.table import Table

from m3fm.model.configs import CONFIGS, get_config
from m3fm.model.m3fm import count_parameters


def main() -> None:
    table = Table(title="M3FM configurations (parameters, millions)")
    cols = ["config", "img layers x width", "image encoder", "text encoder", "task encoder", "predictors",
            "M3FM total", "MIM decoder", "MLM head"]
    for c in cols:
        table.add_column(c, justify="right")
    for name in CONFIGS:
        cfg = get_config(name)
        counts = count_parameters(cfg)
        table.add_row(name, f"{cfg.img_depth} x {cfg.img_dim}",
                      *(f"{counts[k] / 1e6:.1f}" for k in ("image_encoder", "text_encoder", "task_encoder",
                                                           "predictors", "total", "mim_decoder", "mlm_head")))
    console = Console(width=140)
    console.print(table)
    console.print("M3FM total = what inference and multitask training use; the MIM decoder and MLM head "
                    "exist for pretraining only.")


if __name__ == "__main__":
    main()
