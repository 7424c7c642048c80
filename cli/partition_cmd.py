"""`simfed partition ...` (build stores) and `simfed info DIR` (describe and verify one).

Every user error is raised as SimfedError; cli.main prints it as one stderr line, exit 2. The
progress bar is drawn only when stderr is a terminal, so scripted runs and error paths print
nothing else on stderr. `info` verifies checksums by default (--no-verify skips reading the
whole store).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from simfed.core.errors import SimfedError

partition_app = typer.Typer(help="Build a partition store (federated dataset directory).",
                            no_args_is_help=True, add_completion=False, rich_markup_mode=None)


# Parents of OUT are created as `mkdir -p` would (and removed again if the import fails).
OUT_HELP = "Output store directory (must not exist; missing parent directories are created, as mkdir -p)."


# Options several importers share (typer reads these markers; reusing one is safe).
UNSEEN = typer.Option(0.1, "--unseen-fraction", help="Share of clients held out as unseen (never trained on).")
SEED = typer.Option(0, "--seed")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace OUT if it is a partition store or an empty directory.")
SCHEME = typer.Option(..., "--scheme", help="classes | dirichlet | iid")
CLIENTS = typer.Option(..., "--clients")
PER_CLIENT = typer.Option(None, "--classes-per-client")
ALPHA = typer.Option(None, "--alpha")
VAL = typer.Option(0.15, "--val-fraction")
TEST = typer.Option(0.15, "--test-fraction")
# Importers of sources with their own train/test split (LEAF's, TFF's) keep it by default
LEAF_VAL = typer.Option(None, "--val-fraction", help="Default 0 with LEAF's split, else 0.15.")
LEAF_TEST = typer.Option(None, "--test-fraction", help="Only without LEAF's split; default 0.15.")
TFF_VAL = typer.Option(None, "--val-fraction", help="Default 0 with TFF's split, else 0.15.")
TFF_TEST = typer.Option(None, "--test-fraction", help="Only without TFF's split; default 0.15.")
LABELS = typer.Option(None, "--compact-labels/--keep-labels",
                      help="When some labels 0..max have no sample: renumber those that occur 0..k-1, or keep "
                           "every class (default: keep, refused when most classes would be empty).")


def _scheme(scheme: str) -> str:
    if scheme not in ("classes", "dirichlet", "iid"):
        raise SimfedError(f"--scheme must be classes, dirichlet or iid, got {scheme!r}")
    return scheme


def _progress() -> bool:
    return sys.stderr.isatty()


def _done(path: str, notes: list[str] = ()) -> None:
    """The store's path on stdout, after the importer's notes on stderr (held until the import
    succeeded: a failed one prints its one error line only)."""
    for text in notes:
        sys.stderr.write(f"simfed: note: {' '.join(text.split())}\n")
    typer.echo(path)


def _labels(compact: Optional[bool]) -> Optional[str]:
    return None if compact is None else "compact" if compact else "keep"


@partition_app.command("synthetic-femnist")
def synthetic_femnist(
    out: str = typer.Argument(..., help=OUT_HELP),
    clients: int = typer.Option(3597, "--clients", help="Number of writers."),
    seed: int = SEED,
    style_strength: float = typer.Option(1.0, "--style-strength",
                                         help="Scale of writer effects; >= 2 adds conflicting "
                                              "allographs (local models win)."),
    unseen_fraction: float = UNSEEN,
    val_fraction: float = VAL,
    test_fraction: float = TEST,
    overwrite: bool = OVERWRITE,
) -> None:
    """Synthetic FEMNIST-shaped dataset (62 classes, 28x28, per-writer style)."""
    from simfed.partitions.synthetic import make_synthetic_femnist

    _done(make_synthetic_femnist(str(out), clients=clients, seed=seed,
                                 unseen_fraction=unseen_fraction, style_strength=style_strength,
                                 val_fraction=val_fraction, test_fraction=test_fraction,
                                 overwrite=overwrite, progress=_progress()))


@partition_app.command("leaf")
def leaf(
    src: str = typer.Argument(..., help="LEAF data: all_data_*.json, or train/ and test/."),
    out: str = typer.Argument(..., help=OUT_HELP),
    unseen_fraction: float = UNSEEN,
    seed: int = SEED,
    val_fraction: Optional[float] = LEAF_VAL,
    test_fraction: Optional[float] = LEAF_TEST,
    overwrite: bool = OVERWRITE,
) -> None:
    """Import LEAF JSON (FEMNIST); one client per writer."""
    from simfed.partitions.leaf import import_leaf

    _done(import_leaf(str(src), str(out), unseen_fraction=unseen_fraction, seed=seed,
                      val_fraction=val_fraction, test_fraction=test_fraction,
                      overwrite=overwrite, progress=_progress()))


@partition_app.command("hf-femnist")
def hf_femnist(
    src: str = typer.Argument(..., help="Directory of flwrlabs/femnist Parquet files (or one file)."),
    out: str = typer.Argument(..., help=OUT_HELP),
    unseen_fraction: float = UNSEEN,
    seed: int = SEED,
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Per writer; default 0.15."),
    test_fraction: Optional[float] = typer.Option(None, "--test-fraction", help="Per writer; default 0.15."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Import FEMNIST as the Hugging Face dataset flwrlabs/femnist (Flower); one client per writer."""
    from simfed.partitions.hf_femnist import import_hf_femnist

    _done(import_hf_femnist(str(src), str(out), unseen_fraction=unseen_fraction, seed=seed,
                            val_fraction=val_fraction, test_fraction=test_fraction, overwrite=overwrite,
                            progress=_progress()))


