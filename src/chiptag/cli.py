"""Command line: parse arguments, call one function per command, print chiptag errors as one clean line."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional

import typer

from chiptag.errors import ChiptagError
from chiptag.progress import console

# predict and serve take the same engines (features.backends.INFERENCE_ENGINES)
ENGINE_HELP = ("auto (ONNX Runtime on CPU, eager bf16 on CUDA), torch (eager: float32 on CPU, bf16 autocast on "
               "CUDA), onnxruntime (CPU), bf16 (eager, CUDA only)")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate, track and serve multilabel taggers for satellite image chips.")


def friendly(fn):
    """ChiptagError -> 'error: ...' on stderr and exit 2 (130/143 after SIGINT/SIGTERM, with progress saved);
    never a traceback for an expected failure."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ChiptagError as exc:
            label = "stopped" if hasattr(exc, "exit_code") else "error"
            console.print(f"[bold red]{label}:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        from chiptag import __version__

        print(f"chiptag {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print chiptag's version and exit")) -> None:
    """Train, evaluate, track and serve multilabel taggers for satellite image chips."""


@app.command("demo-data")
@friendly
def demo_data(out: Path = typer.Argument(..., help="output folder (Kaggle layout)"),
              n: int = typer.Option(2000, help="number of chips"),
              size: int = typer.Option(128, help="chip size in pixels"),
              seed: int = typer.Option(0, help="random seed"),
              bands: int = typer.Option(3, min=3, max=4, help="3: RGB; 4: B, G, R, NIR (needs --format tif)"),
              format_: str = typer.Option("jpg", "--format", help="jpg (train-jpg/) or tif (train-tif/, uint16)"),
              ) -> None:
    """Write a synthetic Planet-format dataset: OUT/train_classes.csv and OUT/train-jpg/*.jpg (or, with --bands 4
    --format tif, OUT/train-tif/*.tif: B, G, R, NIR with a tag only the NIR band shows)."""
    import time

    t0 = time.perf_counter()
    if (bands, format_) == (3, "jpg"):
        from chiptag.data.synthetic import generate_dataset

        generate_dataset(out, n=n, size=size, seed=seed)
    elif (bands, format_) == (4, "tif"):
        from chiptag.data.synthetic_rasters import generate_raster_dataset

        generate_raster_dataset(out, n=n, size=size, seed=seed)
    else:
        raise ChiptagError(f"demo-data writes --bands 3 --format jpg or --bands 4 --format tif, not --bands {bands} "
                           f"--format {format_}")
    what = f"{size}px" + (", B G R NIR uint16 .tif" if bands == 4 else "")
    print(f"wrote {n} chips ({what}) to {out} in {time.perf_counter() - t0:.1f}s")


@app.command()
@friendly
def train(config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config"),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="override, e.g. model.epochs=3"),
          resume: Optional[Path] = typer.Option(None, "--resume", help="continue this interrupted run dir"),
          all_: bool = typer.Option(False, "--all", help="train every models entry, then write EXPERIMENTS.md"),
          folds: Optional[int] = typer.Option(None, "--folds", help="k-fold: K heads on one feature pass, "
                                              "thresholds on out-of-fold predictions (= --set training.folds=K)"),
          ) -> None:
    """Train the active model entry of CONFIG; --all trains every entry in turn; --resume RUN continues."""
    from chiptag import config as config_mod
    from chiptag.training.main import run_train

    if resume is not None:
        if config is not None or set_ or folds is not None:
            raise ChiptagError("--resume continues a run with its own config.yaml; drop -c/--set/--folds")
        run_train(resume=resume)
        return
    if config is None:
        raise ChiptagError("missing --config/-c (or --resume RUN)")
    cfg = config_mod.load(config, (set_ or []) + ([f"training.folds={folds}"] if folds is not None else []))
    if all_:
        from chiptag.training.sweep import run_sweep

        result = run_sweep(cfg, str(config))
        if result.failed:
            raise ChiptagError(f"{len(result.failed)} of {len(cfg.models)} entries failed: "
                               + "; ".join(result.failed))
        return
    run_train(cfg)


