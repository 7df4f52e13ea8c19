"""DVC stage `trunk`: the frozen part of the base, run once -> data/trunk/ (the activations of
the train and val images where it meets the layers fine-tuning trains).

When the cache does not apply (fine-tuning off, `finetune.cache_trunk: off`, augmentation on
under `auto`, nothing frozen below the unfrozen layers) it writes meta.json saying why, and
fine-tuning trains on the images. Only params that move the boundary re-run it.
"""

from transferline import stagekit
from transferline.files import atomic_dir
from transferline.params import Params


def run(p: Params) -> None:
    from transferline import trunk  # noqa: PLC0415

    if trunk.decision(p.finetune) is None:  # something may be cached: TensorFlow is needed
        from transferline import runtime  # noqa: PLC0415

        stagekit.check_features(p)
        runtime.seed_everything(p.seed)
    with atomic_dir(stagekit.TRUNK) as tmp:
        meta = trunk.build_cache(
            stagekit.DATA, p.model, p.finetune, p.extract.batch_size, p.seed, tmp
        )
    if meta["cached"]:
        with stagekit.mlflow_run(p) as run:
            run.log_metrics({"cache_bytes": meta["bytes"], "cache_seconds": meta["seconds"]},
                            prefix="trunk.")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(stagekit.main("trunk", run))
