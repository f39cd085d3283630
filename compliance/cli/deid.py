"""``compliance deid``: de-identify files or directories with a profile, for one project.

The lead registers ``app`` as the ``deid`` sub-command. The pseudonym secret comes from
``COMPLIANCE_DEID_PROJECT_SECRET_<PROJECT>``; ``--dev-secret`` (or COMPLIANCE_ENV=development)
allows an insecure public development secret, with a loud warning.
Exit codes: 0 all released (or ``--allow-held-back``), 1 some file held back or in error,
2 bad usage or configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from compliance.deid.batch import run_batch, write_report
from compliance.deid.engine import Deidentifier
from compliance.deid.interfaces import EnvPseudonymSecretSource
from compliance.deid.profiles import load_profile
from compliance.errors import ComplianceError

app = typer.Typer(help="De-identify DICOM files (PS3.15 Annex E profiles).", add_completion=False)


@app.command()
def deid(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="a DICOM file or a directory")],
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="directory for de-identified files")],
    profile: Annotated[str, typer.Option("--profile", help="profile name in policies/deid/")],
    project: Annotated[str, typer.Option("--project", help="project whose pseudonym secret is used")],
    report: Annotated[Path | None, typer.Option("--report", help="JSON report path")] = None,
    allow_held_back: Annotated[bool, typer.Option("--allow-held-back",
                                                  help="exit 0 even when files were held back")] = False,
    dev_secret: Annotated[bool, typer.Option("--dev-secret", help="development only: insecure default secret")]
    = False,
) -> None:
    """De-identify INPUT into OUTPUT and write a JSON report (default OUTPUT/deid-report.json)."""
    if not input_path.exists():
        typer.echo(f"error: {input_path} does not exist", err=True)
        raise typer.Exit(2)
    allow_dev = dev_secret or os.environ.get("COMPLIANCE_ENV", "").lower() == "development"
    try:
        engine = Deidentifier(load_profile(profile), project, EnvPseudonymSecretSource(allow_dev_default=allow_dev))
    except ComplianceError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(2) from exc
    output.mkdir(parents=True, exist_ok=True)
    result = run_batch(engine, [input_path], output)
    report_path = report or output / "deid-report.json"
    write_report(result, report_path)
    summary = result.as_dict()["summary"]
    typer.echo(json.dumps({"report": str(report_path), **summary}))
    if result.not_released and not allow_held_back:
        raise typer.Exit(1)
