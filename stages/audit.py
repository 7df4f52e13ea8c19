"""DVC stage `audit`: cached features -> data/audit/ (label issues, near-duplicates, outliers),
plots/audit/ grids and metrics/audit.json. It informs; no training stage reads it, and it never
changes the data (data.exclude_file acts on what it finds)."""

from transferline import stagekit
from transferline.files import atomic_dir, write_json
from transferline.params import Params


def run(p: Params) -> None:
    from transferline import audit, audit_report  # noqa: PLC0415  (cleanlab, scikit-learn)

    findings = None
    if p.audit.enabled:
        stagekit.check_features(p)
        data = audit_report.load_audit_data(stagekit.DATA)
        findings = audit.audit(data, p.audit, p.seed)
    else:
        stagekit.log.info("audit.enabled is false: nothing audited, empty outputs written")
    with atomic_dir(stagekit.AUDIT) as tmp:
        audit_report.write_findings(findings, tmp)
    with atomic_dir(stagekit.PLOTS / "audit") as tmp:
        if findings is not None:
            audit_report.write_grids(findings, stagekit.RAW, tmp)
    metrics = findings.metrics() if findings is not None else {}
    write_json(stagekit.METRICS / "audit.json", metrics)
    stagekit.log.info("audit: %s", metrics or "not run")
    with stagekit.mlflow_run(p) as run:
        stagekit.log_stage_metrics(run, "audit", metrics)
        stagekit.log_folders(run, stagekit.AUDIT_FOLDERS)


if __name__ == "__main__":
    raise SystemExit(stagekit.main("audit", run))
