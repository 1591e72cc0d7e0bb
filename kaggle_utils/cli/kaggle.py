"""`python -m kaggle_utils kaggle ...`: push, upload-artifact, build-wheels, download, submit, status,
check-kernel, metadata, sync-install-cell.

Thin: kaggle_utils/kaggle/ does the work. check-kernel, metadata, sync-install-cell and build-wheels use only
torch-free modules; the commands that talk to Kaggle import `kaggle.workflow` (and the kaggle client) when
they run.
"""

from __future__ import annotations

import argparse
import dataclasses

from kaggle_utils.cli.run_options import add_set_option, config_from_args
from kaggle_utils.core.config import KaggleConfig
from kaggle_utils.kaggle.install_cell import sync_install_cells
from kaggle_utils.kaggle.kernel_check import check_kernel_folder
from kaggle_utils.kaggle.metadata import resolve_owner, write_submission_metadata
from kaggle_utils.kaggle.wheels import build_wheels, project_root


def register(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser(
        "kaggle", help="Kaggle: kernel folders, datasets, wheels, data, submissions"
    )
    commands = group.add_subparsers(dest="kaggle_command", required=True)

    def add(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument(
            "--config", help="YAML config; its `kaggle:` section sets owner, slugs, competition"
        )
        parser.add_argument(
            "--owner", help="Kaggle user name (default: kaggle.owner, else the authenticated user)"
        )
        add_set_option(parser)
        parser.set_defaults(handler=handler)
        return parser

    parser = add(
        "push", "build the kernel folder of a notebook, check it, then `kaggle kernels push` it", push
    )
    parser.add_argument(
        "notebook",
        help="notebooks/<name>.ipynb, or its py:percent script notebooks/<name>.py; notebooks/train is two "
        "kernels, "
        "picked by -p ORDERING=quant-then-ft or -p ORDERING=ft-then-quant",
    )
    parser.add_argument("--accelerator", help="machine shape, e.g. NvidiaTeslaT4 (2xT4), NvidiaL4, TpuV5E8")
    parser.add_argument("--timeout", type=int, help="session timeout in seconds")
    parser.add_argument("--dry-run", action="store_true", help="build and check the folder, do not push")
    parser.add_argument(
        "-p", "--param", action="append", metavar="NAME=VALUE", help="set a notebook parameter (repeatable)"
    )

    parser = add(
        "check-kernel", "check a kernel folder before pushing (metadata, code file, inputs)", check_kernel
    )
    parser.add_argument("folder", help="a folder with kernel-metadata.json (the repository root works too)")

    parser = add(
        "sync-install-cell",
        "rewrite every notebook's offline-install cell from its one template",
        sync_install_cell,
    )
    parser.add_argument(
        "--notebooks", help="folder of .py/.ipynb notebooks (default: the repository's notebooks/)"
    )

    parser = add(
        "metadata", "rewrite the top-level kernel-metadata.json (submission kernel) from the config", metadata
    )
    parser.add_argument("--out", default="kernel-metadata.json")

    parser = add(
        "upload-artifact", "write dataset-metadata.json, then `datasets create` or `version`", upload_artifact
    )
    parser.add_argument(
        "directory",
        help="an artifact (sends what manifest.json lists) or a build-wheels folder (wheels, "
        "requirements.txt, wheels.json); anything else needs --include",
    )
    parser.add_argument("--role", choices=("artifact", "wheels", "package"), help="default: from the folder")
    parser.add_argument("--slug", help="dataset slug (default: kaggle.<role>_dataset)")
    parser.add_argument("--title", help="dataset title (default: from the slug)")
    parser.add_argument("-m", "--message", default="update", help="version notes")
    parser.add_argument(
        "--dir-mode", choices=("zip", "tar"), default="zip", help="how subfolders are uploaded"
    )
    parser.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="send only the files matching this glob (relative path; repeatable); not for an artifact",
    )

    parser = add("build-wheels", "a dataset folder of the wheels an offline notebook installs", wheels)
    parser.add_argument("--out", required=True, help="folder to fill (wheels, requirements.txt, wheels.json)")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--package-only", action="store_true", help="only the kaggle_utils wheel")
    selection.add_argument("--no-package", action="store_true", help="only the third-party wheels")
    parser.add_argument(
        "--package", action="append", dest="packages", help="bundle this package (repeatable)"
    )

    parser = add("download", "download and unzip the competition data", download)
    parser.add_argument("--path", default="data", help="target folder")
    parser.add_argument("--competition", help="competition slug (default: kaggle.competition)")
    parser.add_argument("--force", action="store_true")

    parser = add("submit", "code-competition submission of a kernel version", submit)
    parser.add_argument("--kernel", help="owner/slug or slug (default: the submission kernel)")
    parser.add_argument("--version", type=int, required=True, help="kernel version, as printed by push")
    parser.add_argument("-m", "--message", required=True, help="submission description")
    parser.add_argument("--file-name", default="submission.csv", help="the file the kernel writes")
    parser.add_argument("--competition", help="competition slug (default: kaggle.competition)")

    parser = add("status", "a kernel's run status, and the latest submissions", status)
    parser.add_argument("--kernel", help="owner/slug or slug (default: the submission kernel)")
    parser.add_argument(
        "--submissions", type=int, default=5, help="how many recent submissions to list (0: none)"
    )


def _config(args: argparse.Namespace) -> KaggleConfig:
    cfg = config_from_args(args).kaggle
    return dataclasses.replace(cfg, owner=args.owner) if args.owner else cfg


def push(args: argparse.Namespace) -> int:
    from kaggle_utils.kaggle.workflow import parse_parameters, push_notebook

    push_notebook(
        args.notebook,
        _config(args),
        accelerator=args.accelerator,
        dry_run=args.dry_run,
        timeout_s=args.timeout,
        parameters=parse_parameters(args.param),
    )
    return 0


def check_kernel(args: argparse.Namespace) -> int:
    check = check_kernel_folder(args.folder)
    print(check.summary())
    return 0 if check.ok else 1


def sync_install_cell(args: argparse.Namespace) -> int:
    changed = sync_install_cells(args.notebooks or project_root() / "notebooks")
    print(f"rewrote {len(changed)} files" + "".join(f"\n  {path}" for path in changed))
    return 0


def metadata(args: argparse.Namespace) -> int:
    cfg = _config(args)
    path = write_submission_metadata(args.out, cfg, resolve_owner(cfg))
    print(f"wrote {path}")
    return 0


def upload_artifact(args: argparse.Namespace) -> int:
    from kaggle_utils.kaggle.workflow import upload_dataset

    upload_dataset(
        args.directory,
        _config(args),
        role=args.role,
        slug=args.slug,
        title=args.title,
        message=args.message,
        dir_mode=args.dir_mode,
        include=args.include,
    )
    return 0


def wheels(args: argparse.Namespace) -> int:
    report = build_wheels(
        args.out,
        _config(args),
        include_package=not args.no_package,
        include_dependencies=not args.package_only,
        packages=args.packages,
    )
    print(report.summary())
    return 0


def download(args: argparse.Namespace) -> int:
    from kaggle_utils.kaggle.workflow import download_competition

    download_competition(_config(args), args.path, competition=args.competition, force=args.force)
    return 0


def submit(args: argparse.Namespace) -> int:
    from kaggle_utils.kaggle.workflow import submit_kernel

    submit_kernel(
        _config(args),
        version=args.version,
        message=args.message,
        kernel=args.kernel,
        file_name=args.file_name,
        competition=args.competition,
    )
    return 0


def status(args: argparse.Namespace) -> int:
    from kaggle_utils.kaggle.workflow import kernel_status

    kernel_status(_config(args), kernel=args.kernel, submissions=args.submissions)
    return 0