@partition_app.command("tff-h5")
def tff_h5(
    src: str = typer.Argument(..., help="TFF's fed_emnist*_train.h5 + *_test.h5 directory, or one .h5 file."),
    out: str = typer.Argument(..., help=OUT_HELP),
    unseen_fraction: float = UNSEEN,
    seed: int = SEED,
    val_fraction: Optional[float] = TFF_VAL,
    test_fraction: Optional[float] = TFF_TEST,
    overwrite: bool = OVERWRITE,
) -> None:
    """Import TFF's federated EMNIST (fed_emnist*.h5); one client per writer."""
    from simfed.partitions.tff_h5 import import_tff_h5

    _done(import_tff_h5(str(src), str(out), unseen_fraction=unseen_fraction, seed=seed,
                        val_fraction=val_fraction, test_fraction=test_fraction, overwrite=overwrite,
                        progress=_progress()))


@partition_app.command("idx")
def idx(
    src: str = typer.Argument(..., help="Directory with IDX files, or one images file."),
    out: str = typer.Argument(..., help=OUT_HELP),
    scheme: str = SCHEME,
    clients: int = CLIENTS,
    classes_per_client: Optional[int] = PER_CLIENT,
    alpha: Optional[float] = ALPHA,
    unseen_fraction: float = UNSEEN,
    seed: int = SEED,
    val_fraction: float = VAL,
    test_fraction: float = TEST,
    compact_labels: Optional[bool] = LABELS,
    overwrite: bool = OVERWRITE,
) -> None:
    """Import MNIST / EMNIST / Fashion-MNIST IDX files and split them over clients."""
    from simfed.partitions.idx import import_idx

    notes: list[str] = []
    _done(import_idx(str(src), str(out), scheme=_scheme(scheme), clients=clients,
                     classes_per_client=classes_per_client, alpha=alpha,
                     unseen_fraction=unseen_fraction, seed=seed, val_fraction=val_fraction,
                     test_fraction=test_fraction, overwrite=overwrite, progress=_progress(),
                     labels=_labels(compact_labels), on_note=notes.append), notes)