@app.command()
@friendly
def validate(config: Path = typer.Option(..., "--config", "-c", help="YAML config"),
             set_: Optional[List[str]] = typer.Option(None, "--set", help="override, e.g. data.root=..."),
             full: bool = typer.Option(False, "--full", help="decode every image completely (finds corrupt "
                                       "JPEG data the fast header checks miss; = data.full_check: true)"),
             ) -> None:
    """Check CONFIG's label table and every image; list problems by kind. Exit 2 if training would stop."""
    from chiptag import config as config_mod
    from chiptag.data.split import check_plan
    from chiptag.data.validate import preflight
    from chiptag.evaluation.label_rules import unknown_tags

    cfg = config_mod.load(config, set_ or [])
    cfg.data.full_check = cfg.data.full_check or full
    policy = cfg.data.on_bad_image
    cfg.data.on_bad_image = "skip"  # collect everything, then judge by the configured policy
    ds, report = preflight(cfg.data)
    report.policy = policy
    print(report.format())
    if report.bad and policy == "error":
        raise ChiptagError(f"{len(report.bad)} problem(s); training would stop (data.on_bad_image=error). "
                           "Fix them or set data.on_bad_image=skip.")
    # what train checks next (its split, the k-fold cut, the label rules' tags): validate says ok only if train
    # would get past them
    _, warnings = check_plan(cfg.data, ds, cfg.training.folds)
    missing = unknown_tags(cfg.labels.model_dump(), ds.table.tags)
    if missing:
        warnings.append(f"label rules name tags this data does not have, left out: {'; '.join(missing)}")
    for w in warnings:
        print(f"warning: {w}")
    skipped = report.skipped_rows(len(ds.table))
    print(f"ok: {len(ds.table)} usable rows" + (f", {skipped} would be skipped" if skipped else ""))


@app.command()
@friendly
def runs(runs_dir: Path = typer.Argument(Path("runs"), help="folder of run directories"),
         markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table (every column)"),
         wide: bool = typer.Option(False, "--wide", help="every column (model, views, optimizer, scheduler, "
                                   "head, tracker, ...) and whole failure messages"),
         sort: str = typer.Option("run", "--sort", help="run, f2, f2_05, model or duration")) -> None:
    """The experiments table: one row per run in RUNS_DIR (failed, damaged, broken and unfinished runs included).

    Status: completed, damaged (summary but no usable checkpoint), failed, unfinished or broken, with the reason."""
    from chiptag.progress import out
    from chiptag.runs.table import list_runs, print_table, sort_rows, to_markdown

    rows = sort_rows(list_runs(runs_dir), sort)
    if markdown:
        print(to_markdown(rows), end="")
    elif rows:
        print_table(rows, title=str(runs_dir), wide=wide)
    else:
        out.print(f"no runs in {runs_dir}")


@app.command()
@friendly
def evaluate(run: Path = typer.Argument(..., help="run directory")) -> None:
    """Recompute a run's metrics from its checkpoint and split lists."""
    from chiptag.evaluation.evaluate import evaluate_run

    evaluate_run(run)


@app.command()
@friendly
def ensemble(runs_: List[Path] = typer.Argument(..., metavar="RUN...", help="finished run directories"),
             out: Path = typer.Option(..., "--out", "-o", help="the ensemble's run directory (new or empty)"),
             ) -> None:
    """Average the probabilities of RUNs (same tags, test split, validation images); tune thresholds on their
    shared validation (or out-of-fold) predictions, score test once, write a run dir predict/evaluate accept."""
    from chiptag.evaluation.ensemble import make_ensemble

    make_ensemble(runs_, out)


