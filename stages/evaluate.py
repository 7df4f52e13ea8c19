"""DVC stage `evaluate`: test metrics of the head and the fine-tuned model -> metrics/evaluate.json,
plots/evaluate/; logs the complete picture of this parameter set to MLflow."""

from transferline import evaluation, stagekit
from transferline.files import atomic_dir, write_json
from transferline.params import Params


def run(p: Params) -> None:
    with atomic_dir(stagekit.PLOTS / "evaluate") as tmp:
        metrics = evaluation.evaluate_models(
            stagekit.RAW,
            stagekit.SPLITS,
            stagekit.FEATURES,
            stagekit.HEAD,
            stagekit.FINETUNED,
            tmp,
            image_size=p.model.size,
            batch_size=p.extract.batch_size,
        )
    write_json(stagekit.METRICS / "evaluate.json", metrics)
    for name, m in metrics.items():
        stagekit.log.info(
            "test %s: accuracy %.4f, macro-F1 %.4f", name, m["accuracy"], m["macro_f1"]
        )
    with stagekit.mlflow_run(p) as run:
        stagekit.log_everything(run)


if __name__ == "__main__":
    raise SystemExit(stagekit.main("evaluate", run))