@partition_app.command("cifar")
def cifar(
    src: str = typer.Argument(..., help="cifar-10-python.tar.gz or cifar-100-python.tar.gz, or the extracted folder."),
    out: str = typer.Argument(..., help=OUT_HELP),
    scheme: str = SCHEME,
    clients: int = CLIENTS,
    classes_per_client: Optional[int] = PER_CLIENT,
    alpha: Optional[float] = ALPHA,
    label: str = typer.Option("fine", "--label", help="CIFAR-100's labels: fine (100 classes) | coarse (20)."),
    unseen_fraction: float = UNSEEN,
    seed: int = SEED,
    val_fraction: float = VAL,
    test_fraction: float = TEST,
    overwrite: bool = OVERWRITE,
) -> None:
    """Import CIFAR-10 / CIFAR-100 (python version) and split it over clients; train and test pooled."""
    from simfed.partitions.cifar import import_cifar

    _done(import_cifar(str(src), str(out), scheme=_scheme(scheme), clients=clients, classes_per_client=classes_per_client,
                       alpha=alpha, label=label, unseen_fraction=unseen_fraction, seed=seed,
                       val_fraction=val_fraction, test_fraction=test_fraction, overwrite=overwrite,
                       progress=_progress()))


@partition_app.command("shakespeare")
def shakespeare(
    src: str = typer.Argument(..., help="LEAF Shakespeare: all_data*.json, or train/ and test/."),
    out: str = typer.Argument(..., help=OUT_HELP),
    unseen_fraction: float = UNSEEN,
    seed: int = SEED,
    val_fraction: Optional[float] = LEAF_VAL,
    test_fraction: Optional[float] = LEAF_TEST,
    unknown_char: Optional[str] = typer.Option(None, "--unknown-char",
                                               help="Map characters outside LEAF's 80 to this one "
                                                    "(default: refuse them)."),
    overwrite: bool = OVERWRITE,
) -> None:
    """Import LEAF Shakespeare (next character from 80); one client per speaking role."""
    from simfed.partitions.shakespeare import import_shakespeare

    _done(import_shakespeare(str(src), str(out), unseen_fraction=unseen_fraction, seed=seed,
                             val_fraction=val_fraction, test_fraction=test_fraction, unknown=unknown_char,
                             overwrite=overwrite, progress=_progress()))


@partition_app.command("arrays")
def arrays(
    src: str = typer.Argument(..., help="An .npz with x (N, ...), y (N,) and optionally client, classes, vocab."),
    out: str = typer.Argument(..., help=OUT_HELP),
    scheme: Optional[str] = typer.Option(None, "--scheme",
                                         help="natural (by the client array; the default when present) | "
                                              "classes | dirichlet | iid"),
    clients: Optional[int] = typer.Option(None, "--clients", help="Needed by classes, dirichlet and iid."),
    classes_per_client: Optional[int] = PER_CLIENT,
    alpha: Optional[float] = ALPHA,
    input_kind: Optional[str] = typer.Option(None, "--input",
                                             help="unit (uint8 / 255) | raw (float32) | tokens (ids); default: "
                                                  "tokens with a vocab, unit for uint8, else raw."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size",
                                             help="x holds token ids 0..V-1 (when the file has no vocab array)."),
    unseen_fraction: float = UNSEEN,
    seed: int = SEED,
    val_fraction: float = VAL,
    test_fraction: float = TEST,
    compact_labels: Optional[bool] = LABELS,
    overwrite: bool = OVERWRITE,
) -> None:
    """Import your own arrays (.npz): any fixed sample shape of uint8, int32 or float32."""
    from simfed.partitions.arrays import import_arrays

    if scheme is not None and scheme not in ("natural", "classes", "dirichlet", "iid"):
        raise SimfedError(f"--scheme must be natural, classes, dirichlet or iid, got {scheme!r}")
    notes: list[str] = []
    _done(import_arrays(str(src), str(out), scheme=scheme, clients=clients, classes_per_client=classes_per_client,
                        alpha=alpha, input=input_kind, vocab_size=vocab_size, unseen_fraction=unseen_fraction,
                        seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, overwrite=overwrite,
                        progress=_progress(), labels=_labels(compact_labels), on_note=notes.append), notes)