@app.command()
@friendly
def report(run: Path = typer.Argument(..., help="run directory"),
           top_errors: Optional[int] = typer.Option(None, min=1, help="chips on top_errors.png [run config: 24]"),
           tag_tiles: Optional[int] = typer.Option(None, min=1, help="false positives and false negatives per "
                                                   "tag sheet [run config: 6]"),
           tag_sheets: Optional[int] = typer.Option(None, min=1, help="only the N worst tags by F2 get a sheet"),
           error_sheets: Optional[bool] = typer.Option(None, "--error-sheets/--no-error-sheets",
                                                       help="draw the error sheets [run config: yes]"),
           ) -> None:
    """(Re)write RUN/report/: report.md with headline numbers and per-class table, the PNG plots and the error
    sheets (top_errors.png, per_tag/<tag>.png, cooccurrence.png; options default to the run's report: config)."""
    from chiptag.evaluation.report import write_report

    files = write_report(run, {"top_errors": top_errors, "tag_tiles": tag_tiles, "tag_sheets": tag_sheets,
                               "error_sheets": error_sheets})
    print(f"wrote {files['report']} and {len(files) - 1} plot(s)")


@app.command()
@friendly
def predict(run: Path = typer.Argument(..., help="run directory (or its checkpoint.pt)"),
            input_: Path = typer.Argument(..., metavar="INPUT", help="image folder, CSV whose first column is "
                                          "image_name (e.g. Planet's sample_submission.csv), or a text file of "
                                          "image names, one a line (e.g. a run's split/test.txt)"),
            out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="submission CSV to write"),
            probabilities: Optional[Path] = typer.Option(None, help="also write per-tag probabilities here"),
            tta: bool = typer.Option(False, "--tta", help="average the 8 flips/rotations of each chip (the "
                                     "stored thresholds were tuned without TTA)"),
            images: Optional[List[Path]] = typer.Option(
                None, "--images", help="folder(s) holding a CSV's images, searched in order (repeatable); "
                "default: the CSV's folder and its test-jpg/, test-jpg-additional/"),
            ext: Optional[str] = typer.Option(None, help="image extension, e.g. .jpg (default: common ones)"),
            batch_size: int = typer.Option(64, help="images per forward pass"),
            device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:0"),
            workers: str = typer.Option("auto", help="decoding worker processes (auto: as feature extraction)"),
            engine: str = typer.Option("auto", help=ENGINE_HELP),
            ) -> None:
    """Write a Kaggle submission (image_name,tags) for INPUT at the run's tuned thresholds.

    Failed images keep their row with empty tags, go to stderr and <out stem>.errors.csv; exit code 1."""
    from chiptag.device import resolve_device
    from chiptag.features.extraction import default_workers
    from chiptag.inference.submission import PredictOptions, run_predict

    dev = resolve_device(device, "--device")
    opts = PredictOptions(probabilities=probabilities, tta=tta, image_dirs=images or [], ext=ext,
                          batch_size=batch_size, device=dev, engine=engine,
                          num_workers=default_workers(workers, dev))
    r = run_predict(run, input_, out, opts)
    extra = f", probabilities in {probabilities}" if probabilities else ""
    print(f"wrote {r['rows']} rows to {out}{extra} ({'TTA x8, ' if tta else ''}{r['seconds']:.1f}s)")
    if r["errors"]:
        print(f"{r['errors']} image(s) failed: kept with empty tags, listed in {r['errors_file']}")
        raise typer.Exit(1)


@app.command()
@friendly
def export(run: Path = typer.Argument(..., help="run directory (or its checkpoint.pt)"),
           format_: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript"),
           out: Path = typer.Option(..., "--out", "-o", help="file to write, e.g. model.onnx"),
           ) -> None:
    """Export the model: input `images` (float32 Nx3xSxS, normalised), output `probabilities`.

    The file also stores tags, thresholds, image_size, mean and std (ONNX metadata / TorchScript extra files)."""
    from chiptag.inference.export import export_run

    r = export_run(run, format_, out)
    print(f"wrote {r['path']} ({r['format']}, {r['bytes'] / 1e6:.1f} MB, {r['image_size']} px, {r['n_tags']} tags); "
          f"max |exported - PyTorch| on a random batch: {r['max_abs_diff']:.1e}")


