"""DVC stage `evaluate`: test metrics of the head and the fine-tuned model -> metrics/evaluate.json,
plots/evaluate/; the fine-tuned model (base + head when fine-tuning is off) exported to
models/classifier/ (raw images of any size in, class probabilities out) and logged to MLflow
with the complete picture of the run."""

from transferline import stagekit, tracking_models
from transferline.files import atomic_dir, write_json
from transferline.params import Params


def run(p: Params) -> None:
    stagekit.check_features(p)
    from transferline import evaluation, export, runtime  # noqa: PLC0415  (TensorFlow)

    runtime.seed_everything(p.seed)
    m = p.model
    with atomic_dir(stagekit.PLOTS / "evaluate") as tmp:
        metrics, finetuned = evaluation.evaluate_models(
            stagekit.DATA, stagekit.HEAD, stagekit.FINETUNED, tmp, m.size, p.extract.batch_size
        )
    stagekit.add_val_accuracy(metrics)
    write_json(stagekit.METRICS / "evaluate.json", metrics)
    for name, result in metrics.items():
        stagekit.log.info(
            "test %s: accuracy %.4f, macro-F1 %.4f", name, result["accuracy"], result["macro_f1"]
        )
    classifier = export.build_classifier(
        finetuned, stagekit.HEAD, backbone=m.backbone, weights=m.weights, image_size=m.size,
        pooling=m.pooling, seed=p.seed,
    )  # fmt: skip
    classes = evaluation.class_names(stagekit.FEATURES)
    source = "finetune" if finetuned is not None else "head"
    meta = {"image_size": m.size, "source": source, "backbone": m.backbone}
    export.save_classifier(stagekit.CLASSIFIER, classifier, classes, meta)
    with stagekit.mlflow_run(p) as run:
        stagekit.log_everything(run)
        stagekit.log_datasets(run, p.data.dataset)
        run.set_tags({**runtime.runtime_tags(), "model.source": source})
        tracking_models.log_classifier(run, classifier, classes, m.size, p.mlflow.register_as)


if __name__ == "__main__":
    raise SystemExit(stagekit.main("evaluate", run))