def store_summary(path: str, verify: bool = True) -> dict:
    """The numbers `simfed info` prints (also used by tests and the benchmark)."""
    import numpy as np

    from simfed.partitions.store import PartitionStore

    _check_store_dir(path)
    store = PartitionStore.open(path, verify=verify)
    store.check_contents()
    m = store.manifest
    t = store.clients
    n_train = t.column("n_train").to_numpy()
    unseen = int((np.asarray(t.column("cohort").to_pylist()) == "unseen").sum())
    return {
        "path": store.path,
        "clients": t.num_rows,
        "seen": t.num_rows - unseen,
        "unseen": unseen,
        "num_classes": store.num_classes,
        "classes": list(m["classes"]),
        "sample_shape": list(store.sample_shape),
        "dtype": store.dtype,
        "input": store.input,
        "vocab_size": len(store.vocab),
        "samples": {s: int(t.column(f"n_{s}").to_numpy().sum()) for s in ("train", "val", "test")}
        | {"total": int(sum(t.column(f"n_{s}").to_numpy().sum()
                            for s in ("train", "val", "test")))},
        "per_client": {"min": int(n_train.min()), "median": float(np.median(n_train)),
                       "max": int(n_train.max()),
                       "mean_total": float((m["counts"]["total"]) / max(t.num_rows, 1))},
        "size_bytes": int(sum(m.get("file_sizes", {}).values())),
        "verified": verify,
        "source": m.get("source", {}),
    }


def _check_store_dir(path: str) -> None:
    """A local DIR that is no partition store at all gets its own message: a run or sweep directory
    says which command reads it, a missing one says so (a damaged store is the store's to report)."""
    root = Path(path)
    if "://" in path or (root / "manifest.json").exists():
        return
    if not root.exists():
        raise SimfedError(f"{path}: no such directory; pass a partition store (`simfed partition ...` builds one)")
    if (root / "metrics").is_dir() or (root / "config.json").is_file():
        store = _run_store(root)
        hint = f"; its store is {store}: simfed info {store}" if store else ""
        raise SimfedError(f"{path}: a run directory, not a partition store; `simfed metrics {path}` summarizes "
                          f"the run{hint}")
    if (root / "sweep.json").is_file():
        raise SimfedError(f"{path}: a sweep directory, not a partition store; `simfed compare {path}` reads it")


def _run_store(run_dir: Path) -> str:
    """The [data] path a run directory's config.json names ("" when it cannot be read)."""
    try:
        return str(json.loads((run_dir / "config.json").read_text())["data"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


INPUT_TEXT = {"unit": "unit (x / 255, float32 in [0, 1])", "raw": "raw (values as float32)",
              "tokens": "tokens (int64 ids)"}


def _shown(name: str) -> str:
    """A class name as printed: repr when it is blank or unprintable (Shakespeare's "\\n", " ")."""
    return name if name.isprintable() and name.strip() == name and name else repr(name)


def info(
    store_dir: str = typer.Argument(..., metavar="DIR", help="Partition store directory or URI."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="Check every file's sha256 (reads the whole store)."),
) -> None:
    """Describe a partition store: clients, cohorts, samples, classes, sample shape and type, size."""
    s = store_summary(store_dir, verify=verify)
    if as_json:
        typer.echo(json.dumps(s))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=s["path"], show_header=False)
    classes = s["classes"]
    rows = [
        ("clients", f"{s['clients']} ({s['seen']} seen, {s['unseen']} unseen)"),
        ("samples", ", ".join(f"{k} {v:,}" for k, v in s["samples"].items())),
        ("classes", f"{s['num_classes']}: " + " ".join(_shown(c) for c in classes[:12])
         + (" ..." if len(classes) > 12 else "")),
        ("sample shape", "x".join(map(str, s["sample_shape"])) + f" {s['dtype']}"),
        ("input", INPUT_TEXT.get(s["input"], s["input"])
         + (f", vocabulary of {s['vocab_size']:,} tokens" if s["input"] == "tokens" else "")),
        ("train per client", "min {min}, median {median:g}, max {max}".format(**s["per_client"])),
        ("size", f"{s['size_bytes'] / 2**20:.1f} MiB"),
        ("checksums", "verified" if verify else "not checked (--no-verify)"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(partition_app, name="partition")
    app.command("info")(info)
