"""Typed, validated params.yaml: one pydantic model per section, each field described
(docs/parameters.md is generated from them). Reading the file is `params_files`'.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from transferline import backbones

PRESETS = ("cats_vs_dogs", "chest_ct", "digits")
_KAGGLE_RE = re.compile(r"^kaggle://(datasets/[^/\s]+/[^/\s]+|competitions/[^/\s]+)/?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _inside_download(path: str) -> bool:
    """A relative path that stays inside the folder it is taken from (data/raw)."""
    return not Path(path).is_absolute() and ".." not in Path(path).parts


class LabelsParams(_Strict):
    """A CSV in the download that labels the images (a Kaggle competition's train.csv)."""

    file: str | None = Field(
        default=None,
        min_length=1,
        description="A CSV inside the download that labels the images (a Kaggle competition's "
        "`train.csv`); each row names an image by path, file name or id (the name without its "
        "extension), under `data.subdir`.",
    )
    image_column: str | None = Field(
        default=None,
        min_length=1,
        description="The CSV's column naming the image; null: the first.",
    )
    label_column: str | list[str] | None = Field(
        default=None,
        description="The CSV's column holding the class (null: the second), or a list of one-hot "
        "columns named after the classes (`[healthy, rust, scab]`: the class is the one set to 1).",
    )
    group_column: str | None = Field(
        default=None,
        min_length=1,
        description="The CSV's column naming each image's group (a patient, a lesion): a "
        "group's images all go to one split.",
    )

    @model_validator(mode="after")
    def _columns_need_a_file(self) -> LabelsParams:
        given = [k for k in ("image_column", "label_column", "group_column") if getattr(self, k)]
        if given and self.file is None:
            raise ValueError(
                f"data.labels.{given[0]} is set but data.labels.file is not; name the CSV "
                f"that labels the images (e.g. data.labels.file: train.csv)"
            )
        return self

    @field_validator("file")
    @classmethod
    def _inside(cls, v: str | None) -> str | None:
        if v is not None and not _inside_download(v):
            raise ValueError(
                "must be a path inside the download (data/raw), e.g. labels.csv or "
                "Data/train.csv; the download stage copies your data set there first"
            )
        return v

    @field_validator("label_column")
    @classmethod
    def _one_hot(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v == "":
            raise ValueError("must name the CSV's column holding the class (null: the second)")
        if isinstance(v, list) and (len(set(v)) < 2 or not all(v)):
            raise ValueError(
                "as a list names the one-hot columns of the classes, at least two and each "
                "once, e.g. [healthy, rust, scab]; or give the one column holding the class"
            )
        return v


class DataParams(_Strict):
    """Where the images come from and how they are labelled."""

    dataset: str = Field(
        description="A preset (`cats_vs_dogs`, `chest_ct`, `digits`) or a source: "
        "`kaggle://datasets/OWNER/NAME`, `kaggle://competitions/NAME`, an `https://` archive, "
        "a local folder or archive (`file://` allowed). A relative path starts at the "
        "repository root."
    )
    layout: Literal["auto", "class_folders", "presplit", "filename", "csv"] = Field(
        default="auto",
        description="How the images are labelled; `auto` detects it (`csv` is set by "
        "`data.labels.file`).",
    )
    subdir: str | None = Field(
        default=None,
        description="The folder inside the download holding the labelled images (presets "
        "set their own).",
    )
    label_map: dict[str, str] = Field(
        default_factory=dict,
        description="Rename classes before splitting, e.g. `{Cat: cat, doggo: dog}` (several "
        "names may map to one). With `dvc exp run`: `-S '++data.label_map={Cat: cat}'` (DVC "
        "refuses new keys in a mapping without `++`).",
    )
    labels: LabelsParams = LabelsParams()
    sha256: str | None = Field(
        default=None,
        description="SHA-256 of an `https://` archive, checked before anything is extracted.",
    )
    exclude: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Files to leave out, as `data/splits/*.csv` lists them: shell patterns, "
        "`*` also matches `/` (`'*/666.jpg'`). Each goes to `rejected.csv` with the pattern; "
        "a pattern that matches nothing is a warning.",
    )

    exclude_file: str | None = Field(
        default=None,
        min_length=1,
        description="A CSV under `data/exclude/` listing files to leave out, by its `path` "
        "column (as the audit's `label_issues.csv` and `outliers.csv` have) or else `path_b` "
        "(`near_duplicates.csv`: the second of each pair). Copy an audit CSV there, delete the "
        "rows to keep, and point this at it.",
    )

    @field_validator("subdir")
    @classmethod
    def _in_download(cls, v: str | None) -> str | None:
        # split reads data/raw/SUBDIR: outside data/raw, files DVC does not track
        if v is not None and not _inside_download(v):
            raise ValueError(
                "must be a folder inside the download (data/raw), e.g. train or Data; to use "
                "a folder elsewhere, set data.dataset to it"
            )
        return v

    @field_validator("label_map", mode="before")
    @classmethod
    def _class_names(cls, v: Any) -> Any:
        """Class names as YAML reads them unquoted: numbers (Cassava's labels 0..4) are the
        names they spell; true and false, booleans, name nothing."""
        if not isinstance(v, dict):
            return v
        out = {}
        for key, value in v.items():
            for item in (key, value):
                if isinstance(item, bool):
                    raise ValueError(
                        f"YAML reads an unquoted true or false as the boolean {item}, not a "
                        f"class name; quote it (e.g. 'true': real)"
                    )
            out[str(key) if isinstance(key, int | float) else key] = (
                str(value) if isinstance(value, int | float) else value
            )
        return out

    @model_validator(mode="after")
    def _csv_layout(self) -> DataParams:
        if self.layout == "csv" and self.labels.file is None:
            raise ValueError(
                "data.layout is csv but data.labels.file is not set; name the CSV that labels "
                "the images (e.g. data.labels.file: train.csv), or use data.layout: auto"
            )
        if self.labels.file is not None and self.layout not in ("auto", "csv"):
            raise ValueError(
                f"data.labels.file labels the images, but data.layout is {self.layout}; set "
                f"data.layout: auto (or csv), or remove data.labels.file"
            )
        return self

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v.strip()):
            raise ValueError("must be the 64 hex digits of the archive's SHA-256 (sha256sum FILE)")
        return v.strip().lower() if v else v

    @field_validator("dataset")
    @classmethod
    def _source(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("is empty; use a preset (" + ", ".join(PRESETS) + ") or a source")
        if v.startswith("kaggle://") and not _KAGGLE_RE.match(v):
            raise ValueError(
                "is not a Kaggle source; write kaggle://datasets/OWNER/NAME or "
                "kaggle://competitions/NAME"
            )
        if v.startswith("http://"):
            raise ValueError("uses plain http; use an https:// address")
        if "://" in v and not v.startswith(("kaggle://", "https://", "file://")):
            raise ValueError("has an unknown scheme; use kaggle://, https://, file:// or a path")
        return v


class SplitParams(_Strict):
    """How the images are divided into train, validation and test: stratified by class, seeded."""

    val: float = Field(
        default=0.1,
        description="The validation fraction, in (0, 1); with `test`, below 1. Stratified by "
        "class; with groups, rounded to 1/k of them.",
    )
    test: float = Field(default=0.1, description="The test fraction, as `val`.")
    max_per_class: int | None = Field(
        default=None, ge=1, description="At most this many images per class (a seeded subsample)."
    )
    group_pattern: str | None = Field(
        default=None,
        min_length=1,
        description="A regular expression searched in each image's path; its first group, else "
        "the whole match, is the image's group, and a group's images share one split "
        "(`person\\d+`).",
    )

    @field_validator("group_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(
                    f"is not a regular expression ({exc}); e.g. 'person\\d+' or '(patient_\\d+)/'"
                ) from exc
        return v

    @field_validator("val", "test")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("must be a fraction strictly between 0 and 1, e.g. 0.1")
        return v

    @model_validator(mode="after")
    def _sum(self) -> SplitParams:
        if self.val + self.test >= 1.0:
            raise ValueError(
                f"split.val + split.test = {self.val + self.test:g} leaves nothing to train on; "
                "their sum must be below 1 (e.g. val: 0.1, test: 0.1)"
            )
        return self


class ModelParams(_Strict):
    """The pre-trained base, shared by extract, finetune and evaluate."""

    backbone: str = Field(
        default="vgg16",
        description="The frozen base: any `keras.applications` family (`transferline "
        "backbones` lists them with their sizes).",
    )
    weights: str = Field(
        default="imagenet",
        description="`imagenet`, `none` (random), or a weights file under `weights/` saved from "
        "the same base without its top (a mismatch is an error, never a partial load).",
    )
    image_size: int | None = Field(
        default=None,
        ge=1,
        description="Input size in px; null: the backbone's default. Below its minimum is an "
        "error.",
    )
    pooling: Literal["avg", "max"] = Field(
        default="avg", description="How the base's last feature map becomes one vector."
    )
    mixed_precision: Literal["auto", "on", "bfloat16", "off"] = Field(
        default="auto",
        # float16 is slower than float32 on a CPU, hence auto's choice there
        description="`auto`: mixed_float16 when a GPU is visible, float32 on a CPU; `on`: "
        "mixed_float16; `bfloat16`: mixed_bfloat16 (CPUs with AMX, GPUs from Ampere on); "
        "`off`. For extract and finetune; features are written as `extract.dtype` either way.",
    )

    @field_validator("backbone")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in backbones.REGISTRY:
            close = difflib.get_close_matches(v, backbones.REGISTRY, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"is not a known backbone.{hint} Accepted: {', '.join(backbones.REGISTRY)} "
                "(`transferline backbones` lists them with their sizes)"
            )
        return v

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> str:
        if v is None:
            return "none"
        if not isinstance(v, str) or not v.strip():
            raise ValueError("must be 'imagenet', 'none' or the path of a weights file")
        return v.strip()

    @model_validator(mode="after")
    def _size(self) -> ModelParams:
        spec = backbones.get(self.backbone)
        if self.image_size is not None and self.image_size < spec.min_size:
            raise ValueError(
                f"model.image_size = {self.image_size} is below the minimum of {spec.min_size} "
                f"px for {self.backbone}; use at least {spec.min_size} "
                f"(its default is {spec.default_size})"
            )
        return self

    @property
    def spec(self) -> backbones.Backbone:
        return backbones.get(self.backbone)

    @property
    def size(self) -> int:
        """The input size actually used: the param, or the backbone's default."""
        return self.image_size or self.spec.default_size


class ExtractParams(_Strict):
    """The extract stage: the frozen base's features of every image, computed once."""

    batch_size: int = Field(
        default=32,
        ge=1,
        description="Images per batch, also evaluate's. One too large for the device's memory "
        "stops the stage with one paragraph naming this key.",
    )
    dtype: Literal["float32", "float16"] = Field(
        default="float32", description="The features' type on disk (`float16` halves the files)."
    )
    xla: bool = Field(
        default=False,
        description="Compile the base's forward pass with XLA; features match the plain path to "
        "float rounding. Slower on the CPUs measured (see Benchmarks).",
    )


class LogregParams(_Strict):
    """`head.type: logreg`: StandardScaler + LogisticRegression on the features."""

    C: float = Field(
        default=1.0, gt=0, description="Inverse regularisation strength of LogisticRegression."
    )
    C_grid: list[float] = Field(
        default_factory=list,
        description="E.g. `[0.01, 0.1, 1, 10]`: fit each, keep the lowest validation log loss "
        "(`C` is then ignored); the choice is `head.C` in `metrics/train_head.json` and MLflow.",
    )
    max_iter: int = Field(default=1000, ge=1, description="The solver's iteration limit.")
    class_weight: Literal["balanced"] | None = Field(
        default=None, description="null, or `balanced`: weigh classes by inverse frequency."
    )

    @field_validator("C_grid")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(c <= 0 for c in v):
            raise ValueError("must hold positive values only, e.g. [0.01, 0.1, 1.0, 10.0]")
        return v


class DenseParams(_Strict):
    """`head.type: dense`: a Keras head (Adam, early stopping on validation loss)."""

    units: int = Field(
        default=256, ge=0, description="The hidden layer's width; 0: a linear softmax head."
    )
    dropout: float = Field(default=0.3, ge=0, lt=1, description="Dropout before the output.")
    learning_rate: float = Field(default=1e-3, gt=0, description="Adam's learning rate.")
    epochs: int = Field(default=50, ge=1, description="The most epochs to train.")
    batch_size: int = Field(default=64, ge=1, description="Feature vectors per batch.")
    patience: int = Field(
        default=5,
        ge=1,
        description="Stop after this many epochs without a lower validation loss; the best "
        "weights are restored.",
    )
    class_weight: Literal["balanced"] | None = Field(
        default=None, description="null, or `balanced`: weigh classes by inverse frequency."
    )


class HeadParams(_Strict):
    """The classifier trained on the cached features."""

    type: Literal["logreg", "dense"] = Field(
        default="logreg",
        description="`logreg` (StandardScaler + scikit-learn's LogisticRegression) or `dense` "
        "(Keras).",
    )
    logreg: LogregParams = LogregParams()
    dense: DenseParams = DenseParams()


class AugmentParams(_Strict):
    """Fine-tuning's augmentation of the training images (Keras preprocessing layers)."""

    flip: bool = Field(default=True, description="Random horizontal flips.")
    rotation: float = Field(
        default=0.05, ge=0, le=0.5, description="Random rotation, as a fraction of a full turn."
    )
    zoom: float = Field(default=0.1, ge=0, lt=1, description="Random zoom, as a fraction.")
    contrast: float = Field(default=0.0, ge=0, lt=1, description="Random contrast change.")
    translation: float = Field(
        default=0.0, ge=0, le=0.5, description="Random shift, as a fraction of the image size."
    )

    @property
    def active(self) -> bool:
        """Whether any augmentation is on."""
        return bool(self.flip or self.rotation or self.zoom or self.contrast or self.translation)


class FinetuneParams(_Strict):
    """The top of the base and the head trained together; BatchNorm stays in inference mode, and
    the weights with the lowest validation loss (the starting ones included) are kept."""

    enabled: bool = Field(
        default=True,
        description="`false` skips fine-tuning: evaluate reports the head only, and a head-only "
        "change re-runs only train_head and evaluate.",
    )
    epochs: int = Field(default=10, ge=1, description="The most epochs to train.")
    unfreeze_layers: int = Field(
        default=4,
        ge=0,
        description="How many of the base's top layers with weights to train; BatchNorm stays "
        "frozen.",
    )
    unfreeze_from: str | None = Field(
        default=None,
        min_length=1,
        description="A layer name of the base: train it and every weighted layer above (wins "
        "over `unfreeze_layers`; an unknown name lists nearby names).",
    )
    learning_rate: float = Field(default=1e-5, gt=0, description="The peak learning rate.")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        default="adam", description="`sgd` is SGD with Nesterov momentum 0.9."
    )
    schedule: Literal["constant", "cosine"] = Field(
        default="constant", description="`cosine` decays the learning rate to 0 over the epochs."
    )
    warmup_epochs: float = Field(
        default=0.0,
        ge=0,
        description="A linear warm-up from 0, in epochs (fractions allowed; below `epochs`).",
    )
    batch_size: int = Field(
        default=32,
        ge=1,
        description="The global batch (split over every GPU and machine); at least the number "
        "of replicas.",
    )
    class_weight: Literal["balanced"] | None = Field(
        default=None, description="null, or `balanced`: weigh classes by inverse frequency."
    )
    max_minutes: float | None = Field(
        default=None,
        gt=0,
        description="Stop cleanly after this long (checked every batch; the interrupted epoch "
        "is validated) with the best weights so far; not across machines.",
    )
    patience: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many epochs without a lower validation loss; null: off. "
        "The best weights, the starting ones included, are kept either way.",
    )
    augment: AugmentParams = AugmentParams()
    cache_trunk: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Compute the frozen part of the base once (the `trunk` stage) and train "
        "the unfrozen top and the head on its cached activations: the same result as training "
        "on the images, at the cost of the layers that train. `auto`: when augmentation is "
        "off and something below the unfrozen layers is frozen; `on`: always (an error when "
        "it cannot apply); `off`: never.",
    )
    augment_views: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Offline augmentation, for `cache_trunk: on` with augmentation on: the "
        "trunk stage computes this many augmented views of each training image once, and each "
        "epoch trains on one of them per image, drawn at random (seeded). A different regime "
        "from online augmentation (a fixed set of variants, not a fresh one every epoch); the "
        "cache grows with it. 0: off.",
    )
    cache_dtype: Literal["float32", "float16"] = Field(
        default="float32",
        description="The cached activations' type on disk (`float16` halves it, and the "
        "results then differ from the uncached path's by float16 rounding).",
    )
    cache_max_gb: float = Field(
        default=20.0,
        gt=0,
        description="The most disk the trunk cache may take; a larger one is an error naming "
        "the size it needs and what shrinks it.",
    )

    @model_validator(mode="after")
    def _cache_and_augmentation(self) -> FinetuneParams:
        augmented = self.augment.active
        if self.cache_trunk == "on" and augmented and not self.augment_views:
            raise ValueError(
                "finetune.cache_trunk is on, but augmentation is on (finetune.augment): cached "
                "activations are computed once, so they cannot be augmented anew each epoch. "
                "Set finetune.augment_views: K (K augmented views of each training image "
                "cached once, one drawn per epoch: offline augmentation), turn augmentation "
                "off (flip: false, rotation, zoom, contrast, translation: 0), or set "
                "cache_trunk: auto (it then trains on the images)"
            )
        if self.augment_views and not (self.cache_trunk == "on" and augmented):
            why = "augmentation is off" if not augmented else f"cache_trunk is {self.cache_trunk}"
            raise ValueError(
                f"finetune.augment_views = {self.augment_views} caches augmented views, which "
                f"needs finetune.cache_trunk: on and augmentation on (finetune.augment), but "
                f"{why}. Set augment_views: 0, or cache_trunk: on with augmentation"
            )
        return self

    @model_validator(mode="after")
    def _warmup(self) -> FinetuneParams:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"finetune.warmup_epochs = {self.warmup_epochs:g} leaves no epoch after the "
                f"warm-up of finetune.epochs = {self.epochs}; make it smaller than epochs"
            )
        return self


