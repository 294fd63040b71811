"""``adaptive info DIR``: what DICOM objects a folder holds and what is wrong with them."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="inventory of a DICOM folder (patients, series, RT objects, problems)")
    p.add_argument("folder", help="folder to scan recursively (headers only)")
    p.add_argument("--json", action="store_true", help="print the inventory as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from adaptive.dicom.inventory import inventory  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    inv = inventory(args.folder)
    print(inv.to_json() if args.json else inv.summary())
    return 0
