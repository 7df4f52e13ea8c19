"""DVC stage `train_head`: cached features -> models/head/ (+ the fine-tune hand-over).

models/finetune_init/ holds a copy of the head when fine-tuning is on and a marker when it is
off, so head-only experiments with fine-tuning off never re-run the finetune stage.
"""

from transferline import heads, stagekit
from transferline.files import atomic_dir, write_csv, write_json
from transferline.params import Params


def run(p: Params) -> None:
    stagekit.check_features(p)
    if p.head.type == "dense":
        from transferline.runtime import seed_everything  # noqa: PLC0415  (TensorFlow)

        seed_everything(p.seed)
    with stagekit.mlflow_run(p) as run:
        with atomic_dir(stagekit.HEAD) as tmp:
            metrics, history = heads.train_from_features(
                stagekit.FEATURES,
                tmp,
                p.head,
                p.seed,
                on_epoch=run.epoch_logger("head.history."),  # the dense head's, live
            )
        with atomic_dir(stagekit.FINETUNE_INIT) as tmp:
            if p.finetune.enabled:
                heads.copy_head(stagekit.HEAD, tmp)
            else:
                write_json(tmp / "disabled.json", {"finetune.enabled": False})
        write_json(stagekit.METRICS / "train_head.json", metrics)
        write_csv(stagekit.PLOTS / "head_history.csv", history)
        stagekit.log.info("head (%s): val_accuracy %.4f", p.head.type, metrics["val_accuracy"])
        stagekit.log_stage_metrics(run, "train_head", metrics)
        run.log_history(history, prefix="head.history.")  # logreg's one row


if __name__ == "__main__":
    raise SystemExit(stagekit.main("train_head", run))
