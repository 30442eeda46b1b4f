"""`driftloop data ...`: versioned data, Delta tables with one version per append."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from driftloop.cli_common import _fail, clean_errors

data_app = typer.Typer(help="Versioned data: Delta tables, one version per append.", no_args_is_help=True)


def _spec_for(table: str, spec_path: Optional[Path], source: str):
    from driftloop.config import load_spec
    from driftloop.errors import LoopError

    if spec_path is not None:
        return load_spec(spec_path)
    name = source.removeprefix("builtin:")
    for candidate in (Path("configs") / f"{table}.yaml", Path("configs") / f"{name}.yaml"):
        if candidate.is_file():
            return load_spec(candidate)
    raise LoopError(f"no spec for table {table!r}: pass --spec configs/<name>.yaml")


def _data_table(table: str) -> str:
    """A table name as a spec's `dataset.table` allows it, so `--table ../x` cannot leave the data root."""
    from driftloop.serving.validation import InvalidInput, check_table_name

    try:
        return check_table_name(table)
    except InvalidInput as err:
        _fail(str(err))
        raise


@data_app.command("ingest")
@clean_errors
def data_ingest(
    source: str = typer.Argument(..., help="built-in example (digits, rainfall) or a CSV/Parquet file"),
    table: str = typer.Option(..., "--table", help="Delta table name under the data root"),
    spec: Optional[Path] = typer.Option(None, "--spec", help="model spec whose dataset section validates the batch (default configs/<table>.yaml)"),
) -> None:
    """Validate a batch and append it to a Delta table as a new version (prints the version)."""
    from driftloop.data.ingest import ingest
    from driftloop.settings import get_settings

    table = _data_table(table)
    s = get_settings().ensure()
    sp = _spec_for(table, spec, source)
    version = ingest(source, s.table_uri(table), sp.dataset)
    typer.echo(f"{table}: version {version}")


@data_app.command("versions")
@clean_errors
def data_versions(table: str = typer.Argument(..., help="table name"), as_json: bool = typer.Option(False, "--json")) -> None:
    """List a table's versions: version, timestamp, rows, digest."""
    from driftloop.data import tables
    from driftloop.settings import get_settings

    rows = tables.versions(get_settings().table_uri(_data_table(table)))
    if as_json:
        typer.echo(json.dumps(rows))
        return
    typer.echo(f"{'version':>7}  {'timestamp':<25} {'rows':>8} {'added':>7}  digest")
    for r in rows:
        typer.echo(f"{r['version']:>7}  {r['timestamp']:<25} {r['rows']:>8} {r['added']:>7}  {r['digest']}")


@data_app.command("show")
@clean_errors
def data_show(
    table: str = typer.Argument(..., help="table name"),
    version: Optional[int] = typer.Option(None, "--version", help="table version (default: latest)"),
    limit: int = typer.Option(10, "--limit", help="rows to print"),
) -> None:
    """Print rows of a table at a version (time travel)."""
    from driftloop.data import tables
    from driftloop.settings import get_settings

    uri = get_settings().table_uri(_data_table(table))
    dv = tables.data_version(uri, version)
    df = tables.read(uri, dv.version)
    typer.echo(f"{table} @ version {dv.version}: {dv.rows} rows, digest {dv.digest}")
    typer.echo(df.head(limit).to_string())
