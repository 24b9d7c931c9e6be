"""`kvbm-codec registry`: list, show, verify, publish, promote and garbage-collect calibrations.

Every command takes ``--registry`` (``s3://bucket/prefix`` or a directory; default
``$KVBM_CODEC_REGISTRY`` or the local registry under ``$KVBM_CODEC_CACHE_DIR``). Failures exit 2 and
print the error's stable ``code`` so scripts can tell corruption from a missing entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from tqdm.auto import tqdm

from kvbm_codec.calibration.artifact import load_calibration
from kvbm_codec.calibration.registry import (
    FileReferences,
    PublishResult,
    ReferenceSource,
    Registry,
    StaticReferences,
)
from kvbm_codec.codec.errors import CodecError
from kvbm_codec.codec.params import Calibration

registry_app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

RegistryOpt = Annotated[
    str | None,
    typer.Option("--registry", envvar="KVBM_CODEC_REGISTRY", help="s3://bucket/prefix or a directory"),
]
ModelArg = Annotated[str, typer.Argument(help="model fingerprint (see `registry list`)")]
RefArg = Annotated[str, typer.Argument(help="'latest', a version number, or a calibration id")]


def _open(url: str | None) -> Registry:
    """The registry to read, refusing a URL that cannot be one (a typo would otherwise read as empty)."""
    import os
    import re

    from kvbm_codec.cli_errors import OperatorError

    raw = url if url is not None else os.environ.get("KVBM_CODEC_REGISTRY", "")
    if raw.startswith("s3://"):
        if not raw[len("s3://") :].split("/", 1)[0]:
            raise OperatorError(f"registry URL {raw!r} names no bucket", "use s3://bucket/prefix")
        return Registry.from_url(raw)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", raw) and not raw.startswith("file://"):
        raise OperatorError(
            f"registry URL {raw!r} is not s3://bucket/prefix, file:///dir or a directory",
            "check the scheme (s3:// has two slashes)",
        )
    reg = Registry.from_url(raw or None)
    root = Path(raw[len("file://") :] if raw.startswith("file://") else raw) if raw else None
    if root is not None and not root.is_dir():
        raise OperatorError(
            f"registry directory {root} does not exist", "check --registry / $KVBM_CODEC_REGISTRY for a typo"
        )
    return reg


def _fail(e: CodecError) -> typer.Exit:
    typer.echo(json.dumps({"ok": False, "error": e.code, "message": str(e)}), err=True)
    return typer.Exit(2)


def publish_calibration(
    cal: Calibration,
    registry: str | Registry | None = None,
    *,
    promote: bool = False,
    labels: dict[str, str] | None = None,
    progress: bool = True,
) -> PublishResult:
    """Publish with a per-file progress bar: what ``kvbm-codec calibrate --publish`` calls."""
    reg = registry if isinstance(registry, Registry) else Registry.from_url(registry)
    with tqdm(
        total=4, desc=f"publish {cal.model_name} -> {reg.describe()}", disable=not progress, unit="file"
    ) as bar:

        def step(name: str, done: int, total: int) -> None:
            bar.total = total
            bar.set_postfix_str(name)
            bar.update(done - bar.n)

        return reg.publish(cal, promote=promote, labels=labels, progress=step)


@registry_app.command("list")
def list_cmd(
    model: Annotated[str | None, typer.Option(help="only this model fingerprint")] = None,
    registry: RegistryOpt = None,
) -> None:
    """One JSON line per version: id, date, whether it is latest, whether its entry still exists."""
    reg = _open(registry)
    try:
        for fp in [model] if model else reg.models():
            latest = reg.latest(fp)
            for rec in reg.versions(fp):
                row: dict[str, Any] = {
                    "model_fingerprint": fp,
                    "version": rec.version,
                    "calibration_id": rec.calibration_id,
                    "published_at": rec.published_at,
                    "latest": latest is not None and latest.version == rec.version,
                }
                try:
                    m = reg.manifest(fp, rec.calibration_id)
                    row.update(
                        model_name=m.model_name,
                        state="present",
                        bytes=sum(f.size for f in m.files.values()),
                        allocations=m.allocations,
                    )
                except CodecError as e:
                    row["state"] = "collected" if e.code == "calibration_not_found" else f"damaged:{e.code}"
                typer.echo(json.dumps(row))
    except CodecError as e:
        raise _fail(e) from e


@registry_app.command()
def show(model: ModelArg, ref: RefArg = "latest", registry: RegistryOpt = None) -> None:
    """Print an entry's version record and manifest (the manifest's own checksum is verified)."""
    reg = _open(registry)
    try:
        rec = reg.record(model, ref)
        m = reg.manifest(model, rec.calibration_id)
    except CodecError as e:
        raise _fail(e) from e
    typer.echo(json.dumps({"version": rec.version, "published_at": rec.published_at, **m.body()}, indent=2))


@registry_app.command()
def verify(
    model: Annotated[str | None, typer.Argument(help="model fingerprint (default: every model)")] = None,
    ref: Annotated[str | None, typer.Argument(help="one version/id (default: all of the model's)")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Re-check every file checksum, artifact hash and model fingerprint; exit 2 if anything fails."""
    reg = _open(registry)
    bad = 0
    try:
        fps = [model] if model else reg.models()
        for fp in fps:
            recs = [reg.record(fp, ref)] if ref else reg.versions(fp)
            for rec in recs:
                row: dict[str, Any] = {
                    "model_fingerprint": fp,
                    "version": rec.version,
                    "calibration_id": rec.calibration_id,
                }
                try:
                    reg.verify(fp, rec.calibration_id)
                    row["ok"] = True
                except CodecError as e:
                    if e.code == "calibration_not_found" and not ref:
                        row.update(ok=True, state="collected")
                    else:
                        bad += 1
                        row.update(ok=False, error=e.code, message=str(e))
                typer.echo(json.dumps(row))
    except CodecError as e:
        raise _fail(e) from e
    if bad:
        raise typer.Exit(2)