@app.command()
@friendly
def serve(run: Path = typer.Argument(..., help="run directory (or its checkpoint.pt)"),
          host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
          port: int = typer.Option(8000, min=0, max=65535, help="TCP port"),
          device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:0"),
          engine: str = typer.Option("auto", help=ENGINE_HELP),
          max_batch: int = typer.Option(64, min=1, help="images per forward: concurrent requests are merged"),
          max_wait_ms: float = typer.Option(10.0, min=0, help="how long a batch waits for more requests"),
          max_images: int = typer.Option(64, min=1, help="images per request"),
          max_file_mb: float = typer.Option(20.0, min=0.001, help="bytes per uploaded file, in MiB"),
          max_request_mb: float = typer.Option(100.0, min=0.001, help="bytes per request, in MiB"),
          max_pixels: int = typer.Option(40_000_000, min=1, help="pixel cap per image (decompression bombs; the run's data.max_image_pixels where lower)"),
          timeout: float = typer.Option(60.0, min=0.1, help="seconds a request may take (and SIGTERM waits for)"),
          workers: int = typer.Option(1, min=1, help="HTTP processes parsing and decoding (with their own "
                                                     "model on CPU, one shared model on CUDA)"),
          model_per_worker: Optional[bool] = typer.Option(
              None, "--model-per-worker/--shared-model",
              help="with --workers: a model in every worker (its share of the cores; the CPU default) or one "
                   "model process fed by the workers (the CUDA default and only layout there)"),
          token: Optional[str] = typer.Option(None, envvar="CHIPTAG_TOKEN", show_envvar=True,
                                              help="require 'Authorization: Bearer TOKEN' on /v1/* and /metrics"),
          no_token: bool = typer.Option(False, help="serve a non-loopback address without a token, on purpose"),
          cors_origin: Optional[List[str]] = typer.Option(None, help="allow browser pages from this origin "
                                                                     "(repeatable; default: no CORS)"),
          access_log: str = typer.Option("text", help="text (uvicorn), json (one object per request), off"),
          ) -> None:
    """Serve RUN over HTTP: POST /v1/predict, GET /v1/model, /metrics, /healthz, /readyz, and a web page at /."""
    from chiptag.device import resolve_device
    from chiptag.inference.service import MB, ServeOptions, require_serve_deps

    require_serve_deps()  # before importing the app: a missing FastAPI is a one-line error, not a traceback
    from chiptag.inference.serve import check_access
    from chiptag.inference.serve import serve as start

    if access_log not in ("text", "json", "off"):
        raise ChiptagError(f"--access-log must be text, json or off, got {access_log!r}")
    check_access(host, token, no_token)  # before the model loads: a refusal costs nothing
    # the device is resolved here, once; the service, the predictor and its input object take it as it is
    device = resolve_device(device, "--device")
    if model_per_worker and device.type != "cpu":
        raise ChiptagError("--model-per-worker is for CPU: on CUDA the workers feed one model on the device")
    if model_per_worker is None:  # measured on an idle 2-core CPU: a model per worker served more (README)
        model_per_worker = device.type == "cpu"
    opts = ServeOptions(host=host, port=port, device=device, engine=engine, max_batch=max_batch,
                        max_wait_ms=max_wait_ms, max_images=max_images, max_file_bytes=int(max_file_mb * MB),
                        max_request_bytes=int(max_request_mb * MB), max_pixels=max_pixels, timeout_s=timeout,
                        workers=workers, model_per_worker=model_per_worker, token=token or None,
                        cors_origins=tuple(cors_origin or ()), access_log=access_log)
    if workers > 1:  # HTTP and decoding in N processes (inference.workers), the model as --model-per-worker says
        from chiptag.inference.workers import serve_workers

        serve_workers(run, opts)
    else:
        start(run, opts)