class AuditParams(_Strict):
    """The audit stage: label issues, near-duplicates and outliers found by cleanlab's Datalab
    in the cached features, with out-of-sample probabilities from a cross-validated logistic
    regression. It informs; no training stage reads it."""

    enabled: bool = Field(
        default=True,
        description="`false` writes empty audit outputs and audits nothing (the rest of the "
        "pipeline runs as before).",
    )
    folds: int = Field(
        default=5,
        ge=2,
        description="Folds of the cross-validation that gives every image class probabilities "
        "from a model that never saw it; fewer when a class has fewer images (a warning).",
    )
    C: float = Field(
        default=1.0, gt=0, description="Inverse regularisation strength of that regression."
    )
    label_filter: Literal[
        "prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"
    ] = Field(
        default="prune_by_noise_rate",
        description="cleanlab's `filter_by`: how label issues are chosen from the probabilities.",
    )
    near_duplicate_threshold: float = Field(
        default=0.13,
        gt=0,
        description="cleanlab's radius for near-duplicates, as a fraction of the median distance "
        "to each image's nearest neighbour (larger: more pairs).",
    )
    outlier_threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="cleanlab's outlier threshold in (0, 1] (larger: more outliers); null: "
        "cleanlab's default.",
    )


class MlflowParams(_Strict):
    """Tracking; the store is `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the
    repository."""

    experiment: str = Field(
        default="transferline", min_length=1, description="The MLflow experiment's name."
    )
    register_as: str | None = Field(
        default=None,
        min_length=1,
        description="A name: also register each logged model in the MLflow model registry.",
    )

    @field_validator("register_as")
    @classmethod
    def _registry_name(cls, v: str | None) -> str | None:
        # MLflow refuses them, and only when evaluate registers, after all the work
        if v is not None and ("/" in v or ":" in v):
            raise ValueError(
                "a registered model's name cannot hold '/' or ':' (models:/NAME/VERSION "
                "would not parse); use e.g. team-pets"
            )
        return v


class Params(_Strict):
    seed: int = Field(
        default=42,
        ge=0,
        le=2**32 - 1,  # NumPy's seed range
        description="Seeds Python, NumPy, Keras and TensorFlow (op determinism on), the split "
        "and a random base.",
    )
    data: DataParams
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    extract: ExtractParams = ExtractParams()
    head: HeadParams = HeadParams()
    finetune: FinetuneParams = FinetuneParams()
    audit: AuditParams = AuditParams()
    mlflow: MlflowParams = MlflowParams()

    @model_validator(mode="after")
    def _one_source_of_groups(self) -> Params:
        if self.split.group_pattern and self.data.labels.group_column:
            raise ValueError(
                "split.group_pattern and data.labels.group_column both say which images "
                "share a split; keep one"
            )
        return self

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Params as dotted keys (`model.backbone`), the way MLflow shows them."""
        return flatten(self.as_dict())

    def digest(self) -> str:
        """Hash of the resolved params: the identity of an MLflow run."""
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