@registry_app.command()
def publish(
    artifact: Annotated[Path, typer.Argument(help="a calibration file (e.g. from `calibrate --out`)")],
    promote: Annotated[bool, typer.Option(help="also point latest at it")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Publish an existing calibration file as a new version (idempotent for an id already there)."""
    try:
        r = publish_calibration(load_calibration(artifact), registry, promote=promote)
    except CodecError as e:
        raise _fail(e) from e
    typer.echo(json.dumps(r.__dict__))


@registry_app.command()
def promote(model: ModelArg, ref: RefArg, registry: RegistryOpt = None) -> None:
    """Move latest to a version (new or older: this is also the rollback); the entry is verified first."""
    try:
        ptr = _open(registry).promote(model, int(ref) if ref.isdigit() and len(ref) < 16 else ref)
    except CodecError as e:
        raise _fail(e) from e
    typer.echo(json.dumps(ptr.__dict__))


@registry_app.command()
def gc(
    retention_days: Annotated[float, typer.Option(help="never delete entries younger than this")] = 30.0,
    referenced_ids: Annotated[
        Path | None, typer.Option(help="calibration ids stored blocks use: one per line or a JSON list")
    ] = None,
    assume_unreferenced: Annotated[
        bool, typer.Option(help="run without --referenced-ids (only retention + latest protect entries)")
    ] = False,
    model: Annotated[str | None, typer.Option(help="only this model fingerprint")] = None,
    dry_run: Annotated[bool, typer.Option(help="report, delete nothing")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Delete entries that are not latest, not referenced by stored blocks and older than the retention."""
    if referenced_ids is None and not assume_unreferenced:
        typer.echo("refusing to gc without --referenced-ids (or an explicit --assume-unreferenced)", err=True)
        raise typer.Exit(2)
    refs: ReferenceSource = FileReferences(referenced_ids) if referenced_ids else StaticReferences(())
    try:
        report = _open(registry).gc(refs, retention_days=retention_days, fingerprint=model, dry_run=dry_run)
    except CodecError as e:
        raise _fail(e) from e
    typer.echo(
        json.dumps(
            {
                "dry_run": dry_run,
                "deleted": [f"{fp}/{cid}" for fp, cid in report.deleted],
                "kept": report.kept,
                "orphans_deleted": report.orphans_deleted,
            },
            indent=2,
        )
    )
