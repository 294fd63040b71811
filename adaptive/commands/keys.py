"""``adaptive keys``: the CURVE keys of the services (docs/security.md).

``adaptive keys list`` lists the server key and every client key with its role;
``adaptive keys create NAME --role ROLE`` adds a client (``worker``, ``gateway``,
``therapist``, ``viewer``) and prints where its secret file is (give that file, and the
server's public ``orchestrator.key``, to that client only); ``adaptive keys init`` creates
the defaults (``adaptive serve`` does it itself). Keys live under ``<paths.root>/keys``.
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("keys", help="create and list the services' CURVE keys")
    p.add_argument("--config", default=None, help="services TOML (its [paths].root holds keys/)")
    sub = p.add_subparsers(dest="keys_cmd", metavar="ACTION", required=True)
    sub.add_parser("list", help="list the keys and their roles")
    sub.add_parser("init", help="create the server key and the default clients if missing")
    c = sub.add_parser("create", help="create a client key")
    c.add_argument("name")
    c.add_argument("--role", required=True,
                   choices=["worker", "gateway", "therapist", "viewer"])
    p.set_defaults(func=run)


def run(args) -> int:
    from services.auth import KeyStore  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from services.config import load_services_config  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    ks = KeyStore(load_services_config(args.config).paths.root)
    if args.keys_cmd == "init":
        ks.ensure_defaults()
    elif args.keys_cmd == "create":
        ks.ensure_defaults()
        k = ks.create(args.name, args.role)
        print(f"created {k.role} key {k.name}: secret {ks.client_secret(k.name)} (0600; give it "
              f"to that client only), public {k.path}")
        return 0
    server = ks.server_public()
    print(f"keys in {ks.dir}")
    print(f"  server  orchestrator  {server if server.exists() else '(none: run keys init)'}")
    for k in ks.clients():
        print(f"  {k.role:<9} {k.name:<14} {k.public_key}  {k.path}")
    return 0
